"""Hostile input and resource limits (issue 16): no lockout, no bomb, no endless retry, nothing lost.

One ``cradle listen`` process (small limits, so that the bombs are cheap) serves the whole module
while a prober thread sends an allowed C-ECHO every 0.2 s: each must be answered within 2 s, whatever
else is going on. Against it: raw-socket PDU cases (half-open, silent, trickle, oversized, a declared
4 GiB PDU, a P-DATA PDU above the announced maximum), random and truncated data sets, bombs (deflate,
element flood, a data set above the maximum size), many concurrent associations and hostile UIDs.
After each test: no temporary file left (archive or pynetdicom's), the listener's memory and threads
bounded, and the sentinel patient values absent from its log, the audit trail and the job table.
In-process listeners cover what needs its own configuration: the pending-connection cap, TLS, the
PostgreSQL overflow, an unreachable database; the worker's pixel limits run on a JobRunner.
The figures (cases tried, peak memory, echo latency under attack) are printed at the end (``-s``).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import sqlite3
import ssl
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from pydicom import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid,
)
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from config.settings import Settings, TLSSettings, load_settings
from conftest import free_port
from fake_pipelines import FakeHost
from node.server import Listener
from storage.models import Instance, Job, JobState
from test_listener import (  # noqa: F401 - enqueued: the fixture
    CALLED, Enqueued, archived, association, encode, enqueued, index_counts, rows, self_signed_certificate, send_raw,
    temporaries,
)
from test_queue import make_node
from test_security import audit_events
from test_storage import make_image

CR = "1.2.840.10008.5.1.4.1.1.1"
SENTINELS = ("Sentinelname^Quokka", "SENT-PID-4242", "SENT-ACC-7777", "19770707")
ECHO_LIMIT = 2.0
RANDOM_CASES = 400
FIGURES: dict[str, object] = {"cases": {}}


def sentinel_image(**kwargs) -> Dataset:  # noqa: ANN003 - make_image's keywords
    ds = make_image(patient_name=SENTINELS[0], patient_id=SENTINELS[1], accession=SENTINELS[2],
                    birth_date=SENTINELS[3], study_date="20250101", **kwargs)
    return ds


def count(name: str, n: int = 1) -> None:
    FIGURES["cases"][name] = FIGURES["cases"].get(name, 0) + n


# --- the listener under test, and its prober -----------------------------------------------------


@dataclass
class Node:
    settings: Settings
    process: subprocess.Popen
    log: Path
    tmpdir: Path
    probes: list[tuple[float, float, bool]] = field(default_factory=list)  # (start, latency, answered)
    peak_rss_kb: int = 0
    prober: object = None

    @property
    def port(self) -> int:
        return self.settings.node.port

    def status(self) -> dict[str, int]:
        values = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                values[key] = int(value.split()[0])
        self.peak_rss_kb = max(self.peak_rss_kb, values.get("VmHWM", 0))
        return values

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))


def echo_once(port: int, calling: str = "ECHOSCU") -> tuple[bool, str]:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title=CALLED)
    if not assoc.is_established:
        return False, "rejected" if assoc.is_rejected else "aborted"
    try:
        return assoc.send_c_echo().get("Status") == 0x0000, "echo"
    finally:
        assoc.release()


def probe(port: int) -> tuple[float, bool]:
    """An allowed C-ECHO as a modality does it: a refused association is tried again at once; the
    time until one is answered (at most ECHO_LIMIT + 1 s of trying)."""
    started = time.monotonic()
    while time.monotonic() - started < ECHO_LIMIT + 1:
        ok, _ = echo_once(port)
        if ok:
            return time.monotonic() - started, True
        time.sleep(0.05)
    return time.monotonic() - started, False


PROBER = """
import json, sys, time
from pynetdicom import AE
from pynetdicom.sop_class import Verification
port, out = int(sys.argv[1]), open(sys.argv[2], "a", buffering=1)
ae = AE(ae_title="ECHOSCU")
ae.add_requested_context(Verification)
ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 5
while True:
    started = time.time()
    answered = False
    while not answered and time.time() - started < 3:
        assoc = ae.associate("127.0.0.1", port, ae_title="CRADLE")
        if assoc.is_established:
            answered = assoc.send_c_echo().get("Status") == 0
            assoc.release()
        if not answered:
            time.sleep(0.05)
    out.write(json.dumps([started, time.time() - started, answered]) + "\\n")
    time.sleep(0.2)
"""


class Prober:
    """A modality in its own process (not slowed by this test process's load), sending an allowed
    C-ECHO every 0.2 s; a refused association is tried again at once, as a modality does. Each line
    of its file: (start, seconds until answered, answered)."""

    def __init__(self, node: Node, path: Path) -> None:
        self.node, self.path = node, path
        self.process = subprocess.Popen([sys.executable, "-c", PROBER, str(node.port), str(path)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def read(self) -> list[tuple[float, float, bool]]:
        if not self.path.exists():
            return []
        return [tuple(json.loads(line)) for line in self.path.read_text().splitlines() if line.strip()]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def _listen(settings: Settings, directory: Path, tmpdir: Path) -> tuple[subprocess.Popen, Path]:
    config = directory / "cradle.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    log = directory / "listener.log"
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    with open(log, "wb") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "cradle.cli", "listen", "--config", str(config)],
                                   stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-2000:]
        if echo_once(settings.node.port)[0]:
            return process, log
        time.sleep(0.1)
    process.kill()
    raise AssertionError("cradle listen did not come up")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    directory = tmp_path_factory.mktemp("robust")
    tmpdir = directory / "tmp"
    tmpdir.mkdir()
    settings = load_settings(None, **{
        "node": {"port": free_port(), "allowed_calling_aets": ["ECHOSCU", "TESTSCU", "FLOOD"],
                 "max_associations": 16, "max_pending_connections": 48, "association_deadline": 1.5,
                 "max_pdu_size": 65536, "max_dataset_size": 16 * 1024 * 1024, "max_inflation_ratio": 50,
                 "max_elements": 20000, "acse_timeout": 5, "network_timeout": 10, "dimse_timeout": 10},
        "storage": {"archive_dir": str(directory / "archive"), "database_url": f"sqlite:///{directory / 'c.db'}",
                    "fsync": False},
        "queue": {"broker_url": f"sqla+sqlite:///{directory / 'broker.db'}"},
        "completion": {"quiet_seconds": 3600, "poll_seconds": 1},
        "models_dir": str(directory / "models"),
    })
    process, log = _listen(settings, directory, tmpdir)
    running = Node(settings, process, log, tmpdir)
    baseline = running.status()
    FIGURES["baseline_rss_mb"] = round(baseline["VmRSS"] / 1024, 1)
    running.prober = Prober(running, directory / "probes.jsonl")
    try:
        yield running
    finally:
        running.prober.stop()
        running.probes = running.prober.read()
        running.status()
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        latencies = sorted(latency for _, latency, _ in running.probes)
        FIGURES["echo_probes"] = len(latencies)
        if latencies:
            FIGURES["echo_latency_s"] = {"median": round(latencies[len(latencies) // 2], 3),
                                         "p99": round(latencies[int(len(latencies) * 0.99)], 3),
                                         "max": round(latencies[-1], 3)}
        FIGURES["peak_rss_mb"] = round(running.peak_rss_kb / 1024, 1)
        print(f"\nrobustness figures: {json.dumps(FIGURES)}")


@pytest.fixture
def checked(node: Node) -> Iterator[Node]:
    """The listener, and afterwards: every echo answered within 2 s, nothing temporary left, memory and
    threads bounded, the sentinels nowhere."""
    started = time.time()
    yield node
    time.sleep(0.5)  # one more probe after the test
    assert node.process.poll() is None, "the listener died"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (temporaries(node.settings) or list(node.tmpdir.iterdir())):
        time.sleep(0.1)
    assert temporaries(node.settings) == [] and list(node.tmpdir.iterdir()) == []
    during = [(latency, answered) for at, latency, answered in node.prober.read() if at >= started - 0.5]
    assert during, "no echo was probed during the test"
    assert all(answered and latency < ECHO_LIMIT for latency, answered in during), during
    deadline = time.monotonic() + 10
    status = node.status()
    while time.monotonic() < deadline and status["Threads"] > 60:
        time.sleep(0.2)
        status = node.status()
    assert status["Threads"] <= 60, status  # everything ended: back near the idle count
    assert status["VmRSS"] < 400 * 1024 and status["VmHWM"] < 500 * 1024, status
    assert node.fds() < 100
    texts = [node.log.read_bytes().decode("utf-8", "replace"), node.settings.audit_path().read_text()]
    with contextlib.closing(sqlite3.connect(node.settings.storage.database_url.removeprefix("sqlite:///"))) as db:
        texts.append(repr(db.execute("SELECT * FROM job").fetchall()))
    for text in texts:
        for sentinel in SENTINELS:
            assert sentinel not in text


def audit_reasons(node: Node, event: str = "association.rejected") -> list[str]:
    return [e.get("reason") for e in audit_events(node.settings.audit_path(), event)]


def closed_by_peer(sock: socket.socket, within: float) -> bool:
    """Whether the node closed ``sock`` within ``within`` seconds (end-of-file or reset)."""
    sock.settimeout(within)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


# --- raw PDUs -------------------------------------------------------------------------------------


def associate_rq_start(length: int = 200) -> bytes:
    """The start of an A-ASSOCIATE-RQ (type, length, protocol version, called and calling AE titles),
    as a trickling peer would send it one byte at a time, never finishing."""
    return (b"\x01\x00" + struct.pack(">L", length) + b"\x00\x01\x00\x00" + CALLED.ljust(16).encode()
            + b"TESTSCU".ljust(16) + b"\x00" * 32 + b"\x10\x00\x00\x15" + b"1.2.840.10008.3.1.1.1")


def test_raw_pdu_cases_never_lock_anybody_out(checked: Node) -> None:
    node = checked
    before = len(audit_reasons(node))
    half_open = [connect(node.port) for _ in range(12)]
    for sock in half_open:
        sock.sendall(b"\x01\x00\x00\x00\x10")  # the first 5 bytes of an A-ASSOCIATE-RQ, then silence
    silent = [connect(node.port) for _ in range(6)]
    trickling = [connect(node.port) for _ in range(4)]
    request = associate_rq_start()
    stop = threading.Event()

    def trickle() -> None:
        for i in range(len(request) - 1):  # never the last byte
            if stop.wait(0.2):
                return
            for sock in trickling:
                with contextlib.suppress(OSError):
                    sock.sendall(request[i:i + 1])

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    huge_rq = connect(node.port)
    huge_rq.sendall(b"\x01\x00" + struct.pack(">L", 100 * 1024 * 1024) + b"\x00" * 65536)
    four_gib = connect(node.port)
    four_gib.sendall(b"\x04\x00" + struct.pack(">L", 0xFFFFFFFF) + b"\x00" * 1024)
    unknown = connect(node.port)
    unknown.sendall(b"\x7f\x00\x00\x00\x00\x04abcd")  # answered with an A-ABORT, then cut at the deadline
    assert closed_by_peer(huge_rq, 1) and closed_by_peer(four_gib, 1)
    assert len(request) > 40  # the trickle lasts beyond the deadline (0.2 s a byte)
    time.sleep(0.5)
    assert echo_once(node.port)[0]  # 22 connections still waiting: an allowed echo is answered
    for sock in half_open + silent + trickling + [unknown]:
        assert closed_by_peer(sock, node.settings.node.association_deadline + 1.5)
    stop.set()
    trickler.join(5)
    for sock in half_open + silent + trickling + [huge_rq, four_gib, unknown]:
        sock.close()

    # after the association: a P-DATA-TF PDU above the announced 64 KiB closes it
    with association(node.port, (CR, ExplicitVRLittleEndian)) as assoc:
        raw = assoc.dul.socket.socket
        raw.sendall(b"\x04\x00" + struct.pack(">L", 1024 * 1024) + b"\x00" * 70000)
        deadline = time.monotonic() + 5
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not assoc.is_established
    reasons = audit_reasons(node)[before:]
    assert reasons.count("deadline") == 23, reasons
    assert "A-ASSOCIATE-RQ PDU above 1 MiB" in reasons and "P-DATA-TF PDU above node.max_pdu_size" in reasons
    aborted = [e for e in audit_events(node.settings.audit_path(), "association.aborted")
               if e.get("reason") == "P-DATA-TF PDU above node.max_pdu_size"]
    assert len(aborted) == 1
    count("raw PDU connections", 12 + 6 + 4 + 3 + 1)


def test_pending_connections_are_capped(node_settings: Settings, enqueued: Enqueued) -> None:
    """Beyond node.max_pending_connections a connection is closed at once; the others wait for their
    deadline; an allowed echo is answered as soon as a place is free."""
    node_settings.node.max_pending_connections, node_settings.node.association_deadline = 4, 1.0
    with Listener(node_settings, enqueue=enqueued) as listener:
        waiting = [connect(node_settings.node.port) for _ in range(4)]
        time.sleep(0.3)
        extra = [connect(node_settings.node.port) for _ in range(3)]
        assert all(closed_by_peer(sock, 0.5) for sock in extra)  # closed at accept
        assert listener.gate.pending == 4 and listener.gate.refused_pending == 3
        assert all(closed_by_peer(sock, 2.0) for sock in waiting)  # the deadline
        assert listener.gate.expired == 4
        assert probe(node_settings.node.port)[1]
        for sock in waiting + extra:
            sock.close()
    count("pending-cap connections", 7)


def test_tls_trickle_after_the_handshake_is_cut_at_the_deadline(node_settings: Settings, enqueued: Enqueued,
                                                                 tmp_path: Path) -> None:
    key, certificate = self_signed_certificate(tmp_path)
    node_settings.node.tls = TLSSettings(enabled=True, certificate=certificate, private_key=key)
    node_settings.node.association_deadline = 1.0
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certificate))
    with Listener(node_settings, enqueue=enqueued) as listener:
        socks = []
        for _ in range(3):
            sock = client.wrap_socket(connect(node_settings.node.port), server_hostname="localhost")
            sock.sendall(b"\x01\x00\x00\x00\x10")  # handshake done, then 5 bytes and silence
            socks.append(sock)
        plain_silent = connect(node_settings.node.port)  # no handshake at all
        started = time.monotonic()
        for sock in socks:
            sock.settimeout(3)
            assert sock.recv(10) == b""  # closed by the node
        assert closed_by_peer(plain_silent, 3)
        assert time.monotonic() - started < 2.5
        assert listener.gate.pending == 0
        for sock in socks + [plain_silent]:
            sock.close()
    count("TLS trickle connections", 4)


# --- data sets --------------------------------------------------------------------------------------


def element_ends(ds: Dataset) -> list[tuple[int, set[str]]]:
    """(offset where each top-level element of ``encode(ds)`` ends, keywords up to it)."""
    ends, prefix, seen = [], Dataset(), set()
    for element in ds:
        prefix.add(element)
        seen.add(element.keyword)
        ends.append((len(encode(prefix)), set(seen)))
    return ends


def test_random_and_truncated_data_sets_fail_exactly(checked: Node) -> None:
    """Random bytes: 0xC000. A data set cut inside an element: 0xC000; cut between elements it is a
    shorter, well-formed data set: 0xC000 while it lacks a UID, else stored (0x0000) or, under the
    same SOP Instance UID with other content, kept first (0xB000). Bytes flipped: never a retry
    status, a processing failure or an abort."""
    node = checked
    rng = random.Random(16)
    good = sentinel_image(modality="OT")
    encoded = encode(good)
    boundaries = dict(element_ends(good))
    uids = {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"}
    archived_content: set[bytes] = set()
    statuses: dict[str, list[int]] = {"random": [], "truncated": [], "flipped": []}
    with association(node.port, (CR, ExplicitVRLittleEndian)) as assoc:
        for i in range(RANDOM_CASES):
            kind = ("random", "truncated", "flipped")[i % 3]
            expected = None
            if kind == "random":
                data = rng.randbytes(rng.randint(1, 2048))
                expected = 0xC000
            elif kind == "truncated":
                cut = rng.choice(list(boundaries)) if i % 2 else rng.randint(1, len(encoded) - 1)
                data = encoded[:cut]
                if cut not in boundaries or not uids <= boundaries[cut]:
                    expected = 0xC000
                elif not archived_content:
                    expected = 0x0000
                else:
                    expected = 0x0000 if data in archived_content else 0xB000
            else:
                mutable = bytearray(encoded)
                for _ in range(rng.randint(1, 8)):
                    mutable[rng.randrange(len(mutable))] = rng.randrange(256)
                data = bytes(mutable)
            status = int(send_raw(assoc, CR, good.SOPInstanceUID, data).Status)
            if expected is not None:
                assert status == expected, (kind, len(data), hex(status))
            if status == 0x0000 and not archived_content:
                archived_content.add(data)
            statuses[kind].append(status)
        assert assoc.is_established
    assert set(statuses["random"]) == {0xC000}
    assert set(statuses["flipped"]) <= {0x0000, 0xB000, 0xC000, 0xA900}
    FIGURES["random_statuses"] = {kind: {f"0x{code:04X}": codes.count(code) for code in sorted(set(codes))}
                                  for kind, codes in statuses.items()}
    count("random, truncated and flipped data sets", RANDOM_CASES)


def _deflated(ds: Dataset) -> bytes:
    raw = encode(ds)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(raw) + compressor.flush()


def test_bombs(checked: Node) -> None:
    node = checked
    before = node.status()["VmHWM"]
    deflate_bomb = sentinel_image(modality="OT")
    deflate_bomb.add_new(0x00091010, "OB", b"\x00" * (64 * 1024 * 1024))  # 64 MiB of zeros: about 64 KiB
    bomb_bytes = _deflated(deflate_bomb)
    assert len(bomb_bytes) < 256 * 1024
    flood = sentinel_image(modality="OT")
    flood_bytes = flooded(flood)
    with association(node.port, (CR, ExplicitVRLittleEndian), (CR, DeflatedExplicitVRLittleEndian)) as assoc:
        answer = send_raw(assoc, CR, deflate_bomb.SOPInstanceUID, bomb_bytes, DeflatedExplicitVRLittleEndian)
        assert answer.Status == 0xC000 and "inflates beyond" in answer.ErrorComment
        started = time.monotonic()
        answer = send_raw(assoc, CR, flood.SOPInstanceUID, flood_bytes)
        assert answer.Status == 0xC000 and "max_elements" in answer.ErrorComment
        flood_seconds = time.monotonic() - started
        ok = sentinel_image(modality="OT")
        ok.add_new(0x00091010, "OB", os.urandom(12 * 1024 * 1024))  # 12 MiB: below the 16 MiB maximum
        assert assoc.send_c_store(ok).Status == 0x0000
    assert flood_seconds < 5
    # above node.max_dataset_size: the connection is closed as the size passes the limit
    big = sentinel_image(modality="OT")
    big.add_new(0x00091010, "OB", b"\x01" * (24 * 1024 * 1024))
    with association(node.port, (CR, ExplicitVRLittleEndian)) as assoc:
        status = assoc.send_c_store(big)
        deadline = time.monotonic() + 5
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "Status" not in status and not assoc.is_established
    aborted = [e for e in audit_events(node.settings.audit_path(), "association.aborted")
               if e.get("reason") == "data set above node.max_dataset_size"]
    assert len(aborted) == 1
    # four 12 MiB data sets at once: streamed to files, not held (3 copies each) in memory
    images = []
    for _ in range(4):
        ds = sentinel_image(modality="OT")
        ds.add_new(0x00091010, "OB", os.urandom(12 * 1024 * 1024))
        images.append(ds)

    def push(ds: Dataset) -> int:
        with association(node.port, (CR, ExplicitVRLittleEndian)) as assoc:
            return int(assoc.send_c_store(ds).Status)

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(push, images)) == [0] * 4
    grown = (node.status()["VmHWM"] - before) / 1024
    FIGURES["peak_rss_growth_four_12MiB_mb"] = round(grown, 1)
    assert grown < 48, grown  # held in memory it would be 4 x 3 x 12 MiB
    stored = {sop for (sop,) in rows(node.settings, Instance.sop_uid)}
    assert {ok.SOPInstanceUID, *(ds.SOPInstanceUID for ds in images)} <= stored
    assert deflate_bomb.SOPInstanceUID not in stored and flood.SOPInstanceUID not in stored
    assert big.SOPInstanceUID not in stored
    count("bombs (deflate, element flood, oversized, 5 large)", 8)


def flooded(ds: Dataset) -> bytes:
    """``ds`` encoded with 200,000 empty private elements (group 0009) between its group 0008 and
    the rest, so that the elements stay in order: well-formed, 1.6 MB, all element headers."""
    low = Dataset()
    high = Dataset()
    for element in ds:
        (low if element.tag.group < 0x0009 else high).add(element)
    flood = b"".join(struct.pack("<HH2sH", 0x0009, 0x1000 + i % 0xEFFF, b"LO", 0) for i in range(200_000))
    return encode(low) + flood + encode(high)


def defined_length_sequence(items: list[bytes], tag: tuple[int, int] = (0x0009, 0x1001)) -> bytes:
    """An explicit VR SQ element of defined length whose items (encoded element bytes) have defined
    lengths too: no delimiter anywhere, so only the lengths tell where the nested elements are."""
    body = b"".join(struct.pack("<HHL", 0xFFFE, 0xE000, len(item)) + item for item in items)
    return struct.pack("<HH2sHL", *tag, b"SQ", 0, len(body)) + body


def with_group_0009(ds: Dataset, payload: bytes) -> bytes:
    """``ds`` encoded with ``payload`` (group 0009 elements) in tag order."""
    low, high = Dataset(), Dataset()
    for element in ds:
        (low if element.tag.group < 0x0009 else high).add(element)
    return encode(low) + payload + encode(high)


def empty_elements(n: int, group: int = 0x0011) -> bytes:
    return b"".join(struct.pack("<HH2sH", group, 0x1000 + i, b"LO", 0) for i in range(n))


def test_element_flood_inside_defined_length_items(checked: Node) -> None:
    """node.max_elements counts the elements of defined-length items of defined-length sequences (at
    any depth): a flood hidden there is refused 0xC000 with nothing stored; a data set with the same
    structure below the limit (20,000 here) is stored."""
    node = checked
    in_item = sentinel_image(modality="OT")
    in_item_bytes = with_group_0009(in_item, defined_length_sequence([empty_elements(30_000)]))
    deeper = sentinel_image(modality="OT")
    inner = defined_length_sequence([empty_elements(12_000), empty_elements(12_000)], tag=(0x0011, 0x0900))
    deeper_bytes = with_group_0009(deeper, defined_length_sequence([inner]))
    below = sentinel_image(modality="OT")
    below_bytes = with_group_0009(below, defined_length_sequence([empty_elements(500), empty_elements(500)]))
    with association(node.port, (CR, ExplicitVRLittleEndian)) as assoc:
        for ds, data in ((in_item, in_item_bytes), (deeper, deeper_bytes)):
            started = time.monotonic()
            answer = send_raw(assoc, CR, ds.SOPInstanceUID, data)
            assert answer.Status == 0xC000 and "max_elements" in answer.ErrorComment
            assert time.monotonic() - started < 5
        assert send_raw(assoc, CR, below.SOPInstanceUID, below_bytes).Status == 0x0000
    stored = {sop for (sop,) in rows(node.settings, Instance.sop_uid)}
    assert below.SOPInstanceUID in stored
    assert in_item.SOPInstanceUID not in stored and deeper.SOPInstanceUID not in stored
    names = {path.stem for path in archived(node.settings)}
    assert in_item.SOPInstanceUID not in names and deeper.SOPInstanceUID not in names
    count("element floods inside defined-length items", 3)


def associate_rq(calling: str) -> bytes:
    """A complete A-ASSOCIATE-RQ proposing Verification, encoded by pynetdicom."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import (
        A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification,
    )
    from pynetdicom.presentation import build_context
    from pynetdicom.transport import AddressInformation

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = calling, CALLED
    primitive.calling_presentation_address = AddressInformation("127.0.0.1", 1)
    primitive.called_presentation_address = AddressInformation("127.0.0.1", 104)
    context = build_context(Verification)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    length, implementation = MaximumLengthNotification(), ImplementationClassUIDNotification()
    length.maximum_length_received = 16384
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.10.543.16"
    primitive.user_information = [length, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        if not chunk:
            return 0, b""
        header += chunk
    kind, _, length = struct.unpack(">BBL", header)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            return 0, b""
        body += chunk
    return kind, body


def test_many_concurrent_associations(checked: Node) -> None:
    """200 associations at once (raw sockets: the test's own threads stay light): each is accepted
    and released in order, or rejected at once, transiently ("local limit exceeded"), or closed at
    accept (too many pending); none hangs; the node serves an allowed echo throughout."""
    node = checked
    request = associate_rq("FLOOD")

    def one(_: int) -> str:
        try:
            with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
                sock.sendall(request)
                kind, body = read_pdu(sock)
                if kind == 0x02:  # A-ASSOCIATE-AC: hold it a little, then release
                    time.sleep(0.2)
                    sock.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")
                    return "released" if read_pdu(sock)[0] == 0x06 else "not released"
                if kind == 0x03:  # A-ASSOCIATE-RJ: result, source, reason/diagnostic
                    return "limit" if (body[1], body[2], body[3]) == (0x02, 0x03, 0x02) else "rejected"
                return "closed"
        except OSError:
            return "closed"

    started = time.monotonic()
    with ThreadPoolExecutor(200) as pool:
        outcomes = list(pool.map(one, range(200)))
    seconds = time.monotonic() - started
    tally = {name: outcomes.count(name) for name in set(outcomes)}
    FIGURES["200_associations"] = {**tally, "seconds": round(seconds, 1)}
    assert set(tally) <= {"released", "limit", "closed"}, tally
    assert tally.get("released", 0) >= node.settings.node.max_associations_per_calling_ae
    assert seconds < 30
    count("concurrent associations", 200)


def test_hostile_uids_are_refused_never_merged(checked: Node) -> None:
    node = checked
    study, series = generate_uid(), generate_uid()
    base = generate_uid()[:40]
    cases = {
        "slash": f"{base}/4", "underscore": f"{base}_4", "dot-dot": "..", "letters": "1.2.abc",
        "too long": "1." + "2" * 70, "path": "1.2/../../../etc", "empty component": "1..2",
    }
    before = index_counts(node.settings)["instances"]
    with association(node.port, (CR, ExplicitVRLittleEndian)) as assoc:
        for name, uid in cases.items():
            ds = sentinel_image(modality="OT", study_uid=study, series_uid=series)
            ds.SOPInstanceUID = uid
            command_uid = uid if len(uid) <= 64 else ds.SeriesInstanceUID  # the command cannot carry it
            assert send_raw(assoc, CR, command_uid, encode(ds)).Status == 0xC000, name
        for name, uid in {"study": "1.2.3/4", "series": "1.2.3_4"}.items():
            ds = sentinel_image(modality="OT")
            setattr(ds, "StudyInstanceUID" if name == "study" else "SeriesInstanceUID", uid)
            assert send_raw(assoc, CR, ds.SOPInstanceUID, encode(ds)).Status == 0xC000, name
        valid = [sentinel_image(modality="OT", study_uid=study, series_uid=series, sop_uid=f"{base}.{n}")
                 for n in (4, 40)]
        assert [assoc.send_c_store(ds).Status for ds in valid] == [0, 0]
    assert index_counts(node.settings)["instances"] == before + 2
    paths = [p for p in archived(node.settings) if p.parent.name == series]
    assert sorted(p.name for p in paths) == sorted(f"{ds.SOPInstanceUID}.dcm" for ds in valid)
    count("hostile UIDs", len(cases) + 2)


# --- the index: values it cannot hold, and when it is unreachable ------------------------------------


def test_postgresql_overflow_is_stored_with_the_field_empty(node_settings: Settings, enqueued: Enqueued,
                                                            pg_url: str) -> None:
    node_settings.storage.database_url = pg_url
    ds = sentinel_image(modality="OT")
    ds.InstanceNumber, ds.SeriesNumber, ds.ImagesInAcquisition = "99999999999", "-99999999999", "4294967296"
    ds.PatientName = "Nul\x00Name"
    with Listener(node_settings, enqueue=enqueued):
        with association(node_settings.node.port, (CR, ExplicitVRLittleEndian)) as assoc:
            assert assoc.send_c_store(ds).Status == 0x0000
            assert assoc.send_c_store(ds).Status == 0x0000  # identical re-send: stored once
    assert rows(node_settings, Instance.sop_uid, Instance.instance_number) == [(ds.SOPInstanceUID, None)]
    count("PostgreSQL overflow", 2)


class Proxy:
    """A TCP forwarder to PostgreSQL that the test can cut (the database "unreachable") and restore."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target, self.port = target, free_port()
        self._server: socket.socket | None = None
        self._connections: list[socket.socket] = []

    def start(self) -> "Proxy":
        self._server = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        threading.Thread(target=self._accept, args=(self._server,), daemon=True).start()
        return self

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self._connections += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            self._server.close()
            self._server = None
        for sock in self._connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._connections = []


def test_database_unreachable_answers_retry_then_stores(node_settings: Settings, enqueued: Enqueued,
                                                       pg_url: str) -> None:
    from sqlalchemy.engine import make_url

    url = make_url(pg_url)
    proxy = Proxy((url.host, url.port or 5432)).start()
    node_settings.storage.database_url = url.set(host="127.0.0.1", port=proxy.port).render_as_string(
        hide_password=False)
    node_settings.storage.connect_timeout = 2
    ds = sentinel_image(modality="OT")
    try:
        with Listener(node_settings, enqueue=enqueued) as listener:
            with association(node_settings.node.port, (CR, ExplicitVRLittleEndian)) as assoc:
                proxy.cut()
                started = time.monotonic()
                answer = assoc.send_c_store(ds)
                waited = time.monotonic() - started
                assert answer.Status == 0xA700, answer
                assert probe(node_settings.node.port)[1]  # echo needs no database
                proxy.start()
                assert assoc.send_c_store(ds).Status == 0x0000
            assert temporaries(node_settings) == []
            assert listener.gate.pending == 0
    finally:
        proxy.cut()
    FIGURES["database_unreachable_answer_s"] = round(waited, 2)
    assert waited < 10
    node_settings.storage.database_url = pg_url
    assert rows(node_settings, Instance.sop_uid) == [(ds.SOPInstanceUID,)]
    count("database unreachable", 2)


# --- the worker: pixel limits before decoding -----------------------------------------------------------


def test_worker_refuses_a_decompression_bomb_once_with_the_reason(node_settings: Settings, tmp_path: Path) -> None:
    node = make_node(node_settings, tmp_path)
    bomb = sentinel_image(modality="CR")
    bomb.file_meta.TransferSyntaxUID = JPEG2000Lossless
    bomb.Rows = bomb.Columns = 65535  # a few bytes of "JPEG 2000" declaring 4.3 gigapixels
    from pydicom.encaps import encapsulate

    bomb.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])
    bomb["PixelData"].VR = "OB"
    node.ingest.store_dataset(bomb, is_result=False)
    from sqlalchemy import select

    from storage.models import Series

    with node.sessions() as session:
        series_pk = session.scalar(select(Series.id).where(Series.series_uid == bomb.SeriesInstanceUID))
    job_id = node.add_job(series_pk)
    host = FakeHost(run=lambda pipeline, sources: pytest.fail("pixels reached the pipeline"))
    requeued: list = []
    assert node.runner(host, requeued).run(job_id).value == "failed"
    assert requeued == []
    with node.sessions() as session:
        job = session.get(Job, job_id)
        assert job.state == JobState.failed and job.attempts == 1
        assert "SeriesTooLarge" in job.error and "max_pixels_per_frame" in job.error
        for sentinel in SENTINELS:
            assert sentinel not in job.error
    count("worker decompression bomb", 1)
