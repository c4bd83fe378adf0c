"""Lung segmentation measured as it ships: each held-out series read from the archive, sorted and run
through the pipeline's own :func:`inference.pipelines.lung_mri.segment_lungs` (the same letterboxing,
2D batches or 3D sliding window, threshold, 3D post-processing and left/right split), then compared
with the reviewer's SEG on the source grid.

Per volume: Dice and IoU of the raw network output and of the post-processed lungs (both against the
reviewer's lungs), Dice per slice, each lung's volume in mL (the pipeline's
:func:`~inference.pipelines.lung_mri.lung_volumes_ml` on both label volumes) and the left/right split
checked against the reviewer's left and right segments.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydicom import dcmread

from inference.geometry import sort_series
from inference.pipelines.lung_mri import DEFAULT_THRESHOLD, LEFT, RIGHT, lung_volumes_ml, segment_lungs
from inference.registry import InputSpec
from training import datasets as ds
from training import evaluate as ev
from training.evaluate import dice_iou


@dataclass(frozen=True)
class VolumeOutcome:
    """One series as shipped against its reviewer SEG (volumes in mL; sides None when the SEG has no
    left and right segments)."""

    series_uid: str
    dice_raw: float
    dice: float
    iou_raw: float
    iou: float
    dice_slice: float
    predicted_ml: dict[str, float]
    reference_ml: dict[str, float] | None
    side_dice: dict[str, float] | None
    sides_swapped: bool | None
    seconds: float


def _slice_dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([dice_iou(p, t)[0] for p, t in zip(predicted, truth)]))


def _sides(labels: np.ndarray, reference: np.ndarray) -> tuple[dict[str, float], bool]:
    """Each predicted side's Dice against the reviewer's same side, and whether the sides are swapped
    (the predicted left lung overlaps the reviewer's right one more than the left one)."""
    side = {"left": dice_iou(labels == LEFT, reference == LEFT)[0],
            "right": dice_iou(labels == RIGHT, reference == RIGHT)[0]}
    crossed = dice_iou(labels == LEFT, reference == RIGHT)[0]
    return side, crossed > side["left"]


def measure_volume(archive_root: Path, volume: ds.Volume, module: torch.nn.Module, spec: InputSpec,
                   device: torch.device, threshold: float) -> VolumeOutcome:
    ordered = sort_series([dcmread(archive_root / path) for _, path, _ in volume.slices])
    began = time.perf_counter()
    result = segment_lungs(module, ordered, spec, device, threshold)
    seconds = time.perf_counter() - began
    reference, sided = ds.reference_lungs(archive_root, volume, [str(d.SOPInstanceUID) for d in ordered])
    truth = reference > 0
    dice_raw, iou_raw = dice_iou(result.raw, truth)
    dice, iou = dice_iou(result.labels > 0, truth)
    side, swapped = _sides(result.labels, reference) if sided else (None, None)
    return VolumeOutcome(volume.series_uid, dice_raw, dice, iou_raw, iou, _slice_dice(result.labels > 0, truth),
                         result.volumes_ml, lung_volumes_ml(reference, result.geometry) if sided else None,
                         side, swapped, seconds)


def measure(archive_root: Path, volumes: list[ds.Volume], module: torch.nn.Module, spec: InputSpec,
            device: torch.device, threshold: float | None = None) -> list[VolumeOutcome]:
    """Every series of ``volumes`` as shipped (``module`` in eval mode; the pipeline's default threshold)."""
    module.eval()
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    return [measure_volume(archive_root, v, module, spec, device, threshold) for v in volumes]


def volume_errors(outcomes: list[VolumeOutcome]) -> dict[str, Any]:
    """Per lung: predicted − reference volume (mL), its mean (bias), SD, limits of agreement (bias ± 1.96
    SD, Bland & Altman 1986) and the mean absolute error."""
    errors: dict[str, Any] = {}
    for side in ("left", "right"):
        pairs = [(o.predicted_ml[side], o.reference_ml[side]) for o in outcomes if o.reference_ml]
        if not pairs:
            continue
        agreement = ev.bland_altman([r for _, r in pairs], [p for p, _ in pairs])
        errors[side] = {"bias_ml": agreement["bias"], "sd_ml": (agreement["high"] - agreement["bias"]) / 1.96,
                        "mae_ml": float(np.abs(agreement["difference"]).mean()),
                        "limits_ml": [agreement["low"], agreement["high"]], "n": len(pairs)}
    return errors


def summarise(outcomes: list[VolumeOutcome]) -> dict[str, Any]:
    """Means over volumes (the post-processed Dice is ``dice``: what ships) and the per-volume values."""
    def mean(name: str) -> float:
        return float(np.mean([getattr(o, name) for o in outcomes])) if outcomes else float("nan")

    sided = [o for o in outcomes if o.side_dice is not None]
    return {
        "dice": mean("dice"), "dice_raw": mean("dice_raw"), "iou": mean("iou"), "iou_raw": mean("iou_raw"),
        "dice_slice": mean("dice_slice"), "seconds_per_volume": mean("seconds"),
        "dice_per_volume": {o.series_uid: o.dice for o in outcomes},
        "dice_raw_per_volume": {o.series_uid: o.dice_raw for o in outcomes},
        "iou_per_volume": {o.series_uid: o.iou for o in outcomes},
        "n_volumes": len(outcomes),
        "left_right_checked": len(sided), "left_right_swapped": sum(bool(o.sides_swapped) for o in sided),
        "side_dice_left": float(np.mean([o.side_dice["left"] for o in sided])) if sided else float("nan"),
        "side_dice_right": float(np.mean([o.side_dice["right"] for o in sided])) if sided else float("nan"),
        "volume_error": volume_errors(outcomes),
    }


def as_rows(outcomes: list[VolumeOutcome]) -> list[dict[str, Any]]:
    return [asdict(o) for o in outcomes]


def bland_altman_points(outcomes: list[VolumeOutcome]) -> dict[str, list[list[float]]]:
    """(predicted, reference) mL per lung, for the report's Bland-Altman plot."""
    return {side: [[o.predicted_ml[side], o.reference_ml[side]] for o in outcomes if o.reference_ml]
            for side in ("left", "right")}
