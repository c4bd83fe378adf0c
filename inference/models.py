"""Network architectures by name, timm style: ``create_model(arch, task)``.

A task's head comes from its kind in the task catalogue (config/tasks.yaml), with one input channel:
a binary task has one logit (sigmoid), a multiclass task one logit per class (softmax; ``view``'s
classes are its taxonomy's, config/views.yaml), a regression task one output, a segmentation task is
a 2D U-Net with one output channel (sigmoid). Weights are never downloaded (``pretrained=False``):
they come from the model registry.
"""

from __future__ import annotations

from collections.abc import Callable

import timm
import torch
from torch import nn

from config.tasks import TaskCatalogue, TaskDefinition, load_catalogue
from config.views import ViewTaxonomy, frontal_chest_classes, load_view_taxonomy, view_taxonomies

__all__ = [
    "UnknownArchitecture",
    "ViewTaxonomy",
    "check_task",
    "create_model",
    "default_classes",
    "frontal_chest_classes",
    "is_segmentation_arch",
    "output_count",
    "prepare_for_inference",
    "resolve_device",
    "segmentation_archs",
    "task_definition",
    "view_taxonomies",
    "view_taxonomy",
]

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


Task = str | TaskDefinition
"""A task by name (looked up in the catalogue given, else the shipped one) or its definition."""


def task_definition(task: Task, catalogue: TaskCatalogue | None = None) -> TaskDefinition:
    """``task``'s catalogue entry; ValueError naming the known tasks when there is none."""
    if isinstance(task, TaskDefinition):
        return task
    catalogue = catalogue or load_catalogue()
    if task not in catalogue:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(catalogue.names())}")
    return catalogue.get(task)


def check_task(task: Task, catalogue: TaskCatalogue | None = None) -> None:
    task_definition(task, catalogue)


def default_classes(task: Task, catalogue: TaskCatalogue | None = None) -> list[str] | None:
    """A multiclass task's classes (its taxonomy's for ``classes: taxonomy``); None for other kinds."""
    definition = task_definition(task, catalogue)
    if definition.classes == "taxonomy":
        return list(view_taxonomy().classes)
    return list(definition.classes) if definition.classes else None


def output_count(task: Task, classes: list[str] | None = None, catalogue: TaskCatalogue | None = None) -> int:
    """Number of logits (classification), outputs (regression) or output channels (segmentation)."""
    definition = task_definition(task, catalogue)
    if definition.kind == "multiclass":
        if not classes:
            raise ValueError(f"the {definition.name} task needs its list of classes")
        return len(classes)
    return 1


def create_model(arch: str, task: Task, *, num_classes: int = 1, in_chans: int = 1,
                 catalogue: TaskCatalogue | None = None) -> nn.Module:
    """A freshly initialised network (random weights, never downloaded), in eval mode.

    ``arch`` is ``flexible_unet_resnet50``/``flexible_unet_resnet18`` for a segmentation task and any
    timm classifier name (``resnet50``, ``regnety_064``, ``resnetrs50``, ``efficientnetv2_s``,
    ``inception_v3`` ...) for the other kinds.
    """
    definition = task_definition(task, catalogue)
    if definition.kind == "segmentation":
        if arch not in _SEGMENTATION_ARCHS:
            raise UnknownArchitecture(
                f"{arch!r} is not a segmentation architecture; {definition.name} takes one of "
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


def view_taxonomy(name: str | None = None) -> ViewTaxonomy:
    """The named view taxonomy (default: config/views.yaml's ``default``, 7 classes)."""
    return load_view_taxonomy(name)
