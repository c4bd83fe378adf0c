"""Why a pipeline run produced no result: one home for the errors the pipelines, the model cache and
the worker share (torch-free, so the worker can tell them apart without loading a model)."""

from __future__ import annotations

__all__ = ["NoActiveModel", "PipelineInputError"]


class NoActiveModel(Exception):
    """A task has no active, validated model: the job produces no clinical output.

    ``str(e)`` is ``"no active model for <task>"`` (tasks joined by ", " when several are missing).
    """

    def __init__(self, *tasks: str) -> None:
        self.tasks = tasks
        super().__init__(f"no active model for {', '.join(tasks)}")


class PipelineInputError(ValueError):
    """The series cannot be processed by the pipeline (wrong kind, inconsistent geometry ...).
    Retrying does not help."""
