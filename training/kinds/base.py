"""What every kind of task trains with: the run's context, loaders, and the interface a kind fills in.

A kind (binary, multiclass, segmentation) owns what differs between tasks: which samples the index
holds for a task, the torch dataset over them, the objective (loss, validation metrics, CutMix), the
held-out assessment, the comparison with the active version on the same images, the report's curves
and the gate. It reads what it needs about a task from the task's catalogue entry, never from its name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from sqlalchemy.orm import Session
from torch import nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from config.settings import Settings
from config.tasks import Population, TaskCatalogue, TaskDefinition
from config.views import load_view_taxonomy
from inference.models import output_count
from inference.registry import InputSpec, ModelRegistry, ModelVersion
from storage.archive import Archive
from training import datasets as ds
from training import promote
from training.augment import Augment
from training.engine import FoldResult, Objective, memory_format_of, predict, seed_worker
from training.population import training_population
from training.recipe import GateConfig, Recipe


@dataclass
class Context:
    """What a run works with; built once by ``training.run.open_context``."""

    settings: Settings
    recipe: Recipe
    catalogue: TaskCatalogue
    task: TaskDefinition
    kind: "TrainingKind"
    archive: Archive
    registry: ModelRegistry
    device: torch.device
    cache_root: Path
    num_workers: int
    progress: bool
    say: Callable[[str], None]

    @property
    def population(self) -> Population:
        """The films this run may take: the task's population (as the site's settings narrow it), a
        csv-labelled task's views narrowed to the recipe's ``views``."""
        return training_population(self.task.population, self.recipe.views,
                                   csv_labelled=self.task.labels.source == "csv")

    @property
    def spec(self) -> InputSpec:
        r = self.recipe
        return InputSpec(image_size=r.image_size, normalisation=r.normalisation, clahe=r.clahe,
                         keep_aspect=r.keep_aspect, patch=r.patch_size if r.dims == 3 else None)


def make_loader(ctx: Context, dataset: Dataset, *, train: bool, generator: torch.Generator,
                samples: list[ds.Sample] | None = None) -> DataLoader:
    sampler = None
    if train and ctx.recipe.class_balanced and samples is not None:
        sampler = WeightedRandomSampler(ds.class_weights(samples), len(samples), generator=generator)
    batch = ctx.recipe.batch_size if train or ctx.recipe.dims == 2 else 1  # whole series differ in size
    return DataLoader(dataset, batch_size=batch, shuffle=train and sampler is None, sampler=sampler,
                      drop_last=train and len(dataset) > batch, num_workers=ctx.num_workers,
                      generator=generator, worker_init_fn=seed_worker, persistent_workers=ctx.num_workers > 0,
                      pin_memory=ctx.device.type == "cuda")


def eval_loader(ctx: Context, samples: list[ds.Sample], collection: ds.Collection,
                spec: InputSpec | None = None) -> DataLoader:
    """Samples in order, without augmentation, preprocessed for ``spec`` (default: the recipe's)."""
    dataset = ctx.kind.dataset(ctx, collection, samples, train=False, spec=spec)
    return make_loader(ctx, dataset, train=False, generator=torch.Generator().manual_seed(0))


class TrainingKind:
    """The interface; one subclass per kind in ``training.kinds``, registered by the catalogue's kind."""

    name: ClassVar[str]

    def __init__(self, task: TaskDefinition) -> None:
        self.task = task

    # -- data

    def collect(self, ctx: Context, session: Session) -> ds.Collection:
        raise NotImplementedError

    def dataset(self, ctx: Context, collection: ds.Collection, samples: list[ds.Sample], *, train: bool,
                spec: InputSpec | None = None) -> Dataset:
        raise NotImplementedError

    def classes(self, recipe: Recipe) -> list[str] | None:
        """The model's classes, known before collecting (None: not a multiclass task)."""
        return None

    def num_outputs(self, classes: list[str] | None) -> int:
        return output_count(self.task, classes)

    # -- training

    def objective(self, ctx: Context, samples: list[ds.Sample], num_outputs: int) -> Objective:
        raise NotImplementedError

    # -- assessment

    def after_fold(self, ctx: Context, collection: ds.Collection, val: list[ds.Sample] | None, model: nn.Module,
                   result: FoldResult) -> FoldResult:
        """A fold's result with what the kind measures on its validation samples after training (default:
        as validated during training)."""
        return result

    def fold_metrics(self, ctx: Context, folds: list[FoldResult]) -> list[dict[str, Any]]:
        """Each fold's reported metrics (default: as validated; a kind with a threshold re-chooses it)."""
        return [dict(f.metrics) for f in folds]

    def assess(self, ctx: Context, collection: ds.Collection, split: ds.Split, model: nn.Module,
               folds: list[FoldResult], chosen: int | None) -> dict[str, Any]:
        """The held-out test set's metrics (and what the report shows of them)."""
        raise NotImplementedError

    def compare(self, ctx: Context, collection: ds.Collection, samples: list[ds.Sample], candidate: nn.Module,
                active: ModelVersion, module: nn.Module) -> dict[str, Any] | None:
        """The active version (``module``, with its own input spec) and the candidate on ``samples``."""
        raise NotImplementedError

    def other_comparisons(self, split: ds.Split, test: dict[str, Any]) -> dict[str, Any]:
        return {}

    def curves(self, folds: list[FoldResult], test: dict[str, Any]) -> dict[str, Any]:
        return {}

    def decide(self, gate: GateConfig, test: dict[str, Any], comparisons: dict[str, Any]) -> promote.Decision:
        raise NotImplementedError

    def threshold(self, test: dict[str, Any]) -> float | None:
        """The operating threshold registered with the version (binary tasks)."""
        return None


@dataclass(frozen=True)
class HeldOut:
    y: np.ndarray
    outputs: np.ndarray
    y_val: np.ndarray
    out_val: np.ndarray
    groups: np.ndarray


class ClassifierKind(TrainingKind):
    """Radiograph tasks with one output head (binary, multiclass, regression)."""

    def collect(self, ctx: Context, session: Session) -> ds.Collection:
        """Radiographs of the studies labelled for the task (its csv column), inside the run's population."""
        if self.task.labels.source != "csv":
            raise ValueError(f"{self.task.name}: a {self.name} task learns from a csv label column, "
                             f"not from {self.task.labels.source}")
        relabel, unusable = self.relabel()
        return ds.collect_labelled(session, self.task.name, load_view_taxonomy(None), ctx.population,
                                   ctx.recipe.split_salt, classes=self.classes(ctx.recipe), relabel=relabel,
                                   unusable=unusable)

    def relabel(self) -> tuple[Callable[[float], float | None] | None, str]:
        """What this kind makes of a stored label (None: leave it out), and the reason counted then."""
        return None, ""

    def dataset(self, ctx: Context, collection: ds.Collection, samples: list[ds.Sample], *, train: bool,
                spec: InputSpec | None = None) -> Dataset:
        cache = ds.PreprocessCache(ctx.cache_root, spec or ctx.spec)
        augment = Augment(ctx.recipe.augment) if train else None
        return ds.RadiographDataset(samples, ctx.archive.root, cache, multiclass=self.name == "multiclass",
                                    augment=augment)

    def paired_outputs(self, ctx: Context, collection: ds.Collection, samples: list[ds.Sample],
                       candidate: nn.Module, active: ModelVersion,
                       module: nn.Module) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Labels, the candidate's outputs and the active version's (each with its own input spec)."""
        theirs = self.outputs(ctx, collection, module, samples, active.input_spec)
        mine = self.outputs(ctx, collection, candidate, samples)
        return np.array([s.label for s in samples]), mine, theirs

    def outputs(self, ctx: Context, collection: ds.Collection, model: nn.Module, samples: list[ds.Sample],
                spec: InputSpec | None = None) -> np.ndarray:
        loader = eval_loader(ctx, samples, collection, spec)
        outputs, _, _ = predict(model.to(ctx.device), loader, ctx.device, memory_format=memory_format_of(ctx.recipe))
        return outputs

    def held_out(self, ctx: Context, collection: ds.Collection, split: ds.Split, model: nn.Module,
                 folds: list[FoldResult], chosen: int | None) -> HeldOut:
        """The test set's outputs and labels, and the validation outputs for calibration."""
        y_val, out_val = validation_of(folds, chosen)
        return HeldOut(np.array([s.label for s in split.test]), self.outputs(ctx, collection, model, split.test),
                       y_val, out_val, np.array([s.group for s in split.test]))

    def decide(self, gate: GateConfig, test: dict[str, Any], comparisons: dict[str, Any]) -> promote.Decision:
        active = comparisons.get("active")
        usable = active if active and active.get("n") else None
        if active and not usable:
            return promote.Decision(False, active["summary"])
        return promote.gate_auroc(gate, test["metrics"]["auroc"], usable)


def validation_of(folds: list[FoldResult], chosen: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Validation outputs for calibration and the threshold: the chosen fold's, else all folds'."""
    picked = [folds[chosen]] if chosen is not None else folds
    return (np.concatenate([f.targets for f in picked]), np.concatenate([f.outputs for f in picked]))
