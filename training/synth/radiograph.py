"""Projection radiographs as DICOM: CR Image Storage and DX Image Storage - For Presentation."""

from __future__ import annotations

import datetime as dt
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
    if view_class not in VIEW_SPECS:
        raise ValueError(f"cannot render view class {view_class!r}; choose from {sorted(VIEW_SPECS)}")
    if modality not in ("CR", "DX") or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"unsupported modality/photometric: {modality}/{photometric}")
    study = study or random_neonatal_study(rng)
    sop_instance_uid = sop_instance_uid or synth_uid(study.series_instance_uid, "image", 1)
    proj = render_projection(rng, study, view_class, size)
    stored = proj.stored if photometric == "MONOCHROME2" else (MAX_STORED - proj.stored).astype(np.uint16)
    spec = VIEW_SPECS[view_class]
    adult = not study.patient.is_neonate
    description = "CHEST PA" if adult and view_class == "chest_frontal" else spec.description
    sop_class = CR_IMAGE_STORAGE if modality == "CR" else DX_IMAGE_STORAGE_FOR_PRESENTATION
    ds = Dataset()
    acquired = study.study_datetime + dt.timedelta(minutes=1)
    common_attributes(ds, study, modality=modality, sop_class_uid=sop_class, sop_instance_uid=sop_instance_uid,
                      series_number=1, instance_number=1, description=description,
                      model=f"synth-{modality.lower()}", created=acquired + dt.timedelta(minutes=1))
    ds.AcquisitionDate, ds.AcquisitionTime = dicom_date(acquired), dicom_time(acquired)
    ds.ContentDate, ds.ContentTime = dicom_date(acquired), dicom_time(acquired)
    _positioning(ds, rng, view_class, adult)
    _exposure_and_geometry(ds, rng, proj, adult)
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    image_pixel(ds, stored, photometric)
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
    voi_window(ds, stored, "SYNTHETIC DEFAULT")
    if modality == "DX":
        _dx_attributes(ds, photometric, proj.magnification)
        ds.ViewCodeSequence = DicomSequence([code_item(*_VIEW_CODES[ds.ViewPosition])])
    return file_meta(ds)


def _positioning(ds: Dataset, rng: np.random.Generator, view_class: str, adult: bool) -> None:
    """Body part, view position, patient orientation and anatomic region of the view."""
    spec = VIEW_SPECS[view_class]
    ds.BodyPartExamined = spec.body_part
    ds.ViewPosition = _view_position(rng, view_class, adult)
    ds.PatientOrientation = ["P", "F"] if view_class == "chest_lateral" else ["L", "F"]
    ds.ImageLaterality = "U"
    ds.AnatomicRegionSequence = DicomSequence([code_item(*spec.region)])
    if not adult:
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
