"""Training recipes: YAML defaults in the task's recipe file (its catalogue entry's ``recipe``, in
``config/train/``; or ``--recipe FILE``), overridden by ``--set key=value``.

timm style: the model's defaults live in one validated object; the CLI overrides any key, dotted
for nested sections (``--set gate.min_auroc=0.8``, ``--set augment.hflip=0``); values are parsed
as YAML (``--set views=[chest_frontal]``). Unknown keys are errors. The resolved recipe is saved
beside every run and with the model version it produced. ``--set dims=3`` on a segmentation task
takes its defaults from the 3D recipe beside the task's (``lung-seg-3d.yaml`` next to ``lung-seg.yaml``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo,
                      model_validator)

from config.tasks import Kind, TaskCatalogue, load_catalogue
from inference.models import VOLUME_DIVISOR, is_volumetric_arch
from training.strategies import ScheduleName, StrategyConfig, StrategyName

RECIPES_DIR = Path(str(resources.files("config").joinpath("train")))
MONITORS = {"binary": "auroc", "multiclass": "balanced_accuracy", "segmentation": "dice", "regression": "mae"}
"""The validation metric a kind follows with ``monitor: auto``."""
FREEZING_STRATEGIES = ("linear_probe", "lp_ft", "progressive")
"""Strategies that train a frozen backbone's head first: they need a start that is not random."""


def frozen_random_message(strategy: str, init: str) -> str:
    return (f"strategy {strategy} freezes the backbone, and this run starts from random weights ({init}): its "
            "head would learn on random features. Start from weights (init=FILE with a site checkpoint, "
            "training.checkpoints in the node's config for init: auto, or init=view after "
            "`cradle train view --set arch=ARCH`), or set strategy=full")


class RecipeError(ValueError):
    """The recipe file or an override is invalid; the message names the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AugmentConfig(Strict):
    """Per-sample augmentation (probabilities, or magnitudes; 0 switches one off)."""

    hflip: float = Field(0.0, ge=0, le=1, description="probability of a horizontal flip")
    vflip: float = Field(0.0, ge=0, le=1)
    rotate_degrees: float = Field(15.0, ge=0, le=180)
    shift: float = Field(0.1, ge=0, le=0.5, description="fraction of the image size")
    zoom: float = Field(0.1, ge=0, le=0.5, description="±fraction")
    affine_prob: float = Field(0.8, ge=0, le=1)
    brightness: float = Field(0.1, ge=0, le=1)
    contrast: float = Field(0.1, ge=0, le=1)
    gamma: float = Field(0.1, ge=0, le=1, description="±fraction around gamma 1")
    noise_std: float = Field(0.02, ge=0, le=1)
    noise_prob: float = Field(0.3, ge=0, le=1)
    blur_prob: float = Field(0.1, ge=0, le=1)
    sharpen_prob: float = Field(0.1, ge=0, le=1)


class GateConfig(Strict):
    """When a candidate may replace the active version."""

    min_auroc: float = Field(0.7, ge=0, le=1, description="absolute floor on the held-out AUROC")
    min_dice: float = Field(0.7, ge=0, le=1, description="absolute floor on the held-out Dice")
    max_auroc_drop: float = Field(0.0, ge=0, le=1,
                                  description="largest AUROC decrease below the active version accepted")
    max_dice_drop: float = Field(0.0, ge=0, le=1)
    max_mae_ratio: float = Field(0.8, gt=0, description="regression: held-out MAE at most this share of the "
                                                         "MAE of predicting the development mean")
    max_mae: float | None = Field(None, gt=0, description="regression: absolute ceiling on the held-out MAE")
    delong_alpha: float = Field(0.05, gt=0, lt=1,
                                description="a candidate significantly lower (one-sided DeLong) is refused")
    require_significant: bool = Field(False, description="also require a significant AUROC gain over the active")
    auto_promote: bool = Field(True, description="activate a candidate that passes; false: leave it to the admin")


class Recipe(Strict):
    """A training recipe. Validated against a task catalogue (``context={"catalogue": ...}``; the
    shipped one by default): ``task`` is one of its tasks and :attr:`kind` that task's kind."""

    task: str
    dims: Literal[2, 3] = Field(2, description="segmentation: 2 = slice by slice (the paper), 3 = whole series")
    arch: str = "resnet50"
    image_size: int = Field(256, ge=32)
    patch_size: tuple[int, int, int] = Field((16, 64, 64), description="dims=3: training patch and sliding "
                                                                      "window (slices, rows, columns)")
    patches_per_volume: int = Field(4, ge=1, description="dims=3: patches sampled per series per epoch")
    normalisation: str = "minmax_0.5pct"
    clahe: bool = False
    keep_aspect: bool = True

    epochs: int = Field(20, ge=1)
    batch_size: int = Field(16, ge=1)
    folds: int = Field(5, ge=2)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    split_salt: str = Field("cradle", description="changes which patients are held out")
    final: Literal["best_fold", "refit"] = "best_fold"

    strategy: StrategyName = "full"
    layer_decay: float = Field(1.0, gt=0, le=1)
    lp_epochs: int = Field(0, ge=0)
    ft_lr_scale: float = Field(1.0, gt=0)
    unfreeze_every: int = Field(1, ge=1)

    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    schedule: ScheduleName = "constant"
    warmup_epochs: float = Field(0.0, ge=0)
    poly_power: float = Field(0.9, gt=0)
    plateau_factor: float = Field(0.1, gt=0, lt=1)
    plateau_patience: int = Field(3, ge=0)
    early_stopping_patience: int = Field(5, ge=0, description="0 disables early stopping")
    min_epochs: int = Field(0, ge=0, description="early stopping never stops before this many epochs")
    precise_bn_batches: int = Field(
        16, ge=0, description="after each epoch, re-estimate BatchNorm statistics over this many training "
                              "batches (0 = off): short runs otherwise evaluate with stale running averages")
    monitor: Literal["auto", "auroc", "loss", "dice", "balanced_accuracy"] = "auto"

    cutmix_prob: float = Field(0.0, ge=0, le=1)
    cutmix_alpha: float = Field(1.0, ge=0)
    class_balanced: bool = Field(False, description="sample classes equally often (view task)")
    pos_weight: Literal["none", "balanced"] = "none"
    augment: AugmentConfig = Field(default_factory=AugmentConfig)

    binary: bool = Field(False, description="a multiclass task with yes/no labels (labels.yes_no): train its "
                                            "first class against the rest, one output (a site that only "
                                            "knows yes/no)")
    seed: int = 0
    init: str = Field("random", description="random; auto (the view model of the same architecture, else the site "
                                            "checkpoint of it in training.checkpoints, else random); "
                                            "a task (its active version; view: its version of the same "
                                            "architecture); a version like view-3; or a checkpoint file "
                                            "(.safetensors, .pth, .pt, .bin; timm/torchvision/Hugging Face layout)")
    views: list[str] = Field(default_factory=lambda: ["chest_frontal"],
                             description="csv-labelled tasks: view classes (from headers) to train on; [] = all")
    taxonomy: str = Field("views7", description="tasks with the taxonomy's classes: views7 or views30")
    max_per_class: int | None = Field(None, ge=1, description="header-labelled tasks: cap per class")

    target_sensitivity: float = Field(0.9, gt=0, le=1)
    temperature_scaling: bool = True
    bootstrap: int = Field(1000, ge=0)
    gate: GateConfig = Field(default_factory=GateConfig)
    num_workers: int | None = Field(None, ge=0, description="default: training.num_workers")
    device: str | None = Field(None, description="default: training.device")
    deterministic: bool = True
    channels_last: bool = Field(True, description="NHWC memory format (faster convolutions on CPU and GPU)")

    _kind: Kind = PrivateAttr()

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> "Recipe":
        catalogue = (info.context or {}).get("catalogue") or load_catalogue()
        if self.task not in catalogue:
            raise ValueError(f"unknown task {self.task!r}; known: {', '.join(catalogue.names())}")
        definition = catalogue.get(self.task)
        if self.binary and not (definition.kind == "multiclass" and definition.labels.yes_no):
            raise ValueError(f"binary: true is for a multiclass task whose labels take yes/no (labels.yes_no); "
                             f"{self.task} is {definition.kind}"
                             + ("" if definition.kind != "multiclass" else " without yes/no labels"))
        self._kind = "binary" if self.binary else definition.kind
        if self._kind == "segmentation" and self.image_size % 32:
            raise ValueError(f"{self.task} needs image_size divisible by 32, got {self.image_size}")
        self._check_dims()
        if self.init == "random" and self.strategy in FREEZING_STRATEGIES:
            raise ValueError(frozen_random_message(self.strategy, "init=random"))
        if self.strategy in ("lp_ft", "progressive") and self.lp_epochs and self.lp_epochs >= self.epochs:
            raise ValueError(f"{self.strategy} needs lp_epochs < epochs (linear probing first, then the rest)")
        if self.cutmix_prob > 0 and self.cutmix_alpha == 0:
            raise ValueError("CutMix draws its box's area from Beta(cutmix_alpha, cutmix_alpha): cutmix_alpha "
                             "must be above 0 when cutmix_prob is")
        return self

    def _check_dims(self) -> None:
        if self.dims == 3 and self._kind != "segmentation":
            raise ValueError(f"dims=3 is for segmentation tasks; {self.task} is {self._kind}")
        if self._kind == "segmentation" and is_volumetric_arch(self.arch) != (self.dims == 3):
            raise ValueError(f"arch {self.arch} is {'3D' if is_volumetric_arch(self.arch) else '2D'} "
                             f"but dims={self.dims}")
        if self.dims == 3 and any(p % d for p, d in zip(self.patch_size, VOLUME_DIVISOR)):
            raise ValueError(f"patch_size {list(self.patch_size)} must be divisible by {list(VOLUME_DIVISOR)}")
        if self.dims == 3 and max(self.patch_size[1:]) > self.image_size:
            raise ValueError(f"patch_size rows and columns cannot exceed image_size {self.image_size}")

    @property
    def kind(self) -> Kind:
        """How this run trains: the task's kind in the catalogue the recipe was validated against, or
        ``binary`` for a multiclass task's ``binary: true`` recipe."""
        return self._kind

    @property
    def monitor_metric(self) -> str:
        if self.monitor != "auto":
            return self.monitor
        return MONITORS.get(self.kind, "loss")

    def strategy_config(self) -> StrategyConfig:
        return StrategyConfig(self.strategy, self.layer_decay, self.lp_epochs, self.ft_lr_scale, self.unfreeze_every)

    def digest(self) -> str:
        """A hash of every setting that changes the result (not the device or worker count)."""
        data = self.model_dump(mode="json", exclude={"num_workers", "device", "channels_last"})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` → (["a", "b"], value parsed as YAML)."""
    if "=" not in text:
        raise RecipeError(f"--set {text!r}: expected KEY=VALUE")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise RecipeError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().replace("-", "_").split("."), value


def _merge(data: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``path`` to ``value``; a mapping is merged into an existing section, key by key."""
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {'.'.join(path)}: {part} is not a section")
    key = path[-1]
    if isinstance(value, dict) and isinstance(node.get(key), dict):
        for inner, inner_value in value.items():
            _merge(node, [key, str(inner)], inner_value)
    else:
        node[key] = value


def _describe(exc: ValidationError, source: str) -> str:
    lines = []
    for error in exc.errors():
        key = ".".join(str(p) for p in error["loc"]) or "(top level)"
        reason = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
        lines.append(f"{source}: {key}: {reason}")
    return "invalid recipe:\n  " + "\n  ".join(lines)


def recipe_path(task: str, path: str | Path | None = None, catalogue: TaskCatalogue | None = None,
                dims: int = 2) -> Path:
    """``path``, else the task's default recipe (its catalogue entry's ``recipe``, in config/train/; for
    ``dims=3`` the ``-3d`` recipe beside it)."""
    if path:
        return Path(path)
    default = RECIPES_DIR / (catalogue or load_catalogue()).get(task).recipe
    volumetric = default.with_name(f"{default.stem}-3d{default.suffix}")
    return volumetric if dims == 3 and volumetric.is_file() else default


def _dims_of(overrides: Sequence[str]) -> int:
    """The ``dims`` an override asks for (2 without one)."""
    asked = [value for key, value in map(parse_override, overrides) if key == ["dims"]]
    return asked[-1] if asked and asked[-1] in (2, 3) else 2


def load_recipe(task: str, path: str | Path | None = None, overrides: Sequence[str] = (),
                catalogue: TaskCatalogue | None = None) -> Recipe:
    """Defaults ← the task's recipe file (or ``path``) ← overrides; ``task`` must be in ``catalogue``
    (default: the shipped one; a node passes ``settings.catalogue()``, which holds the site's tasks)."""
    catalogue = catalogue or load_catalogue()
    if task not in catalogue:
        raise RecipeError(f"unknown task {task!r}; known: {', '.join(catalogue.names())}")
    source = recipe_path(task, path, catalogue, _dims_of(overrides))
    if not source.is_file():
        raise RecipeError(f"recipe not found: {source}" + ("" if path else " (give one with --recipe FILE)"))
    try:
        data = yaml.safe_load(source.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: the top level must be a mapping")
    if data.get("task", task) != task:
        raise RecipeError(f"{source} is a recipe for {data['task']!r}, not {task!r}")
    data["task"] = task
    for text in overrides:
        _merge(data, *parse_override(text))
    try:
        return Recipe.model_validate(data, context={"catalogue": catalogue})
    except ValidationError as exc:
        raise RecipeError(_describe(exc, source.name)) from None
