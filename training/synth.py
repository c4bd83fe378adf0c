"""Synthetic neonatal chest imaging: radiographs, chest MR series, reference lung SEGs.

`generate()` writes a small, fully synthetic archive for tests, demos and `cradle synth`:
day-1 neonatal chest radiographs (CR and DX, MONOCHROME1 and MONOCHROME2), distractors
(adult chests, laterals, abdomens, skulls, babygrams), neonatal chest MR series with a
reference lung segmentation each (DICOM SEG, "made by a reviewer"), `labels.csv` and
`truth.json`. The same seed gives byte-identical files.

The phantoms are crude on purpose. What matters downstream is that the headers are valid
and consistent, the MR geometry is exact (each SEG frame overlays its slice voxel for
voxel), and the lung texture carries a learnable signal:

- BPD: coarse interstitial streaks, cystic ("bubbly") lucencies, hyperinflation;
- pneumonia: patchy consolidation;
- iRDS (graded 0-4): ground-glass haze, fine granularity, air bronchograms (a confounder).

Only numpy, pydicom and highdicom: `node/` and the CLI may import this without torch.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    generate_uid,
)

__all__ = [
    "GENERATED_VIEW_CLASSES",
    "INSTITUTION_NAME",
    "LABEL_COLUMNS",
    "LEFT_LUNG",
    "RIGHT_LUNG",
    "SYNTHETIC_COMMENT",
    "VIEW_CLASSES",
    "SynthPatient",
    "SynthStudy",
    "SynthSummary",
    "generate",
    "lung_volumes_ml",
    "make_adult",
    "make_cxr",
    "make_mr_series",
    "make_neonate",
    "make_reference_seg",
    "make_study",
    "synth_uid",
]

VIEW_CLASSES: tuple[str, ...] = (
    "chest_frontal", "chest_lateral", "abdomen", "chest_abdomen", "head", "spine", "extremity",
)
# Views that `generate()` uses for its non-chest share, in the order it cycles through them.
GENERATED_VIEW_CLASSES: tuple[str, ...] = ("chest_lateral", "abdomen", "head", "chest_abdomen")
LABEL_COLUMNS: tuple[str, ...] = (
    "StudyInstanceUID", "bpd", "pneumonia", "irds_grade", "gestational_age_weeks", "birth_weight_g",
)
SYNTHETIC_COMMENT = "SYNTHETIC - NOT FOR CLINICAL USE"
INSTITUTION_NAME = "cradle synthetic"
MANUFACTURER = "cradle synthetic"
SOFTWARE_VERSION = "cradle-synth 1"

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_IMAGE_STORAGE_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"

BITS_STORED = 12
MAX_STORED = (1 << BITS_STORED) - 1
LEFT_LUNG, RIGHT_LUNG = 1, 2  # label values in MR label volumes and SEG segment numbers

_UID_NAMESPACE = "cradle-synth-v1"
_STREAM_PLAN, _STREAM_PATIENT, _STREAM_CXR, _STREAM_MR = 1, 2, 3, 4
_IMPLEMENTATION_VERSION_NAME = "CRADLE_SYNTH_1"


# ---------------------------------------------------------------------------
# Patients, studies, UIDs
# ---------------------------------------------------------------------------


def synth_uid(*parts: object) -> str:
    """A UID derived only from `parts` (pydicom root + hash), so reruns reproduce it."""
    return generate_uid(entropy_srcs=[_UID_NAMESPACE, *(str(p) for p in parts)])


@dataclass(frozen=True)
class SynthPatient:
    """Ground truth of one synthetic patient; neonates carry the label set."""

    patient_id: str
    patient_name: str
    birth_date: dt.date
    sex: str
    birth_weight_g: int | None
    gestational_age_weeks: float | None
    bpd: int | None = None
    pneumonia: int | None = None
    irds_grade: int | None = None
    bpd_severity: float = 0.0
    pneumonia_severity: float = 0.0

    @property
    def is_neonate(self) -> bool:
        return self.gestational_age_weeks is not None


@dataclass(frozen=True)
class SynthStudy:
    """One study with one series (every synthetic study has exactly one)."""

    patient: SynthPatient
    study_instance_uid: str
    series_instance_uid: str
    study_id: str
    accession_number: str
    study_datetime: dt.datetime
    weight_kg: float

    @property
    def age_days(self) -> int:
        return (self.study_datetime.date() - self.patient.birth_date).days

    @property
    def patient_age(self) -> str:
        """Patient's Age (AS): days for infants, years for adults."""
        years = _whole_years(self.patient.birth_date, self.study_datetime.date())
        return f"{years:03d}Y" if years >= 2 else f"{min(self.age_days, 999):03d}D"


def _whole_years(born: dt.date, on: dt.date) -> int:
    return on.year - born.year - ((on.month, on.day) < (born.month, born.day))


# Median birth weight (g) by gestational age (weeks), roughly Fenton 2013.
_GA_WEEKS = (22, 24, 26, 28, 30, 32, 34, 36, 38, 40, 42)
_GA_WEIGHT_G = (500, 650, 850, 1100, 1450, 1800, 2250, 2700, 3100, 3450, 3650)


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))


def make_neonate(rng: np.random.Generator, index: int, birth_date: dt.date) -> SynthPatient:
    """A NICU admission: mostly preterm; BPD/iRDS more likely the more preterm."""
    preterm = rng.random() < 0.65
    ga_days = int(rng.integers(23 * 7, 32 * 7)) if preterm else int(rng.integers(32 * 7, 41 * 7))
    ga_weeks = ga_days / 7.0
    median_g = float(np.interp(ga_weeks, _GA_WEEKS, _GA_WEIGHT_G))
    birth_weight_g = int(np.clip(median_g * np.exp(rng.normal(0.0, 0.12)), 500, 4000))
    bpd = int(rng.random() < 0.3 + 0.3 * _sigmoid((29.5 - ga_weeks) / 1.5))
    pneumonia = int(rng.random() < 0.4)
    irds_mean = float(np.clip((33.0 - ga_weeks) / 3.0, 0.0, 3.0))
    irds_grade = int(np.clip(np.rint(irds_mean + rng.normal(0.0, 0.8)), 0, 4))
    return SynthPatient(
        patient_id=f"SYN{index:04d}",
        patient_name=f"SYNTH^BABY{index:04d}",
        birth_date=birth_date,
        sex=str(rng.choice(["M", "F"])),
        birth_weight_g=birth_weight_g,
        gestational_age_weeks=round(ga_weeks, 1),
        bpd=bpd,
        pneumonia=pneumonia,
        irds_grade=irds_grade,
        bpd_severity=float(rng.uniform(0.45, 1.0)) if bpd else 0.0,
        pneumonia_severity=float(rng.uniform(0.4, 1.0)) if pneumonia else 0.0,
    )


def make_adult(rng: np.random.Generator, index: int, on: dt.date) -> SynthPatient:
    """An adult who ended up in the neonatal feed (wrong routing): no labels."""
    years = int(rng.integers(18, 90))
    birth = dt.date(on.year - years, on.month, min(on.day, 28)) - dt.timedelta(days=int(rng.integers(1, 360)))
    return SynthPatient(
        patient_id=f"SYN{index:04d}",
        patient_name=f"SYNTH^ADULT{index:04d}",
        birth_date=birth,
        sex=str(rng.choice(["M", "F"])),
        birth_weight_g=None,
        gestational_age_weeks=None,
    )


def make_study(
    patient: SynthPatient, index: int, when: dt.datetime, *, key: object, weight_kg: float | None = None
) -> SynthStudy:
    """Study/series identity for `patient`; UIDs derive from `key` only."""
    if weight_kg is None:
        weight_kg = (patient.birth_weight_g or 70000) / 1000.0
    return SynthStudy(
        patient=patient,
        study_instance_uid=synth_uid(key, "study"),
        series_instance_uid=synth_uid(key, "series"),
        study_id=f"S{index:04d}",
        accession_number=f"SYNA{index:06d}",
        study_datetime=when,
        weight_kg=round(weight_kg, 3),
    )


def _random_neonatal_study(rng: np.random.Generator) -> SynthStudy:
    """For building blocks called without a study: a day-1 neonate with rng-derived UIDs."""
    key = int(rng.integers(1 << 62))
    index = int(rng.integers(1, 10000))
    when = dt.datetime(2024, 1, 1, 8, 0) + dt.timedelta(minutes=int(rng.integers(0, 365 * 24 * 60)))
    patient = make_neonate(rng, index, when.date() - dt.timedelta(days=1))
    return make_study(patient, index, when, key=("rng", key))


# ---------------------------------------------------------------------------
# Small numeric helpers
# ---------------------------------------------------------------------------


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _gaussian_blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Periodic Gaussian blur via FFT (fine: the canvases have empty margins)."""
    if sigma_px <= 0.0:
        return img
    fy = np.fft.fftfreq(img.shape[0]).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(img.shape[1]).astype(np.float32)[None, :]
    transfer = np.exp(np.float32(-2.0 * (np.pi * sigma_px) ** 2) * (fx**2 + fy**2))
    spectrum = np.fft.rfft2(img.astype(np.float32, copy=False)) * transfer
    return np.fft.irfft2(spectrum, s=img.shape).astype(np.float32, copy=False)


def _soften_lines(layer: np.ndarray, sigma_px: float) -> np.ndarray:
    """Blur 1-px splatted lines, keeping their peak value (a line's profile integrates to 1 px)."""
    sigma_px = max(sigma_px, 0.5)
    return _gaussian_blur(layer, sigma_px) * float(np.sqrt(2.0 * np.pi) * sigma_px)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian random field with correlation length ~sigma_px."""
    field_ = _gaussian_blur(rng.standard_normal(shape, dtype=np.float32), sigma_px)
    return (field_ - field_.mean()) / (field_.std() + 1e-6)


def _resize_bilinear(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if img.shape == shape:
        return img
    out = img
    for axis, n_out in enumerate(shape):
        n_in = out.shape[axis]
        pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        w = (pos - lo).astype(np.float32)
        a, b = np.take(out, lo, axis=axis), np.take(out, hi, axis=axis)
        w = w[:, None] if axis == 0 else w[None, :]
        out = a * (1 - w) + b * w
    return out.astype(np.float32)


def _ds(value: float, digits: int = 6) -> str:
    """A Decimal String short enough for DICOM's 16 characters."""
    return f"{value:.{digits}g}"


# ---------------------------------------------------------------------------
# Radiograph canvas: body coordinates (u right-of-image, v down) on a pixel grid
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Canvas:
    """Pixel grid mapped to body units (1 unit = half the thorax width), slightly rotated."""

    n: int
    u0: float
    v0: float
    unit_per_px: float
    cos: float
    sin: float
    u: np.ndarray = field(repr=False)
    v: np.ndarray = field(repr=False)

    @classmethod
    def build(cls, n: int, u0: float, v0: float, unit_per_px: float, angle: float) -> _Canvas:
        c, s = float(np.cos(angle)), float(np.sin(angle))
        d = (np.arange(n, dtype=np.float32) - (n - 1) / 2.0)
        dc, dr = d[None, :], d[:, None]
        u = (u0 + unit_per_px * (c * dc + s * dr)).astype(np.float32)
        v = (v0 + unit_per_px * (-s * dc + c * dr)).astype(np.float32)
        return cls(n, u0, v0, unit_per_px, c, s, u, v)

    def to_pixels(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        du, dv = (u - self.u0) / self.unit_per_px, (v - self.v0) / self.unit_per_px
        col = self.cos * du - self.sin * dv + (self.n - 1) / 2.0
        row = self.sin * du + self.cos * dv + (self.n - 1) / 2.0
        return row, col

    def window(self, cu: float, cv: float, radius: float) -> tuple[slice, slice] | None:
        """Pixel bounding box of a disc in body units, or None when off-canvas."""
        row, col = self.to_pixels(np.array(cu), np.array(cv))
        rad = radius / self.unit_per_px + 2
        r0, r1 = int(max(row - rad, 0)), int(min(row + rad + 1, self.n))
        c0, c1 = int(max(col - rad, 0)), int(min(col + rad + 1, self.n))
        if r0 >= r1 or c0 >= c1:
            return None
        return slice(r0, r1), slice(c0, c1)


def _stamp(img: np.ndarray, cv: _Canvas, cu: float, cvv: float, radius: float,
           profile: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> None:
    """Add profile(du, dv) around (cu, cvv) into img, touching only the bounding box."""
    win = cv.window(cu, cvv, radius)
    if win is not None:
        img[win] += profile(cv.u[win] - cu, cv.v[win] - cvv)


def _splat_polyline(layer: np.ndarray, cv: _Canvas, points: np.ndarray, value: float) -> None:
    """Rasterise a polyline (N×2 body units) as 1-px dots; blur the layer afterwards."""
    seg = np.diff(points, axis=0)
    lengths = np.hypot(seg[:, 0], seg[:, 1])
    steps = np.maximum((lengths / (0.5 * cv.unit_per_px)).astype(int), 1)
    dense = np.concatenate(
        [p + np.linspace(0.0, 1.0, k, endpoint=False)[:, None] * d for p, d, k in zip(points[:-1], seg, steps)]
        + [points[-1:]]
    )
    row, col = cv.to_pixels(dense[:, 0], dense[:, 1])
    row, col = np.rint(row).astype(int), np.rint(col).astype(int)
    ok = (row >= 0) & (row < cv.n) & (col >= 0) & (col < cv.n)
    np.maximum.at(layer, (row[ok], col[ok]), value)


def _curve(points: Sequence[tuple[float, float]], n: int = 48) -> np.ndarray:
    """A smooth curve through control points (Catmull-Rom), as an n×2 polyline."""
    p = np.asarray(points, dtype=float)
    p = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    out = []
    for i in range(1, len(p) - 2):
        t = np.linspace(0.0, 1.0, max(n // (len(p) - 3), 4), endpoint=False)[:, None]
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        out.append(0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                          + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3))
    out.append(p[-2:-1])
    return np.vstack(out)


# ---------------------------------------------------------------------------
# Radiograph anatomy
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Body:
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


def _random_body(rng: np.random.Generator, adult: bool, hyperinflation: float) -> _Body:
    j = lambda s: float(rng.normal(0.0, s))  # noqa: E731 - tiny jitter helper
    heart_au = (0.36 if adult else 0.44) + j(0.03)
    return _Body(
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


def _trunk_half_width(v: np.ndarray, adult: bool) -> np.ndarray:
    """Body outline from neck to pelvis (neonates: big abdomen, short neck)."""
    knots_v = [-1.8, -1.35, -1.12, -0.95, 0.0, 0.8, 1.6, 2.4, 3.0, 3.6]
    if adult:
        widths = [0.28, 0.32, 0.72, 1.02, 1.02, 0.95, 0.88, 0.95, 1.0, 1.0]
    else:
        widths = [0.30, 0.34, 0.70, 0.98, 1.0, 1.04, 1.06, 1.0, 0.92, 0.9]
    return np.interp(v, knots_v, widths).astype(np.float32)


def _thickness(u: np.ndarray, v: np.ndarray, cu: float, cv: float, au: float, av: float,
               p: float = 2.0) -> np.ndarray:
    """Path length through a superellipsoid (0 outside, 1 at the centre)."""
    r = (np.abs((u - cu) / au) ** p + np.abs((v - cv) / av) ** p) ** (1.0 / p)
    return np.sqrt(np.clip(1.0 - r * r, 0.0, 1.0))


def _lung_thickness(cv: _Canvas, body: _Body, side: int) -> np.ndarray:
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
    below = _smoothstep((dome - v) / 0.05)
    return np.sqrt(np.clip(1.0 - r**2, 0.0, 1.0)) * below


def _ribs(cv: _Canvas, body: _Body, half_width: np.ndarray) -> np.ndarray:
    """Posterior and anterior ribs as one periodic pattern along a curved coordinate."""
    a = np.abs(cv.u)
    out = np.zeros_like(a)
    lateral = _smoothstep((half_width * 0.96 - a) / 0.03) * _smoothstep((a - 0.07) / 0.03)
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


def _spine(cv: _Canvas, body: _Body) -> np.ndarray:
    """Vertebral column: bodies with disc spaces and pedicles, neck to sacrum."""
    u, v = cv.u, cv.v
    half = 0.11 if body.adult else 0.085
    column = _smoothstep((half - np.abs(u)) / 0.02) * _smoothstep((v + 1.9) / 0.1) * _smoothstep((3.1 - v) / 0.1)
    spacing = body.rib_spacing
    phase = (v - body.rib_first + 0.5 * spacing) / spacing
    d = (phase - np.rint(phase)) * spacing
    discs = 1.0 - 0.5 * np.exp(-((d / (0.08 * spacing)) ** 2))
    pedicle_d = (phase - np.floor(phase) - 0.5) * spacing
    pedicles = np.exp(-(((np.abs(u) - 0.7 * half) / (0.18 * half)) ** 2 + (pedicle_d / (0.15 * spacing)) ** 2))
    return column * (0.09 * discs + 0.05 * pedicles)


def _clavicles(cv: _Canvas, body: _Body) -> np.ndarray:
    a = np.abs(cv.u)
    centre = body.rib_first - 0.05 - (0.12 if body.adult else 0.06) * (a - 0.1) + 0.03 * np.sin(5.0 * a)
    width = 0.05 if body.adult else 0.035
    along = _smoothstep((a - 0.12) / 0.03) * _smoothstep((0.78 - a) / 0.05)
    return 0.16 * np.exp(-(((cv.v - centre) / width) ** 2)) * along


def _arms(cv: _Canvas, body: _Body) -> tuple[np.ndarray, np.ndarray]:
    """Soft tissue and humeri of arms at the sides (absent when the arms are raised)."""
    if not body.arms_down:
        return np.zeros_like(cv.u), np.zeros_like(cv.u)
    a, v = np.abs(cv.u), cv.v
    centre = 1.16 + 0.06 * (v + 1.0)
    along = _smoothstep((v + 1.05) / 0.1) * _smoothstep((0.9 - v) / 0.1)
    tissue = 0.4 * np.sqrt(np.clip(1 - ((a - centre) / 0.2) ** 2, 0, 1)) * along
    bone = 0.12 * np.exp(-(((a - centre) / 0.045) ** 2)) * along * _smoothstep((0.4 - v) / 0.1)
    return tissue, bone


def _bowel_gas(rng: np.random.Generator, cv: _Canvas, body: _Body) -> np.ndarray:
    """Lucencies of a neonate's gas-filled bowel and stomach (as air fraction)."""
    gas = np.zeros_like(cv.u)
    stomach = (0.35, body.diaphragm[1] + 0.35)
    _stamp(gas, cv, stomach[0], stomach[1], 0.3, lambda du, dv: 0.7 * _thickness(du, dv, 0, 0, 0.24, 0.16))
    for _ in range(int(rng.integers(15, 35))):
        cu, cvv = rng.uniform(-0.75, 0.75), rng.uniform(body.diaphragm[1] + 0.6, 2.6)
        ru, rv = rng.uniform(0.05, 0.16), rng.uniform(0.05, 0.13)
        depth = rng.uniform(0.3, 0.7)
        _stamp(gas, cv, cu, cvv, max(ru, rv), lambda du, dv: depth * _thickness(du, dv, 0, 0, ru, rv, 2.0))
    return np.clip(gas, 0.0, 0.85)


def _pelvis(cv: _Canvas, body: _Body) -> np.ndarray:
    a, v = np.abs(cv.u), cv.v
    wing = np.exp(-(((np.hypot(a - 0.75, v - 2.95) - 0.42) / 0.05) ** 2)) * (v < 3.0) * (a > 0.25)
    femur = _thickness(a, v, 0.5, 3.45, 0.16, 0.16)
    return 0.11 * wing + 0.12 * femur


def _head(cv: _Canvas, adult: bool) -> tuple[np.ndarray, np.ndarray]:
    """Lower head above the neck: soft tissue and the skull rim."""
    cvv = -2.6 if not adult else -2.5
    tissue = 0.8 * _thickness(cv.u, cv.v, 0.0, cvv, 0.72, 0.8)
    r = np.hypot(cv.u / 0.72, (cv.v - cvv) / 0.8)
    bone = 0.2 * np.exp(-(((r - 0.93) / 0.03) ** 2))
    return tissue, bone


# ---------------------------------------------------------------------------
# Lung findings (the learnable signal)
# ---------------------------------------------------------------------------


def _point_in_lungs(rng: np.random.Generator, body: _Body) -> tuple[float, float, int]:
    """A random point well inside either lung: (u, v, side), by rejection sampling."""
    side = int(rng.choice([-1, 1]))
    i = 0 if side < 0 else 1
    for _ in range(100):
        du, dv = rng.uniform(-0.85, 0.85, 2)
        v = body.lung_cv + dv * body.lung_av
        if du * du + dv * dv < 0.7 and v < body.diaphragm[i] - 0.08:
            return side * body.lung_cu + du * body.lung_au[i], v, side
    return side * body.lung_cu, body.lung_cv, side


def _radial_streaks(rng: np.random.Generator, cv: _Canvas, body: _Body, layer: np.ndarray, count: int,
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
        _splat_polyline(layer, cv, _curve([tuple(start), tuple(mid), tuple(end)], 12), value * rng.uniform(0.6, 1.0))


def _cysts(rng: np.random.Generator, cv: _Canvas, body: _Body, severity: float,
           lucency: np.ndarray, density: np.ndarray) -> None:
    """Bubbly lucencies with thin walls (cystic BPD)."""
    for _ in range(int(severity * rng.integers(40, 65))):
        cu, cvv, _side = _point_in_lungs(rng, body)
        rad = rng.uniform(0.04, 0.09)
        depth = rng.uniform(0.45, 0.75) * severity
        _stamp(lucency, cv, cu, cvv, 1.4 * rad, lambda du, dv: depth * _thickness(du, dv, 0, 0, rad, rad, 2))
        _stamp(density, cv, cu, cvv, 1.6 * rad,
               lambda du, dv: 0.06 * severity * np.exp(-(((np.hypot(du, dv) - rad) / (0.25 * rad)) ** 2)))


def _consolidation(rng: np.random.Generator, cv: _Canvas, body: _Body, severity: float) -> np.ndarray:
    """Patchy airspace opacities (pneumonia), as a loss of air fraction in [0, 1]."""
    loss = np.zeros_like(cv.u)
    patchiness = 0.5 + 0.5 * _smooth_noise(rng, cv.u.shape, 0.04 / cv.unit_per_px)
    for _ in range(int(rng.integers(1, 4))):
        cu, cvv, _side = _point_in_lungs(rng, body)
        ru, rv = rng.uniform(0.12, 0.26), rng.uniform(0.12, 0.3)
        amp = rng.uniform(0.45, 0.8) * severity
        _stamp(loss, cv, cu, cvv, 2.2 * max(ru, rv),
               lambda du, dv: amp * np.exp(-((du / ru) ** 2 + (dv / rv) ** 2)))
    return np.clip(loss * np.clip(patchiness, 0.2, 1.5), 0.0, 0.9)


@dataclass(frozen=True)
class _LungState:
    aeration: np.ndarray  # change of the lungs' air content (scales with lung thickness)
    lucency: np.ndarray   # extra air independent of thickness (cysts, air bronchograms)
    density: np.ndarray   # extra density from interstitium, walls, vessels

    @classmethod
    def normal(cls, shape: tuple[int, ...]) -> _LungState:
        return cls(*(np.zeros(shape, np.float32) for _ in range(3)))

    def air(self, lung: np.ndarray) -> np.ndarray:
        """Projected air of the lungs given their thickness (0–1); > 1 is hyperlucent."""
        mask = _smoothstep(lung / 0.15)
        return np.clip(lung * np.clip(0.9 + self.aeration, 0.05, 1.2) + self.lucency * mask, 0.0, 1.5)


def _lung_findings(rng: np.random.Generator, cv: _Canvas, body: _Body, patient: SynthPatient) -> _LungState:
    """Vessels for everyone; iRDS, BPD and pneumonia according to the patient's labels."""
    shape = cv.u.shape
    aeration, lucency, density = (np.zeros(shape, np.float32) for _ in range(3))
    strands = np.zeros(shape, np.float32)
    _radial_streaks(rng, cv, body, strands, int(rng.integers(12, 20)), (0.12, 0.35), 0.05, central=True)
    density += _soften_lines(strands, 0.01 / cv.unit_per_px)
    density += 0.015 * _smooth_noise(rng, shape, 0.02 / cv.unit_per_px)
    grade = patient.irds_grade or 0
    if grade:
        density += 0.008 * grade * _smooth_noise(rng, shape, 0.005 / cv.unit_per_px)
        aeration -= 0.11 * grade
        bronchograms = np.zeros(shape, np.float32)
        _radial_streaks(rng, cv, body, bronchograms, 6 * grade, (0.15, 0.35), 0.08 * grade, central=True)
        lucency += _soften_lines(bronchograms, 0.01 / cv.unit_per_px)
    if patient.bpd:
        s = patient.bpd_severity
        fibrosis = np.zeros(shape, np.float32)
        count = int(s * rng.integers(35, 60))
        _radial_streaks(rng, cv, body, fibrosis, count, (0.08, 0.24), 0.1 * s, central=False)
        density += _soften_lines(fibrosis, 0.018 / cv.unit_per_px)
        density += 0.03 * s * _smooth_noise(rng, shape, 0.03 / cv.unit_per_px)
        aeration += 0.05 * s  # hyperlucent, over-inflated lungs
        _cysts(rng, cv, body, s, lucency, density)
    if patient.pneumonia:
        aeration -= _consolidation(rng, cv, body, patient.pneumonia_severity)
    return _LungState(aeration, lucency, density)


# ---------------------------------------------------------------------------
# Lines, tubes and electrodes
# ---------------------------------------------------------------------------


def _support_devices(rng: np.random.Generator, cv: _Canvas, body: _Body) -> tuple[np.ndarray, list[str]]:
    """ETT, oro-gastric tube, UVC, UAC and ECG electrodes as a density layer."""
    wide, thin, snaps = np.zeros_like(cv.u), np.zeros_like(cv.u), np.zeros_like(cv.u)
    present: list[str] = []
    j = lambda s: float(rng.normal(0.0, s))  # noqa: E731
    if body.adult:
        return wide, present
    if rng.random() < 0.6:
        tip = (0.01 + j(0.02), -0.62 + j(0.08))
        _splat_polyline(wide, cv, _curve([(0.05, -2.4), (0.03 + j(0.02), -1.4), tip]), 1.0)
        present.append("ETT")
    if rng.random() < 0.6:
        stomach = (0.3 + j(0.05), body.diaphragm[1] + 0.35)
        _splat_polyline(thin, cv, _curve([(-0.04, -2.4), (0.0, -1.0), (0.04, 0.2), stomach]), 0.8)
        present.append("OGT")
    if rng.random() < 0.5:
        tip = (-0.08 + j(0.03), 0.22 + j(0.1))
        _splat_polyline(thin, cv, _curve([(0.02, 3.6), (0.0, 2.3), (-0.18, 1.4), (-0.14, 0.7), tip]), 0.9)
        present.append("UVC")
    if rng.random() < 0.4:
        tip = (0.05 + j(0.02), -0.05 + j(0.15))
        _splat_polyline(thin, cv, _curve([(-0.02, 3.6), (0.0, 2.3), (0.16, 2.95), (0.06, 2.5), (0.05, 1.0), tip]), 0.9)
        present.append("UAC")
    if rng.random() < 0.7:
        for _ in range(int(rng.integers(2, 4))):
            cu, cvv = rng.uniform(-0.9, 0.9), rng.uniform(-0.6, 1.8)
            _stamp(snaps, cv, cu, cvv, 0.1, lambda du, dv: 0.2 * np.exp(-(((np.hypot(du, dv) - 0.06) / 0.008) ** 2))
                   + 0.35 * np.exp(-((np.hypot(du, dv) / 0.015) ** 2)))
        present.append("ECG")
    layer = (0.3 * _soften_lines(wide, 0.01 / cv.unit_per_px)
             + 0.25 * _soften_lines(thin, 0.005 / cv.unit_per_px) + snaps)
    return layer, present


# ---------------------------------------------------------------------------
# Whole projections
# ---------------------------------------------------------------------------


def _render_frontal(rng: np.random.Generator, cv: _Canvas, body: _Body,
                    patient: SynthPatient) -> tuple[np.ndarray, list[str]]:
    """Density (projected attenuation) of a frontal neck-to-pelvis projection."""
    u, v = cv.u, cv.v
    half_width = _trunk_half_width(v, body.adult)
    tissue = body.tissue * np.sqrt(np.clip(1.0 - (u / half_width) ** 2, 0.0, 1.0))
    head_tissue, skull = _head(cv, body.adult)
    arm_tissue, humeri = _arms(cv, body)
    tissue = np.maximum(tissue, np.maximum(head_tissue, arm_tissue))

    lung = np.maximum(_lung_thickness(cv, body, -1), _lung_thickness(cv, body, +1))
    hcu, hcv, hau, hav = body.heart
    heart = _thickness(u, v, hcu, hcv, hau, hav, 2.2)
    thymus = _thickness(u, v, 0.0, -0.6, body.thymus_au, 0.42, 2.5)
    trachea = _smoothstep((0.035 - np.abs(u - 0.01)) / 0.015) * _smoothstep((-0.35 - v) / 0.05) * (v > -2.0)
    findings = _lung_findings(rng, cv, body, patient) if patient.is_neonate else _LungState.normal(u.shape)
    lung_mask = _smoothstep(lung / 0.15)
    air = findings.air(lung) * (1.0 - 0.85 * _smoothstep(heart / 0.2)) * (1.0 - 0.9 * _smoothstep(thymus / 0.3))
    air = np.maximum(air, 0.35 * trachea)
    if not body.adult:
        air = np.maximum(air, _bowel_gas(rng, cv, body))
    liver = (0.08 * _smoothstep((u + 0.15) / -0.2) * _smoothstep((v - body.diaphragm[0]) / 0.06)
             * _smoothstep((1.4 - v) / 0.3))

    density = tissue * (1.0 - 0.62 * air) + tissue * liver + findings.density * lung_mask
    density += (_ribs(cv, body, half_width) + _spine(cv, body) + _clavicles(cv, body)
                + _pelvis(cv, body) + humeri + skull) * (tissue > 0.02)
    devices, present = _support_devices(rng, cv, body)
    return density + devices, present


def _render_lateral(rng: np.random.Generator, cv: _Canvas, body: _Body,
                    patient: SynthPatient) -> tuple[np.ndarray, list[str]]:
    """Cross-table lateral: anterior to the image left, spine to the right."""
    u, v = cv.u, cv.v
    depth = np.interp(v, [-1.8, -1.2, -0.9, 1.0, 2.5, 3.5], [0.45, 0.5, 0.72, 0.82, 0.86, 0.8]).astype(np.float32)
    centre = 0.05 * v
    tissue = 0.75 * np.sqrt(np.clip(1.0 - ((u - centre) / depth) ** 2, 0.0, 1.0))
    head_tissue, skull = _head(cv, body.adult)
    tissue = np.maximum(tissue, head_tissue)
    lung = _thickness(u, v, 0.02, body.lung_cv, 0.55, body.lung_av, 2.4)
    lung *= _smoothstep((body.diaphragm[0] + 0.1 * (u + 0.2) - v) / 0.05)
    heart = _thickness(u, v, -0.28, body.heart[1], 0.32, 0.3, 2.0)
    findings = _lung_findings(rng, cv, body, patient)
    lung_mask = _smoothstep(lung / 0.15)
    air = findings.air(lung) * (1.0 - 0.8 * _smoothstep(heart / 0.2))
    air = np.maximum(air, _bowel_gas(rng, cv, body) * 0.7)
    spine_u = 0.58 + 0.05 * v
    phase = (v - body.rib_first) / body.rib_spacing
    d = (phase - np.rint(phase)) * body.rib_spacing
    vertebrae = _smoothstep((0.1 - np.abs(u - spine_u)) / 0.02) * (1.0 - 0.6 * np.exp(-((d / 0.015) ** 2)))
    ribs = 0.05 * np.exp(-((d / 0.03) ** 2)) * _smoothstep((u - 0.15) / 0.1) * lung_mask
    sternum = 0.1 * np.exp(-(((u + 0.72) / 0.03) ** 2 + (d / 0.04) ** 2)) * (np.abs(v + 0.3) < 0.6)
    density = tissue * (1.0 - 0.55 * air) + findings.density * lung_mask + 0.14 * vertebrae + ribs + sternum + skull
    devices, present = _support_devices(rng, cv, body)
    return density + 0.7 * devices, present


def _render_skull(rng: np.random.Generator, cv: _Canvas) -> tuple[np.ndarray, list[str]]:
    """Frontal neonatal skull: thin vault with open fontanelle, orbits, jaw."""
    u, v = cv.u, cv.v
    brain = 0.75 * _thickness(u, v, 0.0, 0.0, 1.0, 1.12)
    r = np.hypot(u, v / 1.12)
    fontanelle = 1.0 - _smoothstep((0.12 - np.abs(u)) / 0.05) * (v < -0.6)
    vault = 0.22 * np.exp(-(((r - 0.96) / 0.035) ** 2)) * fontanelle
    orbits = sum(0.1 * np.exp(-(((np.hypot((u - s * 0.36) / 0.2, (v - 0.35) / 0.16) - 1.0) / 0.15) ** 2))
                 for s in (-1, 1))
    jaw = 0.15 * np.exp(-(((np.hypot(u / 0.62, (v - 0.6) / 0.55) - 1.0) / 0.06) ** 2)) * (v > 0.75)
    face = 0.45 * _thickness(u, v, 0.0, 0.95, 0.6, 0.45)
    neck = 0.5 * np.sqrt(np.clip(1 - (u / 0.5) ** 2, 0, 1)) * _smoothstep((v - 1.1) / 0.1)
    tissue = np.maximum(brain, np.maximum(face, neck))
    texture = 0.03 * _smooth_noise(rng, u.shape, 0.05 / cv.unit_per_px) * (tissue > 0.05)
    density = tissue + vault + orbits + jaw + texture
    return density, []


@dataclass(frozen=True)
class _ViewSpec:
    """How a view class appears in the header and where its field of view sits."""

    body_part: str
    description: str
    region: tuple[str, str]
    v_centre: float
    fov_units: float


_VIEW_SPECS: MappingProxyType[str, _ViewSpec] = MappingProxyType({
    "chest_frontal": _ViewSpec("CHEST", "CHEST AP PORTABLE", ("816094009", "Chest"), -0.05, 2.75),
    "chest_lateral": _ViewSpec("CHEST", "CHEST LATERAL", ("816094009", "Chest"), -0.05, 2.75),
    "abdomen": _ViewSpec("ABDOMEN", "ABDOMEN AP", ("818981001", "Abdomen"), 1.55, 2.6),
    "chest_abdomen": _ViewSpec("CHESTABDOMEN", "CHEST ABDOMEN AP", ("416550000", "Chest and abdomen"), 0.75, 4.3),
    "head": _ViewSpec("SKULL", "SKULL AP", ("89546000", "Skull"), 0.05, 2.7),
})


_VIEW_CODES: MappingProxyType[str, tuple[str, str]] = MappingProxyType({
    "AP": ("399348003", "antero-posterior"),
    "PA": ("272479007", "postero-anterior"),
    "LL": ("399173006", "left lateral"),
    "RL": ("399198007", "right lateral"),
})


def _thorax_width_mm(patient: SynthPatient, weight_kg: float) -> float:
    """~6 cm for a 500 g preterm, ~10 cm at term; adults ~30 cm."""
    return 300.0 if not patient.is_neonate else 50.0 + 15.0 * weight_kg


@dataclass(frozen=True)
class _Projection:
    stored: np.ndarray        # MONOCHROME2 sense (higher = more attenuation), uint16
    imager_spacing_mm: float  # at the detector
    magnification: float      # source-detector / source-patient distance
    devices: list[str]

    @property
    def spacing_mm(self) -> float:
        """Pixel spacing in the patient plane (what the anatomy was drawn with)."""
        return round(self.imager_spacing_mm / self.magnification, 4)


def _render_projection(rng: np.random.Generator, study: SynthStudy, view_class: str, size: int) -> _Projection:
    """Render a view at ≤512 px, upsample to `size`, add detector noise and collimation."""
    patient = study.patient
    spec = _VIEW_SPECS[view_class]
    width_mm = _thorax_width_mm(patient, study.weight_kg)
    if view_class == "head":
        width_mm = 52.0 + 14.0 * study.weight_kg  # biparietal width ~6 cm (500 g) to ~10 cm (term)
    magnification = round(float(rng.uniform(1.04, 1.09)), 3)  # baby on the incubator tray / adult erect
    fov_mm = spec.fov_units * width_mm / 2.0 * rng.uniform(1.0, 1.12) * magnification
    lo, hi = (0.1, 0.2) if patient.is_neonate else (0.35, 0.45)
    imager_spacing_mm = round(float(np.clip(fov_mm / 1024.0, lo, hi)) * 1024.0 / size, 4)
    work = min(size, 512)
    unit_per_px = imager_spacing_mm / magnification * size / work / (width_mm / 2.0)
    cv = _Canvas.build(work, float(rng.normal(0, 0.04)), spec.v_centre + float(rng.normal(0, 0.05)),
                       unit_per_px, float(rng.normal(0, np.deg2rad(3))))
    hyperinflation = 0.1 * patient.bpd_severity
    body = _random_body(rng, not patient.is_neonate, hyperinflation)
    if view_class == "head":
        density, devices = _render_skull(rng, cv)
    elif view_class == "chest_lateral":
        density, devices = _render_lateral(rng, cv, body, patient)
    else:
        density, devices = _render_frontal(rng, cv, body, patient)
    density = _resize_bilinear(density.astype(np.float32), (size, size))
    return _Projection(_expose(rng, density), imager_spacing_mm, magnification, devices)


def _expose(rng: np.random.Generator, density: np.ndarray) -> np.ndarray:
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


# ---------------------------------------------------------------------------
# DICOM attribute groups
# ---------------------------------------------------------------------------


def _da(d: dt.date) -> str:
    return d.strftime("%Y%m%d")


def _tm(t: dt.datetime) -> str:
    return t.strftime("%H%M%S")


def _code_item(value: str, meaning: str, scheme: str = "SCT") -> Dataset:
    return hd.sr.CodedConcept(value, scheme, meaning)


def _common_attributes(ds: Dataset, study: SynthStudy, *, modality: str, sop_class_uid: str,
                       sop_instance_uid: str, series_number: int, instance_number: int,
                       description: str, model: str, created: dt.datetime) -> None:
    """Patient, General Study, Patient Study, General Series, General Equipment, SOP Common."""
    patient = study.patient
    when = study.study_datetime
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.InstanceCreationDate, ds.InstanceCreationTime = _da(created), _tm(created)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class_uid, sop_instance_uid
    ds.StudyDate, ds.SeriesDate = _da(when), _da(when)
    ds.StudyTime, ds.SeriesTime = _tm(when), _tm(when)
    ds.AccessionNumber = study.accession_number
    ds.Modality = modality
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = INSTITUTION_NAME
    ds.ReferringPhysicianName = ""
    ds.StationName = "SYNTH01"
    ds.StudyDescription = description
    ds.SeriesDescription = description
    ds.ManufacturerModelName = model
    ds.PatientName = patient.patient_name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = _da(patient.birth_date)
    ds.PatientSex = patient.sex
    ds.PatientAge = study.patient_age
    ds.PatientWeight = _ds(study.weight_kg, 6)
    ds.PatientIdentityRemoved = "NO"
    ds.DeviceSerialNumber = "SYN-0001"
    ds.SoftwareVersions = SOFTWARE_VERSION
    ds.ProtocolName = description
    ds.StudyInstanceUID = study.study_instance_uid
    ds.SeriesInstanceUID = study.series_instance_uid
    ds.StudyID = study.study_id
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.ImageComments = SYNTHETIC_COMMENT


def _image_pixel(ds: Dataset, pixels: np.ndarray, photometric: str) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = (int(x) for x in pixels.shape)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, BITS_STORED, BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype("<u2").tobytes()


def _voi_window(ds: Dataset, stored: np.ndarray, explanation: str) -> None:
    lo, hi = np.percentile(stored, [1.0, 99.0])
    ds.WindowCenter = _ds((lo + hi) / 2.0, 5)
    ds.WindowWidth = _ds(max(hi - lo, 2.0), 5)
    ds.WindowCenterWidthExplanation = explanation


def _file_meta(ds: Dataset) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = _IMPLEMENTATION_VERSION_NAME
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    return ds


# ---------------------------------------------------------------------------
# Radiographs
# ---------------------------------------------------------------------------


def _view_position(rng: np.random.Generator, view_class: str, adult: bool) -> str:
    if view_class == "chest_lateral":
        return str(rng.choice(["LL", "RL"]))
    return "PA" if adult and view_class == "chest_frontal" else "AP"


def make_cxr(
    rng: np.random.Generator,
    *,
    study: SynthStudy | None = None,
    view_class: str = "chest_frontal",
    modality: str = "DX",
    photometric: str = "MONOCHROME2",
    size: int = 1024,
    sop_instance_uid: str | None = None,
) -> Dataset:
    """One projection radiograph (CR Image Storage or DX For Presentation) of `study`.

    Without a study, a random day-1 neonate is made from `rng`. The lung findings come
    from `study.patient` (bpd, pneumonia, irds_grade). The support devices drawn are
    listed in Acquisition Device Processing Description, e.g. "ETT UVC" (or "NONE").
    Pixel spacing is physical at size 1024 and scales with 1024/size.
    """
    if view_class not in _VIEW_SPECS:
        raise ValueError(f"cannot render view class {view_class!r}; choose from {sorted(_VIEW_SPECS)}")
    if modality not in ("CR", "DX") or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"unsupported modality/photometric: {modality}/{photometric}")
    study = study or _random_neonatal_study(rng)
    sop_instance_uid = sop_instance_uid or synth_uid(study.series_instance_uid, "image", 1)
    proj = _render_projection(rng, study, view_class, size)
    stored = proj.stored if photometric == "MONOCHROME2" else (MAX_STORED - proj.stored).astype(np.uint16)
    spec = _VIEW_SPECS[view_class]
    adult = not study.patient.is_neonate
    description = "CHEST PA" if adult and view_class == "chest_frontal" else spec.description
    sop_class = CR_IMAGE_STORAGE if modality == "CR" else DX_IMAGE_STORAGE_FOR_PRESENTATION
    ds = Dataset()
    acquired = study.study_datetime + dt.timedelta(minutes=1)
    _common_attributes(ds, study, modality=modality, sop_class_uid=sop_class, sop_instance_uid=sop_instance_uid,
                       series_number=1, instance_number=1, description=description,
                       model=f"synth-{modality.lower()}", created=acquired + dt.timedelta(minutes=1))
    ds.AcquisitionDate, ds.AcquisitionTime = _da(acquired), _tm(acquired)
    ds.ContentDate, ds.ContentTime = _da(acquired), _tm(acquired)
    ds.BodyPartExamined = spec.body_part
    ds.ViewPosition = _view_position(rng, view_class, adult)
    ds.PatientOrientation = ["P", "F"] if view_class == "chest_lateral" else ["L", "F"]
    ds.ImageLaterality = "U"
    ds.AnatomicRegionSequence = DicomSequence([_code_item(*spec.region)])
    ds.KVP = _ds(float(rng.integers(52, 66)) if not adult else float(rng.integers(110, 126)))
    ds.ExposureInuAs = int(rng.integers(600, 2000)) if not adult else int(rng.integers(1500, 5000))
    source_to_detector = 1000.0 if not adult else 1800.0
    ds.DistanceSourceToDetector = _ds(source_to_detector)
    ds.DistanceSourceToPatient = _ds(round(source_to_detector / proj.magnification, 1))
    ds.ImagerPixelSpacing = [_ds(proj.imager_spacing_mm), _ds(proj.imager_spacing_mm)]
    ds.PixelSpacing = [_ds(proj.spacing_mm), _ds(proj.spacing_mm)]
    ds.PixelSpacingCalibrationType = "GEOMETRY"  # Pixel Spacing = Imager Pixel Spacing / magnification
    ds.PixelSpacingCalibrationDescription = "Magnification from source-patient distance"
    ds.AcquisitionDeviceProcessingDescription = " ".join(proj.devices) or "NONE"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    if not adult:
        ds.PatientPosition = "HFS"
    _image_pixel(ds, stored, photometric)
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
    _voi_window(ds, stored, "SYNTHETIC DEFAULT")
    if modality == "DX":
        _dx_attributes(ds, photometric, proj.magnification)
        ds.ViewCodeSequence = DicomSequence([_code_item(*_VIEW_CODES[ds.ViewPosition])])
    return _file_meta(ds)


def _dx_attributes(ds: Dataset, photometric: str, magnification: float) -> None:
    """DX Series/Image/Detector/Positioning specifics of DX Image Storage - For Presentation."""
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.PixelIntensityRelationship = "LOG"
    # -1: higher stored values mean less X-ray intensity (bone bright), as in MONOCHROME2 here
    ds.PixelIntensityRelationshipSign = -1 if photometric == "MONOCHROME2" else 1
    ds.PresentationLUTShape = "IDENTITY" if photometric == "MONOCHROME2" else "INVERSE"
    ds.PositionerType = "NONE"  # portable: no positioner
    ds.DetectorType = "SCINTILLATOR"
    ds.DetectorConfiguration = "AREA"
    ds.AcquisitionContextSequence = DicomSequence([])
    ds.EstimatedRadiographicMagnificationFactor = _ds(magnification)


# ---------------------------------------------------------------------------
# MR series
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _MrGeometry:
    shape: tuple[int, int, int]  # slices, rows, columns
    pixel_spacing: float         # mm, square pixels
    slice_spacing: float         # mm, centre to centre
    slice_thickness: float
    origin: tuple[float, float, float]  # ImagePositionPatient of slice 0 (LPS, mm)

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """LPS coordinates of the voxel centres as broadcastable (z, y, x) arrays."""
        s, r, c = self.shape
        x = self.origin[0] + self.pixel_spacing * np.arange(c, dtype=np.float32)
        y = self.origin[1] + self.pixel_spacing * np.arange(r, dtype=np.float32)
        z = self.origin[2] + self.slice_spacing * np.arange(s, dtype=np.float32)
        return z[:, None, None], y[None, :, None], x[None, None, :]

    @property
    def voxel_ml(self) -> float:
        return self.pixel_spacing**2 * self.slice_spacing / 1000.0


def _mr_geometry(rng: np.random.Generator, shape: tuple[int, int, int]) -> _MrGeometry:
    s, r, c = shape
    # Field of view ~14–17 cm in-plane, ~8–12 cm through-plane regardless of matrix size.
    pixel_spacing = round(float(rng.uniform(140, 170)) / c, 4)
    slice_spacing = round(float(rng.uniform(80, 110)) / s, 3)
    thickness = round(slice_spacing * float(rng.choice([0.9, 1.0])), 3)
    origin = (-(c - 1) / 2 * pixel_spacing + float(rng.normal(0, 2)),
              -(r - 1) / 2 * pixel_spacing + float(rng.normal(0, 2)),
              -(s - 1) / 2 * slice_spacing + float(rng.normal(0, 3)))
    return _MrGeometry(shape, pixel_spacing, slice_spacing, thickness, tuple(round(o, 3) for o in origin))


@dataclass(frozen=True)
class _MrAnatomy:
    body_rx: float
    body_ry: float
    lung_base: float
    lung_height: tuple[float, float]     # (left, right)
    lung_centre: tuple[tuple[float, float], tuple[float, float]]
    lung_radii: tuple[tuple[float, float], tuple[float, float]]
    dome: tuple[float, float]
    warp: tuple[tuple[float, ...], tuple[float, ...]]
    heart: tuple[float, float, float, float, float, float]


def _mr_anatomy(rng: np.random.Generator) -> _MrAnatomy:
    size = float(rng.uniform(0.8, 1.2))  # overall scale: preterm to term
    lung_height = tuple(float(rng.uniform(42, 62) * size) for _ in range(2))

    def warp() -> tuple[float, ...]:
        return tuple(float(x) for x in np.concatenate([rng.normal(0, 0.07, 3), rng.uniform(0, 2 * np.pi, 3)]))

    return _MrAnatomy(
        body_rx=float(rng.uniform(46, 56) * size), body_ry=float(rng.uniform(34, 42) * size),
        lung_base=float(rng.uniform(-32, -18)),
        lung_height=lung_height,  # type: ignore[arg-type]
        lung_centre=((float(rng.uniform(21, 27) * size), float(rng.uniform(-2, 4))),
                     (float(-rng.uniform(21, 27) * size), float(rng.uniform(-2, 4)))),
        lung_radii=((float(rng.uniform(14, 20) * size), float(rng.uniform(21, 28) * size)),
                    (float(rng.uniform(16, 22) * size), float(rng.uniform(22, 29) * size))),
        dome=(float(rng.uniform(6, 13)), float(rng.uniform(8, 15))),
        warp=(warp(), warp()),
        heart=(float(rng.uniform(4, 9)), float(rng.uniform(-16, -10)), float(rng.uniform(12, 20)),
               float(rng.uniform(13, 17) * size), float(rng.uniform(11, 14) * size), float(rng.uniform(12, 16))),
    )


def _mr_lung_labels(geom: _MrGeometry, anat: _MrAnatomy) -> np.ndarray:
    """Label volume (slices, rows, cols): 0 background, 1 left lung, 2 right lung."""
    z, y, x = geom.axes()
    hx, hy, hz, hrx, hry, hrz = anat.heart
    hz = anat.lung_base + hz
    heart = ((x - hx) / (hrx + 2)) ** 2 + ((y - hy) / (hry + 2)) ** 2 + ((z - hz) / (hrz + 2)) ** 2 < 1  # + margin
    spine = (x / 10.0) ** 2 + ((y - anat.body_ry * 0.72) / 10.0) ** 2 < 1
    labels = np.zeros(geom.shape, np.uint8)
    for i, value in enumerate((LEFT_LUNG, RIGHT_LUNG)):
        (cx, cy), (rx, ry), w = anat.lung_centre[i], anat.lung_radii[i], anat.warp[i]
        t = (z - anat.lung_base) / anat.lung_height[i]  # 0 at the base, 1 at the apex
        taper = np.clip(1.0 - t, 0.0, 1.0) ** 0.55 * (1.0 + 0.15 * np.clip(t, 0, 1))
        qx, qy = (x - cx) / rx, (y - cy) / ry
        theta = np.arctan2(qy, qx * np.sign(cx))
        wobble = (1.0 + w[0] * np.sin(2 * theta + w[3] + 0.03 * z) + w[1] * np.sin(3 * theta + w[4])
                  + w[2] * np.sin(4 * theta + w[5]))
        radial = np.sqrt(qx**2 + qy**2) / wobble
        above_dome = (z - anat.lung_base) > anat.dome[i] * np.clip(1.0 - radial**2, 0.0, 1.0)
        inside = (radial < taper) & above_dome & (t >= 0) & (t <= 1) & (np.sign(x) == np.sign(cx)) & (np.abs(x) > 4.0)
        labels[inside & ~heart & ~spine & (labels == 0)] = value
    return labels


def _mr_image(rng: np.random.Generator, geom: _MrGeometry, anat: _MrAnatomy, labels: np.ndarray) -> np.ndarray:
    """T2-weighted-looking magnitude volume with bias field, ghosting and Rician noise."""
    z, y, x = geom.axes()
    body_r = np.sqrt((x / anat.body_rx) ** 2 + ((y - 2.0) / anat.body_ry) ** 2)
    neck = np.clip(1.0 - np.clip(z - (anat.lung_base + max(anat.lung_height) + 8), 0, None) / 40.0, 0.45, 1.0)
    body = body_r < neck
    fat = body & (body_r > neck - 3.5 / anat.body_rx)
    img = np.where(body, 420.0, 0.0).astype(np.float32)
    img[fat] = 900.0
    hx, hy, hz, hrx, hry, hrz = anat.heart
    heart = ((x - hx) / hrx) ** 2 + ((y - hy) / hry) ** 2 + ((z - (anat.lung_base + hz)) / hrz) ** 2 < 1
    img[heart & body] = 260.0
    vert = (x / 8.0) ** 2 + ((y - anat.body_ry * 0.72) / 8.0) ** 2 < 1
    canal = (x / 3.0) ** 2 + ((y - anat.body_ry * 0.72 - 9.0) / 3.0) ** 2 < 1
    img[np.broadcast_to(vert, img.shape) & body] = 520.0
    img[np.broadcast_to(canal, img.shape) & body] = 1200.0
    below = (z < anat.lung_base + 2) & body & ~np.broadcast_to(vert | canal, img.shape)
    img[below & (x < 0)] = 380.0  # liver
    img[labels > 0] = 55.0
    vessels = (_smooth_noise_3d(rng, geom.shape, 1.2) > 2.2) & (labels > 0)
    img[vessels] = 180.0
    bias = 1.0 + 0.15 * (x / 80.0) - 0.12 * (y / 80.0) + 0.05 * (z / 60.0)
    img = _blur_inplane(img * bias.astype(np.float32), 0.6)
    return _mr_acquire(rng, img)


def _smooth_noise_3d(rng: np.random.Generator, shape: tuple[int, int, int], sigma_px: float) -> np.ndarray:
    noise = _blur_inplane(rng.standard_normal(shape, dtype=np.float32), sigma_px)
    return (noise - noise.mean()) / (noise.std() + 1e-6)


def _blur_inplane(vol: np.ndarray, sigma_px: float) -> np.ndarray:
    fy = np.fft.fftfreq(vol.shape[1])[None, :, None]
    fx = np.fft.rfftfreq(vol.shape[2])[None, None, :]
    transfer = np.exp(-2.0 * (np.pi * sigma_px) ** 2 * (fx**2 + fy**2))
    return np.fft.irfft2(np.fft.rfft2(vol) * transfer, s=vol.shape[1:]).astype(np.float32)


def _mr_acquire(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Motion ghosting along the phase-encode (column) direction, then Rician noise."""
    n = img.shape[1]
    kspace = np.fft.fft(img, axis=1)
    every = int(rng.integers(3, 7))
    shift_px = float(rng.uniform(0.5, 2.0))
    ky = np.fft.fftfreq(n)
    phase = np.where(np.arange(n) % every == 0, np.exp(-2j * np.pi * ky * shift_px), 1.0)
    ghosted = np.fft.ifft(kspace * phase[None, :, None], axis=1)
    sigma = float(rng.uniform(10, 22))
    noisy = ghosted + sigma * (rng.standard_normal(img.shape) + 1j * rng.standard_normal(img.shape))
    return np.clip(np.rint(np.abs(noisy)), 0, MAX_STORED).astype(np.uint16)


def _mr_slice(study: SynthStudy, geom: _MrGeometry, pixels: np.ndarray, k: int, acquired: dt.datetime) -> Dataset:
    """One MR Image Storage instance of the series; slice k steps along the normal (+z)."""
    ds = Dataset()
    _common_attributes(ds, study, modality="MR", sop_class_uid=MR_IMAGE_STORAGE,
                       sop_instance_uid=synth_uid(study.series_instance_uid, "image", k + 1),
                       series_number=1, instance_number=k + 1, description="T2 TSE AX LUNG",
                       model="synth-mr", created=acquired + dt.timedelta(minutes=5))
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.AcquisitionDate, ds.AcquisitionTime = _da(acquired), _tm(acquired)
    ds.ContentDate, ds.ContentTime = _da(acquired), _tm(acquired)
    ds.AcquisitionNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "SK", ""
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = "tse2d1_17"
    ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = "2200", "95", 17
    ds.NumberOfAverages = "2"
    ds.ImagingFrequency = "63.6"
    ds.ImagedNucleus = "1H"
    ds.MagneticFieldStrength = "1.5"
    ds.FlipAngle = "150"
    ds.InPlanePhaseEncodingDirection = "COL"
    ds.SliceThickness = _ds(geom.slice_thickness)
    ds.SpacingBetweenSlices = _ds(geom.slice_spacing)
    ds.PixelSpacing = [_ds(geom.pixel_spacing), _ds(geom.pixel_spacing)]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    z = geom.origin[2] + k * geom.slice_spacing
    ds.ImagePositionPatient = [_ds(geom.origin[0], 8), _ds(geom.origin[1], 8), _ds(z, 8)]
    ds.SliceLocation = _ds(z, 8)
    ds.FrameOfReferenceUID = synth_uid(study.series_instance_uid, "frame-of-reference")
    ds.PositionReferenceIndicator = ""
    ds.ImagesInAcquisition = geom.shape[0]
    _image_pixel(ds, pixels, "MONOCHROME2")
    _voi_window(ds, pixels, "SYNTHETIC DEFAULT")
    return _file_meta(ds)


def make_mr_series(
    rng: np.random.Generator,
    *,
    study: SynthStudy | None = None,
    shape: tuple[int, int, int] = (40, 128, 128),
) -> tuple[list[Dataset], np.ndarray]:
    """An axial neonatal chest MR series and its label volume (0 bg, 1 left lung, 2 right lung).

    `labels[k]` overlays `series[k]` (InstanceNumber k+1) voxel for voxel.
    """
    study = study or _random_neonatal_study(rng)
    geom = _mr_geometry(rng, shape)
    anat = _mr_anatomy(rng)
    labels = _mr_lung_labels(geom, anat)
    image = _mr_image(rng, geom, anat, labels)
    acquired = study.study_datetime + dt.timedelta(minutes=2)
    series = [_mr_slice(study, geom, image[k], k, acquired) for k in range(shape[0])]
    return series, labels


def lung_volumes_ml(series: Sequence[Dataset], labels: np.ndarray) -> dict[str, float]:
    """True lung volumes: voxel count × PixelSpacing² × SpacingBetweenSlices."""
    first = series[0]
    voxel_ml = float(first.PixelSpacing[0]) * float(first.PixelSpacing[1]) * float(first.SpacingBetweenSlices) / 1000.0
    left = float(np.count_nonzero(labels == LEFT_LUNG) * voxel_ml)
    right = float(np.count_nonzero(labels == RIGHT_LUNG) * voxel_ml)
    return {"left": round(left, 3), "right": round(right, 3), "total": round(left + right, 3)}


# ---------------------------------------------------------------------------
# Reference segmentation
# ---------------------------------------------------------------------------

_ANATOMICAL_STRUCTURE = ("123037004", "Anatomical Structure")
_LUNG_SEGMENTS = ((LEFT_LUNG, "Left lung", "44029006"), (RIGHT_LUNG, "Right lung", "3341006"))


def _segment_descriptions() -> list[hd.seg.SegmentDescription]:
    category = hd.sr.CodedConcept(_ANATOMICAL_STRUCTURE[0], "SCT", _ANATOMICAL_STRUCTURE[1])
    return [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=category,
            segmented_property_type=hd.sr.CodedConcept(code, "SCT", label),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for number, label, code in _LUNG_SEGMENTS
    ]


def make_reference_seg(series: Sequence[Dataset], labels: np.ndarray) -> hd.seg.Segmentation:
    """A reviewer's lung mask as BINARY SEG (one frame per slice and segment, empties kept).

    UIDs and dates derive from the source series, so the same input gives the same bytes.
    """
    first = series[0]
    if labels.shape != (len(series), first.Rows, first.Columns):
        expected = (len(series), first.Rows, first.Columns)
        raise ValueError(f"labels {labels.shape} do not match the series {expected}")
    source_uid = first.SeriesInstanceUID
    reviewed = dt.datetime.strptime(first.StudyDate + first.StudyTime[:6], "%Y%m%d%H%M%S") + dt.timedelta(days=1)
    seg = hd.seg.Segmentation(
        source_images=list(series),
        pixel_array=labels.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segment_descriptions(),
        series_instance_uid=synth_uid(source_uid, "reference-seg", "series"),
        series_number=900,
        sop_instance_uid=synth_uid(source_uid, "reference-seg", "instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name="synth-reviewer",
        software_versions=SOFTWARE_VERSION,
        device_serial_number="SYN-SEG",
        content_description="Reference lung segmentation",
        content_creator_name="Reviewer^Synthetic",
        content_label="LUNGS",
        omit_empty_frames=False,
        series_description="Reference lung segmentation (synthetic)",
        institution_name=INSTITUTION_NAME,
        content_date=reviewed.date(),
        content_time=reviewed.time(),
        series_date=reviewed.date(),
        series_time=reviewed.time(),
    )
    _make_reproducible(seg, reviewed, synth_uid(source_uid, "reference-seg", "dimension-organization"))
    seg.ImageComments = SYNTHETIC_COMMENT
    return seg


def _make_reproducible(ds: Dataset, created: dt.datetime, dimension_uid: str) -> None:
    """Replace what highdicom fills from the clock or a random UID."""
    ds.InstanceCreationDate, ds.InstanceCreationTime = _da(created), _tm(created)
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = created.strftime("%Y%m%d%H%M%S")
    for item in ds.get("DimensionOrganizationSequence", []):
        item.DimensionOrganizationUID = dimension_uid
    for item in ds.get("DimensionIndexSequence", []):
        if "DimensionOrganizationUID" in item:
            item.DimensionOrganizationUID = dimension_uid


# ---------------------------------------------------------------------------
# The whole data set
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthSummary:
    """What `generate()` wrote (paths are absolute)."""

    outdir: Path
    n_patients: int
    n_studies: int
    n_cxr: int
    n_mri_series: int
    n_mri_instances: int
    n_seg: int
    cxr_paths: tuple[Path, ...]
    mri_series_dirs: tuple[Path, ...]
    seg_paths: tuple[Path, ...]
    labels_csv: Path
    truth_json: Path


@dataclass(frozen=True)
class _RadiographPlan:
    study: SynthStudy
    view_class: str
    modality: str
    photometric: str


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index])


def _share_count(n: int, share: float, name: str) -> int:
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"{name} must be within [0, 1], got {share}")
    return int(round(n * share))


def _plan_radiographs(seed: int, n_cxr: int, adult_share: float, non_chest_share: float,
                      base: dt.datetime) -> list[_RadiographPlan]:
    n_adult = _share_count(n_cxr, adult_share, "adult_share")
    n_other = _share_count(n_cxr, non_chest_share, "non_chest_share")
    if n_adult + n_other > n_cxr:
        raise ValueError("adult_share + non_chest_share exceed the number of radiographs")
    plan_rng = _rng(seed, _STREAM_PLAN, 0)
    kinds = plan_rng.permutation(["adult"] * n_adult + ["other"] * n_other + ["neonate"] * (n_cxr - n_adult - n_other))
    combos = [("CR", "MONOCHROME1"), ("CR", "MONOCHROME2"), ("DX", "MONOCHROME1"), ("DX", "MONOCHROME2")]
    encodings = plan_rng.permutation(np.arange(n_cxr) % 4)
    plans, n_other_seen = [], 0
    for i, kind in enumerate(kinds):
        index = i + 1
        rng = _rng(seed, _STREAM_PATIENT, index)
        when = base + dt.timedelta(days=int(rng.integers(0, 180)), minutes=int(rng.integers(0, 24 * 60)))
        if kind == "adult":
            patient, view = make_adult(rng, index, when.date()), "chest_frontal"
        else:
            patient = make_neonate(rng, index, when.date() - dt.timedelta(days=1))
            view = "chest_frontal"
            if kind == "other":
                view = GENERATED_VIEW_CLASSES[n_other_seen % len(GENERATED_VIEW_CLASSES)]
                n_other_seen += 1
        weight = None if patient.is_neonate else round(float(rng.uniform(50, 110)), 1)
        study = make_study(patient, index, when, key=(seed, "radiograph", index), weight_kg=weight)
        modality, photometric = combos[int(encodings[i])]
        plans.append(_RadiographPlan(study, view, modality, photometric))
    return plans


def _plan_mr_studies(seed: int, n_mri: int, radiographs: list[_RadiographPlan], base: dt.datetime) -> list[SynthStudy]:
    """Even-numbered MR studies go to babies who also had a chest radiograph."""
    frontal = [p.study for p in radiographs if p.view_class == "chest_frontal" and p.study.patient.is_neonate]
    studies = []
    for j in range(n_mri):
        rng = _rng(seed, _STREAM_MR, j)
        index = len(radiographs) + j + 1
        if j % 2 == 0 and j // 2 < len(frontal):
            earlier = frontal[j // 2]
            patient = earlier.patient
            when = earlier.study_datetime + dt.timedelta(days=int(rng.integers(1, 21)), hours=int(rng.integers(1, 6)))
        else:
            when = base + dt.timedelta(days=int(rng.integers(0, 180)), minutes=int(rng.integers(0, 24 * 60)))
            patient = make_neonate(rng, index, when.date() - dt.timedelta(days=int(rng.integers(2, 22))))
        day_of_life = (when.date() - patient.birth_date).days
        weight = patient.birth_weight_g / 1000.0 * (1.0 + 0.012 * max(0, day_of_life - 10))
        studies.append(make_study(patient, index, when, key=(seed, "mr", j), weight_kg=weight))
    return studies


def _relative(path: Path, outdir: Path) -> str:
    return path.relative_to(outdir).as_posix()


def _patient_truth(p: SynthPatient) -> dict[str, object]:
    return {
        "PatientID": p.patient_id, "PatientName": p.patient_name, "PatientBirthDate": _da(p.birth_date),
        "PatientSex": p.sex, "neonate": p.is_neonate, "gestational_age_weeks": p.gestational_age_weeks,
        "birth_weight_g": p.birth_weight_g, "bpd": p.bpd, "pneumonia": p.pneumonia, "irds_grade": p.irds_grade,
        "bpd_severity": round(p.bpd_severity, 4), "pneumonia_severity": round(p.pneumonia_severity, 4),
    }


def _study_truth(study: SynthStudy) -> dict[str, object]:
    return {
        "StudyInstanceUID": study.study_instance_uid, "SeriesInstanceUID": study.series_instance_uid,
        "PatientID": study.patient.patient_id, "StudyDate": _da(study.study_datetime),
        "PatientAge": study.patient_age, "age_days": study.age_days, "PatientWeight": study.weight_kg,
    }


def _labels_row(study: SynthStudy, labelled: bool) -> dict[str, object]:
    """Disease labels only where the image shows them (neonatal frontal chests)."""
    p = study.patient
    blank = lambda x: "" if x is None else x  # noqa: E731
    return {
        "StudyInstanceUID": study.study_instance_uid,
        "bpd": blank(p.bpd) if labelled else "",
        "pneumonia": blank(p.pneumonia) if labelled else "",
        "irds_grade": blank(p.irds_grade) if labelled else "",
        "gestational_age_weeks": blank(p.gestational_age_weeks),
        "birth_weight_g": blank(p.birth_weight_g),
    }


def _write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _write_radiographs(seed: int, outdir: Path, plans: list[_RadiographPlan],
                       size: int) -> tuple[list[Path], list[dict]]:
    paths, truth = [], []
    for i, plan in enumerate(plans):
        ds = make_cxr(_rng(seed, _STREAM_CXR, i + 1), study=plan.study, view_class=plan.view_class,
                      modality=plan.modality, photometric=plan.photometric, size=size)
        path = _write(ds, outdir / "cxr" / f"{ds.SOPInstanceUID}.dcm")
        paths.append(path)
        truth.append({
            **_study_truth(plan.study), "kind": "radiograph", "view_class": plan.view_class,
            "SOPInstanceUID": ds.SOPInstanceUID, "SOPClassUID": ds.SOPClassUID, "Modality": ds.Modality,
            "PhotometricInterpretation": ds.PhotometricInterpretation, "ViewPosition": ds.ViewPosition,
            "BodyPartExamined": ds.BodyPartExamined, "pixel_spacing_mm": float(ds.PixelSpacing[0]),
            "imager_pixel_spacing_mm": float(ds.ImagerPixelSpacing[0]),
            "devices": [d for d in ds.AcquisitionDeviceProcessingDescription.split() if d != "NONE"],
            "path": _relative(path, outdir),
        })
    return paths, truth


def _write_mr(seed: int, outdir: Path, studies: list[SynthStudy], shape: tuple[int, int, int]
              ) -> tuple[list[Path], list[Path], int, list[dict]]:
    dirs, segs, n_instances, truth = [], [], 0, []
    for j, study in enumerate(studies):
        series, labels = make_mr_series(_rng(seed, _STREAM_MR, 1000 + j), study=study, shape=shape)
        series_dir = outdir / "mri" / study.series_instance_uid
        for ds in series:
            _write(ds, series_dir / f"{ds.SOPInstanceUID}.dcm")
        seg = make_reference_seg(series, labels)
        seg_path = _write(seg, outdir / "seg" / f"{seg.SOPInstanceUID}.dcm")
        dirs.append(series_dir)
        segs.append(seg_path)
        n_instances += len(series)
        truth.append({
            **_study_truth(study), "kind": "mr", "view_class": None, "Modality": "MR", "n_slices": len(series),
            "SOPInstanceUIDs": [ds.SOPInstanceUID for ds in series],
            "lung_volume_ml": lung_volumes_ml(series, labels),
            "voxel_volume_ml": float(series[0].PixelSpacing[0]) ** 2 * float(series[0].SpacingBetweenSlices) / 1000.0,
            "seg_sop_instance_uid": seg.SOPInstanceUID, "seg_series_instance_uid": seg.SeriesInstanceUID,
            "path": _relative(series_dir, outdir), "seg_path": _relative(seg_path, outdir),
        })
    return dirs, segs, n_instances, truth


def _write_labels(path: Path, radiographs: list[_RadiographPlan], mr_studies: list[SynthStudy]) -> None:
    rows = [_labels_row(p.study, p.study.patient.is_neonate and p.view_class == "chest_frontal") for p in radiographs]
    rows += [_labels_row(s, False) for s in mr_studies]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(LABEL_COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def generate(
    outdir: Path,
    n_cxr: int = 20,
    n_mri: int = 4,
    seed: int = 0,
    *,
    cxr_size: int = 1024,
    mri_shape: tuple[int, int, int] = (40, 128, 128),
    adult_share: float = 0.1,
    non_chest_share: float = 0.15,
) -> SynthSummary:
    """Write a synthetic archive under `outdir` (see the module docstring for the layout).

    `n_cxr` counts every radiograph: `adult_share` of them are adult chests and
    `non_chest_share` are other views (lateral, abdomen, skull, babygram); the rest are
    day-1 neonatal frontal chests, the only ones with disease labels in labels.csv.
    """
    if n_cxr < 0 or n_mri < 0 or cxr_size < 16 or min(mri_shape) < 1:
        raise ValueError(f"invalid counts or sizes: n_cxr={n_cxr}, n_mri={n_mri}, "
                         f"cxr_size={cxr_size}, mri_shape={mri_shape}")
    outdir = Path(outdir).resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    base = dt.datetime(2022, 1, 3, 0, 0) + dt.timedelta(days=int(_rng(seed, _STREAM_PLAN, 1).integers(0, 900)))
    radiographs = _plan_radiographs(seed, n_cxr, adult_share, non_chest_share, base)
    mr_studies = _plan_mr_studies(seed, n_mri, radiographs, base)
    cxr_paths, cxr_truth = _write_radiographs(seed, outdir, radiographs, cxr_size)
    mri_dirs, seg_paths, n_instances, mr_truth = _write_mr(seed, outdir, mr_studies, mri_shape)
    labels_csv = outdir / "labels.csv"
    _write_labels(labels_csv, radiographs, mr_studies)
    patients = {p.study.patient.patient_id: p.study.patient for p in radiographs}
    patients.update({s.patient.patient_id: s.patient for s in mr_studies})
    truth = {
        "generator": "training.synth", "version": 1, "seed": seed, "synthetic": True,
        "view_classes": list(VIEW_CLASSES),
        "patients": [_patient_truth(p) for p in sorted(patients.values(), key=lambda p: p.patient_id)],
        "studies": cxr_truth + mr_truth,
    }
    truth_json = outdir / "truth.json"
    truth_json.write_text(json.dumps(truth, indent=2, sort_keys=True) + "\n")
    return SynthSummary(
        outdir=outdir, n_patients=len(patients), n_studies=len(cxr_truth) + len(mr_truth),
        n_cxr=len(cxr_paths), n_mri_series=len(mri_dirs), n_mri_instances=n_instances, n_seg=len(seg_paths),
        cxr_paths=tuple(cxr_paths), mri_series_dirs=tuple(mri_dirs), seg_paths=tuple(seg_paths),
        labels_csv=labels_csv, truth_json=truth_json,
    )
