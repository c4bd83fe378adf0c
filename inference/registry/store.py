"""The model registry's store: versions of each task's weights under ``models_dir``, and which one is
active. The tasks are the task catalogue's.

Layout (``models_dir`` may be shared by workers on several machines)::

    <models_dir>/<task>/registry.json        versions, active version, activation stack, history
    <models_dir>/<task>/<task>-<n>.safetensors  immutable weights of version <task>-<n>
    <models_dir>/<task>/.lock                 POSIX lock held by every writer of the task

Writers take the task's lock (``fcntl.lockf``, which NFS honours), write the new index to a
temporary file, fsync and rename it over ``registry.json``; readers never lock and always see a
whole index. Weights are stored as safetensors (no pickle is ever loaded by a worker) and checked
against their sha256 before every load.

A task's active version is what the pipelines run. A version becomes active only when it is
validated: ``cradle train`` sets that from its evaluation, and an admin's explicit ``cradle models
import --activate`` or ``cradle models promote`` counts as validation (recorded in the version's
provenance). Every change of the active version is recorded in the history (who, when, why) and
logged (version strings only).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import getpass
import hashlib
import json
import logging
import os
import re
import socket
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.files import atomic_write
from config.tasks import TaskCatalogue, TaskDefinition, load_catalogue
from inference.models import (VOLUME_DIVISOR, default_classes, is_segmentation_arch, is_volumetric_arch,
                              prepare_for_inference)
from inference.registry.versions import (InputSpec, ModelVersion, NotValidated, RegistryError, UnknownVersion,
                                         WeightsIntegrityError)
from inference.registry.weights import WEIGHTS_SUFFIX, build_network, fit_weights, load_stored_weights
from storage.audit import audit

__all__ = ["INDEX_NAME", "LOCK_NAME", "ModelRegistry"]

log = logging.getLogger(__name__)

INDEX_NAME = "registry.json"
LOCK_NAME = ".lock"
INDEX_FORMAT = 1


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _actor() -> str:
    try:
        user = os.environ.get("SUDO_USER") or getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ModelRegistry:
    """Versions of each task's model under ``models_dir`` (see the module docstring). The tasks are
    the catalogue's (``Settings.catalogue()``: the shipped tasks and the site's; the shipped ones
    when not given)."""

    def __init__(self, models_dir: Path, catalogue: TaskCatalogue | None = None) -> None:
        self.models_dir = Path(models_dir)
        self.catalogue = catalogue or load_catalogue()
        self._thread_lock = threading.Lock()  # lockf excludes other processes, not this one's threads

    # ---- reading

    def tasks(self) -> list[str]:
        return [t for t in self.catalogue.names() if (self._task_dir(t) / INDEX_NAME).is_file()]

    def versions(self, task: str) -> list[ModelVersion]:
        index = self._read(task)
        return [ModelVersion.from_json(v, self._task_dir(task)) for v in index["versions"]]

    def get(self, task: str, version: str) -> ModelVersion:
        for candidate in self.versions(task):
            if candidate.version == version:
                return candidate
        raise UnknownVersion(f"{task} has no version {version!r}")

    def active(self, task: str) -> ModelVersion | None:
        index = self._read(task)
        if index["active"] is None:
            return None
        return self.get(task, index["active"])

    def history(self, task: str) -> list[dict[str, Any]]:
        return list(self._read(task)["history"])

    def shadows(self, task: str) -> list[dict[str, Any]]:
        """The versions in shadow (``{"version", "since", "by"}``), oldest first."""
        return list(self._read(task).get("shadows", []))

    # ---- writing

    def register(self, task: str, arch: str, state_dict: Mapping[str, torch.Tensor] | Path, *,
                 input_spec: InputSpec, threshold: float | None = None, temperature: float = 1.0,
                 classes: list[str] | None = None, provenance: dict | None = None,
                 metrics: dict | None = None, validated: bool = False,
                 population: dict | None = None) -> ModelVersion:
        """Add a candidate version after checking that the weights load strictly into ``arch``."""
        definition = self._definition(task)
        classes = self._classes(definition, classes)
        self._check_settings(arch, input_spec, threshold, temperature)
        model = build_network(definition, arch, classes, input_spec)
        outputs = len(classes) if classes else 1
        target = f"{arch} for {task} ({outputs} output(s), {input_spec.channels} input channel)"
        reading, data = fit_weights(model, state_dict, target)
        provenance = dict(provenance or {})
        if isinstance(state_dict, (str, Path)):
            provenance.setdefault("source_file", Path(state_dict).name)
        if reading != "as saved":
            provenance["unwrapped"] = reading
        with self._locked(task) as index:
            version = f"{task}-{self._next_number(index)}"
            weights = self._task_dir(task) / f"{version}{WEIGHTS_SUFFIX}"
            atomic_write(weights, data, durable=True)
            entry = ModelVersion(task=task, version=version, arch=arch, weights=weights, sha256=_sha256(data),
                                 input_spec=input_spec, threshold=threshold, temperature=float(temperature),
                                 classes=classes, provenance=provenance, metrics=dict(metrics or {}),
                                 created_at=_now(), state="candidate", validated=bool(validated),
                                 population=dict(population or {}))
            index["versions"].append(entry.to_json())
            self._write(task, index)
        log.info("registered model %s (%s)", version, arch)
        return entry

    def activate(self, task: str, version: str, *, reason: str = "", actor: str | None = None,
                 accept_unvalidated: bool = False) -> ModelVersion:
        """Make ``version`` the active one. An unvalidated version is refused unless the caller is an
        admin's explicit act (``accept_unvalidated``), which is then recorded as its validation."""
        actor = actor or _actor()
        with self._locked(task) as index:
            entry = self._entry(index, task, version)
            self.verify(ModelVersion.from_json(entry, self._task_dir(task)))
            if not entry["validated"]:
                if not accept_unvalidated:
                    raise NotValidated(f"{version} is not validated; evaluate it with cradle train, or activate "
                                       f"it explicitly as an admin (cradle models promote {task} {version})")
                entry["validated"] = True
                entry["provenance"]["validation"] = {"method": "explicit admin activation", "by": actor,
                                                     "at": _now(), "reason": reason}
            previous = index["active"]
            if previous == version:
                self._write(task, index)
            else:
                index["activation_stack"].append(version)
                self._switch(task, index, previous, version, "activate", actor, reason)
        return self.get(task, version)

    def rollback(self, task: str, *, reason: str = "", actor: str | None = None) -> ModelVersion:
        """Re-activate the version that was active before the current one."""
        actor = actor or _actor()
        with self._locked(task) as index:
            stack = index["activation_stack"]
            current = index["active"]
            while stack and stack[-1] != current:  # stack out of step (e.g. after deactivate): realign
                stack.pop()
            if len(stack) < 2:
                raise RegistryError(f"{task} has no earlier active version to roll back to")
            stack.pop()
            previous = stack[-1]
            self.verify(ModelVersion.from_json(self._entry(index, task, previous), self._task_dir(task)))
            self._switch(task, index, current, previous, "rollback", actor, reason)
        return self.get(task, previous)

    def deactivate(self, task: str, *, reason: str = "", actor: str | None = None) -> None:
        """Leave ``task`` without an active model (its jobs are skipped) until one is activated."""
        actor = actor or _actor()
        with self._locked(task) as index:
            if index["active"] is not None:
                self._switch(task, index, index["active"], None, "deactivate", actor, reason)

    def start_shadow(self, task: str, version: str, *, actor: str | None = None) -> dict[str, Any]:
        """Run ``version`` beside the active one on every series routed to ``task`` (its results go
        to research destinations only). Its weights are checked now; the active version is refused."""
        actor = actor or _actor()
        with self._locked(task) as index:
            entry = self._entry(index, task, version)
            if index["active"] == version:
                raise RegistryError(f"{version} is the active {task} model; a shadow runs beside it")
            shadows = index.setdefault("shadows", [])
            for shadow in shadows:
                if shadow["version"] == version:
                    return dict(shadow)
            self.verify(ModelVersion.from_json(entry, self._task_dir(task)))
            shadow = {"version": version, "since": _now(), "by": actor}
            shadows.append(shadow)
            index["history"].append({"at": shadow["since"], "by": actor, "action": "shadow", "from": index["active"],
                                     "to": version, "reason": "cradle models shadow"})
            self._write(task, index)
        log.info("model %s in shadow beside %s", version, index["active"] or "no active version")
        audit("model.shadow", task=task, version=version, previous=index["active"], by=actor)
        return dict(shadow)

    def stop_shadow(self, task: str, version: str, *, actor: str | None = None) -> dict[str, Any]:
        """End ``version``'s shadow (RegistryError when it is not in shadow); returns what it was."""
        actor = actor or _actor()
        with self._locked(task) as index:
            self._entry(index, task, version)
            shadows = index.get("shadows", [])
            stopped = next((s for s in shadows if s["version"] == version), None)
            if stopped is None:
                raise RegistryError(f"{version} is not in shadow")
            index["shadows"] = [s for s in shadows if s["version"] != version]
            index["history"].append({"at": _now(), "by": actor, "action": "shadow-stop", "from": version,
                                     "to": index["active"], "reason": f"in shadow since {stopped['since']}"})
            self._write(task, index)
        log.info("model %s no longer in shadow", version)
        audit("model.shadow-stop", task=task, version=version, by=actor)
        return dict(stopped)

    # ---- loading

    def load(self, version: ModelVersion, device: torch.device | str = "cpu") -> nn.Module:
        """The network with ``version``'s weights on ``device``, in eval mode (channels-last).

        The weights file is hashed before use; a file that differs from the registered sha256
        is refused (WeightsIntegrityError).
        """
        data = self._verified_bytes(version)
        model = build_network(self._definition(version.task), version.arch, version.classes, version.input_spec)
        return prepare_for_inference(load_stored_weights(model, data), torch.device(device))

    def verify(self, version: ModelVersion) -> None:
        self._verified_bytes(version)

    # ---- internals

    def _definition(self, task: str) -> TaskDefinition:
        if task not in self.catalogue:
            raise RegistryError(f"unknown task {task!r}; known: {', '.join(self.catalogue.names())}")
        return self.catalogue.get(task)

    @staticmethod
    def _classes(task: TaskDefinition, classes: list[str] | None) -> list[str] | None:
        """A multiclass task's classes (its own by default); one output's optional name otherwise."""
        if task.kind == "multiclass":
            return list(classes) if classes else default_classes(task)
        if classes is not None and len(classes) != 1:
            raise RegistryError(f"{task.name} has one output; classes must name it or be omitted")
        return list(classes) if classes else None

    @staticmethod
    def _check_settings(arch: str, spec: InputSpec, threshold: float | None, temperature: float) -> None:
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise RegistryError(f"threshold must lie in [0, 1], got {threshold}")
        if not temperature > 0:
            raise RegistryError(f"temperature must be positive, got {temperature}")
        if is_segmentation_arch(arch) and spec.image_size % 32:
            raise RegistryError(f"{arch} needs an image_size divisible by 32, got {spec.image_size}")
        if is_volumetric_arch(arch) != (spec.patch is not None):
            raise RegistryError(f"{arch}: a 3D network needs a sliding-window patch and a 2D one has none "
                                f"(patch {spec.patch})")
        if spec.patch is not None and any(p % d for p, d in zip(spec.patch, VOLUME_DIVISOR)):
            raise RegistryError(f"{arch} needs a patch divisible by {VOLUME_DIVISOR}, got {spec.patch}")

    def _verified_bytes(self, version: ModelVersion) -> bytes:
        try:
            data = version.weights.read_bytes()
        except OSError as exc:
            raise WeightsIntegrityError(f"weights of {version.version} cannot be read: {exc.strerror}") from exc
        if _sha256(data) != version.sha256:
            raise WeightsIntegrityError(f"weights of {version.version} do not match their registered sha256 "
                                        f"(file changed or damaged): refusing to use them")
        return data

    def _task_dir(self, task: str) -> Path:
        return self.models_dir / self._definition(task).name

    @staticmethod
    def _empty(task: str) -> dict[str, Any]:
        return {"format": INDEX_FORMAT, "task": task, "active": None, "activation_stack": [],
                "versions": [], "history": [], "shadows": []}

    def _read(self, task: str) -> dict[str, Any]:
        path = self._task_dir(task) / INDEX_NAME
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return self._empty(task)
        except json.JSONDecodeError as exc:
            raise RegistryError(f"{path} is not valid JSON: {exc}") from exc

    def _write(self, task: str, index: dict[str, Any]) -> None:
        atomic_write(self._task_dir(task) / INDEX_NAME, json.dumps(index, indent=2) + "\n", durable=True)

    @contextmanager
    def _locked(self, task: str) -> Iterator[dict[str, Any]]:
        """The task's index, read under its exclusive lock (held until the block ends)."""
        directory = self._task_dir(task)
        directory.mkdir(parents=True, exist_ok=True)
        with self._thread_lock, open(directory / LOCK_NAME, "a+b") as lock:
            fcntl.lockf(lock, fcntl.LOCK_EX)
            try:
                yield self._read(task)
            finally:
                fcntl.lockf(lock, fcntl.LOCK_UN)

    @staticmethod
    def _next_number(index: dict[str, Any]) -> int:
        numbers = [int(m.group(1)) for v in index["versions"] if (m := re.search(r"-(\d+)$", v["version"]))]
        return max(numbers, default=0) + 1

    @staticmethod
    def _entry(index: dict[str, Any], task: str, version: str) -> dict[str, Any]:
        for entry in index["versions"]:
            if entry["version"] == version:
                return entry
        raise UnknownVersion(f"{task} has no version {version!r}")

    def _switch(self, task: str, index: dict[str, Any], previous: str | None, new: str | None,
                action: str, actor: str, reason: str) -> None:
        for entry in index["versions"]:
            if entry["version"] == new:
                entry["state"] = "active"
            elif entry["version"] == previous:
                entry["state"] = "retired"
        index["active"] = new
        index["shadows"] = [s for s in index.get("shadows", []) if s["version"] != new]  # promoted: no shadow
        index["history"].append({"at": _now(), "by": actor, "action": action, "from": previous, "to": new,
                                 "reason": reason})
        self._write(task, index)
        log.info("active model for %s: %s -> %s (%s)", task, previous or "none", new or "none", action)
        audit(f"model.{action}", task=task, version=new, previous=previous, by=actor, reason=reason[:200])
