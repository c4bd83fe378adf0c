"""Security: DICOM TLS with DCMTK as the peer (listener and sender), the calling-AE allow-list with
hosts, owner-only files, the audit trail, the Prometheus endpoint and ``cradle status``.

The certificates are made here with ``openssl``: a CA, the node's server certificate (localhost,
127.0.0.1), a modality's client certificate, and a client certificate from a CA nobody trusts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from config.settings import CallingAE, Settings, TLSSettings, load_settings
from conftest import free_port
from fake_pipelines import FakeHost
from node import commands
from node.dispatch import Dispatcher
from node.sender import Outgoing, send
from node.server import Listener
from storage import audit as audit_module
from test_dispatch import StoreSCP, wait_listening
from test_listener import CALLED, Enqueued, archived, dcmtk, index_counts, write
from test_queue import make_node
from test_storage import make_image

DCMTK_TIMEOUT = 60


# --- certificates --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PKI:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate signed by a CA the node does not trust
    rogue_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        pytest.skip(f"openssl cannot make test certificates here: {result.stderr[-300:]}")


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key.name, "-out", cert.name, "-days", "2",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    return cert, key


def _issue(directory: Path, name: str, subject: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    key, csr, cert, ext = (directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.pem",
                           directory / f"{name}.ext")
    ext.write_text(extensions)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key.name, "-out", csr.name, "-subj", subject,
             cwd=directory)
    _openssl("x509", "-req", "-in", csr.name, "-CA", ca[0].name, "-CAkey", ca[1].name, "-CAcreateserial",
             "-out", cert.name, "-days", "2", "-extfile", ext.name, cwd=directory)
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    directory = tmp_path_factory.mktemp("pki")
    ca = _ca(directory, "cradle-test-ca")
    rogue_ca = _ca(directory, "rogue-ca")
    server = _issue(directory, "server", "/CN=localhost", ca,
                    "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                    "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n")
    client_ext = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n"
    client = _issue(directory, "client", "/CN=MODALITY1/O=Neonatal Unit", ca, client_ext)
    rogue = _issue(directory, "rogue", "/CN=ROGUE", rogue_ca, client_ext)
    return PKI(ca[0], server[0], server[1], client[0], client[1], rogue[0], rogue[1])


# --- helpers -----------------------------------------------------------------------------------------


def tls_settings(settings: Settings, pki: PKI, *, require_client_certificate: bool) -> Settings:
    settings.node.tls = TLSSettings(enabled=True, certificate=pki.server_cert, private_key=pki.server_key,
                                    ca_certificates=pki.ca, require_client_certificate=require_client_certificate)
    return settings


def dcmtk_tls(tool: str, port: int, files: list[Path], tls: list[str], calling: str = "STORESCU",
              ) -> subprocess.CompletedProcess:
    command = [dcmtk(tool), *tls, "-aet", calling, "-aec", CALLED, "-to", "20", "-ta", "20",
               "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(command, capture_output=True, text=True, timeout=DCMTK_TIMEOUT)


def with_client_cert(pki: PKI) -> list[str]:
    return ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)]


def anonymous(pki: PKI) -> list[str]:
    return ["+tla", "+cf", str(pki.ca)]  # TLS, the node's certificate verified, none of our own


def audit_events(path: Path, event: str | None = None) -> list[dict]:
    if not path.exists():
        return []
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in events if event is None or e["event"] == event]


@pytest.fixture
def trail(node_settings: Settings) -> Iterator[Path]:
    """This process's audit trail, at its default place beside the archive."""
    path = node_settings.audit_path()
    audit_module.configure_audit(path, "test")
    yield path
    audit_module.unconfigure_audit()


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


# --- DICOM TLS: the listener ------------------------------------------------------------------------


@pytest.mark.slow
def test_tls_listener_with_dcmtk(node_settings: Settings, pki: PKI, tmp_path: Path, trail: Path) -> None:
    """A TLS-only node: storescu/echoscu over TLS store and echo; a plaintext association fails and
    stores nothing; a peer that connects and stays silent does not hold up anyone else."""
    tls_settings(node_settings, pki, require_client_certificate=False)
    node_settings.node.acse_timeout = 5
    node_settings.node.metrics_port = free_port()
    port = node_settings.node.port
    files = [write(make_image(), tmp_path / f"{i}.dcm") for i in range(3)]
    with Listener(node_settings, enqueue=Enqueued()):
        plain = dcmtk_tls("storescu", port, [files[0]], [])
        assert plain.returncode != 0
        assert archived(node_settings) == [] and index_counts(node_settings)["instances"] == 0
        silent = socket.create_connection(("127.0.0.1", port))  # connects, never says hello
        try:
            started = time.monotonic()
            echo = dcmtk_tls("echoscu", port, [], with_client_cert(pki), calling="ECHOSCU")
            assert echo.returncode == 0, echo.stderr
            stored = dcmtk_tls("storescu", port, files[:2], with_client_cert(pki))
            assert stored.returncode == 0, stored.stderr
            assert time.monotonic() - started < 5, "the silent peer did not block the others"
        finally:
            silent.close()
        anonymous_client = dcmtk_tls("storescu", port, files[2:], anonymous(pki))
        assert anonymous_client.returncode == 0, anonymous_client.stderr  # no client certificate asked for
        samples = scrape(node_settings.node.metrics_port)
    assert index_counts(node_settings)["instances"] == 3 and len(archived(node_settings)) == 3
    rejected = audit_events(trail, "association.rejected")
    assert any(e["reason"].startswith("tls: ") for e in rejected), rejected
    accepted = audit_events(trail, "association.accepted")
    assert [e["tls"] for e in accepted] == [True, True, True]
    assert {e["tls_version"] for e in accepted} <= {"TLSv1.2", "TLSv1.3"}
    assert [e["peer_certificate"] for e in accepted] == ["commonName=MODALITY1, organizationName=Neonatal Unit"] * 2 \
        + [None]  # echoscu and storescu with the modality's certificate, then one without
    assert samples[("cradle_association_rejections_total", (("reason", "tls"),))] >= 1
    assert samples[("cradle_instances_received_total", (("outcome", "stored"),))] == 3
    print(f"\nTLS listener: plaintext storescu exit {plain.returncode}; TLS versions "
          f"{sorted({e['tls_version'] for e in accepted})}; {len(rejected)} rejected connection(s)")


@pytest.mark.slow
def test_tls_listener_requiring_a_client_certificate(node_settings: Settings, pki: PKI, tmp_path: Path,
                                                     trail: Path) -> None:
    tls_settings(node_settings, pki, require_client_certificate=True)
    port = node_settings.node.port
    path = write(make_image(), tmp_path / "cr.dcm")
    with Listener(node_settings, enqueue=Enqueued()):
        without = dcmtk_tls("storescu", port, [path], anonymous(pki))
        untrusted = dcmtk_tls("storescu", port, [path], ["+tls", str(pki.rogue_key), str(pki.rogue_cert),
                                                         "+cf", str(pki.ca)])
        plain = dcmtk_tls("storescu", port, [path], [])
        assert (without.returncode, untrusted.returncode, plain.returncode) != (0, 0, 0)
        assert without.returncode != 0 and untrusted.returncode != 0 and plain.returncode != 0
        assert archived(node_settings) == [] and index_counts(node_settings)["instances"] == 0
        good = dcmtk_tls("storescu", port, [path], with_client_cert(pki))
        assert good.returncode == 0, good.stderr
    assert index_counts(node_settings)["instances"] == 1
    reasons = [e["reason"] for e in audit_events(trail, "association.rejected")]
    assert len(reasons) == 3 and all(r.startswith("tls: ") for r in reasons), reasons
    print(f"\nclient certificate required: rejected {reasons}")


def test_allow_list_binds_titles_to_hosts(node_settings: Settings, trail: Path) -> None:
    """A title bound to 127.0.0.1 may associate from there; bound elsewhere it may not; an unknown
    title never. Every rejection is audited with its reason."""
    node_settings.node.allowed_calling_aets = [CallingAE(ae_title="LOCALSCU", hosts=["127.0.0.1"]),
                                               CallingAE(ae_title="FARSCU", hosts=["10.1.2.3"]), "ANYHOST"]
    port = node_settings.node.port
    results = {}
    with Listener(node_settings, enqueue=Enqueued()):
        for calling in ("LOCALSCU", "FARSCU", "ANYHOST", "STRANGER"):
            ae = AE(ae_title=calling)
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", port, ae_title=CALLED)
            results[calling] = assoc.is_established
            if assoc.is_established:
                assert assoc.send_c_echo().Status == 0x0000
                assoc.release()
    assert results == {"LOCALSCU": True, "FARSCU": False, "ANYHOST": True, "STRANGER": False}
    rejected = {e["calling_ae"]: e["reason"] for e in audit_events(trail, "association.rejected")}
    assert rejected == {"FARSCU": "host", "STRANGER": "calling_ae"}
    assert all(e["address"] == "127.0.0.1" for e in audit_events(trail) if e["event"].startswith("association."))


def test_calling_ae_bound_to_its_tls_certificate(node_settings: Settings, pki: PKI, trail: Path) -> None:
    """A calling AE title bound to a certificate subject associates only with that verified client
    certificate: MODALITY1 by its CN, FULL by the whole subject (any order), WRONG by a subject the
    certificate does not have. Another trusted certificate, or none, is rejected and audited with
    reason "certificate"; TESTSCU is bound to none and associates with any verified certificate."""
    directory = pki.ca.parent
    client_ext = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n"
    other = _issue(directory, "other", "/CN=OTHER", (pki.ca, directory / "cradle-test-ca.key"), client_ext)
    certificates = {"modality": (pki.client_cert, pki.client_key), "other": other, None: None}
    tls_settings(node_settings, pki, require_client_certificate=False)
    node_settings.node.allowed_calling_aets = [
        CallingAE(ae_title="MODALITY1", certificate_subject="MODALITY1"),
        CallingAE(ae_title="FULL", certificate_subject="O=Neonatal Unit, CN=MODALITY1"),
        CallingAE(ae_title="WRONG", certificate_subject="CN=MODALITY1,O=Another Unit"), "TESTSCU"]

    def echo(calling: str, certificate: str | None) -> bool:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
        if certificates[certificate] is not None:
            context.load_cert_chain(*map(str, certificates[certificate]))
        ae = AE(ae_title=calling)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node_settings.node.port, ae_title=CALLED, tls_args=(context, "localhost"))
        if not assoc.is_established:
            return False
        answered = assoc.send_c_echo().Status == 0x0000
        assoc.release()
        return answered

    cases = [("MODALITY1", "modality", True), ("MODALITY1", "other", False), ("MODALITY1", None, False),
             ("FULL", "modality", True), ("FULL", "other", False), ("WRONG", "modality", False),
             ("TESTSCU", "other", True), ("TESTSCU", None, True)]
    with Listener(node_settings, enqueue=Enqueued()):
        outcomes = [(calling, certificate, echo(calling, certificate)) for calling, certificate, _ in cases]
    assert outcomes == cases
    rejected = sorted((e["calling_ae"], e["reason"], e["tls"]) for e in audit_events(trail, "association.rejected"))
    assert rejected == sorted([("MODALITY1", "certificate", True)] * 2 + [("FULL", "certificate", True),
                                                                          ("WRONG", "certificate", True)])
    with pytest.raises(ValueError, match="certificate_subject needs node.tls"):
        Settings.model_validate({"node": {"allowed_calling_aets": [{"ae_title": "A", "certificate_subject": "a"}]}})


# --- DICOM TLS: the sender -----------------------------------------------------------------------------


@pytest.mark.slow
def test_tls_sender_to_dcmtk_storescp(tmp_path: Path, pki: PKI) -> None:
    """Results to a TLS-only storescp that requires a client certificate: delivered with the client
    certificate; refused without it, with the wrong expected name, and in plaintext."""
    port = free_port()
    received = tmp_path / "received"
    received.mkdir()
    peer = subprocess.Popen([dcmtk("storescp"), "+tls", str(pki.server_key), str(pki.server_cert), "+cf", str(pki.ca),
                             "-aet", "PACS", "-od", str(received), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port)
        node = make_node(load_settings(None, **{
            "storage": {"archive_dir": str(tmp_path / "archive"), "database_url": f"sqlite:///{tmp_path / 'i.db'}"},
            "queue": {"broker_url": f"sqla+sqlite:///{tmp_path / 'b.db'}"},
            "node": {"acse_timeout": 5, "dimse_timeout": 5, "network_timeout": 5},
            "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port,
                              "tls": {"enabled": True, "ca_certificates": str(pki.ca),
                                      "certificate": str(pki.client_cert), "private_key": str(pki.client_key)}}],
        }), tmp_path)
        _series_pk, source = node.add_series()
        item = Outgoing(source.SOPInstanceUID, source.SOPClassUID, str(source.file_meta.TransferSyntaxUID),
                        node.ingest.archive.absolute(f"{source.StudyInstanceUID}/{source.SeriesInstanceUID}/"
                                                     f"{source.SOPInstanceUID}.dcm"))
        destination = node.settings.destinations[0]
        [ok] = send(destination, [item], node.settings.node)
        assert ok.status == 0x0000 and ok.delivered
        [file] = list(received.iterdir())
        assert dcmread(file).SOPInstanceUID == source.SOPInstanceUID

        refused = {}
        refused["no client certificate"] = destination.model_copy(update={"tls": destination.tls.model_copy(
            update={"certificate": None, "private_key": None})})
        refused["other expected name"] = destination.model_copy(update={"tls": destination.tls.model_copy(
            update={"server_name": "pacs.example.org"})})
        refused["plaintext"] = destination.model_copy(update={"tls": destination.tls.model_copy(
            update={"enabled": False})})
        outcomes = {name: send(dest, [item], node.settings.node)[0] for name, dest in refused.items()}
    finally:
        peer.terminate()
        peer.wait(10)
    assert all(o.status is None and not o.delivered for o in outcomes.values()), outcomes
    assert len(list(received.iterdir())) == 1
    print("\nTLS sender: " + "; ".join(f"{name}: {o.error}" for name, o in outcomes.items()))


def test_destination_tls_true_means_the_nodes_own_files(tmp_path: Path) -> None:
    settings = load_settings(None, destinations=[{"name": "p", "ae_title": "PACS", "host": "h", "port": 104,
                                                  "tls": True}])
    assert settings.destinations[0].tls.enabled and settings.destinations[0].tls.certificate is None


# --- owner-only files ----------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_and_databases_are_created_owner_only(node_settings: Settings, tmp_path: Path, trail: Path) -> None:
    """Even under a permissive umask (022): archive files 0600 and directories 0700, the SQLite index
    (and its WAL) and the embedded broker 0600, the audit trail 0600."""
    from node.queue import JobQueue

    previous = os.umask(0o022)
    try:
        ds = make_image()
        with Listener(node_settings, enqueue=Enqueued()):
            ae = AE(ae_title="TESTSCU")
            ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
            assoc = ae.associate("127.0.0.1", node_settings.node.port, ae_title=CALLED)
            assert assoc.send_c_store(ds).Status == 0x0000
            assoc.release()
            queue = JobQueue(node_settings)  # creates the embedded broker's database
            queue.close()
    finally:
        os.umask(previous)
    archive = Path(node_settings.storage.archive_dir)
    [file] = archived(node_settings)
    assert _mode(file) == 0o600
    assert {_mode(d) for d in (archive, file.parent, file.parent.parent)} == {0o700}
    database = tmp_path / "cradle.db"
    sqlite_files = [p for p in (database, Path(f"{database}-wal"), Path(f"{database}-shm")) if p.exists()]
    assert database in sqlite_files and {_mode(p) for p in sqlite_files} == {0o600}
    assert _mode(tmp_path / "cradle.db.migrate.lock") == 0o600
    assert _mode(tmp_path / "broker.db") == 0o600
    assert trail.exists() and _mode(trail) == 0o600
    print(f"\nmodes: file {_mode(file):o}, dirs {_mode(file.parent):o}, index {_mode(database):o}, "
          f"broker {_mode(tmp_path / 'broker.db'):o}, audit {_mode(trail):o}")


# --- the audit trail ---------------------------------------------------------------------------------


def test_audit_trail_follows_an_instance_to_its_result(tmp_path: Path, node_settings: Settings, trail: Path) -> None:
    """Association, instance (UIDs and row ids), job states, result sent: one JSON line each, no
    patient identifiers; a configuration change names the keys that changed."""
    from cradle.cli import setup_process

    pacs_port = free_port()
    scp = StoreSCP(pacs_port, statuses=[0xA700]).start()
    try:
        settings = node_settings.model_copy(update={"destinations": load_settings(None, destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}]).destinations})
        settings.dispatch.backoff_seconds = 0
        node = make_node(settings, tmp_path)
        ds = make_image(patient_name="Auditsentinel^Baby", patient_id="AUDIT-PID-1", accession="AUDIT-ACC-1")
        with Listener(settings, enqueue=Enqueued(), sessions=node.sessions):
            ae = AE(ae_title="TESTSCU")
            ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
            assoc = ae.associate("127.0.0.1", settings.node.port, ae_title=CALLED)
            assert assoc.send_c_store(ds).Status == 0x0000
            assoc.release()
            time.sleep(0.2)
        job_id = node.add_job(index_series(node, ds.SeriesInstanceUID))
        assert node.runner(FakeHost()).run(job_id).value == "done"
        dispatcher = Dispatcher(settings, node.sessions)
        assert dispatcher.run_once() == 1  # 0xA700: not delivered, retried
        time.sleep(0.05)
        assert dispatcher.run_once() == 1
    finally:
        scp.stop()
    events = audit_events(trail)
    names = [e["event"] for e in events]
    for expected in ("association.accepted", "instance.received", "association.released", "series.complete",
                     "job.running", "job.done", "result.sent", "job.dispatched"):
        assert expected in names, (expected, names)
    [received] = [e for e in events if e["event"] == "instance.received"]
    assert (received["sop_uid"], received["series_uid"], received["study_uid"], received["status"]) == (
        ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, "0x0000")
    assert received["instance_pk"] and received["series_pk"] and received["study_pk"]
    sent = [e for e in events if e["event"] == "result.sent"]
    assert [(e["status"], e["delivered"]) for e in sent] == [("0xA700", False), ("0x0000", True)]
    [done] = [e for e in events if e["event"] == "job.done"]
    assert done["job_id"] == job_id and done["result_uids"] == [sent[0]["sop_uid"]]
    text = trail.read_text()
    for identifier in ("Auditsentinel", "AUDIT-PID-1", "AUDIT-ACC-1", "20260101"):
        assert identifier not in text

    config = tmp_path / "cradle.yaml"
    config.write_text(json.dumps(settings.model_dump(mode="json")))
    setup_process(load_settings(config), "listen", str(config), record_config=True)
    changed = settings.model_dump(mode="json")
    changed["node"]["port"] += 1
    changed["node"]["allowed_calling_aets"].append("NEWSCU")
    config.write_text(json.dumps(changed))
    setup_process(load_settings(config), "listen", str(config), record_config=True)
    [change] = audit_events(trail, "config.changed")
    assert change["changed_keys"] == ["node.allowed_calling_aets", "node.port"]
    assert [e["first"] for e in audit_events(trail, "config.loaded")] == [True, False]
    assert _mode(Path(f"{trail}.config.json")) == 0o600


def index_series(node, series_uid: str) -> int:  # noqa: ANN001 - test_queue.Node
    from sqlalchemy import select

    from storage.models import Series

    with node.sessions() as session:
        return session.scalar(select(Series.id).where(Series.series_uid == series_uid))


def test_fields_not_on_the_list_never_reach_the_trail(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit_module.configure_audit(path, "test")
    audit_module.audit("instance.received", sop_uid="1.2.3", patient_name="Doe^Jane", accession_number="A1")
    [event] = audit_events(path)
    assert event["sop_uid"] == "1.2.3" and "patient_name" not in event and "Doe" not in path.read_text()


# --- metrics and status ------------------------------------------------------------------------------


def test_metrics_endpoint_and_status(node_settings: Settings, tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    """The listener's counters and the index's numbers on /metrics, and the same in ``cradle status``."""
    node_settings.node.metrics_port = free_port()
    pacs_port = free_port()
    scp = StoreSCP(pacs_port, default=0xA700).start()
    settings = node_settings.model_copy(update={"destinations": load_settings(None, destinations=[
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}]).destinations})
    settings.dispatch.max_attempts = 1
    node = make_node(settings, tmp_path)
    images = [make_image() for _ in range(2)]
    try:
        with Listener(settings, enqueue=Enqueued(), sessions=node.sessions):
            for calling in ("TESTSCU", "INTRUDER"):
                ae = AE(ae_title=calling)
                ae.add_requested_context(images[0].SOPClassUID, ExplicitVRLittleEndian)
                assoc = ae.associate("127.0.0.1", settings.node.port, ae_title=CALLED)
                if assoc.is_established:
                    assert [assoc.send_c_store(ds).Status for ds in images] == [0, 0]
                    assoc.release()
            time.sleep(0.2)
            job_id = node.add_job(index_series(node, images[0].SeriesInstanceUID), "test-copy")
            assert node.runner(FakeHost()).run(job_id).value == "done"
            Dispatcher(settings, node.sessions).run_once()  # refused: the job fails at dispatch
            # (the first scrape: the index collector has nothing cached yet)
            samples = scrape(settings.node.metrics_port)
    finally:
        scp.stop()
    size = sum(len(_encoded(ds)) for ds in images)
    assert samples[("cradle_instances_received_total", (("outcome", "stored"),))] == 2
    assert samples[("cradle_received_bytes_total", ())] >= size
    assert samples[("cradle_c_store_responses_total", (("status", "0x0000"),))] == 2
    assert samples[("cradle_association_rejections_total", (("reason", "calling_ae"),))] == 1
    assert samples[("cradle_associations_total", (("result", "accepted"),))] == 1
    assert samples[("cradle_queue_depth", ())] == 2  # the two CR series' cxr jobs (no worker here)
    assert samples[("cradle_jobs", (("pipeline", "cxr"), ("state", "queued")))] == 2
    labels = (("model_version", "test-1"), ("outcome", "failed"), ("pipeline", "test-copy"))
    assert samples[("cradle_job_duration_seconds_count", labels)] == 1
    assert samples[("cradle_send_failures_total", (("destination", "pacs"),))] == 1
    assert samples[("cradle_dispatch_jobs", (("state", "failed"),))] == 1
    assert samples[("cradle_index_up", ())] == 1

    summary = _status_json(settings, capsys)
    assert summary["jobs"] == {"queued": 2, "failed": 1} and summary["queue"]["queued"] == 2
    assert summary["dispatch"] == {"failed": 1}
    assert summary["sends"] == {"pacs": {"delivered": 0, "failed": 1}}
    assert summary["received"]["instances"] == 2
    assert [d["outcome"] for d in summary["durations"]] == ["failed"]
    assert summary["recent_failures"]["jobs"][0]["id"] == job_id
    assert summary["recent_failures"]["sends"][0]["status"] == "0xA700"
    assert commands.status(argparse.Namespace(json=False), settings) == 0
    text = capsys.readouterr().out
    assert "queue depth" in text and "dispatch failed" in text and "recent failures:" in text
    print("\n" + text)


def _encoded(ds) -> bytes:  # noqa: ANN001 - pydicom Dataset
    from test_listener import encode

    return encode(ds)


def _status_json(settings: Settings, capsys: pytest.CaptureFixture) -> dict:
    capsys.readouterr()
    assert commands.status(argparse.Namespace(json=True), settings) == 0
    return json.loads(capsys.readouterr().out)


def test_model_promotions_are_audited(tmp_path: Path) -> None:
    """``cradle models import --activate``, ``promote`` and ``rollback``: each change of the active
    model is an audit event naming the task, the versions and who did it."""
    pytest.importorskip("torch")
    from safetensors.torch import save_file
    from test_registry import small_state

    from cradle.cli import main

    config = tmp_path / "cradle.yaml"
    config.write_text(json.dumps({"storage": {"archive_dir": str(tmp_path / "archive"),
                                              "database_url": f"sqlite:///{tmp_path / 'cradle.db'}"},
                                  "models_dir": str(tmp_path / "models")}))
    for seed in (1, 2):
        save_file(small_state(seed=seed), str(tmp_path / f"w{seed}.safetensors"))
    assert main(["models", "import", "bpd", str(tmp_path / "w1.safetensors"), "--arch", "resnet18",
                 "--image-size", "128", "--activate", "--config", str(config)]) == 0
    assert main(["models", "import", "bpd", str(tmp_path / "w2.safetensors"), "--arch", "resnet18",
                 "--image-size", "128", "--config", str(config)]) == 0
    assert main(["models", "promote", "bpd", "bpd-2", "--config", str(config)]) == 0
    assert main(["models", "rollback", "bpd", "--config", str(config)]) == 0
    events = [e for e in audit_events(tmp_path / "audit.jsonl") if e["event"].startswith("model.")]
    assert [(e["event"], e["previous"], e["version"]) for e in events] == [
        ("model.activate", None, "bpd-1"), ("model.activate", "bpd-1", "bpd-2"), ("model.rollback", "bpd-2", "bpd-1")]
    assert all(e["task"] == "bpd" and e["by"] and e["reason"] for e in events)
    assert [e["component"] for e in events] == ["models import", "models promote", "models rollback"]


def test_a_destinations_error_comment_is_withheld() -> None:
    from node.sender import withheld_comment

    text = withheld_comment("Patient DOE^JANE (ID 12345) does not match")
    assert "DOE" not in text and "12345" not in text and "characters" in text
    assert withheld_comment(None) == "" and withheld_comment("  ") == ""
