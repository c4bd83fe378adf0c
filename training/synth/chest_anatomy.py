"""Radiograph anatomy of the phantom: trunk outline, lungs, ribs, spine, arms, bowel gas, head.

Each function returns a projected density (or air-fraction) layer on a `Canvas`; the random
`Body` fixes one radiograph's proportions (neonatal or adult).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.synth.raster import Canvas, smoothstep, stamp, thickness


@dataclass(frozen=True)
class Body:
    """Random anatomy of one radiograph, in body units."""

    adult: bool
    tissue: float           # soft-tissue density at the midline
    lung_cu: float          # lateral offset of each lung centre
    lung_cv: float
    lung_au: tuple[float, float]  # (right, left) half-widths
    lung_av: float
    diaphragm: tuple[float, float]  # (right, left) dome height
    heart: tuple[float, float, float, float]  # cu, cv, au, av
    thymus_au: float
    rib_slope: float
    rib_curvature: float
    rib_first: float
    rib_spacing: float
    n_ribs: int
    warp: tuple[float, ...]  # lung boundary harmonics (amplitude, phase) × 4
    arms_down: bool


def random_body(rng: np.random.Generator, adult: bool, hyperinflation: float) -> Body:
    j = lambda s: float(rng.normal(0.0, s))  # noqa: E731 - tiny jitter helper
    heart_au = (0.36 if adult else 0.44) + j(0.03)
    return Body(
        adult=adult,
        tissue=(0.78 if adult else 0.55) + j(0.03),
        lung_cu=0.52 + j(0.02),
        lung_cv=-0.16 + j(0.03),
        lung_au=(0.36 + j(0.015), 0.34 + j(0.015)),
        lung_av=(0.86 if adult else 0.78) + j(0.03),
        diaphragm=(0.40 + j(0.04) + hyperinflation, 0.46 + j(0.04) + hyperinflation),
        heart=(0.12 + j(0.03), 0.17 + j(0.03), heart_au, 0.34 + j(0.02)),
        thymus_au=0.14 if adult else 0.22 + abs(j(0.06)),
        rib_slope=(0.30 if adult else 0.06) + j(0.03),
        rib_curvature=(0.30 if adult else 0.22) + j(0.04),
        rib_first=-0.98 + j(0.02),
        rib_spacing=(0.20 if adult else 0.165) + j(0.008),
        n_ribs=int(rng.integers(9, 11)),
        warp=tuple(float(x) for x in np.column_stack(
            [rng.normal(0.0, 0.035, 4), rng.uniform(0, 2 * np.pi, 4)]).ravel()),
        arms_down=bool(rng.random() < 0.6),
    )


def trunk_half_width(v: np.ndarray, adult: bool) -> np.ndarray:
    """Body outline from neck to pelvis (neonates: big abdomen, short neck)."""
    knots_v = [-1.8, -1.35, -1.12, -0.95, 0.0, 0.8, 1.6, 2.4, 3.0, 3.6]
    if adult:
        widths = [0.28, 0.32, 0.72, 1.02, 1.02, 0.95, 0.88, 0.95, 1.0, 1.0]
    else:
        widths = [0.30, 0.34, 0.70, 0.98, 1.0, 1.04, 1.06, 1.0, 0.92, 0.9]
    return np.interp(v, knots_v, widths).astype(np.float32)


def lung_thickness(cv: Canvas, body: Body, side: int) -> np.ndarray:
    """Projected lung thickness of one side (side −1: patient's right = image left)."""
    u, v = cv.u, cv.v
    cu = side * body.lung_cu
    au = body.lung_au[0 if side < 0 else 1]
    du, dv = (u - cu) / au, (v - body.lung_cv) / body.lung_av
    theta = np.arctan2(dv, du * side)
    w = body.warp
    scale = 1.0 + w[0] * np.sin(2 * theta + w[1]) + w[2] * np.sin(3 * theta + w[3])
    r = (np.abs(du) ** 2.4 + np.abs(dv) ** 2.4) ** (1 / 2.4) / scale
    lateral = np.abs(u - cu * 0.2) / (body.lung_cu + au)
    dome = body.diaphragm[0 if side < 0 else 1] + 0.22 * np.clip(lateral * 1.6 - 0.5, 0, None) ** 2
    below = smoothstep((dome - v) / 0.05)
    return np.sqrt(np.clip(1.0 - r**2, 0.0, 1.0)) * below


def rib_cage(cv: Canvas, body: Body, half_width: np.ndarray) -> np.ndarray:
    """Posterior and anterior ribs as one periodic pattern along a curved coordinate."""
    a = np.abs(cv.u)
    out = np.zeros_like(a)
    lateral = smoothstep((half_width * 0.96 - a) / 0.03) * smoothstep((a - 0.07) / 0.03)
    kinds = [("posterior", 0.0, 1.0, 0.022)]
    if body.adult:  # neonatal anterior ribs are cartilage: invisible
        kinds.append(("anterior", 0.55, 0.3, 0.018))
    for rib_kind, offset, weight, width in kinds:
        if rib_kind == "posterior":
            g = body.rib_slope * (a - 0.07) + body.rib_curvature * (a - 0.07) ** 2
        else:
            g = offset - 0.45 * (a - 0.35)
        phase = (cv.v - body.rib_first - g) / body.rib_spacing
        k = np.rint(phase)
        d = (phase - k) * body.rib_spacing
        present = (k >= 0) & (k < body.n_ribs)
        if rib_kind == "anterior":
            present &= a > 0.3
        w = width * (1.6 if body.adult else 1.0)
        band = 0.06 * np.exp(-((d / w) ** 2)) + 0.04 * np.exp(-(((np.abs(d) - w) / (0.3 * w)) ** 2))  # cortex
        out += weight * band * present * lateral
    return out


def spine(cv: Canvas, body: Body) -> np.ndarray:
    """Vertebral column: bodies with disc spaces and pedicles, neck to sacrum."""
    u, v = cv.u, cv.v
    half = 0.11 if body.adult else 0.085
    column = smoothstep((half - np.abs(u)) / 0.02) * smoothstep((v + 1.9) / 0.1) * smoothstep((3.1 - v) / 0.1)
    spacing = body.rib_spacing
    phase = (v - body.rib_first + 0.5 * spacing) / spacing
    d = (phase - np.rint(phase)) * spacing
    discs = 1.0 - 0.5 * np.exp(-((d / (0.08 * spacing)) ** 2))
    pedicle_d = (phase - np.floor(phase) - 0.5) * spacing
    pedicles = np.exp(-(((np.abs(u) - 0.7 * half) / (0.18 * half)) ** 2 + (pedicle_d / (0.15 * spacing)) ** 2))
    return column * (0.09 * discs + 0.05 * pedicles)


def clavicles(cv: Canvas, body: Body) -> np.ndarray:
    a = np.abs(cv.u)
    centre = body.rib_first - 0.05 - (0.12 if body.adult else 0.06) * (a - 0.1) + 0.03 * np.sin(5.0 * a)
    width = 0.05 if body.adult else 0.035
    along = smoothstep((a - 0.12) / 0.03) * smoothstep((0.78 - a) / 0.05)
    return 0.16 * np.exp(-(((cv.v - centre) / width) ** 2)) * along


def arms(cv: Canvas, body: Body) -> tuple[np.ndarray, np.ndarray]:
    """Soft tissue and humeri of arms at the sides (absent when the arms are raised)."""
    if not body.arms_down:
        return np.zeros_like(cv.u), np.zeros_like(cv.u)
    a, v = np.abs(cv.u), cv.v
    centre = 1.16 + 0.06 * (v + 1.0)
    along = smoothstep((v + 1.05) / 0.1) * smoothstep((0.9 - v) / 0.1)
    tissue = 0.4 * np.sqrt(np.clip(1 - ((a - centre) / 0.2) ** 2, 0, 1)) * along
    bone = 0.12 * np.exp(-(((a - centre) / 0.045) ** 2)) * along * smoothstep((0.4 - v) / 0.1)
    return tissue, bone


def bowel_gas(rng: np.random.Generator, cv: Canvas, body: Body) -> np.ndarray:
    """Lucencies of a neonate's gas-filled bowel and stomach (as air fraction)."""
    gas = np.zeros_like(cv.u)
    stomach = (0.35, body.diaphragm[1] + 0.35)
    stamp(gas, cv, stomach[0], stomach[1], 0.3, lambda du, dv: 0.7 * thickness(du, dv, 0, 0, 0.24, 0.16))
    for _ in range(int(rng.integers(15, 35))):
        cu, cvv = rng.uniform(-0.75, 0.75), rng.uniform(body.diaphragm[1] + 0.6, 2.6)
        ru, rv = rng.uniform(0.05, 0.16), rng.uniform(0.05, 0.13)
        depth = rng.uniform(0.3, 0.7)
        stamp(gas, cv, cu, cvv, max(ru, rv), lambda du, dv: depth * thickness(du, dv, 0, 0, ru, rv, 2.0))
    return np.clip(gas, 0.0, 0.85)


def pelvis(cv: Canvas, body: Body) -> np.ndarray:
    a, v = np.abs(cv.u), cv.v
    wing = np.exp(-(((np.hypot(a - 0.75, v - 2.95) - 0.42) / 0.05) ** 2)) * (v < 3.0) * (a > 0.25)
    femur = thickness(a, v, 0.5, 3.45, 0.16, 0.16)
    return 0.11 * wing + 0.12 * femur


def head(cv: Canvas, adult: bool) -> tuple[np.ndarray, np.ndarray]:
    """Lower head above the neck: soft tissue and the skull rim."""
    cvv = -2.6 if not adult else -2.5
    tissue = 0.8 * thickness(cv.u, cv.v, 0.0, cvv, 0.72, 0.8)
    r = np.hypot(cv.u / 0.72, (cv.v - cvv) / 0.8)
    bone = 0.2 * np.exp(-(((r - 0.93) / 0.03) ** 2))
    return tissue, bone
