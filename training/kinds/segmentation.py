"""Segmentation tasks (``kind: segmentation``): MR slices with a reference mask from a SEG a person
made (``labels.source: seg``); one sigmoid channel, BCE + Dice. ``dims: 2`` trains on slices (the
paper); ``dims: 3`` on MONAI-sampled patches of whole series, validated by sliding-window inference.

Early stopping follows the network's own Dice on the model grid; what is reported, compared and gated
is measured as shipped (:mod:`training.kinds.shipped`): each validation fold and the held-out test,
post-processed by the pipeline's own function, beside the raw output. A candidate is compared with
the active version, 2D or 3D, on the same held-out volumes by the same measure."""

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
from training.engine import FoldResult, predict
from training.kinds import shipped
from training.kinds.base import Context, TrainingKind
from training.recipe import GateConfig


class SlidingWindow(nn.Module):
    """A 3D network run over a whole series by MONAI's sliding-window inference, as the pipeline does
    (:func:`inference.pipelines.lung_mri.segment_volume`'s overlap and blending)."""

    def __init__(self, network: nn.Module, patch: tuple[int, int, int]) -> None:
        super().__init__()
        self.network, self.patch = network, patch

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        from monai.inferers import sliding_window_inference

        from inference.pipelines.lung_mri import SLIDING_WINDOW_BATCH, SLIDING_WINDOW_OVERLAP

        return sliding_window_inference(volume, self.patch, SLIDING_WINDOW_BATCH, self.network,
                                        overlap=SLIDING_WINDOW_OVERLAP, mode="gaussian")


class SegmentationObjective:
    """BCE + Dice on one sigmoid channel (MONAI DiceLoss)."""

    kind = "segmentation"

    def __init__(self, patch: tuple[int, int, int] | None = None) -> None:
        from monai.losses import DiceLoss

        self.dice = DiceLoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5)
        self.bce = nn.BCEWithLogitsLoss()
        self.patch = patch  # 3D: validation runs whole series through the sliding window

    def to(self, device: torch.device) -> "SegmentationObjective":
        return self

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.bce(outputs, targets) + self.dice(outputs, targets)

    def validate(self, model: nn.Module, loader: Any, device: torch.device, volumes: list[str] | None,
                 memory_format: torch.memory_format) -> tuple[dict[str, Any], None, None]:
        """Overlap counted batch by batch (outputs are not kept: memory stays flat)."""
        counter = OverlapCounter(list(dict.fromkeys(volumes or [])) if self.patch else (volumes or []))
        network = SlidingWindow(model, self.patch) if self.patch else model
        _, _, loss = predict(network, loader, device, self.loss, on_batch=counter, memory_format=memory_format)
        return {**counter.result(), "loss": loss}, None, None

    def mixer(self, prob: float, alpha: float) -> None:
        return None  # CutMix mixes class targets, not masks


class OverlapCounter:
    """Streaming Dice/IoU per slice and per volume from thresholded sigmoid outputs: one item per slice
    (2D, (1, rows, columns)) or per series (3D, (1, slices, rows, columns))."""

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
            for p_slice, t_slice in (zip(p.unbind(1), t.unbind(1)) if p.dim() == 4 else [(p, t)]):
                self._add(volume, p_slice, t_slice)

    def _add(self, volume: str, p: torch.Tensor, t: torch.Tensor) -> None:
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
        return ds.collect_segmentation(session, self.task.name, references, ctx.population,
                                       ctx.recipe.split_salt)

    def dataset(self, ctx: Context, collection: ds.Collection, samples: list[ds.Sample], *, train: bool,
                spec: InputSpec | None = None) -> Dataset:
        spec = spec or ctx.spec
        cache = ds.PreprocessCache(ctx.cache_root, spec)
        if spec.patch is not None:
            return ds.VolumeDataset(ds.volumes_of(samples, collection.volumes), ctx.archive.root, cache,
                                    patch=spec.patch if train else None, patches=ctx.recipe.patches_per_volume)
        augment = Augment(ctx.recipe.augment) if train else None
        return ds.SliceDataset(samples, collection.volumes, ctx.archive.root, cache, augment=augment)

    def objective(self, ctx: Context, samples: list[ds.Sample], num_outputs: int) -> SegmentationObjective:
        return SegmentationObjective(ctx.spec.patch)

    def as_shipped(self, ctx: Context, collection: ds.Collection, model: nn.Module, samples: list[ds.Sample],
                   spec: InputSpec | None = None, threshold: float | None = None) -> list[shipped.VolumeOutcome]:
        """The series of ``samples`` through the pipeline's segmentation and post-processing."""
        volumes = ds.volumes_of(samples, collection.volumes)
        return shipped.measure(ctx.archive.root, volumes, model.to(ctx.device), spec or ctx.spec, ctx.device,
                               threshold)

    def after_fold(self, ctx: Context, collection: ds.Collection, val: list[ds.Sample] | None, model: nn.Module,
                   result: FoldResult) -> FoldResult:
        """The fold's validation series measured as shipped; its model-grid Dice kept as ``dice_model``."""
        if not val:
            return result
        measured = shipped.summarise(self.as_shipped(ctx, collection, model, val))
        model_grid = {f"{k}_model": result.metrics[k] for k in ("dice", "iou", "dice_slice") if k in result.metrics}
        result.metrics = {**result.metrics, **model_grid, **_scalars(measured)}
        return result

    def assess(self, ctx: Context, collection: ds.Collection, split: ds.Split, model: nn.Module,
               folds: list[FoldResult], chosen: int | None) -> dict[str, Any]:
        recipe = ctx.recipe
        outcomes = self.as_shipped(ctx, collection, model, split.test)
        metrics = shipped.summarise(outcomes)
        per_volume = list(metrics["dice_per_volume"].values())
        ci = ev.dice_ci(per_volume, resamples=recipe.bootstrap, seed=recipe.seed) if recipe.bootstrap else None
        return {"metrics": metrics, "dice_ci": ci.as_dict() if ci else None, "volumes": shipped.as_rows(outcomes),
                "bland_altman": shipped.bland_altman_points(outcomes)}

    def compare(self, ctx: Context, collection: ds.Collection, samples: list[ds.Sample], candidate: nn.Module,
                active: ModelVersion, module: nn.Module) -> dict[str, Any] | None:
        """Both versions on the same held-out series, each with its own input spec (2D or 3D) and the
        active one at its registered threshold, measured as shipped."""
        theirs = self.as_shipped(ctx, collection, module, samples, active.input_spec, active.threshold)
        mine = self.as_shipped(ctx, collection, candidate, samples)
        a, c = shipped.summarise(theirs), shipped.summarise(mine)
        dims_active = 2 if active.input_spec.patch is None else 3
        per_volume = {t.series_uid: {"active_raw": t.dice_raw, "active": t.dice, "candidate_raw": m.dice_raw,
                                     "candidate": m.dice} for t, m in zip(theirs, mine)}
        return {"version": active.version, "n": a["n_volumes"], "dims_active": dims_active,
                "dims_candidate": ctx.recipe.dims, "dice_active": a["dice"], "dice_candidate": c["dice"],
                "dice_raw_active": a["dice_raw"], "dice_raw_candidate": c["dice_raw"], "per_volume": per_volume,
                "summary": (f"{active.version} ({dims_active}D): post-processed Dice {a['dice']:.3f} (raw "
                            f"{a['dice_raw']:.3f}), candidate ({ctx.recipe.dims}D) {c['dice']:.3f} (raw "
                            f"{c['dice_raw']:.3f}) on the same {a['n_volumes']} held-out volumes")}

    def curves(self, folds: list[FoldResult], test: dict[str, Any]) -> dict[str, Any]:
        dice = {f"fold {f.fold}": list(f.metrics.get("dice_per_volume", {}).values()) for f in folds}
        dice["test"] = list(test["metrics"]["dice_per_volume"].values())
        dice["test (raw)"] = list(test["metrics"]["dice_raw_per_volume"].values())
        return {"dice": dice, "bland_altman": test.get("bland_altman")}

    def decide(self, gate: GateConfig, test: dict[str, Any], comparisons: dict[str, Any]) -> promote.Decision:
        return promote.gate_dice(gate, test["metrics"]["dice"], comparisons.get("active"))


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    """The per-volume values and the numbers (what a fold's metrics hold)."""
    return {k: v for k, v in metrics.items() if k != "volume_error"}
