"""Hand and wrist radiographs (PA) of children whose skeleton matures with their bone age.

The label of the bone-age task is the skeletal maturity drawn, as a reader would rate it against
an atlas: carpal ossification centres appear in their order (capitate and hamate in the first
months, pisiform about 10 years), epiphyses of the radius, ulna, metacarpals and phalanges appear,
widen and fuse. Lengths are in hand lengths (fingertip to carpus, 10 cm at 1 year, 18 cm at 17).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from training.synth.bones import MU_BONE, MU_SOFT, Point, capsule, long_bone, ovoid, physis
from training.synth.patients import SynthStudy
from training.synth.projection import Projection, expose
from training.synth.radiograph import Positioning, radiograph_dataset
from training.synth.raster import Canvas, resize_bilinear

HAND_REGION = ("85562004", "Hand")


@dataclass(frozen=True)
class Centre:
    """A carpal ossification centre: where, its final radius (hand lengths) and when it appears."""

    u: float
    v: float
    radius: float
    appears_months: float


CARPALS: tuple[Centre, ...] = (
    Centre(0.0, 0.12, 0.035, 2), Centre(0.055, 0.13, 0.03, 3),       # capitate, hamate
    Centre(0.075, 0.19, 0.025, 30), Centre(0.02, 0.2, 0.025, 48),    # triquetrum, lunate
    Centre(-0.075, 0.14, 0.025, 60), Centre(-0.04, 0.12, 0.022, 66),  # trapezium, trapezoid
    Centre(-0.045, 0.19, 0.028, 72), Centre(0.09, 0.22, 0.015, 120),  # scaphoid, pisiform
)
# Rays of fingers 2-5: metacarpal base, metacarpal head, phalanx lengths (proximal, middle, distal).
RAYS: tuple[tuple[Point, Point, tuple[float, ...]], ...] = (
    ((-0.06, 0.06), (-0.09, -0.29), (0.2, 0.12, 0.085)),
    ((-0.015, 0.06), (-0.025, -0.31), (0.22, 0.14, 0.09)),
    ((0.03, 0.06), (0.04, -0.29), (0.21, 0.135, 0.09)),
    ((0.07, 0.07), (0.1, -0.25), (0.17, 0.1, 0.08)),
)
THUMB: tuple[Point, Point, tuple[float, ...]] = ((-0.1, 0.08), (-0.18, -0.08), (0.13, 0.09))


def hand_length_mm(age_days: int) -> float:
    return 100.0 + 5.0 * max(age_days / 365.25 - 1.0, 0.0)


def _along(start: Point, end: Point, length: float, gap: float) -> tuple[Point, Point]:
    """The next bone of a ray: `gap` beyond `end`, continuing the direction start → end."""
    d = np.subtract(end, start) / float(np.hypot(*np.subtract(end, start)))
    p0 = tuple(np.add(end, d * gap))
    return p0, tuple(np.add(p0, d * length))


def _ray(u: np.ndarray, v: np.ndarray, base: Point, head: Point, phalanges: tuple[float, ...],
         bone_age: float, thumb: bool) -> tuple[np.ndarray, np.ndarray]:
    """A metacarpal and its phalanges (bone), and the finger around them (soft tissue)."""
    metacarpal = physis(bone_age, 18.0, 180.0)
    bone = long_bone(u, v, head, base, 0.018, metacarpal, ends=(not thumb, thumb))
    start, end = base, head
    for k, length in enumerate(phalanges):
        growth = physis(bone_age, 15.0 + 6.0 * k, 168.0 + 8.0 * k)
        p0, p1 = _along(start, end, length, 0.035)
        bone = bone + long_bone(u, v, p1, p0, 0.016 - 0.003 * k, growth, ends=(False, True))
        start, end = p0, p1
    finger = capsule(u, v, head, end, 0.042 if not thumb else 0.048)
    return bone, finger


def render_hand(rng: np.random.Generator, study: SynthStudy, size: int) -> Projection:
    """A PA hand and wrist of `study`'s child at the bone age of the patient's label."""
    bone_age = float(study.patient.bone_age_months or study.age_days * 12 / 365.25)
    scale = hand_length_mm(study.age_days)
    magnification = round(float(rng.uniform(1.02, 1.05)), 3)
    fov_mm = 1.45 * scale * magnification * float(rng.uniform(1.0, 1.08))
    work = min(size, 512)
    cv = Canvas.build(work, float(rng.normal(0, 0.02)) * scale, (-0.2 + float(rng.normal(0, 0.02))) * scale,
                      fov_mm / magnification / work, float(rng.normal(0, np.deg2rad(5))))
    u, v = cv.u / scale, cv.v / scale
    bone = long_bone(u, v, (-0.07, 0.6), (-0.07, 0.26), 0.045, physis(bone_age, 12.0, 204.0), ends=(False, True))
    bone = bone + long_bone(u, v, (0.07, 0.62), (0.075, 0.27), 0.03, physis(bone_age, 84.0, 198.0), ends=(False, True))
    for c in CARPALS:
        r = c.radius * float(np.clip((bone_age - c.appears_months) / 72.0, 0.0, 1.0)) ** 0.6
        if r > 0:
            bone = bone + ovoid(u, v, (c.u, c.v), r, 0.9 * r)
    soft = np.maximum(ovoid(u, v, (0.0, -0.08), 0.15, 0.22), capsule(u, v, (0.0, 0.1), (0.0, 0.9), 0.11))
    for base, head, phalanges in RAYS + (THUMB,):
        ray_bone, finger = _ray(u, v, base, head, phalanges, bone_age, thumb=(base, head) == THUMB[:2])
        bone, soft = bone + ray_bone, np.maximum(soft, finger)
    density = (MU_SOFT * 0.7 * soft + MU_BONE * bone) * scale
    density = resize_bilinear(density.astype(np.float32), (size, size))
    return Projection(expose(rng, density), round(fov_mm / size, 4), magnification, [])


def make_hand(rng: np.random.Generator, *, study: SynthStudy, modality: str = "DX",
              photometric: str = "MONOCHROME2", size: int = 1024) -> Dataset:
    """One PA hand and wrist radiograph (CR or DX) of `study`'s child."""
    proj = render_hand(rng, study, size)
    positioning = Positioning("HAND", "HAND PA", HAND_REGION, "PA", laterality="L", supine=False)
    return radiograph_dataset(rng, study, proj, positioning, modality=modality, photometric=photometric)
