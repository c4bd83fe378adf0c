"""SR, SEG and SC writers: standard conformance (dciodvfy), round trips, determinism."""

from __future__ import annotations

import copy
import datetime as dt
import io
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.coding import Code
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from inference.codes import (
    AREA,
    BRONCHOPULMONARY_DYSPLASIA,
    LEFT_LUNG,
    PERCENT,
    PNEUMONIA,
    PROBABILITY,
    RIGHT_LUNG,
    VOLUME,
)
from inference.geometry import closed_polygon, largest_outline, polygon_area, sort_series
from inference.gradcam import HeatMap, hot_spot_polygons
from inference.preprocess import fit_letterbox
from inference.results import (
    AlgorithmIdentity,
    ClassCall,
    Estimate,
    Finding,
    LabelVolumeError,
    LungVolumes,
    RegionError,
    SourceImageError,
    ViewResult,
    WriterInputError,
)
from inference.secondary_capture import LUNG_SC_SERIES_NUMBER, summary_image
from inference.seg import lung_segmentation
from inference.sr import image_library
from inference.sr.lung import NOT_FOUND_TEXT, lung_report
from inference.sr.radiograph import cxr_report
from inference.sr.tid1500 import IMAGE_ASSESSED, check_viewable
from inference.uids import result_uid

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
N_SLICES, MR_SIZE = 16, 64

# --------------------------------------------------------------------------
# Source fixtures
# --------------------------------------------------------------------------


def _patient_and_study(ds: Dataset, study_uid: str) -> None:
    ds.PatientName = "Test^Baby"
    ds.PatientID = "CRADLE-TEST-1"
    ds.PatientBirthDate = "20240301"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = "20240302"
    ds.StudyTime = "081500"
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC1"
    ds.ReferringPhysicianName = ""


def _file_meta(ds: Dataset) -> None:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian


def make_cr(*, with_orientation: bool = True) -> Dataset:
    """A 512x512 MONOCHROME1 CR with a bright (dark on screen) chest blob."""
    ds = Dataset()
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["cr", str(with_orientation)])
    _patient_and_study(ds, generate_uid(entropy_srcs=["cr-study"]))
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["cr-series", str(with_orientation)])
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = "CR"
    ds.Manufacturer = "Synthetic"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "AP"
    if with_orientation:
        ds.PatientOrientation = ["L", "F"]
        ds.ImagerPixelSpacing = [0.15, 0.15]
    else:
        ds.PatientOrientation = ""
    rows = cols = 512
    yy, xx = np.mgrid[:rows, :cols]
    blob = ((yy - 256) ** 2 + (xx - 256) ** 2) < 180**2
    pixels = np.where(blob, 3000, 800).astype(np.uint16)
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    _file_meta(ds)
    return ds


def make_mr_series(n_slices: int = N_SLICES, size: int = MR_SIZE) -> list[Dataset]:
    """An axial MR series, returned in shuffled order (the writers must sort it)."""
    study_uid = generate_uid(entropy_srcs=["mr-study"])
    series_uid = generate_uid(entropy_srcs=["mr-series"])
    frame_uid = generate_uid(entropy_srcs=["mr-for"])
    slices = []
    for i in range(n_slices):
        ds = Dataset()
        ds.SOPClassUID = MR_IMAGE_STORAGE
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["mr", str(i)])
        _patient_and_study(ds, study_uid)
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 3
        ds.InstanceNumber = i + 1
        ds.Modality = "MR"
        ds.Manufacturer = "Synthetic"
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence = "GR"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.EchoTrainLength = 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-48.0, -48.0, -20.0 + 2.5 * i]
        ds.SliceLocation = -20.0 + 2.5 * i
        ds.PixelSpacing = [1.5, 1.5]
        ds.SliceThickness = 2.5
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 0
        ds.PixelData = np.full((size, size), 100 + i, np.uint16).tobytes()
        _file_meta(ds)
        slices.append(ds)
    rng = np.random.default_rng(7)
    return [slices[i] for i in rng.permutation(n_slices)]


def make_labels(n_slices: int = N_SLICES, size: int = MR_SIZE) -> np.ndarray:
    """Two ellipsoid-ish lungs whose size peaks at different slices; ends empty."""
    labels = np.zeros((n_slices, size, size), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for z in range(2, n_slices - 2):
        r_left = 12 - abs(z - 7)
        r_right = 11 - abs(z - 9)
        if r_left > 0:
            labels[z][((yy - 32) / 1.6) ** 2 + (xx - 44) ** 2 < r_left**2] = 1
        if r_right > 0:
            labels[z][((yy - 32) / 1.6) ** 2 + (xx - 19) ** 2 < r_right**2] = 2
    return labels


ALGO_CXR = AlgorithmIdentity(name="cradle-cxr-bpd", version="bpd-3")
ALGO_SEG = AlgorithmIdentity(name="cradle-lung-seg", version="lung-seg-3")


def _findings(with_region: bool = True) -> list[Finding]:
    square = np.array([[200, 150], [320, 150], [320, 300], [200, 300]], float)
    return [
        Finding(
            code=BRONCHOPULMONARY_DYSPLASIA,
            probability=0.71,
            threshold=0.5,
            positive=True,
            region=square if with_region else None,
            label="BPD risk (moderate/severe)",
        ),
        Finding(code=PNEUMONIA, probability=0.12, threshold=0.35, positive=False),
    ]


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _write(ds: Dataset, path: Path) -> Path:
    path.write_bytes(_bytes(ds))
    return path


def _dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    return (
        [line for line in lines if line.startswith("Error")],
        [line for line in lines if line.startswith("Warning")],
    )


def _walk(items):
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def _num_items(sr: Dataset) -> list[Dataset]:
    return [i for i in _walk(sr.ContentSequence) if i.ValueType == "NUM"]


def _measurement_groups(sr: Dataset) -> list[Dataset]:
    return [
        i
        for i in _walk(sr.ContentSequence)
        if i.ValueType == "CONTAINER" and i.ConceptNameCodeSequence[0].CodeValue == "125007"
    ]


def _num_values(group: Dataset, code_value: str) -> list[float]:
    return [
        float(i.MeasuredValueSequence[0].NumericValue)
        for i in group.ContentSequence
        if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeValue == code_value
    ]


def _text(group: Dataset, code_value: str) -> list[str]:
    return [
        i.TextValue
        for i in group.ContentSequence
        if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == code_value
    ]


def _referenced_sops(sr: Dataset) -> set[str]:
    return {
        ref.ReferencedSOPInstanceUID
        for item in _walk(sr.ContentSequence)
        if item.ValueType == "IMAGE"
        for ref in item.ReferencedSOPSequence
    }


def _code(item: Dataset) -> tuple[str, str]:
    name = item.ConceptNameCodeSequence[0]
    return name.CodeValue, name.CodingSchemeDesignator


def _value_code(item: Dataset) -> tuple[str, str]:
    """A CODE item's value."""
    value = item.ConceptCodeSequence[0]
    return value.CodeValue, value.CodingSchemeDesignator


def _document_containers(sr: Dataset) -> list[tuple[str, str]]:
    """Concept names of the report's top-level containers, in order."""
    return [_code(i) for i in sr.ContentSequence if i.ValueType == "CONTAINER"]


def _qualitative_evaluations(sr: Dataset) -> list[Dataset]:
    """Items of TID 1500's "Qualitative Evaluations" container (row 12)."""
    containers = [i for i in sr.ContentSequence if _code(i) == ("C0034375", "UMLS")]
    assert len(containers) <= 1
    return list(containers[0].ContentSequence) if containers else []


def _children(item: Dataset, relationship: str, value_type: str) -> list[Dataset]:
    return [
        i for i in item.get("ContentSequence", [])
        if i.RelationshipType == relationship and i.ValueType == value_type
    ]


def _ohif_measurements(sr: Dataset) -> dict[str, dict]:
    """What OHIF 3.13's SR handler makes of the report, by Tracking Unique Identifier.

    It reads only the measurement groups of "Imaging Measurements", merges the groups
    that share a Tracking Unique Identifier, and fails on a merged measurement without
    a SCOORD. On the image it draws, for one with a SCOORD, up to 5 lines: each NUM as
    "<concept meaning>: <value, 2 decimals> <unit code value>", then the Finding Site
    (SCT 363698007) as "363698007: <meaning>".
    """
    merged: dict[str, list[Dataset]] = {}
    for group in _measurement_groups(sr):
        (uid,) = [i.UID for i in group.ContentSequence if _code(i) == ("112040", "DCM")]
        merged.setdefault(uid, []).extend(group.ContentSequence)
    result = {}
    for uid, items in merged.items():
        labels = [
            f"{i.ConceptNameCodeSequence[0].CodeMeaning}: "
            f"{float(i.MeasuredValueSequence[0].NumericValue):.2f} "
            f"{i.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue}"
            for i in items if i.ValueType == "NUM"
        ]
        labels += [
            f"363698007: {i.ConceptCodeSequence[0].CodeMeaning}"
            for i in items if _code(i) == ("363698007", "SCT")
        ]
        result[uid] = {
            "tracking_identifier": next(i.TextValue for i in items if _code(i)[0] == "112039"),
            "scoords": [i for i in items if i.ValueType in ("SCOORD", "SCOORD3D")],
            "drawn": labels[:5],
        }
    return result


# --------------------------------------------------------------------------
# Shared built objects (module scope keeps the suite fast)
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cr() -> Dataset:
    return make_cr()


@pytest.fixture(scope="module")
def mr() -> list[Dataset]:
    return make_mr_series()


@pytest.fixture(scope="module")
def sorted_mr(mr) -> list[Dataset]:
    return sorted(mr, key=lambda ds: float(ds.ImagePositionPatient[2]))


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return make_labels()


@pytest.fixture(scope="module")
def cxr_sr(cr) -> hd.sr.Comprehensive3DSR:
    view = ViewResult(label="chest AP", probability=0.97, is_frontal_chest=True)
    return cxr_report(cr, view, _findings(), ALGO_CXR)


@pytest.fixture(scope="module")
def seg(mr, labels) -> hd.seg.Segmentation:
    return lung_segmentation(mr, labels, ALGO_SEG)


@pytest.fixture(scope="module")
def lung_sr(mr, seg) -> hd.sr.Comprehensive3DSR:
    return lung_report(mr, seg, LungVolumes(left_ml=31.25, right_ml=27.5), ALGO_SEG)


NOT_APPLICABLE = [("BPD risk (moderate/severe)", "not a frontal chest film"), ("Pneumonia", "not a frontal chest film")]


@pytest.fixture(scope="module")
def non_frontal_sr(cr) -> hd.sr.Comprehensive3DSR:
    """What the pipeline writes for an abdomen film: the view, and each finding not applicable, in words."""
    view = ViewResult(label="abdomen AP", probability=0.88, is_frontal_chest=False)
    return cxr_report(cr, view, [], ALGO_CXR, not_applicable=NOT_APPLICABLE, chest=False)


PNEUMONIA_BY_TYPE = ClassCall(PNEUMONIA, ((Code("17621005", "SCT", "Normal"), 0.2),
                                          (Code("53084003", "SCT", "Bacterial pneumonia"), 0.7),
                                          (Code("75570004", "SCT", "Viral pneumonia"), 0.1)))
BONE_AGE = Estimate(Code("37362-1", "LN", "Bone age"), 96.5, Code("mo", "UCUM", "month"),
                    beside=(Code("30525-0", "LN", "Age"), 90.0))


@pytest.fixture(scope="module")
def class_call_sr(cr) -> hd.sr.Comprehensive3DSR:
    view = ViewResult(label="chest AP", probability=0.97, is_frontal_chest=True)
    return cxr_report(cr, view, [PNEUMONIA_BY_TYPE], ALGO_CXR)


@pytest.fixture(scope="module")
def bone_age_sr(cr) -> hd.sr.Comprehensive3DSR:
    view = ViewResult(label="extremity", probability=0.93, is_frontal_chest=False)
    findings = [Finding(Code("125605004", "SCT", "Fracture of bone"), 0.2, 0.5, False), BONE_AGE]
    return cxr_report(cr, view, findings, ALGO_CXR, chest=False)


CXR_SUMMARY_LINES = ["BPD risk (moderate/severe): 0.71 (threshold 0.50) positive"]


@pytest.fixture(scope="module")
def cxr_sc(cr) -> Dataset:
    overlay = np.zeros((512, 512), np.uint8)
    overlay[150:300, 200:320] = 1
    return summary_image(cr, overlay, CXR_SUMMARY_LINES, ALGO_CXR, pipeline="cxr")


@pytest.fixture(scope="module")
def lung_sc(sorted_mr, labels) -> Dataset:
    return summary_image(
        sorted_mr[7], labels[7], ["Left lung 31.3 mL", "Right lung 27.5 mL"], ALGO_SEG,
        pipeline="lung-mri",
    )


def hot_spot_heat_map(image: Dataset, size: int = 128) -> HeatMap:
    """A heat map on a ``size`` model grid over ``image`` with the parts untrained models'
    Grad-CAM maps show: a large part, a part at the image's edge, a part of one model pixel."""
    box = fit_letterbox(int(image.Rows), int(image.Columns), size)
    values = np.zeros((size, size), np.float32)
    yy, xx = np.mgrid[:size, :size]
    values[((yy - 60) / 14.0) ** 2 + ((xx - 70) / 20.0) ** 2 < 1] = 1.0
    values[100:128, 0:9] = 0.8  # the edge: bottom-left corner of the image
    values[20, 30] = 0.9  # one model pixel
    return HeatMap(values, box)


def _negatives() -> list[Finding]:
    return [
        Finding(code=BRONCHOPULMONARY_DYSPLASIA, probability=0.2, threshold=0.5, positive=False,
                label="BPD risk (moderate/severe)"),
        Finding(code=PNEUMONIA, probability=0.1, threshold=0.35, positive=False),
    ]


def _hot_spot_findings(image: Dataset) -> list[Finding]:
    """One positive finding per hot-spot part, and a positive finding without a region."""
    parts = hot_spot_polygons(hot_spot_heat_map(image))
    return [
        Finding(code=PNEUMONIA, probability=0.7, threshold=0.5, positive=True, region=part,
                label=f"Pneumonia hot spot {k}")
        for k, part in enumerate(parts, start=1)
    ] + [Finding(code=BRONCHOPULMONARY_DYSPLASIA, probability=0.6, threshold=0.5, positive=True)]


def _lung_sr_without(mr: list[Dataset], labels: np.ndarray, *missing: int) -> Dataset:
    """The lung SR when the model finds no voxel of the lungs labelled ``missing``."""
    found = np.where(np.isin(labels, missing), 0, labels).astype(np.uint8)
    volumes = {side: 0.0 if value in missing else 30.0 for side, value in (("left", 1), ("right", 2))}
    return lung_report(mr, lung_segmentation(mr, found, ALGO_SEG), volumes, ALGO_SEG)


@pytest.fixture(scope="module")
def all_objects(cr, mr, labels, cxr_sr, non_frontal_sr, class_call_sr, bone_age_sr, seg, lung_sr, cxr_sc,
                lung_sc) -> dict[str, Dataset]:
    bare_cr = make_cr(with_orientation=False)
    view = ViewResult(label="chest AP", probability=0.9, is_frontal_chest=True)
    return {
        "cxr-sr": cxr_sr,
        "cxr-sr-no-orientation": cxr_report(bare_cr, view, _findings(False), ALGO_CXR),
        "cxr-sr-non-frontal": non_frontal_sr,
        "cxr-sr-class-call": class_call_sr,
        "cxr-sr-bone-age": bone_age_sr,
        "cxr-sr-no-finding": cxr_report(cr, view, _negatives(), ALGO_CXR),
        "cxr-sr-hot-spots": cxr_report(cr, view, _hot_spot_findings(cr), ALGO_CXR),
        "lung-seg": seg,
        "lung-sr": lung_sr,
        "lung-sr-right-not-found": _lung_sr_without(mr, labels, 2),
        "lung-sr-none-found": _lung_sr_without(mr, labels, 1, 2),
        "cxr-sc": cxr_sc,
        "lung-sc": lung_sc,
    }


OBJECT_NAMES = [
    "cxr-sr", "cxr-sr-no-orientation", "cxr-sr-non-frontal", "cxr-sr-class-call", "cxr-sr-bone-age",
    "cxr-sr-no-finding", "cxr-sr-hot-spots", "lung-seg", "lung-sr", "lung-sr-right-not-found",
    "lung-sr-none-found",
    "cxr-sc", "lung-sc",
]
SR_NAMES = [name for name in OBJECT_NAMES if name.endswith("sr") or "-sr-" in name]


# --------------------------------------------------------------------------
# Conformance and round trips
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", OBJECT_NAMES)
def test_dciodvfy_reports_no_errors_or_warnings(name, all_objects, tmp_path):
    errors, warnings = _dciodvfy(_write(all_objects[name], tmp_path / f"{name}.dcm"))
    assert errors == []
    assert warnings == []


@pytest.mark.parametrize("name", SR_NAMES)
def test_sr_round_trips_through_srread_and_dsrdump(name, all_objects, tmp_path):
    path = _write(all_objects[name], tmp_path / f"{name}.dcm")
    sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert sr.SOPInstanceUID == all_objects[name].SOPInstanceUID
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    tool = shutil.which("dsrdump")
    if tool is None:
        pytest.skip("dsrdump (DCMTK) is not installed")
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "Imaging Measurement Report" in run.stdout
    assert "E: " not in run.stderr and "W: " not in run.stderr, run.stderr


@pytest.mark.parametrize("name", SR_NAMES)
def test_every_measurement_ohif_merges_has_image_coordinates(name, all_objects):
    """OHIF 3.13 fails on the whole SR ("Something went wrong") if a measurement
    group, after merging by Tracking Unique Identifier, has no SCOORD."""
    for uid, measurement in _ohif_measurements(all_objects[name]).items():
        assert measurement["scoords"], f"{measurement['tracking_identifier']} ({uid})"


@pytest.mark.parametrize("name", SR_NAMES)
def test_report_containers_follow_tid_1500(name, all_objects):
    """Imaging Measurements (row 6) when there are groups, then Qualitative
    Evaluations (row 12) when there are evaluations; at least one of them."""
    sr = all_objects[name]
    containers = _document_containers(sr)
    assert containers[0] == ("111028", "DCM")  # Image Library
    assert containers[1:] in (
        [("126010", "DCM")],
        [("126010", "DCM"), ("C0034375", "UMLS")],
        [("C0034375", "UMLS")],
    )
    if ("126010", "DCM") in containers:
        assert _measurement_groups(sr)


@pytest.mark.parametrize("name", SR_NAMES)
def test_no_num_item_has_nested_content(name, all_objects):
    nums = _num_items(all_objects[name])
    assert nums or name == "lung-sr-none-found"  # no lung, no measurement
    assert all("ContentSequence" not in item for item in nums)


@pytest.mark.parametrize("name", SR_NAMES)
def test_ohif_has_a_measurement_to_open_the_report_on(name, all_objects):
    """OHIF 3.13 opens a TID 1500 report on the image of its first measurement and fails
    ("Cannot destructure property 'displaySetInstanceUID'") on a report without one."""
    assert _ohif_measurements(all_objects[name])


@pytest.mark.parametrize("name", OBJECT_NAMES)
def test_patient_study_and_equipment_follow_the_source(name, all_objects, cr, sorted_mr):
    ds = all_objects[name]
    source = sorted_mr[0] if name.startswith("lung") else cr
    for keyword in (
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
        "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
    ):
        assert str(ds.get(keyword)) == str(source.get(keyword)), keyword
    algorithm = ALGO_SEG if name.startswith("lung") else ALGO_CXR
    assert ds.Manufacturer == "cradle"
    assert ds.ManufacturerModelName == algorithm.name
    assert ds.SoftwareVersions == algorithm.version
    assert ds.SeriesDescription.startswith("cradle AI: ")
    assert algorithm.version in ds.SeriesDescription
    # Dates come from the source, not the clock, so a re-run is byte-identical.
    dates = {str(ds.get(kw)) for kw in ("ContentDate", "SeriesDate", "InstanceCreationDate")}
    times = {str(ds.get(kw)) for kw in ("ContentTime", "SeriesTime", "InstanceCreationTime")}
    assert (dates, times) == ({"20240302"}, {"081500"})


# --------------------------------------------------------------------------
# SEG
# --------------------------------------------------------------------------


def test_seg_has_a_frame_per_slice_and_segment_each_referencing_its_slice(
    seg, sorted_mr, tmp_path
):
    seg = hd.seg.segread(_write(seg, tmp_path / "seg.dcm"))
    assert seg.SegmentationType == "BINARY"
    assert seg.NumberOfFrames == N_SLICES * 2
    assert seg.FrameOfReferenceUID == sorted_mr[0].FrameOfReferenceUID
    by_position = {
        tuple(round(float(v), 3) for v in ds.ImagePositionPatient): ds for ds in sorted_mr
    }
    per_segment: dict[int, list[str]] = {1: [], 2: []}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        position = tuple(
            round(float(v), 3) for v in frame.PlanePositionSequence[0].ImagePositionPatient
        )
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        assert source.ReferencedSOPInstanceUID == by_position[position].SOPInstanceUID
        segment = frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        per_segment[segment].append(source.ReferencedSOPInstanceUID)
    for uids in per_segment.values():
        assert sorted(uids) == sorted(ds.SOPInstanceUID for ds in sorted_mr)


def test_seg_label_volume_reads_back_unchanged(seg, sorted_mr, labels, tmp_path):
    seg = hd.seg.segread(_write(seg, tmp_path / "seg.dcm"))
    volume = seg.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in sorted_mr], combine_segments=True
    )
    np.testing.assert_array_equal(volume, labels)


def test_seg_segments_describe_the_lungs_and_the_algorithm(seg):
    left, right = seg.SegmentSequence
    assert (left.SegmentNumber, left.SegmentLabel) == (1, "Left lung")
    assert (right.SegmentNumber, right.SegmentLabel) == (2, "Right lung")
    assert left.SegmentedPropertyTypeCodeSequence[0].CodeValue == "44029006"
    assert right.SegmentedPropertyTypeCodeSequence[0].CodeValue == "3341006"
    for segment in (left, right):
        category = segment.SegmentedPropertyCategoryCodeSequence[0]
        assert (category.CodeValue, category.CodingSchemeDesignator) == ("123037004", "SCT")
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == ALGO_SEG.name
        assert algorithm.AlgorithmVersion == ALGO_SEG.version
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
        assert segment.TrackingID == segment.SegmentLabel
        assert pydicom.uid.UID(segment.TrackingUID).is_valid
    assert list(left.RecommendedDisplayCIELabValue) != list(right.RecommendedDisplayCIELabValue)


# --------------------------------------------------------------------------
# Lung SR
# --------------------------------------------------------------------------


def test_lung_sr_volumes_equal_the_inputs_and_reference_the_segments(lung_sr, seg, tmp_path):
    sr = hd.sr.srread(_write(lung_sr, tmp_path / "lung.dcm"))
    groups = sr.content.get_volumetric_roi_measurement_groups()
    volumes = {}
    for group in groups:
        label = str(group.tracking_identifier)
        (volume,) = group.get_measurements(name=VOLUME)
        assert volume.unit.value == "mL"
        volumes[label] = volume.value
        (seg_ref,) = [
            i for i in group[0].ContentSequence
            if i.ValueType == "IMAGE" and i.ConceptNameCodeSequence[0].CodeValue == "121191"
        ]
        expected_segment = 1 if label == "Left lung" else 2
        assert seg_ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert seg_ref.ReferencedSOPSequence[0].ReferencedSegmentNumber == expected_segment
        # The group and the SEG segment share their tracking UID.
        assert group.tracking_uid == seg.SegmentSequence[expected_segment - 1].TrackingUID
    assert volumes == {"Left lung": 31.25, "Right lung": 27.5}


def test_each_lungs_outline_and_volume_share_the_segments_tracking_uid(lung_sr, seg, tmp_path):
    sr = hd.sr.srread(_write(lung_sr, tmp_path / "lung.dcm"))
    volumetric = {
        str(g.tracking_identifier): g.tracking_uid
        for g in sr.content.get_volumetric_roi_measurement_groups()
    }
    planar = {
        str(g.tracking_identifier): g.tracking_uid
        for g in sr.content.get_planar_roi_measurement_groups()
    }
    segments = {str(s.SegmentLabel): s.TrackingUID for s in seg.SegmentSequence}
    assert volumetric == planar == segments
    assert len(set(segments.values())) == 2


def test_ohif_draws_each_lung_outline_labelled_with_lung_and_volume(lung_sr):
    """One merged measurement per lung, with the outline, drawn as
    "Volume: 31.25 mL" (once), the outline's area and the lung."""
    measurements = {
        m["tracking_identifier"]: m for m in _ohif_measurements(lung_sr).values()
    }
    assert set(measurements) == {"Left lung", "Right lung"}
    for lung, volume in (("Left lung", 31.25), ("Right lung", 27.5)):
        measurement = measurements[lung]
        assert [s.GraphicType for s in measurement["scoords"]] == ["POLYLINE"]
        drawn = measurement["drawn"]
        assert drawn[0] == f"Volume: {volume:.2f} mL"
        assert drawn[1].startswith("Area: ") and drawn[1].endswith(" mm2")
        assert drawn[2] == f"363698007: {lung}"
        assert sum(line.startswith("Volume") for line in drawn) == 1


def test_lung_sr_outlines_each_lung_on_its_largest_slice(lung_sr, sorted_mr, labels, tmp_path):
    sr = hd.sr.srread(_write(lung_sr, tmp_path / "lung.dcm"))
    groups = sr.content.get_planar_roi_measurement_groups()
    assert {str(g.tracking_identifier) for g in groups} == {"Left lung", "Right lung"}
    for group in groups:
        value = 1 if str(group.tracking_identifier) == "Left lung" else 2
        areas = (labels == value).sum(axis=(1, 2))
        largest = sorted_mr[int(np.argmax(areas))]
        region = group.roi
        assert region.GraphicType == "POLYLINE"
        points = region.value
        np.testing.assert_array_equal(points[0], points[-1])
        assert len(points) >= 4
        assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
            largest.SOPInstanceUID
        )
        # The outline sits on the lung: its centre lies inside the mask.
        centre_col, centre_row = points[:-1].mean(axis=0)
        mask = labels[int(np.argmax(areas))] == value
        assert mask[int(centre_row), int(centre_col)]
        # The volume is the volumetric group's (same tracking UID); the outline
        # has the area on its slice and names the lung as its finding site.
        assert group.get_measurements(name=VOLUME) == []
        (area,) = group.get_measurements(name=AREA)
        assert area.value == pytest.approx(areas.max() * 1.5 * 1.5)
        (site,) = group.finding_sites
        assert site.value == (LEFT_LUNG if value == 1 else RIGHT_LUNG)


def test_lung_sr_references_every_source_slice_and_the_seg(lung_sr, sorted_mr, seg):
    assert {ds.SOPInstanceUID for ds in sorted_mr} <= _referenced_sops(lung_sr)
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study in lung_sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert evidence == {ds.SOPInstanceUID for ds in sorted_mr} | {seg.SOPInstanceUID}


def _descriptor_values(items) -> dict[tuple[str, str], object]:
    """TID 1602 descriptor items as concept → value (NUM as float, others as text)."""
    values = {}
    for item in items:
        if item.ValueType == "NUM":
            value = float(item.MeasuredValueSequence[0].NumericValue)
        elif item.ValueType == "CODE":
            value = item.ConceptCodeSequence[0].CodeValue
        elif item.ValueType == "UIDREF":
            value = str(item.UID)
        else:
            value = str(item.TextValue)
        values[_code(item)] = value
    return values


def _library(sr: Dataset) -> list[tuple[dict, list[tuple[str, dict]]]]:
    """The Image Library's groups: (group descriptors, [(SOP Instance UID, entry descriptors)])."""
    (library,) = [i for i in sr.ContentSequence if _code(i) == ("111028", "DCM")]
    groups = []
    for group in library.ContentSequence:
        assert _code(group) == ("126200", "DCM")  # Image Library Group
        shared = _descriptor_values(
            i for i in group.ContentSequence if i.RelationshipType == "HAS ACQ CONTEXT"
        )
        entries = [
            (i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID,
             _descriptor_values(i.get("ContentSequence", [])))
            for i in _children(group, "CONTAINS", "IMAGE")
        ]
        groups.append((shared, entries))
    return groups


def _library_descriptors(sr: Dataset) -> dict[str, dict]:
    """Every image's descriptors as a reader applies them: its group's, then its own."""
    return {
        uid: {**shared, **own}
        for shared, entries in _library(sr)
        for uid, own in entries
    }


@pytest.mark.parametrize("name", ["lung-sr", "cxr-sr"])
def test_image_library_holds_highdicoms_descriptors_for_every_image(
    name, all_objects, sorted_mr, cr
):
    sources = sorted_mr if name == "lung-sr" else [cr]
    described = _library_descriptors(all_objects[name])
    assert list(described) == [ds.SOPInstanceUID for ds in sources]
    for ds in sources:
        assert described[ds.SOPInstanceUID] == _descriptor_values(
            hd.sr.ImageLibraryEntryDescriptors(ds)
        )


def test_lung_sr_image_library_states_shared_descriptors_once(lung_sr, sorted_mr):
    """One group for the series: matrix, spacing, orientation and thickness on the group,
    only the slice position (here z) on each entry. highdicom's own ImageLibrary repeats all
    of them in every entry (about 16 items per slice), which made a 60-slice report slow to
    build, copy and encode."""
    ((shared, entries),) = _library(lung_sr)
    assert ("110910", "DCM") in shared and ("111026", "DCM") in shared  # rows, spacing
    assert {key for _, own in entries for key in own} == {("110903", "DCM")}  # position z
    library_items = sum(1 for _ in _walk(
        [i for i in lung_sr.ContentSequence if _code(i) == ("111028", "DCM")]
    ))
    assert library_items <= 2 * len(sorted_mr) + 20


def test_image_library_groups_slices_by_descriptor_layout(tmp_path):
    """Descriptors that differ between slices move to the entries; a slice with another
    layout (here SpacingBetweenSlices present) gets its own group. Nothing is lost."""
    mr = make_mr_series()
    for ds in mr:
        if ds.InstanceNumber % 2:
            ds.SliceThickness = 3.0
    odd = next(ds for ds in mr if ds.InstanceNumber == 5)
    odd.SpacingBetweenSlices = 2.5
    labels = make_labels()
    seg = lung_segmentation(mr, labels, ALGO_SEG)
    sr = lung_report(mr, seg, LungVolumes(left_ml=1.0, right_ml=2.0), ALGO_SEG)
    groups = _library(sr)
    assert [len(entries) for _, entries in groups] in ([N_SLICES - 1, 1], [1, N_SLICES - 1])
    described = _library_descriptors(sr)
    for ds in mr:
        assert described[ds.SOPInstanceUID] == _descriptor_values(
            hd.sr.ImageLibraryEntryDescriptors(ds)
        )
    errors, warnings = _dciodvfy(_write(sr, tmp_path / "sr.dcm"))
    assert (errors, warnings) == ([], [])
    assert isinstance(hd.sr.srread(tmp_path / "sr.dcm").content, hd.sr.MeasurementReport)


def test_image_library_falls_back_to_highdicoms_layout_for_unknown_descriptors(
    mr, seg, monkeypatch
):
    """A descriptor the writer cannot read from the header (e.g. one a newer highdicom adds)
    keeps highdicom's layout: every descriptor in every entry."""
    known = dict(image_library.DESCRIPTOR_ATTRIBUTES)
    del known[("DCM", "110903")]  # Image Position (Patient) Z
    monkeypatch.setattr(image_library, "DESCRIPTOR_ATTRIBUTES", known)
    sr = lung_report(mr, seg, LungVolumes(left_ml=1.0, right_ml=2.0), ALGO_SEG)
    ((shared, entries),) = _library(sr)
    assert shared == {}
    for ds in mr:
        assert dict(entries)[ds.SOPInstanceUID] == _descriptor_values(
            hd.sr.ImageLibraryEntryDescriptors(ds)
        )


def test_lung_sr_names_the_device_observer_and_procedure(lung_sr):
    items = {
        i.ConceptNameCodeSequence[0].CodeMeaning: i for i in lung_sr.ContentSequence
    }
    assert items["Device Observer Name"].TextValue == ALGO_SEG.name
    assert items["Device Observer Manufacturer"].TextValue == "cradle"
    assert items["Device Observer Model Name"].TextValue == ALGO_SEG.version
    assert items["Procedure reported"].ConceptCodeSequence[0].CodeValue == "6007000"


def test_lung_sr_accepts_a_seg_read_from_disk_and_a_volume_mapping(mr, seg, tmp_path):
    from_disk = hd.seg.segread(_write(seg, tmp_path / "seg.dcm"))
    sr = lung_report(mr, from_disk, {"left": 31.25, "right": 27.5}, ALGO_SEG)
    assert sr.SOPInstanceUID == lung_report(
        mr, seg, LungVolumes(31.25, 27.5), ALGO_SEG
    ).SOPInstanceUID


# --------------------------------------------------------------------------
# CXR SR
# --------------------------------------------------------------------------


def _evaluation(sr: Dataset, code_value: str) -> list[Dataset]:
    return [i for i in _qualitative_evaluations(sr) if _code(i)[0] == code_value]


def _properties(item: Dataset) -> dict[str, tuple[float, str]]:
    """HAS PROPERTIES NUM children: code value -> (value, unit code value)."""
    return {
        _code(num)[0]: (
            float(num.MeasuredValueSequence[0].NumericValue),
            num.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue,
        )
        for num in _children(item, "HAS PROPERTIES", "NUM")
    }


def _algorithm_names(item: Dataset) -> list[str]:
    modifiers = _children(item, "HAS CONCEPT MOD", "TEXT")
    return [i.TextValue for i in modifiers if _code(i)[0] == "111001"]  # Algorithm Name


def test_cxr_sr_states_the_view_in_qualitative_evaluations(cxr_sr):
    (view,) = _evaluation(cxr_sr, "111031")  # Image View
    assert view.ValueType == "TEXT" and view.TextValue == "chest AP"
    assert _properties(view) == {"122157": (pytest.approx(97.0), "%")}
    assert _algorithm_names(view) == [ALGO_CXR.name]
    assert _evaluation(cxr_sr, "121106") == []  # every finding ran: nothing to say "not applicable" of
    # The view is no measurement group: OHIF would fail on a group without a region.
    assert {m["tracking_identifier"] for m in _ohif_measurements(cxr_sr).values()} == {
        "BPD risk (moderate/severe)"
    }


def test_cxr_finding_with_region_is_a_planar_roi_with_probability_threshold_and_call(cxr_sr):
    (group,) = _measurement_groups(cxr_sr)
    assert _text(group, "112039") == ["BPD risk (moderate/severe)"]
    assert _num_values(group, "122157") == [pytest.approx(71.0)]  # Probability, %
    assert _num_values(group, "122411") == [pytest.approx(50.0)]  # Threshold Value, %
    units = {
        i.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue
        for i in group.ContentSequence if i.ValueType == "NUM"
    }
    assert units == {"%"}
    calls = {
        i.ConceptNameCodeSequence[0].CodeValue: i.ConceptCodeSequence[0].CodeValue
        for i in group.ContentSequence if i.ValueType == "CODE"
    }
    assert calls["121071"] == "67569000"  # Finding
    assert calls["67569000"] == "10828004"  # Positive


def test_cxr_finding_without_region_is_a_qualitative_evaluation(cxr_sr, cr):
    (pneumonia,) = _evaluation(cxr_sr, "233604007")
    assert pneumonia.ValueType == "CODE"
    assert pneumonia.ConceptCodeSequence[0].CodeValue == "260385009"  # Negative
    assert _properties(pneumonia) == {
        "122157": (pytest.approx(12.0), "%"),
        "122411": (pytest.approx(35.0), "%"),
    }
    assert _algorithm_names(pneumonia) == [ALGO_CXR.name]
    # Its label says no more than its code, so there is no comment.
    assert _children(pneumonia, "HAS PROPERTIES", "TEXT") == []
    assert cr.SOPInstanceUID in _referenced_sops(cxr_sr)
    evidence = cxr_sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == cr.SOPInstanceUID


def _assert_only_the_image_assessed(sr: Dataset, image: Dataset) -> None:
    """The report's one measurement group is the image assessed: its whole outline, no finding,
    nothing measured (OHIF opens a TID 1500 report only with a group it can place)."""
    (group,) = _measurement_groups(sr)
    assert _text(group, "112039") == [IMAGE_ASSESSED]
    (scoord,) = [i for i in group.ContentSequence if i.ValueType == "SCOORD"]
    columns, rows = float(image.Columns), float(image.Rows)
    assert list(scoord.GraphicData) == [0, 0, columns, 0, columns, rows, 0, rows, 0, 0]
    (source,) = scoord.ContentSequence
    assert source.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == image.SOPInstanceUID
    assert not [i for i in group.ContentSequence if i.ValueType == "NUM" or _code(i)[0] == "121071"]
    assert _document_containers(sr)[1:] == [("126010", "DCM"), ("C0034375", "UMLS")]


def test_region_less_finding_keeps_its_label_as_a_comment(all_objects):
    sr = all_objects["cxr-sr-no-orientation"]  # both findings without a region
    _assert_only_the_image_assessed(sr, make_cr(with_orientation=False))
    (bpd,) = _evaluation(sr, "67569000")
    assert bpd.ConceptCodeSequence[0].CodeValue == "10828004"  # Positive
    (label,) = _children(bpd, "HAS PROPERTIES", "TEXT")
    assert (_code(label)[0], label.TextValue) == ("121106", "BPD risk (moderate/severe)")
    assert _properties(bpd)["122157"] == (pytest.approx(71.0), "%")


def test_cxr_finding_region_becomes_a_closed_planar_roi_on_the_radiograph(cxr_sr, cr, tmp_path):
    sr = hd.sr.srread(_write(cxr_sr, tmp_path / "cxr.dcm"))
    (group,) = sr.content.get_planar_roi_measurement_groups()
    assert str(group.tracking_identifier) == "BPD risk (moderate/severe)"
    region = group.roi
    assert region.GraphicType == "POLYLINE"
    np.testing.assert_array_equal(region.value[0], region.value[-1])
    np.testing.assert_array_equal(
        region.value[:4], [[200, 150], [320, 150], [320, 300], [200, 300]]
    )
    reference = region.ContentSequence[0].ReferencedSOPSequence[0]
    assert reference.ReferencedSOPInstanceUID == cr.SOPInstanceUID
    (probability,) = group.get_measurements(name=PROBABILITY)
    assert probability.value == pytest.approx(71.0)
    assert probability.unit == PERCENT


def test_ohif_draws_the_region_with_probability_and_threshold_in_percent(cxr_sr):
    (measurement,) = _ohif_measurements(cxr_sr).values()
    assert measurement["drawn"] == ["Probability: 71.00 %", "Threshold Value: 50.00 %"]


def test_probability_in_percent_keeps_the_model_output(cr):
    view = ViewResult(label="chest AP", probability=0.57, is_frontal_chest=True)
    square = np.array([[10, 10], [50, 10], [50, 50]], float)
    finding = Finding(PNEUMONIA, 0.123456789, 0.3, False, region=square)
    sr = cxr_report(cr, view, [finding], ALGO_CXR)
    (group,) = _measurement_groups(sr)
    assert _num_values(group, "122157") == [pytest.approx(12.345679, abs=1e-9)]
    (view_item,) = _evaluation(sr, "111031")
    assert _properties(view_item)["122157"] == (57.0, "%")  # not 56.99999999999999


def test_non_frontal_view_states_the_view_and_reports_no_findings(non_frontal_sr, cr):
    _assert_only_the_image_assessed(non_frontal_sr, cr)
    (view,) = _evaluation(non_frontal_sr, "111031")
    assert view.TextValue == "abdomen AP"
    assert _properties(view) == {"122157": (pytest.approx(88.0), "%")}
    comments = [item.TextValue for item in _evaluation(non_frontal_sr, "121106")]
    assert comments == ["BPD risk (moderate/severe): not applicable (not a frontal chest film)",
                        "Pneumonia: not applicable (not a frontal chest film)"]
    assert len(_qualitative_evaluations(non_frontal_sr)) == 3
    names = {i.ConceptNameCodeSequence[0].CodeValue for i in _walk(non_frontal_sr.ContentSequence)}
    assert "122411" not in names  # no threshold, so no finding measurement
    assert "121071" not in names  # no Finding
    assert [i.ValueType for i in _walk(non_frontal_sr.ContentSequence)].count("SCOORD") == 1


def test_view_model_is_identified_when_it_differs(cr):
    view_model = AlgorithmIdentity(name="cradle-view", version="view-2")
    view = ViewResult(
        label="chest AP", probability=0.9, is_frontal_chest=True, algorithm=view_model
    )
    sr = cxr_report(cr, view, _findings(), ALGO_CXR)
    (view_item,) = _evaluation(sr, "111031")
    assert _algorithm_names(view_item) == ["cradle-view"]
    (pneumonia,) = _evaluation(sr, "233604007")
    assert _algorithm_names(pneumonia) == [ALGO_CXR.name]


def test_algorithm_is_identified_once_per_group_and_evaluation(all_objects):
    for name in SR_NAMES:
        sr = all_objects[name]
        for group in _measurement_groups(sr):
            names = [
                i for i in group.ContentSequence
                if i.ConceptNameCodeSequence[0].CodeValue == "111001"  # Algorithm Name
            ]
            assert len(names) == 1
        for item in _qualitative_evaluations(sr):
            if _code(item)[0] != "121106":  # the comment is about the view
                assert len(_algorithm_names(item)) == 1, name


# --------------------------------------------------------------------------
# Secondary Capture summary
# --------------------------------------------------------------------------


def test_summary_image_is_marked_and_shows_the_overlay(cxr_sc, lung_sc, cr, sorted_mr, tmp_path):
    for sc, source in ((cxr_sc, cr), (lung_sc, sorted_mr[7])):
        sc = pydicom.dcmread(_write(sc, tmp_path / "sc.dcm"))
        assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        assert sc.BurnedInAnnotation == "YES"
        assert "NOT FOR DIAGNOSIS" in sc.ImageComments
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert sc.PhotometricInterpretation == "RGB"
        assert max(sc.Rows, sc.Columns) >= 512  # the 64x64 MR slice is enlarged
        pixels = sc.pixel_array
        # The banner is drawn in yellow on the top rows.
        assert np.any(np.all(pixels[:40] == (255, 220, 0), axis=-1))
    mr_pixels = lung_sc.pixel_array
    for rgb in ((66, 135, 245), (245, 150, 40)):  # both lung outlines
        assert np.any(np.all(mr_pixels == rgb, axis=-1))
    assert list(lung_sc.PatientOrientation) == ["L", "P"]  # from ImageOrientationPatient


def test_summary_image_is_deterministic_and_has_its_own_uids(cr, cxr_sc, cxr_sr):
    overlay = np.zeros((512, 512), np.uint8)
    overlay[150:300, 200:320] = 1
    again = summary_image(cr, overlay, CXR_SUMMARY_LINES, ALGO_CXR, pipeline="cxr")
    assert _bytes(again) == _bytes(cxr_sc)
    assert cxr_sc.SeriesInstanceUID not in (cxr_sr.SeriesInstanceUID, cr.SeriesInstanceUID)
    with pytest.raises(LabelVolumeError, match="shape"):
        summary_image(cr, overlay[:-1], [], ALGO_CXR, pipeline="cxr")


def test_lung_summary_image_is_in_the_study_with_its_own_deterministic_uids(
    lung_sc, lung_sr, seg, sorted_mr, labels
):
    again = summary_image(
        sorted_mr[7], labels[7], ["Left lung 31.3 mL", "Right lung 27.5 mL"], ALGO_SEG,
        pipeline="lung-mri",
    )
    assert _bytes(again) == _bytes(lung_sc)
    assert lung_sc.StudyInstanceUID == sorted_mr[0].StudyInstanceUID
    others = [lung_sr, seg, sorted_mr[7]]
    assert lung_sc.SeriesInstanceUID not in {ds.SeriesInstanceUID for ds in others}
    assert lung_sc.SOPInstanceUID not in {ds.SOPInstanceUID for ds in others}
    assert lung_sc.SeriesNumber == LUNG_SC_SERIES_NUMBER
    # Another model version: another series, so the PACS keeps both apart.
    v4 = summary_image(
        sorted_mr[7], labels[7], [], AlgorithmIdentity("cradle-lung-seg", "lung-seg-4"),
        pipeline="lung-mri",
    )
    assert v4.SeriesInstanceUID != lung_sc.SeriesInstanceUID


@pytest.mark.parametrize("name", ["cxr-sc", "lung-sc"])
def test_summary_image_is_marked_as_ai_output_in_its_header(name, all_objects):
    sc = all_objects[name]
    assert sc.SeriesDescription.startswith("cradle AI: summary, not for diagnosis")
    assert sc.ImageComments == "AI OUTPUT - NOT FOR DIAGNOSIS"
    assert sc.DerivationDescription.startswith("AI OUTPUT - NOT FOR DIAGNOSIS")
    assert (sc.BurnedInAnnotation, sc.ConversionType) == ("YES", "WSD")
    assert list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert sc.Manufacturer == "cradle"


def test_lung_volumes_accept_the_synthetic_generators_mapping():
    volumes = LungVolumes.coerce({"left": 31.25, "right": 27.5, "total": 58.75})
    assert volumes == LungVolumes(left_ml=31.25, right_ml=27.5)


# --------------------------------------------------------------------------
# Determinism and UIDs
# --------------------------------------------------------------------------


def test_result_uid_is_deterministic_and_depends_on_every_part():
    base = ("1.2.3.4", "lung-mri", "lung-seg-3", "seg-series")
    uid = result_uid(*base)
    assert uid == result_uid(*base)
    assert uid.is_valid and len(uid) <= 64
    for i in range(4):
        changed = list(base)
        changed[i] += "x"
        assert result_uid(*changed) != uid
    with pytest.raises(ValueError):
        result_uid("", "lung-mri", "lung-seg-3", "seg-series")


def test_reruns_give_identical_bytes(cr, mr, labels, cxr_sr, seg, lung_sr):
    view = ViewResult(label="chest AP", probability=0.97, is_frontal_chest=True)
    assert _bytes(cxr_report(cr, view, _findings(), ALGO_CXR)) == _bytes(cxr_sr)
    shuffled = list(reversed(mr))  # another arrival order, same series
    seg_again = lung_segmentation(shuffled, labels, ALGO_SEG)
    assert _bytes(seg_again) == _bytes(seg)
    sr_again = lung_report(shuffled, seg_again, LungVolumes(31.25, 27.5), ALGO_SEG)
    assert _bytes(sr_again) == _bytes(lung_sr)


def test_new_model_version_gives_new_uids(cr, mr, labels, cxr_sr, seg, lung_sr):
    view = ViewResult(label="chest AP", probability=0.97, is_frontal_chest=True)
    cxr_v4 = cxr_report(cr, view, _findings(), AlgorithmIdentity("cradle-cxr-bpd", "bpd-4"))
    seg_algo_v4 = AlgorithmIdentity("cradle-lung-seg", "lung-seg-4")
    seg_v4 = lung_segmentation(mr, labels, seg_algo_v4)
    sr_v4 = lung_report(mr, seg_v4, LungVolumes(31.25, 27.5), seg_algo_v4)
    for old, new in ((cxr_sr, cxr_v4), (seg, seg_v4), (lung_sr, sr_v4)):
        assert new.SeriesInstanceUID != old.SeriesInstanceUID
        assert new.SOPInstanceUID != old.SOPInstanceUID
    # A combined tag (view + finding models) also drives the UIDs.
    tagged = cxr_report(cr, view, _findings(), ALGO_CXR, model_version_tag="view-2+bpd-3")
    assert tagged.SOPInstanceUID != cxr_sr.SOPInstanceUID
    uids = {cxr_sr.SeriesInstanceUID, seg.SeriesInstanceUID, lung_sr.SeriesInstanceUID}
    assert len(uids) == 3


def test_content_datetime_can_be_passed_in(cr):
    view = ViewResult(label="chest AP", probability=0.97, is_frontal_chest=True)
    when = dt.datetime(2024, 3, 5, 10, 30, 0)
    sr = cxr_report(cr, view, [], ALGO_CXR, content_datetime=when)
    assert (str(sr.ContentDate), str(sr.ContentTime)) == ("20240305", "103000")


# --------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------


def test_label_volume_must_match_the_series(mr, labels):
    with pytest.raises(LabelVolumeError, match="shape"):
        lung_segmentation(mr, labels[:-1], ALGO_SEG)
    with pytest.raises(LabelVolumeError, match="shape"):
        lung_segmentation(mr, labels[:, :, :-1], ALGO_SEG)
    bad = labels.copy()
    bad[0, 0, 0] = 3
    with pytest.raises(LabelVolumeError, match=r"\[3\]"):
        lung_segmentation(mr, bad, ALGO_SEG)
    with pytest.raises(LabelVolumeError, match="integer"):
        lung_segmentation(mr, labels.astype(np.float32), ALGO_SEG)


def test_series_must_be_one_consistent_series(mr, labels):
    other = make_mr_series()
    other[0] = copy.deepcopy(other[0])
    other[0].SeriesInstanceUID = generate_uid()
    with pytest.raises(SourceImageError, match="SeriesInstanceUID"):
        sort_series(other)
    duplicate = [*mr[:-1], copy.deepcopy(mr[0])]
    duplicate[-1].SOPInstanceUID = generate_uid()
    with pytest.raises(SourceImageError, match="position"):
        sort_series(duplicate)
    no_geometry = [copy.deepcopy(ds) for ds in mr]
    del no_geometry[3].ImagePositionPatient
    with pytest.raises(SourceImageError, match="ImagePositionPatient"):
        lung_segmentation(no_geometry, labels, ALGO_SEG)
    with pytest.raises(SourceImageError, match="empty"):
        sort_series([])


def test_sort_series_orders_along_the_slice_normal(mr, sorted_mr):
    assert [ds.SOPInstanceUID for ds in sort_series(mr)] == [
        ds.SOPInstanceUID for ds in sorted_mr
    ]


def test_bad_findings_and_regions_are_rejected(cr):
    view = ViewResult(label="chest AP", probability=0.97, is_frontal_chest=True)
    triangle_outside = np.array([[0, 0], [600, 0], [600, 10]])
    outside = Finding(PNEUMONIA, 0.5, 0.5, True, region=triangle_outside)
    with pytest.raises(RegionError, match="outside"):
        cxr_report(cr, view, [outside], ALGO_CXR)
    overshoot = np.array([[-0.4, 10], [512.3, 10], [512.3, 40]])  # resampling rounding
    sr = cxr_report(
        cr, view, [Finding(PNEUMONIA, 0.5, 0.5, True, region=overshoot)], ALGO_CXR
    )
    (scoord,) = [i for i in _walk(sr.ContentSequence) if i.ValueType == "SCOORD"]
    assert min(scoord.GraphicData) >= 0 and max(scoord.GraphicData) <= 512
    line = Finding(PNEUMONIA, 0.5, 0.5, True, region=np.array([[0, 0], [10, 10]]))
    with pytest.raises(RegionError, match="three"):
        cxr_report(cr, view, [line], ALGO_CXR)
    with pytest.raises(WriterInputError, match="probability"):
        Finding(PNEUMONIA, 1.5, 0.5, True)
    with pytest.raises(WriterInputError, match="repeat"):
        cxr_report(cr, view, [_findings()[1], _findings()[1]], ALGO_CXR)
    with pytest.raises(WriterInputError, match="volumes_ml"):
        LungVolumes.coerce({"left": 1.0})
    with pytest.raises(WriterInputError, match="non-negative"):
        LungVolumes.coerce({"left": -1.0, "right": 2.0})
    with pytest.raises(WriterInputError, match="version"):
        AlgorithmIdentity(name="x", version="")


# --------------------------------------------------------------------------
# Against the colleague's synthetic generator (training.synth), when present
# --------------------------------------------------------------------------


def _synth():
    synth = pytest.importorskip("training.synth")
    if not all(hasattr(synth, f) for f in ("make_mr_series", "make_cxr", "lung_volumes_ml")):
        pytest.skip("training.synth lacks make_mr_series/make_cxr/lung_volumes_ml")
    return synth


def test_writers_accept_synthetic_mr_series(tmp_path):
    synth = _synth()
    series, labels = synth.make_mr_series(np.random.default_rng(3), shape=(16, 64, 64))
    ordered = sort_series(series)
    aligned = labels[[series.index(ds) for ds in ordered]]  # labels follow sort_series order
    seg = lung_segmentation(series, aligned, ALGO_SEG)
    volumes = synth.lung_volumes_ml(series, labels)
    sr = lung_report(series, seg, volumes, ALGO_SEG)
    for name, ds in (("seg", seg), ("sr", sr)):
        assert _dciodvfy(_write(ds, tmp_path / f"{name}.dcm")) == ([], [])
    read_back = hd.seg.segread(tmp_path / "seg.dcm").get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in ordered], combine_segments=True
    )
    np.testing.assert_array_equal(read_back, aligned)
    found = {
        str(g.tracking_identifier): g.get_measurements(name=VOLUME)[0].value
        for g in hd.sr.srread(tmp_path / "sr.dcm").content.get_volumetric_roi_measurement_groups()
    }
    assert found == {"Left lung": volumes["left"], "Right lung": volumes["right"]}


@pytest.mark.parametrize("modality, photometric", [("CR", "MONOCHROME1"), ("DX", "MONOCHROME2")])
def test_writers_accept_synthetic_radiographs(modality, photometric, tmp_path):
    synth = _synth()
    image = synth.make_cxr(
        np.random.default_rng(5), modality=modality, photometric=photometric, size=512
    )
    view = ViewResult(label="chest_frontal", probability=0.9, is_frontal_chest=True)
    sr = cxr_report(image, view, _findings(), ALGO_CXR)
    sc = summary_image(image, None, CXR_SUMMARY_LINES, ALGO_CXR, pipeline="cxr")
    for name, ds in (("sr", sr), ("sc", sc)):
        assert _dciodvfy(_write(ds, tmp_path / f"{name}.dcm")) == ([], [])


def test_a_class_call_states_the_called_class_with_each_classs_probability(class_call_sr, cr):
    (call,) = _evaluation(class_call_sr, "233604007")
    assert call.ValueType == "CODE" and _value_code(call) == ("53084003", "SCT")
    assert _properties(call) == {"17621005": (pytest.approx(20.0), "%"), "53084003": (pytest.approx(70.0), "%"),
                                 "75570004": (pytest.approx(10.0), "%")}
    assert _algorithm_names(call) == [ALGO_CXR.name]
    _assert_only_the_image_assessed(class_call_sr, cr)  # no region: OHIF opens it on the image


def test_bone_age_is_a_number_in_months_beside_the_chronological_age(bone_age_sr):
    (estimate,) = _evaluation(bone_age_sr, "37362-1")
    assert estimate.ValueType == "TEXT" and estimate.TextValue == "96.5 months; age 90.0 months"
    assert _properties(estimate) == {"37362-1": (pytest.approx(96.5), "mo"), "30525-0": (pytest.approx(90.0), "mo")}
    assert _algorithm_names(estimate) == [ALGO_CXR.name]
    (fracture,) = _evaluation(bone_age_sr, "125605004")
    assert _value_code(fracture) == ("260385009", "SCT")  # negative
    procedure = [i for i in _walk(bone_age_sr.ContentSequence) if _code(i)[0] == "121058"]
    assert [_value_code(i) for i in procedure] == [("168537006", "SCT")]
    assert bone_age_sr.SeriesDescription.startswith("cradle AI: radiograph")


def test_results_of_each_kind_refuse_what_a_writer_cannot_state():
    with pytest.raises(WriterInputError, match="at least two classes"):
        ClassCall(PNEUMONIA, ((PNEUMONIA, 1.0),))
    with pytest.raises(WriterInputError, match="probability of Pneumonia"):
        ClassCall(PNEUMONIA, ((PNEUMONIA, 1.2), (PNEUMONIA, 0.1)))
    with pytest.raises(WriterInputError, match="finite number"):
        Estimate(BONE_AGE.code, float("nan"), BONE_AGE.unit)


# --------------------------------------------------------------------------
# Reports whose regions come from untrained models, and lungs not found
# --------------------------------------------------------------------------


def test_every_hot_spot_part_gets_an_outline_with_an_area(cr):
    """Several parts, one at the image's edge and one of a single model pixel: each a closed
    polygon inside the image, enclosing an area, the largest first."""
    heat = hot_spot_heat_map(cr)
    parts = hot_spot_polygons(heat)
    assert len(parts) == 3
    areas = [polygon_area(p[:-1].astype(float)) for p in parts]
    assert areas == sorted(areas, reverse=True) and min(areas) > 0
    cell = 512 / 128
    assert areas[-1] == pytest.approx(cell**2)  # the one-pixel part: the square around it
    for part in parts:
        assert np.array_equal(part[0], part[-1])
        assert part.min() >= 0 and part.max() <= 512
        np.testing.assert_array_equal(closed_polygon(part, cr), part)
    edge = parts[1]
    assert edge[:, 0].min() <= cell and edge[:, 1].max() >= 512 - cell
    assert hot_spot_polygons(HeatMap(np.zeros_like(heat.values), heat.letterbox)) == []


def test_cxr_sr_draws_every_hot_spot_and_states_the_finding_without_one(all_objects):
    sr = all_objects["cxr-sr-hot-spots"]
    placed = {m["tracking_identifier"] for m in _ohif_measurements(sr).values()}
    assert placed == {"Pneumonia hot spot 1", "Pneumonia hot spot 2", "Pneumonia hot spot 3"}
    (bpd,) = _evaluation(sr, "67569000")
    assert bpd.ConceptCodeSequence[0].CodeValue == "10828004"  # Positive, in words


def test_cxr_sr_without_a_region_opens_on_the_image_assessed(all_objects, cr):
    sr = all_objects["cxr-sr-no-finding"]
    _assert_only_the_image_assessed(sr, cr)
    calls = {_code(i)[0]: i.ConceptCodeSequence[0].CodeValue
             for i in _qualitative_evaluations(sr) if i.ValueType == "CODE"}
    assert calls == {"67569000": "260385009", "233604007": "260385009"}  # both Negative


def test_a_lung_not_found_is_stated_in_words_without_a_volume(all_objects, tmp_path):
    sr = all_objects["lung-sr-right-not-found"]
    read = hd.sr.srread(_write(sr, tmp_path / "lung.dcm"))
    volumes = {
        str(g.tracking_identifier): g.get_measurements(name=VOLUME)[0].value
        for g in read.content.get_volumetric_roi_measurement_groups()
    }
    assert volumes == {"Left lung": 30.0}
    assert {m["tracking_identifier"] for m in _ohif_measurements(sr).values()} == {"Left lung"}
    (comment,) = _evaluation(sr, "121106")
    assert comment.TextValue == NOT_FOUND_TEXT.format(lung="Right lung")


def test_no_lung_found_opens_on_the_middle_slice(all_objects, sorted_mr):
    sr = all_objects["lung-sr-none-found"]
    _assert_only_the_image_assessed(sr, sorted_mr[len(sorted_mr) // 2])
    texts = sorted(i.TextValue for i in _evaluation(sr, "121106"))
    assert texts == [NOT_FOUND_TEXT.format(lung="Left lung"), NOT_FOUND_TEXT.format(lung="Right lung")]


def test_a_volume_for_an_empty_segment_is_refused(mr, labels):
    left_only = np.where(labels == 2, 0, labels).astype(np.uint8)
    seg = lung_segmentation(mr, left_only, ALGO_SEG)
    with pytest.raises(WriterInputError, match="Right lung: volume 12.5 mL"):
        lung_report(mr, seg, LungVolumes(left_ml=30.0, right_ml=12.5), ALGO_SEG)


def test_a_lung_of_one_voxel_is_outlined_around_its_pixel():
    mask = np.zeros((8, 8), np.uint8)
    mask[3, 5] = 1
    np.testing.assert_array_equal(
        largest_outline(mask), [[5, 3], [6, 3], [6, 4], [5, 4], [5, 3]]
    )
    mask[3, 2:7] = 1  # a line one pixel high
    assert polygon_area(largest_outline(mask)[:-1].astype(float)) == 5.0


def test_groups_without_image_coordinates_are_refused():
    """A group OHIF would merge into a measurement without a SCOORD (TID 1501 here)."""
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="Bone age"),
    )
    with pytest.raises(WriterInputError, match="Bone age"):
        check_viewable([group])


def test_region_repeats_are_dropped_and_a_flat_region_refused(cr):
    square = np.array([[10, 10], [10, 10], [50, 10], [50, 50], [50, 50], [10, 50], [10, 10]])
    np.testing.assert_array_equal(
        closed_polygon(square, cr), [[10, 10], [50, 10], [50, 50], [10, 50], [10, 10]]
    )
    with pytest.raises(RegionError, match="area"):
        closed_polygon(np.array([[0, 0], [10, 10], [20, 20]]), cr)
