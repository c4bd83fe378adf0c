"""Issue 4 end to end: DCMTK storescu → `cradle serve` → real pipelines with imported test weights →
SR / SEG at a destination SCP, each validated by dciodvfy and read back with highdicom."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import JPEG2000Lossless

from benchmarks.latency import cradle, import_test_weights, write_config
from conftest import free_port, require
from cradle.demo import PACS_AE, Pacs
from training.synth import generate

SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run([require("dciodvfy"), str(path)], capture_output=True, text=True)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def wait_for(predicate, timeout: float) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


@pytest.mark.slow
def test_storescu_to_cradle_serve_to_destination(tmp_path: Path) -> None:
    storescu = shutil.which("storescu", path="/usr/bin") or require("storescu")
    node_port, pacs_port = free_port(), free_port()
    config = write_config(tmp_path, node_port, pacs_port, quiet_seconds=2, destination_ae=PACS_AE)
    import_test_weights(config, tmp_path)
    summary = generate(tmp_path / "synth", n_cxr=10, n_mri=1, seed=3, cxr_size=256, mri_shape=(12, 64, 64),
                       adult_share=0.1, non_chest_share=0.0)
    truth = json.loads(summary.truth_json.read_text())
    radiographs = [s for s in truth["studies"] if s["kind"] == "radiograph"]
    neonatal = next(s for s in radiographs if s["PhotometricInterpretation"] == "MONOCHROME1"
                    and s["age_days"] == 1)
    adult = next(s for s in radiographs if s["age_days"] > 365 * 18)
    j2k = tmp_path / "cr-jpeg2000.dcm"
    source = dcmread(summary.outdir / neonatal["path"])
    source.compress(JPEG2000Lossless, generate_instance_uid=False)
    source.save_as(j2k)
    mr_files = sorted(summary.mri_series_dirs[0].glob("*.dcm"))

    pacs = Pacs(tmp_path / "pacs", pacs_port)
    pacs.start()
    node = subprocess.Popen([sys.executable, "-m", "cradle.cli", "serve", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "serve.log", "w"))
    try:
        def push(*files: Path, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
            return subprocess.run([storescu, *flags, "-aet", "MODALITY", "-aec", "CRADLE", "127.0.0.1",
                                   str(node_port), *map(str, files)], capture_output=True, text=True)

        assert wait_for(lambda: subprocess.run(
            [shutil.which("echoscu", path="/usr/bin") or "echoscu", "-aet", "MODALITY", "-aec", "CRADLE",
             "127.0.0.1", str(node_port)], capture_output=True).returncode == 0, 90)
        assert push(j2k, flags=("-xv",)).returncode == 0
        assert push(*mr_files).returncode == 0
        assert push(summary.outdir / adult["path"]).returncode == 0
        assert wait_for(lambda: len(pacs.received) >= 3, 240), (tmp_path / "serve.log").read_text()[-3000:]
        time.sleep(2)  # nothing more should come: one SR for the CR, SEG + SR for the MR
    finally:
        node.terminate()
        node.wait(timeout=90)
        pacs.stop()

    received = [dcmread(p) for p in pacs.received]
    assert len(received) == 3
    for path in pacs.received:
        assert dciodvfy_errors(path) == []
    srs = [d for d in received if d.SOPClassUID == SR_STORAGE]
    segs = [d for d in received if d.SOPClassUID == SEG_STORAGE]
    assert len(srs) == 2 and len(segs) == 1
    cr_sr = next(d for d in srs if d.StudyInstanceUID == neonatal["StudyInstanceUID"])
    report = hd.sr.srread(pacs.folder / f"{cr_sr.SOPInstanceUID}.dcm")
    assert neonatal["SOPInstanceUID"] in {ref.ReferencedSOPInstanceUID
                                          for item in report.CurrentRequestedProcedureEvidenceSequence
                                          for series in item.ReferencedSeriesSequence
                                          for ref in series.ReferencedSOPSequence}
    seg = hd.seg.segread(pacs.folder / f"{segs[0].SOPInstanceUID}.dcm")
    slice_uids = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in mr_files}
    frame_refs = [f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                  for f in seg.PerFrameFunctionalGroupsSequence]
    assert seg.NumberOfFrames == 2 * len(mr_files)
    assert set(frame_refs) == slice_uids
    assert np.asarray(seg.pixel_array).shape[0] == 2 * len(mr_files)

    status = json.loads(cradle(config, "status", "--json").stdout)
    assert status["instances"] == 1 + len(mr_files) + 1 + 3  # received + the three results archived
    jobs = json.loads(cradle(config, "jobs", "list", "--json").stdout)
    jobs = jobs["jobs"] if isinstance(jobs, dict) else jobs
    assert sorted(job["pipeline"] for job in jobs) == ["cxr", "lung-mri"]
    assert all(job["state"] == "done" for job in jobs)

    from sqlalchemy import select

    from storage.db import open_index
    from storage.models import Series

    with open_index(f"sqlite:///{tmp_path / 'c.db'}")() as session:
        reason = session.scalar(select(Series.routing_reason).where(
            Series.series_uid == adult["SeriesInstanceUID"]))
    assert reason == "patient age above 6570 days for rule pediatric-radiograph"
