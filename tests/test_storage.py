"""The archive and the index through ``Ingest``: durable puts, duplicates, failures, a start's
recovery of interrupted writes (the journal), the full check (``cradle archive check``), concurrency. Every test runs on SQLite and on the local PostgreSQL.

Also home of the small DICOM factory the listener and routing tests import (``make_image``).
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import stat
import subprocess
import sys
import threading
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
    MRImageStorage, generate_uid,
)
from sqlalchemy import event, func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from storage.archive import Archive, content_hash
from storage.db import open_index, transaction
from storage.index import InstanceHeader, _get_or_create, counts
from storage.dicomfile import MalformedDataset, check_file
from storage.check import ArchiveCheck, CheckReport
from storage.ingest import Ingest, Outcome, RecoveryReport, TransientStoreError
from storage.models import Instance, Patient, Series

# --- a small DICOM factory (imported by test_listener and test_routing) ------------------------


def make_image(*, modality: str = "CR", sop_class_uid: str = ComputedRadiographyImageStorage,
               study_uid: str | None = None, series_uid: str | None = None, sop_uid: str | None = None,
               birth_date: str = "20260101", study_date: str = "20260102", patient_age: str | None = None,
               patient_id: str = "NEO0001", patient_name: str = "Baby^Test", accession: str = "ACC0001",
               body_part: str | None = "CHEST", series_description: str = "", images_in_acquisition: int | None = None,
               instance_number: int = 1, size: int = 32, fill: int = 0) -> Dataset:
    """A small valid image (explicit VR little endian) with the attributes routing looks at."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class_uid, sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientSex = patient_name, patient_id, "F"
    if birth_date:
        ds.PatientBirthDate = birth_date
    if patient_age:
        ds.PatientAge = patient_age
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), series_uid or generate_uid()
    if study_date:
        ds.StudyDate = study_date
    ds.StudyTime, ds.AccessionNumber, ds.StudyID = "093000", accession, "1"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, instance_number
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if series_description:
        ds.SeriesDescription = series_description
    if images_in_acquisition is not None:
        ds.ImagesInAcquisition = images_in_acquisition
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = bytes([fill % 256, 0]) * (size * size)
    return ds


def make_mr_slice(**kwargs) -> Dataset:  # noqa: ANN003 - make_image's keywords
    return make_image(**{"modality": "MR", "sop_class_uid": MRImageStorage, **kwargs})


def file_bytes(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def header_of(ds: Dataset) -> InstanceHeader:
    return InstanceHeader.from_dataset(ds)


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def index_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def sessions(index_url: str) -> sessionmaker[Session]:
    factory = open_index(index_url)
    yield factory
    factory.kw["bind"].dispose()


@pytest.fixture
def archive(tmp_path: Path) -> Archive:
    store = Archive(tmp_path / "archive")
    store.ensure_root()
    return store


@pytest.fixture
def ingest(archive: Archive, sessions: sessionmaker[Session]) -> Ingest:
    return Ingest(archive, sessions)


def store(ingest: Ingest, ds: Dataset, **kwargs):  # noqa: ANN003, ANN201 - Ingest.store's keywords
    return ingest.store(file_bytes(ds), header_of(ds), transfer_syntax_uid=ExplicitVRLittleEndian, **kwargs)


def temporaries(root: Path) -> list[Path]:
    return list(root.rglob("*.part"))


def check(ingest: Ingest, *, repair: bool = True) -> CheckReport:
    """``cradle archive check [--repair]`` from the beginning."""
    state = ingest.archive.root.parent / "archive-check.json"
    state.unlink(missing_ok=True)
    return ArchiveCheck(ingest, state, repair=repair, progress=False).run()


def journal(root: Path) -> list[Path]:
    return list((root / ".journal").glob("*"))


# --- tests -------------------------------------------------------------------------------------


def test_store_archives_at_the_uid_path_and_indexes(ingest: Ingest, archive: Archive) -> None:
    ds = make_image()
    result = store(ingest, ds, calling_ae_title="MODALITY")
    assert result.outcome is Outcome.stored and result.instance_pk and result.series_pk
    path = archive.root / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    assert path.read_bytes() == file_bytes(ds)
    with ingest.sessions() as session:
        assert counts(session) == {"patients": 1, "studies": 1, "series": 1, "instances": 1, "jobs": {}}
        instance = session.scalar(select(Instance))
        assert (instance.file_path, instance.sha256, instance.calling_ae_title) == (
            f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm",
            content_hash(file_bytes(ds)), "MODALITY")
    assert temporaries(archive.root) == []


def test_parts_are_written_and_hashed_as_one_file(archive: Archive) -> None:
    parts = (b"\x00" * 128 + b"DICM", bytes(range(256)) * 4096)
    stored = archive.put("a/b/c.dcm", parts)
    assert archive.read("a/b/c.dcm") == b"".join(parts)
    assert (stored.size, stored.sha256) == (len(b"".join(parts)), content_hash(b"".join(parts)))


def test_a_forked_child_writes_with_threads_of_its_own(archive: Archive) -> None:
    """Threads do not survive a fork: a child (e.g. a prefork Celery worker) must not wait for the
    parent's hashing and fsync threads."""
    archive.put("a/b/parent.dcm", b"parent")
    busy = threading.Barrier(4)  # four tasks at once: four of the parent's threads exist, idle now
    for done in [archive._background().submit(busy.wait) for _ in range(4)]:
        done.result(timeout=10)
    pid = os.fork()
    if pid == 0:  # the child: report by exit code only
        signal.alarm(20)  # a write waiting for threads that are not there would block for ever
        try:
            archive.put("a/b/child.dcm", b"child")
        except BaseException:  # noqa: BLE001 - any failure is a non-zero exit
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert archive.read("a/b/child.dcm") == b"child"


_WRITER = """
import sys
from pathlib import Path
from storage.archive import Archive
pending = Archive(Path(sys.argv[1])).write("a/b/worker.dcm", b"a result being written")
print("written", flush=True)
sys.stdin.readline()
pending.commit()
pending.retire()
"""

_DYING_WRITER = """
import os, sys
from pathlib import Path
from storage.archive import Archive
Archive(Path(sys.argv[1])).write("a/c/dead.dcm", b"cut short by a crash")
os._exit(0)
"""


def test_the_check_removes_abandoned_temporaries_and_leaves_a_write_in_progress(archive: Archive) -> None:
    """``archive check --repair`` runs while a worker may be storing a result: only temporary files
    nobody holds (their writer died) are removed."""
    abandoned = archive.root / "a" / "b" / ".dead.dcm.0123.part"
    abandoned.parent.mkdir(parents=True)
    abandoned.write_bytes(b"cut short")
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(archive.root)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert writer.stdout.readline().strip() == "written"
        assert Archive(archive.root).remove_temporaries() == 1
        assert [p.name for p in temporaries(archive.root)] != [] and not abandoned.exists()
        writer.communicate("commit\n", timeout=30)
    finally:
        writer.kill()
    assert writer.returncode == 0
    assert archive.read("a/b/worker.dcm") == b"a result being written"
    assert temporaries(archive.root) == []


def test_a_start_recovers_interrupted_writes_only_and_leaves_a_write_in_progress(ingest: Ingest,
                                                                                  archive: Archive) -> None:
    """A start reads the journal of writes in flight, not the archive: the entry of a writer that died
    is recovered (its temporary file removed), the entry of a writer still at work is left alone."""
    root, cwd = str(archive.root), Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", _DYING_WRITER, root], check=True, cwd=cwd, timeout=60)
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, root], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=cwd)
    try:
        assert writer.stdout.readline().strip() == "written"
        assert (len(journal(archive.root)), len(temporaries(archive.root))) == (2, 2)
        assert ingest.recover() == RecoveryReport(interrupted_writes=1, temporaries_removed=1)
        assert [p.parent.name for p in temporaries(archive.root)] == ["b"] and len(journal(archive.root)) == 1
        writer.communicate("commit\n", timeout=30)
    finally:
        writer.kill()
    assert writer.returncode == 0
    assert archive.read("a/b/worker.dcm") == b"a result being written"
    assert temporaries(archive.root) == [] and journal(archive.root) == []
    assert ingest.recover() == RecoveryReport()


def test_identical_resend_is_stored_once(ingest: Ingest, archive: Archive) -> None:
    ds = make_image()
    assert store(ingest, ds).outcome is Outcome.stored
    assert store(ingest, ds).outcome is Outcome.duplicate
    with ingest.sessions() as session:
        assert counts(session)["instances"] == 1
    assert len(archive.files()) == 1


@pytest.mark.parametrize(("policy", "outcome", "kept"), [
    ("keep_first", Outcome.conflict_kept, "first"),
    ("reject", Outcome.conflict_rejected, "first"),
    ("replace", Outcome.conflict_replaced, "second"),
])
def test_conflicting_resend_follows_the_policy(archive: Archive, sessions: sessionmaker[Session],
                                               policy: str, outcome: Outcome, kept: str) -> None:
    ingest = Ingest(archive, sessions, duplicate_policy=policy)
    first = make_image(fill=1)
    second = make_image(study_uid=first.StudyInstanceUID, series_uid=first.SeriesInstanceUID,
                        sop_uid=first.SOPInstanceUID, fill=2)
    store(ingest, first)
    assert store(ingest, second).outcome is outcome
    expected = file_bytes(first if kept == "first" else second)
    assert archive.read(header_of(first).relative_path) == expected
    with sessions() as session:
        assert session.scalar(select(Instance.sha256)) == content_hash(expected)
        assert counts(session)["instances"] == 1


def test_a_replacement_under_other_uids_leaves_one_file_and_the_check_keeps_it(
        archive: Archive, sessions: sessionmaker[Session]) -> None:
    """``replace``: the same SOP Instance UID re-sent under new Study/Series UIDs moves the instance;
    the old file goes at once, and one left by a crash before that is removed by ``archive check
    --repair``, never indexed back over the replacement."""
    ingest = Ingest(archive, sessions, duplicate_policy="replace")
    first = make_image(fill=1)
    moved = make_image(sop_uid=first.SOPInstanceUID, fill=2)
    store(ingest, first)
    assert store(ingest, moved).outcome is Outcome.conflict_replaced
    old, new = header_of(first).relative_path, header_of(moved).relative_path
    assert archive.files() == [new]
    archive.put(old, file_bytes(first))  # as a crash between the row's commit and the removal leaves it
    report = check(ingest)
    assert (report.files_without_row, report.rows_without_file) == (1, 0)
    assert archive.files() == [new]
    with sessions() as session:
        assert list(session.scalars(select(Instance.file_path))) == [new]
        assert session.scalar(select(Instance.sha256)) == content_hash(file_bytes(moved))


def test_a_failing_write_is_transient_and_leaves_nothing(ingest: Ingest, archive: Archive) -> None:
    ds = make_image()
    blocker = archive.root / ds.StudyInstanceUID
    blocker.write_bytes(b"not a directory")  # the study directory cannot be made (works as root too)
    with pytest.raises(TransientStoreError):
        store(ingest, ds)
    with ingest.sessions() as session:
        assert counts(session)["instances"] == 0
    assert temporaries(archive.root) == []
    blocker.unlink()
    assert store(ingest, ds).outcome is Outcome.stored
    assert archive.exists(header_of(ds).relative_path)


def test_check_reconciles_files_and_rows_only_when_asked_to_repair(ingest: Ingest, archive: Archive) -> None:
    kept, lost, unindexed = make_image(), make_image(), make_image()
    store(ingest, kept)
    store(ingest, lost)
    archive.remove(header_of(lost).relative_path)                      # a row without its file
    archive.put(header_of(unindexed).relative_path, file_bytes(unindexed))  # a file without its row
    orphan = archive.root / kept.StudyInstanceUID / kept.SeriesInstanceUID / ".x.dcm.0123.part"
    orphan.write_bytes(b"half a file")                     # an interrupted write from before the journal
    unchanged = check(ingest, repair=False)
    assert (unchanged.temporaries, unchanged.files_without_row, unchanged.rows_without_file,
            unchanged.repaired, unchanged.complete) == (1, 1, 1, 0, True)
    assert orphan.exists() and not archive.exists(header_of(lost).relative_path)
    with ingest.sessions() as session:
        assert counts(session)["instances"] == 2                        # read-only without --repair
    report = check(ingest)
    assert (report.temporaries, report.files_without_row, report.rows_without_file, report.unreadable_files,
            report.repaired) == (1, 1, 1, 0, 3)
    with ingest.sessions() as session:
        paths = set(session.scalars(select(Instance.file_path)))
    assert paths == set(archive.files()) == {header_of(kept).relative_path, header_of(unindexed).relative_path}
    assert temporaries(archive.root) == []


def test_concurrent_stores_all_succeed(ingest: Ingest) -> None:
    """Parallel associations: SQLite write transactions begin IMMEDIATE and wait for each other; on
    PostgreSQL they take turns on the series row. Either way each store counts the instances before
    it, so every count from 1 to 32 is seen once and the completion sees the whole series."""
    study, series = generate_uid(), generate_uid()
    datasets = [make_mr_slice(study_uid=study, series_uid=series, instance_number=i) for i in range(32)]
    for ds in datasets:
        ds.ImagesInAcquisition = len(datasets)
    errors: list[BaseException] = []
    seen: list[int | None] = []

    def push(chunk: list[Dataset]) -> None:
        for ds in chunk:
            try:
                seen.append(store(ingest, ds).series_instances)
            except BaseException as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

    threads = [threading.Thread(target=push, args=(datasets[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(seen) == list(range(1, 33))
    with ingest.sessions() as session:
        assert counts(session) == {"patients": 1, "studies": 1, "series": 1, "instances": 32, "jobs": {}}


def test_a_failed_transaction_leaves_no_row(sessions: sessionmaker[Session]) -> None:
    """A SAVEPOINT (get-or-create) must not commit on its own when the transaction later fails."""
    with pytest.raises(RuntimeError), transaction(sessions) as session:
        _get_or_create(session, Patient, {"patient_key": "|P1|"}, {})
        raise RuntimeError("after the savepoint")
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Patient)) == 0


def test_late_instance_is_reported_as_reopening(ingest: Ingest) -> None:
    first = make_image()
    store(ingest, first)
    with transaction(ingest.sessions) as session:
        series = session.scalar(select(Series))
        series.state = "complete"
        series.completed_at = dt.datetime(2026, 1, 2)
    late = make_image(study_uid=first.StudyInstanceUID, series_uid=first.SeriesInstanceUID, instance_number=2)
    assert store(ingest, late).reopened is True


def test_stored_file_reads_back_as_sent(ingest: Ingest, archive: Archive) -> None:
    ds = make_image(series_description="AP supine")
    store(ingest, ds)
    back = dcmread(archive.absolute(header_of(ds).relative_path))
    assert back.SeriesDescription == "AP supine" and back.PixelData == ds.PixelData


# --- the durable order and the crash windows ---------------------------------------------------


def test_file_is_durable_under_its_name_before_its_row_commits(ingest: Ingest, archive: Archive,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The order the 0x0000 answer relies on: file fsync, rename, directory fsync, then the commit."""
    events: list[str] = []
    lock = threading.Lock()
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        real_fsync(fd)
        with lock:
            events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")

    def replace(src, dst) -> None:  # noqa: ANN001 - os.replace's path types
        real_replace(src, dst)
        with lock:
            events.append("rename")

    ds = make_image()
    archive.put(f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/other.dcm", b"x")  # its directories exist already
    event.listen(ingest.sessions.kw["bind"], "commit", lambda _conn: events.append("commit"))
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    events.clear()
    assert store(ingest, ds).outcome is Outcome.stored
    assert events == ["fsync file", "rename", "fsync dir", "commit"]


def test_a_failed_commit_leaves_a_complete_file_that_the_next_start_indexes(ingest: Ingest, archive: Archive,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The crash window between rename and commit: a complete file without a row, never a torn one."""
    ds = make_image()

    def fail(_conn) -> None:  # noqa: ANN001 - SQLAlchemy connection
        raise OperationalError("COMMIT", {}, Exception("disk I/O error"))

    engine = ingest.sessions.kw["bind"]
    event.listen(engine, "commit", fail)
    with pytest.raises(TransientStoreError):
        store(ingest, ds)
    event.remove(engine, "commit", fail)
    path = header_of(ds).relative_path
    assert archive.read(path) == file_bytes(ds) and temporaries(archive.root) == []
    with ingest.sessions() as session:
        assert counts(session)["instances"] == 0
    assert len(journal(archive.root)) == 1  # the write's entry outlives the failed commit
    assert ingest.recover() == RecoveryReport(interrupted_writes=1, files_reindexed=1)
    assert journal(archive.root) == []
    assert store(ingest, ds).outcome is Outcome.duplicate  # the sender's re-send succeeds, stored once
    with ingest.sessions() as session:
        assert counts(session)["instances"] == 1


def test_check_never_indexes_a_torn_file_and_a_resend_replaces_it(ingest: Ingest, archive: Archive) -> None:
    """Files without rows under their final names: the complete one is indexed; one cut inside its
    pixel data and an empty one (damage from outside, e.g. a disk error) are never indexed, stay on
    disk for an administrator, and a re-send of the instance replaces them."""
    complete, cut, empty = (make_mr_slice(size=128, fill=i) for i in range(3))  # 32 KiB of pixels each
    for ds, content in ((complete, file_bytes(complete)), (cut, file_bytes(cut)[:16384]), (empty, b"")):
        path = archive.absolute(header_of(ds).relative_path)
        path.parent.mkdir(parents=True)
        path.write_bytes(content)
    report = check(ingest)
    assert (report.files_without_row, report.repaired, report.unreadable_files) == (3, 1, 2)
    with ingest.sessions() as session:
        assert set(session.scalars(select(Instance.sop_uid))) == {complete.SOPInstanceUID}
    assert len(archive.files()) == 3
    assert check(ingest).unreadable_files == 2  # still not indexed by the next check
    for ds in (cut, empty):
        assert store(ingest, ds).outcome is Outcome.stored
        assert archive.read(header_of(ds).relative_path) == file_bytes(ds)
    with ingest.sessions() as session:
        assert counts(session)["instances"] == 3
    assert check(ingest) == CheckReport(rows_checked=3, files_checked=3, complete=True)


def test_an_interrupted_check_resumes_where_it_stopped(ingest: Ingest, archive: Archive,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The check records its position after each batch: stopped (Ctrl-C) and started again, it checks
    the rest, not everything again, and counts each row and file once."""
    datasets = [make_image() for _ in range(5)]
    for ds in datasets:
        store(ingest, ds)
    archive.remove(header_of(datasets[3]).relative_path)
    monkeypatch.setattr("storage.check.BATCH", 2)
    state = archive.root.parent / "archive-check.json"
    saves = 0
    real_save = ArchiveCheck._save

    def interrupted(self, position) -> None:  # noqa: ANN001 - the check's position
        nonlocal saves
        real_save(self, position)
        saves += 1
        if saves == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(ArchiveCheck, "_save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ArchiveCheck(ingest, state, progress=False).run()
    assert state.is_file()
    monkeypatch.setattr(ArchiveCheck, "_save", real_save)
    report = ArchiveCheck(ingest, state, progress=False).run()
    assert (report.rows_checked, report.files_checked, report.rows_without_file, report.complete) == (5, 4, 1, True)
    assert not state.exists()


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian])
def test_check_file_accepts_whole_files_and_rejects_every_cut(syntax: str, tmp_path: Path) -> None:
    ds = make_image(size=64)
    ds.file_meta.TransferSyntaxUID = syntax
    whole = file_bytes(ds)
    check_file(whole)
    deflated = syntax == DeflatedExplicitVRLittleEndian  # its last byte may be padding (PS3.5 A.5)
    cuts = sorted({0, 100, 131, 132, 140, 200, len(whole) // 2, len(whole) - (2 if deflated else 1),
                   *range(4096, len(whole), 4096)})
    for length in cuts:
        with pytest.raises(MalformedDataset):
            check_file(whole[:length])
    if not deflated:
        with pytest.raises(MalformedDataset):
            check_file(whole + b"\x00" * 7)  # trailing bytes that are no element


def _sequence_of(tag: int, vr: str, items: int, elements: int) -> Dataset:
    ds = Dataset()
    ds.add_new(tag, vr, [Dataset() for _ in range(items)])
    for item in ds[tag].value:
        for i in range(elements):
            item.add_new(0x00111000 + i, "LO", "")
    return ds


@pytest.mark.parametrize(("tag", "implicit"), [(0x00081140, False), (0x00081140, True), (0x00091001, True)],
                         ids=["explicit SQ", "implicit, SQ by the dictionary", "implicit private, items by their tag"])
def test_element_count_includes_defined_length_items(tag: int, implicit: bool) -> None:
    """pydicom writes sequences and items of defined length: their elements count, exactly."""
    from storage.dicomfile import DatasetLimitExceeded, check_structure
    from test_listener import encode

    ds = _sequence_of(tag, "SQ", items=3, elements=40)
    data = encode(ds, implicit=implicit)
    length_at = 4 if implicit else 8
    assert data[length_at:length_at + 4] != b"\xff\xff\xff\xff"  # the sequence's length is defined
    total = 1 + 3 + 3 * 40  # the sequence, its items, their elements
    check_structure(data, implicit=implicit, little=True, max_elements=total)
    with pytest.raises(DatasetLimitExceeded):
        check_structure(data, implicit=implicit, little=True, max_elements=total - 1)
