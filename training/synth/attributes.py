"""DICOM attribute groups shared by the synthetic CR, DX and MR instances.

Patient, General Study, Patient Study, General Series, General Equipment and SOP Common in one
helper; Image Pixel and VOI LUT; the File Meta Information; and the value formatting of the
DA, TM and DS value representations.
"""

from __future__ import annotations

import datetime as dt

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

from training.synth.patients import SynthStudy

SYNTHETIC_COMMENT = "SYNTHETIC - NOT FOR CLINICAL USE"
INSTITUTION_NAME = "cradle synthetic"
MANUFACTURER = "cradle synthetic"
SOFTWARE_VERSION = "cradle-synth 1"
BITS_STORED = 12
MAX_STORED = (1 << BITS_STORED) - 1
_IMPLEMENTATION_VERSION_NAME = "CRADLE_SYNTH_1"


def decimal_string(value: float, digits: int = 6) -> str:
    """A Decimal String short enough for DICOM's 16 characters."""
    return f"{value:.{digits}g}"


def dicom_date(d: dt.date) -> str:
    return d.strftime("%Y%m%d")


def dicom_time(t: dt.datetime) -> str:
    return t.strftime("%H%M%S")


def code_item(value: str, meaning: str, scheme: str = "SCT") -> Dataset:
    return hd.sr.CodedConcept(value, scheme, meaning)


def common_attributes(ds: Dataset, study: SynthStudy, *, modality: str, sop_class_uid: str,
                      sop_instance_uid: str, series_number: int, instance_number: int,
                      description: str, model: str, created: dt.datetime) -> None:
    """Patient, General Study, Patient Study, General Series, General Equipment, SOP Common."""
    patient = study.patient
    when = study.study_datetime
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.InstanceCreationDate, ds.InstanceCreationTime = dicom_date(created), dicom_time(created)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class_uid, sop_instance_uid
    ds.StudyDate, ds.SeriesDate = dicom_date(when), dicom_date(when)
    ds.StudyTime, ds.SeriesTime = dicom_time(when), dicom_time(when)
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
    ds.PatientBirthDate = dicom_date(patient.birth_date)
    ds.PatientSex = patient.sex
    ds.PatientAge = study.patient_age
    ds.PatientWeight = decimal_string(study.weight_kg, 6)
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


def image_pixel(ds: Dataset, pixels: np.ndarray, photometric: str) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = (int(x) for x in pixels.shape)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, BITS_STORED, BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype("<u2").tobytes()


def voi_window(ds: Dataset, stored: np.ndarray, explanation: str) -> None:
    lo, hi = np.percentile(stored, [1.0, 99.0])
    ds.WindowCenter = decimal_string((lo + hi) / 2.0, 5)
    ds.WindowWidth = decimal_string(max(hi - lo, 2.0), 5)
    ds.WindowCenterWidthExplanation = explanation


def file_meta(ds: Dataset) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = _IMPLEMENTATION_VERSION_NAME
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    return ds
