"""One training run, start to finish: collect → split → K folds → held-out test → report → gate.

The run directory (``training.runs_dir/TASK/<recipe hash>-<manifest hash>``) holds the resolved
recipe, the manifest, per-fold checkpoints and results, and the report. The same recipe on the same
data is the same run: started again after an interruption it resumes from the last checkpoint, and
once finished it returns its summary instead of registering a second copy.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset

from common.processes import peak_rss_mb
from config.settings import Settings
from config.tasks import TaskDefinition
from inference.models import create_model, resolve_device
from inference.registry import InputSpec, ModelRegistry, ModelVersion
from storage.archive import Archive
from storage.db import open_index
from training import datasets as ds
from training import evaluate as ev
from training import manifests, population, promote, report
from training.engine import FoldPaths, FoldResult, Trainer, atomic_json, monitor_mode, plain, seed_everything
from training.kinds import Context, kind_of
from training.kinds import make_loader as _make_loader
from inference.registry.weights import sha256_of_file
from training.initialise import (Start, Transfer, backbone_arch, checkpoint_file, describe, is_checkpoint_path,
                                 plan_transfer, read_checkpoint, refuse_frozen_random, transfer)
from training.recipe import Recipe, RecipeError

log = logging.getLogger(__name__)


def open_context(settings: Settings, recipe: Recipe, *, progress: bool = True,
                 say: Callable[[str], None] = lambda _: None) -> Context:
    device = resolve_device(recipe.device or settings.training.device)
    workers = recipe.num_workers if recipe.num_workers is not None else settings.training.num_workers
    catalogue = settings.catalogue()
    task = catalogue.get(recipe.task)
    return Context(settings, recipe, catalogue, task, kind_of(task, recipe.kind),
                   Archive(settings.storage.archive_dir),
                   ModelRegistry(settings.models_dir, catalogue), device, Path(settings.training.cache_dir), workers,
                   progress, say)


# --- data -------------------------------------------------------------------------------------

def collect(ctx: Context) -> ds.Collection:
    sessions = open_index(ctx.settings.storage.database_url)
    try:
        with sessions() as session:
            return ctx.kind.collect(ctx, session)
    finally:
        sessions.kw["bind"].dispose()


def make_dataset(ctx: Context, collection: ds.Collection, samples: list[ds.Sample], *, train: bool,
                 spec: InputSpec | None = None) -> Dataset:
    return ctx.kind.dataset(ctx, collection, samples, train=train, spec=spec)


def make_loader(ctx: Context, dataset: Dataset, *, train: bool, generator: torch.Generator,
                samples: list[ds.Sample] | None = None) -> DataLoader:
    return _make_loader(ctx, dataset, train=train, generator=generator, samples=samples)


# --- models -----------------------------------------------------------------------------------

def num_outputs(ctx: Context, collection: ds.Collection) -> int:
    return ctx.kind.num_outputs(collection.classes)


def build_model(ctx: Context, collection: ds.Collection) -> nn.Module:
    return create_model(ctx.recipe.arch, ctx.task, num_classes=num_outputs(ctx, collection), in_chans=1)


def in_domain_task(ctx: Context) -> TaskDefinition | None:
    """The task ``init: auto`` starts from: the view task of the task's pipeline, else the first one."""
    pipelines = [ctx.task.pipeline, *ctx.catalogue.pipelines]
    return next((t for t in map(ctx.catalogue.view_task, pipelines) if t is not None), None)


def version_of_arch(ctx: Context, task: str) -> ModelVersion | None:
    """``task``'s version with the recipe's (backbone) architecture: the active one when it has it, else
    the newest validated one (a view model pretrained with ``--set arch=...`` for the downstream tasks)."""
    wanted = backbone_arch(ctx.recipe.arch)
    active = ctx.registry.active(task)
    if active is not None and backbone_arch(active.arch) == wanted:
        return active
    matching = [v for v in ctx.registry.versions(task) if v.validated and backbone_arch(v.arch) == wanted]
    return matching[-1] if matching else None


def _no_version_of_arch(ctx: Context, task: str) -> str:
    archs = sorted({v.arch for v in ctx.registry.versions(task)})
    wanted = backbone_arch(ctx.recipe.arch)
    have = (f"{task} has models of {', '.join(archs)}" if archs else f"{task} has no model yet")
    return (f"no {task} model of {wanted} to start {ctx.recipe.arch} from ({have}); train one with "
            f"`cradle train {task} --set arch={wanted}`, or give init=FILE or init=random")


def resolve_init(ctx: Context, init: str) -> ModelVersion | None:
    """The model version ``init`` names: ``random`` → None; ``auto`` → the in-domain view model of the
    same architecture, else None; the run's own task → its active version; another task → its version
    of the same architecture (RecipeError naming the architectures it has); else a version (``view-3``)."""
    if init == "random":
        return None
    if init == "auto":
        source = in_domain_task(ctx)
        return version_of_arch(ctx, source.name) if source else None
    if init == ctx.recipe.task:
        version = ctx.registry.active(init)
        if version is None:
            raise RecipeError(f"init: {init} has no active version")
        return version
    if init in ctx.catalogue:
        version = version_of_arch(ctx, init)
        if version is None:
            raise RecipeError(f"init: {_no_version_of_arch(ctx, init)}")
        return version
    task = init.rsplit("-", 1)[0]
    if task not in ctx.catalogue:
        raise RecipeError(f"init: {init!r} is neither random, auto, a task, a version (like view-3) nor a "
                          f"checkpoint file (.safetensors, .pth, .pt, .bin)")
    return ctx.registry.get(task, init)


def transfer_weights(model: nn.Module, source: dict[str, torch.Tensor], *, whole: bool) -> tuple[int, int]:
    """Copy what fits of ``source`` into ``model`` (:func:`training.initialise.transfer`); (loaded, wanted)."""
    report = transfer(model, source, whole=whole)
    return len(report.loaded), report.wanted


def build_model_like(ctx: Context) -> nn.Module:
    """The run's network before the data is collected (a multiclass task's classes from the recipe)."""
    classes = ctx.kind.classes(ctx.recipe)
    return create_model(ctx.recipe.arch, ctx.task, num_classes=ctx.kind.num_outputs(classes))


def _log_transfer(report: Transfer, source: str) -> None:
    log.info("init from %s: %d/%d tensors loaded (%d adapted from 3 input channels), %d not in it, %d of it unused",
             source, len(report.loaded), report.wanted, len(report.adapted), len(report.missing), len(report.unused))
    log.info("init from %s: loaded: %s", source, ", ".join(report.loaded))
    if report.adapted:
        log.info("init from %s: stem summed to 1 channel: %s", source, ", ".join(report.adapted))
    log.info("init from %s: not loaded (kept new): %s", source, ", ".join(report.missing) or "none")
    log.info("init from %s: unused: %s", source, ", ".join(report.unused) or "none")


def site_checkpoint(ctx: Context) -> Path | None:
    """The checkpoint ``training.checkpoints`` names for the recipe's architecture (or its backbone's)."""
    checkpoints = ctx.settings.training.checkpoints
    path = checkpoints.get(ctx.recipe.arch) or checkpoints.get(backbone_arch(ctx.recipe.arch))
    return Path(path) if path else None


def start_from_file(ctx: Context, path: Path, via: str = "") -> Start:
    """A start from the checkpoint at ``path`` (a file or a hub folder); ``via`` says why it was chosen
    (and is kept in the source as ``from``)."""
    path = checkpoint_file(path)
    state, report, reading = read_checkpoint(path, build_model_like(ctx))
    _log_transfer(report, f"{path.name} ({reading})")
    ctx.say(f"init: {via}{path.name}: {len(report.loaded)}/{report.wanted} tensors loaded"
            + (", stem adapted to 1 channel" if report.adapted else ""))
    source = {"file": path.name, "sha256": sha256_of_file(path), **({"from": via.rstrip(": ")} if via else {})}
    return Start(source, state, transfer=report.counts())


def random_start(ctx: Context) -> Start:
    """Random weights; for ``init: auto`` (nothing of the architecture found) with a warning in the log,
    the summary and the report."""
    start = Start()
    if ctx.recipe.init == "auto":
        source = in_domain_task(ctx)
        message = (f"init: auto: {_no_version_of_arch(ctx, source.name) if source else 'no view task'}, and "
                   f"training.checkpoints names no checkpoint of {backbone_arch(ctx.recipe.arch)}; "
                   "training from random weights")
        log.warning(message)
        ctx.say(f"warning: {message}")
        start.warnings.append(message)
    return start


def for_random_start(ctx: Context, start: Start) -> Context:
    """The run's context with every layer group at ``lr`` (``layer_decay`` 1) when it starts from random
    weights: discriminative rates keep what a pretrained network's lower layers learnt, and from random
    weights would leave them barely trained (ResNet's stem at lr/32 with the BPD recipe's 0.5). A freezing
    strategy is refused (:func:`training.initialise.refuse_frozen_random`); a decay is dropped with a warning
    in the log, the summary and the report, and the recipe saved with the run says ``layer_decay: 1``."""
    refuse_frozen_random(ctx.recipe.strategy, f"init={ctx.recipe.init}")
    if ctx.recipe.layer_decay == 1:
        return ctx
    message = (f"layer_decay {ctx.recipe.layer_decay:g} (discriminative learning rates) is for a pretrained "
               "start; from random weights every layer trains at lr (layer_decay 1)")
    log.warning(message)
    ctx.say(f"warning: {message}")
    start.warnings.append(message)
    return dataclasses.replace(ctx, recipe=ctx.recipe.model_copy(update={"layer_decay": 1.0}))


def initial_state(ctx: Context) -> Start:
    """Where this run starts (the recipe's ``init``), its tensors named as the run's network names them.
    ``auto``: the view model of the same architecture, else the site checkpoint of that architecture
    (``training.checkpoints``), else random with a warning."""
    recipe = ctx.recipe
    if recipe.init not in ("random", "auto") and recipe.init not in ctx.catalogue and is_checkpoint_path(recipe.init):
        return start_from_file(ctx, Path(recipe.init))
    version = resolve_init(ctx, recipe.init)
    if version is None:
        checkpoint = site_checkpoint(ctx) if recipe.init == "auto" else None
        if checkpoint is not None:
            return start_from_file(ctx, checkpoint, via=f"auto: training.checkpoints.{backbone_arch(recipe.arch)}: ")
        return random_start(ctx)
    module = ctx.registry.load(version, "cpu")
    source = {k: v.contiguous() for k, v in module.state_dict().items()}
    whole = ((version.task, version.arch, version.num_outputs)  # same task and head: copy the head too
             == (recipe.task, recipe.arch, ctx.kind.num_outputs(ctx.kind.classes(recipe))))
    state, report = plan_transfer(build_model_like(ctx), source, whole=whole)
    if not report.loaded:
        raise RecipeError(f"init: no tensor of {version.version} ({version.arch}) fits {recipe.arch}")
    _log_transfer(report, version.version)
    ctx.say(f"init: {version.version}: {len(report.loaded)}/{report.wanted} tensors loaded")
    return Start(version.version, state, version, whole, transfer=report.counts())


def new_model(ctx: Context, collection: ds.Collection, start: Start) -> nn.Module:
    model = build_model(ctx, collection)
    if start.state is not None:
        target = model.state_dict()
        model.load_state_dict({k: v for k, v in start.state.items() if k in target and v.shape == target[k].shape},
                              strict=False)
    return model


# --- folds ------------------------------------------------------------------------------------

def train_fold(ctx: Context, collection: ds.Collection, train: list[ds.Sample], val: list[ds.Sample] | None,
               fold: int | str, run_dir: Path, init: Start, *, epochs: int | None = None
               ) -> tuple[FoldResult, nn.Module]:
    """Fit one model, or load it when this fold already finished in an earlier attempt."""
    recipe = ctx.recipe
    paths = FoldPaths.in_dir(run_dir, fold)
    seed = recipe.seed + (fold if isinstance(fold, int) else 1000)
    seed_everything(seed, recipe.deterministic)  # before the model: its new layers' weights are drawn here
    model = new_model(ctx, collection, init)
    if paths.result.is_file() and paths.best.is_file():
        model.load_state_dict(torch.load(paths.best, map_location="cpu", weights_only=True))
        return FoldResult.from_json(json.loads(paths.result.read_text())), model.to(ctx.device)
    generator = torch.Generator().manual_seed(seed)
    train_loader = make_loader(ctx, make_dataset(ctx, collection, train, train=True), train=True,
                               generator=generator, samples=train)
    val_loader = (make_loader(ctx, make_dataset(ctx, collection, val, train=False), train=False,
                              generator=torch.Generator().manual_seed(seed)) if val else None)
    objective = ctx.kind.objective(ctx, train, num_outputs(ctx, collection))
    trainer = Trainer(recipe, objective, ctx.device, progress=ctx.progress, epochs=epochs,
                      early_stopping=val is not None)
    result = trainer.fit(model, train_loader, val_loader, paths, fold, generator,
                         volumes=[s.series_uid for s in val] if val else None)
    atomic_json(result.to_json(), paths.result)
    paths.checkpoint.unlink(missing_ok=True)
    return result, model


def cross_validate(ctx: Context, collection: ds.Collection, split: ds.Split, run_dir: Path, init: Start
                   ) -> tuple[list[FoldResult], list[nn.Module]]:
    results, models = [], []
    for k, (train_index, val_index) in enumerate(split.folds):
        train = [split.dev[i] for i in train_index]
        val = [split.dev[i] for i in val_index]
        started = time.monotonic()
        result, model = train_fold(ctx, collection, train, val, k, run_dir, init)
        result = ctx.kind.after_fold(ctx, collection, val, model, result)
        ctx.say(f"fold {k + 1}/{len(split.folds)}: {ctx.recipe.monitor_metric} {result.best_value:.3f} "
                f"at epoch {result.best_epoch + 1} ({time.monotonic() - started:.0f} s)")
        results.append(result)
        models.append(model.cpu())
    return results, models


def final_model(ctx: Context, collection: ds.Collection, split: ds.Split, folds: list[FoldResult],
                models: list[nn.Module], run_dir: Path, init: Start) -> tuple[nn.Module, int | None]:
    """The model to register: the best-validating fold's, or one refit on every dev patient for
    the median best epoch count (``final: refit``)."""
    sign = -1.0 if monitor_mode(ctx.recipe.monitor_metric) == "min" else 1.0
    best = int(np.nanargmax([sign * f.best_value for f in folds]))
    if ctx.recipe.final == "best_fold":
        return models[best].to(ctx.device), best
    epochs = int(np.median([f.best_epoch + 1 for f in folds]))
    _, model = train_fold(ctx, collection, split.dev, None, "refit", run_dir, init, epochs=epochs)
    return model, None


# --- held-out assessment ----------------------------------------------------------------------

def _reports_dir(ctx: Context, version: str) -> Path:
    return Path(ctx.settings.models_dir) / ctx.recipe.task / "reports" / version


def unseen_by(ctx: Context, active: ModelVersion, samples: list[ds.Sample]) -> list[ds.Sample]:
    """The test samples whose patient the active version was not trained on (when its manifest is known)."""
    path = _reports_dir(ctx, active.version) / "manifest.json"
    if not path.is_file():
        return samples
    sessions = open_index(ctx.settings.storage.database_url)
    try:
        with sessions() as session:
            saved = manifests.read_manifest(path, session)  # says so when studies of it were pruned
    finally:
        sessions.kw["bind"].dispose()
    trained = {e["patient"] if saved.get("split_salt") == ctx.recipe.split_salt else e["uid"]
               for e in saved["entries"] if e["split"] != "test"}
    key = (lambda s: s.group) if saved.get("split_salt") == ctx.recipe.split_salt else (lambda s: s.uid)
    return [s for s in samples if key(s) not in trained]


def compare_active(ctx: Context, collection: ds.Collection, split: ds.Split, candidate: nn.Module
                   ) -> dict[str, Any] | None:
    """The active version and the candidate on the same held-out images (its own input spec)."""
    active = ctx.registry.active(ctx.recipe.task)
    if active is None or not active.validated:
        return None
    outputs = ctx.kind.num_outputs(collection.classes)
    if active.num_outputs != outputs:  # e.g. a binary pneumonia version beside one by type
        return {"version": active.version, "n": 0,
                "summary": f"{active.version} has {active.num_outputs} output(s) and the candidate {outputs}: "
                           "they answer different questions, so no comparison on the same images; promote "
                           "by hand (cradle models promote) to switch"}
    samples = unseen_by(ctx, active, split.test)
    if not samples:
        return {"version": active.version, "n": 0, "summary": f"{active.version}: every test patient was in its "
                                                               "training data; no fair comparison possible"}
    module = ctx.registry.load(active, ctx.device)
    return ctx.kind.compare(ctx, collection, samples, candidate, active, module)


# --- the run ----------------------------------------------------------------------------------

def run_directory(ctx: Context, manifest_hash: str, start: Start | None = None) -> Path:
    """Named by the recipe, the start's weights (a checkpoint's sha256, the version ``auto`` found) and the data."""
    digest = ctx.recipe.digest()
    if start is not None and not start.random:
        digest = hashlib.sha256(json.dumps([digest, start.source], sort_keys=True).encode()).hexdigest()
    return Path(ctx.settings.training.runs_dir) / ctx.recipe.task / f"{digest[:10]}-{manifest_hash[:10]}"


def prepare_run(ctx: Context, start: Start | None = None) -> tuple[ds.Collection, ds.Split, dict[str, Any], Path]:
    recipe = ctx.recipe
    collection = collect(ctx)
    if not collection.samples:
        raise ValueError(f"no training data for {recipe.task} in the archive "
                         f"({', '.join(f'{k}: {v}' for k, v in collection.skipped.items()) or 'nothing labelled'})")
    split = ds.split(collection.samples, recipe.kind, folds=recipe.folds, test_fraction=recipe.test_fraction,
                     salt=recipe.split_salt, seed=recipe.seed)
    manifest = ds.manifest(collection, split.assignment(), ctx.spec)
    manifest["split_salt"] = recipe.split_salt
    run_dir = run_directory(ctx, manifest["hash"], start)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    atomic_json(manifest, run_dir / "manifest.json")
    return collection, split, manifest, run_dir


def honest_folds(ctx: Context, folds: list[FoldResult]) -> list[FoldResult]:
    """The folds with the metrics that are reported: a kind's threshold metrics at a threshold chosen
    on data the fold's own metric does not see (:meth:`TrainingKind.fold_metrics`)."""
    return [dataclasses.replace(f, metrics=m) for f, m in zip(folds, ctx.kind.fold_metrics(ctx, folds))]


def cv_summary(folds: list[FoldResult]) -> dict[str, float]:
    return ev.summarise_folds([{k: v for k, v in f.metrics.items() if isinstance(v, (int, float))} for f in folds])


def headline_metrics(ctx: Context, cv: dict[str, float], test: dict[str, Any]) -> dict[str, Any]:
    keep = {k: v for k, v in cv.items() if not k.startswith(("n_", "positives", "threshold"))}
    for name in ("auroc", "balanced_accuracy", "f1", "sensitivity", "specificity", "ppv", "npv", "accuracy",
                 "dice", "iou", "dice_slice", "dice_raw", "iou_raw", "side_dice_left", "side_dice_right",
                 "left_right_swapped", "volume_error", "mae", "rmse", "r2"):
        if name in test["metrics"]:
            keep[f"test_{name}"] = test["metrics"][name]
    for name in ("auroc_ci", "dice_ci", "balanced_accuracy_ci", "mae_ci"):
        if test.get(name):
            keep[f"test_{name}"] = [test[name]["low"], test[name]["high"]]
    for name in ("threshold", "temperature", "ece_before", "ece_after"):
        if name in test:
            keep[name] = test[name]
    for name, values in (test.get("per_class") or {}).items():  # multiclass: each class against the rest
        for metric in ("sensitivity", "specificity", "auroc"):
            keep[f"test_{metric}_{name}"] = values[metric]
    return keep


def register(ctx: Context, collection: ds.Collection, model: nn.Module, test: dict[str, Any],
             metrics: dict[str, Any], manifest: dict[str, Any], run_dir: Path, init: Any) -> ModelVersion:
    recipe = ctx.recipe
    provenance = {"trained_by": "cradle train", "run_dir": str(run_dir), "recipe": recipe.model_dump(mode="json"),
                  "manifest_hash": manifest["hash"], "code_version": promote.code_version(), "seed": recipe.seed,
                  "init": init, "device": str(ctx.device),
                  "trained_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return ctx.registry.register(recipe.task, recipe.arch, state, input_spec=ctx.spec,
                                 threshold=ctx.kind.threshold(test),
                                 temperature=test.get("temperature", 1.0), classes=collection.classes,
                                 provenance=provenance, metrics=metrics, validated=True,
                                 population=collection.seen.as_population())


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
    start = initial_state(ctx)
    if start.random:
        ctx = for_random_start(ctx, start)
        recipe = ctx.recipe
    collection, split, manifest, run_dir = prepare_run(ctx, start)
    if (run_dir / "summary.json").is_file():
        say(f"this run already finished: {run_dir}")
        return json.loads((run_dir / "summary.json").read_text())
    left = population.left_out(collection.skipped)
    say(f"{recipe.task}: {len(split.dev)} development and {len(split.test)} held-out samples from "
        f"{manifest['patients']} patients, {recipe.folds} folds, {recipe.arch} on {ctx.device}; run {run_dir.name}")
    if left["by_reason"]:
        say(f"left out: {left['outside_population']} outside the population; "
            + ", ".join(f"{reason}: {n}" for reason, n in left["by_reason"].items()))
    folds, models = cross_validate(ctx, collection, split, run_dir, start)
    model, chosen = final_model(ctx, collection, split, folds, models, run_dir, start)
    memory = {"training": peak_rss_mb()}
    test = ctx.kind.assess(ctx, collection, split, model, folds, chosen)
    memory["evaluation"] = peak_rss_mb()
    say(f"peak resident memory: {memory['training']:.0f} MB training, {memory['evaluation']:.0f} MB "
        "with the held-out evaluation")
    comparisons = {"active": compare_active(ctx, collection, split, model),
                   **ctx.kind.other_comparisons(split, test)}
    decision = ctx.kind.decide(recipe.gate, test, comparisons)
    reported = honest_folds(ctx, folds)
    metrics = headline_metrics(ctx, cv_summary(reported), test)
    version = register(ctx, collection, model, test, plain(metrics), manifest, run_dir, start.source)
    promoted = decision.passed and recipe.gate.auto_promote
    reason = decision.reason
    if decision.passed and not recipe.gate.auto_promote:
        reason = f"passes the gate ({decision.reason}); gate.auto_promote is off: cradle models promote"
    body = {"task": recipe.task, "kind": recipe.kind, "version": version.version, "run_id": run_dir.name,
            "recipe": recipe.model_dump(mode="json"), "manifest": {k: manifest[k] for k in
                                                                  ("hash", "counts", "patients", "skipped")},
            "init": describe(start.source), "init_source": start.source, "init_transfer": start.transfer,
            "warnings": start.warnings, "device": str(ctx.device), "code_version": promote.code_version(),
            "seconds": time.monotonic() - started, "peak_rss_mb": memory, "folds": [_fold_json(f) for f in reported],
            "chosen_fold": chosen, "cv": cv_summary(reported), "test": _test_json(test),
            "comparisons": comparisons, "decision": decision.as_dict(), "promoted": promoted, "metrics": metrics,
            "left_out": left, "population": collection.seen.as_population(),
            "classes": collection.classes}
    report.write_report(run_dir / "report", plain(body), plain(ctx.kind.curves(folds, test)))
    publish(ctx, run_dir, version.version)
    if promoted:
        ctx.registry.activate(recipe.task, version.version, reason=f"cradle train: {decision.reason}")
    summary = plain({"version": version.version, "init": start.source, "init_transfer": start.transfer,
                     "warnings": start.warnings, "metrics": metrics, "promoted": promoted, "reason": reason,
                     "left_out": left,
                     "peak_rss_mb": memory,
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
    """The test results without per-image values (a regression label such as bone age is near an age)."""
    data = {k: v for k, v in test.items() if k not in ("probabilities", "labels", "predictions")}
    if "bland_altman" in data:
        data["bland_altman"] = {k: v for k, v in data["bland_altman"].items() if k in ("bias", "low", "high")}
    return data

