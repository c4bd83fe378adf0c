"""Regression tasks (``kind: regression``), e.g. bone age in months: one output scaled to the
catalogue's ``labels.range``, MSE loss; MAE, RMSE and R²; a paired Wilcoxon test on absolute errors
against the active version; scatter and Bland-Altman plots; a gate that never promotes a worse MAE."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from config.tasks import TaskDefinition
from inference.registry import ModelVersion
from training import datasets as ds
from training import evaluate as ev
from training import promote
from training.engine import predict
from training.kinds.base import ClassifierKind, Context
from training.recipe import GateConfig


class RegressionObjective:
    """MSE between the output and the label scaled to 0-1 across the task's range (so a fresh head
    starts near the middle of it); validation metrics in the label's units. No CutMix: mixing two
    hands does not make a hand of the mixed bone age."""

    kind = "regression"

    def __init__(self, task: TaskDefinition) -> None:
        self.task = task
        self.mse = nn.MSELoss()

    def to(self, device: torch.device) -> "RegressionObjective":
        return self

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.mse(outputs[:, 0], self.task.output_of(targets.float()))

    def metrics(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        return ev.regression_metrics(targets, self.task.value_of(outputs[:, 0]))

    def validate(self, model: nn.Module, loader: Any, device: torch.device, volumes: list[str] | None,
                 memory_format: torch.memory_format) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
        outputs, targets, loss = predict(model, loader, device, self.loss, memory_format=memory_format)
        return {**self.metrics(outputs, targets), "loss": loss}, outputs, targets

    def mixer(self, prob: float, alpha: float) -> None:
        return None


class RegressionKind(ClassifierKind):
    name = "regression"

    def objective(self, ctx: Context, samples: list[ds.Sample], num_outputs: int) -> RegressionObjective:
        return RegressionObjective(self.task)

    def assess(self, ctx: Context, collection: ds.Collection, split: ds.Split, model: nn.Module,
               folds: list, chosen: int | None) -> dict[str, Any]:
        held = self.held_out(ctx, collection, split, model, folds, chosen)
        baseline = float(np.mean([s.label for s in split.dev]))
        return ev.assess_regression(held.y, self.task.value_of(held.outputs[:, 0]), baseline,
                                    resamples=ctx.recipe.bootstrap, seed=ctx.recipe.seed, groups=held.groups)

    def compare(self, ctx: Context, collection: ds.Collection, samples: list[ds.Sample], candidate: nn.Module,
                active: ModelVersion, module: nn.Module) -> dict[str, Any] | None:
        y, mine, theirs = self.paired_outputs(ctx, collection, samples, candidate, active, module)
        paired = ev.paired_absolute_errors(y, self.task.value_of(mine[:, 0]), self.task.value_of(theirs[:, 0]))
        units = self.task.labels.units or ""
        return {"version": active.version, **paired,
                "summary": f"MAE {paired['mae_candidate']:.2f} vs {active.version} {paired['mae_active']:.2f} "
                           f"{units} on {paired['n']} images, Wilcoxon p={paired['p_value']:.3g}"}

    def decide(self, gate: GateConfig, test: dict[str, Any], comparisons: dict[str, Any]) -> promote.Decision:
        active = comparisons.get("active")
        return promote.gate_mae(gate, test["metrics"]["mae"], test["baseline_mae"],
                                active if active and active.get("n") else None, self.task.labels.units or "")

    def curves(self, folds: list, test: dict[str, Any]) -> dict[str, Any]:
        return {"regression": {"labels": test["labels"], "predictions": test["predictions"],
                               "bland_altman": test["bland_altman"], "units": self.task.labels.units or ""}}
