"""DICOM result objects for cradle's pipelines: SR (TID 1500), SEG and SC.

The pipelines hand over plain data (:class:`ViewResult`, :class:`Finding`,
label volumes, :class:`LungVolumes`); this module turns it into the objects a
radiologist opens in OHIF, 3D Slicer or a PACS viewer, built with highdicom.

Every object is reproducible: its UIDs come from :func:`inference.uids.result_uid`
(source series + pipeline + model version) and its dates and times from the
source (or a time passed in), so a re-run of the same model gives identical bytes
and a PACS replaces the earlier result instead of keeping a duplicate.

Viewer compatibility shapes the SR content (checked against OHIF 3.13, see
``tests/test_ohif.py``):

- NUM items never carry a nested ContentSequence (OHIF drops such measurements);
  the algorithm is identified once per measurement group (TID 4019).
- Every measurement group in "Imaging Measurements" has image coordinates, or
  shares its Tracking Unique Identifier with a group that has them. OHIF merges
  groups by that UID and then reads the first SCOORD of each merged measurement;
  a measurement without one makes it fail ("Something went wrong"). So:

  * lung MRI: per lung, the TID 1411 volumetric group (SEG segment, volume) and
    the TID 1410 planar group (outline on the lung's largest slice, area on that
    slice) carry the same tracking identifier and UID as the SEG segment: one
    tracked entity, drawn as one outline labelled "Volume: 44.36 mL";
  * chest radiograph: a finding with a region is a TID 1410 planar group (the
    region, probability and threshold in %, the call); the view classifier's
    result and findings without a region are TID 1500 "Qualitative Evaluations"
    (row 12), which OHIF does not try to place.

- Probabilities and thresholds are in percent (UCUM ``%``): OHIF draws a NUM as
  "<concept name>: <value with 2 decimals> <UCUM code>", so "Probability: 83.00 %"
  where a fraction would read "0.83 1". OHIF draws NUMs only (no CODE or TEXT),
  so the finding's name and its call are in the SR but not on the drawn label.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cv2
import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.pixels import apply_modality_lut
from pydicom.uid import PYDICOM_ROOT_UID, UID, ExplicitVRLittleEndian
from pydicom.valuerep import DA, DT, TM

from inference.uids import device_uid, result_uid

__all__ = [
    "AlgorithmIdentity",
    "Finding",
    "LabelVolumeError",
    "LungVolumes",
    "RegionError",
    "SourceImageError",
    "ViewResult",
    "WriterInputError",
    "BRONCHOPULMONARY_DYSPLASIA",
    "PNEUMONIA",
    "LEFT_LUNG",
    "RIGHT_LUNG",
    "cxr_report",
    "lung_report",
    "lung_segmentation",
    "result_uid",
    "sort_series",
    "summary_image",
]

PIPELINE_CXR = "cxr"
PIPELINE_LUNG_MRI = "lung-mri"
MANUFACTURER = "cradle"

CXR_SR_SERIES_NUMBER = 9001
CXR_SC_SERIES_NUMBER = 9002
LUNG_SEG_SERIES_NUMBER = 9011
LUNG_SR_SERIES_NUMBER = 9012
LUNG_SC_SERIES_NUMBER = 9013

# Codes (pydicom Code is an immutable named tuple).
BRONCHOPULMONARY_DYSPLASIA = Code("67569000", "SCT", "Bronchopulmonary dysplasia")
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
LEFT_LUNG = Code("44029006", "SCT", "Left lung")
RIGHT_LUNG = Code("3341006", "SCT", "Right lung")
ANATOMICAL_STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")
PLAIN_CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")
MRI_OF_CHEST = Code("6007000", "SCT", "Magnetic resonance imaging of chest")
PROBABILITY = Code("122157", "DCM", "Probability")
THRESHOLD_VALUE = Code("122411", "DCM", "Threshold Value")
IMAGE_VIEW = Code("111031", "DCM", "Image View")
VOLUME = Code("118565006", "SCT", "Volume")
AREA = Code("42798000", "SCT", "Area")
POSITIVE = Code("10828004", "SCT", "Positive")
NEGATIVE = Code("260385009", "SCT", "Negative")
PERCENT = Code("%", "UCUM", "percent")
MILLILITER = Code("mL", "UCUM", "milliliter")
SQUARE_MILLIMETER = Code("mm2", "UCUM", "square millimeter")

COMMENT = Code("121106", "DCM", "Comment")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
FRONTAL_CHEST_TEXT = "Frontal chest radiograph: findings evaluated"
NOT_FRONTAL_CHEST_TEXT = "Not a frontal chest radiograph: findings not evaluated"

_LEFT_LABEL = 1
_RIGHT_LABEL = 2
# Distinct display colours (sRGB) for the segments: blue left, orange right.
_LEFT_RGB = (66, 135, 245)
_RIGHT_RGB = (245, 150, 40)
# Used when the source carries no usable date at all (Study Date is type 2).
_FALLBACK_DATETIME = dt.datetime(1970, 1, 1)
_LO_MAX = 64
_REGION_TOLERANCE_PX = 1.0
_NOT_FOR_DIAGNOSIS = "AI OUTPUT - NOT FOR DIAGNOSIS"


class WriterInputError(ValueError):
    """Inputs that cannot be turned into a valid DICOM result object."""


class SourceImageError(WriterInputError):
    """A source image or series lacks what the result object must reference."""


class LabelVolumeError(WriterInputError):
    """A label volume does not match its source series."""


class RegionError(WriterInputError):
    """A region polygon is malformed or outside its image."""


# --------------------------------------------------------------------------
# Input dataclasses
# --------------------------------------------------------------------------


def _check_text(name: str, value: str, max_len: int = _LO_MAX) -> None:
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
    """The model that produced a result (TID 4019 / Algorithm Identification)."""

    name: str
    version: str
    manufacturer: str = MANUFACTURER
    family: Code | hd.sr.CodedConcept = codes.DCM.ArtificialIntelligence

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
        )

    def seg_identification(self) -> hd.AlgorithmIdentificationSequence:
        return hd.AlgorithmIdentificationSequence(
            name=self.name,
            family=self.family,
            version=self.version,
            source=self.manufacturer,
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


# --------------------------------------------------------------------------
# Source validation and geometry
# --------------------------------------------------------------------------

_IMAGE_ATTRIBUTES = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "Rows",
    "Columns",
)
_SLICE_ATTRIBUTES = (
    "FrameOfReferenceUID",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "PixelSpacing",
)


def _require(ds: Dataset, keywords: Sequence[str], what: str) -> None:
    missing = [kw for kw in keywords if ds.get(kw) in (None, "")]
    if missing:
        raise SourceImageError(f"{what} lacks {', '.join(missing)}")


def _check_source_image(source: Dataset) -> None:
    if not isinstance(source, Dataset):
        raise SourceImageError(f"source must be a pydicom Dataset, got {type(source)}")
    _require(source, _IMAGE_ATTRIBUTES, "source image")
    if int(source.get("NumberOfFrames", 1) or 1) != 1:
        raise SourceImageError("multi-frame source images are not supported")


def _slice_normal(ds: Dataset) -> np.ndarray:
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    if iop.shape != (6,):
        raise SourceImageError("ImageOrientationPatient must have 6 values")
    return np.cross(iop[:3], iop[3:])


def sort_series(sources: Sequence[Dataset]) -> list[Dataset]:
    """Validate one single-frame series and sort it along the slice normal.

    Slices are ordered by increasing position of ImagePositionPatient along the
    normal of ImageOrientationPatient; the label volume of
    :func:`lung_segmentation` is aligned with this order.
    """
    sources = list(sources)
    if not sources:
        raise SourceImageError("the source series is empty")
    for ds in sources:
        _check_source_image(ds)
        _require(ds, _SLICE_ATTRIBUTES, f"slice {ds.SOPInstanceUID}")
    first = sources[0]
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        if len({str(ds.get(keyword)) for ds in sources}) != 1:
            raise SourceImageError(f"source slices differ in {keyword}")
    if len({(int(ds.Rows), int(ds.Columns)) for ds in sources}) != 1:
        raise SourceImageError("source slices differ in Rows/Columns")
    if len({str(ds.SOPInstanceUID) for ds in sources}) != len(sources):
        raise SourceImageError("source series repeats a SOP Instance UID")
    iop = np.asarray(first.ImageOrientationPatient, dtype=float)
    for ds in sources[1:]:
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, float), iop, atol=1e-4):
            raise SourceImageError("source slices differ in ImageOrientationPatient")
    normal = _slice_normal(first)
    positions = np.array(
        [float(np.dot(np.asarray(ds.ImagePositionPatient, float), normal)) for ds in sources]
    )
    order = np.argsort(positions, kind="stable")
    if len(sources) > 1 and np.min(np.diff(positions[order])) < 1e-3:
        raise SourceImageError("two source slices share one position along the normal")
    return [sources[i] for i in order]


def _check_labels(labels: np.ndarray, ordered: Sequence[Dataset]) -> np.ndarray:
    array = np.asarray(labels)
    expected = (len(ordered), int(ordered[0].Rows), int(ordered[0].Columns))
    if array.shape != expected:
        raise LabelVolumeError(
            f"label volume has shape {array.shape}, the series needs {expected} "
            "(slices, rows, columns)"
        )
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise LabelVolumeError(f"label volume must be integer, got {array.dtype}")
    unexpected = set(np.unique(array).tolist()) - {0, _LEFT_LABEL, _RIGHT_LABEL}
    if unexpected:
        raise LabelVolumeError(
            f"label volume may hold only 0 (background), 1 (left lung) and "
            f"2 (right lung), found {sorted(unexpected)}"
        )
    return array.astype(np.uint8)


def _closed_polygon(region: np.ndarray, image: Dataset) -> np.ndarray:
    """A closed (first point repeated) polygon inside the image, as float32."""
    points = np.asarray(region, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise RegionError(f"region must have shape (N, 2), got {points.shape}")
    if not np.all(np.isfinite(points)):
        raise RegionError("region holds non-finite coordinates")
    if not np.array_equal(points[0], points[-1]):
        points = np.vstack([points, points[:1]])
    if len(np.unique(points, axis=0)) < 3:
        raise RegionError("region needs at least three distinct points")
    columns, rows = int(image.Columns), int(image.Rows)
    tolerance = _REGION_TOLERANCE_PX
    if (
        points[:, 0].min() < -tolerance
        or points[:, 1].min() < -tolerance
        or points[:, 0].max() > columns + tolerance
        or points[:, 1].max() > rows + tolerance
    ):
        raise RegionError(
            f"region lies outside the {columns}x{rows} image (column, row order)"
        )
    # Rounding in a resampling (e.g. a Grad-CAM hot spot mapped back) may overshoot.
    points[:, 0] = np.clip(points[:, 0], 0, columns)
    points[:, 1] = np.clip(points[:, 1], 0, rows)
    return points.astype(np.float32)


def _largest_outline(mask: np.ndarray) -> np.ndarray | None:
    """Closed outline of the largest connected part of a 2D mask.

    Points are pixel centres in (column, row) order, i.e. shifted by half a pixel
    because DICOM image coordinates put (0, 0) at the top-left corner of the
    top-left pixel. None if the mask is too small to outline.
    """
    contours, _ = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    if not contours:
        return None
    largest = max(contours, key=cv2.contourArea)
    points = largest.reshape(-1, 2).astype(np.float64) + 0.5
    if len(np.unique(points, axis=0)) < 3:
        return None
    return np.vstack([points, points[:1]]).astype(np.float32)


# --------------------------------------------------------------------------
# Shared pieces: dates, equipment, determinism
# --------------------------------------------------------------------------


def _source_datetime(source: Dataset) -> dt.datetime:
    """The first complete date/time the source carries (study, series, ...)."""
    for date_kw, time_kw in (
        ("StudyDate", "StudyTime"),
        ("SeriesDate", "SeriesTime"),
        ("AcquisitionDate", "AcquisitionTime"),
        ("ContentDate", "ContentTime"),
    ):
        date_value = source.get(date_kw)
        if not date_value:
            continue
        date = DA(date_value)
        time_value = source.get(time_kw)
        time = TM(time_value) if time_value else dt.time(0, 0)
        return dt.datetime.combine(date, time).replace(tzinfo=None)
    return _FALLBACK_DATETIME


def _resolve_datetime(source: Dataset, when: dt.datetime | None) -> dt.datetime:
    if when is None:
        return _source_datetime(source)
    if not isinstance(when, dt.datetime):
        raise WriterInputError(f"content_datetime must be a datetime, got {when!r}")
    return when.replace(tzinfo=None)


def _long_string(text: str) -> str:
    return text if len(text) <= _LO_MAX else text[: _LO_MAX - 3] + "..."


def _sop_kwargs(algorithm: AlgorithmIdentity, description: str, when: dt.datetime) -> dict:
    """Equipment, description and date/time arguments shared by every object."""
    return {
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": algorithm.name,
        "software_versions": algorithm.version,
        "device_serial_number": algorithm.version,
        "series_description": _long_string(description),
        "content_date": when.date(),
        "content_time": when.time(),
        "series_date": when.date(),
        "series_time": when.time(),
    }


def _pin_generated_values(
    ds: Dataset, when: dt.datetime, dimension_uid: str | None = None
) -> None:
    """Replace the values highdicom takes from the clock or a random UID."""
    ds.InstanceCreationDate = DA(when.date())
    ds.InstanceCreationTime = TM(when.time())
    for item in ds.get("ContributingEquipmentSequence", []):
        if item.get("ManufacturerModelName") == "highdicom":
            item.ContributionDateTime = DT(when)
    if dimension_uid is None:
        return
    for item in ds.get("DimensionOrganizationSequence", []):
        item.DimensionOrganizationUID = dimension_uid
    for item in ds.get("DimensionIndexSequence", []):
        item.DimensionOrganizationUID = dimension_uid


@dataclass(frozen=True)
class _ResultUIDs:
    """UID factory for one (source series, pipeline, model version)."""

    source_series_uid: str
    pipeline: str
    model_version: str
    prefix: str = PYDICOM_ROOT_UID

    def __call__(self, kind: str) -> UID:
        return result_uid(
            self.source_series_uid,
            self.pipeline,
            self.model_version,
            kind,
            prefix=self.prefix,
        )


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


# --------------------------------------------------------------------------
# SR building blocks
# --------------------------------------------------------------------------


def _observation_context(algorithm: AlgorithmIdentity, prefix: str) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid(algorithm.name, algorithm.version, prefix=prefix),
        name=algorithm.name,
        manufacturer_name=algorithm.manufacturer,
        model_name=algorithm.version,
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=device,
        )
    )


def _has_modality_descriptors(image: Dataset) -> bool:
    """Whether highdicom's TID 1603/1604 descriptors can be built for the image."""
    modality = image.get("Modality")
    if modality in ("CT", "MR", "PT"):
        return all(image.get(kw) not in (None, "") for kw in (
            "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient", "SliceThickness"
        ))
    if modality in ("CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"):
        orientation = image.get("PatientOrientation")
        return (
            orientation is not None
            and len(orientation) == 2
            and image.get("ImagerPixelSpacing") not in (None, "")
        )
    return True


def _library_header(image: Dataset) -> Dataset:
    """The header the image library entry (TID 1601) is built from.

    CR images often lack PatientOrientation or ImagerPixelSpacing, which
    highdicom's projection radiography descriptors need; such images are listed
    with the basic descriptors only (modality from the SOP class, rows, columns).
    """
    if _has_modality_descriptors(image):
        return image
    header = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns", "FrameOfReferenceUID"):
        if keyword in image:
            setattr(header, keyword, image.get(keyword))
    header.Modality = "OT"  # selects neither modality-specific branch
    return header


# The concept name highdicom gives each image of its library (TID 1601 row 1).
_SOURCE = hd.sr.CodedConcept(value="260753009", scheme_designator="SCT", meaning="Source")


def _code_key(code: Code) -> tuple[str, str]:
    return code.scheme_designator, code.value


# TID 1602-1604 descriptors that highdicom builds, by concept (scheme, code value): the header
# attribute each one is read from and the index in a multi-valued attribute (None: the value).
_DESCRIPTOR_ATTRIBUTES: dict[tuple[str, str], tuple[str, int | None]] = {
    _code_key(code): attribute
    for code, attribute in (
        (codes.DCM.Modality, ("SOPClassUID", None)),  # coded from the SOP class
        (codes.DCM.FrameOfReferenceUID, ("FrameOfReferenceUID", None)),
        (codes.DCM.PixelDataRows, ("Rows", None)),
        (codes.DCM.PixelDataColumns, ("Columns", None)),
        (codes.DCM.PatientOrientationRow, ("PatientOrientation", 0)),
        (codes.DCM.PatientOrientationColumn, ("PatientOrientation", 1)),
        (codes.DCM.SliceThickness, ("SliceThickness", None)),
        (codes.DCM.SpacingBetweenSlices, ("SpacingBetweenSlices", None)),
        (codes.DCM.ImagePositionPatientX, ("ImagePositionPatient", 0)),
        (codes.DCM.ImagePositionPatientY, ("ImagePositionPatient", 1)),
        (codes.DCM.ImagePositionPatientZ, ("ImagePositionPatient", 2)),
        (codes.DCM.ImageOrientationPatientRowX, ("ImageOrientationPatient", 0)),
        (codes.DCM.ImageOrientationPatientRowY, ("ImageOrientationPatient", 1)),
        (codes.DCM.ImageOrientationPatientRowZ, ("ImageOrientationPatient", 2)),
        (codes.DCM.ImageOrientationPatientColumnX, ("ImageOrientationPatient", 3)),
        (codes.DCM.ImageOrientationPatientColumnY, ("ImageOrientationPatient", 4)),
        (codes.DCM.ImageOrientationPatientColumnZ, ("ImageOrientationPatient", 5)),
    )
}
# Pixel spacing: PixelSpacing for cross-sectional images, ImagerPixelSpacing for projection ones.
_SPACING_CONCEPTS = {
    _code_key(codes.DCM.HorizontalPixelSpacing): 1,
    _code_key(codes.DCM.VerticalPixelSpacing): 0,
}
_PROJECTION_MODALITIES = ("CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA")


def _concept_key(item: Dataset) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return str(code.CodingSchemeDesignator), str(code.CodeValue)


def _descriptor_value(header: Dataset, key: tuple[str, str]) -> object:
    """The header value behind one descriptor (KeyError for a descriptor not in the tables)."""
    if key in _SPACING_CONCEPTS:
        projection = header.get("Modality") in _PROJECTION_MODALITIES
        keyword = "ImagerPixelSpacing" if projection else "PixelSpacing"
        return header.get(keyword)[_SPACING_CONCEPTS[key]]
    keyword, index = _DESCRIPTOR_ATTRIBUTES[key]
    value = header.get(keyword)
    return value if index is None else value[index]


def _same_value(a: object, b: object) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return str(a) == str(b)


def _descriptor_like(template: Dataset, value: object) -> Dataset:
    """A copy of ``template`` (a highdicom NUM or TEXT descriptor) holding ``value``."""
    relationship = hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT
    if isinstance(template, hd.sr.NumContentItem):
        return hd.sr.NumContentItem(
            name=template.name, value=value, unit=template.unit, relationship_type=relationship
        )
    return hd.sr.TextContentItem(
        name=template.name, value=str(value), relationship_type=relationship
    )


def _factor_descriptors(
    template: Sequence[Dataset], headers: Sequence[Dataset]
) -> tuple[list[Dataset], list[tuple[int, list[object]]]] | None:
    """Split the descriptors of ``template`` (those of ``headers[0]``) into the items every
    header shares and, per differing descriptor, its position and each header's value.
    None when a descriptor is not in the tables above or differs but is not NUM or TEXT."""
    try:
        values = [[_descriptor_value(h, _concept_key(item)) for h in headers] for item in template]
    except (KeyError, TypeError, IndexError):
        return None
    shared, varying = [], []
    for position, (item, column) in enumerate(zip(template, values)):
        if all(_same_value(column[0], value) for value in column[1:]):
            shared.append(item)
        elif isinstance(item, (hd.sr.NumContentItem, hd.sr.TextContentItem)):
            varying.append((position, column))
        else:
            return None
    return shared, varying


def _library_group(headers: Sequence[Dataset]) -> hd.sr.ContainerContentItem:
    """One Image Library Group (TID 1600 row 2) of images that share SOP class, modality,
    frame of reference and descriptor layout.

    highdicom's ImageLibrary repeats every TID 1602/1604 descriptor in every entry: for a
    60-slice series about 1000 content items, which dominated the time to build, copy,
    check and encode the report. Here the descriptors all the group's images share
    (modality, frame of reference, matrix, pixel spacing, orientation, thickness) are stated
    once on the group (TID 1600 row 3), and each entry (TID 1601) carries only those that
    differ (the slice position): the same information, from the headers already read. The
    items are highdicom's descriptors of the group's first image.
    """
    template = list(hd.sr.ImageLibraryEntryDescriptors(headers[0]))
    factored = _factor_descriptors(template, headers)
    shared, varying = factored if factored is not None else ([], [])
    group = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibraryGroup,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    content = hd.sr.ContentSequence(shared)
    for index, header in enumerate(headers):
        image = hd.sr.ImageContentItem(
            name=_SOURCE,
            referenced_sop_class_uid=header.SOPClassUID,
            referenced_sop_instance_uid=header.SOPInstanceUID,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        if factored is None:  # highdicom's layout: every descriptor in every entry
            descriptors = list(hd.sr.ImageLibraryEntryDescriptors(header))
        else:
            descriptors = [_descriptor_like(template[p], column[index]) for p, column in varying]
        if descriptors:
            image.ContentSequence = hd.sr.ContentSequence(descriptors)
        content.append(image)
    group.ContentSequence = content
    return group


def _image_library(images: Sequence[Dataset]) -> hd.sr.ContainerContentItem:
    """TID 1600 Image Library of ``images``, from their headers (pixel data is not touched).

    A single image is listed as highdicom lists it. Several images are grouped by SOP class,
    frame of reference and descriptor layout, with their shared descriptors on the group
    (see :func:`_library_group`).
    """
    headers = [_library_header(image) for image in images]
    if len(headers) == 1:
        (library,) = hd.sr.ImageLibrary(headers)
        return library
    groups: dict[tuple, list[Dataset]] = {}
    for header in headers:
        key = (
            str(header.SOPClassUID),
            str(header.get("Modality", "")),
            str(header.get("FrameOfReferenceUID", "")),
            "SpacingBetweenSlices" in header,
        )
        groups.setdefault(key, []).append(header)
    library = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibrary,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    library.ContentSequence = hd.sr.ContentSequence([_library_group(g) for g in groups.values()])
    return library


def _tracking(uids: _ResultUIDs, label: str, uid: str | None = None) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(
        uid=uid or uids(f"tracking-{_slug(label)}"), identifier=label
    )


def _measurement(name: Code, value: float, unit: Code) -> hd.sr.Measurement:
    """A bare TID 300 NUM: no nested content (see the module docstring)."""
    return hd.sr.Measurement(name=name, value=float(value), unit=unit)


def _percent(fraction: float) -> float:
    """A probability or threshold given in [0, 1], as a percentage (UCUM "%")."""
    return round(float(fraction) * 100.0, 6)


def _probability_measurements(probability: float, threshold: float) -> list[hd.sr.Measurement]:
    """Probability first: OHIF draws the NUMs in order, "Probability: 83.00 %"."""
    return [
        _measurement(PROBABILITY, _percent(probability), PERCENT),
        _measurement(THRESHOLD_VALUE, _percent(threshold), PERCENT),
    ]


def _call(finding: Finding) -> Code:
    return POSITIVE if finding.positive else NEGATIVE


def _with_children(item: Dataset, children: Sequence[Dataset]) -> Dataset:
    item.ContentSequence = hd.sr.ContentSequence(list(children))
    return item


def _property(name: Code, value: float, unit: Code) -> hd.sr.NumContentItem:
    """A NUM (no nested content) that is a property of a qualitative evaluation."""
    return hd.sr.NumContentItem(
        name=name,
        value=float(value),
        unit=unit,
        relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES,
    )


def _view_evaluations(view: ViewResult, algorithm: AlgorithmIdentity) -> list[Dataset]:
    """TID 1500 row 14 TEXT items: the view classifier's label (as text: its
    classes have no standard codes) with its algorithm and probability, and a
    comment saying whether findings were evaluated."""
    view_item = hd.sr.TextContentItem(
        name=IMAGE_VIEW,
        value=view.label,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    _with_children(
        view_item,
        [
            *(view.algorithm or algorithm).sr_identification(),
            _property(PROBABILITY, _percent(view.probability), PERCENT),
        ],
    )
    comment = hd.sr.TextContentItem(
        name=COMMENT,
        value=FRONTAL_CHEST_TEXT if view.is_frontal_chest else NOT_FRONTAL_CHEST_TEXT,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    return [view_item, comment]


def _finding_evaluation(finding: Finding, algorithm: AlgorithmIdentity) -> Dataset:
    """TID 1500 row 13 CODE item for a finding without a region: the finding
    and its call (Positive/Negative), with its algorithm, probability, threshold
    and, when it says more than the code, its label as a comment."""
    item = hd.sr.CodeContentItem(
        name=finding.code,
        value=_call(finding),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    children: list[Dataset] = [
        *(finding.algorithm or algorithm).sr_identification(),
        _property(PROBABILITY, _percent(finding.probability), PERCENT),
        _property(THRESHOLD_VALUE, _percent(finding.threshold), PERCENT),
    ]
    if finding.tracking_label != finding.code.meaning:
        children.append(
            hd.sr.TextContentItem(
                name=COMMENT,
                value=finding.tracking_label,
                relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES,
            )
        )
    return _with_children(item, children)


def _finding_group(
    source: Dataset,
    finding: Finding,
    algorithm: AlgorithmIdentity,
    uids: _ResultUIDs,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 planar ROI group of a finding with a region: the closed region on
    the radiograph, probability and threshold in %, and the call."""
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=_closed_polygon(finding.region, source),
        source_image=hd.sr.SourceImageForRegion.from_source_image(source),
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(uids, finding.tracking_label),
        referenced_region=region,
        finding_type=finding.code,
        algorithm_id=(finding.algorithm or algorithm).sr_identification(),
        measurements=_probability_measurements(finding.probability, finding.threshold),
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(finding.code, _call(finding))],
    )


def _is_container(item: Dataset, code: Code) -> bool:
    return item.ValueType == "CONTAINER" and (
        item.ConceptNameCodeSequence[0].CodeValue == code.value
        and item.ConceptNameCodeSequence[0].CodingSchemeDesignator == code.scheme_designator
    )


def _measurement_report(
    *,
    algorithm: AlgorithmIdentity,
    uids: _ResultUIDs,
    procedure: Code,
    library: Sequence[Dataset],
    groups: Sequence[Dataset],
    evaluations: Sequence[Dataset],
) -> hd.sr.MeasurementReport:
    """TID 1500 with "Imaging Measurements" (row 6) holding ``groups`` and a
    "Qualitative Evaluations" container (row 12) holding ``evaluations``.

    highdicom 0.28 builds neither row 12 nor a report without measurement groups
    (TID 1500 needs row 6 or row 12, not both), so both are done here.
    """
    if not groups and not evaluations:
        raise WriterInputError("a report needs measurement groups or qualitative evaluations")
    placeholder = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uids("tracking-placeholder"), identifier="placeholder"
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(algorithm, uids.prefix),
        procedure_reported=procedure,
        imaging_measurements=list(groups) or [placeholder],
    )
    content = report[0].ContentSequence
    # Row 4, after the procedure reported (row 3), as highdicom would place it.
    procedure_rows = [
        i for i, item in enumerate(content)
        if _concept_key(item) == _code_key(codes.DCM.ProcedureReported)
    ]
    content.insert(procedure_rows[-1] + 1, _image_library(library))
    if not groups:
        (index,) = [
            i for i, item in enumerate(content)
            if _is_container(item, codes.DCM.ImagingMeasurements)
        ]
        del content[index]
    if evaluations:
        container = hd.sr.ContainerContentItem(
            name=QUALITATIVE_EVALUATIONS,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        content.append(_with_children(container, evaluations))
    return report


def _comprehensive_3d_sr(
    *,
    evidence: Sequence[Dataset],
    library: Sequence[Dataset],
    groups: Sequence[Dataset],
    evaluations: Sequence[Dataset] = (),
    procedure: Code,
    algorithm: AlgorithmIdentity,
    uids: _ResultUIDs,
    series_number: int,
    description: str,
    when: dt.datetime,
) -> hd.sr.Comprehensive3DSR:
    report = _measurement_report(
        algorithm=algorithm,
        uids=uids,
        procedure=procedure,
        library=library,
        groups=groups,
        evaluations=evaluations,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=uids("sr-series"),
        series_number=series_number,
        sop_instance_uid=uids("sr-instance"),
        instance_number=1,
        is_complete=True,
        is_final=False,
        is_verified=False,
        performed_procedure_codes=[procedure],
        **_sop_kwargs(algorithm, description, when),
    )
    _pin_generated_values(sr, when)
    return sr


# --------------------------------------------------------------------------
# Public writers
# --------------------------------------------------------------------------


def _check_cxr_inputs(source: Dataset, view: ViewResult, findings: Sequence[Finding]) -> None:
    _check_source_image(source)
    if not isinstance(view, ViewResult):
        raise WriterInputError(f"view must be a ViewResult, got {type(view)}")
    if not all(isinstance(f, Finding) for f in findings):
        raise WriterInputError("findings must all be Finding instances")
    # Tracking UIDs are derived from the labels, so labels must stay distinct.
    slugs = [_slug(f.tracking_label) for f in findings]
    if len(set(slugs)) != len(slugs):
        raise WriterInputError(
            f"findings repeat a label: {[f.tracking_label for f in findings]}"
        )


def cxr_report(
    source: Dataset,
    view: ViewResult,
    findings: Sequence[Finding],
    algorithm: AlgorithmIdentity,
    *,
    model_version_tag: str | None = None,
    pipeline: str = PIPELINE_CXR,
    content_datetime: dt.datetime | None = None,
    series_number: int = CXR_SR_SERIES_NUMBER,
    uid_prefix: str = PYDICOM_ROOT_UID,
) -> hd.sr.Comprehensive3DSR:
    """TID 1500 report on one chest radiograph.

    Always states the view in "Qualitative Evaluations": its label, probability
    and whether it is a frontal chest film. Findings are reported only for a
    frontal chest film; otherwise they are left out and the view says why. A
    finding with a region is a TID 1410 planar ROI group (drawn by viewers); one
    without is a qualitative evaluation (finding = Positive/Negative, with its
    probability and threshold). ``model_version_tag`` is what the UIDs are
    derived from (default ``algorithm.version``); pass a tag that covers every
    model behind the report (view, BPD, pneumonia) so that a new version of any
    of them gives a new result series.
    """
    findings = list(findings)
    _check_cxr_inputs(source, view, findings)
    version = model_version_tag or algorithm.version
    uids = _ResultUIDs(str(source.SeriesInstanceUID), pipeline, version, uid_prefix)
    groups: list[Dataset] = []
    evaluations: list[Dataset] = _view_evaluations(view, algorithm)
    if view.is_frontal_chest:
        for finding in findings:
            if finding.region is None:
                evaluations.append(_finding_evaluation(finding, algorithm))
            else:
                groups.append(_finding_group(source, finding, algorithm, uids))
    return _comprehensive_3d_sr(
        evidence=[source],
        library=[source],
        groups=groups,
        evaluations=evaluations,
        procedure=PLAIN_CHEST_XRAY,
        algorithm=algorithm,
        uids=uids,
        series_number=series_number,
        description=f"cradle AI: chest X-ray ({version})",
        when=_resolve_datetime(source, content_datetime),
    )


def _lung_segment(
    number: int,
    code: Code,
    rgb: tuple[int, int, int],
    algorithm: AlgorithmIdentity,
    uids: _ResultUIDs,
) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=code.meaning,
        segmented_property_category=ANATOMICAL_STRUCTURE,
        segmented_property_type=code,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm.seg_identification(),
        tracking_uid=uids(f"tracking-{_slug(code.meaning)}"),
        tracking_id=code.meaning,
        display_color=hd.color.CIELabColor.from_rgb(*rgb),
    )


def lung_segmentation(
    sources: Sequence[Dataset],
    labels: np.ndarray,
    algorithm: AlgorithmIdentity,
    *,
    pipeline: str = PIPELINE_LUNG_MRI,
    content_datetime: dt.datetime | None = None,
    series_number: int = LUNG_SEG_SERIES_NUMBER,
    uid_prefix: str = PYDICOM_ROOT_UID,
) -> hd.seg.Segmentation:
    """BINARY SEG with segments 1 "Left lung" and 2 "Right lung".

    ``labels`` is (slices, rows, columns) with 0 background, 1 left and 2 right
    lung, aligned with :func:`sort_series` order. Every slice gets a frame per
    segment, empty or not, so a viewer cannot shift the overlay.
    """
    ordered = sort_series(sources)
    label_volume = _check_labels(labels, ordered)
    uids = _ResultUIDs(
        str(ordered[0].SeriesInstanceUID), pipeline, algorithm.version, uid_prefix
    )
    when = _resolve_datetime(ordered[0], content_datetime)
    seg = hd.seg.Segmentation(
        source_images=ordered,
        pixel_array=label_volume,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[
            _lung_segment(_LEFT_LABEL, LEFT_LUNG, _LEFT_RGB, algorithm, uids),
            _lung_segment(_RIGHT_LABEL, RIGHT_LUNG, _RIGHT_RGB, algorithm, uids),
        ],
        series_instance_uid=uids("seg-series"),
        series_number=series_number,
        sop_instance_uid=uids("seg-instance"),
        instance_number=1,
        omit_empty_frames=False,
        content_label="LUNGS",
        content_description=f"Automatic lung segmentation - {_NOT_FOR_DIAGNOSIS}"[:_LO_MAX],
        **_sop_kwargs(algorithm, f"cradle AI: lung segmentation ({algorithm.version})", when),
    )
    _pin_generated_values(seg, when, uids("seg-dimension-organization"))
    return seg


def _segment_number(segmentation: hd.seg.Segmentation, code: Code) -> int:
    numbers = segmentation.get_segment_numbers(segmented_property_type=code)
    if len(numbers) != 1:
        raise WriterInputError(
            f"segmentation must hold exactly one {code.meaning!r} segment, found {numbers}"
        )
    return numbers[0]


def _segment_tracking_uid(segmentation: hd.seg.Segmentation, number: int) -> str | None:
    for item in segmentation.SegmentSequence:
        if item.SegmentNumber == number:
            return item.get("TrackingUID")
    return None


def _check_segmentation_matches(segmentation: Dataset, ordered: Sequence[Dataset]) -> None:
    if not isinstance(segmentation, hd.seg.Segmentation):
        raise WriterInputError(
            "segmentation must be a highdicom Segmentation (e.g. from "
            f"lung_segmentation or highdicom.seg.segread), got {type(segmentation)}"
        )
    referenced = {
        str(item.SeriesInstanceUID)
        for item in segmentation.get("ReferencedSeriesSequence", [])
    }
    if referenced != {str(ordered[0].SeriesInstanceUID)}:
        raise WriterInputError("segmentation does not reference the source series")
    if str(segmentation.StudyInstanceUID) != str(ordered[0].StudyInstanceUID):
        raise WriterInputError("segmentation belongs to another study")


def _pixel_area_mm2(image: Dataset) -> float:
    row_spacing, column_spacing = (float(v) for v in image.PixelSpacing)
    return row_spacing * column_spacing


def _lung_groups(
    number: int,
    code: Code,
    volume_ml: float,
    masks: np.ndarray,
    ordered: Sequence[Dataset],
    segmentation: hd.seg.Segmentation,
    algorithm: AlgorithmIdentity,
    uids: _ResultUIDs,
) -> list[Dataset]:
    """TID 1411 volume group for a lung, plus its outline as a TID 1410 group.

    Both groups carry the tracking identifier and UID of the SEG segment: they
    describe one tracked entity, and a viewer that merges groups by tracking UID
    (OHIF) draws the outline labelled with the volume. The outline is on the
    slice where the lung's area is largest, with that slice's area; a lung absent
    from every slice gets the volume group only.
    """
    tracking = _tracking(uids, code.meaning, _segment_tracking_uid(segmentation, number))
    groups: list[Dataset] = [
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=segmentation.SOPClassUID,
                sop_instance_uid=segmentation.SOPInstanceUID,
                segment_number=number,
                source_series=hd.sr.SourceSeriesForSegmentation(
                    str(ordered[0].SeriesInstanceUID)
                ),
            ),
            finding_type=code,
            finding_category=ANATOMICAL_STRUCTURE,
            algorithm_id=algorithm.sr_identification(),
            measurements=[_measurement(VOLUME, volume_ml, MILLILITER)],
        )
    ]
    areas = masks.reshape(len(masks), -1).sum(axis=1)
    index = int(np.argmax(areas))
    outline = _largest_outline(masks[index]) if areas[index] > 0 else None
    if outline is None:
        return groups
    image = ordered[index]
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=outline,
        source_image=hd.sr.SourceImageForRegion.from_source_image(image),
    )
    groups.append(
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            referenced_region=region,
            finding_type=code,
            finding_category=ANATOMICAL_STRUCTURE,
            finding_sites=[hd.sr.FindingSite(anatomic_location=code)],
            algorithm_id=algorithm.sr_identification(),
            measurements=[
                _measurement(AREA, areas[index] * _pixel_area_mm2(image), SQUARE_MILLIMETER),
            ],
        )
    )
    return groups


def lung_report(
    sources: Sequence[Dataset],
    segmentation: hd.seg.Segmentation,
    volumes_ml: LungVolumes | Mapping[str, float],
    algorithm: AlgorithmIdentity,
    *,
    pipeline: str = PIPELINE_LUNG_MRI,
    content_datetime: dt.datetime | None = None,
    series_number: int = LUNG_SR_SERIES_NUMBER,
    uid_prefix: str = PYDICOM_ROOT_UID,
) -> hd.sr.Comprehensive3DSR:
    """TID 1500 report of lung volumes, referencing the SEG's segments.

    Per lung: a TID 1411 volumetric group (ReferencedSegment, NUM volume in mL)
    and, for viewers that need image coordinates, a TID 1410 planar group with
    the lung's outline on the slice where it is largest (NUM area on that
    slice), both with the segment's tracking identifier and UID. The outlines
    are taken from ``segmentation`` itself.
    """
    ordered = sort_series(sources)
    _check_segmentation_matches(segmentation, ordered)
    volumes = LungVolumes.coerce(volumes_ml)
    uids = _ResultUIDs(
        str(ordered[0].SeriesInstanceUID), pipeline, algorithm.version, uid_prefix
    )
    left = _segment_number(segmentation, LEFT_LUNG)
    right = _segment_number(segmentation, RIGHT_LUNG)
    masks = segmentation.get_pixels_by_source_instance(
        [str(ds.SOPInstanceUID) for ds in ordered],
        segment_numbers=[left, right],
        dtype=np.uint8,
    )  # (slices, rows, columns, 2)
    groups = _lung_groups(
        left, LEFT_LUNG, volumes.left_ml, masks[..., 0], ordered, segmentation, algorithm, uids
    ) + _lung_groups(
        right, RIGHT_LUNG, volumes.right_ml, masks[..., 1], ordered, segmentation, algorithm, uids
    )
    return _comprehensive_3d_sr(
        evidence=[*ordered, segmentation],
        library=ordered,
        groups=groups,
        procedure=MRI_OF_CHEST,
        algorithm=algorithm,
        uids=uids,
        series_number=series_number,
        description=f"cradle AI: lung volumes ({algorithm.version})",
        when=_resolve_datetime(ordered[0], content_datetime),
    )


# --------------------------------------------------------------------------
# Secondary Capture summary
# --------------------------------------------------------------------------

# Overlay colours (sRGB) by label value; 1 and 2 match the SEG's lung colours.
_OVERLAY_RGB = (_LEFT_RGB, _RIGHT_RGB, (60, 200, 90), (220, 60, 200), (240, 220, 60))
_SUMMARY_MIN_SIDE, _SUMMARY_MAX_SIDE = 512, 1024
_BANNER_RGB = (255, 220, 0)


def _display_gray(source: Dataset) -> np.ndarray:
    """8-bit display rendering: modality LUT, 0.5 % clipped min-max, MONOCHROME1 inverted."""
    if "PixelData" not in source:
        raise SourceImageError("summary_image needs the source's pixel data")
    if source.get("SamplesPerPixel", 1) != 1:
        raise SourceImageError("summary_image supports grayscale sources only")
    values = apply_modality_lut(source.pixel_array, source).astype(np.float64)
    low, high = np.percentile(values, [0.5, 99.5])
    scaled = np.clip((values - low) / max(high - low, 1e-6), 0.0, 1.0)
    if source.PhotometricInterpretation == "MONOCHROME1":
        scaled = 1.0 - scaled
    return np.round(scaled * 255).astype(np.uint8)


def _summary_scale(rows: int, columns: int) -> float:
    longest = max(rows, columns)
    if longest < _SUMMARY_MIN_SIDE:
        return _SUMMARY_MIN_SIDE / longest
    if longest > _SUMMARY_MAX_SIDE:
        return _SUMMARY_MAX_SIDE / longest
    return 1.0


def _check_overlay(overlay: np.ndarray | None, source: Dataset) -> np.ndarray | None:
    if overlay is None:
        return None
    array = np.asarray(overlay)
    expected = (int(source.Rows), int(source.Columns))
    if array.shape != expected:
        raise LabelVolumeError(f"overlay has shape {array.shape}, the image needs {expected}")
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise LabelVolumeError(f"overlay must be integer or boolean, got {array.dtype}")
    if array.min() < 0 or array.max() > len(_OVERLAY_RGB):
        raise LabelVolumeError(f"overlay labels must lie in 0..{len(_OVERLAY_RGB)}")
    return array.astype(np.uint8)


def _draw_overlay(rgb: np.ndarray, overlay: np.ndarray) -> None:
    """Translucent fill plus a solid outline per label, in place."""
    size = (rgb.shape[1], rgb.shape[0])
    labels = cv2.resize(overlay, size, interpolation=cv2.INTER_NEAREST)
    thickness = max(1, round(rgb.shape[1] / 400))
    for value in (int(v) for v in np.unique(labels) if v):
        colour = _OVERLAY_RGB[value - 1]
        mask = labels == value
        rgb[mask] = (0.7 * rgb[mask] + 0.3 * np.array(colour)).astype(np.uint8)
        contours, _ = cv2.findContours(
            mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
        )
        cv2.drawContours(rgb, contours, -1, colour, thickness)


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii")


def _draw_text(rgb: np.ndarray, lines: Sequence[str], footer: str) -> None:
    """The not-for-diagnosis banner on top, ``lines`` below it, ``footer`` at the
    bottom; each on a black box so it stays legible on any image."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = rgb.shape[1] / 900
    thickness = max(1, round(rgb.shape[1] / 500))
    margin = max(2, round(6 * scale))
    (_, text_height), _ = cv2.getTextSize("Ag", font, scale, thickness)
    step = text_height + 3 * margin

    def put(text: str, baseline: int, colour: tuple[int, int, int]) -> None:
        text = _ascii(text)
        (width, height), descent = cv2.getTextSize(text, font, scale, thickness)
        top_left = (0, baseline - height - margin)
        bottom_right = (width + 2 * margin, baseline + descent + margin)
        cv2.rectangle(rgb, top_left, bottom_right, (0, 0, 0), -1)
        cv2.putText(rgb, text, (margin, baseline), font, scale, colour, thickness, cv2.LINE_AA)

    put(_NOT_FOR_DIAGNOSIS, step - margin, _BANNER_RGB)
    for row, line in enumerate(lines, start=2):
        put(line, row * step - margin, (255, 255, 255))
    put(footer, rgb.shape[0] - 2 * margin, _BANNER_RGB)


_ORIENTATION_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))


def _patient_orientation(source: Dataset) -> tuple[str, str] | None:
    """Row and column direction letters: the source's, or the dominant axes of
    ImageOrientationPatient (highdicom's SC accepts single letters only)."""
    orientation = source.get("PatientOrientation")
    if orientation and len(orientation) == 2 and all(len(v) == 1 for v in orientation):
        return str(orientation[0]), str(orientation[1])
    iop = source.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return None
    letters = []
    for vector in (np.asarray(iop[:3], float), np.asarray(iop[3:], float)):
        axis = int(np.argmax(np.abs(vector)))
        letters.append(_ORIENTATION_LETTERS[axis][0 if vector[axis] > 0 else 1])
    return letters[0], letters[1]


def _render_summary(
    source: Dataset, labels: np.ndarray | None, lines: Sequence[str], footer: str
) -> np.ndarray:
    """RGB rendering of the source with overlay and text, 512 to 1024 px on its long side."""
    gray = _display_gray(source)
    scale = _summary_scale(*gray.shape)
    size = (round(gray.shape[1] * scale), round(gray.shape[0] * scale))
    resized = cv2.resize(gray, size, interpolation=cv2.INTER_LINEAR)
    rgb = np.ascontiguousarray(np.repeat(resized[..., None], 3, axis=2))
    if labels is not None:
        _draw_overlay(rgb, labels)
    _draw_text(rgb, lines, footer)
    return rgb


def _mark_summary(sc: Dataset, source: Dataset, footer: str, when: dt.datetime) -> None:
    """Burned-in annotation flags, the source reference and pinned capture time."""
    # Both pipelines image the chest, an unpaired part, so Laterality stays absent.
    sc.BodyPartExamined = "CHEST"
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = _NOT_FOR_DIAGNOSIS
    sc.DerivationDescription = _long_string(f"{_NOT_FOR_DIAGNOSIS}: {footer}")
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    sc.DateOfSecondaryCapture = DA(when.date())
    sc.TimeOfSecondaryCapture = TM(when.time())
    _pin_generated_values(sc, when)


def _summary_series_number(pipeline: str) -> int:
    return LUNG_SC_SERIES_NUMBER if pipeline == PIPELINE_LUNG_MRI else CXR_SC_SERIES_NUMBER


def summary_image(
    source: Dataset,
    overlay: np.ndarray | None,
    text_lines: Sequence[str],
    algorithm: AlgorithmIdentity,
    *,
    pipeline: str,
    model_version_tag: str | None = None,
    content_datetime: dt.datetime | None = None,
    series_number: int | None = None,
    uid_prefix: str = PYDICOM_ROOT_UID,
) -> hd.sc.SCImage:
    """Secondary Capture of ``source`` (the radiograph, or the MR key slice) with
    ``overlay`` (label map of the source's size, 0 = nothing; 1 and 2 drawn in
    the SEG's left/right lung colours) and ``text_lines`` burned in, marked
    "AI OUTPUT - NOT FOR DIAGNOSIS", for viewers that show neither SR nor SEG.
    """
    _check_source_image(source)
    labels = _check_overlay(overlay, source)
    if isinstance(text_lines, str):
        raise WriterInputError("text_lines must be a sequence of strings, not a string")
    version = model_version_tag or algorithm.version
    uids = _ResultUIDs(str(source.SeriesInstanceUID), pipeline, version, uid_prefix)
    when = _resolve_datetime(source, content_datetime)
    footer = f"{algorithm.name} {version}"
    orientation = _patient_orientation(source)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=_render_summary(source, labels, list(text_lines), footer),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=uids("sc-series"),
        series_number=series_number or _summary_series_number(pipeline),
        sop_instance_uid=uids("sc-instance"),
        instance_number=1,
        # highdicom requires an orientation for PATIENT; an unknown one is blanked below.
        patient_orientation=orientation or ("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        **_sop_kwargs(algorithm, f"cradle AI: summary, not for diagnosis ({version})", when),
    )
    if orientation is None:
        sc.PatientOrientation = ""  # type 2: empty when unknown
    _mark_summary(sc, source, footer, when)
    return sc
