"""Network architectures by name, timm style: ``create_model(arch, task)``.

Conventions (from the papers in DESIGN.md): one input channel; ``bpd`` and ``pneumonia`` have one
logit (sigmoid); ``view`` has one logit per class of the view taxonomy (softmax); ``lung-seg`` is a
2D U-Net with one output channel (sigmoid). Weights are never downloaded (``pretrained=False``):
they come from the model registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import yaml
from torch import nn

__all__ = [
    "BINARY_TASKS",
    "CLASSIFICATION_TASKS",
    "SEGMENTATION_TASKS",
    "TASKS",
    "UnknownArchitecture",
    "ViewTaxonomy",
    "create_model",
    "is_segmentation_arch",
    "output_count",
    "prepare_for_inference",
    "resolve_device",
    "segmentation_archs",
    "frontal_chest_classes",
    "view_taxonomy",
]

BINARY_TASKS = ("bpd", "pneumonia")
CLASSIFICATION_TASKS = (*BINARY_TASKS, "view")
SEGMENTATION_TASKS = ("lung-seg",)
TASKS = (*CLASSIFICATION_TASKS, *SEGMENTATION_TASKS)

DECODER_CHANNELS = (256, 128, 64, 32, 16)
"""The lung-segmentation paper's U-Net decoder."""


class UnknownArchitecture(ValueError):
    """The architecture name is not one cradle can build for the task."""


def _flexible_unet(backbone: str) -> Callable[[int, int], nn.Module]:
    def build(in_chans: int, num_classes: int) -> nn.Module:
        from monai.networks.nets import FlexibleUNet  # imported lazily: MONAI is slow to import

        return FlexibleUNet(in_channels=in_chans, out_channels=num_classes, backbone=backbone,
                            pretrained=False, decoder_channels=DECODER_CHANNELS, is_pad=True)

    return build


_SEGMENTATION_ARCHS: dict[str, Callable[[int, int], nn.Module]] = {
    "flexible_unet_resnet50": _flexible_unet("resnet50"),
    "flexible_unet_resnet18": _flexible_unet("resnet18"),  # small: tests and demos
}


def segmentation_archs() -> tuple[str, ...]:
    return tuple(_SEGMENTATION_ARCHS)


def is_segmentation_arch(arch: str) -> bool:
    return arch in _SEGMENTATION_ARCHS


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def output_count(task: str, classes: list[str] | None = None) -> int:
    """Number of logits (classification) or output channels (segmentation) of ``task``."""
    check_task(task)
    if task == "view":
        if not classes:
            raise ValueError("the view task needs its list of classes")
        return len(classes)
    return 1


def create_model(arch: str, task: str, *, num_classes: int = 1, in_chans: int = 1) -> nn.Module:
    """A freshly initialised network (random weights, never downloaded), in eval mode.

    ``arch`` is ``flexible_unet_resnet50``/``flexible_unet_resnet18`` for ``lung-seg`` and any timm
    classifier name (``resnet50``, ``regnety_064``, ``resnetrs50``, ``efficientnetv2_s``,
    ``inception_v3`` ...) for the classification tasks.
    """
    check_task(task)
    if task in SEGMENTATION_TASKS:
        if arch not in _SEGMENTATION_ARCHS:
            raise UnknownArchitecture(
                f"{arch!r} is not a segmentation architecture; {task} takes one of "
                f"{', '.join(_SEGMENTATION_ARCHS)}")
        model = _SEGMENTATION_ARCHS[arch](in_chans, num_classes)
    else:
        if arch in _SEGMENTATION_ARCHS or not timm.is_model(arch):
            raise UnknownArchitecture(
                f"{arch!r} is not a classification architecture known to timm "
                f"(e.g. resnet50, regnety_064, resnetrs50, efficientnetv2_s, inception_v3)")
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    return model.eval()


def prepare_for_inference(model: nn.Module, device: torch.device) -> nn.Module:
    """Eval mode, on ``device``, channels-last memory format, no parameter gradients."""
    model = model.eval().to(device=device, memory_format=torch.channels_last)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def resolve_device(setting: str = "auto") -> torch.device:
    """``inference.device``: ``auto`` is the first CUDA device when there is one, else the CPU."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"inference.device is {setting!r} but no CUDA device is available")
    return device


VIEWS_FILE = Path(__file__).resolve().parent.parent / "config" / "views.yaml"


@dataclass(frozen=True)
class ViewTaxonomy:
    """A radiographic view taxonomy from ``config/views.yaml``: classes and their 7-class parents."""

    name: str
    classes: tuple[str, ...]
    parents: dict[str, str]
    frontal_chest: frozenset[str]


def view_taxonomies(path: Path = VIEWS_FILE) -> dict[str, ViewTaxonomy]:
    document = yaml.safe_load(path.read_text())
    taxonomies = {}
    for name, entry in document["taxonomies"].items():
        parents = dict(entry["classes"])
        taxonomies[name] = ViewTaxonomy(name, tuple(parents), parents, frozenset(entry["frontal_chest"]))
    return taxonomies


def view_taxonomy(name: str | None = None, path: Path = VIEWS_FILE) -> ViewTaxonomy:
    """The named taxonomy (default: the file's ``default``, 7 classes)."""
    if name is None:
        name = yaml.safe_load(path.read_text())["default"]
    taxonomies = view_taxonomies(path)
    if name not in taxonomies:
        raise ValueError(f"unknown view taxonomy {name!r}; known: {', '.join(taxonomies)}")
    return taxonomies[name]


def frontal_chest_classes(classes: list[str] | tuple[str, ...], path: Path = VIEWS_FILE) -> frozenset[str]:
    """The classes of a view model that mean "frontal chest film", whichever taxonomy they come from."""
    frontal = {"chest_frontal"}
    for taxonomy in view_taxonomies(path).values():
        frontal |= taxonomy.frontal_chest
        frontal |= {c for c, parent in taxonomy.parents.items() if parent == "chest_frontal"}
    return frozenset(c for c in classes if c in frontal)
