"""Golden bytes of the SR, SEG and Secondary Capture writers for fixed inputs.

Every result object cradle writes must be reproducible: the same model on the same
source gives the same bytes (so a PACS replaces an earlier result). These tests pin
the exact bytes, as sha256 of the Part 10 file, of each kind of object for fixed
synthetic inputs built by the helpers of ``test_writers``.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from pydicom import Dataset, dcmwrite

from inference.codes import PNEUMONIA
from inference.results import Finding, LungVolumes, ViewResult
from inference.secondary_capture import summary_image
from inference.seg import lung_segmentation
from inference.sr.lung import lung_report
from inference.sr.radiograph import cxr_report
from test_writers import (
    ALGO_CXR,
    BONE_AGE,
    NOT_APPLICABLE,
    PNEUMONIA_BY_TYPE,
    ALGO_SEG,
    CXR_SUMMARY_LINES,
    _findings,
    make_cr,
    make_labels,
    make_mr_series,
)

# Recorded from the pre-split writers (inference/writers.py). Change a digest only
# deliberately, for a change in output bytes that is intended and reviewed. The radiograph SRs
# changed with issue #14: no "findings (not) evaluated" comment (the pipeline states each task not
# applicable instead); the class call and bone age variants were added then. Also with issue #14
# (OHIF's SR viewport): a report without regions gains the "Image assessed" group (no-finding,
# non-frontal, class call, bone age), and a lung the model did not find is stated in words
# instead of a volume group without an outline (right-lung-absent).
GOLDEN_SHA256 = {
    "cxr-sr-no-finding": "c8a6aa8e9453b07ea0ebf8ab5c8ff43b3cfec351bf8b7bd37c5ec82e3034415f",
    "cxr-sr-one-finding-with-region": "14a4ffdabc0d8b876d380e53d314cc8cf08a9b5229acd5b99f5c286dde005022",
    "cxr-sr-several-findings": "7db80f5fb5f0e3fee4e4c63747d8a6e3ab1a813d005257b3f3b93509ff4f9397",
    "cxr-sr-non-frontal": "10fe307e0af896c1ce6eae6354653d0f4a9cf0186b8d7342841b738d2bfcd299",
    "cxr-sr-class-call": "b159a77d6f93fda8a2890b894a7a02c72ab9085074cf1637879567c5e15fd9e4",
    "cxr-sr-bone-age": "982a8dd26656fb92d4f74e14149f387ffe01e977db73ca5c08c4df0dc642ac8b",
    "lung-seg": "c41af8d7ef85e1d96b9394757100e8c94936693983ccbe4e615b0a9009d10957",
    "lung-sr": "e6ef451b1fe1af20daf522b86648bd79af5063298fc46c889710ce70bbedd2a4",
    "lung-seg-right-lung-absent": "279a7593c04f5a0357a74eab1f9a64f864deb99800427135dd001aa345a0ca3f",
    "lung-sr-right-lung-absent": "a6d336e8877e14eb2ce73a7ec33e52375c2e68f98c13213aa2c320ebdb886e72",
    "cxr-sc": "9d163eb7282c8493465a5cb7b1e2cd1608723c6aa1c2d50564f4c6203ccf8920",
    "cxr-sc-no-overlay": "e67885a2243f16623881ef3f3c3b9fb55bb54abee38c307f0fa72643196e315a",
    "lung-sc": "1da72a7161fdf7b3c2242b212988e02057292bd742384abaa467c87f5afb9bdf",
}

FRONTAL = ViewResult(label="chest AP", probability=0.97, is_frontal_chest=True)
NON_FRONTAL = ViewResult(label="abdomen AP", probability=0.88, is_frontal_chest=False)
VOLUMES = LungVolumes(left_ml=31.25, right_ml=27.5)


def _one_finding_with_region() -> list[Finding]:
    triangle = np.array([[100.5, 120.0], [260.25, 140.0], [180.0, 330.75]])
    return [
        Finding(code=PNEUMONIA, probability=0.83, threshold=0.5, positive=True, region=triangle)
    ]


def _sha256(ds: Dataset) -> str:
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def _cxr_objects() -> dict[str, Dataset]:
    cr = make_cr()
    overlay = np.zeros((512, 512), np.uint8)
    overlay[150:300, 200:320] = 1
    return {
        "cxr-sr-no-finding": cxr_report(cr, FRONTAL, [], ALGO_CXR),
        "cxr-sr-one-finding-with-region": cxr_report(
            cr, FRONTAL, _one_finding_with_region(), ALGO_CXR
        ),
        "cxr-sr-several-findings": cxr_report(cr, FRONTAL, _findings(), ALGO_CXR),
        "cxr-sr-non-frontal": cxr_report(cr, NON_FRONTAL, [], ALGO_CXR, not_applicable=NOT_APPLICABLE, chest=False),
        "cxr-sr-class-call": cxr_report(cr, FRONTAL, [PNEUMONIA_BY_TYPE], ALGO_CXR),
        "cxr-sr-bone-age": cxr_report(cr, NON_FRONTAL, [BONE_AGE], ALGO_CXR, chest=False),
        "cxr-sc": summary_image(cr, overlay, CXR_SUMMARY_LINES, ALGO_CXR, pipeline="cxr"),
        "cxr-sc-no-overlay": summary_image(cr, None, CXR_SUMMARY_LINES, ALGO_CXR, pipeline="cxr"),
    }


def _lung_objects() -> dict[str, Dataset]:
    series, labels = make_mr_series(), make_labels()
    seg = lung_segmentation(series, labels, ALGO_SEG)
    left_only = np.where(labels == 2, 0, labels).astype(np.uint8)  # the right lung is not found
    seg_absent = lung_segmentation(series, left_only, ALGO_SEG)
    key_slice = sorted(series, key=lambda ds: float(ds.ImagePositionPatient[2]))[7]
    return {
        "lung-seg": seg,
        "lung-sr": lung_report(series, seg, VOLUMES, ALGO_SEG),
        "lung-seg-right-lung-absent": seg_absent,
        "lung-sr-right-lung-absent": lung_report(
            series, seg_absent, LungVolumes(left_ml=31.25, right_ml=0.0), ALGO_SEG
        ),
        "lung-sc": summary_image(
            key_slice, labels[7], ["Left lung 31.3 mL", "Right lung 27.5 mL"], ALGO_SEG,
            pipeline="lung-mri",
        ),
    }


@pytest.fixture(scope="module")
def digests() -> dict[str, str]:
    objects = {**_cxr_objects(), **_lung_objects()}
    return {name: _sha256(ds) for name, ds in objects.items()}


def test_every_golden_object_is_built(digests):
    assert set(digests) == set(GOLDEN_SHA256)


@pytest.mark.parametrize("name", sorted(GOLDEN_SHA256))
def test_written_bytes_equal_the_golden_digest(name, digests):
    assert digests[name] == GOLDEN_SHA256[name], (
        f"{name}: the written bytes changed; if the change is intended, record the new "
        "digest deliberately"
    )
