"""The archive at scale: C-STORE ingest, status, jobs and the scrape at 0 and at 1,000,000 indexed
instances (SQLite and PostgreSQL), and the listener's start with an empty archive and a full one.

    python -m benchmarks.archive_scale [--rows 1000000] [--count 300] [--size-mb 0.5] [--repeat 2]
                                       [--backends sqlite postgresql] [--start-files 20000] [--json]

Per backend, two indexes are made in the same run: an empty one and one filled with ``--rows``
instances by the bulk helper (``benchmarks/index_fill.py``: rows only, the files they name need not
exist). ``cradle listen`` on each is pushed ``--count`` new MR slices by DCMTK ``storescu`` (a fresh
series per push, a fresh archive directory, the page cache flushed between pushes, the two indexes
alternating), ``--repeat`` times each. Reported: the median push time on each and their ratio
(empty / filled: 1.0 means ingest does not slow down as the index grows; target ≥ 0.9).

On the filled index, after a push: the Prometheus scrape of the running listener (the first, so not
from its cache), ``cradle status --json`` and ``cradle jobs list --json`` as processes (wall time,
interpreter start included), the same queries in this process (the scrape's job durations, which a
thread refreshes off the scrape, separately), and training's collection of the labelled subset (rows
read); the same on the empty index as the baseline. Target: each answers
within 1 s at 1,000,000 instances.

Start: ``cradle listen`` from its launch to its first C-ECHO answer, with an empty archive and with
``--start-files`` archived files (and their rows), alternating, three times each; also the start's
own recovery (``Ingest.recover``) in this process and, for scale, one walk over those files (what
the startup sweep used to do before anything else).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from benchmarks.index_fill import Shape, fill_url
from benchmarks.ingest import (
    CALLING_AE, NODE_AE, ROOT, free_port, make_mr_series, push, running, wait_until_ready,
)

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
TARGET_RATIO = 0.9
TARGET_SECONDS = 1.0


# --- indexes ----------------------------------------------------------------------------------

@contextmanager
def index_url(backend: str, workdir: Path, name: str) -> Iterator[str]:
    """A new, empty index: a SQLite file in ``workdir`` or a database on the local PostgreSQL."""
    if backend == "sqlite":
        yield f"sqlite:///{workdir / f'{name}.db'}"
        return
    from sqlalchemy import create_engine, text

    database = f"cradle_bench_{name}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{database}"'))
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        admin.dispose()


def config_file(workdir: Path, url: str, port: int, metrics_port: int = 0) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "node": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": port, "allowed_calling_aets": [CALLING_AE],
                 "metrics_port": metrics_port},
        "storage": {"archive_dir": str(workdir / "archive"), "database_url": url, "min_free_bytes": 0},
        "queue": {"broker_url": f"sqla+sqlite:///{workdir / 'broker.db'}"},
        "completion": {"quiet_seconds": 30, "poll_seconds": 1.0},
        "logging": {"level": "WARNING"},
        "models_dir": str(workdir / "models"),
    }
    path = workdir / "cradle.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# --- ingest and latency -------------------------------------------------------------------------

def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = function()
    return time.perf_counter() - started, value


def cradle_seconds(config: Path, *args: str) -> float:
    """Wall time of ``cradle ARGS --config FILE`` as a process (interpreter start included)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    seconds, result = timed(lambda: subprocess.run([sys.executable, "-m", "cradle.cli", *args, "--config", str(config)],
                                                   cwd=ROOT, env=env, capture_output=True, text=True))
    if result.returncode != 0:
        raise RuntimeError(f"cradle {' '.join(args)} failed: {result.stderr[-1000:]}")
    return seconds


def query_seconds(url: str) -> dict[str, Any]:
    """The status, jobs list and scrape queries and the labelled-subset collection, in this process."""
    from node.commands import status_summary
    from node.jobs_commands import _rows
    from node.metrics import IndexCollector
    from storage.db import open_index
    from training.datasets import _radiograph_rows

    sessions = open_index(url)
    try:
        with sessions() as session:
            out = {"status_query_s": timed(lambda: status_summary(session))[0],
                   "jobs_list_query_s": timed(lambda: _rows(session, None))[0],
                   "scrape_query_s": timed(lambda: IndexCollector._families(session))[0],
                   "durations_refresh_s": timed(lambda: IndexCollector.duration_families(session))[0]}
            seconds, rows = timed(lambda: sum(1 for _ in _radiograph_rows(session, labelled_for="bpd")))
            out.update(labelled_collection_s=seconds, labelled_rows_read=rows)
        return out
    finally:
        sessions.kw["bind"].dispose()


def one_push(workdir: Path, url: str, count: int, size_mb: float, seed: int, scrape: bool) -> dict[str, float]:
    """A fresh series pushed to ``cradle listen`` on ``url``; with ``scrape`` the listener's
    Prometheus endpoint is read afterwards."""
    files = workdir / "files"
    make_mr_series(files, count, size_mb, seed=seed)
    os.sync()
    port, metrics_port = free_port(), free_port() if scrape else 0
    nodedir = workdir / "node"
    config = config_file(nodedir, url, port, metrics_port)
    try:
        command = [sys.executable, "-m", "cradle.cli", "listen", "--config", str(config)]
        with running(command, port, NODE_AE, workdir / "node.log"):
            result = {"push_s": push(files, port, NODE_AE)}
            if scrape:
                result["scrape_s"] = timed(lambda: urllib.request.urlopen(
                    f"http://127.0.0.1:{metrics_port}/metrics", timeout=60).read())[0]
        stored = len(list((nodedir / "archive").rglob("*.dcm")))
        if stored != count:
            raise RuntimeError(f"the node archived {stored} of {count} files")
        return result
    finally:
        shutil.rmtree(files, ignore_errors=True)
        shutil.rmtree(nodedir, ignore_errors=True)
        os.sync()


def run_backend(backend: str, workdir: Path, rows: int, count: int, size_mb: float, repeat: int) -> dict[str, Any]:
    with index_url(backend, workdir, "empty") as empty, index_url(backend, workdir, "full") as full:
        fill_url(empty, Shape(0))
        filled, fill_seconds = fill_url(full, Shape(rows))
        pushes: dict[str, list[dict]] = {"empty": [], "full": []}
        for number in range(repeat):
            for which in (("empty", "full") if number % 2 == 0 else ("full", "empty")):
                url = empty if which == "empty" else full
                pushes[which].append(one_push(workdir, url, count, size_mb, seed=len(pushes["empty"]) * 2 + number,
                                              scrape=True))
        report = {"backend": backend, "rows": rows, "filled": filled, "fill_s": fill_seconds,
                  "push_s": {k: [p["push_s"] for p in v] for k, v in pushes.items()},
                  "scrape_s": {k: [p["scrape_s"] for p in v] for k, v in pushes.items()}}
        for which, url in (("empty", empty), ("full", full)):
            config = config_file(workdir / f"cli-{which}", url, free_port())
            report[which] = {**query_seconds(url),
                             "status_command_s": cradle_seconds(config, "status", "--json"),
                             "jobs_list_command_s": cradle_seconds(config, "jobs", "list", "--json")}
        empty_s, full_s = statistics.median(report["push_s"]["empty"]), statistics.median(report["push_s"]["full"])
        report["ingest_ratio"] = empty_s / full_s
        return report


# --- start ----------------------------------------------------------------------------------------

def start_seconds(config: Path, workdir: Path) -> float:
    """From the launch of ``cradle listen`` to its first C-ECHO answer."""
    port = yaml.safe_load(config.read_text())["node"]["port"]
    command = [sys.executable, "-m", "cradle.cli", "listen", "--config", str(config)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_ready(port, NODE_AE, process)
        return time.perf_counter() - started
    finally:
        from common.processes import stop_process

        stop_process(process, grace=30, name="listener")


def run_start(workdir: Path, files: int) -> dict[str, Any]:
    from storage.archive import Archive
    from storage.db import open_index
    from storage.ingest import Ingest

    configs = {}
    for which, n in (("empty", 0), ("full", files)):
        directory = workdir / f"start-{which}"
        url = f"sqlite:///{directory / 'cradle.db'}"
        config = config_file(directory, url, free_port())
        (directory / "archive").mkdir(parents=True, exist_ok=True)
        fill_url(url, Shape(n), archive=directory / "archive")
        configs[which] = (config, url, directory / "archive")
    os.sync()
    seconds: dict[str, list[float]] = {"empty": [], "full": []}
    for number in range(3):
        for which in (("empty", "full") if number % 2 == 0 else ("full", "empty")):
            seconds[which].append(start_seconds(configs[which][0], workdir))
    report: dict[str, Any] = {"files": files, "listen_ready_s": seconds}
    for which, (_, url, archive_dir) in configs.items():
        sessions = open_index(url)
        archive = Archive(archive_dir)
        report[f"recover_{which}_s"] = timed(Ingest(archive, sessions).recover)[0]
        report[f"walk_{which}_s"], walked = timed(archive.files)
        report[f"walk_{which}_files"] = len(walked)
        sessions.kw["bind"].dispose()
    return report


# --- report -------------------------------------------------------------------------------------

def summary(report: dict[str, Any]) -> str:
    lines = []
    for b in report["backends"]:
        med = {k: statistics.median(v) for k, v in b["push_s"].items()}
        lines += [f"{b['backend']}: {b['rows']:,} rows filled in {b['fill_s']:.1f} s ({b['filled']})",
                  f"  ingest {report['count']} × {report['size_mb']} MB: empty {med['empty']:.2f} s "
                  f"{b['push_s']['empty']}, filled {med['full']:.2f} s {b['push_s']['full']}",
                  f"  ingest ratio empty / filled: {b['ingest_ratio']:.2f}  (target ≥ {TARGET_RATIO})"]
        for which in ("empty", "full"):
            r = b[which]
            lines.append(f"  {which:>5}: scrape {statistics.median(b['scrape_s'][which]):.3f} s, "
                         f"status command {r['status_command_s']:.2f} s (query {r['status_query_s']:.3f}), "
                         f"jobs list command {r['jobs_list_command_s']:.2f} s (query {r['jobs_list_query_s']:.3f}), "
                         f"scrape query {r['scrape_query_s']:.3f} s (durations, off the scrape, "
                         f"{r['durations_refresh_s']:.3f} s), labelled collection {r['labelled_collection_s']:.3f} s "
                         f"({r['labelled_rows_read']} rows)")
    s = report.get("start")
    if s:
        lines += [f"listener start (launch → first C-ECHO): empty archive {statistics.median(s['listen_ready_s']['empty']):.2f} s "
                  f"{[round(x, 2) for x in s['listen_ready_s']['empty']]}, {s['files']:,} files "
                  f"{statistics.median(s['listen_ready_s']['full']):.2f} s {[round(x, 2) for x in s['listen_ready_s']['full']]}",
                  f"  recovery in process: empty {s['recover_empty_s'] * 1000:.1f} ms, full {s['recover_full_s'] * 1000:.1f} ms;"
                  f" one walk over the archive: {s['walk_full_s']:.2f} s ({s['walk_full_files']} files)"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.archive_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="instances in the filled index")
    parser.add_argument("--count", type=int, default=300, help="MR slices per push (default 300)")
    parser.add_argument("--size-mb", type=float, default=0.5, help="size of one slice (default 0.5 MB)")
    parser.add_argument("--repeat", type=int, default=2, help="pushes to each index (default 2)")
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"], choices=["sqlite", "postgresql"])
    parser.add_argument("--start-files", type=int, default=20_000, help="archived files for the start (0: skip)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the temporary files go")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cradle-scale-", dir=args.workdir) as tmp:
        workdir = Path(tmp)
        report: dict[str, Any] = {"count": args.count, "size_mb": args.size_mb, "backends": []}
        for backend in args.backends:
            report["backends"].append(run_backend(backend, workdir / backend, args.rows, args.count, args.size_mb,
                                                  args.repeat))
        if args.start_files:
            report["start"] = run_start(workdir / "start", args.start_files)
    print(json.dumps(report, indent=2, default=str) if args.json else summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
