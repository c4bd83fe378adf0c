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
- ``progressive``: linear probing (only the head) for ``lp_epochs``, then one more group from the top
  every ``unfreeze_every`` epochs, with discriminative learning rates (gradual unfreezing, as in the BPD
  paper); with ``lp_epochs: 0`` the head's first ``unfreeze_every`` epochs alone are the probe.

The learning rate of a group at a step is ``lr * stage scale * schedule factor``: the schedule is
``constant``, ``warmup_poly`` (linear warm-up, then polynomial decay) or ``plateau`` (multiply by
``plateau_factor`` after ``plateau_patience`` epochs without improvement of the validation metric),
run by torch's schedulers (``LinearLR`` + ``PolynomialLR`` in a ``SequentialLR``, ``ReduceLROnPlateau``).
Frozen groups keep their batch-norm statistics (their BN layers run in eval mode).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim import lr_scheduler

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
        every = max(config.unfreeze_every, 1)
        if config.lp_epochs == 0:
            unfrozen = epoch // every
        else:
            unfrozen = 0 if epoch < config.lp_epochs else 1 + (epoch - config.lp_epochs) // every
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

@dataclass(frozen=True)
class ScheduleConfig:
    """A recipe's schedule keys, with the run's length in optimizer steps."""

    name: ScheduleName
    total_steps: int
    warmup_steps: int = 0
    power: float = 0.9
    plateau_factor: float = 0.1
    plateau_patience: int = 3
    mode: Literal["max", "min"] = "max"


def torch_scheduler(config: ScheduleConfig, optimizer: torch.optim.Optimizer
                    ) -> lr_scheduler.LRScheduler | lr_scheduler.ReduceLROnPlateau | None:
    """The schedule as a torch scheduler on ``optimizer`` (whose group learning rates are the peaks):

    - ``warmup_poly``: ``LinearLR`` from lr/warmup_steps up to lr over the warm-up steps, then
      ``PolynomialLR`` down to 0 at the last step (``SequentialLR``); stepped after every optimizer step.
    - ``plateau``: ``ReduceLROnPlateau`` (×plateau_factor after more than plateau_patience epochs
      without any improvement); stepped after every epoch with the validation metric.
    - ``constant``: none.
    """
    if config.name == "plateau":
        return lr_scheduler.ReduceLROnPlateau(optimizer, mode=config.mode, factor=config.plateau_factor,
                                              patience=config.plateau_patience, threshold=0.0, eps=0.0)
    if config.name == "constant":
        return None
    warmup = config.warmup_steps
    decay = lr_scheduler.PolynomialLR(optimizer, total_iters=max(config.total_steps - warmup, 1),
                                      power=config.power)
    if warmup == 0:
        return decay
    ramp = lr_scheduler.LinearLR(optimizer, start_factor=1.0 / warmup, end_factor=1.0,
                                 total_iters=warmup - 1)
    return lr_scheduler.SequentialLR(optimizer, [ramp, decay], milestones=[warmup])


class LearningRates:
    """The learning rate of each layer group: ``lr × stage scale × schedule`` (see the module's
    docstring). The stage's scales are applied when an epoch starts (a change multiplies the
    groups' rates, which every torch scheduler continues from); the schedule is :func:`torch_scheduler`."""

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, stage: Stage,
                 config: ScheduleConfig) -> None:
        self.optimizer = optimizer
        self.base_lr = base_lr
        self.scales = tuple(stage.lr_scale)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] = base_lr * self.scales[group["layer_group"]]
        self.config = config
        self.scheduler = torch_scheduler(config, optimizer)

    @property
    def per_step(self) -> bool:
        return self.scheduler is not None and self.config.name != "plateau"

    def begin_epoch(self, stage: Stage) -> None:
        """Apply ``stage``'s learning-rate scales (a no-op while they stay the same)."""
        if tuple(stage.lr_scale) == self.scales:
            return
        ratios = [new / old for new, old in zip(stage.lr_scale, self.scales)]
        for group in self.optimizer.param_groups:
            group["lr"] *= ratios[group["layer_group"]]
        schedulers = [self.scheduler, *getattr(self.scheduler, "_schedulers", [])]
        for scheduler in (s for s in schedulers if hasattr(s, "base_lrs")):
            scheduler.base_lrs = [lr * ratios[g["layer_group"]]  # what a closed form starts from
                                  for lr, g in zip(scheduler.base_lrs, self.optimizer.param_groups)]
        self.scales = tuple(stage.lr_scale)

    def after_step(self) -> None:
        if self.per_step:
            self.scheduler.step()

    def end_epoch(self, value: float) -> None:
        """The plateau schedule's look at the epoch's validation metric (non-finite values are ignored)."""
        if self.config.name == "plateau" and np.isfinite(value):
            self.scheduler.step(value)

    def factor(self) -> float:
        """The schedule's current factor (the head's learning rate over lr × its stage scale)."""
        head = max(self.optimizer.param_groups, key=lambda g: g["layer_group"])
        return head["lr"] / (self.base_lr * self.scales[head["layer_group"]])

    def state_dict(self) -> dict:
        return {"scales": list(self.scales),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.scales = tuple(state["scales"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])


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

Mixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def cutmix(prob: float, alpha: float, num_classes: int, *, binary: bool) -> Mixer:
    """CutMix (Yun et al. 2019) with timm's ``Mixup`` (CutMix only, no label smoothing): with
    probability ``prob`` a batch gets one box, of area drawn from Beta(alpha, alpha), pasted from
    the batch in reverse order, and targets mixed by the pasted area. Binary targets are mixed as
    timm's one-column multi-label targets; class indices become mixed one-hot rows. timm mixes an
    even number of images: in an odd batch the last one stays as it is. Its randomness is numpy's
    global generator (seeded per fold, saved in checkpoints)."""
    from timm.data import Mixup

    mixup = Mixup(mixup_alpha=0.0, cutmix_alpha=alpha, prob=prob, mode="batch", label_smoothing=0.0,
                  num_classes=1 if binary else num_classes, multi_label=binary)

    def dense(targets: torch.Tensor) -> torch.Tensor:
        return targets.float()[:, None] if binary else F.one_hot(targets.long(), num_classes).float()

    def mix(images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        even = len(images) - len(images) % 2
        mixed = dense(targets)
        if even:
            # timm mixes images[:even] in place (a view) and returns its targets mixed
            _, mixed_even = mixup(images[:even], mixed[:even] if binary else targets[:even])
            mixed = torch.cat([mixed_even, mixed[even:]])
        return images, mixed[:, 0] if binary else mixed

    return mix


def trainable_fraction(model: nn.Module) -> float:
    params: Iterable[torch.Tensor] = list(model.parameters())
    total = sum(p.numel() for p in params)
    return sum(p.numel() for p in params if p.requires_grad) / max(total, 1)
