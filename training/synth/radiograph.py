"""Projection radiographs as DICOM: CR Image Storage and DX Image Storage - For Presentation."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from training.synth.attributes import (MAX_STORED, code_item, common_attributes, decimal_string, dicom_date,
                                       dicom_time, file_meta, image_pixel, voi_window)
from training.synth.patients import SynthStudy, random_neonatal_study, synth_uid
from training.synth.projection import VIEW_SPECS, Projection, render_projection

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_IMAGE_STORAGE_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
_VIEW_CODES: MappingProxyType[str, tuple[str, str]] = MappingProxyType({
    "AP": ("399348003", "antero-posterior"),
    "PA": ("272479007", "postero-anterior"),
    "LL": ("399173006", "left lateral"),
    "RL": ("399198007", "right lateral"),
})


def _view_position(rng: np.random.Generator, view_class: str, adult: bool) -> str:
    if view_class == "chest_lateral":
        return str(rng.choice(["LL", "RL"]))
    return "PA" if adult and view_class == "chest_frontal" else "AP"


@dataclass(frozen=True)
class Positioning:
    """Where a radiograph points: body part, description, anatomic region, view and orientation."""

    body_part: str
    description: str
    region: tuple[str, str]
    view_position: str
    orientation: tuple[str, str] = ("L", "F")
    laterality: str = "U"
    supine: bool = True
    tabletop: bool = True  # neonatal/extremity technique (low kVp, 1 m); else an erect chest at 1.8 m


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
    from `study.patient` (bpd, pneumonia, irds_grade, pneumonia_type). The support devices drawn
    are listed in Acquisition Device Processing Description, e.g. "ETT UVC" (or "NONE").
    Pixel spacing is physical at size 1024 and scales with 1024/size.
    """
    if view_class not in VIEW_SPECS:
        raise ValueError(f"cannot render view class {view_class!r}; choose from {sorted(VIEW_SPECS)}")
    study = study or random_neonatal_study(rng)
    _check_encoding(modality, photometric)
    proj = render_projection(rng, study, view_class, size)
    spec = VIEW_SPECS[view_class]
    grown = not study.patient.is_neonate
    description = "CHEST PA" if grown and view_class == "chest_frontal" else spec.description
    positioning = Positioning(
        spec.body_part, description, spec.region, _view_position(rng, view_class, grown),
        orientation=("P", "F") if view_class == "chest_lateral" else ("L", "F"),
        supine=study.patient.is_neonate, tabletop=study.patient.is_neonate)
    return radiograph_dataset(rng, study, proj, positioning, modality=modality, photometric=photometric,
                              sop_instance_uid=sop_instance_uid)


def _check_encoding(modality: str, photometric: str) -> None:
    if modality not in ("CR", "DX") or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"unsupported modality/photometric: {modality}/{photometric}")


def radiograph_dataset(rng: np.random.Generator, study: SynthStudy, proj: Projection, positioning: Positioning, *,
                       modality: str, photometric: str, sop_instance_uid: str | None = None) -> Dataset:
    """The CR or DX instance of a rendered projection: header, technique and pixels."""
    _check_encoding(modality, photometric)
    sop_instance_uid = sop_instance_uid or synth_uid(study.series_instance_uid, "image", 1)
    stored = proj.stored if photometric == "MONOCHROME2" else (MAX_STORED - proj.stored).astype(np.uint16)
    sop_class = CR_IMAGE_STORAGE if modality == "CR" else DX_IMAGE_STORAGE_FOR_PRESENTATION
    ds = Dataset()
    acquired = study.study_datetime + dt.timedelta(minutes=1)
    common_attributes(ds, study, modality=modality, sop_class_uid=sop_class, sop_instance_uid=sop_instance_uid,
                      series_number=1, instance_number=1, description=positioning.description,
                      model=f"synth-{modality.lower()}", created=acquired + dt.timedelta(minutes=1))
    ds.AcquisitionDate, ds.AcquisitionTime = dicom_date(acquired), dicom_time(acquired)
    ds.ContentDate, ds.ContentTime = dicom_date(acquired), dicom_time(acquired)
    _positioning(ds, positioning)
    _exposure_and_geometry(ds, rng, proj, adult=not positioning.tabletop)
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    image_pixel(ds, stored, photometric)
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
    voi_window(ds, stored, "SYNTHETIC DEFAULT")
    if modality == "DX":
        _dx_attributes(ds, photometric, proj.magnification)
        ds.ViewCodeSequence = DicomSequence([code_item(*_VIEW_CODES[ds.ViewPosition])])
    return file_meta(ds)


def _positioning(ds: Dataset, positioning: Positioning) -> None:
    """Body part, view position, patient orientation and anatomic region of the view."""
    ds.BodyPartExamined = positioning.body_part
    ds.ViewPosition = positioning.view_position
    ds.PatientOrientation = list(positioning.orientation)
    ds.ImageLaterality = positioning.laterality
    ds.AnatomicRegionSequence = DicomSequence([code_item(*positioning.region)])
    if positioning.supine:
        ds.PatientPosition = "HFS"


def _exposure_and_geometry(ds: Dataset, rng: np.random.Generator, proj: Projection, adult: bool) -> None:
    """Technique (kVp, exposure), distances and the pixel spacings they imply; devices drawn."""
    ds.KVP = decimal_string(float(rng.integers(52, 66)) if not adult else float(rng.integers(110, 126)))
    ds.ExposureInuAs = int(rng.integers(600, 2000)) if not adult else int(rng.integers(1500, 5000))
    source_to_detector = 1000.0 if not adult else 1800.0
    ds.DistanceSourceToDetector = decimal_string(source_to_detector)
    ds.DistanceSourceToPatient = decimal_string(round(source_to_detector / proj.magnification, 1))
    ds.ImagerPixelSpacing = [decimal_string(proj.imager_spacing_mm), decimal_string(proj.imager_spacing_mm)]
    ds.PixelSpacing = [decimal_string(proj.spacing_mm), decimal_string(proj.spacing_mm)]
    ds.PixelSpacingCalibrationType = "GEOMETRY"  # Pixel Spacing = Imager Pixel Spacing / magnification
    ds.PixelSpacingCalibrationDescription = "Magnification from source-patient distance"
    ds.AcquisitionDeviceProcessingDescription = " ".join(proj.devices) or "NONE"


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
    ds.EstimatedRadiographicMagnificationFactor = decimal_string(magnification)
