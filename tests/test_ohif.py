"""cradle's SEG and SR in a real viewer: the prebuilt OHIF, served by Orthanc, in headless Chromium.

Orthanc (Debian, with its DICOMweb and ServeFolders plugins) serves both the study
(``/dicom-web``) and OHIF's ``dist/`` (``/ohif/``) on one loopback origin; playwright-core
drives Debian's Chromium through ``tests/browser/ohif_check.mjs``, which opens the study,
double-clicks the SEG and the SR thumbnails as a radiologist would, accepts OHIF's prompt
and reads back what OHIF's own services hold. Screenshots and the JSON summary of each
run are kept in ``test-artifacts/ohif/``.

Every shape of SR cradle writes (``studies.SR_VARIANTS``: no finding, one, several from
untrained models' Grad-CAM maps, lungs found or not) must open in OHIF's SR viewport with
each of its regions placed: OHIF 3.13 fails on a TID 1500 report without a region it can
place ("Something went wrong", or only its console line with a black viewport). One
Orthanc serves every variant (module-scoped fixture).

Prerequisites: ``tests/browser/setup.sh`` (Debian orthanc, orthanc-dicomweb, chromium;
``npm ci`` in tests/browser). Without them the tests skip and say what is missing.
Run: ``.venv/bin/pytest -m browser tests/test_ohif.py``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
BROWSER_DIR = ROOT / "tests" / "browser"
ARTIFACTS = ROOT / "test-artifacts" / "ohif"
WAIT_MS = 45_000


def _load(name: str):
    """A module from tests/browser/ by file path (tests/ is not a package)."""
    module_name = f"cradle_browser_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, BROWSER_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


harness = _load("harness")
SR_VARIANTS = _load("studies").SR_VARIANTS


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    missing = harness.missing_prerequisites()
    if missing:
        pytest.skip("browser test prerequisites missing: " + "; ".join(missing))
    with harness.Orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture(scope="module")
def studies():
    return _load("studies")


def _open_in_ohif(orthanc, study, name: str, steps: list[dict]) -> dict:
    orthanc.upload(study.files)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob(f"{name}-*"):
        old.unlink()
    summary = harness.run_ohif_check(
        {
            "url": f"{orthanc.base_url}/ohif/viewer?StudyInstanceUIDs={study.study_uid}",
            "name": name,
            "screenshotDir": str(ARTIFACTS),
            "timeoutMs": WAIT_MS,
            "steps": steps,
        },
        log_path=ARTIFACTS / f"{name}-browser.log",
    )
    (ARTIFACTS / f"{name}-summary.json").write_text(json.dumps(summary, indent=2))
    assert summary["error"] is None, f"browser run failed: {summary['error']}"
    for path in summary["screenshots"]:
        assert Path(path).stat().st_size > 10_000, f"empty screenshot {path}"
    return summary


def _why(summary: dict) -> str:
    """OHIF's own words for a failure: its SR/SEG console lines and page errors."""
    lines = [line for line in summary["console"] if not line.startswith("log: No source mapping")]
    return "\n".join(lines[-12:] + summary["pageErrors"][-5:] + summary["httpErrors"][-5:])


def _check_sr_step(step: dict, summary: dict, roi_labels: list[str]) -> list[dict]:
    """The SR opened without error and every planar ROI was placed on its image."""
    assert step["thumbnail"], "no thumbnail for the SR series in OHIF's study browser"
    parsed = [m for ds in step["state"]["srDisplaySets"] for m in ds["measurements"]]
    no_coords = [f"{m['TrackingIdentifier']} {m['labels']}" for m in parsed if not m["coords"]]
    assert step["errorBoundary"] is None, (
        f"OHIF failed while loading the SR: {step['errorBoundary']}\n"
        f"measurement groups without image coordinates, which OHIF {harness.ohif_version()} "
        f"cannot place (a group that shares its Tracking Unique Identifier with a group "
        f"that has a SCOORD is merged with it): {no_coords}\n{_why(summary)}"
    )
    assert step["reached"], f"OHIF placed nothing from the SR\n{_why(summary)}"
    (sr_display_set,) = step["state"]["srDisplaySets"]
    measurements = sr_display_set["measurements"]
    unplaced = [m["TrackingIdentifier"] for m in measurements if not m["placedOn"]]
    assert not unplaced, (
        f"OHIF left SR measurement groups unplaced: {unplaced}\n{_why(summary)}"
    )
    for label in roi_labels:
        placed = [m for m in measurements if m["TrackingIdentifier"] == label and m["coords"]]
        assert placed, f"no region labelled {label!r} placed; OHIF parsed {measurements}"
    drawn = [a for a in step["state"]["annotations"] if a["toolName"] == "DICOMSRDisplay"]
    assert len(drawn) == len(roi_labels), f"regions drawn: {drawn}"
    return measurements


def test_mr_lung_seg_and_volumes_in_ohif(orthanc, studies, tmp_path):
    """MR: the SEG's two lungs are listed in colour; each lung's outline and volume is drawn.

    The SR opens beside the SEG (1x2 layout, same slice), as a radiologist compares them.
    """
    study = studies.mr_study(tmp_path)
    summary = _open_in_ohif(
        orthanc,
        study,
        "mr",
        [
            {"kind": "seg", "seriesNumber": 9011, "expectText": study.segment_labels},
            {
                "kind": "sr",
                "seriesNumber": 9012,
                "expectText": ["Volume"],
                "layout": {"numRows": 1, "numCols": 2},
                "viewportIndex": 1,
                "alignSlices": True,
                "collapsePanels": ["left", "right"],
            },
        ],
    )
    seg_step, sr_step = summary["steps"]

    # SEG: accepted prompt, both segments listed with the SEG's own display colours.
    assert seg_step["thumbnail"] and seg_step["prompt"], seg_step
    assert seg_step["reached"], f"OHIF loaded no segmentation\n{_why(summary)}"
    assert seg_step["errorBoundary"] is None, seg_step["errorBoundary"]
    (segmentation,) = seg_step["state"]["segmentations"]
    segments = {s["label"]: s for s in segmentation["segments"]}
    assert sorted(segments) == sorted(study.segment_labels)
    for label, rgb in study.segment_rgb.items():
        shown = segments[label]["color"]
        assert shown is not None, f"{label}: no colour in the viewport"
        assert all(abs(a - b) <= 3 for a, b in zip(shown[:3], rgb, strict=True)), (
            f"{label}: OHIF shows {shown[:3]}, the SEG recommends {rgb}"
        )
    assert all(seg_step["textVisible"].values()), f"segment list: {seg_step['textVisible']}"
    assert any(r["visible"] for r in segmentation["representations"]), segmentation

    # SR: each lung's outline placed on its slice, labelled with its volume in mL.
    measurements = _check_sr_step(sr_step, summary, study.roi_labels)
    for side, label in (("left", "Left lung"), ("right", "Right lung")):
        texts = [t for m in measurements if m["TrackingIdentifier"] == label for t in m["labels"]]
        expected = f"Volume: {study.volumes_ml[side]:.2f} mL"
        assert texts[0] == expected, f"{label}: OHIF labels {texts}, expected {expected!r} first"
        assert sum(t.startswith("Volume") for t in texts) == 1, texts  # outline + volume merged
        # OHIF draws the Finding Site as "<SNOMED code>: <meaning>".
        assert any(t.endswith(f": {label}") for t in texts), f"{label} not named: {texts}"
    assert sr_step["textVisible"]["Volume"], "no volume drawn on the image"
    assert any("mL" in text for text in sr_step["state"]["overlayText"])
    assert sr_step["alignedViewports"] == 1, "the SEG viewport was not moved to the SR's slice"


def test_cr_finding_region_in_ohif(orthanc, studies, tmp_path):
    """CR: the finding's region is drawn on the radiograph with its probability.

    The report also states the view and a finding without a region (qualitative
    evaluations), which OHIF must skip rather than fail on.
    """
    study = studies.cr_study(tmp_path)
    summary = _open_in_ohif(
        orthanc,
        study,
        "cr",
        [{"kind": "sr", "seriesNumber": 9001, "expectText": ["Probability"]}],
    )
    (sr_step,) = summary["steps"]
    measurements = _check_sr_step(sr_step, summary, study.roi_labels)
    (finding,) = [m for m in measurements if m["TrackingIdentifier"] == study.roi_labels[0]]
    assert finding["graphicType"] == "POLYLINE"
    assert "Probability: 83.00 %" in finding["labels"], finding
    assert "Threshold Value: 50.00 %" in finding["labels"], finding
    assert sr_step["textVisible"]["Probability"], "no probability drawn on the image"


@pytest.mark.parametrize("variant", SR_VARIANTS, ids=lambda variant: variant.name)
def test_sr_variant_opens_in_the_sr_viewport(orthanc, variant, tmp_path):
    """The SR opens without OHIF's error boundary and OHIF places exactly the report's
    regions: each finding's hot spot or lung outline, or else the image assessed."""
    study = variant.build(tmp_path)
    summary = _open_in_ohif(
        orthanc,
        study,
        f"sr-{variant.name}",
        [{"kind": "sr", "seriesNumber": study.sr_series_number, "expectText": []}],
    )
    (sr_step,) = summary["steps"]
    measurements = _check_sr_step(sr_step, summary, study.roi_labels)
    assert sorted(m["TrackingIdentifier"] for m in measurements) == sorted(study.roi_labels)
