"""Where a run starts (the recipe's ``init``), as every paper behind the product starts: from weights.

- ``random``: freshly initialised (never downloaded).
- a checkpoint file a site brings (``init=/path/resnet50.safetensors``): a plain state dict in timm,
  torchvision or Hugging Face layout (``.safetensors``, or ``.pth``/``.pt``/``.bin`` read with
  ``torch.load(weights_only=True)``; also a Hugging Face hub cache folder of a timm model), possibly
  wrapped (``state_dict``/``model`` keys, ``module.`` prefixes: :mod:`inference.registry.weights`).
  A 3-channel stem is summed to the 1-channel input (``timm.models.adapt_input_conv``), the classifier
  is left to the task's head, a FlexibleUNet's ``encoder.`` takes a ResNet's layers.
- a model version: ``view`` (or any task: its active version), ``view-3``; ``auto`` is the in-domain
  start: the view model of the same architecture, else the site checkpoint the node's config names for
  that architecture (``training.checkpoints``), else random with a warning.

What loaded and what did not is counted in the summary and the report and named in the log; a
checkpoint that fits nothing is an error. A freezing strategy on a random start is refused: its
head would learn on random features.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.models import adapt_input_conv
from torch import nn

from inference.models import is_segmentation_arch
from inference.registry import ModelLoadError, ModelVersion
from inference.registry.weights import read_weights_file, state_dict_readings
from training.recipe import FREEZING_STRATEGIES, RecipeError, frozen_random_message
from training.strategies import backbone_names

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
HUB_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
"""What a Hugging Face hub folder of a timm model holds, in order of preference."""


# --- moving tensors from a source state dict into a network ------------------------------------------

@dataclass
class Transfer:
    """What one source state dict gave a network, by name."""

    loaded: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)  # loaded after summing a 3-channel stem to 1 channel
    missing: list[str] = field(default_factory=list)  # wanted by the network, not in the source (or misfit)
    unused: list[str] = field(default_factory=list)   # in the source, taken by nothing (e.g. the old head)
    wanted: int = 0

    def counts(self) -> dict[str, int]:
        return {"loaded": len(self.loaded), "wanted": self.wanted, "adapted": len(self.adapted),
                "missing": len(self.missing), "unused": len(self.unused)}


def _is_backbone_buffer(name: str, model: nn.Module, backbone: set[str]) -> bool:
    module = name.rsplit(".", 1)[0]
    return any(p.startswith(module + ".") for p in backbone)


def _adaptable(source: torch.Tensor, target: torch.Tensor) -> bool:
    """A stem convolution saved for 3 (RGB) input channels, wanted with another number."""
    return (source.ndim == 4 and target.ndim == 4 and source.shape[1] == 3 and target.shape[1] != 3
            and source.shape[0] == target.shape[0] and source.shape[2:] == target.shape[2:])


def plan_transfer(model: nn.Module, source: dict[str, torch.Tensor], *, whole: bool
                  ) -> tuple[dict[str, torch.Tensor], Transfer]:
    """The tensors of ``source`` that go into ``model`` (same name, or the same name inside a U-Net's
    ``encoder.``; same shape, or a 3-channel stem adapted) and the account of it. ``whole`` takes the
    head too (same task and classes); otherwise the backbone only: the task's head stays new."""
    target = model.state_dict()
    backbone = backbone_names(model)
    wanted = [n for n in target if whole or n in backbone or _is_backbone_buffer(n, model, backbone)]
    report, state, used = Transfer(wanted=len(wanted)), {}, set()
    for name in wanted:
        for candidate in dict.fromkeys((name, name.removeprefix("encoder."))):
            tensor = source.get(candidate)
            if tensor is None:
                continue
            if tensor.shape == target[name].shape:
                state[name] = tensor
            elif _adaptable(tensor, target[name]):
                state[name] = adapt_input_conv(target[name].shape[1], tensor)
                report.adapted.append(name)
            else:
                continue
            used.add(candidate)
            report.loaded.append(name)
            break
        else:
            report.missing.append(name)
    report.unused = [k for k in source if k not in used]
    return state, report


def transfer(model: nn.Module, source: dict[str, torch.Tensor], *, whole: bool) -> Transfer:
    """Load what fits of ``source`` into ``model`` (see :func:`plan_transfer`)."""
    state, report = plan_transfer(model, source, whole=whole)
    model.load_state_dict(state, strict=False)
    return report


# --- checkpoint files a site brings --------------------------------------------------------------------

def is_checkpoint_path(init: str) -> bool:
    """``init`` names a file or folder rather than ``random``/``auto``/a task/a version."""
    return "/" in init or init.endswith(CHECKPOINT_SUFFIXES) or Path(init).expanduser().exists()


def checkpoint_file(path: Path) -> Path:
    """``path``, or the one weights file inside a Hugging Face hub folder (``model.safetensors``,
    ``pytorch_model.bin``; in a cache folder under ``snapshots/<commit>/``)."""
    path = path.expanduser()
    if path.is_file():
        if not path.name.endswith(CHECKPOINT_SUFFIXES):
            raise RecipeError(f"init: {path.name} is not a checkpoint ({', '.join(CHECKPOINT_SUFFIXES)})")
        return path
    if not path.is_dir():
        raise RecipeError(f"init: checkpoint not found: {path}")
    for name in HUB_FILES:
        found = sorted({p.resolve() for p in path.rglob(name)})
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise RecipeError(f"init: {path} holds {len(found)} {name} files ({', '.join(map(str, found[:4]))}); "
                              "point init at one of them")
    raise RecipeError(f"init: {path} holds no {' or '.join(HUB_FILES)}")


def read_checkpoint(path: Path, model: nn.Module, *, whole: bool = False
                    ) -> tuple[dict[str, torch.Tensor], Transfer, str]:
    """The tensors of the checkpoint at ``path`` that fit ``model``, the account, and how the file was
    read (the unwrapping that fits most tensors). RecipeError when nothing fits."""
    try:
        loaded = read_weights_file(path)
    except ModelLoadError as exc:
        raise RecipeError(f"init: {exc}") from None
    readings = state_dict_readings(loaded)
    if not readings:
        raise RecipeError(f"init: {path.name} holds no state dict (a mapping of parameter names to tensors)")
    best = max(((reading, *plan_transfer(model, state, whole=whole)) for reading, state in readings),
               key=lambda item: len(item[2].loaded))
    reading, state, report = best
    if not report.loaded:
        sample = ", ".join(list(readings[0][1])[:4])
        raise RecipeError(f"init: no tensor of {path.name} fits {type(model).__name__} (its keys look like "
                          f"{sample}, ...): is it a checkpoint of another architecture?")
    return state, report, reading


# --- the start of a run ----------------------------------------------------------------------------------

@dataclass
class Start:
    """The weights a run starts from and how to name them (``source``: ``"random"``, a version such as
    ``"view-3"``, or ``{"file": name, "sha256": hex}``)."""

    source: Any = "random"
    state: dict[str, torch.Tensor] | None = None
    version: ModelVersion | None = None
    whole: bool = False
    warnings: list[str] = field(default_factory=list)
    transfer: dict[str, int] | None = None

    @property
    def random(self) -> bool:
        return self.state is None


def backbone_arch(arch: str) -> str:
    """The classifier architecture inside ``arch`` (a FlexibleUNet's encoder: ``flexible_unet_resnet50``
    has a ``resnet50``); what "the same architecture" means for an in-domain start."""
    return arch.removeprefix("flexible_unet_") if is_segmentation_arch(arch) else arch


def refuse_frozen_random(strategy: str, init: str) -> None:
    if strategy in FREEZING_STRATEGIES:
        raise RecipeError(frozen_random_message(strategy, init))


def describe(source: Any) -> str:
    """``source`` as one line (the report's "initialisation")."""
    if isinstance(source, dict):
        return f"{source['file']} (sha256 {source['sha256'][:16]}…)"
    return str(source)
