"""Lung findings of the radiograph phantom: the learnable signal.

- BPD: coarse interstitial streaks, cystic ("bubbly") lucencies, hyperinflation;
- pneumonia: patchy consolidation (neonates); in children, by type: lobar consolidation
  (bacterial-like) or a diffuse perihilar interstitial pattern with air trapping (viral-like);
- iRDS (graded 0-4): ground-glass haze, fine granularity, air bronchograms (a confounder).

Vessels are drawn for everyone; the findings follow the patient's labels and severities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.synth.chest_anatomy import Body
from training.synth.patients import SynthPatient
from training.synth.raster import (Canvas, curve, smooth_noise, smoothstep, soften_lines, splat_polyline, stamp,
                                   thickness)


def _point_in_lungs(rng: np.random.Generator, body: Body) -> tuple[float, float, int]:
    """A random point well inside either lung: (u, v, side), by rejection sampling."""
    side = int(rng.choice([-1, 1]))
    i = 0 if side < 0 else 1
    for _ in range(100):
        du, dv = rng.uniform(-0.85, 0.85, 2)
        v = body.lung_cv + dv * body.lung_av
        if du * du + dv * dv < 0.7 and v < body.diaphragm[i] - 0.08:
            return side * body.lung_cu + du * body.lung_au[i], v, side
    return side * body.lung_cu, body.lung_cv, side


def _radial_streaks(rng: np.random.Generator, cv: Canvas, body: Body, layer: np.ndarray, count: int,
                    length: tuple[float, float], value: float, central: bool) -> None:
    """Short strands roughly radial from the hila (vessels when central, fibrosis otherwise)."""
    for _ in range(count):
        cu, cvv, side = _point_in_lungs(rng, body)
        hilum = np.array([side * 0.2, body.lung_cv + 0.12])
        start = np.array([cu, cvv])
        if central:
            start = hilum + (start - hilum) * rng.uniform(0.1, 0.45)
        direction = start - hilum
        angle = np.arctan2(direction[1], direction[0]) + rng.normal(0.0, 0.5 if central else 0.8)
        ln = rng.uniform(*length)
        mid = start + 0.5 * ln * np.array([np.cos(angle + 0.3 * rng.normal()), np.sin(angle + 0.3 * rng.normal())])
        end = start + ln * np.array([np.cos(angle), np.sin(angle)])
        splat_polyline(layer, cv, curve([tuple(start), tuple(mid), tuple(end)], 12), value * rng.uniform(0.6, 1.0))


def _cysts(rng: np.random.Generator, cv: Canvas, body: Body, severity: float,
           lucency: np.ndarray, density: np.ndarray) -> None:
    """Bubbly lucencies with thin walls (cystic BPD)."""
    for _ in range(int(severity * rng.integers(40, 65))):
        cu, cvv, _side = _point_in_lungs(rng, body)
        rad = rng.uniform(0.04, 0.09)
        depth = rng.uniform(0.45, 0.75) * severity
        stamp(lucency, cv, cu, cvv, 1.4 * rad, lambda du, dv: depth * thickness(du, dv, 0, 0, rad, rad, 2))
        stamp(density, cv, cu, cvv, 1.6 * rad,
              lambda du, dv: 0.06 * severity * np.exp(-(((np.hypot(du, dv) - rad) / (0.25 * rad)) ** 2)))


def _consolidation(rng: np.random.Generator, cv: Canvas, body: Body, severity: float) -> np.ndarray:
    """Patchy airspace opacities (pneumonia), as a loss of air fraction in [0, 1]."""
    loss = np.zeros_like(cv.u)
    patchiness = 0.5 + 0.5 * smooth_noise(rng, cv.u.shape, 0.04 / cv.unit_per_px)
    for _ in range(int(rng.integers(1, 4))):
        cu, cvv, _side = _point_in_lungs(rng, body)
        ru, rv = rng.uniform(0.12, 0.26), rng.uniform(0.12, 0.3)
        amp = rng.uniform(0.45, 0.8) * severity
        stamp(loss, cv, cu, cvv, 2.2 * max(ru, rv),
              lambda du, dv: amp * np.exp(-((du / ru) ** 2 + (dv / rv) ** 2)))
    return np.clip(loss * np.clip(patchiness, 0.2, 1.5), 0.0, 0.9)


def _lobar_consolidation(rng: np.random.Generator, cv: Canvas, body: Body) -> np.ndarray:
    """Bacterial-like: one lobe's airspaces filled, bounded by a fissure, as a loss of air fraction."""
    side = int(rng.choice([-1, 1]))
    upper = bool(rng.random() < 0.4)
    fissure = body.lung_cv + float(rng.uniform(-0.1, 0.15))
    in_lung = smoothstep((side * cv.u - 0.12) / 0.06)
    in_lobe = smoothstep((fissure - cv.v) / 0.02) if upper else smoothstep((cv.v - fissure) / 0.02)
    patchiness = np.clip(0.85 + 0.15 * smooth_noise(rng, cv.u.shape, 0.05 / cv.unit_per_px), 0.5, 1.0)
    return np.clip(float(rng.uniform(0.6, 0.85)) * in_lung * in_lobe * patchiness, 0.0, 0.9)


def _interstitial_pattern(rng: np.random.Generator, cv: Canvas, body: Body) -> np.ndarray:
    """Viral-like: bilateral perihilar peribronchial streaks and fine reticulation (a density layer)."""
    streaks = np.zeros_like(cv.u)
    _radial_streaks(rng, cv, body, streaks, int(rng.integers(45, 70)), (0.15, 0.4), 0.09, central=True)
    reticulation = 0.02 * np.abs(smooth_noise(rng, cv.u.shape, 0.012 / cv.unit_per_px))
    hila = sum(np.exp(-(((cv.u - s * 0.25) / 0.35) ** 2 + ((cv.v - body.lung_cv - 0.1) / 0.45) ** 2)) for s in (-1, 1))
    return soften_lines(streaks, 0.015 / cv.unit_per_px) + reticulation * hila


@dataclass(frozen=True)
class LungState:
    aeration: np.ndarray  # change of the lungs' air content (scales with lung thickness)
    lucency: np.ndarray   # extra air independent of thickness (cysts, air bronchograms)
    density: np.ndarray   # extra density from interstitium, walls, vessels

    @classmethod
    def normal(cls, shape: tuple[int, ...]) -> LungState:
        return cls(*(np.zeros(shape, np.float32) for _ in range(3)))

    def air(self, lung: np.ndarray) -> np.ndarray:
        """Projected air of the lungs given their thickness (0–1); > 1 is hyperlucent."""
        mask = smoothstep(lung / 0.15)
        return np.clip(lung * np.clip(0.9 + self.aeration, 0.05, 1.2) + self.lucency * mask, 0.0, 1.5)


def lung_findings(rng: np.random.Generator, cv: Canvas, body: Body, patient: SynthPatient) -> LungState:
    """Vessels for everyone; iRDS, BPD and pneumonia according to the patient's labels."""
    shape = cv.u.shape
    aeration, lucency, density = (np.zeros(shape, np.float32) for _ in range(3))
    strands = np.zeros(shape, np.float32)
    _radial_streaks(rng, cv, body, strands, int(rng.integers(12, 20)), (0.12, 0.35), 0.05, central=True)
    density += soften_lines(strands, 0.01 / cv.unit_per_px)
    density += 0.015 * smooth_noise(rng, shape, 0.02 / cv.unit_per_px)
    grade = patient.irds_grade or 0
    if grade:
        density += 0.008 * grade * smooth_noise(rng, shape, 0.005 / cv.unit_per_px)
        aeration -= 0.11 * grade
        bronchograms = np.zeros(shape, np.float32)
        _radial_streaks(rng, cv, body, bronchograms, 6 * grade, (0.15, 0.35), 0.08 * grade, central=True)
        lucency += soften_lines(bronchograms, 0.01 / cv.unit_per_px)
    if patient.bpd:
        s = patient.bpd_severity
        fibrosis = np.zeros(shape, np.float32)
        count = int(s * rng.integers(35, 60))
        _radial_streaks(rng, cv, body, fibrosis, count, (0.08, 0.24), 0.1 * s, central=False)
        density += soften_lines(fibrosis, 0.018 / cv.unit_per_px)
        density += 0.03 * s * smooth_noise(rng, shape, 0.03 / cv.unit_per_px)
        aeration += 0.05 * s  # hyperlucent, over-inflated lungs
        _cysts(rng, cv, body, s, lucency, density)
    if patient.pneumonia:
        aeration -= _consolidation(rng, cv, body, patient.pneumonia_severity)
    if patient.pneumonia_type == "bacterial":
        aeration -= _lobar_consolidation(rng, cv, body)
    elif patient.pneumonia_type == "viral":
        density += _interstitial_pattern(rng, cv, body)
        aeration += 0.04  # air trapping
    return LungState(aeration, lucency, density)
