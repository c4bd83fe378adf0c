"""The production path over real connections: ``cradle listen``, ``cradle worker`` and ``cradle
dispatch`` as separate processes, a Redis broker of the test's own and a PostgreSQL index.

* The fault test: 200 instances from 4 parallel senders; meanwhile Redis is restarted once (every
  message in it lost) and the worker is killed with SIGKILL once; afterwards every instance is
  archived once, every job done once with one result, every result delivered once, and the
  listener answered nothing but 0x0000 or 0xA700.
* Two workers on one queue, every job enqueued twice: no job runs twice.
* The PHI sentinel test: identifiers that must never leave the index and the archive, pushed
  through a full run (embedded ``cradle serve``, and the production parts), then searched for in
  every log, the audit trail and everything the broker stored.

The parts run the stand-in pipeline ``test-copy`` (tests/fake_pipelines.py) on a pipeline host that
does not import torch (``CRADLE_TEST_LIGHT_HOST``); everything else is the real node.
"""

from __future__ import annotations

import base64
import json
import re
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification
from sqlalchemy import func, select

from conftest import free_port
from deployment import Part, RedisServer, node_values, part_env, wait_until, write_config, write_sitecustomize
from storage.db import open_index
from storage.models import DispatchState, Instance, Job, JobState, Series
from test_dispatch import StoreSCP
from test_listener import dcmtk
from test_security import audit_events, scrape
from test_storage import make_image, make_mr_slice

pytestmark = [pytest.mark.slow]


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    pytest.importorskip("redis")
    server = RedisServer(free_port(), tmp_path / "redis")
    if server.binary is None:
        pytest.skip("redis-server is not installed")
    server.start()
    yield server
    server.stop()


@dataclass
class Deployment:
    tmp_path: Path
    values: dict
    env: dict
    config: Path
    parts: dict[str, Part] = field(default_factory=dict)

    @classmethod
    def create(cls, tmp_path: Path, values: dict, **env: str) -> "Deployment":
        site = write_sitecustomize(tmp_path / "site")
        return cls(tmp_path, values, part_env(site, CRADLE_TEST_RUNS_DIR=str(tmp_path / "runs"), **env),
                   write_config(values, tmp_path / "cradle.yaml"))

    def start(self, part: str, name: str | None = None) -> Part:
        name = name or part
        process = Part(part, self.config, self.tmp_path / f"{name}.log", self.env).start()
        self.parts[name] = process
        return process

    def stop(self) -> None:
        for part in self.parts.values():
            part.stop()

    def logs(self) -> str:
        return "\n".join(p.output() for p in self.parts.values())

    @property
    def port(self) -> int:
        return self.values["node"]["port"]

    def runs(self) -> list[str]:
        directory = self.tmp_path / "runs"
        return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def wait_for_echo(port: int, part: Part, timeout: float = 60) -> None:
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)

    def answered() -> bool:
        assert part.alive(), part.output()[-3000:]
        assoc = ae.associate("127.0.0.1", port, ae_title="CRADLE")
        if assoc.is_established:
            assoc.release()
            return True
        return False

    wait_until(answered, timeout, "the listener", interval=0.2)


def wait_for_worker(part: Part, timeout: float = 90) -> None:
    wait_until(lambda: "pipelines loaded" in part.output() or not part.alive(), timeout, "the worker")
    assert part.alive(), part.output()[-3000:]


# --- senders ---------------------------------------------------------------------------------------


@dataclass
class Sender:
    """A modality's C-STORE SCU: one association at a time, each instance retried on 0xA700 or when
    the association breaks (as DCMTK and modalities do)."""

    calling: str
    port: int
    datasets: list[Dataset]
    throttle: float = 0.0
    statuses: list[int] = field(default_factory=list)
    associations: int = 0
    errors: list[str] = field(default_factory=list)

    def run(self, deadline: float) -> None:
        ae = AE(ae_title=self.calling)
        ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
        ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        ae.dimse_timeout = ae.network_timeout = 60
        pending = list(self.datasets)
        while pending and time.monotonic() < deadline:
            assoc = ae.associate("127.0.0.1", self.port, ae_title="CRADLE")
            self.associations += 1
            if not assoc.is_established:
                self.errors.append("association not established")
                time.sleep(0.5)
                continue
            while pending and assoc.is_established and time.monotonic() < deadline:
                answer = assoc.send_c_store(pending[0])
                if "Status" not in answer:
                    self.errors.append("no answer")
                    break
                self.statuses.append(int(answer.Status))
                if int(answer.Status) == 0xA700:
                    time.sleep(0.5)
                    continue
                pending.pop(0)
                time.sleep(self.throttle)
            if assoc.is_established:
                assoc.release()
        assert not pending, f"{self.calling}: {len(pending)} instances not sent"


def fault_test_datasets(sender: int) -> list[Dataset]:
    """25 single CR images and 5 MR series of 5 slices: 50 instances, 30 jobs."""
    datasets = [make_image(patient_id=f"NEO{sender}{i:03d}", size=16) for i in range(25)]
    for _ in range(5):
        study = make_image().StudyInstanceUID
        series = make_image().SeriesInstanceUID
        datasets += [make_mr_slice(study_uid=study, series_uid=series, instance_number=n, images_in_acquisition=5,
                                   size=16, patient_id=f"NEO{sender}MR") for n in range(1, 6)]
    return datasets


# --- the fault test -----------------------------------------------------------------------------------


def test_fault_tolerance_200_instances_4_senders_worker_killed_redis_restarted(
        tmp_path: Path, own_redis: RedisServer, pg_url: str) -> None:
    pacs = StoreSCP(free_port()).start()
    metrics_port = free_port()
    values = node_values(tmp_path, port=free_port(), database_url=pg_url, broker_url=own_redis.url,
                         pacs_port=pacs.port, node={"metrics_port": metrics_port})
    deployment = Deployment.create(tmp_path, values, CRADLE_TEST_SLEEP="0.05")
    sessions = open_index(pg_url)
    senders = [Sender(f"SENDER{k}", deployment.port, fault_test_datasets(k), throttle=0.04) for k in range(1, 5)]
    faults: dict[str, float] = {}
    try:
        listener = deployment.start("listen")
        worker = deployment.start("worker")
        deployment.start("dispatch")
        wait_for_echo(deployment.port, listener)
        wait_for_worker(worker)

        def count(query) -> int:  # noqa: ANN001 - a select of one count
            with sessions() as session:
                return session.scalar(query)

        sources = select(func.count()).select_from(Instance).join(Series).where(Series.is_result.is_(False))
        done = select(func.count()).select_from(Job).where(Job.state == JobState.done)
        running = select(func.count()).select_from(Job).where(Job.state == JobState.running)
        started = time.monotonic()
        deadline = started + 150
        threads = [threading.Thread(target=s.run, args=(deadline,), name=s.calling) for s in senders]
        for thread in threads:
            thread.start()

        wait_until(lambda: count(sources) >= 50, 60, "50 instances archived")
        own_redis.restart()  # every message in Redis is lost
        faults["redis restarted at instances"] = count(sources)
        wait_until(lambda: count(done) >= 20 and count(running) >= 1, 60, "a job running after 20 done", 0.005)
        worker.kill()  # SIGKILL the worker and its pool child mid-job
        faults["worker killed at jobs done"] = count(done)
        faults["instances archived then"] = count(sources)
        worker = deployment.start("worker", "worker-2")
        for thread in threads:
            thread.join(timeout=max(1, deadline - time.monotonic()))
        sending = time.monotonic() - started
        wait_until(lambda: _all_delivered(sessions, 120), 120,
                   f"120 jobs done and delivered\n{deployment.logs()[-4000:]}", interval=0.2)
        elapsed = time.monotonic() - started
        samples = scrape(metrics_port)
    finally:
        deployment.stop()
        pacs.stop()

    statuses = Counter(code for s in senders for code in s.statuses)
    # the listener answered nothing but success or "out of resources, retry"
    assert set(statuses) <= {0x0000, 0xA700}, statuses
    sent = [ds for s in senders for ds in s.datasets]
    assert len(sent) == 200 and len({ds.SOPInstanceUID for ds in sent}) == 200
    with sessions() as session:
        source_rows = session.execute(select(Instance.sop_uid, Instance.file_path).join(Series)
                                      .where(Series.is_result.is_(False))).all()
        result_rows = session.execute(select(Instance.sop_uid, Instance.file_path).join(Series)
                                      .where(Series.is_result.is_(True))).all()
        jobs = session.scalars(select(Job)).all()
    archive = Path(values["storage"]["archive_dir"])
    files = {p.relative_to(archive).as_posix() for p in archive.rglob("*.dcm")}
    # every instance archived exactly once: one row, one file, and nothing else
    assert sorted(uid for uid, _ in source_rows) == sorted(ds.SOPInstanceUID for ds in sent)
    assert {path for _, path in source_rows} | {path for _, path in result_rows} == files
    assert list(archive.rglob("*.part")) == []
    # every job done exactly once, with one result each, delivered once
    assert len(jobs) == 120 and all(j.state == JobState.done and j.dispatch_state == DispatchState.sent for j in jobs)
    assert all(len(j.result["instances"]) == 1 for j in jobs)
    result_uids = [j.result["instances"][0]["sop_uid"] for j in jobs]
    assert len(set(result_uids)) == 120 and sorted(result_uids) == sorted(uid for uid, _ in result_rows)
    trail = tmp_path / "audit.jsonl"
    done_events = Counter(e["job_id"] for e in audit_events(trail, "job.done"))
    assert sorted(done_events) == sorted(j.id for j in jobs) and set(done_events.values()) == {1}
    assert Counter(e["result_uids"][0] for e in audit_events(trail, "job.done")) == Counter(result_uids)
    delivered = Counter(pacs.stored)
    assert sorted(delivered) == sorted(result_uids) and set(delivered.values()) == {1}
    runs = deployment.runs()
    rerun = [j.id for j in jobs if j.attempts > 1]
    assert len(runs) >= 120 and len(rerun) >= 1, "the killed worker's job ran again"
    assert samples[("cradle_instances_received_total", (("outcome", "stored"),))] == 200
    print(f"\nfault test: {len(sent)} instances from 4 senders in {sending:.1f} s "
          f"({sum(s.associations for s in senders)} associations), all done and delivered after {elapsed:.1f} s; "
          f"{dict(faults)}; C-STORE statuses {{{', '.join(f'0x{k:04X}: {v}' for k, v in sorted(statuses.items()))}}}; "
          f"sender errors {sum(len(s.errors) for s in senders)}; {len(jobs)} jobs done once each "
          f"(re-run after the kill: {rerun}, attempts {[j.attempts for j in jobs if j.id in rerun]}); "
          f"{len(runs)} pipeline runs; {len(delivered)} results delivered once each")


def _all_delivered(sessions, expected: int) -> bool:  # noqa: ANN001 - sessionmaker
    with sessions() as session:
        rows = session.execute(select(Job.state, Job.dispatch_state, func.count())
                               .group_by(Job.state, Job.dispatch_state)).all()
    return {(s, d): n for s, d, n in rows} == {(JobState.done, DispatchState.sent): expected}


# --- two workers on one queue ---------------------------------------------------------------------------


def test_two_workers_share_one_queue_and_no_job_runs_twice(tmp_path: Path, own_redis: RedisServer,
                                                           pg_url: str) -> None:
    """40 jobs, each enqueued twice (as a reconciler re-send would): two worker processes share them;
    each pipeline ran once per job (marker files), every job done on its first attempt."""
    from test_queue import make_node

    from config.settings import load_settings
    from node.queue import JobQueue

    values = node_values(tmp_path, port=free_port(), database_url=pg_url, broker_url=own_redis.url)
    deployment = Deployment.create(tmp_path, values, CRADLE_TEST_SLEEP="0.05")
    node = make_node(load_settings(deployment.config), tmp_path)
    job_ids = [node.add_job(node.add_series()[0], "test-copy") for _ in range(40)]
    queue = JobQueue(node.settings, node.sessions)
    try:
        first, second = deployment.start("worker", "worker-a"), deployment.start("worker", "worker-b")
        wait_for_worker(first)
        wait_for_worker(second)
        for job_id in job_ids + job_ids:
            queue.enqueue(job_id)
        wait_until(lambda: all(node.job(j).state == JobState.done for j in job_ids), 90,
                   f"40 jobs done\n{deployment.logs()[-3000:]}", interval=0.1)
        time.sleep(1.0)  # let the duplicate messages reach the workers and be turned away
    finally:
        queue.close()
        deployment.stop()
    runs = deployment.runs()
    per_series = Counter(name.split("-")[1] for name in runs)
    pids = Counter(name.split("-")[0] for name in runs)
    assert len(runs) == 40 and set(per_series.values()) == {1}, per_series.most_common(3)
    assert len(pids) == 2, f"both workers took jobs: {pids}"
    assert all(node.job(j).attempts == 1 for j in job_ids)
    running = Counter(e["job_id"] for e in audit_events(tmp_path / "audit.jsonl", "job.running"))
    assert set(running.values()) == {1} and len(running) == 40
    turned_away = sum(p.output().count("already done; nothing to do") for p in deployment.parts.values())
    print(f"\ntwo workers: 40 jobs x 2 messages; pipeline runs {len(runs)}, per worker process "
          f"{sorted(pids.values())}; duplicate messages turned away: {turned_away}")


# --- PHI sentinels ---------------------------------------------------------------------------------------

SENTINELS = {
    "PatientName": "Zentinelfamily^Zentinelgiven",
    "PatientID": "ZNTPID4471",
    "PatientBirthDate": "20240229",
    "AccessionNumber": "ZNTACC9902",
    "OtherPatientIDs": "ZNTOTHER3318",
}
NEEDLES = ("Zentinelfamily", "Zentinelgiven", "ZNTPID4471", "20240229", "2024-02-29", "29.02.2024",
           "ZNTACC9902", "ZNTOTHER3318")
_BASE64 = re.compile(rb"[A-Za-z0-9+/]{16,}={0,2}")


def sentinel_datasets() -> list[Dataset]:
    cr = make_image(birth_date=SENTINELS["PatientBirthDate"], study_date="20240301", size=16,
                    patient_id=SENTINELS["PatientID"], patient_name=SENTINELS["PatientName"],
                    accession=SENTINELS["AccessionNumber"])
    cr.OtherPatientIDs = SENTINELS["OtherPatientIDs"]
    study, series = make_image().StudyInstanceUID, make_image().SeriesInstanceUID
    mr = [make_mr_slice(study_uid=study, series_uid=series, instance_number=n, images_in_acquisition=3, size=16,
                        birth_date=SENTINELS["PatientBirthDate"], study_date="20240301",
                        patient_id=SENTINELS["PatientID"], patient_name=SENTINELS["PatientName"],
                        accession=SENTINELS["AccessionNumber"]) for n in (1, 2, 3)]
    for ds in mr:
        ds.OtherPatientIDs = SENTINELS["OtherPatientIDs"]
    return [cr, *mr]


def sentinels_in(blob: bytes) -> set[str]:
    """The sentinels in ``blob``, as they are or inside base64 (Celery message bodies) or JSON escapes."""
    found = {n for n in NEEDLES if n.encode() in blob or n.replace("^", "\\u005e").encode() in blob}
    for token in _BASE64.findall(blob):
        for candidate in (token, token + b"=" * (-len(token) % 4)):
            try:
                decoded = base64.b64decode(candidate, validate=False)
            except ValueError:
                continue
            found |= {n for n in NEEDLES if n.encode() in decoded}
    return found


@pytest.mark.parametrize("path", ["embedded serve", "redis+postgresql"])
def test_phi_sentinels_appear_in_no_log_audit_or_broker(tmp_path: Path, path: str,
                                                        request: pytest.FixtureRequest) -> None:
    """A CR and an MR series carrying sentinel identifiers go through a full run at DEBUG (JSON logs
    for the production parts): received, routed, two jobs run, results sent to a PACS. Then every log
    line, the audit trail, and what the broker stored (SQLite broker file; every Redis command via
    MONITOR, and every key left) are searched: no sentinel anywhere."""
    pacs = StoreSCP(free_port()).start()
    port = free_port()
    monitor = None
    if path == "embedded serve":
        values = node_values(tmp_path, port=port, database_url=f"sqlite:///{tmp_path / 'cradle.db'}",
                             broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}", pacs_port=pacs.port,
                             logging={"level": "DEBUG"})
    else:
        redis = request.getfixturevalue("own_redis")
        values = node_values(tmp_path, port=port, database_url=request.getfixturevalue("pg_url"),
                             broker_url=redis.url, pacs_port=pacs.port, logging={"level": "DEBUG", "format": "json"})
        monitor_log = open(tmp_path / "redis-monitor.log", "wb")
        monitor = subprocess.Popen(["redis-cli", "-p", str(redis.port), "monitor"], stdout=monitor_log,
                                   stderr=subprocess.STDOUT)
    deployment = Deployment.create(tmp_path, values)
    tap = SqliteBrokerTap(tmp_path / "broker.db") if path == "embedded serve" else None
    files = []
    for i, ds in enumerate(sentinel_datasets()):
        files.append(tmp_path / "push" / f"{i}.dcm")
        files[-1].parent.mkdir(exist_ok=True)
        ds.save_as(files[-1], enforce_file_format=True)
    try:
        if tap is not None:
            tap.start()
        if path == "embedded serve":
            serve = deployment.start("serve")
            wait_for_echo(port, serve)
            wait_for_worker(serve)
        else:
            listener = deployment.start("listen")
            worker = deployment.start("worker")
            deployment.start("dispatch")
            wait_for_echo(port, listener)
            wait_for_worker(worker)
        pushed = subprocess.run([dcmtk("storescu"), "-aet", "STORESCU", "-aec", "CRADLE", "127.0.0.1", str(port),
                                 *map(str, files)], capture_output=True, text=True, timeout=60)
        assert pushed.returncode == 0, pushed.stderr
        wait_until(lambda: len(pacs.stored) >= 2, 60, f"two results at the PACS\n{deployment.logs()[-3000:]}")
        time.sleep(1.0)  # the reconciler's housekeeping and the last log lines
        redis_keys = b""
        if monitor is not None:
            client = request.getfixturevalue("own_redis").client()
            for key in client.keys("*"):
                redis_keys += key + b"=" + repr(_redis_value(client, key)).encode() + b"\n"
            client.close()
    finally:
        if tap is not None:
            tap.stop()
        deployment.stop()
        pacs.stop()
        if monitor is not None:
            monitor.terminate()
            monitor.wait(10)

    logs = deployment.logs()
    assert "job" in logs and len(pacs.stored) == 2
    assert "DEBUG" in logs, "the parts logged at DEBUG"
    searched = {"logs": logs.encode(), "audit": (tmp_path / "audit.jsonl").read_bytes(),
                "audit config": Path(f"{tmp_path / 'audit.jsonl'}.config.json").read_bytes()}
    if monitor is not None:
        searched["redis commands (MONITOR)"] = (tmp_path / "redis-monitor.log").read_bytes()
        searched["redis keys"] = redis_keys
        assert b"cradle.run_job" in searched["redis commands (MONITOR)"], "the monitor saw the task messages"
    else:
        searched["sqlite broker (every message seen)"] = "\n".join(tap.messages.values()).encode()
        searched["sqlite broker (files)"] = b"".join(p.read_bytes() for p in tmp_path.glob("broker.db*"))
        assert len(tap.messages) >= 2 and all("cradle.run_job" in m for m in tap.messages.values()), tap.messages
    events = audit_events(tmp_path / "audit.jsonl")
    assert {"association.accepted", "instance.received", "job.done", "result.sent"} <= {e["event"] for e in events}
    assert sentinels_in(base64.b64encode(b'{"PatientID": "ZNTPID4471"}')) == {"ZNTPID4471"}  # the search works
    leaks = {where: sentinels_in(blob) for where, blob in searched.items()}
    assert all(not found for found in leaks.values()), leaks
    # the sentinels were there to be found: in the index and the archive (where they belong)
    archived = b"".join(p.read_bytes() for p in Path(values["storage"]["archive_dir"]).rglob("*.dcm"))
    assert {"Zentinelfamily", "ZNTPID4471", "20240229", "ZNTACC9902", "ZNTOTHER3318"} <= sentinels_in(archived)
    print(f"\nPHI sentinels ({path}): searched " + ", ".join(f"{where} {len(blob) // 1024} KB"
                                                          for where, blob in searched.items())
          + f"; {len(events)} audit events; found none")


class SqliteBrokerTap(threading.Thread):
    """Reads every message row of the embedded broker while it exists (every 20 ms): a delivered
    message is deleted by the reconciler's housekeeping, so the file alone would prove nothing."""

    def __init__(self, database: Path) -> None:
        super().__init__(name="broker-tap", daemon=True)
        self.database = database
        self.messages: dict[int, str] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.02):
            if not self.database.exists():
                continue
            try:
                with sqlite3.connect(f"file:{self.database}?mode=ro", uri=True, timeout=1) as connection:
                    self.messages.update(connection.execute("SELECT id, payload FROM kombu_message").fetchall())
            except sqlite3.Error:
                continue  # no table yet, or busy

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def _redis_value(client, key: bytes) -> object:  # noqa: ANN001 - redis.Redis
    kind = client.type(key)
    if kind == b"string":
        return client.get(key)
    if kind == b"list":
        return client.lrange(key, 0, -1)
    if kind == b"hash":
        return client.hgetall(key)
    if kind == b"set":
        return client.smembers(key)
    if kind == b"zset":
        return client.zrange(key, 0, -1, withscores=True)
    return kind
