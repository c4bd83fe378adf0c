"""Segmentation tasks (``kind: segmentation``): MR slices with a reference mask from a SEG a person
made (``labels.source: seg``); one sigmoid channel, BCE + Dice; Dice and IoU per volume and per
slice; compared with the active version by Dice on the same volumes; the Dice gate."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sqlalchemy.orm import Session
from torch import nn
from torch.utils.data import Dataset

from inference.registry import InputSpec, ModelVersion
from training import datasets as ds
from training import evaluate as ev
from training import labels as lb
from training import promote
from training.augment import Augment
from training.engine import FoldResult, memory_format_of, predict
from training.kinds.base import Context, TrainingKind, eval_loader
from training.recipe import GateConfig


class SegmentationObjective:
    """BCE + Dice on one sigmoid channel (MONAI DiceLoss)."""

    kind = "segmentation"

    def __init__(self) -> None:
        from monai.losses import DiceLoss

        self.dice = DiceLoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5)
        self.bce = nn.BCEWithLogitsLoss()

    def to(self, device: torch.device) -> "SegmentationObjective":
        return self

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.bce(outputs, targets) + self.dice(outputs, targets)

    def validate(self, model: nn.Module, loader: Any, device: torch.device, volumes: list[str] | None,
                 memory_format: torch.memory_format) -> tuple[dict[str, Any], None, None]:
        """Overlap counted batch by batch (outputs are not kept: memory stays flat)."""
        counter = OverlapCounter(volumes or [])
        _, _, loss = predict(model, loader, device, self.loss, on_batch=counter, memory_format=memory_format)
        return {**counter.result(), "loss": loss}, None, None

    def mixer(self, prob: float, alpha: float) -> None:
        return None  # CutMix mixes class targets, not masks


class OverlapCounter:
    """Streaming Dice/IoU per slice and per volume from thresholded sigmoid outputs."""

    def __init__(self, volumes: list[str], threshold: float = 0.5) -> None:
        self.volumes = volumes
        self.threshold = threshold
        self.position = 0
        self.per_volume: dict[str, np.ndarray] = {}
        self.slice_dice: list[float] = []
        self.slice_volume: list[str] = []

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        predicted = torch.sigmoid(outputs) >= self.threshold
        truth = targets >= 0.5
        for p, t in zip(predicted, truth):
            volume = self.volumes[self.position]
            self.position += 1
            inter, p_sum, t_sum = float((p & t).sum()), float(p.sum()), float(t.sum())
            counts = self.per_volume.setdefault(volume, np.zeros(3))
            counts += (inter, p_sum, t_sum)
            self.slice_dice.append(1.0 if p_sum + t_sum == 0 else 2 * inter / (p_sum + t_sum))
            self.slice_volume.append(volume)

    def result(self) -> dict[str, Any]:
        def dice(c: np.ndarray) -> float:
            return 1.0 if c[1] + c[2] == 0 else float(2 * c[0] / (c[1] + c[2]))

        def iou(c: np.ndarray) -> float:
            union = c[1] + c[2] - c[0]
            return 1.0 if union == 0 else float(c[0] / union)

        per_volume_dice = {v: dice(c) for v, c in self.per_volume.items()}
        per_volume_iou = {v: iou(c) for v, c in self.per_volume.items()}
        return {
            "dice": float(np.mean(list(per_volume_dice.values()))) if per_volume_dice else float("nan"),
            "iou": float(np.mean(list(per_volume_iou.values()))) if per_volume_iou else float("nan"),
            "dice_slice": float(np.mean(self.slice_dice)) if self.slice_dice else float("nan"),
            "dice_per_volume": per_volume_dice, "iou_per_volume": per_volume_iou,
            "n_volumes": len(per_volume_dice), "n_slices": len(self.slice_dice),
        }


class SegmentationKind(TrainingKind):
    name = "segmentation"

    def collect(self, ctx: Context, session: Session) -> ds.Collection:
        if self.task.labels.source != "seg":
            raise ValueError(f"{self.task.name}: a segmentation task learns from reference SEGs, "
                             f"not from {self.task.labels.source}")
        references = lb.reference_segmentations(session, ctx.archive, ctx.settings.training.reviewer_aets)
        return ds.collect_segmentation(session, self.task.name, references, ctx.recipe.split_salt)

    def dataset(self, ctx: Context, collection: ds.Collection, samples: list[ds.Sample], *, train: bool,
                spec: InputSpec | None = None) -> Dataset:
        cache = ds.PreprocessCache(ctx.cache_root, spec or ctx.spec)
        augment = Augment(ctx.recipe.augment) if train else None
        return ds.SliceDataset(samples, collection.volumes, ctx.archive.root, cache, augment=augment)

    def objective(self, ctx: Context, samples: list[ds.Sample], num_outputs: int) -> SegmentationObjective:
        return SegmentationObjective()

    def overlap(self, ctx: Context, collection: ds.Collection, model: nn.Module, samples: list[ds.Sample],
                spec: InputSpec | None = None) -> dict[str, Any]:
        loader = eval_loader(ctx, samples, collection, spec)
        metrics, _, _ = SegmentationObjective().validate(model.to(ctx.device), loader, ctx.device,
                                                         [s.series_uid for s in samples], memory_format_of(ctx.recipe))
        return metrics

    def assess(self, ctx: Context, collection: ds.Collection, split: ds.Split, model: nn.Module,
               folds: list[FoldResult], chosen: int | None) -> dict[str, Any]:
        recipe = ctx.recipe
        metrics = self.overlap(ctx, collection, model, split.test)
        per_volume = list(metrics["dice_per_volume"].values())
        ci = ev.dice_ci(per_volume, resamples=recipe.bootstrap, seed=recipe.seed) if recipe.bootstrap else None
        return {"metrics": metrics, "dice_ci": ci.as_dict() if ci else None}

    def compare(self, ctx: Context, collection: ds.Collection, samples: list[ds.Sample], candidate: nn.Module,
                active: ModelVersion, module: nn.Module) -> dict[str, Any] | None:
        theirs = self.overlap(ctx, collection, module, samples, active.input_spec)
        mine = self.overlap(ctx, collection, candidate, samples)
        return {"version": active.version, "n": theirs["n_volumes"], "dice_active": theirs["dice"],
                "dice_candidate": mine["dice"],
                "summary": f"{active.version}: Dice {theirs['dice']:.3f}, candidate {mine['dice']:.3f}"}

    def curves(self, folds: list[FoldResult], test: dict[str, Any]) -> dict[str, Any]:
        dice = {f"fold {f.fold}": list(f.metrics.get("dice_per_volume", {}).values()) for f in folds}
        dice["test"] = list(test["metrics"]["dice_per_volume"].values())
        return {"dice": dice}

    def decide(self, gate: GateConfig, test: dict[str, Any], comparisons: dict[str, Any]) -> promote.Decision:
        return promote.gate_dice(gate, test["metrics"]["dice"], comparisons.get("active"))
