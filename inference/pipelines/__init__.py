"""Pipelines by name (timm style): ``get_pipeline("cxr").run(sources, context)``.

A pipeline turns one complete series into result datasets (SR, SEG) with the active, validated
model versions of its tasks (the task catalogue's tasks of that pipeline). When a task it cannot do
without has no such version, ``run`` raises :class:`~inference.errors.NoActiveModel` before any model
runs: the job is skipped, never answered with untrained weights.

This module is light (no torch at import), so routing and the CLI can list pipeline names; the
pipelines themselves are imported when first asked for.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from inference.errors import NoActiveModel, PipelineInputError

if TYPE_CHECKING:
    import torch
    from pydicom import Dataset

    from config.settings import Settings
    from config.tasks import TaskCatalogue
    from inference.registry import LoadedModel, ModelCache, ModelRegistry, ModelVersion

__all__ = [
    "PIPELINES",
    "NoActiveModel",
    "Pipeline",
    "PipelineContext",
    "PipelineInputError",
    "PipelineOutput",
    "get_pipeline",
]

PIPELINES: dict[str, str] = {
    "cxr": "inference.pipelines.cxr:CxrPipeline",
    "lung-mri": "inference.pipelines.lung_mri:LungMriPipeline",
}
"""Pipeline name → ``module:class`` (imported on first use)."""


@dataclass
class PipelineOutput:
    """What a run produced. ``model_version`` names every model version behind the result."""

    model_version: str
    datasets: list[Dataset]
    summary: dict[str, Any]
    artefacts: dict[str, bytes] = field(default_factory=dict)


@dataclass
class PipelineContext:
    """What a worker process hands every run: the registry (and its task catalogue), the device, the
    settings and its own :class:`~inference.registry.ModelCache`. ``device`` may be given as the
    ``inference.device`` setting (``"auto"``, ``"cpu"``, ``"cuda:0"``); it is resolved on construction.
    ``shadow`` (task → version, see :meth:`for_shadow`) makes a shadow run: that version replaces
    the task's active one, and the results say they are not for clinical use."""

    registry: ModelRegistry
    device: torch.device | str
    settings: Settings
    models: ModelCache
    shadow: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import torch

        from inference.models import resolve_device

        if not isinstance(self.device, torch.device):
            self.device = resolve_device(str(self.device))

    @classmethod
    def from_settings(cls, settings: Settings, *, num_threads: int | None = None) -> "PipelineContext":
        """A context for one worker process. ``num_threads`` (else ``inference.num_threads`` when the
        settings have it) sets torch's intra-op threads on the CPU; otherwise torch's default."""
        import torch

        from inference.registry import ModelCache, ModelRegistry

        num_threads = num_threads or getattr(settings.inference, "num_threads", None)
        if num_threads:
            torch.set_num_threads(int(num_threads))
        registry = ModelRegistry(settings.models_dir, settings.catalogue())
        return cls(registry, settings.inference.device, settings, ModelCache())

    @property
    def catalogue(self) -> TaskCatalogue:
        """The task catalogue the registry holds versions for (``from_settings``: the settings')."""
        return self.registry.catalogue

    def for_shadow(self, version: str) -> "PipelineContext":
        """The same context for a shadow run of ``version`` (``<task>-<n>``, as the registry names them)."""
        task = version.rsplit("-", 1)[0]
        if task not in self.catalogue:
            raise LookupError(f"{version!r} names no task of the catalogue")
        return dataclasses.replace(self, shadow={task: version})

    def model(self, task: str) -> LoadedModel:
        """The task's active, validated model (its shadow version in a shadow run), loaded once per
        process (NoActiveModel otherwise)."""
        if task in self.shadow:
            return self.models.shadow(task, self.shadow[task], self.registry, self.device)
        return self.models.get(task, self.registry, self.device)

    def active(self, task: str) -> ModelVersion | None:
        """The task's active, validated version (its shadow version in a shadow run) without loading
        it (None if there is none)."""
        if task in self.shadow:
            return self.registry.get(task, self.shadow[task])
        return self.models.active(task, self.registry)


class Pipeline(Protocol):
    """Runs the tasks the catalogue gives to ``name`` (``context.catalogue.of_pipeline(name)``)."""

    name: str

    def run(self, sources: list[Dataset], context: PipelineContext) -> PipelineOutput: ...


def get_pipeline(name: str) -> Pipeline:
    """A new pipeline object by name (``cxr``, ``lung-mri``)."""
    if name not in PIPELINES:
        raise KeyError(f"unknown pipeline {name!r}; known: {', '.join(PIPELINES)}")
    module_name, class_name = PIPELINES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)()
