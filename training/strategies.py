"""Fine-tuning strategies from the papers: which layers train, at which learning rate, when.

A network is cut into *layer groups* ordered from the input to the output; the last group is the
head (the classifier, or the decoder and segmentation head of a U-Net). A group's *depth* counts
from the top: the head has depth 0, the group below it depth 1, and so on.

Strategies (``strategy`` in a recipe):

- ``full``: every group trains; with ``layer_decay < 1`` the learning rates are discriminative
  (group at depth d: ``lr * layer_decay**d``, Howard & Ruder 2018).
- ``linear_probe``: only the head trains.
- ``lp_ft``: linear probing for ``lp_epochs``, then everything fine-tunes at ``lr * ft_lr_scale``
  (discriminative when ``layer_decay < 1``) (Kumar et al. 2022).
- ``progressive``: the head first, then one more group from the top every ``unfreeze_every``
  epochs, with discriminative learning rates (gradual unfreezing, as in the BPD paper).

The learning rate of a group at a step is ``lr * stage scale * schedule factor``: the schedule is
``constant``, ``warmup_poly`` (linear warm-up, then polynomial decay) or ``plateau`` (multiply by
``plateau_factor`` after ``plateau_patience`` epochs without improvement of the validation metric).
Frozen groups keep their batch-norm statistics (their BN layers run in eval mode).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

StrategyName = Literal["full", "linear_probe", "lp_ft", "progressive"]
ScheduleName = Literal["constant", "warmup_poly", "plateau"]


# --- layer groups -----------------------------------------------------------------------------

def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, candidate in model.named_modules() if candidate is module)


def _timm_groups(model: nn.Module) -> list[list[str]]:
    from timm.models import group_parameters

    grouped = group_parameters(model, model.group_matcher(coarse=True))
    prefix = _module_name(model, model.get_classifier())
    head = [n for n, _ in model.named_parameters() if n.startswith(prefix + ".")]
    body = [[n for n in names if n not in head] for _, names in sorted(grouped.items())]
    return [names for names in body if names] + [head]


def _unet_groups(model: nn.Module) -> list[list[str]]:
    """MONAI FlexibleUNet: encoder stem, encoder stages, then decoder + segmentation head."""
    encoder = model.encoder
    stem = [f"encoder.{n}" for n, _ in encoder.named_parameters()
            if not n.startswith(("layer1.", "layer2.", "layer3.", "layer4."))]
    stages = [[f"encoder.{n}" for n, _ in encoder.named_parameters() if n.startswith(f"layer{i}.")]
              for i in range(1, 5)]
    head = [n for n, _ in model.named_parameters() if not n.startswith("encoder.")]
    return [g for g in [stem, *stages] if g] + [head]


def layer_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names per layer group, input first, head last; every parameter in one group."""
    if hasattr(model, "group_matcher") and hasattr(model, "get_classifier"):
        groups = _timm_groups(model)
    elif hasattr(model, "encoder") and hasattr(model, "segmentation_head"):
        groups = _unet_groups(model)
    else:
        children = [name for name, child in model.named_children() if any(True for _ in child.parameters())]
        groups = [[n for n, _ in model.named_parameters() if n.startswith(c + ".")] for c in children]
    assigned = sorted(n for g in groups for n in g)
    if assigned != sorted(n for n, _ in model.named_parameters()):
        raise ValueError("layer groups do not cover every parameter exactly once")
    return groups


def backbone_names(model: nn.Module) -> set[str]:
    """Names of the parameters outside the head (what in-domain initialisation transfers)."""
    return {n for group in layer_groups(model)[:-1] for n in group}


# --- stages -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class StrategyConfig:
    name: StrategyName = "full"
    layer_decay: float = 1.0
    lp_epochs: int = 0
    ft_lr_scale: float = 1.0
    unfreeze_every: int = 1


@dataclass(frozen=True)
class Stage:
    """What trains during one epoch: per group, whether it trains and its learning-rate scale."""

    trainable: tuple[bool, ...]
    lr_scale: tuple[float, ...]


def stage_at(config: StrategyConfig, epoch: int, n_groups: int) -> Stage:
    """The stage of ``config`` at ``epoch`` (0-based) for a network of ``n_groups`` groups."""
    depth = np.arange(n_groups)[::-1]  # head (last group) has depth 0
    decayed = tuple(float(config.layer_decay ** d) for d in depth)
    if config.name == "full":
        return Stage((True,) * n_groups, decayed)
    if config.name == "linear_probe":
        return Stage(tuple(bool(d == 0) for d in depth), (1.0,) * n_groups)
    if config.name == "lp_ft":
        if epoch < config.lp_epochs:
            return Stage(tuple(bool(d == 0) for d in depth), (1.0,) * n_groups)
        return Stage((True,) * n_groups, tuple(config.ft_lr_scale * s for s in decayed))
    if config.name == "progressive":
        unfrozen = epoch // max(config.unfreeze_every, 1)
        return Stage(tuple(bool(d <= unfrozen) for d in depth), decayed)
    raise ValueError(f"unknown strategy {config.name!r}")


def parameter_groups(model: nn.Module, groups: list[list[str]], weight_decay: float) -> list[dict]:
    """Optimizer parameter groups, one per layer group (norms and biases without weight decay)."""
    params = dict(model.named_parameters())
    result = []
    for index, names in enumerate(groups):
        decay = [params[n] for n in names if params[n].ndim > 1]
        no_decay = [params[n] for n in names if params[n].ndim <= 1]
        for members, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if members:
                result.append({"params": members, "weight_decay": wd, "layer_group": index})
    return result


def apply_stage(model: nn.Module, groups: list[list[str]], stage: Stage) -> None:
    """Set ``requires_grad`` per group and put batch norms of fully frozen modules in eval mode.

    Call after ``model.train()``.
    """
    params = dict(model.named_parameters())
    for names, trainable in zip(groups, stage.trainable):
        for name in names:
            params[name].requires_grad_(trainable)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            own = list(module.parameters(recurse=False))
            if own and not any(p.requires_grad for p in own):
                module.eval()


# --- learning-rate schedule -------------------------------------------------------------------

@dataclass
class Schedule:
    """The schedule factor, per optimizer step (warm-up/poly) or per epoch (plateau)."""

    name: ScheduleName
    total_steps: int
    warmup_steps: int = 0
    power: float = 0.9
    plateau_factor: float = 0.1
    plateau_patience: int = 3
    mode: Literal["max", "min"] = "max"
    min_factor: float = 0.0
    best: float | None = None
    bad_epochs: int = 0
    reductions: int = 0

    def factor(self, step: int) -> float:
        if self.name == "plateau":
            return max(self.plateau_factor ** self.reductions, self.min_factor)
        if self.name == "constant":
            return 1.0
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        remaining = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / remaining, 1.0)
        return max((1.0 - progress) ** self.power, self.min_factor)

    def end_epoch(self, value: float) -> None:
        """Plateau bookkeeping with the epoch's validation metric."""
        if self.name != "plateau" or not np.isfinite(value):
            return
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if better:
            self.best, self.bad_epochs = value, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > self.plateau_patience:
            self.reductions += 1
            self.bad_epochs = 0

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_epochs": self.bad_epochs, "reductions": self.reductions}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad_epochs, self.reductions = state["best"], state["bad_epochs"], state["reductions"]


def set_learning_rates(optimizer: torch.optim.Optimizer, base_lr: float, stage: Stage, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = base_lr * stage.lr_scale[group["layer_group"]] * factor


def group_learning_rates(optimizer: torch.optim.Optimizer) -> dict[int, float]:
    """Layer group → learning rate (what a test or the report inspects)."""
    return {g["layer_group"]: g["lr"] for g in optimizer.param_groups}


# --- early stopping ---------------------------------------------------------------------------

@dataclass
class EarlyStopping:
    """Stop after ``patience`` epochs without improvement of the validation metric."""

    patience: int
    mode: Literal["max", "min"] = "max"
    min_delta: float = 0.0
    best: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[float] = field(default_factory=list)

    def update(self, epoch: int, value: float) -> bool:
        """Record ``value``; return whether it is the best so far."""
        self.history.append(float(value))
        if not np.isfinite(value):
            self.bad_epochs += 1
            return False
        sign = 1.0 if self.mode == "max" else -1.0
        if self.best is None or sign * (value - self.best) > self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = float(value), epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.bad_epochs, self.history = state["bad_epochs"], list(state["history"])


# --- CutMix -----------------------------------------------------------------------------------

def cutmix(images: torch.Tensor, targets: torch.Tensor, alpha: float,
           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix (Yun et al. 2019): paste a random box from a shuffled batch; mix targets by area."""
    batch, _, height, width = images.shape
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha)) if alpha > 0 else 0.5
    permutation = torch.randperm(batch, generator=generator)
    cut_h, cut_w = int(height * np.sqrt(1 - lam)), int(width * np.sqrt(1 - lam))
    cy = int(torch.randint(0, height, (1,), generator=generator))
    cx = int(torch.randint(0, width, (1,), generator=generator))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    mixed = images.clone()
    mixed[:, :, y0:y1, x0:x1] = images[permutation, :, y0:y1, x0:x1]
    area = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
    mixed_targets = area * targets + (1.0 - area) * targets[permutation]
    return mixed, mixed_targets


def trainable_fraction(model: nn.Module) -> float:
    params: Iterable[torch.Tensor] = list(model.parameters())
    total = sum(p.numel() for p in params)
    return sum(p.numel() for p in params if p.requires_grad) / max(total, 1)
