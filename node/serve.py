"""``cradle serve``: the single-machine node as three child processes under one foreground parent.

Each part keeps its own process, as under systemd (one ``main()`` = one unit): the listener stays
small and torch-free, the worker owns the models, the dispatcher the outgoing associations.
SIGTERM or Ctrl-C stops them all; if one dies, the others are stopped and serve exits non-zero.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field

from common.processes import stop_processes
from config.settings import Settings
from storage.db import open_configured_index

log = logging.getLogger(__name__)

PARTS = ("listen", "worker", "dispatch")
STOP_GRACE_SECONDS = 30.0


@dataclass
class Supervisor:
    commands: dict[str, list[str]]
    env: dict[str, str]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    stopping: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        for name, command in self.commands.items():
            self.processes[name] = subprocess.Popen(command, env=self.env)
            log.info("started %s (pid %d)", name, self.processes[name].pid)

    def wait(self) -> int:
        """Block until a stop is requested or a child exits; return serve's exit code."""
        failed = ""
        while not self.stopping.wait(0.5):
            exited = {n: p.returncode for n, p in self.processes.items() if p.poll() is not None}
            if exited:
                failed = ", ".join(f"{n} exited with {rc}" for n, rc in exited.items())
                log.error("%s; stopping the node", failed)
                break
        self.stop()
        return 1 if failed else 0

    def stop(self) -> None:
        stop_processes(self.processes, STOP_GRACE_SECONDS)


def part_commands(config: str | None) -> dict[str, list[str]]:
    base = [sys.executable, "-m", "cradle.cli"]
    config_args = ["--config", config] if config else []
    return {part: [*base, part, *config_args] for part in PARTS}


def serve(args: argparse.Namespace, settings: Settings) -> int:
    settings.storage.archive_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    open_configured_index(settings.storage)  # migrate once, before the parts start
    supervisor = Supervisor(part_commands(args.config), dict(os.environ))

    def request_stop(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        supervisor.stopping.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    supervisor.start()
    log.info("cradle serving as %s on %s:%d", settings.node.ae_title, settings.node.host, settings.node.port)
    return supervisor.wait()
