"""``cradle train --queue``: a training run as a Celery task on the workers' ``training`` queue.

The message carries only what names the run (task, recipe file, overrides); the worker resolves the
recipe again and trains from the archive. A run is idempotent: sent twice, or re-sent after a lost
worker, it resumes from its checkpoints or returns the finished summary. Because a run lasts far
longer than a job, the task is acknowledged on receipt (``acks_late=False``: the broker never
re-delivers a run still in progress) and has its own time limit (``training.time_limit_hours``).

A worker consumes the queue when its app has the task (``register(app, settings)``, called where
the app is built) and it is started with ``cradle worker --queue training``.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

from config.settings import Settings

TRAIN_TASK = "cradle.train"
TRAINING_QUEUE = "training"

log = logging.getLogger(__name__)


def register(app: Celery, settings: Settings) -> None:
    """Add ``cradle.train`` to ``app`` (importing torch only when a run starts)."""
    limit = int(settings.training.time_limit_hours * 3600)

    @app.task(name=TRAIN_TASK, acks_late=False, ignore_result=True, time_limit=limit + 60,
              soft_time_limit=limit, queue=TRAINING_QUEUE)
    def train(task: str, recipe: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
        from training.recipe import load_recipe
        from training.run import run_training

        resolved = load_recipe(task, recipe, overrides or [], catalogue=settings.catalogue())
        summary = run_training(settings, resolved, progress=False, say=log.info)
        log.info("training run %s: version %s, promoted %s", task, summary["version"], summary["promoted"])
        return summary


def submit(settings: Settings, task: str, recipe: str | None, overrides: list[str]) -> str:
    """Put a run on the training queue; returns the message id."""
    from node.queue import make_celery

    app = make_celery(settings)
    try:
        result = app.send_task(TRAIN_TASK, kwargs={"task": task, "recipe": recipe, "overrides": list(overrides)},
                               queue=TRAINING_QUEUE, retry=True)
        return str(result.id)
    finally:
        app.close()
