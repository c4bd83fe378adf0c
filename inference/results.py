"""What the pipelines hand to the DICOM writers: plain, validated result data.

The pipelines hand over plain data (:class:`ViewResult`, :class:`Finding`,
label volumes, :class:`LungVolumes`), identified by the model that produced it
(:class:`AlgorithmIdentity`); the writers (:mod:`inference.sr`,
:mod:`inference.seg`, :mod:`inference.secondary_capture`) turn it into the
objects a radiologist opens in OHIF, 3D Slicer or a PACS viewer, built with
highdicom. Inputs they cannot turn into a valid object raise a
:class:`WriterInputError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

__all__ = [
    "AlgorithmIdentity",
    "ClassCall",
    "Estimate",
    "Finding",
    "LabelVolumeError",
    "LungVolumes",
    "RegionError",
    "SourceImageError",
    "ViewResult",
    "WriterInputError",
    "LO_MAX",
    "MANUFACTURER",
    "NOT_FOR_DIAGNOSIS",
    "SHADOW_RUN",
    "PIPELINE_CXR",
    "PIPELINE_LUNG_MRI",
    "long_string",
]

PIPELINE_CXR = "cxr"
PIPELINE_LUNG_MRI = "lung-mri"
MANUFACTURER = "cradle"
NOT_FOR_DIAGNOSIS = "AI OUTPUT - NOT FOR DIAGNOSIS"
SHADOW_RUN = "SHADOW RUN - NOT FOR CLINICAL USE"
"""How a shadow run's results say what they are: first in the Series Description (what a viewer's
series list shows), as the algorithm's parameter (TID 4019, SEG Algorithm Identification) and, in
an SR, as a comment."""
LO_MAX = 64  # characters of a DICOM LO (Long String) value


class WriterInputError(ValueError):
    """Inputs that cannot be turned into a valid DICOM result object."""


class SourceImageError(WriterInputError):
    """A source image or series lacks what the result object must reference."""


class LabelVolumeError(WriterInputError):
    """A label volume does not match its source series."""


class RegionError(WriterInputError):
    """A region polygon is malformed or outside its image."""


def long_string(text: str) -> str:
    """``text`` shortened with "..." to fit a DICOM LO value."""
    return text if len(text) <= LO_MAX else text[: LO_MAX - 3] + "..."


def _check_text(name: str, value: str, max_len: int = LO_MAX) -> None:
    if not isinstance(value, str) or not value.strip():
        raise WriterInputError(f"{name} must be a non-empty string, got {value!r}")
    if len(value) > max_len or "\\" in value:
        raise WriterInputError(
            f"{name} must have at most {max_len} characters and no backslash "
            f"(DICOM LO), got {value!r}"
        )


def _check_unit_interval(name: str, value: float) -> None:
    if not isinstance(value, (int, float, np.floating)) or not 0.0 <= value <= 1.0:
        raise WriterInputError(f"{name} must be a number in [0, 1], got {value!r}")


@dataclass(frozen=True)
class AlgorithmIdentity:
    """The model that produced a result (TID 4019 / Algorithm Identification). ``clinical=False``:
    a shadow run's model (see :data:`SHADOW_RUN`)."""

    name: str
    version: str
    manufacturer: str = MANUFACTURER
    family: Code | hd.sr.CodedConcept = codes.DCM.ArtificialIntelligence
    clinical: bool = True

    def __post_init__(self) -> None:
        _check_text("algorithm name", self.name)
        _check_text("algorithm version", self.version)
        _check_text("algorithm manufacturer", self.manufacturer)

    def sr_identification(self) -> hd.sr.AlgorithmIdentification:
        return hd.sr.AlgorithmIdentification(
            name=self.name,
            version=self.version,
            family=self.family,
            manufacturer=self.manufacturer,
            parameters=None if self.clinical else [SHADOW_RUN],
        )

    def seg_identification(self) -> hd.AlgorithmIdentificationSequence:
        return hd.AlgorithmIdentificationSequence(
            name=self.name,
            family=self.family,
            version=self.version,
            source=self.manufacturer,
            parameters=None if self.clinical else {"use": SHADOW_RUN},
        )


@dataclass(frozen=True)
class ViewResult:
    """Output of the radiographic view classifier.

    ``algorithm`` identifies the view model when it differs from the report's.
    """

    label: str
    probability: float
    is_frontal_chest: bool
    algorithm: AlgorithmIdentity | None = None

    def __post_init__(self) -> None:
        _check_text("view label", self.label)
        _check_unit_interval("view probability", self.probability)


@dataclass(frozen=True, eq=False)
class Finding:
    """One model output on a chest radiograph.

    ``region`` is an optional polygon (N, 2) in (column, row) pixel coordinates
    of the source image; ``label`` (default: the code meaning) is the tracking
    identifier a viewer shows; ``algorithm`` identifies the model when it differs
    from the report's.
    """

    code: Code | hd.sr.CodedConcept
    probability: float
    threshold: float
    positive: bool
    region: np.ndarray | None = None
    label: str | None = None
    algorithm: AlgorithmIdentity | None = None

    def __post_init__(self) -> None:
        _check_unit_interval("finding probability", self.probability)
        _check_unit_interval("finding threshold", self.threshold)
        if self.label is not None:
            _check_text("finding label", self.label)

    @property
    def tracking_label(self) -> str:
        return self.label or self.code.meaning


@dataclass(frozen=True, eq=False)
class ClassCall:
    """A multiclass finding on a radiograph (e.g. pneumonia: normal, bacterial, viral): each class's
    probability, in the model's class order, and the call (the most probable class)."""

    code: Code | hd.sr.CodedConcept
    probabilities: tuple[tuple[Code | hd.sr.CodedConcept, float], ...]
    label: str | None = None
    algorithm: AlgorithmIdentity | None = None

    def __post_init__(self) -> None:
        if len(self.probabilities) < 2:
            raise WriterInputError("a class call needs at least two classes")
        for code, probability in self.probabilities:
            _check_unit_interval(f"probability of {code.meaning}", probability)
        if self.label is not None:
            _check_text("finding label", self.label)

    @property
    def call(self) -> Code | hd.sr.CodedConcept:
        return max(self.probabilities, key=lambda pair: pair[1])[0]

    @property
    def tracking_label(self) -> str:
        return self.label or self.code.meaning


@dataclass(frozen=True, eq=False)
class Estimate:
    """A numeric estimate on a radiograph (e.g. bone age in months), with the value it is read beside
    when there is one (bone age: the chronological age from the header; None when the header has none)."""

    code: Code | hd.sr.CodedConcept
    value: float
    unit: Code | hd.sr.CodedConcept
    beside: tuple[Code | hd.sr.CodedConcept, float] | None = None
    label: str | None = None
    algorithm: AlgorithmIdentity | None = None

    def __post_init__(self) -> None:
        values = [self.value] + ([self.beside[1]] if self.beside is not None else [])
        if not all(isinstance(v, (int, float, np.floating)) and np.isfinite(v) for v in values):
            raise WriterInputError(f"an estimate must be a finite number, got {values}")
        if self.label is not None:
            _check_text("finding label", self.label)

    @property
    def tracking_label(self) -> str:
        return self.label or self.code.meaning


@dataclass(frozen=True)
class LungVolumes:
    """Lung volumes in millilitres."""

    left_ml: float
    right_ml: float

    def __post_init__(self) -> None:
        for name, value in (("left_ml", self.left_ml), ("right_ml", self.right_ml)):
            if not isinstance(value, (int, float, np.floating)) or not (
                np.isfinite(value) and value >= 0
            ):
                raise WriterInputError(
                    f"{name} must be a finite non-negative number, got {value!r}"
                )

    @classmethod
    def coerce(cls, volumes: LungVolumes | Mapping[str, float]) -> LungVolumes:
        """Accept a LungVolumes or a mapping with keys "left" and "right" (other
        keys, e.g. "total" from ``training.synth.lung_volumes_ml``, are ignored)."""
        if isinstance(volumes, cls):
            return volumes
        if isinstance(volumes, Mapping) and {"left", "right"} <= set(volumes):
            return cls(left_ml=float(volumes["left"]), right_ml=float(volumes["right"]))
        raise WriterInputError(
            "volumes_ml must be a LungVolumes or a mapping with the keys "
            f"'left' and 'right', got {volumes!r}"
        )
