"""Worker throughput benchmark: jobs per second with one ``cradle worker`` process, then with two on the
same queue, and their ratio.

    python -m benchmarks.workers [--jobs 24] [--cpu-seconds 0.25] [--workdir DIR] [--json]
                                 [--database-url URL | --sqlite] [--broker-url URL]

The production path: each worker is a real ``cradle worker`` subprocess (Celery prefork, one pool
child, leases on the job rows), the broker a redis-server started here on a free port (or
``--broker-url``), the index a fresh PostgreSQL database on the local server (or ``--database-url``;
``--sqlite`` for a SQLite index and the embedded SQLite broker). The pipeline is the tests' stand-in
``test-copy`` told to keep one CPU core busy for ``--cpu-seconds`` per job (a small CPU model's
forward pass) before it writes its one Secondary Capture result; the workers use the light
pipeline host that does not import torch (start-up is not what is measured).

Phase 1 starts one worker, waits until it is ready, enqueues ``--jobs`` jobs and times until all are
done. Phase 2 starts a second worker beside the first and does the same with as many new jobs.
Reported: seconds and jobs/s of each phase, the ratio (two / one; the ideal on two free cores is 2),
and the pipeline runs per phase (each job must run exactly once).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@dataclass
class WorkersReport:
    jobs: int
    cpu_seconds: float
    index: str
    broker: str
    one_worker_seconds: float
    two_workers_seconds: float
    runs_one: int
    runs_two: int
    cores: int

    @property
    def one_worker_jobs_per_second(self) -> float:
        return self.jobs / self.one_worker_seconds

    @property
    def two_workers_jobs_per_second(self) -> float:
        return self.jobs / self.two_workers_seconds

    @property
    def ratio(self) -> float:
        return self.two_workers_jobs_per_second / self.one_worker_jobs_per_second

    def as_dict(self) -> dict:
        return {**asdict(self), "one_worker_jobs_per_second": self.one_worker_jobs_per_second,
                "two_workers_jobs_per_second": self.two_workers_jobs_per_second, "ratio": self.ratio}

    def summary(self) -> str:
        return (f"{self.jobs} jobs per phase, {self.cpu_seconds:.2f} s of CPU each; index {self.index}, "
                f"broker {self.broker}; {self.cores} cores\n"
                f"  one worker : {self.one_worker_seconds:6.2f} s  {self.one_worker_jobs_per_second:6.2f} jobs/s "
                f"({self.runs_one} pipeline runs)\n"
                f"  two workers: {self.two_workers_seconds:6.2f} s  {self.two_workers_jobs_per_second:6.2f} jobs/s "
                f"({self.runs_two} pipeline runs)\n"
                f"  ratio two / one: {self.ratio:.2f}  (ideal on two free cores: 2.0)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _create_pg_database() -> tuple[str, callable] | None:
    try:
        from sqlalchemy import create_engine, text

        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        name = f"cradle_bench_{uuid.uuid4().hex[:10]}"
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception:  # noqa: BLE001 - no local PostgreSQL: fall back to SQLite
        return None

    def drop() -> None:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", drop


def run(jobs: int, cpu_seconds: float, workdir: Path, database_url: str | None = None,
        broker_url: str | None = None, sqlite: bool = False) -> WorkersReport:
    sys.path.insert(0, str(TESTS))
    from deployment import Part, RedisServer, node_values, part_env, wait_until, write_config, write_sitecustomize
    from fake_pipelines import make_cr

    from config.settings import load_settings
    from node.queue import JobQueue
    from storage.archive import Archive
    from storage.db import open_index
    from storage.ingest import Ingest
    from storage.models import Job, JobState, Series

    cleanups = []
    redis = None
    try:
        if sqlite:
            database_url = database_url or f"sqlite:///{workdir / 'cradle.db'}"
            broker_url = broker_url or f"sqla+sqlite:///{workdir / 'broker.db'}"
        if database_url is None:
            made = _create_pg_database()
            if made is None:
                database_url = f"sqlite:///{workdir / 'cradle.db'}"
            else:
                database_url, drop = made
                cleanups.append(drop)
        if broker_url is None:
            if shutil.which("redis-server"):
                redis = RedisServer(_free_port(), workdir / "redis").start()
                broker_url = redis.url
            else:
                broker_url = f"sqla+sqlite:///{workdir / 'broker.db'}"
        values = node_values(workdir, port=_free_port(), database_url=database_url, broker_url=broker_url,
                             queue={"task_time_limit": 120, "visibility_timeout": 300, "reconcile_seconds": 5})
        config = write_config(values, workdir / "cradle.yaml")
        runs = workdir / "runs"
        env = part_env(write_sitecustomize(workdir / "site"), CRADLE_TEST_CPU=str(cpu_seconds),
                       CRADLE_TEST_RUNS_DIR=str(runs))
        settings = load_settings(config)
        sessions = open_index(database_url)
        archive = Archive(settings.storage.archive_dir, fsync=True)
        archive.ensure_root()
        ingest = Ingest(archive, sessions)
        queue = JobQueue(settings, sessions)
        workers: list[Part] = []

        def phase(name: str) -> tuple[float, int]:
            job_ids = []
            for _ in range(jobs):
                source = make_cr()
                ingest.store_dataset(source, is_result=False)
                with sessions.begin() as session:
                    series_pk = session.query(Series.id).filter_by(series_uid=source.SeriesInstanceUID).scalar()
                    job = Job(series_pk=series_pk, pipeline="test-copy", state=JobState.queued)
                    session.add(job)
                    session.flush()
                    job_ids.append(job.id)
            before = len(list(runs.iterdir())) if runs.exists() else 0
            started = time.monotonic()
            for job_id in job_ids:
                queue.enqueue(job_id)

            def finished() -> bool:
                with sessions() as session:
                    return session.query(Job).filter(Job.id.in_(job_ids), Job.state == JobState.done).count() == jobs

            wait_until(finished, 60 + jobs * cpu_seconds * 3, f"{name}: {jobs} jobs done", interval=0.02)
            elapsed = time.monotonic() - started
            return elapsed, len(list(runs.iterdir())) - before

        try:
            for name in ("worker-1", "worker-2"):
                workers.append(Part("worker", config, workdir / f"{name}.log", env).start())
                wait_until(lambda: "pipelines loaded" in workers[-1].output() or not workers[-1].alive(), 120,
                           f"{name} to be ready")
                if not workers[-1].alive():
                    raise RuntimeError(f"{name} exited:\n{workers[-1].output()[-3000:]}")
                if name == "worker-1":
                    one, runs_one = phase("one worker")
                else:
                    two, runs_two = phase("two workers")
        finally:
            queue.close()
            for worker in workers:
                worker.stop()
            sessions.kw["bind"].dispose()
        index = "postgresql" if database_url.startswith("postgresql") else "sqlite"
        broker = "redis" if broker_url.startswith("redis") else "sqlite"
        return WorkersReport(jobs, cpu_seconds, index, broker, one, two, runs_one, runs_two, os.cpu_count() or 1)
    finally:
        if redis is not None:
            redis.stop()
        for cleanup in cleanups:
            cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.workers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=24, help="jobs per phase")
    parser.add_argument("--cpu-seconds", type=float, default=0.25, help="CPU time of one job's pipeline")
    parser.add_argument("--workdir", type=Path, default=None, help="keep everything here (default: a temp dir)")
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--broker-url", default=None)
    parser.add_argument("--sqlite", action="store_true", help="SQLite index and embedded SQLite broker")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        report = run(args.jobs, args.cpu_seconds, args.workdir, args.database_url, args.broker_url, args.sqlite)
    else:
        with tempfile.TemporaryDirectory(prefix="cradle-bench-workers-") as tmp:
            report = run(args.jobs, args.cpu_seconds, Path(tmp), args.database_url, args.broker_url, args.sqlite)
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
