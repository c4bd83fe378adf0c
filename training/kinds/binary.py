"""Binary tasks (``kind: binary``): one logit, sigmoid, BCE; AUROC and the operating point chosen
for a target sensitivity; compared with the active version by DeLong's test on the same images."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from sqlalchemy.orm import Session
from torch import nn

from inference.registry import ModelVersion
from training import datasets as ds
from training import evaluate as ev
from training.engine import FoldResult, predict
from training.kinds.base import ClassifierKind, Context
from training.strategies import Mixer, cutmix

class BinaryObjective:
    """One logit, sigmoid; BCE (optionally with a positive-class weight). The per-epoch validation's
    threshold metrics are taken at the threshold that reaches ``target_sensitivity`` on the same
    predictions (they follow training only; AUROC needs none); the reported fold metrics re-choose it
    on the other folds (:meth:`BinaryKind.fold_metrics`)."""

    kind = "binary"

    def __init__(self, pos_weight: float | None = None, target_sensitivity: float = 0.9) -> None:
        weight = torch.tensor([pos_weight]) if pos_weight else None
        self.bce = nn.BCEWithLogitsLoss(pos_weight=weight)
        self.target_sensitivity = target_sensitivity

    def to(self, device: torch.device) -> "BinaryObjective":
        self.bce = self.bce.to(device)
        return self

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.bce(outputs[:, 0], targets.float())

    def metrics(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        probabilities = ev.sigmoid(outputs[:, 0])
        threshold = ev.threshold_for_sensitivity(targets, probabilities, self.target_sensitivity)
        return ev.binary_metrics(targets, probabilities, threshold)

    def validate(self, model: nn.Module, loader: Any, device: torch.device, volumes: list[str] | None,
                 memory_format: torch.memory_format) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
        outputs, targets, loss = predict(model, loader, device, self.loss, memory_format=memory_format)
        return {**self.metrics(outputs, targets), "loss": loss}, outputs, targets

    def mixer(self, prob: float, alpha: float) -> Mixer:
        return cutmix(prob, alpha, 1, binary=True)


def honest_fold_metrics(fold: FoldResult, others: list[FoldResult], target_sensitivity: float) -> dict[str, Any]:
    """``fold``'s metrics at the threshold chosen on ``others``' validation outputs (as they are when
    there are none with both classes)."""
    others = [o for o in others if o.outputs is not None and len(o.targets)]
    if fold.outputs is None or not others:
        return dict(fold.metrics)
    y_other = np.concatenate([o.targets for o in others])
    if len(np.unique(y_other)) < 2:
        return dict(fold.metrics)
    p_other = ev.sigmoid(np.concatenate([o.outputs[:, 0] for o in others]))
    threshold = ev.threshold_for_sensitivity(y_other, p_other, target_sensitivity)
    return {**fold.metrics, **ev.binary_metrics(fold.targets, ev.sigmoid(fold.outputs[:, 0]), threshold)}


def delong_summary(name: str, y: np.ndarray, candidate: np.ndarray, other: np.ndarray) -> dict[str, Any] | None:
    if len(np.unique(y)) < 2:
        return None
    result = ev.delong_test(y, candidate, other)
    return {"version": name, "n": int(len(y)), "auc_active": result.auc_b, "auc_candidate": result.auc_a,
            "p_value": result.p_value, "p_candidate_lower": result.p_a_lower, "z": result.z,
            "summary": f"AUROC {result.auc_a:.3f} vs {name} {result.auc_b:.3f} on {len(y)} images, "
                       f"DeLong p={result.p_value:.3g}"}


def compare_irds(split: ds.Split, test: dict[str, Any]) -> dict[str, Any] | None:
    """The candidate against the radiologist's IRDS grade as a score, where the labels carry it."""
    pairs = [(s.label, p, s.irds_grade) for s, p in zip(split.test, test["probabilities"]) if s.irds_grade is not None]
    if len(pairs) < 4:
        return None
    y, candidate, grade = map(np.array, zip(*pairs))
    return delong_summary("IRDS grade", y, candidate, grade)


class BinaryKind(ClassifierKind):
    """A binary task, or a multiclass task with yes/no labels trained as its first class against the
    rest (the recipe's ``binary: true``): one output, registered under the task's description."""

    name = "binary"

    def num_outputs(self, classes: list[str] | None) -> int:
        return 1

    def relabel(self) -> tuple[Callable[[float], float | None] | None, str]:
        if self.task.kind != "multiclass":
            return None, ""
        return (lambda stored: 0.0 if stored == 0 else 1.0), ""  # the first class (0), or any other / "yes"

    def collect(self, ctx: Context, session: Session) -> ds.Collection:
        collection = super().collect(ctx, session)
        if self.task.kind == "multiclass":
            collection.classes = [self.task.description]  # the version's one output
        return collection

    def objective(self, ctx: Context, samples: list[ds.Sample], num_outputs: int) -> BinaryObjective:
        positives = sum(1 for s in samples if s.label >= 0.5)
        weight = (len(samples) - positives) / max(positives, 1) if ctx.recipe.pos_weight == "balanced" else None
        return BinaryObjective(weight, ctx.recipe.target_sensitivity).to(ctx.device)

    def fold_metrics(self, ctx: Context, folds: list) -> list[dict[str, Any]]:
        """Each fold's threshold metrics (balanced accuracy, F1, sensitivity ...) at the threshold that
        reaches ``target_sensitivity`` on the *other* folds' validation outputs: never on the outputs the
        metric is reported on (the per-epoch validation metrics are, and are only for following training)."""
        return [honest_fold_metrics(f, [o for o in folds if o is not f], ctx.recipe.target_sensitivity)
                for f in folds]

    def assess(self, ctx: Context, collection: ds.Collection, split: ds.Split, model: nn.Module,
               folds: list, chosen: int | None) -> dict[str, Any]:
        recipe, held = ctx.recipe, self.held_out(ctx, collection, split, model, folds, chosen)
        return ev.assess_binary(held.y, held.outputs[:, 0], held.y_val, held.out_val[:, 0],
                                target_sensitivity=recipe.target_sensitivity,
                                temperature_scaling=recipe.temperature_scaling, resamples=recipe.bootstrap,
                                seed=recipe.seed, groups=held.groups)

    def compare(self, ctx: Context, collection: ds.Collection, samples: list[ds.Sample], candidate: nn.Module,
                active: ModelVersion, module: nn.Module) -> dict[str, Any] | None:
        y, mine, theirs = self.paired_outputs(ctx, collection, samples, candidate, active, module)
        return delong_summary(active.version, y, mine[:, 0], theirs[:, 0])

    def other_comparisons(self, split: ds.Split, test: dict[str, Any]) -> dict[str, Any]:
        return {"irds_grade": compare_irds(split, test)}

    def curves(self, folds: list, test: dict[str, Any]) -> dict[str, Any]:
        roc = [{"label": f"test AUROC {test['metrics']['auroc']:.3f}", **test["roc"]}]
        for f in folds:
            if f.outputs is not None and len(np.unique(f.targets)) > 1:
                fpr, tpr, _ = ev.metrics.roc_curve(f.targets, f.outputs[:, 0])
                roc.append({"label": f"fold {f.fold} validation", "fpr": fpr.tolist(), "tpr": tpr.tolist(),
                            "lw": 1, "alpha": 0.5})
        return {"roc": roc, "reliability": {"test, raw": test["reliability_before"],
                                            "test, temperature-scaled": test["reliability_after"]}}

    def threshold(self, test: dict[str, Any]) -> float | None:
        return test.get("threshold")
