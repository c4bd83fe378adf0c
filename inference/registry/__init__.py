"""The model registry, by concern:

- :mod:`~inference.registry.versions` what is recorded about a version (input spec, index entry) and the errors;
- :mod:`~inference.registry.weights`  weights from elsewhere (safetensors, wrapped torch checkpoints) made
  into the task's network;
- :mod:`~inference.registry.store`    the on-disk store under ``models_dir``: versions, activation, history;
- :mod:`~inference.registry.cache`    the models one worker process has loaded.
"""

from __future__ import annotations

from inference.registry.cache import ModelCache
from inference.registry.store import ModelRegistry
from inference.registry.versions import (InputSpec, LoadedModel, ModelLoadError, ModelVersion, NotValidated,
                                         RegistryError, UnknownVersion, WeightsIntegrityError)
from inference.registry.weights import read_weights_file

__all__ = [
    "InputSpec",
    "LoadedModel",
    "ModelCache",
    "ModelLoadError",
    "ModelRegistry",
    "ModelVersion",
    "NotValidated",
    "RegistryError",
    "UnknownVersion",
    "WeightsIntegrityError",
    "read_weights_file",
]
