"""The training loop: one epoch, one validation pass, one fold with checkpoints and early stopping.

Kept small and free of bookkeeping inside the step (no host synchronisation per batch), so that it
runs at the speed of a bare PyTorch loop (``benchmarks/train_throughput.py`` measures the ratio).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from training import evaluate as ev
from training.recipe import Recipe
from training.strategies import (EarlyStopping, Schedule, Stage, apply_stage, cutmix, group_learning_rates,
                                 layer_groups, parameter_groups, set_learning_rates, stage_at)

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]


# --- determinism ------------------------------------------------------------------------------

def seed_everything(seed: int, deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False  # our ops write what they allocate
        torch.backends.cudnn.benchmark = False


def seed_worker(worker_id: int) -> None:  # noqa: ARG001 - DataLoader's signature
    """DataLoader worker: numpy and random follow the worker's torch seed."""
    seed = torch.initial_seed() % (2**32)
    np.random.seed(seed)
    random.seed(seed)


def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain values (loadable with ``weights_only``)."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position,
                                                     has_gauss, gauss],
            "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate(state["python"])


# --- objectives -------------------------------------------------------------------------------

class BinaryObjective:
    """One logit, sigmoid; BCE (optionally with a positive-class weight). Threshold metrics are taken
    at the threshold that reaches ``target_sensitivity`` on the same predictions (AUROC needs none)."""

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


class MulticlassObjective:
    kind = "multiclass"

    def __init__(self) -> None:
        self.ce = nn.CrossEntropyLoss()

    def to(self, device: torch.device) -> "MulticlassObjective":
        return self

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.ndim == 2:  # mixed (CutMix) soft targets
            return torch.sum(-targets * torch.log_softmax(outputs, dim=1), dim=1).mean()
        return self.ce(outputs, targets)

    def metrics(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        return ev.multiclass_metrics(targets, ev.softmax(outputs))


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


Objective = BinaryObjective | MulticlassObjective | SegmentationObjective


# --- one epoch, one pass ----------------------------------------------------------------------

def train_epoch(model: nn.Module, batches: Iterable[Batch], optimizer: torch.optim.Optimizer,
                loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], device: torch.device, *,
                before_step: Callable[[], None] | None = None,
                mix: Callable[[torch.Tensor, torch.Tensor], Batch] | None = None,
                memory_format: torch.memory_format = torch.contiguous_format) -> float:
    """One pass over ``batches``; returns the mean training loss (one host sync, at the end)."""
    total = torch.zeros((), device=device)
    count = 0
    for images, targets in batches:
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        if mix is not None:
            images, targets = mix(images, targets)
        if before_step is not None:
            before_step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(images), targets)
        loss.backward()
        optimizer.step()
        total += loss.detach() * images.shape[0]
        count += images.shape[0]
    return float(total) / max(count, 1)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Batch], device: torch.device, max_batches: int,
                          memory_format: torch.memory_format = torch.contiguous_format) -> int:
    """Precise BN: replace the running mean/var of every BatchNorm layer by their average over
    ``max_batches`` training batches with the current weights. Returns how many batches were used."""
    norms = [m for m in model.modules()  # frozen stages keep their BatchNorms in eval mode: left alone
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.training]
    if not norms or max_batches <= 0:
        return 0
    saved = {m: m.momentum for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches seen
    used = 0
    try:
        for images, _ in batches:
            model(images.to(device, non_blocking=True, memory_format=memory_format))
            used += 1
            if used >= max_batches:
                break
    finally:
        for m, momentum in saved.items():
            m.momentum = momentum
    return used


@torch.inference_mode()
def predict(model: nn.Module, loader: Iterable[Batch], device: torch.device,
            loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
            on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
            memory_format: torch.memory_format = torch.contiguous_format) -> tuple[np.ndarray, np.ndarray, float]:
    """Outputs and targets over ``loader`` (eval mode) and the mean loss. With ``on_batch``, outputs
    are handed over batch by batch and not kept (segmentation: memory stays flat)."""
    model.eval()
    outputs, targets, total, count = [], [], 0.0, 0
    for images, target in loader:
        images, target = images.to(device, memory_format=memory_format), target.to(device)
        output = model(images).float()
        if loss_fn is not None:
            total += float(loss_fn(output, target)) * images.shape[0]
        count += images.shape[0]
        if on_batch is not None:
            on_batch(output.cpu(), target.cpu())
        else:
            outputs.append(output.cpu().numpy())
            targets.append(target.cpu().numpy())
    stacked = (np.concatenate(outputs), np.concatenate(targets)) if outputs else (np.empty(0), np.empty(0))
    return stacked[0], stacked[1], total / max(count, 1)


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


def validate(model: nn.Module, loader: DataLoader, objective: Objective, device: torch.device,
             volumes: list[str] | None = None, memory_format: torch.memory_format = torch.contiguous_format
             ) -> tuple[dict[str, Any], np.ndarray | None, np.ndarray | None]:
    """Metrics (with ``loss``) over ``loader``; classification also returns outputs and targets."""
    if objective.kind == "segmentation":
        counter = OverlapCounter(volumes or [])
        _, _, loss = predict(model, loader, device, objective.loss, on_batch=counter, memory_format=memory_format)
        return {**counter.result(), "loss": loss}, None, None
    outputs, targets, loss = predict(model, loader, device, objective.loss, memory_format=memory_format)
    return {**objective.metrics(outputs, targets), "loss": loss}, outputs, targets


# --- optimisation -----------------------------------------------------------------------------

def make_optimizer(recipe: Recipe, groups: list[dict]) -> torch.optim.Optimizer:
    """Adam/AdamW use the fused kernels (CPU and CUDA): about ten times faster per step on a CPU."""
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=0.9, nesterov=True)
    kind = torch.optim.AdamW if recipe.optimizer == "adamw" else torch.optim.Adam
    return kind(groups, lr=recipe.lr, fused=True)


def memory_format_of(recipe: Recipe) -> torch.memory_format:
    return torch.channels_last if recipe.channels_last else torch.contiguous_format


def make_schedule(recipe: Recipe, steps_per_epoch: int, mode: str, epochs: int | None = None) -> Schedule:
    epochs = epochs or recipe.epochs
    if recipe.schedule == "warmup_poly" and recipe.warmup_epochs >= epochs:
        log.warning("warmup_epochs %g >= epochs %d: the learning rate never reaches lr %g (set warmup_epochs "
                    "below epochs, or schedule=constant)", recipe.warmup_epochs, epochs, recipe.lr)
    return Schedule(recipe.schedule, total_steps=epochs * steps_per_epoch,
                    warmup_steps=int(round(recipe.warmup_epochs * steps_per_epoch)), power=recipe.poly_power,
                    plateau_factor=recipe.plateau_factor, plateau_patience=recipe.plateau_patience, mode=mode)


def monitor_mode(metric: str) -> str:
    return "min" if metric == "loss" else "max"


# --- one fold ---------------------------------------------------------------------------------

@dataclass
class FoldResult:
    fold: int
    best_epoch: int
    best_value: float
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    outputs: np.ndarray | None = None
    targets: np.ndarray | None = None
    seconds: float = 0.0
    stages: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k not in ("outputs", "targets")}
        if self.outputs is not None:
            data["outputs"] = self.outputs.tolist()
            data["targets"] = self.targets.tolist()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "FoldResult":
        values = dict(data)
        for key in ("outputs", "targets"):
            values[key] = np.asarray(values[key]) if values.get(key) is not None else None
        return cls(**values)


@dataclass
class FoldPaths:
    checkpoint: Path
    best: Path
    result: Path

    @classmethod
    def in_dir(cls, directory: Path, fold: int | str) -> "FoldPaths":
        return cls(directory / f"fold-{fold}.ckpt", directory / f"fold-{fold}-best.pt",
                   directory / f"fold-{fold}.json")


def atomic_torch_save(obj: Any, path: Path) -> None:
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    torch.save(obj, temp)
    os.replace(temp, path)


def atomic_json(obj: Any, path: Path) -> None:
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    temp.write_text(json.dumps(plain(obj), indent=2, allow_nan=False) + "\n")
    os.replace(temp, path)


def plain(value: Any) -> Any:
    """JSON-ready: numpy scalars and arrays as Python values, NaN and infinities as None."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return plain(value.item())
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


@dataclass
class Trainer:
    """Fits one model on one fold: strategy stages, LR schedule, CutMix, early stopping, checkpoints."""

    recipe: Recipe
    objective: Objective
    device: torch.device
    progress: bool = True
    epochs: int | None = None
    early_stopping: bool = True
    num_classes: int = 1

    def fit(self, model: nn.Module, train_loader: DataLoader, val_loader: DataLoader | None, paths: FoldPaths,
            fold: int | str, generator: torch.Generator, volumes: list[str] | None = None) -> FoldResult:
        started = time.monotonic()
        recipe = self.recipe
        epochs = self.epochs or recipe.epochs
        paths.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        metric = recipe.monitor_metric
        groups = layer_groups(model)
        fmt = memory_format_of(recipe)
        model.to(self.device, memory_format=fmt)
        optimizer = make_optimizer(recipe, parameter_groups(model, groups, recipe.weight_decay))
        schedule = make_schedule(recipe, max(len(train_loader), 1), monitor_mode(metric), epochs)
        early = EarlyStopping(recipe.early_stopping_patience if self.early_stopping else 0, monitor_mode(metric))
        state = {"epoch": 0, "step": 0, "history": [], "stages": [], "outputs": None, "targets": None,
                 "best_metrics": {}, "seconds": 0.0}
        if paths.checkpoint.is_file():
            state = self._resume(paths.checkpoint, model, optimizer, schedule, early, generator)
            log.info("fold %s: resuming at epoch %d", fold, state["epoch"])
        mix = self._mixer(generator) if recipe.cutmix_prob > 0 and self.objective.kind != "segmentation" else None
        for epoch in range(state["epoch"], epochs):
            stage = stage_at(recipe.strategy_config(), epoch, len(groups))
            model.train()
            apply_stage(model, groups, stage)
            state["stages"].append(self._stage_record(epoch, stage, optimizer, schedule, state["step"]))
            step = self._step_hook(optimizer, stage, schedule, state)
            batches = self._bar(train_loader, f"fold {fold} epoch {epoch + 1}/{epochs}")
            train_loss = train_epoch(model, batches, optimizer, self.objective.loss, self.device,
                                     before_step=step, mix=mix, memory_format=fmt)
            if recipe.precise_bn_batches:
                recalibrate_batchnorm(model, train_loader, self.device, recipe.precise_bn_batches, fmt)
            record = {"epoch": epoch, "train_loss": train_loss, "lr": group_learning_rates(optimizer)}
            if val_loader is not None:
                metrics, outputs, targets = validate(model, val_loader, self.objective, self.device, volumes, fmt)
                value = metrics[metric] if metric != "loss" else metrics["loss"]
                record.update({"val_loss": metrics["loss"], f"val_{metric}": value})
                schedule.end_epoch(value)
                if early.update(epoch, value):
                    atomic_torch_save(_cpu_state(model), paths.best)
                    state.update(outputs=_listed(outputs), targets=_listed(targets), best_metrics=_scalars(metrics))
            else:
                early.update(epoch, -train_loss)
                atomic_torch_save(_cpu_state(model), paths.best)
            state["history"].append(record)
            state["epoch"] = epoch + 1
            state["seconds"] += time.monotonic() - started
            started = time.monotonic()
            self._checkpoint(paths.checkpoint, model, optimizer, schedule, early, generator, state)
            if self.early_stopping and early.should_stop and epoch + 1 >= recipe.min_epochs:
                log.info("fold %s: early stop after epoch %d (best %d)", fold, epoch + 1, early.best_epoch + 1)
                break
        model.load_state_dict(torch.load(paths.best, map_location=self.device, weights_only=True))
        return FoldResult(fold if isinstance(fold, int) else -1, early.best_epoch,
                          float(early.best) if early.best is not None else float("nan"),
                          state["best_metrics"], state["history"], _array(state["outputs"]),
                          _array(state["targets"]), state["seconds"] + time.monotonic() - started, state["stages"])

    # -- helpers

    def _step_hook(self, optimizer: torch.optim.Optimizer, stage: Stage, schedule: Schedule,
                   state: dict[str, Any]) -> Callable[[], None]:
        base_lr = self.recipe.lr

        def step() -> None:
            set_learning_rates(optimizer, base_lr, stage, schedule.factor(state["step"]))
            state["step"] += 1

        set_learning_rates(optimizer, base_lr, stage, schedule.factor(state["step"]))
        return step

    def _mixer(self, generator: torch.Generator) -> Callable[[torch.Tensor, torch.Tensor], Batch]:
        recipe = self.recipe

        def mix(images: torch.Tensor, targets: torch.Tensor) -> Batch:
            if self.objective.kind == "multiclass":
                targets = torch.nn.functional.one_hot(targets, self.num_classes).float()
            if float(torch.rand(1, generator=generator)) >= recipe.cutmix_prob:
                return images, targets
            return cutmix(images, targets.float(), recipe.cutmix_alpha, generator)

        return mix

    @staticmethod
    def _stage_record(epoch: int, stage: Stage, optimizer: torch.optim.Optimizer, schedule: Schedule,
                      step: int) -> dict[str, Any]:
        return {"epoch": epoch, "trainable": list(stage.trainable), "lr_scale": list(stage.lr_scale),
                "schedule_factor": schedule.factor(step)}

    def _bar(self, loader: DataLoader, description: str) -> Iterable[Batch]:
        if not self.progress:
            return loader
        from tqdm import tqdm

        return tqdm(loader, desc=description, leave=False, unit="batch", dynamic_ncols=True)

    @staticmethod
    def _checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Schedule,
                    early: EarlyStopping, generator: torch.Generator, state: dict[str, Any]) -> None:
        atomic_torch_save({"model": _cpu_state(model), "optimizer": optimizer.state_dict(),
                           "schedule": schedule.state_dict(), "early": early.state_dict(),
                           "generator": generator.get_state(), "rng": rng_state(), "state": state}, path)

    def _resume(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Schedule,
                early: EarlyStopping, generator: torch.Generator) -> dict[str, Any]:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        model.to(self.device)
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        early.load_state_dict(saved["early"])
        generator.set_state(saved["generator"])
        set_rng_state(saved["rng"])
        return saved["state"]


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if not isinstance(v, list)}


def _listed(array: np.ndarray | None) -> list | None:
    return None if array is None else array.tolist()


def _array(values: list | None) -> np.ndarray | None:
    return None if values is None else np.asarray(values)
