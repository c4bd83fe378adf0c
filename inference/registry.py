"""The model registry: versions of each task's weights under ``models_dir``, and which one is active.

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
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from inference.models import (TASKS, create_model, is_segmentation_arch, output_count,
                              prepare_for_inference, view_taxonomy)
from inference.pipelines import (NoActiveModel, PipelineContext, PipelineInputError, PipelineOutput,
                                 get_pipeline)
from inference.preprocess import NORMALISATIONS
from storage.audit import audit

__all__ = [
    "InputSpec",
    "LoadedModel",
    "ModelCache",
    "ModelLoadError",
    "ModelRegistry",
    "ModelVersion",
    "NoActiveModel",
    "NotValidated",
    "PipelineContext",
    "PipelineInputError",
    "PipelineOutput",
    "RegistryError",
    "UnknownVersion",
    "WeightsIntegrityError",
    "get_pipeline",
    "read_weights_file",
]

log = logging.getLogger(__name__)

INDEX_NAME = "registry.json"
LOCK_NAME = ".lock"
WEIGHTS_SUFFIX = ".safetensors"
INDEX_FORMAT = 1
State = Literal["candidate", "active", "retired"]


class RegistryError(Exception):
    """A registry operation was refused; the message says why."""


class ModelLoadError(RegistryError):
    """Weights do not load into the architecture (missing/unexpected keys, shape mismatches)."""


class WeightsIntegrityError(RegistryError):
    """A weights file is missing or its sha256 differs from the one recorded at registration."""


class UnknownVersion(RegistryError):
    """No such version of the task."""


class NotValidated(RegistryError):
    """Activation of a version that no evaluation or admin has validated."""


@dataclass(frozen=True)
class InputSpec:
    """What the model expects: a square ``image_size`` input, normalisation, CLAHE, aspect kept."""

    image_size: int
    channels: int = 1
    normalisation: str = "minmax_0.5pct"
    clahe: bool = False
    keep_aspect: bool = True

    def __post_init__(self) -> None:
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32, got {self.image_size}")
        if self.channels != 1:
            raise ValueError("cradle's models take one input channel")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"unknown normalisation {self.normalisation!r}; known: {', '.join(NORMALISATIONS)}")


@dataclass(frozen=True)
class ModelVersion:
    task: str
    version: str
    arch: str
    weights: Path
    sha256: str
    input_spec: InputSpec
    threshold: float | None = None
    temperature: float = 1.0
    classes: list[str] | None = None
    provenance: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    created_at: str = ""
    state: State = "candidate"
    validated: bool = False

    @property
    def num_outputs(self) -> int:
        return output_count(self.task, self.classes)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["weights"] = self.weights.name  # relative: models_dir may be mounted elsewhere
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any], task_dir: Path) -> "ModelVersion":
        values = dict(data)
        values["weights"] = task_dir / values["weights"]
        values["input_spec"] = InputSpec(**values["input_spec"])
        return cls(**values)


@dataclass(frozen=True)
class LoadedModel:
    version: ModelVersion
    module: nn.Module


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _actor() -> str:
    try:
        user = os.environ.get("SUDO_USER") or getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


# --------------------------------------------------------------------------- weights files


def read_weights_file(path: Path) -> Any:
    """The object in a ``.safetensors`` or a torch ``.pt``/``.pth`` file (plain tensors only: no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"weights file not found: {path}")
    if path.suffix == WEIGHTS_SUFFIX:
        try:
            return load_safetensors_file(path, device="cpu")
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types
            raise ModelLoadError(f"{path.name} is not a readable safetensors file: {exc}") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        raise ModelLoadError(
            f"{path.name} is not a plain state dict that loads without running pickled code "
            f"(torch.load weights_only): {str(exc).splitlines()[0][:300]}") from exc


WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network")
STRIPPABLE_PREFIXES = ("module.", "model.", "net.", "_orig_mod.")


def _is_tensor_mapping(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _candidates(loaded: Any) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """Readings of a loaded file as a state dict: as saved, inside a common wrapper key,
    without a prefix that *every* key carries (DataParallel ``module.``, Lightning ``model.``)."""
    found: list[tuple[str, dict[str, torch.Tensor]]] = []
    if _is_tensor_mapping(loaded):
        found.append(("as saved", dict(loaded)))
    elif isinstance(loaded, Mapping):
        found += [(f"under key {key!r}", dict(loaded[key])) for key in WRAPPER_KEYS
                  if key in loaded and _is_tensor_mapping(loaded[key])]
    for description, state in list(found):
        for _ in range(2):  # e.g. module._orig_mod.
            prefix = next((p for p in STRIPPABLE_PREFIXES if all(k.startswith(p) for k in state)), None)
            if prefix is None:
                break
            state = {k[len(prefix):]: v for k, v in state.items()}
            description = f"{description}, without the {prefix!r} prefix"
            found.append((description, state))
    return found


@dataclass(frozen=True)
class _Fit:
    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    @property
    def problems(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.mismatched)


def _fit(model_state: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> _Fit:
    missing = [k for k in model_state if k not in state]
    unexpected = [k for k in state if k not in model_state]
    mismatched = [(k, tuple(state[k].shape), tuple(model_state[k].shape))
                  for k in model_state if k in state and state[k].shape != model_state[k].shape]
    return _Fit(missing, unexpected, mismatched)


def _listed(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... (+{len(names) - limit})" if len(names) > limit else "")


def _hints(fit: _Fit, model_keys: int) -> list[str]:
    hints = []
    if len(fit.missing) + len(fit.mismatched) > model_keys / 2:
        hints.append("most of the network does not match: were these weights saved from another --arch?")
    if any(len(a) == 4 and len(b) == 4 and a[1] == 3 and b[1] == 1 and a[0] == b[0] for _, a, b in fit.mismatched):
        hints.append("the first convolution takes 3 (RGB) input channels and cradle's models take 1: sum its "
                     "weights over the colour axis (timm.models.adapt_input_conv) and save the state dict again")
    return hints


def _describe_misfit(fit: _Fit, reading: str, target: str, model_keys: int) -> str:
    parts = []
    if fit.missing:
        parts.append(f"{len(fit.missing)} missing key(s): {_listed(fit.missing)}")
    if fit.unexpected:
        parts.append(f"{len(fit.unexpected)} unexpected key(s): {_listed(fit.unexpected)}")
    if fit.mismatched:
        shapes = [f"{k} weights {tuple(a)} vs model {tuple(b)}" for k, a, b in fit.mismatched]
        parts.append(f"{len(fit.mismatched)} shape mismatch(es): {_listed(shapes, 3)}")
    hints = "".join(f" (hint: {hint})" for hint in _hints(fit, model_keys))
    return f"the weights ({reading}) do not load into {target}: " + "; ".join(parts) + hints


def _select_state_dict(loaded: Any, model: nn.Module, target: str) -> tuple[str, dict[str, torch.Tensor]]:
    """The one reading of ``loaded`` that loads strictly into ``model``; ModelLoadError otherwise."""
    readings = _candidates(loaded)
    if not readings:
        keys = ", ".join(map(str, list(loaded)[:8])) if isinstance(loaded, Mapping) else type(loaded).__name__
        raise ModelLoadError(f"no state dict found in the weights (top level: {keys}); expected a mapping "
                             f"of parameter names to tensors, possibly under one of {', '.join(WRAPPER_KEYS)}")
    model_state = model.state_dict()
    fits = [(reading, state, _fit(model_state, state)) for reading, state in readings]
    good = [(reading, state) for reading, state, fit in fits if fit.ok]
    distinct = {tuple((k, v.data_ptr()) for k, v in sorted(state.items())) for _, state in good}
    if len(distinct) > 1:
        raise ModelLoadError(f"the weights are ambiguous: {' and '.join(r for r, _ in good)} all load into "
                             f"{target}; save the one you mean as a plain state dict")
    if good:
        return good[0]
    reading, _, fit = min(fits, key=lambda item: item[2].problems)
    raise ModelLoadError(_describe_misfit(fit, reading, target, len(model_state)))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- the registry


class ModelRegistry:
    """Versions of each task's model under ``models_dir`` (see the module docstring)."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = Path(models_dir)
        self._thread_lock = threading.Lock()  # lockf excludes other processes, not this one's threads

    # ---- reading

    def tasks(self) -> list[str]:
        return [t for t in TASKS if (self._task_dir(t) / INDEX_NAME).is_file()]

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

    # ---- writing

    def register(self, task: str, arch: str, state_dict: Mapping[str, torch.Tensor] | Path, *,
                 input_spec: InputSpec, threshold: float | None = None, temperature: float = 1.0,
                 classes: list[str] | None = None, provenance: dict | None = None,
                 metrics: dict | None = None, validated: bool = False) -> ModelVersion:
        """Add a candidate version after checking that the weights load strictly into ``arch``."""
        classes = self._classes(task, classes)
        self._check_settings(task, arch, input_spec, threshold, temperature)
        model = self._build(task, arch, classes, input_spec)
        target = f"{arch} for {task} ({output_count(task, classes)} output(s), {input_spec.channels} input channel)"
        loaded = read_weights_file(Path(state_dict)) if isinstance(state_dict, (str, Path)) else state_dict
        reading, state = _select_state_dict(loaded, model, target)
        model.load_state_dict(state, strict=True)
        provenance = dict(provenance or {})
        if isinstance(state_dict, (str, Path)):
            provenance.setdefault("source_file", Path(state_dict).name)
        if reading != "as saved":
            provenance["unwrapped"] = reading
        data = save_safetensors_bytes({k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()})
        with self._locked(task) as index:
            version = f"{task}-{self._next_number(index)}"
            weights = self._task_dir(task) / f"{version}{WEIGHTS_SUFFIX}"
            _atomic_write(weights, data)
            entry = ModelVersion(task=task, version=version, arch=arch, weights=weights, sha256=_sha256(data),
                                 input_spec=input_spec, threshold=threshold, temperature=float(temperature),
                                 classes=classes, provenance=provenance, metrics=dict(metrics or {}),
                                 created_at=_now(), state="candidate", validated=bool(validated))
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

    # ---- loading

    def load(self, version: ModelVersion, device: torch.device | str = "cpu") -> nn.Module:
        """The network with ``version``'s weights on ``device``, in eval mode (channels-last).

        The weights file is hashed before use; a file that differs from the registered sha256
        is refused (WeightsIntegrityError).
        """
        data = self._verified_bytes(version)
        model = self._build(version.task, version.arch, version.classes, version.input_spec)
        model.load_state_dict(load_safetensors_bytes(data), strict=True)
        return prepare_for_inference(model, torch.device(device))

    def verify(self, version: ModelVersion) -> None:
        self._verified_bytes(version)

    # ---- internals

    @staticmethod
    def _classes(task: str, classes: list[str] | None) -> list[str] | None:
        if task == "view":
            return list(classes) if classes else list(view_taxonomy().classes)
        if classes is not None and len(classes) != 1:
            raise RegistryError(f"{task} has one output; classes must name it or be omitted")
        return list(classes) if classes else None

    @staticmethod
    def _check_settings(task: str, arch: str, spec: InputSpec, threshold: float | None, temperature: float) -> None:
        if task not in TASKS:
            raise RegistryError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise RegistryError(f"threshold must lie in [0, 1], got {threshold}")
        if not temperature > 0:
            raise RegistryError(f"temperature must be positive, got {temperature}")
        if is_segmentation_arch(arch) and spec.image_size % 32:
            raise RegistryError(f"{arch} needs an image_size divisible by 32, got {spec.image_size}")

    @staticmethod
    def _build(task: str, arch: str, classes: list[str] | None, spec: InputSpec) -> nn.Module:
        try:
            return create_model(arch, task, num_classes=output_count(task, classes), in_chans=spec.channels)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from exc

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
        if task not in TASKS:
            raise RegistryError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
        return self.models_dir / task

    @staticmethod
    def _empty(task: str) -> dict[str, Any]:
        return {"format": INDEX_FORMAT, "task": task, "active": None, "activation_stack": [],
                "versions": [], "history": []}

    def _read(self, task: str) -> dict[str, Any]:
        path = self._task_dir(task) / INDEX_NAME
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return self._empty(task)
        except json.JSONDecodeError as exc:
            raise RegistryError(f"{path} is not valid JSON: {exc}") from exc

    def _write(self, task: str, index: dict[str, Any]) -> None:
        _atomic_write(self._task_dir(task) / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())

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
        index["history"].append({"at": _now(), "by": actor, "action": action, "from": previous, "to": new,
                                 "reason": reason})
        self._write(task, index)
        log.info("active model for %s: %s -> %s (%s)", task, previous or "none", new or "none", action)
        audit(f"model.{action}", task=task, version=new, previous=previous, by=actor, reason=reason[:200])


# --------------------------------------------------------------------------- per-process model cache


class ModelCache:
    """The models one worker process has loaded, one per task.

    Each :meth:`get` reads the task's registry index (a small JSON file) and reloads when the active
    version, its sha256 or the device changed, so a worker picks up a promotion or rollback without
    restart. The worker owns the cache (through its :class:`PipelineContext`); there is no
    module-level cache.
    """

    def __init__(self) -> None:
        self._loaded: dict[str, tuple[torch.device, LoadedModel]] = {}

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

    def loaded(self) -> dict[str, str]:
        """Task → version currently held in memory."""
        return {task: item.version.version for task, (_, item) in self._loaded.items()}

    def clear(self) -> None:
        self._loaded.clear()


def _same(a: ModelVersion, b: ModelVersion) -> bool:
    return (a.version, a.sha256, str(a.weights)) == (b.version, b.sha256, str(b.weights))
