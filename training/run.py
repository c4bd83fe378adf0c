"""One training run, start to finish: collect → split → K folds → held-out test → report → gate.

The run directory (``training.runs_dir/TASK/<recipe hash>-<manifest hash>``) holds the resolved
recipe, the manifest, per-fold checkpoints and results, and the report. The same recipe on the same
data is the same run: started again after an interruption it resumes from the last checkpoint, and
once finished it returns its summary instead of registering a second copy.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from config.settings import Settings
from inference.models import create_model, output_count, resolve_device
from inference.registry import InputSpec, ModelRegistry, ModelVersion
from storage.archive import Archive
from storage.db import open_index
from training import datasets as ds
from training import evaluate as ev
from training import labels as lb
from training import promote, report
from training.augment import Augment
from training.engine import (BinaryObjective, FoldPaths, FoldResult, MulticlassObjective, Objective,
                             SegmentationObjective, Trainer, atomic_json, memory_format_of, plain, predict,
                             seed_everything, seed_worker, validate)
from training.recipe import Recipe
from training.strategies import backbone_names

log = logging.getLogger(__name__)


@dataclass
class Context:
    """What a run works with; built once by :func:`open_context`."""

    settings: Settings
    recipe: Recipe
    archive: Archive
    registry: ModelRegistry
    device: torch.device
    cache_root: Path
    num_workers: int
    progress: bool
    say: Callable[[str], None]

    @property
    def spec(self) -> InputSpec:
        r = self.recipe
        return InputSpec(image_size=r.image_size, normalisation=r.normalisation, clahe=r.clahe,
                         keep_aspect=r.keep_aspect)


def open_context(settings: Settings, recipe: Recipe, *, progress: bool = True,
                 say: Callable[[str], None] = lambda _: None) -> Context:
    device = resolve_device(recipe.device or settings.training.device)
    workers = recipe.num_workers if recipe.num_workers is not None else settings.training.num_workers
    return Context(settings, recipe, Archive(settings.storage.archive_dir), ModelRegistry(settings.models_dir),
                   device, Path(settings.training.cache_dir), workers, progress, say)


# --- data -------------------------------------------------------------------------------------

def collect(ctx: Context) -> ds.Collection:
    recipe = ctx.recipe
    sessions = open_index(ctx.settings.storage.database_url)
    try:
        with sessions() as session:
            if recipe.task == "lung-seg":
                references = lb.reference_segmentations(session, ctx.archive, ctx.settings.training.reviewer_aets)
                return ds.collect_segmentation(session, references, ctx.archive, recipe.split_salt)
            taxonomy = lb.load_view_taxonomy(recipe.taxonomy if recipe.task == "view" else None)
            if recipe.task == "view":
                return ds.collect_views(session, taxonomy, recipe.split_salt, recipe.max_per_class)
            return ds.collect_binary(session, recipe.task, taxonomy, recipe.views, recipe.split_salt)
    finally:
        sessions.kw["bind"].dispose()


def make_dataset(ctx: Context, collection: ds.Collection, samples: list[ds.Sample], *, train: bool,
                 spec: InputSpec | None = None) -> Dataset:
    cache = ds.PreprocessCache(ctx.cache_root, spec or ctx.spec)
    augment = Augment(ctx.recipe.augment) if train else None
    if ctx.recipe.task == "lung-seg":
        return ds.SliceDataset(samples, collection.volumes, ctx.archive.root, cache, augment=augment)
    return ds.RadiographDataset(samples, ctx.archive.root, cache, multiclass=ctx.recipe.task == "view",
                                augment=augment)


def make_loader(ctx: Context, dataset: Dataset, *, train: bool, generator: torch.Generator,
                samples: list[ds.Sample] | None = None) -> DataLoader:
    sampler = None
    if train and ctx.recipe.class_balanced and samples is not None:
        sampler = WeightedRandomSampler(ds.class_weights(samples), len(samples), generator=generator)
    batch = ctx.recipe.batch_size
    return DataLoader(dataset, batch_size=batch, shuffle=train and sampler is None, sampler=sampler,
                      drop_last=train and len(dataset) > batch, num_workers=ctx.num_workers,
                      generator=generator, worker_init_fn=seed_worker, persistent_workers=ctx.num_workers > 0,
                      pin_memory=ctx.device.type == "cuda")


# --- models -----------------------------------------------------------------------------------

def num_outputs(recipe: Recipe, collection: ds.Collection) -> int:
    return output_count(recipe.task, collection.classes)


def build_model(recipe: Recipe, collection: ds.Collection) -> nn.Module:
    return create_model(recipe.arch, recipe.task, num_classes=num_outputs(recipe, collection), in_chans=1)


def resolve_init(registry: ModelRegistry, init: str) -> ModelVersion | None:
    """``random`` → None; ``auto`` → the active view model if there is one (in-domain
    initialisation), else None; a task name → its active version; else a version such as ``view-3``."""
    if init == "random":
        return None
    if init == "auto":
        return registry.active("view")
    if init in lb.BINARY_TASKS + ("view", "lung-seg"):
        version = registry.active(init)
        if version is None:
            raise ValueError(f"init: {init} has no active version")
        return version
    task = init.rsplit("-", 1)[0]
    return registry.get(task, init)


def transfer_weights(model: nn.Module, source: dict[str, torch.Tensor], *, whole: bool) -> tuple[int, int]:
    """Copy matching tensors (same name, or the same name inside a U-Net ``encoder.``; same shape).
    ``whole`` copies the head too (same task and classes); otherwise the backbone only."""
    target = model.state_dict()
    wanted = set(target) if whole else {n for n in target if n in backbone_names(model)
                                        or _is_backbone_buffer(n, model)}
    loaded = {}
    for name in wanted:
        for candidate in (name, name.removeprefix("encoder.")):
            if candidate in source and source[candidate].shape == target[name].shape:
                loaded[name] = source[candidate]
                break
    model.load_state_dict(loaded, strict=False)
    return len(loaded), len(wanted)


def _is_backbone_buffer(name: str, model: nn.Module) -> bool:
    module = name.rsplit(".", 1)[0]
    return any(p.startswith(module + ".") for p in backbone_names(model))


def initial_state(ctx: Context) -> tuple[dict[str, torch.Tensor] | None, ModelVersion | None]:
    version = resolve_init(ctx.registry, ctx.recipe.init)
    if version is None:
        return None, None
    module = ctx.registry.load(version, "cpu")
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    if ctx.recipe.init == "auto" and transfer_weights(build_model_like(ctx), state, whole=False)[0] == 0:
        return None, None  # the view model's backbone does not fit this architecture: random
    return state, version


def build_model_like(ctx: Context) -> nn.Module:
    classes = list(lb.load_view_taxonomy(ctx.recipe.taxonomy).classes) if ctx.recipe.task == "view" else None
    return create_model(ctx.recipe.arch, ctx.recipe.task, num_classes=output_count(ctx.recipe.task, classes))


def new_model(ctx: Context, collection: ds.Collection, init: tuple[dict | None, ModelVersion | None]) -> nn.Module:
    model = build_model(ctx.recipe, collection)
    state, version = init
    if state is not None:
        whole = (version.task == ctx.recipe.task and version.arch == ctx.recipe.arch
                 and version.num_outputs == num_outputs(ctx.recipe, collection))
        loaded, total = transfer_weights(model, state, whole=whole)
        if loaded == 0 and ctx.recipe.init != "auto":
            raise ValueError(f"init: no tensor of {version.version} ({version.arch}) fits {ctx.recipe.arch}")
        log.info("initialised %d/%d tensors from %s", loaded, total, version.version)
    return model


# --- folds ------------------------------------------------------------------------------------

def make_objective(ctx: Context, samples: list[ds.Sample]) -> Objective:
    if ctx.recipe.task == "lung-seg":
        return SegmentationObjective()
    if ctx.recipe.task == "view":
        return MulticlassObjective()
    positives = sum(1 for s in samples if s.label >= 0.5)
    weight = (len(samples) - positives) / max(positives, 1) if ctx.recipe.pos_weight == "balanced" else None
    return BinaryObjective(weight, ctx.recipe.target_sensitivity).to(ctx.device)


def train_fold(ctx: Context, collection: ds.Collection, train: list[ds.Sample], val: list[ds.Sample] | None,
               fold: int | str, run_dir: Path, init: tuple, *, epochs: int | None = None
               ) -> tuple[FoldResult, nn.Module]:
    """Fit one model, or load it when this fold already finished in an earlier attempt."""
    recipe = ctx.recipe
    paths = FoldPaths.in_dir(run_dir, fold)
    model = new_model(ctx, collection, init)
    if paths.result.is_file() and paths.best.is_file():
        model.load_state_dict(torch.load(paths.best, map_location="cpu", weights_only=True))
        return FoldResult.from_json(json.loads(paths.result.read_text())), model.to(ctx.device)
    seed = recipe.seed + (fold if isinstance(fold, int) else 1000)
    seed_everything(seed, recipe.deterministic)
    generator = torch.Generator().manual_seed(seed)
    train_loader = make_loader(ctx, make_dataset(ctx, collection, train, train=True), train=True,
                               generator=generator, samples=train)
    val_loader = (make_loader(ctx, make_dataset(ctx, collection, val, train=False), train=False,
                              generator=torch.Generator().manual_seed(seed)) if val else None)
    trainer = Trainer(recipe, make_objective(ctx, train), ctx.device, progress=ctx.progress, epochs=epochs,
                      early_stopping=val is not None, num_classes=num_outputs(recipe, collection))
    result = trainer.fit(model, train_loader, val_loader, paths, fold, generator,
                         volumes=[s.series_uid for s in val] if val else None)
    atomic_json(result.to_json(), paths.result)
    paths.checkpoint.unlink(missing_ok=True)
    return result, model


def cross_validate(ctx: Context, collection: ds.Collection, split: ds.Split, run_dir: Path, init: tuple
                   ) -> tuple[list[FoldResult], list[nn.Module]]:
    results, models = [], []
    for k, (train_index, val_index) in enumerate(split.folds):
        train = [split.dev[i] for i in train_index]
        val = [split.dev[i] for i in val_index]
        started = time.monotonic()
        result, model = train_fold(ctx, collection, train, val, k, run_dir, init)
        ctx.say(f"fold {k + 1}/{len(split.folds)}: {ctx.recipe.monitor_metric} {result.best_value:.3f} "
                f"at epoch {result.best_epoch + 1} ({time.monotonic() - started:.0f} s)")
        results.append(result)
        models.append(model.cpu())
    return results, models


def final_model(ctx: Context, collection: ds.Collection, split: ds.Split, folds: list[FoldResult],
                models: list[nn.Module], run_dir: Path, init: tuple) -> tuple[nn.Module, int | None]:
    """The model to register: the best-validating fold's, or one refit on every dev patient for
    the median best epoch count (``final: refit``)."""
    best = int(np.nanargmax([f.best_value if ctx.recipe.monitor_metric != "loss" else -f.best_value
                             for f in folds]))
    if ctx.recipe.final == "best_fold":
        return models[best].to(ctx.device), best
    epochs = int(np.median([f.best_epoch + 1 for f in folds]))
    _, model = train_fold(ctx, collection, split.dev, None, "refit", run_dir, init, epochs=epochs)
    return model, None


# --- held-out assessment ----------------------------------------------------------------------

def test_outputs(ctx: Context, collection: ds.Collection, model: nn.Module, samples: list[ds.Sample],
                 spec: InputSpec | None = None) -> np.ndarray:
    dataset = make_dataset(ctx, collection, samples, train=False, spec=spec)
    loader = make_loader(ctx, dataset, train=False, generator=torch.Generator().manual_seed(0))
    outputs, _, _ = predict(model.to(ctx.device), loader, ctx.device, memory_format=memory_format_of(ctx.recipe))
    return outputs


def test_overlap(ctx: Context, collection: ds.Collection, model: nn.Module, samples: list[ds.Sample],
                 spec: InputSpec | None = None) -> dict[str, Any]:
    dataset = make_dataset(ctx, collection, samples, train=False, spec=spec)
    loader = make_loader(ctx, dataset, train=False, generator=torch.Generator().manual_seed(0))
    metrics, _, _ = validate(model.to(ctx.device), loader, SegmentationObjective(), ctx.device,
                             [s.series_uid for s in samples], memory_format_of(ctx.recipe))
    return metrics


def validation_of(folds: list[FoldResult], chosen: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Validation outputs for calibration and the threshold: the chosen fold's, else all folds'."""
    picked = [folds[chosen]] if chosen is not None else folds
    return (np.concatenate([f.targets for f in picked]), np.concatenate([f.outputs for f in picked]))


def assess(ctx: Context, collection: ds.Collection, split: ds.Split, model: nn.Module,
           folds: list[FoldResult], chosen: int | None) -> dict[str, Any]:
    recipe = ctx.recipe
    groups = np.array([s.group for s in split.test])
    if recipe.task == "lung-seg":
        metrics = test_overlap(ctx, collection, model, split.test)
        per_volume = list(metrics["dice_per_volume"].values())
        ci = ev.dice_ci(per_volume, resamples=recipe.bootstrap, seed=recipe.seed) if recipe.bootstrap else None
        return {"metrics": metrics, "dice_ci": ci.as_dict() if ci else None}
    outputs = test_outputs(ctx, collection, model, split.test)
    y = np.array([s.label for s in split.test])
    y_val, out_val = validation_of(folds, chosen)
    if recipe.task == "view":
        return ev.assess_multiclass(y, outputs, y_val, out_val, temperature_scaling=recipe.temperature_scaling,
                                    resamples=recipe.bootstrap, seed=recipe.seed, groups=groups)
    return ev.assess_binary(y, outputs[:, 0], y_val, out_val[:, 0], target_sensitivity=recipe.target_sensitivity,
                            temperature_scaling=recipe.temperature_scaling, resamples=recipe.bootstrap,
                            seed=recipe.seed, groups=groups)


def _reports_dir(ctx: Context, version: str) -> Path:
    return Path(ctx.settings.models_dir) / ctx.recipe.task / "reports" / version


def unseen_by(ctx: Context, active: ModelVersion, samples: list[ds.Sample]) -> list[ds.Sample]:
    """The test samples whose patient the active version was not trained on (when its manifest is known)."""
    path = _reports_dir(ctx, active.version) / "manifest.json"
    if not path.is_file():
        return samples
    saved = json.loads(path.read_text())
    trained = {e["patient"] if saved.get("split_salt") == ctx.recipe.split_salt else e["uid"]
               for e in saved["entries"] if e["split"] != "test"}
    key = (lambda s: s.group) if saved.get("split_salt") == ctx.recipe.split_salt else (lambda s: s.uid)
    return [s for s in samples if key(s) not in trained]


def compare_active(ctx: Context, collection: ds.Collection, split: ds.Split, candidate: nn.Module,
                   test: dict[str, Any]) -> dict[str, Any] | None:
    """The active version and the candidate on the same held-out images (its own input spec)."""
    active = ctx.registry.active(ctx.recipe.task)
    if active is None or not active.validated:
        return None
    samples = unseen_by(ctx, active, split.test)
    if not samples:
        return {"version": active.version, "n": 0, "summary": f"{active.version}: every test patient was in its "
                                                               "training data; no fair comparison possible"}
    module = ctx.registry.load(active, ctx.device)
    if ctx.recipe.task == "lung-seg":
        theirs = test_overlap(ctx, collection, module, samples, active.input_spec)
        mine = test_overlap(ctx, collection, candidate, samples)
        return {"version": active.version, "n": theirs["n_volumes"], "dice_active": theirs["dice"],
                "dice_candidate": mine["dice"],
                "summary": f"{active.version}: Dice {theirs['dice']:.3f}, candidate {mine['dice']:.3f}"}
    theirs = test_outputs(ctx, collection, module, samples, active.input_spec)
    mine = test_outputs(ctx, collection, candidate, samples)
    y = np.array([s.label for s in samples])
    if ctx.recipe.task == "view":
        a, c = ev.multiclass_metrics(y, ev.softmax(theirs)), ev.multiclass_metrics(y, ev.softmax(mine))
        return {"version": active.version, "n": len(y), "auc_active": a["auroc"], "auc_candidate": c["auroc"],
                "summary": f"{active.version}: macro AUROC {a['auroc']:.3f}, candidate {c['auroc']:.3f}"}
    return delong_summary(active.version, y, mine[:, 0], theirs[:, 0])


def delong_summary(name: str, y: np.ndarray, candidate: np.ndarray, other: np.ndarray) -> dict[str, Any] | None:
    if len(np.unique(y)) < 2:
        return None
    result = ev.delong_test(y, candidate, other)
    return {"version": name, "n": int(len(y)), "auc_active": result.auc_b, "auc_candidate": result.auc_a,
            "p_value": result.p_value, "p_candidate_lower": result.p_a_lower, "z": result.z,
            "summary": f"AUROC {result.auc_a:.3f} vs {name} {result.auc_b:.3f} on {len(y)} images, "
                       f"DeLong p={result.p_value:.3g}"}


def compare_irds(split: ds.Split, test: dict[str, Any]) -> dict[str, Any] | None:
    """The candidate against the radiologist's IRDS grade as a score, where the labels carry it."""
    pairs = [(s.label, p, s.irds_grade) for s, p in zip(split.test, test["probabilities"]) if s.irds_grade is not None]
    if len(pairs) < 4:
        return None
    y, candidate, grade = map(np.array, zip(*pairs))
    return delong_summary("IRDS grade", y, candidate, grade)


# --- the run ----------------------------------------------------------------------------------

def run_directory(ctx: Context, manifest_hash: str) -> Path:
    return Path(ctx.settings.training.runs_dir) / ctx.recipe.task / f"{ctx.recipe.digest()[:10]}-{manifest_hash[:10]}"


def prepare_run(ctx: Context) -> tuple[ds.Collection, ds.Split, dict[str, Any], Path]:
    recipe = ctx.recipe
    collection = collect(ctx)
    if not collection.samples:
        raise ValueError(f"no training data for {recipe.task} in the archive "
                         f"({', '.join(f'{k}: {v}' for k, v in collection.skipped.items()) or 'nothing labelled'})")
    split = ds.split(collection.samples, recipe.kind, folds=recipe.folds, test_fraction=recipe.test_fraction,
                     salt=recipe.split_salt, seed=recipe.seed)
    manifest = ds.manifest(collection, split.assignment(), ctx.spec)
    manifest["split_salt"] = recipe.split_salt
    run_dir = run_directory(ctx, manifest["hash"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    atomic_json(manifest, run_dir / "manifest.json")
    return collection, split, manifest, run_dir


def cv_summary(folds: list[FoldResult]) -> dict[str, float]:
    return ev.summarise_folds([{k: v for k, v in f.metrics.items() if isinstance(v, (int, float))} for f in folds])


def curves(ctx: Context, folds: list[FoldResult], test: dict[str, Any], comparisons: dict[str, Any]) -> dict:
    if ctx.recipe.task == "lung-seg":
        dice = {f"fold {f.fold}": list(f.metrics.get("dice_per_volume", {}).values()) for f in folds}
        dice["test"] = list(test["metrics"]["dice_per_volume"].values())
        return {"dice": dice}
    if ctx.recipe.task == "view":
        return {"reliability": {"test (scaled)": test["reliability_after"]}}
    roc = [{"label": f"test AUROC {test['metrics']['auroc']:.3f}", **test["roc"]}]
    for f in folds:
        if f.outputs is not None and len(np.unique(f.targets)) > 1:
            fpr, tpr, _ = ev.metrics.roc_curve(f.targets, f.outputs[:, 0])
            roc.append({"label": f"fold {f.fold} validation", "fpr": fpr.tolist(), "tpr": tpr.tolist(),
                        "lw": 1, "alpha": 0.5})
    return {"roc": roc, "reliability": {"test, raw": test["reliability_before"],
                                        "test, temperature-scaled": test["reliability_after"]}}


def decide(ctx: Context, test: dict[str, Any], comparisons: dict[str, Any]) -> promote.Decision:
    gate = ctx.recipe.gate
    if ctx.recipe.task == "lung-seg":
        return promote.gate_dice(gate, test["metrics"]["dice"], comparisons.get("active"))
    active = comparisons.get("active")
    usable = active if active and active.get("n") else None
    if active and not usable:
        return promote.Decision(False, active["summary"])
    return promote.gate_auroc(gate, test["metrics"]["auroc"], usable)


def headline_metrics(ctx: Context, cv: dict[str, float], test: dict[str, Any]) -> dict[str, Any]:
    keep = {k: v for k, v in cv.items() if not k.startswith(("n_", "positives", "threshold"))}
    for name in ("auroc", "balanced_accuracy", "f1", "sensitivity", "specificity", "ppv", "npv", "accuracy",
                 "dice", "iou", "dice_slice"):
        if name in test["metrics"]:
            keep[f"test_{name}"] = test["metrics"][name]
    for name in ("auroc_ci", "dice_ci", "balanced_accuracy_ci"):
        if test.get(name):
            keep[f"test_{name}"] = [test[name]["low"], test[name]["high"]]
    for name in ("threshold", "temperature", "ece_before", "ece_after"):
        if name in test:
            keep[name] = test[name]
    return keep


def register(ctx: Context, collection: ds.Collection, model: nn.Module, test: dict[str, Any],
             metrics: dict[str, Any], manifest: dict[str, Any], run_dir: Path, init: str) -> ModelVersion:
    recipe = ctx.recipe
    provenance = {"trained_by": "cradle train", "run_dir": str(run_dir), "recipe": recipe.model_dump(mode="json"),
                  "manifest_hash": manifest["hash"], "code_version": promote.code_version(), "seed": recipe.seed,
                  "init": init, "device": str(ctx.device),
                  "trained_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return ctx.registry.register(recipe.task, recipe.arch, state, input_spec=ctx.spec,
                                 threshold=test.get("threshold") if recipe.kind == "binary" else None,
                                 temperature=test.get("temperature", 1.0), classes=collection.classes,
                                 provenance=provenance, metrics=metrics, validated=True)


def publish(ctx: Context, run_dir: Path, version: str) -> Path:
    """Copy the report and manifest next to the model version."""
    target = _reports_dir(ctx, version)
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(run_dir / "report", target)
    shutil.copy2(run_dir / "manifest.json", target / "manifest.json")
    shutil.copy2(run_dir / "recipe.yaml", target / "recipe.yaml")
    return target


def run_training(settings: Settings, recipe: Recipe, *, progress: bool = True,
                 say: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Train, evaluate, register and (if the gate passes) activate; return the run's summary."""
    started = time.monotonic()
    ctx = open_context(settings, recipe, progress=progress, say=say)
    collection, split, manifest, run_dir = prepare_run(ctx)
    if (run_dir / "summary.json").is_file():
        say(f"this run already finished: {run_dir}")
        return json.loads((run_dir / "summary.json").read_text())
    say(f"{recipe.task}: {len(split.dev)} development and {len(split.test)} held-out samples from "
        f"{manifest['patients']} patients, {recipe.folds} folds, {recipe.arch} on {ctx.device}; run {run_dir.name}")
    init = initial_state(ctx)
    folds, models = cross_validate(ctx, collection, split, run_dir, init)
    model, chosen = final_model(ctx, collection, split, folds, models, run_dir, init)
    test = assess(ctx, collection, split, model, folds, chosen)
    comparisons = {"active": compare_active(ctx, collection, split, model, test)}
    if recipe.kind == "binary":
        comparisons["irds_grade"] = compare_irds(split, test)
    decision = decide(ctx, test, comparisons)
    metrics = headline_metrics(ctx, cv_summary(folds), test)
    init_name = init[1].version if init[1] else "random"
    version = register(ctx, collection, model, test, plain(metrics), manifest, run_dir, init_name)
    promoted = decision.passed and recipe.gate.auto_promote
    reason = decision.reason
    if decision.passed and not recipe.gate.auto_promote:
        reason = f"passes the gate ({decision.reason}); gate.auto_promote is off: cradle models promote"
    body = {"task": recipe.task, "kind": recipe.kind, "version": version.version, "run_id": run_dir.name,
            "recipe": recipe.model_dump(mode="json"), "manifest": {k: manifest[k] for k in
                                                                  ("hash", "counts", "patients", "skipped")},
            "init": init_name, "device": str(ctx.device), "code_version": promote.code_version(),
            "seconds": time.monotonic() - started, "folds": [_fold_json(f) for f in folds],
            "chosen_fold": chosen, "cv": cv_summary(folds), "test": _test_json(test),
            "comparisons": comparisons, "decision": decision.as_dict(), "promoted": promoted, "metrics": metrics}
    report.write_report(run_dir / "report", plain(body), plain(curves(ctx, folds, test, comparisons)))
    publish(ctx, run_dir, version.version)
    if promoted:
        ctx.registry.activate(recipe.task, version.version, reason=f"cradle train: {decision.reason}")
    summary = plain({"version": version.version, "metrics": metrics, "promoted": promoted, "reason": reason,
                     "report": str(_reports_dir(ctx, version.version) / "report.html"), "run_dir": str(run_dir),
                     "seconds": round(time.monotonic() - started, 1)})
    atomic_json(summary, run_dir / "summary.json")
    return summary


def _fold_json(fold: FoldResult) -> dict[str, Any]:
    data = fold.to_json()
    data.pop("outputs", None)
    data.pop("targets", None)
    return data


def _test_json(test: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in test.items() if k not in ("probabilities",)}

