"""``cradle worker``: a Celery worker running the node's jobs (and, on request, training runs)."""

from __future__ import annotations

import argparse
import os
import socket
import threading
from typing import Any

from celery.signals import worker_process_init

from common.logs import protect_logs
from config.settings import Settings
from inference.worker import register as register_jobs
from node.queue import DEFAULT_QUEUE, JobQueue, make_celery
from storage.db import open_configured_index
from training.tasks import register as register_training


def worker(args: argparse.Namespace, settings: Settings) -> int:
    """A Celery worker in the foreground, plus the reconciler.

    Prefork pool with one child: the parent (this process) never imports torch, so the child that
    runs the jobs may use CUDA after the fork; the child loads each model once and keeps it, and
    the pool enforces ``queue.task_time_limit`` by replacing a child that overruns. Run one worker
    per GPU (``inference.device: cuda:N``). The reconciler runs as a thread of the parent.
    SIGTERM (or Ctrl-C) is Celery's warm shutdown: the running job finishes, then the worker exits.
    ``--queue training`` makes this worker also run ``cradle train --queue`` runs.
    """
    protect_logs()  # pydicom warnings quote element values; pynetdicom logs identifiers
    sessions = open_configured_index(settings.storage)  # migrations run once, here
    app = make_celery(settings)
    runner = register_jobs(app, settings)
    register_training(app, settings)  # runs only on a worker started with --queue training
    queue = JobQueue(settings, sessions, app=app)

    def init_child(**_: Any) -> None:
        sessions.kw["bind"].dispose(close=False)  # the child opens its own; drop the inherited pool
        runner.warm_up()  # pipelines and torch load now, not on the first study

    worker_process_init.connect(init_child, weak=False)
    stop = threading.Event()
    reconciler = threading.Thread(target=queue.reconciler().run, args=(stop,), name="cradle-reconciler",
                                  daemon=True)
    queues = ",".join(dict.fromkeys([DEFAULT_QUEUE, *(getattr(args, "queues", None) or [])]))
    argv = ["worker", "--pool=prefork", "--concurrency=1", f"--queues={queues}",
            f"--hostname=cradle-{os.getpid()}@{socket.gethostname()}",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            f"--loglevel={settings.logging.level}"]
    reconciler.start()
    try:
        app.worker_main(argv)
    finally:
        stop.set()
        reconciler.join(timeout=10)
        queue.close()
    return 0
