"""``cradle demo`` end to end, as a newcomer runs it: a subprocess from the repository, then exact
checks on what its PACS received (counts by SOP Class, dciodvfy, SEG references, lung volumes
against the phantom's truth), its PNG and its summary."""

from __future__ import annotations

import csv
import json
import re
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from pydicom import dcmread

from conftest import require
from inference.registry import ModelRegistry

REPOSITORY = Path(__file__).resolve().parents[1]
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
NEW_RADIOGRAPHS = 3
VOLUME_TOLERANCE = 0.20
"""Largest relative error of a lung volume against the phantom's truth: the demo's small U-Net (64 px,
8 training series, under half a minute of training) draws the lung border a little outside; measured
+11 % to +15 % (left) and +9 % to +10 % (right) over three runs."""


def _cradle() -> list[str]:
    script = Path(sys.executable).parent / "cradle"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "cradle.cli"]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert data.rstrip(b"\x00")[-8:-4] == b"IEND", "PNG without its IEND chunk"
    return width, height


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    dciodvfy = require("dciodvfy")
    workdir = tmp_path / "demo"
    started = time.monotonic()
    result = subprocess.run([*_cradle(), "demo", "--workdir", str(workdir)], cwd=REPOSITORY, capture_output=True,
                            text=True, timeout=1400)
    wall = time.monotonic() - started
    print(f"\n{result.stdout}\ncradle demo wall time: {wall:.0f} s", file=sys.__stderr__)
    log = (workdir / "demo.log").read_text()[-3000:] if (workdir / "demo.log").is_file() else ""
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n{log}"
    assert "SYNTHETIC DEMO - NOT FOR CLINICAL USE" in result.stdout.splitlines()[0]
    assert "SYNTHETIC DEMO - NOT FOR CLINICAL USE" in result.stdout.splitlines()[-1]

    # what the PACS received: one SR per new radiograph, a SEG and an SR for the new MR series
    received = sorted((workdir / "received-at-pacs").glob("*.dcm"))
    datasets = {path: dcmread(path) for path in received}
    assert Counter(str(ds.SOPClassUID) for ds in datasets.values()) == {COMPREHENSIVE_3D_SR: NEW_RADIOGRAPHS + 1,
                                                                        SEG_STORAGE: 1}
    for path in received:
        check = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=120)
        errors = [line for line in (check.stdout + check.stderr).splitlines() if "Error" in line]
        assert not errors, f"{path.name}: {errors}"

    truth = json.loads((workdir / "synthetic" / "truth.json").read_text())
    studies = {s["StudyInstanceUID"]: s for s in truth["studies"]}
    with (workdir / "synthetic" / "labels-training.csv").open(newline="") as handle:
        trained_on = {row["StudyInstanceUID"] for row in csv.DictReader(handle)}

    # the SEG segments the pushed MR series (which no model was trained on), frame by slice
    (seg,) = [ds for ds in datasets.values() if ds.SOPClassUID == SEG_STORAGE]
    mr = studies[seg.StudyInstanceUID]
    assert mr["kind"] == "mr" and mr["StudyInstanceUID"] not in trained_on
    assert [r.SeriesInstanceUID for r in seg.ReferencedSeriesSequence] == [mr["SeriesInstanceUID"]]
    referenced = {frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                  for frame in seg.PerFrameFunctionalGroupsSequence}
    assert referenced <= set(mr["SOPInstanceUIDs"]) and len(referenced) == mr["n_slices"]
    assert {s.SegmentLabel for s in seg.SegmentSequence} == {"Left lung", "Right lung"}

    # the radiograph SRs answer the new day-1 frontal chest films, with a probability each
    radiograph_srs = [ds for ds in datasets.values()
                      if ds.SOPClassUID == COMPREHENSIVE_3D_SR and studies[ds.StudyInstanceUID]["kind"] == "radiograph"]
    assert len({ds.StudyInstanceUID for ds in radiograph_srs}) == NEW_RADIOGRAPHS
    for ds in radiograph_srs:
        study = studies[ds.StudyInstanceUID]
        assert study["view_class"] == "chest_frontal" and study["age_days"] == 1
        assert study["StudyInstanceUID"] not in trained_on

    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["synthetic"] is True and summary["ok"] is True
    assert set(summary["trained"]) == {"view", "bpd", "lung-seg"}
    for task, trained in summary["trained"].items():
        assert trained["promoted"] is True, (task, trained["reason"])
        assert trained["version"] == f"{task}-1"
    chain = summary["trained"]["bpd"]  # the in-domain chain: BPD starts from the view model trained before it
    assert chain["init"] == "view-1" and chain["init_transfer"]["loaded"] == chain["init_transfer"]["wanted"] > 50
    assert ModelRegistry(workdir / "node" / "models").get("bpd", "bpd-1").provenance["init"] == "view-1"
    assert len(summary["radiographs"]) == NEW_RADIOGRAPHS
    for item in summary["radiographs"]:  # read back from the received SRs
        assert item["view"]["label"] == "chest_frontal" and 0 < item["view"]["probability"] <= 100
        bpd = item["findings"]["Bronchopulmonary dysplasia"]
        assert 0 <= bpd["probability"] <= 100 and 0 <= bpd["threshold"] <= 100
        assert bpd["call"] == ("Positive" if bpd["probability"] >= bpd["threshold"] else "Negative")
        assert "bpd-1" in item["models"] and "view-1" in item["models"]
    assert len(re.findall(r"Bronchopulmonary dysplasia: probability \d+ %", result.stdout)) == NEW_RADIOGRAPHS

    # the printed lung volumes against the phantom's truth
    printed = dict(re.findall(r"lung volume, (left|right): ([0-9.]+) mL \(phantom truth", result.stdout))
    assert set(printed) == {"left", "right"}
    for lung, value in printed.items():
        true = mr["lung_volume_ml"][lung]
        assert abs(float(value) - true) <= VOLUME_TOLERANCE * true, (lung, value, true)
        assert summary["mr"]["measured_ml"][lung] == pytest.approx(float(value), abs=0.05)

    png = workdir / "mr-slice-with-seg.png"
    width, height = _png_size(png)
    assert 200 <= width <= 2000 and 200 <= height <= 2000
    assert png.stat().st_size > 5_000
    assert summary["png"] == str(png)
