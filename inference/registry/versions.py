"""What the registry records about a model version: its input spec, its entry in the task's index,
and the errors a registry operation raises."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from inference.preprocess import NORMALISATIONS

__all__ = [
    "InputSpec",
    "LoadedModel",
    "ModelLoadError",
    "ModelVersion",
    "NotValidated",
    "RegistryError",
    "State",
    "UnknownVersion",
    "WeightsIntegrityError",
]

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
    """What the model expects: a square ``image_size`` input, normalisation, CLAHE, aspect kept; for a 3D
    network, the sliding window's ``patch`` (slices, rows, columns) over the stack of such slices."""

    image_size: int
    channels: int = 1
    normalisation: str = "minmax_0.5pct"
    clahe: bool = False
    keep_aspect: bool = True
    patch: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.patch is not None:
            object.__setattr__(self, "patch", tuple(int(v) for v in self.patch))  # from JSON: a list
            if len(self.patch) != 3 or min(self.patch) < 1:
                raise ValueError(f"patch must be (slices, rows, columns), got {self.patch}")
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
    population: dict = field(default_factory=dict)
    """What the version was trained and validated on (``config.tasks.Population``'s keys: modalities,
    body parts, views, age window in days); empty for an import that did not say. It never runs outside."""

    @property
    def num_outputs(self) -> int:
        """Logits (one per class for a multiclass task) or output channels: one unless classes say more."""
        return len(self.classes) if self.classes else 1

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
