"""Multiclass tasks (``kind: multiclass``): one logit per class, softmax, cross-entropy; macro AUROC
and balanced accuracy; the macro AUROC gate. Classes come from the catalogue entry (``classes:
taxonomy``: the recipe's view taxonomy, config/views.yaml), labels from the archive's own headers
(``labels.source: headers``, config/view_rules.yaml) or from a csv column of class names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from sqlalchemy.orm import Session
from torch import nn

from config.tasks import YES_NO_POSITIVE
from config.views import load_view_taxonomy
from inference.registry import ModelVersion
from training import datasets as ds
from training import evaluate as ev
from training.engine import predict
from training.kinds.base import ClassifierKind, Context
from training.recipe import Recipe
from training.strategies import Mixer, cutmix


UNTYPED = "yes/no label without the class (a recipe with binary: true learns it)"
"""Why a multiclass run leaves out a study labelled only 1 (yes) in a ``yes_no`` column."""


class MulticlassObjective:
    kind = "multiclass"

    def __init__(self, num_classes: int = 2) -> None:
        self.ce = nn.CrossEntropyLoss()
        self.num_classes = num_classes

    def to(self, device: torch.device) -> "MulticlassObjective":
        return self

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.ndim == 2:  # mixed (CutMix) soft targets
            return torch.sum(-targets * torch.log_softmax(outputs, dim=1), dim=1).mean()
        return self.ce(outputs, targets)

    def metrics(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        return ev.multiclass_metrics(targets, ev.softmax(outputs))

    def validate(self, model: nn.Module, loader: Any, device: torch.device, volumes: list[str] | None,
                 memory_format: torch.memory_format) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
        outputs, targets, loss = predict(model, loader, device, self.loss, memory_format=memory_format)
        return {**self.metrics(outputs, targets), "loss": loss}, outputs, targets

    def mixer(self, prob: float, alpha: float) -> Mixer:
        return cutmix(prob, alpha, self.num_classes, binary=False)


class MulticlassKind(ClassifierKind):
    name = "multiclass"

    def classes(self, recipe: Recipe) -> list[str]:
        if self.task.classes == "taxonomy":
            return list(load_view_taxonomy(recipe.taxonomy).classes)
        return list(self.task.classes or [])

    def collect(self, ctx: Context, session: Session) -> ds.Collection:
        recipe = ctx.recipe
        if self.task.labels.source == "headers":
            taxonomy = load_view_taxonomy(recipe.taxonomy)
            return ds.collect_views(session, self.task.name, taxonomy, ctx.population, recipe.split_salt,
                                    recipe.max_per_class)
        if self.task.labels.source == "csv":  # labels import stores each class's index
            return super().collect(ctx, session)
        raise ValueError(f"{self.task.name}: a multiclass task learns from headers or a csv column, "
                         f"not from {self.task.labels.source}")

    def relabel(self) -> tuple[Callable[[float], float | None] | None, str]:
        """A yes/no label ("1": some class other than the first, not said which) is left out."""
        if not self.task.labels.yes_no:
            return None, ""
        return (lambda stored: None if stored == YES_NO_POSITIVE else stored), UNTYPED

    def objective(self, ctx: Context, samples: list[ds.Sample], num_outputs: int) -> MulticlassObjective:
        return MulticlassObjective(num_outputs)

    def assess(self, ctx: Context, collection: ds.Collection, split: ds.Split, model: nn.Module,
               folds: list, chosen: int | None) -> dict[str, Any]:
        recipe, held = ctx.recipe, self.held_out(ctx, collection, split, model, folds, chosen)
        return ev.assess_multiclass(held.y, held.outputs, held.y_val, held.out_val,
                                    temperature_scaling=recipe.temperature_scaling, resamples=recipe.bootstrap,
                                    seed=recipe.seed, groups=held.groups, classes=collection.classes)

    def compare(self, ctx: Context, collection: ds.Collection, samples: list[ds.Sample], candidate: nn.Module,
                active: ModelVersion, module: nn.Module) -> dict[str, Any] | None:
        y, mine, theirs = self.paired_outputs(ctx, collection, samples, candidate, active, module)
        a, c = ev.multiclass_metrics(y, ev.softmax(theirs)), ev.multiclass_metrics(y, ev.softmax(mine))
        return {"version": active.version, "n": len(y), "auc_active": a["auroc"], "auc_candidate": c["auroc"],
                "summary": f"{active.version}: macro AUROC {a['auroc']:.3f}, candidate {c['auroc']:.3f}"}

    def curves(self, folds: list, test: dict[str, Any]) -> dict[str, Any]:
        return {"reliability": {"test (scaled)": test["reliability_after"]},
                "confusion": {"matrix": test["confusion"], "classes": test["classes"]}}
