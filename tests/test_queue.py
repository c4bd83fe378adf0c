"""The job queue with real brokers, a real index and real worker processes.

Celery round trips on the embedded SQLite broker and on Redis + PostgreSQL, a worker killed
mid-job, two workers racing for one job, no active model, a series re-opened while its job runs,
attempts and the reconciler.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fake_pipelines  # noqa: E402
from deployment import wait_until as wait_for  # noqa: E402
from fake_pipelines import FakeHost, make_cr, worker_command, write_config  # noqa: E402

from config.settings import Settings, load_settings  # noqa: E402
from storage import jobs  # noqa: E402
from inference.worker import JobRunner  # noqa: E402
from node.queue import BrokerUnavailable, JobQueue, celery_config  # noqa: E402
from storage.archive import Archive  # noqa: E402
from storage.db import open_index  # noqa: E402
from storage.ingest import Ingest  # noqa: E402
from storage.models import DispatchState, Instance, Job, JobState, Series, utcnow  # noqa: E402

REDIS_HOST = "127.0.0.1"


# --------------------------------------------------------------------------- helpers


def make_settings(tmp_path: Path, *, database_url: str | None = None, broker_url: str | None = None,
                  **sections: Any) -> Settings:
    values: dict[str, Any] = {
        "storage": {"archive_dir": str(tmp_path / "archive"),
                    "database_url": database_url or f"sqlite:///{tmp_path / 'cradle.db'}"},
        "queue": {"broker_url": broker_url or f"sqla+sqlite:///{tmp_path / 'broker.db'}",
                  "task_time_limit": 60, "visibility_timeout": 120, "reconcile_seconds": 0.5,
                  "max_attempts": 3},
        "models_dir": str(tmp_path / "models"),
        "logging": {"level": "INFO"},
    }
    for key, value in sections.items():
        values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    return load_settings(None, **values)


@dataclass
class Node:
    settings: Settings
    sessions: sessionmaker[Session]
    ingest: Ingest
    tmp_path: Path

    def add_series(self, count: int = 1) -> tuple[int, Dataset]:
        first = make_cr()
        for number in range(count):
            ds = first if number == 0 else make_cr(first.StudyInstanceUID, first.SeriesInstanceUID)
            ds.InstanceNumber = number + 1
            self.ingest.store_dataset(ds, is_result=False)
        with self.sessions() as session:
            series_pk = session.scalar(select(Series.id).where(Series.series_uid == first.SeriesInstanceUID))
        return series_pk, first

    def add_job(self, series_pk: int, pipeline: str = "test-copy") -> int:
        with self.sessions.begin() as session:
            job = Job(series_pk=series_pk, pipeline=pipeline, state=JobState.queued)
            session.add(job)
            session.flush()
            return job.id

    def job(self, job_id: int) -> Job:
        with self.sessions() as session:
            return session.get(Job, job_id)

    def result_instances(self) -> list[Instance]:
        with self.sessions() as session:
            return list(session.scalars(select(Instance).join(Series).where(Series.is_result.is_(True))))

    def runner(self, host: FakeHost, requeued: list | None = None) -> JobRunner:
        sink = requeued if requeued is not None else []
        return JobRunner(self.settings, requeue=lambda job_id, delay: sink.append((job_id, delay)),
                         pipeline_host=lambda _settings: host)


def make_node(settings: Settings, tmp_path: Path) -> Node:
    sessions = open_index(settings.storage.database_url)
    archive = Archive(settings.storage.archive_dir, fsync=False)
    archive.ensure_root()
    return Node(settings, sessions, Ingest(archive, sessions), tmp_path)


class WorkerProcess:
    """``cradle worker`` (with the fake pipelines) as a subprocess in its own process group."""

    def __init__(self, settings: Settings, tmp_path: Path, env: dict[str, str] | None = None) -> None:
        self.config = write_config(settings, tmp_path / "cradle.yaml")
        self.log = tmp_path / "worker.log"
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None

    def start(self) -> "WorkerProcess":
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(worker_command(self.config), env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            cwd=self.config.parent)
        return self

    def kill_group(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
            return None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return make_node(make_settings(tmp_path), tmp_path)


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.stop()


@pytest.fixture
def redis_url() -> Iterator[str]:
    redis = pytest.importorskip("redis")
    db = random.randint(1, 15)
    client = redis.Redis(host=REDIS_HOST, port=6379, db=db)
    try:
        client.flushdb()
    except redis.exceptions.ConnectionError:
        pytest.skip("local Redis not reachable")
    yield f"redis://{REDIS_HOST}:6379/{db}"
    client.flushdb()
    client.close()


def round_trip(node: Node, workers: list[WorkerProcess], env: dict[str, str] | None = None) -> float:
    """Start a worker, enqueue a job through JobQueue, wait for done; return enqueue → done seconds."""
    worker = WorkerProcess(node.settings, node.tmp_path, env).start()
    workers.append(worker)
    queue = JobQueue(node.settings, node.sessions)
    wait_for(lambda: "pipelines loaded" in worker.output(), 90, f"the worker\n{worker.output()[-3000:]}")
    series_pk, source = node.add_series()
    job_id = node.add_job(series_pk)
    started = time.monotonic()
    queue.enqueue(job_id)
    wait_for(lambda: node.job(job_id).state == JobState.done, 60, f"job done\n{worker.output()[-3000:]}")
    elapsed = time.monotonic() - started
    queue.close()
    job = node.job(job_id)
    assert job.attempts == 1 and job.error == "" and job.model_version == fake_pipelines.MODEL_VERSION
    assert job.enqueued_at is not None and job.lease_owner == "" and job.finished_at is not None
    assert job.dispatch_state == DispatchState.pending
    [made] = job.result["instances"]
    expected = fake_pipelines.secondary_capture(source, "test-copy")
    assert made["sop_uid"] == expected.SOPInstanceUID
    assert job.result["summary"] == {"sources": 1, "probability": 0.25}
    archived = [i for i in node.result_instances() if i.sop_uid == made["sop_uid"]]
    assert len(archived) == 1, "the result is archived once"
    stored = dcmread(node.ingest.archive.absolute(archived[0].file_path))
    assert stored.StudyInstanceUID == source.StudyInstanceUID
    print(f"\n[{node.settings.redacted()['queue']['broker_url']}] enqueue -> done: {elapsed:.2f} s")
    return elapsed


# --------------------------------------------------------------------------- configuration


def test_celery_config_follows_the_settings(tmp_path: Path) -> None:
    embedded = celery_config(make_settings(tmp_path))
    assert embedded["broker_url"] == f"sqlite:///{tmp_path / 'broker.db'}"
    assert embedded["broker_transport"] == "node.queue:EmbeddedTransport"
    assert embedded["task_acks_late"] and embedded["task_reject_on_worker_lost"]
    assert embedded["worker_prefetch_multiplier"] == 1 and embedded["task_time_limit"] == 60
    assert embedded["result_backend"] is None and embedded["task_ignore_result"]
    redis = celery_config(make_settings(tmp_path, broker_url="redis://127.0.0.1:6379/3"))
    assert redis["broker_url"] == "redis://127.0.0.1:6379/3" and "broker_transport" not in redis
    assert redis["broker_transport_options"]["visibility_timeout"] == 120 > redis["task_time_limit"]


def test_queue_module_does_not_import_torch() -> None:
    code = ("import sys, node.queue, storage.jobs, inference.worker, node.dispatch, node.sender, node.jobs_commands; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


# --------------------------------------------------------------------------- real workers


def test_round_trip_on_the_embedded_sqlite_broker_and_sigterm(node: Node, workers: list[WorkerProcess]) -> None:
    """Round trip; the embedded broker's delivered messages are pruned; SIGTERM while a job runs
    lets it finish, then the worker exits 0."""
    sleep_file = node.tmp_path / "sleep"
    assert round_trip(node, workers, {"CRADLE_TEST_SLEEP_FILE": str(sleep_file)}) < 5
    queue = JobQueue(node.settings, node.sessions)
    queue.reconciler().run_once()
    with sqlite3.connect(node.tmp_path / "broker.db") as connection:
        assert connection.execute("SELECT count(*) FROM kombu_message WHERE visible = 0").fetchone() == (0,)
    sleep_file.write_text("2")
    job_id = node.add_job(node.add_series()[0])
    queue.enqueue(job_id)
    wait_for(lambda: node.job(job_id).state == JobState.running, 30, "the job to start")
    workers[0].process.send_signal(signal.SIGTERM)
    assert workers[0].process.wait(30) == 0
    job = node.job(job_id)
    assert job.state == JobState.done and job.attempts == 1 and len(node.result_instances()) == 2
    queue.close()


@pytest.mark.redis
@pytest.mark.postgres
def test_round_trip_on_redis_and_postgresql(tmp_path: Path, redis_url: str, pg_url: str,
                                           workers: list[WorkerProcess]) -> None:
    node = make_node(make_settings(tmp_path, database_url=pg_url, broker_url=redis_url), tmp_path)
    assert round_trip(node, workers) < 5


@pytest.mark.parametrize("victim", ["whole worker", "pool child"])
def test_worker_killed_mid_job_completes_once(tmp_path: Path, workers: list[WorkerProcess], victim: str) -> None:
    """SIGKILL while the pipeline runs. The whole worker: the embedded broker's message dies with
    it; the restarted worker's reconciler finds the lease owner gone and re-queues. Only the pool
    child (as the OOM killer would): Celery rejects the message back to the broker and the next
    run takes over the dead child's lease. Either way: done, one result."""
    node = make_node(make_settings(tmp_path), tmp_path)
    runs = tmp_path / "runs"
    sleep_file = tmp_path / "sleep"
    sleep_file.write_text("2")
    env = {"CRADLE_TEST_SLEEP_FILE": str(sleep_file), "CRADLE_TEST_RUNS_DIR": str(runs)}
    worker = WorkerProcess(node.settings, tmp_path, env).start()
    workers.append(worker)
    series_pk, _ = node.add_series()
    job_id = node.add_job(series_pk)
    queue = JobQueue(node.settings, node.sessions)
    queue.enqueue(job_id)
    wait_for(lambda: runs.exists() and any(runs.iterdir()), 90, f"the job to start\n{worker.output()[-3000:]}")
    running = node.job(job_id)
    assert running.state == JobState.running and running.attempts == 1
    sleep_file.write_text("0")  # the run under way has read its 2 s; the next one is quick
    if victim == "whole worker":
        worker.kill_group()
        worker = WorkerProcess(node.settings, tmp_path, env).start()
        workers.append(worker)
    else:
        child_pid = int(running.lease_owner.split("/")[1])
        assert child_pid != worker.process.pid
        os.kill(child_pid, signal.SIGKILL)
    wait_for(lambda: node.job(job_id).state == JobState.done, 120, f"job done\n{worker.output()[-4000:]}")
    job = node.job(job_id)
    assert job.attempts == 2
    assert len(list(runs.iterdir())) == 2
    assert len(node.result_instances()) == 1
    queue.close()


# --------------------------------------------------------------------------- leases


def _race(settings: Settings, job_id: int, barrier: Any, results: Any) -> None:
    host = FakeHost(lambda pipeline, sources: (time.sleep(0.5), fake_pipelines.CopyPipeline().run(sources, None))[1])
    runner = JobRunner(settings, requeue=lambda *_: None, pipeline_host=lambda _s: host)
    runner.resources()
    barrier.wait()
    results.put(runner.run(job_id).value)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_two_workers_racing_for_one_job_run_it_once(tmp_path: Path, database: str,
                                                    request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("pg_url") if database == "postgresql" else None
    runs = tmp_path / "runs"
    os.environ["CRADLE_TEST_RUNS_DIR"] = str(runs)
    try:
        node = make_node(make_settings(tmp_path, database_url=url), tmp_path)
        series_pk, _ = node.add_series()
        job_id = node.add_job(series_pk)
        context = multiprocessing.get_context("fork")
        barrier, results = context.Barrier(4), context.Queue()
        racers = [context.Process(target=_race, args=(node.settings, job_id, barrier, results)) for _ in range(4)]
        for racer in racers:
            racer.start()
        outcomes = sorted(results.get(timeout=60) for _ in racers)
        for racer in racers:
            racer.join(10)
    finally:
        os.environ.pop("CRADLE_TEST_RUNS_DIR", None)
    assert outcomes == ["done", "not-run", "not-run", "not-run"]
    assert len(list(runs.iterdir())) == 1
    assert node.job(job_id).attempts == 1
    assert len(node.result_instances()) == 1


def test_a_live_lease_is_respected_and_a_dead_one_taken_over(node: Node) -> None:
    series_pk, _ = node.add_series()
    job_id = node.add_job(series_pk)
    live = jobs.claim(node.sessions, job_id, jobs.process_identity(), lease_for=60, max_attempts=3)
    assert live is not None and node.job(job_id).state == JobState.running
    assert jobs.claim(node.sessions, job_id, "elsewhere/1/1", lease_for=60, max_attempts=3) is None
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with node.sessions.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(lease_owner=jobs.process_identity(dead.pid)))
    assert jobs.owner_is_dead(jobs.process_identity(dead.pid))
    taken = jobs.claim(node.sessions, job_id, "new/2/2", lease_for=60, max_attempts=3)
    assert taken is not None and taken.attempts == 2
    with node.sessions.begin() as session:  # another host's lease that expired
        session.execute(update(Job).where(Job.id == job_id).values(
            lease_expires_at=utcnow() - dt.timedelta(seconds=1)))
    last = jobs.claim(node.sessions, job_id, "third/3/3", lease_for=60, max_attempts=3)
    assert last is not None and last.attempts == 3
    with node.sessions.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(
            lease_expires_at=utcnow() - dt.timedelta(seconds=1)))
    assert jobs.claim(node.sessions, job_id, "fourth/4/4", lease_for=60, max_attempts=3) is None
    job = node.job(job_id)
    assert job.state == JobState.failed and "worker lost" in job.error and job.attempts == 3


# --------------------------------------------------------------------------- outcomes


def test_no_active_model_is_skipped_with_the_reason_and_nothing_made(node: Node) -> None:
    series_pk, _ = node.add_series()
    job_id = node.add_job(series_pk, "test-nomodel")
    assert node.runner(FakeHost(lambda p, s: fake_pipelines.NoModelPipeline().run(s, None))).run(job_id) \
        == jobs.Finish.skipped
    job = node.job(job_id)
    assert job.state == JobState.skipped and job.error == "no active model for bpd"
    assert job.result is None and job.dispatch_state == DispatchState.none
    assert node.result_instances() == []


def test_the_real_cxr_pipeline_without_models_is_skipped(node: Node) -> None:
    """The real pipeline host and ``cxr`` pipeline, with an empty model registry."""
    pytest.importorskip("inference.pipelines.cxr")
    from inference.worker import PipelineHost

    series_pk, _ = node.add_series()
    job_id = node.add_job(series_pk, "cxr")
    runner = JobRunner(node.settings, requeue=lambda *_: None, pipeline_host=PipelineHost)
    assert runner.run(job_id) == jobs.Finish.skipped
    job = node.job(job_id)
    assert job.state == JobState.skipped and job.error.startswith("no active model for ")
    assert node.result_instances() == []


def test_failures_are_retried_then_failed_with_the_error(node: Node) -> None:
    series_pk, _ = node.add_series()
    job_id = node.add_job(series_pk)
    requeued: list = []

    def broken(pipeline: str, sources: list[Dataset]) -> Any:
        from inference.registry import RegistryError

        raise RegistryError("model exploded\non purpose")

    runner = node.runner(FakeHost(broken), requeued)
    assert [runner.run(job_id) for _ in range(3)] == [jobs.Finish.requeued] * 2 + [jobs.Finish.failed]
    assert [job for job, _delay in requeued] == [job_id, job_id]
    assert requeued[0][1] < requeued[1][1], "the retry delay grows"
    job = node.job(job_id)
    assert job.state == JobState.failed and job.attempts == 3
    assert job.error == "failed on attempt 3 of 3: RegistryError: model exploded on purpose"
    assert runner.run(job_id) == jobs.Finish.not_run, "a failed job is not run again by a stray message"


def test_a_library_error_quoting_a_value_keeps_it_out_of_the_job_and_the_log(
        node: Node, caplog: pytest.LogCaptureFixture) -> None:
    """pydicom and Python quote the value they could not convert; it may be a name or an ID."""
    from pydicom.valuerep import DS

    from common.logs import JsonFormatter, TextFormatter

    series_pk, _ = node.add_series()
    job_id = node.add_job(series_pk)
    sentinel = "SENTINEL^PATIENT"

    def choke(pipeline: str, sources: list[Dataset]) -> Any:
        return DS(sentinel)

    runner = node.runner(FakeHost(choke), [])
    with caplog.at_level("DEBUG", logger="inference"):
        assert runner.run(job_id) == jobs.Finish.requeued
    error = node.job(job_id).error
    assert error.startswith("ValueError (message withheld; raised in pydicom/valuerep.py:"), error
    assert sentinel not in error
    [failure] = [r for r in caplog.records if "attempt 1 failed" in r.getMessage()]
    assert failure.exc_info is not None  # at DEBUG the traceback is logged ...
    for formatter in (TextFormatter(), JsonFormatter("worker")):
        text = formatter.format(failure)
        assert "valuerep.py" in text and "message withheld" in text  # ... with its frames ...
        assert sentinel not in text  # ... but not the message that quotes the value


def test_a_job_already_done_is_not_run_again(node: Node) -> None:
    series_pk, _ = node.add_series()
    job_id = node.add_job(series_pk)
    runner = node.runner(FakeHost())
    assert runner.run(job_id) == jobs.Finish.done
    assert runner.run(job_id) == jobs.Finish.not_run
    assert node.job(job_id).attempts == 1 and len(node.result_instances()) == 1


def test_a_series_reopened_while_running_is_rerun_and_replaces_its_result(node: Node) -> None:
    """The listener's re-completion (node.routing.requeue_jobs) during a run: the running attempt's
    output is discarded, the re-run makes the result again under the same UIDs."""
    from node.routing import requeue_jobs

    series_pk, first = node.add_series(count=2)
    job_id = node.add_job(series_pk)
    late = make_cr(first.StudyInstanceUID, first.SeriesInstanceUID)
    late.InstanceNumber = 3

    def reopened_meanwhile(pipeline: str, sources: list[Dataset]) -> Any:
        output = fake_pipelines.CopyPipeline().run(sources, None)
        if len(sources) == 2:
            node.ingest.store_dataset(late, is_result=False)
            with node.sessions.begin() as session:
                requeue_jobs(session, series_pk, [pipeline])
        return output

    runner = node.runner(FakeHost(reopened_meanwhile))
    assert runner.run(job_id) in (jobs.Finish.requeued, jobs.Finish.lost)
    assert node.job(job_id).state == JobState.queued and node.result_instances() == []
    assert runner.run(job_id) == jobs.Finish.done
    job = node.job(job_id)
    assert job.generation == 2 and job.result["generation"] == 2 and job.result["summary"]["sources"] == 3
    [made] = node.result_instances()
    assert dcmread(node.ingest.archive.absolute(made.file_path)).PixelData[0] == 3


def test_a_rerun_with_the_same_uids_replaces_the_archived_result(node: Node) -> None:
    series_pk, _ = node.add_series()
    job_id = node.add_job(series_pk)
    values = iter([7, 9])

    def run(pipeline: str, sources: list[Dataset]) -> Any:
        output = fake_pipelines.CopyPipeline().run(sources, None)
        output.datasets = [fake_pipelines.secondary_capture(sources[0], "test-copy", value=next(values))]
        return output

    runner = node.runner(FakeHost(run))
    assert runner.run(job_id) == jobs.Finish.done
    with node.sessions.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(state=JobState.failed))
    assert jobs.retry(node.sessions, job_id) == jobs.RetryAction.rerun
    assert runner.run(job_id) == jobs.Finish.done
    [made] = node.result_instances()
    assert dcmread(node.ingest.archive.absolute(made.file_path)).PixelData[0] == 9
    assert node.job(job_id).dispatch_round == 2


# --------------------------------------------------------------------------- reconciler


def test_reconciler_requeues_lost_and_stale_jobs_with_the_attempts_cap(node: Node) -> None:
    series = [node.add_series()[0] for _ in range(4)]
    never_sent, recent, stale, exhausted = (node.add_job(pk) for pk in series)
    just_created = node.add_job(node.add_series()[0])
    now = utcnow()
    with node.sessions.begin() as session:
        session.execute(update(Job).where(Job.id != just_created).values(
            created_at=now - dt.timedelta(seconds=jobs.NEW_JOB_GRACE_SECONDS + 1)))
        session.execute(update(Job).where(Job.id == recent).values(enqueued_at=now))
        session.execute(update(Job).where(Job.id == stale).values(
            state=JobState.running, attempts=1, lease_owner="gone/1/1",
            lease_expires_at=now - dt.timedelta(seconds=5)))
        session.execute(update(Job).where(Job.id == exhausted).values(
            state=JobState.running, attempts=3, lease_owner="gone/1/1",
            lease_expires_at=now - dt.timedelta(seconds=5)))
    enqueued: list[int] = []
    report = jobs.Reconciler(node.sessions, enqueued.append, node.settings.queue).run_once()
    assert sorted(enqueued) == sorted([never_sent, stale])
    assert (report.requeued_lost, report.requeued_stale, report.failed_stale) == (1, 1, 1)
    assert node.job(stale).state == JobState.queued and node.job(stale).lease_owner == ""
    assert node.job(exhausted).state == JobState.failed and "attempt 3 of 3" in node.job(exhausted).error
    assert node.job(recent).state == JobState.queued and node.job(just_created).state == JobState.queued


def test_broker_down_leaves_the_job_for_the_reconciler(tmp_path: Path) -> None:
    node = make_node(make_settings(tmp_path, broker_url="redis://127.0.0.1:1/0"), tmp_path)
    series_pk, _ = node.add_series()
    job_id = node.add_job(series_pk)
    queue = JobQueue(node.settings, node.sessions)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        queue.enqueue(job_id)
    print(f"\nbroker down: enqueue gave up after {time.monotonic() - started:.1f} s")
    assert time.monotonic() - started < 10
    assert node.job(job_id).enqueued_at is None
    with node.sessions.begin() as session:
        session.execute(update(Job).values(created_at=utcnow() - dt.timedelta(seconds=jobs.NEW_JOB_GRACE_SECONDS + 1)))
    report = queue.reconciler().run_once()  # the broker is still down: logged, the job stays queued
    assert report.requeued_lost == 1 and node.job(job_id).state == JobState.queued
    queue.close()


def test_an_unknown_pipeline_fails_at_once(node: Node) -> None:
    from inference.worker import PipelineHost

    pytest.importorskip("inference.pipelines.cxr")
    job_id = node.add_job(node.add_series()[0], "no-such-pipeline")
    runner = JobRunner(node.settings, requeue=lambda *_: None, pipeline_host=PipelineHost)
    assert runner.run(job_id) == jobs.Finish.failed
    job = node.job(job_id)
    assert job.attempts == 1 and job.error.startswith("UnknownPipeline: unknown pipeline 'no-such-pipeline'")


def test_the_time_limit_stops_a_job_that_hangs(tmp_path: Path, workers: list[WorkerProcess]) -> None:
    """The pool enforces queue.task_time_limit; each overrun is an attempt, retried after a delay,
    and the last one fails the job with the reason."""
    settings = make_settings(tmp_path, queue={"task_time_limit": 3, "visibility_timeout": 10})
    node = make_node(settings, tmp_path)
    worker = WorkerProcess(settings, tmp_path, {"CRADLE_TEST_SLEEP": "60"}).start()
    workers.append(worker)
    job_id = node.add_job(node.add_series()[0])
    JobQueue(settings, node.sessions).enqueue(job_id)
    wait_for(lambda: node.job(job_id).state == JobState.failed, 90, f"job failed\n{worker.output()[-3000:]}")
    job = node.job(job_id)
    assert job.attempts == 3 and job.error == "failed on attempt 3 of 3: over the time limit of 3 s"
    assert node.result_instances() == []
