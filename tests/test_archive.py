"""The archive at scale and over time: the disk watermark (0xA700 on a real small file system, storing
again after pruning), ``cradle archive prune`` (what is kept, ``--dry-run --json``, the audit trail,
consistency through SIGKILL) and a manifest told of pruned studies."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from cradle.archive import prune
from node.server import Listener
from storage.archive import Archive
from storage.audit import configure_audit
from storage.db import open_configured_index, transaction
from storage.disk import DiskSpace
from storage.ingest import Ingest
from storage.models import (
    DispatchState, Instance, Job, JobState, PrunedStudy, PruneState, Send, Series, SeriesState, Study, StudyLabel,
)
from test_storage import file_bytes, header_of, make_image
from training.manifests import read_manifest

ROOT = Path(__file__).resolve().parents[1]
OLD = dt.datetime(2020, 1, 1)


def prune_args(**overrides: object) -> argparse.Namespace:
    return argparse.Namespace(**{"dry_run": False, "json": True, "include_labelled": False,
                                 "include_model_studies": False, **overrides})


def run_prune(settings: Settings, capsys: pytest.CaptureFixture, **overrides: object) -> dict:
    capsys.readouterr()
    assert prune(prune_args(**overrides), settings) == 0
    return json.loads(capsys.readouterr().out)


def archive_studies(settings: Settings, count: int, *, size: int = 32, jobs: bool = False) -> list[str]:
    """``count`` single-instance CR studies, complete, archived in 2020; with ``jobs`` each has a job
    done and sent (its results delivered)."""
    sessions = open_configured_index(settings.storage)
    ingest = Ingest(Archive(settings.storage.archive_dir, fsync=False), sessions)
    uids = []
    for _ in range(count):
        ds = make_image(size=size)
        result = ingest.store(file_bytes(ds), header_of(ds), transfer_syntax_uid=ExplicitVRLittleEndian)
        uids.append(ds.StudyInstanceUID)
        with transaction(sessions) as session:
            session.execute(update(Series).where(Series.id == result.series_pk).values(state=SeriesState.complete))
            session.execute(update(Study).where(Study.id == result.study_pk).values(created_at=OLD))
            if jobs:
                job = Job(series_pk=result.series_pk, pipeline="cxr", state=JobState.done,
                          dispatch_state=DispatchState.sent)
                session.add(job)
                session.flush()
                session.add(Send(job_pk=job.id, destination="pacs", sop_uid=ds.SOPInstanceUID, status=0))
    sessions.kw["bind"].dispose()
    return uids


def study_rows(sessions: sessionmaker[Session]) -> set[str]:
    with sessions() as session:
        return set(session.scalars(select(Study.study_uid)))


def study_dirs(settings: Settings) -> set[str]:
    root = Path(settings.storage.archive_dir)
    return {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}


# --- what is kept ----------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def any_index(request: pytest.FixtureRequest, node_settings: Settings) -> Settings:
    if request.param == "postgresql":
        node_settings.storage.database_url = request.getfixturevalue("pg_url")
    return node_settings


def test_prune_keeps_labelled_model_and_undelivered_studies_and_says_what_it_deletes(
        any_index: Settings, capsys: pytest.CaptureFixture) -> None:
    node_settings = any_index
    node_settings.retention.max_age_days = 30
    configure_audit(node_settings.audit_path(), "archive prune")
    eligible, labelled, trained, undelivered, young = archive_studies(node_settings, 5, jobs=True)
    sessions = open_configured_index(node_settings.storage)
    with transaction(sessions) as session:
        pks = {uid: pk for uid, pk in session.execute(select(Study.study_uid, Study.id))}
        session.add(StudyLabel(study_pk=pks[labelled], task="bpd", value=1.0))
        session.execute(update(Job).where(Job.series_pk.in_(select(Series.id).where(
            Series.study_pk == pks[undelivered]))).values(dispatch_state=DispatchState.failed))
        session.execute(update(Study).where(Study.id == pks[young]).values(created_at=dt.datetime.now()))
    manifest = Path(node_settings.models_dir) / "bpd" / "reports" / "v1" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"task": "bpd", "entries": [
        {"uid": "1.2.3", "study_uid": trained, "split": "dev"}, {"uid": "1.2.4", "study_uid": eligible,
                                                                 "split": "test"}]}))
    with sessions() as session:
        # one instance a study; sizes differ by a byte or two with the lengths of the generated UIDs
        size = dict(session.execute(select(Study.study_uid, Instance.file_size).join(
            Series, Instance.series_pk == Series.id).join(Study, Series.study_pk == Study.id)).all())

    # the manifest protects its studies: "eligible" is in it too, so nothing is deleted yet
    assert run_prune(node_settings, capsys, dry_run=True)["studies"] == 0
    manifest.write_text(json.dumps({"task": "bpd", "entries": [{"uid": "1.2.3", "study_uid": trained,
                                                                "split": "dev"}]}))
    dry = run_prune(node_settings, capsys, dry_run=True)
    assert (dry["studies"], dry["bytes"], dry["study_uids"], dry["dry_run"]) == (1, size[eligible], [eligible], True)
    assert len(study_rows(sessions)) == 5 and len(study_dirs(node_settings)) == 5   # nothing changed

    done = run_prune(node_settings, capsys)
    assert (done["studies"], done["bytes"], done["by_rule"]) == (1, size[eligible], {"max_age_days": 1})
    assert study_rows(sessions) == study_dirs(node_settings) == {labelled, trained, undelivered, young}
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 4
        assert session.scalar(select(func.count()).select_from(Send)) == 4

    told = run_prune(node_settings, capsys, include_labelled=True, include_model_studies=True)
    assert sorted(told["study_uids"]) == sorted([labelled, trained])
    assert study_rows(sessions) == study_dirs(node_settings) == {undelivered, young}
    with sessions() as session:
        read = read_manifest(manifest, session)
        assert read["pruned"] == {"studies": 1, "instances": 1, "study_uids": [trained]}
        assert session.scalar(select(func.count()).select_from(StudyLabel)) == 0
    events = [json.loads(line) for line in node_settings.audit_path().read_text().splitlines()]
    pruned = [e for e in events if e["event"] == "study.pruned"]
    assert sorted(e["study_uid"] for e in pruned) == sorted([eligible, labelled, trained])
    assert all(e["bytes"] == size[e["study_uid"]] and e["instances"] == 1 for e in pruned)
    sessions.kw["bind"].dispose()


# --- a crash in the middle -------------------------------------------------------------------


def _config_file(settings: Settings, path: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "storage": {"archive_dir": str(settings.storage.archive_dir), "database_url": settings.storage.database_url},
        "models_dir": str(settings.models_dir), "retention": {"max_age_days": 30},
        "logging": {"audit_file": str(settings.audit_path())},
    }))
    return path


def test_prune_killed_midway_leaves_everything_consistent_and_finishes_on_the_next_run(
        node_settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """SIGKILL while ``cradle archive prune`` deletes: every study is then whole (rows, files, jobs) or
    marked ``pruning`` (at most the one it was at); no file outlives its rows unmarked, so nothing is
    ever indexed back; the next prune finishes the marked one and the rest."""
    uids = archive_studies(node_settings, 60, jobs=True)
    config = _config_file(node_settings, tmp_path / "cradle.yaml")
    trail = node_settings.audit_path()
    command = [sys.executable, "-m", "cradle.cli", "archive", "prune", "--json", "--config", str(config)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if trail.exists() and trail.read_text().count('"study.pruned"') >= 5:
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL

    sessions = open_configured_index(node_settings.storage)
    with sessions() as session:
        marked = set(session.scalars(select(PrunedStudy.study_uid).where(PrunedStudy.state == PruneState.pruning)))
        jobs = session.scalar(select(func.count()).select_from(Job))
    rows, files = study_rows(sessions), study_dirs(node_settings)
    assert 0 < len(uids) - len(rows) < len(uids), "the kill did not land in the middle"
    assert len(marked) <= 1
    assert files - rows == set() and rows - files <= marked   # no file without rows; rows lose files only marked
    assert jobs == len(rows)                                  # a job per remaining study, none orphaned

    node_settings.retention.max_age_days = 30
    configure_audit(trail, "archive prune")
    summary = run_prune(node_settings, capsys)                  # the next prune, in this process
    assert summary["resumed"] == len(marked) and summary["studies"] == len(rows - marked)
    assert study_rows(sessions) == study_dirs(node_settings) == set()
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0
        assert session.scalar(select(func.count()).select_from(Instance)) == 0
        assert set(session.scalars(select(PrunedStudy.study_uid).where(PrunedStudy.state == PruneState.pruned))
                   ) == set(uids)
    audited = {json.loads(line)["study_uid"] for line in trail.read_text().splitlines() if '"study.pruned"' in line}
    assert audited == set(uids)  # every deletion in the trail (a study resumed may appear twice)
    sessions.kw["bind"].dispose()


# --- the disk watermark on a real small file system ------------------------------------------


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted for the test (needs CAP_SYS_ADMIN, as root in this container)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def c_store(port: int, ds) -> int:  # noqa: ANN001 - a pydicom Dataset
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="CRADLE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def test_the_watermark_refuses_with_0xa700_before_the_disk_fills_and_pruning_makes_room(
        node_settings: Settings, small_filesystem: Path, capsys: pytest.CaptureFixture) -> None:
    """On a 1 MiB file system: stores until the next one would cross ``storage.min_free_bytes``, then
    0xA700 with nothing written; ``prune`` with ``retention.target_free_bytes`` deletes the oldest
    eligible studies, only as many as needed; the sender's retry is then stored."""
    node_settings.storage.archive_dir = small_filesystem
    node_settings.storage.min_free_bytes = 512 * 1024
    node_settings.retention.target_free_bytes = 640 * 1024
    node_settings.routing.rules = []                      # no rule matches: every complete study is eligible
    disk = DiskSpace(small_filesystem)
    stored: list[str] = []
    with Listener(node_settings):
        refused = None
        for _ in range(40):                               # 40 × 32 KiB would fill 1 MiB
            ds = make_image(size=128)
            status = c_store(node_settings.node.port, ds)
            if status == 0xA700:
                refused = ds
                break
            assert status == 0x0000
            stored.append(ds.StudyInstanceUID)
        assert refused is not None and len(stored) >= 5
        assert disk.free_bytes() >= node_settings.storage.min_free_bytes   # stopped before the watermark
        assert not (small_filesystem / refused.StudyInstanceUID).exists()  # nothing written for it
        sessions = open_configured_index(node_settings.storage)
        with transaction(sessions) as session:
            assert session.scalar(select(func.count()).select_from(Instance)) == len(stored)
            session.execute(update(Series).values(state=SeriesState.complete))
            for day, uid in enumerate(stored):            # arrival order, a day apart
                session.execute(update(Study).where(Study.study_uid == uid)
                                .values(created_at=OLD + dt.timedelta(days=day)))
        missing = node_settings.retention.target_free_bytes - disk.free_bytes()
        summary = run_prune(node_settings, capsys)
        deleted = summary["studies"]
        assert summary["by_rule"] == {"target_free_bytes": deleted} and 0 < deleted < len(stored)
        assert summary["study_uids"] == stored[:deleted]                   # the oldest first
        assert summary["bytes"] >= missing > summary["bytes"] - summary["bytes"] // deleted  # no more than needed
        assert disk.free_bytes() >= node_settings.retention.target_free_bytes
        assert c_store(node_settings.node.port, refused) == 0x0000     # the sender's retry now succeeds
    assert study_rows(sessions) == study_dirs(node_settings) == set(stored[deleted:]) | {refused.StudyInstanceUID}
    sessions.kw["bind"].dispose()


# --- the bulk helper of the scale benchmark, at a small size ---------------------------------


def test_the_bulk_fill_writes_consistent_rows_the_node_carries_on_after(any_index: Settings) -> None:
    from benchmarks.index_fill import Shape, fill_url
    from storage.index import counts
    from training.datasets import _radiograph_rows

    shape = Shape(instances=60, mr_every=3, mr_slices=10, label_every=4)
    filled, _ = fill_url(any_index.storage.database_url, shape)
    assert (filled["instances"], filled["studies"], filled["labelled_studies"]) == (60, 15, 4)
    sessions = open_configured_index(any_index.storage)
    ingest = Ingest(Archive(any_index.storage.archive_dir, fsync=False), sessions)
    ds = make_image()
    ingest.store(file_bytes(ds), header_of(ds), transfer_syntax_uid=ExplicitVRLittleEndian)  # ids continue
    with sessions() as session:
        assert counts(session) == {"patients": 9, "studies": 16, "series": 16, "instances": 61, "jobs": {"done": 15}}
        labelled_cr = session.scalar(
            select(func.count()).select_from(Instance).join(Series).join(StudyLabel, StudyLabel.study_pk == Series.study_pk)
            .where(Series.modality == "CR"))
        assert labelled_cr == 3  # the 1st, 5th, 9th and 13th studies are labelled; the 9th is MR
        assert len(list(_radiograph_rows(session, labelled_for="bpd"))) == labelled_cr
    sessions.kw["bind"].dispose()


def test_archive_check_command_reads_only_unless_told_to_repair(node_settings: Settings,
                                                                 capsys: pytest.CaptureFixture) -> None:
    from cradle.archive import check, check_state_file

    _, lost = archive_studies(node_settings, 2)
    shutil.rmtree(Path(node_settings.storage.archive_dir) / lost)
    args = argparse.Namespace(repair=False, restart=True, json=True)
    capsys.readouterr()
    assert check(args, node_settings) == 1                         # a problem found, nothing changed
    report = json.loads(capsys.readouterr().out)
    assert (report["rows_checked"], report["rows_without_file"], report["repaired"]) == (2, 1, 0)
    sessions = open_configured_index(node_settings.storage)
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 2
    assert check(argparse.Namespace(repair=True, restart=False, json=True), node_settings) == 0
    assert json.loads(capsys.readouterr().out)["repaired"] == 1
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 1
    assert not check_state_file(node_settings).exists()
    sessions.kw["bind"].dispose()
