"""The models one worker process has loaded: reloaded when the registry's active version changes."""

from __future__ import annotations

import logging

import torch

from inference.errors import NoActiveModel
from inference.registry.store import ModelRegistry
from inference.registry.versions import LoadedModel, ModelVersion

__all__ = ["ModelCache"]

log = logging.getLogger(__name__)


class ModelCache:
    """The models one worker process has loaded, one per task.

    Each :meth:`get` reads the task's registry index (a small JSON file) and reloads when the active
    version, its sha256 or the device changed, so a worker picks up a promotion or rollback without
    restart. The worker owns the cache (through its :class:`~inference.pipelines.PipelineContext`);
    there is no module-level cache.
    """

    def __init__(self) -> None:
        self._loaded: dict[str, tuple[torch.device, LoadedModel]] = {}
        self._shadows: dict[str, tuple[torch.device, LoadedModel]] = {}

    @staticmethod
    def active(task: str, registry: ModelRegistry) -> ModelVersion | None:
        """The task's active version if it is validated (what :meth:`get` would run), else None."""
        version = registry.active(task)
        return version if version is not None and version.validated else None

    def get(self, task: str, registry: ModelRegistry, device: torch.device) -> LoadedModel:
        """The task's active, validated model on ``device``; NoActiveModel when there is none."""
        version = self.active(task, registry)
        if version is None:
            self._loaded.pop(task, None)
            raise NoActiveModel(task)
        device = torch.device(device)
        cached = self._loaded.get(task)
        if cached is not None and cached[0] == device and _same(cached[1].version, version):
            return cached[1]
        self._loaded.pop(task, None)  # free the old weights before loading the new ones
        loaded = LoadedModel(version, registry.load(version, device))
        self._loaded[task] = (device, loaded)
        log.info("loaded model %s on %s", version.version, device)
        return loaded

    def shadow(self, task: str, version: str, registry: ModelRegistry, device: torch.device) -> LoadedModel:
        """``version`` of ``task`` (a version in shadow) on ``device``, loaded once while it stays the
        same; its weights are checked like the active one's (WeightsIntegrityError when damaged)."""
        wanted = registry.get(task, version)
        device = torch.device(device)
        cached = self._shadows.get(version)
        if cached is not None and cached[0] == device and _same(cached[1].version, wanted):
            return cached[1]
        self._shadows.pop(version, None)
        loaded = LoadedModel(wanted, registry.load(wanted, device))
        self._shadows[version] = (device, loaded)
        log.info("loaded shadow model %s on %s", version, device)
        return loaded

    def keep_shadows(self, versions: list[str]) -> None:
        """Free the shadow versions not in ``versions`` (stopped or promoted)."""
        for version in [v for v in self._shadows if v not in versions]:
            del self._shadows[version]

    def loaded(self) -> dict[str, str]:
        """Task → version currently held in memory."""
        return {task: item.version.version for task, (_, item) in self._loaded.items()}

    def clear(self) -> None:
        self._loaded.clear()
        self._shadows.clear()


def _same(a: ModelVersion, b: ModelVersion) -> bool:
    return (a.version, a.sha256, str(a.weights)) == (b.version, b.sha256, str(b.weights))
