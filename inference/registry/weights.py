"""Weights from elsewhere, made into a network: reading ``.safetensors`` / plain torch files (no
pickled code), finding the one state dict inside a wrapped checkpoint (``state_dict``/``model`` keys,
DataParallel ``module.`` or Lightning ``model.`` prefixes), explaining a misfit, and building the
task's network to load them into."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from config.tasks import TaskDefinition
from inference.models import create_model, output_count
from inference.registry.versions import InputSpec, ModelLoadError

__all__ = [
    "STRIPPABLE_PREFIXES",
    "WEIGHTS_SUFFIX",
    "WRAPPER_KEYS",
    "build_network",
    "fit_weights",
    "load_stored_weights",
    "read_weights_file",
    "select_state_dict",
    "sha256_of_file",
    "state_dict_readings",
]

WEIGHTS_SUFFIX = ".safetensors"



def read_weights_file(path: Path) -> Any:
    """The object in a ``.safetensors`` or a torch ``.pt``/``.pth``/``.bin`` file (plain tensors only: no pickled code)."""
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


def sha256_of_file(path: Path, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file, read in chunks (checkpoints may be hundreds of megabytes)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network")
STRIPPABLE_PREFIXES = ("module.", "model.", "net.", "_orig_mod.")


def _is_tensor_mapping(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def state_dict_readings(loaded: Any) -> list[tuple[str, dict[str, torch.Tensor]]]:
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


def select_state_dict(loaded: Any, model: nn.Module, target: str) -> tuple[str, dict[str, torch.Tensor]]:
    """The one reading of ``loaded`` that loads strictly into ``model``; ModelLoadError otherwise."""
    readings = state_dict_readings(loaded)
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


def build_network(task: TaskDefinition, arch: str, classes: list[str] | None, spec: InputSpec) -> nn.Module:
    """A fresh network of ``arch`` with ``task``'s head (ModelLoadError when ``arch`` cannot be one)."""
    try:
        return create_model(arch, task, num_classes=output_count(task, classes), in_chans=spec.channels)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc


def fit_weights(model: nn.Module, weights: Mapping[str, torch.Tensor] | Path, target: str) -> tuple[str, bytes]:
    """Load ``weights`` (a state dict, or a file of one, possibly wrapped) strictly into ``model``; how
    they were read (``"as saved"`` or the unwrapping) and the model's state as safetensors bytes."""
    loaded = read_weights_file(Path(weights)) if isinstance(weights, (str, Path)) else weights
    reading, state = select_state_dict(loaded, model, target)
    model.load_state_dict(state, strict=True)
    # Copies: safetensors refuses tensors that share memory, as a module registered twice does (MONAI DynUNet).
    data = save_safetensors_bytes({k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()})
    return reading, data


def load_stored_weights(model: nn.Module, data: bytes) -> nn.Module:
    """``model`` with the registry's own safetensors bytes loaded (strictly)."""
    model.load_state_dict(load_safetensors_bytes(data), strict=True)
    return model
