"""A cradle deployment for tests and benchmarks: its own redis-server, and the node's parts
(``cradle listen``, ``cradle worker``, ``cradle dispatch`` or ``cradle serve``) as real subprocesses.

The parts run the real ``cradle.cli`` entry point. A ``sitecustomize`` module on their PYTHONPATH
registers the stand-in pipelines of ``fake_pipelines`` in every part (and, with
``CRADLE_TEST_LIGHT_HOST=1``, a pipeline host that does not import torch), so that even the
children ``cradle serve`` starts can run them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from common.processes import stop_process

TESTS_DIR = Path(__file__).resolve().parent


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class RedisServer:
    """A redis-server of our own on ``port`` (no persistence: a restart loses every message), so a
    test can stop and start it without disturbing anybody else's Redis."""

    def __init__(self, port: int, directory: Path) -> None:
        self.port, self.directory = port, directory
        self.process: subprocess.Popen | None = None
        self.binary = shutil.which("redis-server")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        if self.binary is None:
            raise RuntimeError("redis-server is not installed")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port)
        try:
            wait_until(lambda: _pings(client), 10, "redis-server to answer")
        finally:
            client.close()
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, grace=10, name="redis-server")
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port)


def _pings(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:  # noqa: BLE001 - not up yet
        return False


def write_sitecustomize(directory: Path) -> Path:
    """A directory to put on PYTHONPATH: its sitecustomize registers the fake pipelines."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(
        f"import sys\nsys.path.insert(0, {str(TESTS_DIR)!r})\n"
        "import fake_pipelines\nfake_pipelines.register()\n")
    return directory


def write_config(values: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


class Part:
    """One ``cradle <part> --config FILE`` subprocess in its own process group, logging to a file."""

    def __init__(self, part: str, config: Path, log: Path, env: dict[str, str]) -> None:
        self.part, self.config, self.log, self.env = part, config, log, env
        self.process: subprocess.Popen | None = None

    def start(self) -> "Part":
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "cradle.cli", self.part, "--config", str(self.config)],
                                            env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, cwd=self.config.parent)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the part and every process it started (a worker's pool child too)."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self, timeout: float = 30) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
            return None


def part_env(site: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "CRADLE_TEST_LIGHT_HOST": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH", "")]))
    env.pop("CRADLE_CONFIG", None)
    return env


def node_values(tmp_path: Path, *, port: int, database_url: str, broker_url: str, pacs_port: int | None = None,
                **sections: Any) -> dict[str, Any]:
    """Settings of a test deployment: the stand-in pipeline for CR and MR, fast reconciler and
    completion, a short time limit (so a message lost with a Redis restart is re-sent soon)."""
    values: dict[str, Any] = {
        "node": {"ae_title": "CRADLE", "host": "127.0.0.1", "port": port, "max_associations": 16,
                 "allowed_calling_aets": ["STORESCU", "SENDER1", "SENDER2", "SENDER3", "SENDER4", "ECHOSCU"],
                 "acse_timeout": 30, "dimse_timeout": 60, "network_timeout": 60},
        "storage": {"archive_dir": str(tmp_path / "archive"), "database_url": database_url},
        "queue": {"broker_url": broker_url, "task_time_limit": 10, "visibility_timeout": 30,
                  "reconcile_seconds": 0.5, "max_attempts": 3},
        "completion": {"quiet_seconds": 2, "poll_seconds": 0.2},
        "routing": {"rules": [{"name": "test-cr", "pipelines": ["test-copy"], "modalities": ["CR", "DX"]},
                              {"name": "test-mr", "pipelines": ["test-copy"], "modalities": ["MR"]}]},
        "dispatch": {"max_attempts": 10, "backoff_seconds": 0.2, "backoff_max_seconds": 2},
        "destinations": [] if pacs_port is None else [
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}],
        "models_dir": str(tmp_path / "models"),
        "logging": {"level": "INFO"},
    }
    for key, value in sections.items():
        values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    return values
