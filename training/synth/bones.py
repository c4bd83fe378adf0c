"""Projected bone and soft-tissue primitives for the extremity and hand phantoms.

Coordinates are millimetres in the patient plane (u to the image right, v down). Each primitive
returns the chord length (mm) an X-ray travels through the shape at every pixel, so densities
add along the beam: ``density = MU_SOFT * soft tissue + MU_BONE * bone``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MU_SOFT = 0.011
"""Density per mm of soft tissue (a 40 mm limb ≈ 0.45, like the neonatal trunk)."""
MU_BONE = 0.035
"""Density per mm of cortical bone."""

Point = tuple[float, float]


def segment_distance(u: np.ndarray, v: np.ndarray, p0: Point, p1: Point) -> np.ndarray:
    """Distance of every pixel from the segment p0–p1."""
    du, dv = p1[0] - p0[0], p1[1] - p0[1]
    length2 = max(du * du + dv * dv, 1e-9)
    t = np.clip(((u - p0[0]) * du + (v - p0[1]) * dv) / length2, 0.0, 1.0)
    return np.hypot(u - (p0[0] + t * du), v - (p0[1] + t * dv))


def capsule(u: np.ndarray, v: np.ndarray, p0: Point, p1: Point, radius: float) -> np.ndarray:
    """Chord length through a cylinder with round ends (a finger, a limb, a shaft)."""
    d = segment_distance(u, v, p0, p1)
    return 2.0 * np.sqrt(np.clip(radius * radius - d * d, 0.0, None))


def ovoid(u: np.ndarray, v: np.ndarray, centre: Point, ru: float, rv: float) -> np.ndarray:
    """Chord length through an ellipsoid (an epiphysis, a carpal ossification centre)."""
    r2 = ((u - centre[0]) / ru) ** 2 + ((v - centre[1]) / rv) ** 2
    return 2.0 * min(ru, rv) * np.sqrt(np.clip(1.0 - r2, 0.0, None))


def tubular_bone(u: np.ndarray, v: np.ndarray, p0: Point, p1: Point, radius: float) -> np.ndarray:
    """A long bone's shaft: a dense cortex around a lighter medullary cavity."""
    return capsule(u, v, p0, p1, radius) - 0.65 * capsule(u, v, p0, p1, 0.62 * radius)


@dataclass(frozen=True)
class Growth:
    """An open physis between a metaphysis and its epiphysis: gap (mm) and epiphysis size (0-1)."""

    gap_mm: float
    epiphysis: float


def physis(bone_age_months: float, appears: float, fuses: float) -> Growth:
    """Epiphysis size grows from `appears` (months); the physis gap closes by `fuses`."""
    size = float(np.clip((bone_age_months - appears) / 48.0, 0.0, 1.0)) ** 0.7
    closing = float(np.clip((fuses - bone_age_months) / 24.0, 0.0, 1.0))
    return Growth(gap_mm=1.8 * closing if size > 0 else 0.0, epiphysis=size)


def long_bone(u: np.ndarray, v: np.ndarray, p0: Point, p1: Point, radius: float,
              growth: Growth | None, ends: tuple[bool, bool] = (True, True)) -> np.ndarray:
    """A roughly vertical long bone from p0 to p1: shaft, flared metaphyses and, in a child, an
    epiphysis beyond an open physis at each of its `ends` that has one."""
    axis = np.subtract(p1, p0) / max(float(np.hypot(*np.subtract(p1, p0))), 1e-9)
    shaft0, shaft1 = tuple(np.add(p0, axis * radius)), tuple(np.subtract(p1, axis * radius))
    bone = tubular_bone(u, v, shaft0, shaft1, radius)
    for end, inward, has_epiphysis in ((p0, axis, ends[0]), (p1, -axis, ends[1])):
        flare = tuple(np.add(end, inward * 0.8 * radius))
        bone = np.maximum(bone, 0.75 * ovoid(u, v, flare, 1.35 * radius, 0.8 * radius))
        if growth is not None and growth.epiphysis > 0 and has_epiphysis:
            half = 0.6 * radius * growth.epiphysis
            centre = tuple(np.subtract(end, inward * (growth.gap_mm + half)))
            bone = bone + 0.8 * ovoid(u, v, centre, 1.3 * radius * growth.epiphysis, half)
    return bone
