"""The listener against real peers: DCMTK echoscu/storescu and pynetdicom as SCU, over real sockets,
on the real index (no mocks). Counts are exact."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import pytest
import yaml
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid,
)
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification
from sqlalchemy import select

from config.settings import CallingAE, Settings, TLSSettings
from node.server import Listener, storage_sop_classes, supported_contexts
from storage.db import open_index
from storage.index import counts
from storage.models import Instance, Job, Series, SeriesState
from deployment import wait_until
from test_storage import make_image, make_mr_slice

CALLED = "CRADLE"
DCMTK_TIMEOUT = 120


# --- helpers -----------------------------------------------------------------------------------


def dcmtk(tool: str) -> str:
    """The DCMTK program (the virtualenv's bin has pynetdicom's apps under the same names)."""
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(directory) / tool
        if candidate.is_file() and os.access(candidate, os.X_OK):
            version = subprocess.run([str(candidate), "--version"], capture_output=True, text=True, timeout=10)
            if "dcmtk" in (version.stdout + version.stderr).lower():
                return str(candidate)
    pytest.skip(f"DCMTK {tool} is not installed (apt-get install dcmtk)")


def storescu(port: int, files: list[Path], *flags: str, calling: str = "STORESCU",
             check: bool = True) -> subprocess.CompletedProcess:
    command = [dcmtk("storescu"), "-aet", calling, "-aec", CALLED, *flags, "127.0.0.1", str(port), *map(str, files)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=DCMTK_TIMEOUT)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def reuid(source: str, directory: Path) -> Path:
    """A pydicom test file under new Study/Series/SOP Instance UIDs, in its own transfer syntax."""
    ds = dcmread(source)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return write(ds, directory / f"{Path(source).stem}.dcm")


def comparable(ds: Dataset) -> Dataset:
    """The data set without what DCMTK may drop or add in transit: (FFFC,FFFC) padding and group
    lengths; and encapsulated Pixel Data as OB, as DCMTK sends it (one pydicom file says OW)."""
    for element in list(ds):
        if element.tag == 0xFFFCFFFC or element.tag.element == 0x0000:
            del ds[element.tag]
        elif element.VR == "SQ":
            for item in element.value:
                comparable(item)
        elif element.tag == 0x7FE00010 and ds.file_meta.TransferSyntaxUID.is_compressed:
            element.VR = "OB"
    return ds


def same_dataset(sent: Path, stored: Path) -> bool:
    return comparable(dcmread(sent)) == comparable(dcmread(stored))


def index_counts(settings: Settings) -> dict:
    sessions = open_index(settings.storage.database_url)
    try:
        with sessions() as session:
            return counts(session)
    finally:
        sessions.kw["bind"].dispose()


def rows(settings: Settings, *columns):  # noqa: ANN002, ANN201 - SQLAlchemy columns
    sessions = open_index(settings.storage.database_url)
    try:
        with sessions() as session:
            return [tuple(row) for row in session.execute(select(*columns)).all()]
    finally:
        sessions.kw["bind"].dispose()


def job_rows(settings: Settings) -> list[tuple[str, str, str, int, int]]:
    """(Series Instance UID, pipeline, state, generation, job id) of every job."""
    sessions = open_index(settings.storage.database_url)
    try:
        with sessions() as session:
            return [(series, pipeline, state.value, generation, job_id) for series, pipeline, state, generation, job_id
                    in session.execute(select(Series.series_uid, Job.pipeline, Job.state, Job.generation, Job.id)
                                       .join(Job, Job.series_pk == Series.id)).all()]
    finally:
        sessions.kw["bind"].dispose()


def archived(settings: Settings) -> list[Path]:
    return sorted(Path(settings.storage.archive_dir).rglob("*.dcm"))


def temporaries(settings: Settings) -> list[Path]:
    return list(Path(settings.storage.archive_dir).rglob("*.part"))


class Enqueued(list):
    def __call__(self, job_id: int) -> None:
        self.append(job_id)


@pytest.fixture
def enqueued() -> Enqueued:
    return Enqueued()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_index(request: pytest.FixtureRequest, node_settings: Settings) -> Settings:
    """The node's settings on SQLite, then on the local PostgreSQL."""
    if request.param == "postgresql":
        node_settings.storage.database_url = request.getfixturevalue("pg_url")
    return node_settings


@pytest.fixture
def listener(node_settings: Settings, enqueued: Enqueued) -> Iterator[Listener]:
    node = Listener(node_settings, enqueue=enqueued)
    node.start()
    yield node
    node.stop(grace_seconds=5)


@contextlib.contextmanager
def association(port: int, *contexts: tuple[str, str], calling: str = "TESTSCU") -> Iterator:
    ae = AE(ae_title=calling)
    for abstract, syntax in contexts:
        ae.add_requested_context(abstract, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title=CALLED)
    assert assoc.is_established
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def encode(ds: Dataset, implicit: bool = False) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, implicit
    write_dataset(buffer, ds)
    return buffer.getvalue()


def send_raw(assoc, sop_class_uid: str, sop_uid: str, data: bytes,  # noqa: ANN001 - pynetdicom Association
             syntax: str = ExplicitVRLittleEndian) -> Dataset:
    """A C-STORE whose data set bytes we choose (pynetdicom's send_c_store would encode a valid one)."""
    context = next(cx for cx in assoc.accepted_contexts
                   if cx.abstract_syntax == sop_class_uid and cx.transfer_syntax[0] == syntax)
    request = C_STORE()
    request.MessageID, request.Priority = 1, 2
    request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = sop_class_uid, sop_uid
    request.DataSet = BytesIO(data)
    assoc._reactor_checkpoint.clear()  # pause the reactor as send_c_store does, or it takes the answer
    while not assoc._is_paused:
        time.sleep(0.0001)
    try:
        assoc.dimse.send_msg(request, context.context_id)
        _, response = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    return response


# --- association control -----------------------------------------------------------------------


def test_echoscu(listener: Listener, node_settings: Settings) -> None:
    result = subprocess.run([dcmtk("echoscu"), "-aet", "ECHOSCU", "-aec", CALLED, "127.0.0.1",
                             str(node_settings.node.port)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_contexts_cover_the_storage_classes_and_syntaxes() -> None:
    classes = set(storage_sop_classes())
    assert {"1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1.1",
            "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.66.4",
            "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.7"} <= classes
    contexts = supported_contexts()
    assert len(contexts) == len(classes) + 1
    assert all(len(cx.transfer_syntax) >= 30 for cx in contexts[1:])


@pytest.mark.parametrize("calling", ["INTRUDER", "STORESCU@HOST"])
def test_unknown_calling_ae_is_rejected_and_nothing_stored(listener: Listener, node_settings: Settings,
                                                           tmp_path: Path, calling: str) -> None:
    path = write(make_image(), tmp_path / "cr.dcm")
    result = storescu(node_settings.node.port, [path], calling=calling, check=False)
    assert result.returncode != 0 and "Calling AE Title Not Recognized" in result.stderr
    assert archived(node_settings) == [] and index_counts(node_settings)["instances"] == 0


def test_called_ae_and_host_binding_are_checked(node_settings: Settings, enqueued: Enqueued) -> None:
    node_settings.node.allowed_calling_aets = [CallingAE(ae_title="TESTSCU", hosts=["10.9.9.9"])]
    settings = node_settings
    with Listener(settings, enqueue=enqueued):
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", settings.node.port, ae_title=CALLED)
        assert assoc.is_rejected  # right title, wrong host
        assoc = ae.associate("127.0.0.1", settings.node.port, ae_title="SOMEONE")
        assert assoc.is_rejected


def test_empty_allow_list_means_nobody(node_settings: Settings, enqueued: Enqueued) -> None:
    node_settings.node.allowed_calling_aets = []
    with Listener(node_settings, enqueue=enqueued):
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(Verification)
        assert ae.associate("127.0.0.1", node_settings.node.port, ae_title=CALLED).is_rejected


# --- every transfer syntax, in parallel ---------------------------------------------------------

TRANSFER_SYNTAX_FILES = [  # (test file, storescu flag proposing its syntax)
    ("MR_small_implicit.dcm", "-xi"),          # Implicit VR Little Endian
    ("CT_small.dcm", "-xe"),                   # Explicit VR Little Endian
    ("MR_small_bigendian.dcm", "-xb"),         # Explicit VR Big Endian
    ("image_dfl.dcm", "-xd"),                  # Deflated Explicit VR Little Endian
    ("SC_rgb_jpeg_dcmtk.dcm", "-xy"),          # JPEG Baseline
    ("JPEG-LL.dcm", "-xs"),                    # JPEG Lossless SV1
    ("MR_small_jpeg_ls_lossless.dcm", "-xt"),  # JPEG-LS lossless
    ("MR_small_jp2klossless.dcm", "-xv"),      # JPEG 2000 lossless
    ("JPEG2000.dcm", "-xw"),                   # JPEG 2000
    ("MR_small_RLE.dcm", "-xr"),               # RLE Lossless
    ("RG3_J2KR.dcm", "-xv"),                   # pydicom-data: a CR in JPEG 2000 lossless, 0.8 MB
]


def test_storescu_in_every_transfer_syntax_in_parallel(any_index: Settings, listener: Listener,
                                                       node_settings: Settings, tmp_path: Path) -> None:
    sent = {flag_file: reuid(get_testdata_file(flag_file[0]), tmp_path / str(i))
            for i, flag_file in enumerate(TRANSFER_SYNTAX_FILES)}
    port = node_settings.node.port
    with ThreadPoolExecutor(max_workers=4) as pool:  # four associations at a time
        results = list(pool.map(lambda item: storescu(port, [item[1]], item[0][1]), sent.items()))
    assert all(r.returncode == 0 for r in results)
    stored = rows(node_settings, Instance.sop_uid, Instance.transfer_syntax_uid, Instance.file_path)
    assert len(stored) == len(sent) == len(archived(node_settings))
    by_uid = {sop: (syntax, path) for sop, syntax, path in stored}
    archive_dir = Path(node_settings.storage.archive_dir)
    for path in sent.values():
        original = dcmread(path, stop_before_pixels=True)
        syntax, relative = by_uid[original.SOPInstanceUID]
        assert syntax == original.file_meta.TransferSyntaxUID, path.name  # stored as received
        assert relative == f"{original.StudyInstanceUID}/{original.SeriesInstanceUID}/{original.SOPInstanceUID}.dcm"
        assert dcmread(archive_dir / relative).file_meta.TransferSyntaxUID == syntax
        assert same_dataset(path, archive_dir / relative), path.name
    assert index_counts(node_settings) | {"jobs": None} == {
        "patients": len({dcmread(p, stop_before_pixels=True).get("PatientID", "") for p in sent.values()}),
        "studies": len(sent), "series": len(sent), "instances": len(sent), "jobs": None}
    assert temporaries(node_settings) == []


def test_routed_series_get_exactly_their_jobs(any_index: Settings, listener: Listener, node_settings: Settings,
                                              tmp_path: Path, enqueued: Enqueued) -> None:
    study, mr_series = generate_uid(), generate_uid()
    files = {
        "cr": write(make_image(), tmp_path / "cr.dcm"),
        "dx": write(make_image(modality="DX", sop_class_uid=DigitalXRayImageStorageForPresentation,
                               body_part=None), tmp_path / "dx.dcm"),
        "adult": write(make_image(birth_date="19800101", study_date="20250101", patient_id="ADULT1"),
                       tmp_path / "adult.dcm"),
        "ot": write(make_image(modality="OT", sop_class_uid=SecondaryCaptureImageStorage, images_in_acquisition=1),
                    tmp_path / "ot.dcm"),
        **{f"mr{i}": write(make_mr_slice(study_uid=study, series_uid=mr_series, instance_number=i,
                                         images_in_acquisition=3), tmp_path / f"mr{i}.dcm") for i in (1, 2, 3)},
    }
    storescu(node_settings.node.port, list(files.values()))
    uid = {name: dcmread(path, stop_before_pixels=True).SeriesInstanceUID for name, path in files.items()}
    # completion and routing run after the answers (the completion queue): every series completes soon
    wait_until(lambda: {state for (state,) in rows(node_settings, Series.state)} == {SeriesState.complete}, 10,
               "every series complete")
    jobs = job_rows(node_settings)
    assert sorted((series, pipeline, state, generation) for series, pipeline, state, generation, _ in jobs) == sorted(
        [(uid["cr"], "cxr", "queued", 1), (uid["dx"], "cxr", "queued", 1), (uid["mr1"], "lung-mri", "queued", 1)])
    assert sorted(enqueued) == sorted(job_id for *_, job_id in jobs) and len(enqueued) == 3
    reasons = dict(rows(node_settings, Series.series_uid, Series.routing_reason))
    assert reasons[uid["adult"]] == "patient age above 6570 days for rule pediatric-radiograph"
    assert reasons[uid["ot"]] == "no rule matched: modality OT"
    assert index_counts(node_settings) == {"patients": 2, "studies": 5, "series": 5, "instances": 7,
                                           "jobs": {"queued": 3}}


def test_synthetic_studies_end_to_end(listener: Listener, node_settings: Settings, tmp_path: Path,
                                      enqueued: Enqueued) -> None:
    """The colleague's synthetic archive (training.synth): radiographs, an MR series, its SEG."""
    synth = pytest.importorskip("training.synth")
    summary = synth.generate(tmp_path / "synth", n_cxr=6, n_mri=1, seed=3, cxr_size=256, mri_shape=(12, 64, 64))
    files = [*summary.cxr_paths, *sorted(p for d in summary.mri_series_dirs for p in d.glob("*.dcm")),
             *summary.seg_paths]
    storescu(node_settings.node.port, files, "-R")  # propose what the files need (SEG is not a default)
    headers = [dcmread(path, stop_before_pixels=True) for path in files]
    neonatal_radiographs = {ds.SeriesInstanceUID for ds in headers if ds.Modality in ("CR", "DX")
                            and ds.PatientAge.endswith("D")}
    expected = sorted([*((uid, "cxr") for uid in neonatal_radiographs),
                       *((d.name, "lung-mri") for d in summary.mri_series_dirs)])
    wait_until(lambda: len(enqueued) >= len(expected), 10, "the jobs (routed after the answers)")
    assert sorted((series, pipeline) for series, pipeline, *_ in job_rows(node_settings)) == expected
    assert len(enqueued) == len(expected)
    assert index_counts(node_settings)["instances"] == len(files)
    reasons = dict(rows(node_settings, Series.series_uid, Series.routing_reason))
    adults = [ds.SeriesInstanceUID for ds in headers if ds.PatientAge.endswith("Y")]
    assert adults and all("patient age above 6570 days for rule pediatric-radiograph" in reasons[uid] for uid in adults)


def test_series_without_count_completes_after_quiet_period(node_settings: Settings, enqueued: Enqueued,
                                                           tmp_path: Path) -> None:
    node_settings.completion.quiet_seconds, node_settings.completion.poll_seconds = 1.0, 0.1
    study, series = generate_uid(), generate_uid()
    files = [write(make_mr_slice(study_uid=study, series_uid=series, instance_number=i), tmp_path / f"{i}.dcm")
             for i in (1, 2)]
    with Listener(node_settings, enqueue=enqueued):
        storescu(node_settings.node.port, files)
        assert enqueued == []
        deadline = time.monotonic() + 10
        while not enqueued and time.monotonic() < deadline:
            time.sleep(0.1)
    assert len(enqueued) == 1
    assert rows(node_settings, Series.state)[0][0].value == "complete"


# --- statuses ----------------------------------------------------------------------------------


def test_malformed_and_truncated_data_sets_fail_and_the_node_keeps_serving(listener: Listener,
                                                                           node_settings: Settings) -> None:
    cr = "1.2.840.10008.5.1.4.1.1.1"
    good = make_image()
    encoded = encode(good)
    no_uids = make_image()
    del no_uids.StudyInstanceUID
    cases = {
        "truncated": (good.SOPInstanceUID, encoded[:-1000], 0xC000),
        "cut inside a header": (good.SOPInstanceUID, encoded[:-len(good.PixelData) - 5], 0xC000),
        "garbage": (good.SOPInstanceUID, b"\x08\x00\x16\x00UI\xff\xffnot a dicom data set at all", 0xC000),
        "no study uid": (no_uids.SOPInstanceUID, encode(no_uids), 0xC000),
        "other SOP instance": (generate_uid(), encoded, 0xA900),
    }
    with association(node_settings.node.port, (cr, ExplicitVRLittleEndian)) as assoc:
        for name, (command_uid, data, expected) in cases.items():
            response = send_raw(assoc, cr, command_uid, data)
            assert response.Status == expected, name
            assert response.ErrorComment, name
        assert send_raw(assoc, cr, good.SOPInstanceUID, encoded).Status == 0x0000
    [path] = archived(node_settings)
    assert path.read_bytes().endswith(encoded)  # the data set byte for byte as received
    assert index_counts(node_settings)["instances"] == 1


def test_sop_class_mismatch_fails(listener: Listener, node_settings: Settings) -> None:
    ds = make_image()  # a CR data set under an MR command
    mr = "1.2.840.10008.5.1.4.1.1.4"
    with association(node_settings.node.port, (mr, ExplicitVRLittleEndian)) as assoc:
        assert send_raw(assoc, mr, ds.SOPInstanceUID, encode(ds)).Status == 0xA900
    assert archived(node_settings) == []


@pytest.mark.parametrize(("policy", "status", "kept"), [("keep_first", 0xB000, 1), ("reject", 0x0111, 1),
                                                       ("replace", 0x0000, 2)])
def test_duplicates(node_settings: Settings, enqueued: Enqueued, policy: str, status: int, kept: int) -> None:
    node_settings.node.duplicate_policy = policy
    first = make_image(fill=1)
    second = make_image(study_uid=first.StudyInstanceUID, series_uid=first.SeriesInstanceUID,
                        sop_uid=first.SOPInstanceUID, fill=2)
    with Listener(node_settings, enqueue=enqueued), association(
            node_settings.node.port, (first.SOPClassUID, ExplicitVRLittleEndian)) as assoc:
        assert assoc.send_c_store(first).Status == 0x0000
        assert assoc.send_c_store(first).Status == 0x0000  # identical: success, stored once
        assert assoc.send_c_store(second).Status == status
    [path] = archived(node_settings)
    assert dcmread(path).PixelData[:1] == bytes([kept])
    assert index_counts(node_settings)["instances"] == 1


def _mount_tmpfs(directory: Path, size: str) -> bool:
    directory.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                          capture_output=True).returncode == 0


def test_full_disk_answers_out_of_resources_and_a_retry_succeeds(node_settings: Settings, enqueued: Enqueued,
                                                                tmp_path: Path) -> None:
    archive_dir = Path(node_settings.storage.archive_dir)
    node_settings.storage.min_free_bytes = 0  # the disk itself full, not the watermark (tests/test_archive.py)
    if not _mount_tmpfs(archive_dir, "256k"):
        pytest.skip("cannot mount a small tmpfs here (needs CAP_SYS_ADMIN)")
    try:
        big = make_image(size=512)  # 512 KiB of pixels: does not fit
        with Listener(node_settings, enqueue=enqueued), association(
                node_settings.node.port, (big.SOPClassUID, ExplicitVRLittleEndian)) as assoc:
            assert assoc.send_c_store(big).Status == 0xA700
            assert index_counts(node_settings)["instances"] == 0 and temporaries(node_settings) == []
            subprocess.run(["mount", "-o", "remount,size=8m", str(archive_dir)], check=True)
            assert assoc.send_c_store(big).Status == 0x0000
        assert index_counts(node_settings)["instances"] == 1 and len(archived(node_settings)) == 1
    finally:
        subprocess.run(["umount", "-l", str(archive_dir)], capture_output=True)


def test_unwritable_archive_answers_out_of_resources(listener: Listener, node_settings: Settings) -> None:
    """Where no tmpfs can be mounted: the study directory cannot be created (a file is in the way)."""
    ds = make_image()
    blocker = Path(node_settings.storage.archive_dir) / ds.StudyInstanceUID
    blocker.write_bytes(b"")
    with association(node_settings.node.port, (ds.SOPClassUID, ExplicitVRLittleEndian)) as assoc:
        assert assoc.send_c_store(ds).Status == 0xA700
        blocker.unlink()
        assert assoc.send_c_store(ds).Status == 0x0000
    assert index_counts(node_settings)["instances"] == 1


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """(private key, certificate) for localhost, made with openssl (the test is skipped without it)."""
    key, certificate = directory / "key.pem", directory / "cert.pem"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                           "-out", str(certificate), "-days", "1", "-subj", "/CN=localhost"], capture_output=True)
    if made.returncode != 0:
        pytest.skip("openssl cannot make a test certificate here")
    return key, certificate


def test_tls(node_settings: Settings, enqueued: Enqueued, tmp_path: Path) -> None:
    key, certificate = self_signed_certificate(tmp_path)
    node_settings.node.tls = TLSSettings(enabled=True, certificate=certificate, private_key=key)
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certificate))
    ds = make_image()
    with Listener(node_settings, enqueue=enqueued):
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
        plain = ae.associate("127.0.0.1", node_settings.node.port, ae_title=CALLED)
        assert not plain.is_established
        assoc = ae.associate("127.0.0.1", node_settings.node.port, ae_title=CALLED, tls_args=(client, "localhost"))
        assert assoc.is_established
        assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
    assert index_counts(node_settings)["instances"] == 1


# --- logs --------------------------------------------------------------------------------------


def test_logs_carry_no_patient_identifiers(listener: Listener, node_settings: Settings,
                                           caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    caplog.set_level(logging.DEBUG)
    ds = make_image(patient_name="Zyxwv^Quokka", patient_id="PID-97531", accession="ACC-86420")
    ds.PatientBirthDate = "2026X0101"  # invalid: pydicom would log the value
    storescu(node_settings.node.port, [write(ds, tmp_path / "phi.dcm")])
    assert index_counts(node_settings)["instances"] == 1
    text = caplog.text
    assert ds.SOPInstanceUID in text  # the instance is logged, by its UID
    for identifier in ("Zyxwv", "Quokka", "PID-97531", "ACC-86420", "2026X0101"):
        assert identifier not in text
    assert logging.getLogger("pynetdicom").getEffectiveLevel() >= logging.WARNING


# --- crash and restart ------------------------------------------------------------------------


def test_sigkill_mid_transfer_leaves_nothing_half_written(node_settings: Settings, tmp_path: Path) -> None:
    config = tmp_path / "cradle.yaml"
    config.write_text(yaml.safe_dump(node_settings.model_dump(mode="json")))
    study, series = generate_uid(), generate_uid()
    files = [write(make_mr_slice(study_uid=study, series_uid=series, instance_number=i, size=1024, fill=i),
                   tmp_path / "push" / f"{i:03d}.dcm") for i in range(1, 41)]  # 40 x 2 MiB
    port = node_settings.node.port
    with cradle_listen(config, port) as first:
        pusher = subprocess.Popen([dcmtk("storescu"), "-aet", "STORESCU", "-aec", CALLED, "127.0.0.1", str(port),
                                   *map(str, files)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while len(archived(node_settings)) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        assert pusher.wait(DCMTK_TIMEOUT) != 0  # the association died with the listener
    before = len(archived(node_settings))
    assert 5 <= before < len(files)
    with cradle_listen(config, port):
        assert temporaries(node_settings) == []
        indexed = {path for (path,) in rows(node_settings, Instance.file_path)}
        on_disk = {p.relative_to(node_settings.storage.archive_dir).as_posix() for p in archived(node_settings)}
        assert indexed == on_disk  # no row without its file, no file without its row
        storescu(port, files)  # the re-send succeeds
    assert len(archived(node_settings)) == len(files)
    assert index_counts(node_settings)["instances"] == len(files) and temporaries(node_settings) == []


@contextlib.contextmanager
def cradle_listen(config: Path, port: int) -> Iterator[subprocess.Popen]:
    process = subprocess.Popen([sys.executable, "-m", "cradle.cli", "listen", "--config", str(config)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for_echo(port, process)
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        process.stderr.close()


def _wait_for_echo(port: int, process: subprocess.Popen) -> None:
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode()
        assoc = ae.associate("127.0.0.1", port, ae_title=CALLED)
        if assoc.is_established:
            assoc.release()
            return
        time.sleep(0.1)
    raise AssertionError("cradle listen did not come up")


def test_sigterm_stops_cradle_listen_cleanly(node_settings: Settings, tmp_path: Path) -> None:
    config = tmp_path / "cradle.yaml"
    config.write_text(yaml.safe_dump(node_settings.model_dump(mode="json")))
    with cradle_listen(config, node_settings.node.port) as process:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0


def test_listener_does_not_import_torch(node_settings: Settings, tmp_path: Path) -> None:
    config = tmp_path / "cradle.yaml"
    config.write_text(yaml.safe_dump(node_settings.model_dump(mode="json")))
    code = ("import sys, node.commands, node.server, node.handlers, node.completion, node.routing\n"
            "from config.settings import load_settings\n"
            f"node.commands.load_enqueue(load_settings({str(config)!r}))  # the job queue, when installed\n"
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_no_allow_list_admits_any_title_from_loopback_only(node_settings: Settings, enqueued: Enqueued) -> None:
    from node.handlers import is_loopback

    node_settings.node.allowed_calling_aets = None
    with Listener(node_settings, enqueue=enqueued):
        for calling in ("ANYTITLE", "STORESCU"):
            ae = AE(ae_title=calling)
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", node_settings.node.port, ae_title=CALLED)
            assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
            assoc.release()
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("10.0.0.5") and not is_loopback("192.168.1.2") and not is_loopback("not an address")
