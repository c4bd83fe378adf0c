"""Whole radiograph projections: frontal, cross-table lateral and skull densities, then exposure.

`render_projection` picks the field of view and pixel spacing of a view class, draws the
density at no more than 512 px, upsamples it and exposes it on a 12-bit detector.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from training.synth.attributes import MAX_STORED
from training.synth.chest_anatomy import (Body, arms, bowel_gas, clavicles, head, lung_thickness, pelvis,
                                          random_body, rib_cage, spine, trunk_half_width)
from training.synth.devices import support_devices
from training.synth.findings import LungState, lung_findings
from training.synth.patients import SynthPatient, SynthStudy
from training.synth.raster import Canvas, resize_bilinear, smooth_noise, smoothstep, thickness


def _render_frontal(rng: np.random.Generator, cv: Canvas, body: Body,
                    patient: SynthPatient) -> tuple[np.ndarray, list[str]]:
    """Density (projected attenuation) of a frontal neck-to-pelvis projection."""
    u, v = cv.u, cv.v
    half_width = trunk_half_width(v, body.adult)
    tissue = body.tissue * np.sqrt(np.clip(1.0 - (u / half_width) ** 2, 0.0, 1.0))
    head_tissue, skull = head(cv, body.adult)
    arm_tissue, humeri = arms(cv, body)
    tissue = np.maximum(tissue, np.maximum(head_tissue, arm_tissue))

    lung = np.maximum(lung_thickness(cv, body, -1), lung_thickness(cv, body, +1))
    hcu, hcv, hau, hav = body.heart
    heart = thickness(u, v, hcu, hcv, hau, hav, 2.2)
    thymus = thickness(u, v, 0.0, -0.6, body.thymus_au, 0.42, 2.5)
    trachea = smoothstep((0.035 - np.abs(u - 0.01)) / 0.015) * smoothstep((-0.35 - v) / 0.05) * (v > -2.0)
    findings = lung_findings(rng, cv, body, patient) if not body.adult else LungState.normal(u.shape)
    lung_mask = smoothstep(lung / 0.15)
    air = findings.air(lung) * (1.0 - 0.85 * smoothstep(heart / 0.2)) * (1.0 - 0.9 * smoothstep(thymus / 0.3))
    air = np.maximum(air, 0.35 * trachea)
    if not body.adult:
        air = np.maximum(air, bowel_gas(rng, cv, body))
    liver = (0.08 * smoothstep((u + 0.15) / -0.2) * smoothstep((v - body.diaphragm[0]) / 0.06)
             * smoothstep((1.4 - v) / 0.3))

    density = tissue * (1.0 - 0.62 * air) + tissue * liver + findings.density * lung_mask
    density += (rib_cage(cv, body, half_width) + spine(cv, body) + clavicles(cv, body)
                + pelvis(cv, body) + humeri + skull) * (tissue > 0.02)
    if not patient.is_neonate:
        return density, []
    devices, present = support_devices(rng, cv, body)
    return density + devices, present


def _render_lateral(rng: np.random.Generator, cv: Canvas, body: Body,
                    patient: SynthPatient) -> tuple[np.ndarray, list[str]]:
    """Cross-table lateral: anterior to the image left, spine to the right."""
    u, v = cv.u, cv.v
    depth = np.interp(v, [-1.8, -1.2, -0.9, 1.0, 2.5, 3.5], [0.45, 0.5, 0.72, 0.82, 0.86, 0.8]).astype(np.float32)
    centre = 0.05 * v
    tissue = 0.75 * np.sqrt(np.clip(1.0 - ((u - centre) / depth) ** 2, 0.0, 1.0))
    head_tissue, skull = head(cv, body.adult)
    tissue = np.maximum(tissue, head_tissue)
    lung = thickness(u, v, 0.02, body.lung_cv, 0.55, body.lung_av, 2.4)
    lung *= smoothstep((body.diaphragm[0] + 0.1 * (u + 0.2) - v) / 0.05)
    heart = thickness(u, v, -0.28, body.heart[1], 0.32, 0.3, 2.0)
    findings = lung_findings(rng, cv, body, patient)
    lung_mask = smoothstep(lung / 0.15)
    air = findings.air(lung) * (1.0 - 0.8 * smoothstep(heart / 0.2))
    air = np.maximum(air, bowel_gas(rng, cv, body) * 0.7)
    spine_u = 0.58 + 0.05 * v
    phase = (v - body.rib_first) / body.rib_spacing
    d = (phase - np.rint(phase)) * body.rib_spacing
    vertebrae = smoothstep((0.1 - np.abs(u - spine_u)) / 0.02) * (1.0 - 0.6 * np.exp(-((d / 0.015) ** 2)))
    ribs = 0.05 * np.exp(-((d / 0.03) ** 2)) * smoothstep((u - 0.15) / 0.1) * lung_mask
    sternum = 0.1 * np.exp(-(((u + 0.72) / 0.03) ** 2 + (d / 0.04) ** 2)) * (np.abs(v + 0.3) < 0.6)
    density = tissue * (1.0 - 0.55 * air) + findings.density * lung_mask + 0.14 * vertebrae + ribs + sternum + skull
    devices, present = support_devices(rng, cv, body)
    return density + 0.7 * devices, present


def _render_skull(rng: np.random.Generator, cv: Canvas) -> tuple[np.ndarray, list[str]]:
    """Frontal neonatal skull: thin vault with open fontanelle, orbits, jaw."""
    u, v = cv.u, cv.v
    brain = 0.75 * thickness(u, v, 0.0, 0.0, 1.0, 1.12)
    r = np.hypot(u, v / 1.12)
    fontanelle = 1.0 - smoothstep((0.12 - np.abs(u)) / 0.05) * (v < -0.6)
    vault = 0.22 * np.exp(-(((r - 0.96) / 0.035) ** 2)) * fontanelle
    orbits = sum(0.1 * np.exp(-(((np.hypot((u - s * 0.36) / 0.2, (v - 0.35) / 0.16) - 1.0) / 0.15) ** 2))
                 for s in (-1, 1))
    jaw = 0.15 * np.exp(-(((np.hypot(u / 0.62, (v - 0.6) / 0.55) - 1.0) / 0.06) ** 2)) * (v > 0.75)
    face = 0.45 * thickness(u, v, 0.0, 0.95, 0.6, 0.45)
    neck = 0.5 * np.sqrt(np.clip(1 - (u / 0.5) ** 2, 0, 1)) * smoothstep((v - 1.1) / 0.1)
    tissue = np.maximum(brain, np.maximum(face, neck))
    texture = 0.03 * smooth_noise(rng, u.shape, 0.05 / cv.unit_per_px) * (tissue > 0.05)
    density = tissue + vault + orbits + jaw + texture
    return density, []


@dataclass(frozen=True)
class ViewSpec:
    """How a view class appears in the header and where its field of view sits."""

    body_part: str
    description: str
    region: tuple[str, str]
    v_centre: float
    fov_units: float


VIEW_SPECS: MappingProxyType[str, ViewSpec] = MappingProxyType({
    "chest_frontal": ViewSpec("CHEST", "CHEST AP PORTABLE", ("816094009", "Chest"), -0.05, 2.75),
    "chest_lateral": ViewSpec("CHEST", "CHEST LATERAL", ("816094009", "Chest"), -0.05, 2.75),
    "abdomen": ViewSpec("ABDOMEN", "ABDOMEN AP", ("818981001", "Abdomen"), 1.55, 2.6),
    "chest_abdomen": ViewSpec("CHESTABDOMEN", "CHEST ABDOMEN AP", ("416550000", "Chest and abdomen"), 0.75, 4.3),
    "head": ViewSpec("SKULL", "SKULL AP", ("89546000", "Skull"), 0.05, 2.7),
})


def _thorax_width_mm(patient: SynthPatient, weight_kg: float) -> float:
    """~6 cm for a 500 g preterm, ~10 cm at term; children ~14 cm (10 kg) to ~18 cm (18 kg); adults ~30 cm."""
    if patient.child:
        return 90.0 + 5.0 * weight_kg
    return 300.0 if not patient.is_neonate else 50.0 + 15.0 * weight_kg


@dataclass(frozen=True)
class Projection:
    """A rendered radiograph before its header: stored values, spacing, magnification, devices."""

    stored: np.ndarray        # MONOCHROME2 sense (higher = more attenuation), uint16
    imager_spacing_mm: float  # at the detector
    magnification: float      # source-detector / source-patient distance
    devices: list[str]

    @property
    def spacing_mm(self) -> float:
        """Pixel spacing in the patient plane (what the anatomy was drawn with)."""
        return round(self.imager_spacing_mm / self.magnification, 4)


def render_projection(rng: np.random.Generator, study: SynthStudy, view_class: str, size: int) -> Projection:
    """Render a view at ≤512 px, upsample to `size`, add detector noise and collimation."""
    patient = study.patient
    spec = VIEW_SPECS[view_class]
    width_mm = _thorax_width_mm(patient, study.weight_kg)
    if view_class == "head":
        width_mm = 52.0 + 14.0 * study.weight_kg  # biparietal width ~6 cm (500 g) to ~10 cm (term)
    magnification = round(float(rng.uniform(1.04, 1.09)), 3)  # baby on the incubator tray / adult erect
    fov_mm = spec.fov_units * width_mm / 2.0 * rng.uniform(1.0, 1.12) * magnification
    lo, hi = (0.1, 0.2) if patient.is_neonate else (0.15, 0.3) if patient.child else (0.35, 0.45)
    imager_spacing_mm = round(float(np.clip(fov_mm / 1024.0, lo, hi)) * 1024.0 / size, 4)
    work = min(size, 512)
    unit_per_px = imager_spacing_mm / magnification * size / work / (width_mm / 2.0)
    cv = Canvas.build(work, float(rng.normal(0, 0.04)), spec.v_centre + float(rng.normal(0, 0.05)),
                      unit_per_px, float(rng.normal(0, np.deg2rad(3))))
    hyperinflation = 0.1 * patient.bpd_severity
    body = random_body(rng, patient.is_adult, hyperinflation)
    if view_class == "head":
        density, devices = _render_skull(rng, cv)
    elif view_class == "chest_lateral":
        density, devices = _render_lateral(rng, cv, body, patient)
    else:
        density, devices = _render_frontal(rng, cv, body, patient)
    density = resize_bilinear(density.astype(np.float32), (size, size))
    return Projection(expose(rng, density), imager_spacing_mm, magnification, devices)


def expose(rng: np.random.Generator, density: np.ndarray) -> np.ndarray:
    """Log-domain detector signal with dose-dependent quantum noise and optional collimation."""
    offset, gain = rng.uniform(150, 400), rng.uniform(2600, 3100)
    noise_k = rng.uniform(8, 20)
    signal = offset + gain * density
    signal += noise_k * np.exp(0.9 * density) * rng.standard_normal(density.shape, dtype=np.float32)
    if rng.random() < 0.5:
        n = density.shape[0]
        margins = (rng.uniform(0, 0.06, 4) * n).astype(int)
        shutter = rng.uniform(3300, 3700)
        signal[: margins[0]] = shutter
        signal[n - margins[1]:] = shutter
        signal[:, : margins[2]] = shutter
        signal[:, n - margins[3]:] = shutter
    return np.clip(np.rint(signal), 0, MAX_STORED).astype(np.uint16)
