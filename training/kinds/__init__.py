"""Training by kind: one module per kind of task in the catalogue (``config/tasks.yaml``), each owning
its dataset, objective, metrics, comparison with the active version and gate. ``kind_of(task)``
is the registry a run reads, keyed by the catalogue entry's ``kind``."""

from __future__ import annotations

from config.tasks import TaskDefinition
from training.kinds.base import ClassifierKind, Context, TrainingKind, make_loader
from training.kinds.binary import BinaryKind, BinaryObjective
from training.kinds.multiclass import MulticlassKind, MulticlassObjective
from training.kinds.regression import RegressionKind, RegressionObjective
from training.kinds.segmentation import SegmentationKind, SegmentationObjective

KINDS: dict[str, type[TrainingKind]] = {
    kind.name: kind for kind in (BinaryKind, MulticlassKind, RegressionKind, SegmentationKind)}

__all__ = ["KINDS", "BinaryKind", "BinaryObjective", "ClassifierKind", "Context", "MulticlassKind",
           "MulticlassObjective", "RegressionKind", "RegressionObjective", "SegmentationKind", "SegmentationObjective", "TrainingKind", "kind_of",
           "make_loader"]


def kind_of(task: TaskDefinition, kind: str | None = None) -> TrainingKind:
    """The training kind of ``task``, or ``kind`` when a recipe trains it another way (a multiclass task's
    ``binary: true``); a ValueError for a kind cradle cannot train yet."""
    kind = kind or task.kind
    if kind not in KINDS:
        raise ValueError(f"{task.name}: cradle cannot train {kind} tasks yet "
                         f"(it trains {', '.join(KINDS)})")
    return KINDS[kind](task)
