"""Extremity radiographs of children: long bones with open physes, with or without a fracture.

The fracture (the label of PedXnet's downstream fracture task) is a lucent line across the shaft
with the distal fragment displaced and angulated, and soft-tissue swelling around it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
from pydicom.dataset import Dataset

from training.synth.bones import MU_BONE, MU_SOFT, Growth, capsule, long_bone, physis
from training.synth.patients import SynthStudy
from training.synth.projection import Projection, expose
from training.synth.radiograph import Positioning, radiograph_dataset
from training.synth.raster import Canvas, resize_bilinear


@dataclass(frozen=True)
class LimbSegment:
    """One limb segment: its header, its bones' size by age and the second bone beside the first."""

    body_part: str
    description: str
    region: tuple[str, str]
    length_mm: tuple[float, float]  # at 1 year, added per year
    radius_mm: tuple[float, float]
    paired: float | None = None     # radius of the second bone, relative to the first


LIMB_SEGMENTS: MappingProxyType[str, LimbSegment] = MappingProxyType({
    "forearm": LimbSegment("FOREARM", "FOREARM AP", ("14975008", "Forearm"), (95.0, 9.0), (3.5, 0.25), 0.8),
    "lower_leg": LimbSegment("TIBIA", "TIBIA FIBULA AP", ("30021000", "Lower leg"), (110.0, 16.0), (5.0, 0.4), 0.45),
    "humerus": LimbSegment("HUMERUS", "HUMERUS AP", ("40983000", "Upper arm"), (110.0, 13.0), (5.0, 0.35)),
    "femur": LimbSegment("FEMUR", "FEMUR AP", ("68367000", "Thigh"), (140.0, 20.0), (6.5, 0.5)),
})

Bones = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Fracture:
    """A fracture line through (0, v) at `angle`, the distal fragment moved by `shift` and `tilt`."""

    v: float
    angle: float
    shift: float
    tilt: float
    gap_mm: float

    def across(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Signed distance (mm) from the fracture line; positive on the distal side."""
        return (v - self.v) * np.cos(self.angle) - u * np.sin(self.angle)

    def distal_frame(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Coordinates in which the displaced distal fragment is drawn where it was."""
        du, dv = u - self.shift, v - self.v
        c, s = np.cos(self.tilt), np.sin(self.tilt)
        return c * du + s * dv, self.v - s * du + c * dv


def random_fracture(rng: np.random.Generator, length: float, radius: float) -> Fracture:
    return Fracture(v=float(rng.uniform(-0.25, 0.25)) * length, angle=float(rng.uniform(-0.6, 0.6)),
                    shift=float(rng.choice([-1, 1]) * rng.uniform(0.4, 0.9)) * radius,
                    tilt=float(rng.uniform(-0.12, 0.12)), gap_mm=float(rng.uniform(1.2, 2.0)))


def _bones(segment: LimbSegment, length: float, radius: float, growth: Growth) -> tuple[Bones, float]:
    """The segment's bones as a function of coordinates, and the soft tissue's radius."""
    offset = radius * 1.6 if segment.paired else 0.0
    top, bottom = -length / 2.0, length / 2.0

    def draw(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        bone = long_bone(u, v, (-offset, top), (-offset, bottom), radius, growth)
        if segment.paired:
            bone = bone + long_bone(u, v, (offset, top), (offset, bottom), radius * segment.paired, growth)
        return bone

    return draw, offset + radius * 3.2


def _fractured(bones: Bones, fracture: Fracture) -> Bones:
    def draw(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        side = fracture.across(u, v)
        moved = bones(*fracture.distal_frame(u, v))
        bone = np.where(side > 0, moved, bones(u, v))
        return bone * (1.0 - 0.9 * np.exp(-((side / fracture.gap_mm) ** 2)))

    return draw


def render_extremity(rng: np.random.Generator, study: SynthStudy, segment: LimbSegment, size: int) -> Projection:
    """A limb segment AP of `study`'s child, fractured when the patient's label says so."""
    years = study.age_days / 365.25
    length = segment.length_mm[0] + segment.length_mm[1] * max(years - 1.0, 0.0)
    radius = segment.radius_mm[0] + segment.radius_mm[1] * max(years - 1.0, 0.0)
    bones, limb_radius = _bones(segment, length, radius, physis(study.age_days * 12 / 365.25, 12.0, 180.0))
    swelling = 0.0
    fracture = None
    if study.patient.fracture:
        fracture = random_fracture(rng, length, radius)
        bones, swelling = _fractured(bones, fracture), 0.35
    magnification = round(float(rng.uniform(1.02, 1.05)), 3)
    fov_mm = 1.15 * (length + 4 * radius) * magnification
    imager_spacing_mm = round(fov_mm / size, 4)
    work = min(size, 512)
    cv = Canvas.build(work, float(rng.normal(0, 3)), float(rng.normal(0, 4)), fov_mm / magnification / work,
                      float(rng.normal(0, np.deg2rad(4))))
    soft = capsule(cv.u, cv.v, (0.0, -0.7 * length), (0.0, 0.7 * length), limb_radius)
    if fracture is not None:  # soft-tissue swelling around the fracture
        soft = soft * (1.0 + swelling * np.exp(-((fracture.across(cv.u, cv.v) / (1.5 * limb_radius)) ** 2)))
    density = MU_SOFT * soft + MU_BONE * bones(cv.u, cv.v)
    density = resize_bilinear(density.astype(np.float32), (size, size))
    return Projection(expose(rng, density), imager_spacing_mm, magnification, [])


def make_extremity(rng: np.random.Generator, *, study: SynthStudy, segment: str = "forearm",
                   modality: str = "DX", photometric: str = "MONOCHROME2", size: int = 1024) -> Dataset:
    """One extremity radiograph (CR or DX) of `study`'s child; `segment` is a key of LIMB_SEGMENTS."""
    if segment not in LIMB_SEGMENTS:
        raise ValueError(f"cannot render limb segment {segment!r}; choose from {sorted(LIMB_SEGMENTS)}")
    spec = LIMB_SEGMENTS[segment]
    proj = render_extremity(rng, study, spec, size)
    positioning = Positioning(spec.body_part, spec.description, spec.region, "AP",
                              laterality=str(rng.choice(["L", "R"])), supine=False)
    return radiograph_dataset(rng, study, proj, positioning, modality=modality, photometric=photometric)
