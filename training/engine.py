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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from common.files import atomic_file, atomic_write
from training.recipe import Recipe
from training.strategies import (EarlyStopping, LearningRates, Mixer, ScheduleConfig, Stage, apply_stage,
                                 group_learning_rates, layer_groups, parameter_groups, stage_at)

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

class Objective(Protocol):
    """What a kind of task trains with (training.kinds): its loss, how a validation pass scores,
    and how a batch is mixed (CutMix) when the recipe asks for it."""

    kind: str

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def validate(self, model: nn.Module, loader: Iterable[Batch], device: torch.device, volumes: list[str] | None,
                 memory_format: torch.memory_format) -> tuple[dict[str, Any], np.ndarray | None, np.ndarray | None]:
        ...

    def mixer(self, prob: float, alpha: float) -> Mixer | None: ...


# --- one epoch, one pass ----------------------------------------------------------------------

def train_epoch(model: nn.Module, batches: Iterable[Batch], optimizer: torch.optim.Optimizer,
                loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], device: torch.device, *,
                after_step: Callable[[], None] | None = None, mix: Mixer | None = None,
                memory_format: torch.memory_format = torch.contiguous_format) -> float:
    """One pass over ``batches``; returns the mean training loss (one host sync, at the end)."""
    total = torch.zeros((), device=device)
    count = 0
    for images, targets in batches:
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        if mix is not None:
            images, targets = mix(images, targets)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(images), targets)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
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


def validate(model: nn.Module, loader: DataLoader, objective: Objective, device: torch.device,
             volumes: list[str] | None = None, memory_format: torch.memory_format = torch.contiguous_format
             ) -> tuple[dict[str, Any], np.ndarray | None, np.ndarray | None]:
    """Metrics (with ``loss``) over ``loader``; classification also returns outputs and targets."""
    return objective.validate(model, loader, device, volumes, memory_format)


# --- optimisation -----------------------------------------------------------------------------

def make_optimizer(recipe: Recipe, groups: list[dict]) -> torch.optim.Optimizer:
    """Adam/AdamW use the fused kernels (CPU and CUDA): about ten times faster per step on a CPU."""
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=0.9, nesterov=True)
    kind = torch.optim.AdamW if recipe.optimizer == "adamw" else torch.optim.Adam
    return kind(groups, lr=recipe.lr, fused=True)


def memory_format_of(recipe: Recipe) -> torch.memory_format:
    """Channels-last for 2D networks when the recipe asks; 3D inputs (NCDHW) stay contiguous."""
    return torch.channels_last if recipe.channels_last and recipe.dims == 2 else torch.contiguous_format


def make_schedule(recipe: Recipe, optimizer: torch.optim.Optimizer, stage: Stage, steps_per_epoch: int,
                  mode: str, epochs: int | None = None) -> LearningRates:
    """The recipe's learning rates on ``optimizer``, starting at ``stage``'s scales."""
    epochs = epochs or recipe.epochs
    if recipe.schedule == "warmup_poly" and recipe.warmup_epochs >= epochs:
        log.warning("warmup_epochs %g >= epochs %d: the learning rate never reaches lr %g (set warmup_epochs "
                    "below epochs, or schedule=constant)", recipe.warmup_epochs, epochs, recipe.lr)
    config = ScheduleConfig(recipe.schedule, total_steps=epochs * steps_per_epoch,
                            warmup_steps=int(round(recipe.warmup_epochs * steps_per_epoch)), power=recipe.poly_power,
                            plateau_factor=recipe.plateau_factor, plateau_patience=recipe.plateau_patience, mode=mode)
    return LearningRates(optimizer, recipe.lr, stage, config)


LOWER_IS_BETTER = frozenset({"loss", "mae", "rmse"})
"""Validation metrics a run minimises; every other one it maximises."""


def monitor_mode(metric: str) -> str:
    return "min" if metric in LOWER_IS_BETTER else "max"


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
    with atomic_file(path) as handle:
        torch.save(obj, handle)


def atomic_json(obj: Any, path: Path) -> None:
    atomic_write(path, json.dumps(plain(obj), indent=2, allow_nan=False) + "\n")


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
        rates = make_schedule(recipe, optimizer, stage_at(recipe.strategy_config(), 0, len(groups)),
                              max(len(train_loader), 1), monitor_mode(metric), epochs)
        early = EarlyStopping(recipe.early_stopping_patience if self.early_stopping else 0, monitor_mode(metric))
        state = {"epoch": 0, "step": 0, "history": [], "stages": [], "outputs": None, "targets": None,
                 "best_metrics": {}, "seconds": 0.0}
        if paths.checkpoint.is_file():
            state = self._resume(paths.checkpoint, model, optimizer, rates, early, generator)
            log.info("fold %s: resuming at epoch %d", fold, state["epoch"])
        mix = self.objective.mixer(recipe.cutmix_prob, recipe.cutmix_alpha) if recipe.cutmix_prob > 0 else None
        for epoch in range(state["epoch"], epochs):
            stage = stage_at(recipe.strategy_config(), epoch, len(groups))
            model.train()
            apply_stage(model, groups, stage)
            rates.begin_epoch(stage)
            state["stages"].append(self._stage_record(epoch, stage, rates))
            batches = self._bar(train_loader, f"fold {fold} epoch {epoch + 1}/{epochs}")
            train_loss = train_epoch(model, batches, optimizer, self.objective.loss, self.device,
                                     after_step=rates.after_step, mix=mix, memory_format=fmt)
            state["step"] += len(train_loader)
            if recipe.precise_bn_batches:
                recalibrate_batchnorm(model, train_loader, self.device, recipe.precise_bn_batches, fmt)
            record = {"epoch": epoch, "train_loss": train_loss, "lr": group_learning_rates(optimizer)}
            if val_loader is not None:
                metrics, outputs, targets = validate(model, val_loader, self.objective, self.device, volumes, fmt)
                value = metrics[metric] if metric != "loss" else metrics["loss"]
                record.update({"val_loss": metrics["loss"], f"val_{metric}": value})
                rates.end_epoch(value)
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
            self._checkpoint(paths.checkpoint, model, optimizer, rates, early, generator, state)
            if self.early_stopping and early.should_stop and epoch + 1 >= recipe.min_epochs:
                log.info("fold %s: early stop after epoch %d (best %d)", fold, epoch + 1, early.best_epoch + 1)
                break
        model.load_state_dict(torch.load(paths.best, map_location=self.device, weights_only=True))
        return FoldResult(fold if isinstance(fold, int) else -1, early.best_epoch,
                          float(early.best) if early.best is not None else float("nan"),
                          state["best_metrics"], state["history"], _array(state["outputs"]),
                          _array(state["targets"]), state["seconds"] + time.monotonic() - started, state["stages"])

    # -- helpers

    @staticmethod
    def _stage_record(epoch: int, stage: Stage, rates: LearningRates) -> dict[str, Any]:
        return {"epoch": epoch, "trainable": list(stage.trainable), "lr_scale": list(stage.lr_scale),
                "schedule_factor": rates.factor()}

    def _bar(self, loader: DataLoader, description: str) -> Iterable[Batch]:
        if not self.progress:
            return loader
        from tqdm import tqdm

        return tqdm(loader, desc=description, leave=False, unit="batch", dynamic_ncols=True)

    @staticmethod
    def _checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rates: LearningRates,
                    early: EarlyStopping, generator: torch.Generator, state: dict[str, Any]) -> None:
        atomic_torch_save({"model": _cpu_state(model), "optimizer": optimizer.state_dict(),
                           "schedule": rates.state_dict(), "early": early.state_dict(),
                           "generator": generator.get_state(), "rng": rng_state(), "state": state}, path)

    def _resume(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rates: LearningRates,
                early: EarlyStopping, generator: torch.Generator) -> dict[str, Any]:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        model.to(self.device)
        optimizer.load_state_dict(saved["optimizer"])
        rates.load_state_dict(saved["schedule"])
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
