"""Retraining from the archive: end to end on a synthetic archive pushed over C-STORE, and the parts
(splits, memory, strategies, resume and determinism, metrics, gate, recipes, in-domain init, queue)."""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import signal
import subprocess
import sys
import shutil
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader, TensorDataset

from config.settings import load_settings
from conftest import free_port
from site_tasks import TOY, write_site_tasks
from test_lung3d import LUNG_3D, print_figures, serve_and_push
from training_archive import Node, _settings
from test_pipelines import CXR_SPEC, VIEWS, _walk, dciodvfy_errors, register_active
from inference.models import create_model
from inference.pipelines import PipelineContext, get_pipeline
from inference.registry import InputSpec, ModelRegistry
from cradle.cli import main
from training import datasets as ds
from training import evaluate as ev
from training import promote
from training import synth
from training.engine import FoldPaths, Trainer, seed_everything
from training.kinds import BinaryObjective
from training.recipe import GateConfig, RecipeError, load_recipe
from training.run import transfer_weights
from training.strategies import (EarlyStopping, LearningRates, ScheduleConfig, Stage, StrategyConfig,
                                 backbone_names, cutmix, layer_groups, stage_at)

REPOSITORY = Path(__file__).resolve().parents[1]
# A training run (and the archive fixture it may build) takes minutes on two CPU cores, more when
# the machine is shared: above the suite-wide per-test timeout.
TRAINING_TIMEOUT = 2400

# Small settings (the demo's kind, cradle/demo.py): ResNet-10t at 96 px from the 128 px films, 3 folds,
# plain augmentation (flips), at most 10 epochs. Measured on 2 CPU cores: about 30 s a run; held-out
# AUROC 0.970 (folds 0.977) on this archive, 0.36 (folds 0.51) with shuffled labels.
BPD = ["--set", "arch=resnet10t", "--set", "image_size=96", "--set", "epochs=10", "--set", "min_epochs=6",
       "--set", "early_stopping_patience=3", "--set", "folds=3", "--set", "strategy=full", "--set", "init=random",
       "--set", "batch_size=16", "--set", "lr=1e-3", "--set", "optimizer=adamw", "--set", "weight_decay=1e-4",
       "--set", "schedule=constant", "--set", "cutmix_prob=0", "--set", "bootstrap=500",
       "--set", "augment={hflip: 0.5, affine_prob: 0, brightness: 0, contrast: 0, gamma: 0, noise_std: 0, "
                "blur_prob: 0, sharpen_prob: 0}"]
# FlexibleUNet-ResNet18 at 64 px, 2 folds, at most 8 epochs: about 20 s; held-out Dice 0.917 per volume.
TOY_SHORTER = ["--set", "folds=2", "--set", "epochs=6", "--set", "min_epochs=4"]
"""The toy task proves the path, not the recipe: the BPD settings, two folds, fewer epochs."""
LUNG = ["--set", "arch=flexible_unet_resnet18", "--set", "image_size=64", "--set", "epochs=8", "--set",
        "min_epochs=6", "--set", "early_stopping_patience=2", "--set", "folds=2", "--set", "batch_size=8",
        "--set", "lr=1e-3", "--set", "bootstrap=500"]


# --- a synthetic archive, pushed over C-STORE --------------------------------------------------


@pytest.fixture(scope="module")
def node(training_archive: Node) -> Node:
    """The session's synthetic archive (tests/training_archive.py), shared with the other training tests."""
    return training_archive


def train(node: Node, task: str, sets: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    """``cradle train TASK ... --json``; its progress lines go to the terminal (``pytest -s``)."""
    output = io.StringIO()
    with capsys.disabled(), contextlib.redirect_stdout(output):
        assert main(["train", task, "--config", str(node.config), *sets, "--json"]) == 0
    return json.loads(output.getvalue())


def write_labels(path: Path, source: Path, *, shuffle_seed: int | None = None) -> Path:
    """``source``'s bpd column (optionally permuted among the labelled studies) as a new CSV."""
    rows = list(csv.DictReader(source.open(newline="")))
    labelled = [i for i, row in enumerate(rows) if row["bpd"] != ""]
    values = [rows[i]["bpd"] for i in labelled]
    if shuffle_seed is not None:
        values = [values[j] for j in np.random.default_rng(shuffle_seed).permutation(len(values))]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["StudyInstanceUID", "bpd"])
        writer.writerows([rows[i]["StudyInstanceUID"], v] for i, v in zip(labelled, values))
    return path


# --- end to end --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(TRAINING_TIMEOUT)
def test_bpd_learns_is_registered_reported_and_promoted(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    summary = train(node, "bpd", BPD, capsys)
    metrics = summary["metrics"]
    print(f"bpd: AUROC {metrics['auroc_mean']:.3f} ± {metrics['auroc_std']:.3f} over folds, "
          f"{metrics['test_auroc']:.3f} held-out (CI {metrics['test_auroc_ci']})", file=sys.__stderr__)
    assert metrics["test_auroc"] >= 0.9
    assert metrics["auroc_mean"] >= 0.85
    for key in ("balanced_accuracy_mean", "f1_mean", "sensitivity_mean", "specificity_mean", "ppv_mean",
                "npv_mean", "test_auroc_ci", "threshold", "temperature", "ece_after"):
        assert key in metrics
    assert summary["promoted"] is True and "reaches the floor" in summary["reason"]

    registry = ModelRegistry(node.settings.models_dir)
    active = registry.active("bpd")
    assert active is not None and active.version == summary["version"] and active.validated
    assert active.provenance["manifest_hash"] and active.provenance["seed"] == 0
    assert active.provenance["code_version"] and active.provenance["recipe"]["arch"] == "resnet10t"
    assert active.threshold == pytest.approx(metrics["threshold"])
    assert active.input_spec == InputSpec(image_size=96)
    reports = Path(node.settings.models_dir) / "bpd" / "reports" / summary["version"]
    for name in ("report.json", "report.md", "report.html", "roc.png", "reliability.png", "loss.png",
                 "manifest.json", "recipe.yaml"):
        assert (reports / name).is_file(), name
    manifest = json.loads((reports / "manifest.json").read_text())
    assert manifest["hash"] == active.provenance["manifest_hash"]
    assert manifest["counts"]["test"] >= 30 and len(manifest["entries"]) == 225
    report = json.loads((reports / "report.json").read_text())
    assert report["comparisons"]["irds_grade"]["summary"].startswith("AUROC")

    # The same command again is the same run: nothing is trained or registered twice.
    again = train(node, "bpd", BPD, capsys)
    assert again == summary
    assert [v.version for v in registry.versions("bpd")] == [summary["version"]]


@pytest.mark.slow
@pytest.mark.timeout(TRAINING_TIMEOUT)
def test_shuffled_labels_score_chance_and_are_not_promoted(node: Node, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    registry = ModelRegistry(node.settings.models_dir)
    active_before = registry.active("bpd")
    shuffled = write_labels(tmp_path / "shuffled.csv", node.synth.labels_csv, shuffle_seed=7)
    try:
        assert main(["labels", "import", str(shuffled), "--config", str(node.config)]) == 0
        summary = train(node, "bpd", BPD, capsys)
    finally:
        original = write_labels(tmp_path / "original.csv", node.synth.labels_csv)
        assert main(["labels", "import", str(original), "--config", str(node.config)]) == 0
    metrics = summary["metrics"]
    print(f"bpd, shuffled labels: AUROC {metrics['auroc_mean']:.3f} ± {metrics['auroc_std']:.3f} over folds, "
          f"{metrics['test_auroc']:.3f} held-out; {summary['reason']}", file=sys.__stderr__)
    assert abs(metrics["auroc_mean"] - 0.5) < 0.15
    assert metrics["test_auroc"] < 0.8
    assert summary["promoted"] is False
    assert "below the floor 0.70" in summary["reason"]
    candidate = registry.get("bpd", summary["version"])
    assert candidate.state == "candidate" and candidate.validated
    active_after = registry.active("bpd")
    assert (active_after and active_after.version) == (active_before and active_before.version)


@pytest.mark.slow
@pytest.mark.timeout(TRAINING_TIMEOUT)
def test_lung_segmentation_from_reviewer_segs(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    summary = train(node, "lung-seg", LUNG, capsys)
    metrics = summary["metrics"]
    print(f"lung-seg: Dice {metrics['dice_mean']:.3f} ± {metrics['dice_std']:.3f} over folds, "
          f"{metrics['test_dice']:.3f} held-out per volume, {metrics['test_dice_slice']:.3f} per slice",
          file=sys.__stderr__)
    assert metrics["test_dice"] >= 0.85
    assert {"iou_mean", "dice_slice_mean", "test_iou", "test_dice_ci"} <= set(metrics)
    assert summary["promoted"] is True
    reports = Path(node.settings.models_dir) / "lung-seg" / "reports" / summary["version"]
    assert (reports / "dice_box.png").is_file() and (reports / "loss.png").is_file()
    version = ModelRegistry(node.settings.models_dir).active("lung-seg")
    assert version.arch == "flexible_unet_resnet18" and version.input_spec.image_size == 64


@pytest.mark.slow
@pytest.mark.timeout(TRAINING_TIMEOUT)
def test_3d_candidate_gated_against_2d_then_serves_seg_and_sr(node: Node, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    two_d = train(node, "lung-seg", LUNG, capsys)  # test_lung_segmentation_from_reviewer_segs' run, when it ran
    assert two_d["promoted"] is True
    three_d = train(node, "lung-seg", LUNG_3D, capsys)
    registry = ModelRegistry(node.settings.models_dir)
    version = registry.get("lung-seg", three_d["version"])
    assert version.arch == "dynunet3d_tiny" and version.input_spec.patch == (16, 64, 64)
    reports = Path(node.settings.models_dir) / "lung-seg" / "reports"
    report = json.loads((reports / three_d["version"] / "report.json").read_text())
    for name in ("bland_altman.png", "dice_box.png", "report.md"):
        assert (reports / three_d["version"] / name).is_file(), name
    assert "Held-out volumes as shipped" in (reports / three_d["version"] / "report.md").read_text()
    print_figures(two_d, three_d, report)

    # Both versions on the same held-out volumes, measured as shipped; the gate decided on those numbers.
    comparison = report["comparisons"]["active"]
    assert comparison["version"] == two_d["version"] and comparison["dims_active"] == 2
    assert comparison["dims_candidate"] == 3 and comparison["n"] == len(report["test"]["volumes"]) >= 1
    assert set(comparison["per_volume"]) == {v["series_uid"] for v in report["test"]["volumes"]}
    expected = promote.gate_dice(GateConfig(**report["recipe"]["gate"]), report["test"]["metrics"]["dice"],
                                 comparison)
    assert report["decision"]["passed"] == expected.passed and three_d["promoted"] == expected.passed
    assert report["test"]["metrics"]["left_right_checked"] == comparison["n"]
    assert report["test"]["metrics"]["left_right_swapped"] == 0
    assert set(report["peak_rss_mb"]) == {"training", "evaluation"}
    for fold in report["folds"]:
        assert {"dice", "dice_raw", "iou_raw", "dice_model"} <= set(fold["metrics"])
    assert expected.passed, f"the 3D candidate did not pass the gate: {expected.reason}"
    assert registry.active("lung-seg").version == three_d["version"]
    serve_and_push(Path(node.settings.models_dir), tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(TRAINING_TIMEOUT)
def test_a_site_task_trains_from_its_catalogue_entry_and_recipe(node: Node, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A binary task defined only in a site's catalogue file, labelled through ``cradle labels import``,
    trains with ``cradle train toy --recipe FILE`` and is registered under its name: no code knows it."""
    site = tmp_path / "tasks.yaml"
    site.write_text(TOY)
    config = tmp_path / "cradle.yaml"
    config.write_text(yaml.safe_dump({**yaml.safe_load(node.config.read_text()), "task_catalogue": str(site)}))
    labels = write_labels(tmp_path / "toy.csv", node.synth.labels_csv)  # the bpd values, as the toy column
    labels.write_text(labels.read_text().replace("StudyInstanceUID,bpd", "StudyInstanceUID,toy", 1))
    assert main(["labels", "import", str(labels), "--config", str(config)]) == 0
    recipe = tmp_path / "toy-recipe.yaml"
    recipe.write_text(yaml.safe_dump({"task": "toy", "arch": "resnet50", "strategy": "progressive"}))
    output = io.StringIO()
    with capsys.disabled(), contextlib.redirect_stdout(output):
        assert main(["train", "toy", "--config", str(config), "--recipe", str(recipe), *BPD, *TOY_SHORTER,
                     "--json"]) == 0
    summary = json.loads(output.getvalue())
    metrics = summary["metrics"]
    print(f"toy (site task, bpd labels): AUROC {metrics['auroc_mean']:.3f} over folds, {metrics['test_auroc']:.3f} "
          f"held-out", file=sys.__stderr__)
    assert summary["version"] == "toy-1" and metrics["test_auroc"] >= 0.9
    registry = ModelRegistry(node.settings.models_dir, load_settings(config).catalogue())
    version = registry.get("toy", summary["version"])
    assert version.validated and version.provenance["recipe"]["task"] == "toy"
    assert registry.active("toy").version == summary["version"] and version.threshold is not None
    assert (Path(node.settings.models_dir) / "toy" / "reports" / summary["version"] / "roc.png").is_file()
    assert load_recipe("bpd").kind == "binary"  # the shipped catalogue does not know the toy task:
    with pytest.raises(RecipeError, match="unknown task 'toy'"):
        load_recipe("toy", recipe)
    run_site_task_end_to_end(config, tmp_path)


def _regression_labels(path: Path, source: Path) -> Path:
    """A site regression column ``toy_age`` (months) the films show: 120 with BPD, 10 per iRDS grade."""
    rows = [r for r in csv.DictReader(source.open(newline="")) if r["bpd"] != ""]
    values = [10 * int(r["irds_grade"]) + 120 * int(r["bpd"]) for r in rows]
    path.write_text("StudyInstanceUID,toy_age\n" + "".join(f"{r['StudyInstanceUID']},{v}\n"
                                                          for r, v in zip(rows, values)))
    return path


def _train_json(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    output = io.StringIO()
    with capsys.disabled(), contextlib.redirect_stdout(output):
        assert main([*args, "--json"]) == 0
    return json.loads(output.getvalue())


def test_a_regression_task_trains_reports_and_never_promotes_a_worse_mae(
        node: Node, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``kind: regression`` (a site task in months): MSE on the scaled label, MAE/RMSE/R² per fold and
    held out, scatter and Bland-Altman plots, promoted when well below the MAE of predicting the mean
    (the gate's other checks: ``test_the_mae_gate_refuses_a_learned_nothing_and_a_worse_candidate``)."""
    config = tmp_path / "cradle.yaml"
    config.write_text(yaml.safe_dump({**yaml.safe_load(node.config.read_text()),
                                      "task_catalogue": str(write_site_tasks(tmp_path))}))
    recipe = tmp_path / "toy-age.yaml"
    recipe.write_text(yaml.safe_dump({"task": "toy-age", "views": ["chest_frontal"]}))
    train = ["train", "toy-age", "--config", str(config), "--recipe", str(recipe), *BPD, *TOY_SHORTER]
    assert main(["labels", "import", str(_regression_labels(tmp_path / "age.csv", node.synth.labels_csv)),
                 "--config", str(config)]) == 0
    summary = _train_json(train, capsys)
    metrics = summary["metrics"]
    report = json.loads(Path(summary["report"]).with_name("report.json").read_text())
    print(f"toy-age (regression): MAE {metrics['mae_mean']:.1f} months over folds, {metrics['test_mae']:.1f} "
          f"held-out (predicting the mean: {report['test']['baseline_mae']:.1f}), R² {metrics['test_r2']:.2f}",
          file=sys.__stderr__)
    assert summary["promoted"] and summary["version"] == "toy-age-1", summary["reason"]
    assert metrics["test_mae"] <= 0.8 * report["test"]["baseline_mae"] and {"rmse_mean", "r2_mean"} <= set(metrics)
    assert {"scatter.png", "bland_altman.png"} <= {p.name for p in Path(summary["report"]).parent.iterdir()}
    assert not {"labels", "predictions"} & set(report["test"]) and set(report["test"]["bland_altman"]) == {
        "bias", "low", "high"}
    registry = ModelRegistry(node.settings.models_dir, load_settings(config).catalogue())
    assert registry.active("toy-age").version == "toy-age-1"


def test_the_mae_gate_refuses_a_learned_nothing_and_a_worse_candidate() -> None:
    gate = GateConfig(max_mae_ratio=0.8, max_mae=30.0)
    assert promote.gate_mae(gate, 20.0, 40.0, None, "months").passed
    floor = promote.gate_mae(gate, 35.0, 40.0, None, "months")
    assert not floor.passed and [c.name for c in floor.checks if not c.passed] == ["floor", "ceiling"]
    same = {"version": "age-1", "n": 50, "mae_active": 18.0, "mae_candidate": 18.0, "p_value": 1.0}
    assert promote.gate_mae(gate, 18.0, 40.0, same, "months").passed
    worse = promote.gate_mae(gate, 18.5, 40.0, {**same, "mae_candidate": 18.5, "p_value": 0.4}, "months")
    assert not worse.passed and "worse" in worse.reason and "age-1" in worse.reason


def run_site_task_end_to_end(config: Path, tmp_path: Path) -> None:
    """The trained toy model runs in the cxr pipeline on a new film (beside a view model that calls
    every film frontal), coded in the SR as its catalogue entry says; the SR passes dciodvfy. A copy
    of the models folder keeps the module's registry as the other tests expect it."""
    settings = load_settings(config)
    models = tmp_path / "models"
    shutil.copytree(settings.models_dir, models)
    settings = load_settings(config, models_dir=str(models))
    context = PipelineContext.from_settings(settings)
    register_active(context.registry, "view", "resnet18", {VIEWS.index("chest_frontal"): 6.0}, CXR_SPEC)
    film = synth.make_cxr(np.random.default_rng(99), modality="DX", size=128)
    output = get_pipeline("cxr").run([film], context)
    assert output.summary["tasks_run"][0] == "view" and "toy" in output.summary["tasks_run"]  # and bpd when active
    assert "toy-1" in output.model_version.split("+")
    (sr,) = output.datasets
    concepts = {(c.CodingSchemeDesignator, c.CodeValue, c.CodeMeaning) for item in _walk(sr.ContentSequence)
                for key in ("ConceptNameCodeSequence", "ConceptCodeSequence") for c in item.get(key, [])}
    assert ("99TOY", "1234567", "Toy finding concept") in concepts
    assert dciodvfy_errors(sr, tmp_path / "toy-sr.dcm") == []


# --- splits and memory --------------------------------------------------------------------------


def _samples(patients: int, seed: int = 0, prefix: str = "patient") -> list[ds.Sample]:
    """1-4 images per patient, the label fixed per patient (about 40 % positive)."""
    rng = np.random.default_rng(seed)
    samples = []
    for p in range(patients):
        label = float(rng.random() < 0.4)
        for i in range(int(rng.integers(1, 5))):
            samples.append(ds.Sample(f"1.2.{seed}.{p}.{i}", f"p{p}/{i}.dcm", f"{seed}{p}{i}", f"{prefix}-{p}",
                                     f"1.3.{seed}.{p}", f"1.4.{seed}.{p}", label))
    return samples


def _assert_patient_level(split: ds.Split) -> None:
    test_patients = {s.group for s in split.test}
    validation = [{split.dev[i].group for i in va} for _, va in split.folds]
    assert not test_patients & set().union(*validation)
    for a in range(len(validation)):
        for b in range(a + 1, len(validation)):
            assert not validation[a] & validation[b]
    for train_index, val_index in split.folds:
        assert not {split.dev[i].group for i in train_index} & {split.dev[i].group for i in val_index}
    assert sorted(i for _, va in split.folds for i in va) == list(range(len(split.dev)))


def test_no_patient_in_two_folds_or_in_train_and_test() -> None:
    samples = _samples(120)
    split = ds.split(samples, "binary", folds=5, test_fraction=0.2, salt="site", seed=3)
    _assert_patient_level(split)
    assert {int(s.label) for s in split.test} == {0, 1}
    for _, va in split.folds:  # stratified: each fold holds both classes in about the overall share
        share = np.mean([split.dev[i].label for i in va])
        assert 0.2 < share < 0.6
    # the held-out patients stay held out when the archive grows
    grown = ds.split(samples + _samples(480, seed=1, prefix="newcomer"), "binary", folds=5, test_fraction=0.2,
                     salt="site", seed=3)
    assert {s.group for s in split.test} <= {s.group for s in grown.test}


def test_no_patient_in_two_folds_on_the_archive(node: Node) -> None:
    from training.run import collect, open_context

    for task, kind in (("bpd", "binary"), ("lung-seg", "segmentation")):
        recipe = load_recipe(task, overrides=["folds=3"])
        collection = collect(open_context(node.settings, recipe))
        split = ds.split(collection.samples, kind, folds=3, test_fraction=0.2, salt="cradle", seed=0)
        _assert_patient_level(split)
        if kind == "segmentation":  # slices of one volume never straddle folds
            series = [{split.dev[i].series_uid for i in va} for _, va in split.folds]
            assert sum(len(s) for s in series) == len(set().union(*series))


MEMORY_PROBE = textwrap.dedent("""
    import json, sys, tracemalloc
    import torch
    from config.settings import load_settings
    from training import run
    from training.recipe import load_recipe

    settings = load_settings(sys.argv[1])
    recipe = load_recipe("view", overrides=["image_size=64", "batch_size=8", "init=random", "num_workers=0"])
    context = run.open_context(settings, recipe, progress=False)
    tracemalloc.start()
    collection = run.collect(context)
    dataset = run.make_dataset(context, collection, collection.samples, train=True)
    seen = 0
    for _ in range(2):  # cold cache (decode + preprocess), then warm
        loader = run.make_loader(context, dataset, train=True, generator=torch.Generator().manual_seed(0))
        for images, _targets in loader:
            seen += len(images)
    print(json.dumps({"images": seen, "peak": tracemalloc.get_traced_memory()[1]}))
""")


def _peak(root: Path, n_cxr: int) -> dict:
    from pydicom import dcmread

    from storage.archive import Archive
    from storage.db import open_index
    from storage.index import InstanceHeader
    from storage.ingest import Ingest

    root.mkdir(parents=True)
    values = _settings(root, 11112)
    config = root / "cradle.yaml"
    config.write_text(yaml.safe_dump(values))
    settings = load_settings(config)
    summary = synth.generate(root / "synth", n_cxr=n_cxr, n_mri=0, seed=5, cxr_size=512)
    archive = Archive(settings.storage.archive_dir, fsync=False)
    archive.ensure_root()
    sessions = open_index(settings.storage.database_url)
    ingest = Ingest(archive, sessions)
    for path in summary.cxr_paths:
        header = dcmread(path, stop_before_pixels=True)
        ingest.store(path.read_bytes(), InstanceHeader.from_dataset(header),
                     transfer_syntax_uid=str(header.file_meta.TransferSyntaxUID))
    sessions.kw["bind"].dispose()
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(config)], cwd=REPOSITORY,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_archive(tmp_path: Path) -> None:
    small = _peak(tmp_path / "small", 12)
    large = _peak(tmp_path / "large", 60)
    print(f"dataset iteration peak (tracemalloc, cold then warm cache): {small['peak'] / 1e6:.2f} MB with 12 "
          f"radiographs archived, {large['peak'] / 1e6:.2f} MB with 60", file=sys.__stderr__)
    assert large["images"] >= 4 * small["images"]
    assert large["peak"] <= 1.2 * small["peak"] + 256 * 1024


# --- strategies ---------------------------------------------------------------------------------


def test_strategy_stages_say_what_trains_at_which_rate() -> None:
    n = 6  # resnet18: stem, layer1-4, fc
    progressive = StrategyConfig("progressive", layer_decay=0.5, unfreeze_every=2)
    for epoch in range(12):
        stage = stage_at(progressive, epoch, n)
        unfrozen = 1 + epoch // 2
        assert stage.trainable == tuple([False] * max(n - unfrozen, 0) + [True] * min(unfrozen, n))
        assert stage.lr_scale == tuple(0.5 ** d for d in range(n - 1, -1, -1))
    lp_ft = StrategyConfig("lp_ft", layer_decay=0.8, lp_epochs=3, ft_lr_scale=0.1)
    assert stage_at(lp_ft, 2, n).trainable == (False,) * 5 + (True,)
    assert stage_at(lp_ft, 2, n).lr_scale == (1.0,) * n
    assert stage_at(lp_ft, 3, n).trainable == (True,) * n
    assert stage_at(lp_ft, 3, n).lr_scale == pytest.approx(tuple(0.1 * 0.8 ** d for d in range(n - 1, -1, -1)))
    assert stage_at(StrategyConfig("linear_probe"), 7, n).trainable == (False,) * 5 + (True,)
    assert stage_at(StrategyConfig("full", layer_decay=0.9), 0, n).lr_scale[0] == pytest.approx(0.9 ** 5)


def _tiny_loaders(n: int = 24, size: int = 32, seed: int = 0) -> tuple[DataLoader, DataLoader, torch.Generator]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=generator)
    y = (x.mean(dim=(1, 2, 3)) > x.mean()).float()
    train_loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=generator, drop_last=True)
    val_loader = DataLoader(TensorDataset(x[:16], y[:16]), batch_size=8)
    return train_loader, val_loader, generator


def _trainer(overrides: list[str]) -> Trainer:
    recipe = load_recipe("bpd", overrides=["arch=resnet18", "image_size=32", "epochs=6", "early_stopping_patience=0",
                                           "init=auto", "cutmix_prob=0", *overrides])  # the Trainer takes a built model
    return Trainer(recipe, BinaryObjective(), torch.device("cpu"), progress=False)


def test_trainer_freezes_and_decays_learning_rates_as_the_strategy_says(tmp_path: Path) -> None:
    trainer = _trainer(["strategy=progressive", "lp_epochs=0", "layer_decay=0.5", "unfreeze_every=1", "lr=1e-3",
                        "schedule=constant", "optimizer=adamw", "weight_decay=1e-2"])
    seed_everything(0)
    model = create_model("resnet18", "bpd")
    groups = layer_groups(model)
    before = copy.deepcopy(model.state_dict())
    train_loader, val_loader, generator = _tiny_loaders()
    trainer.epochs = 2  # stage 0: only the head; stage 1: head + layer4
    trainer.fit(model, train_loader, val_loader, FoldPaths.in_dir(tmp_path, 0), 0, generator)
    after = torch.load(tmp_path / "fold-0.ckpt", weights_only=True)["model"]
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    frozen = {n for g in groups[:4] for n in g}
    assert not changed & {n for n in before if n.split(".")[0] in ("conv1", "bn1", "layer1", "layer2", "layer3")}
    assert not frozen & changed
    assert any(n.startswith("fc.") for n in changed) and any(n.startswith("layer4.") for n in changed)
    # frozen batch norms keep their running statistics
    assert torch.equal(before["layer1.0.bn1.running_mean"], after["layer1.0.bn1.running_mean"])
    history = json.loads(json.dumps(torch.load(tmp_path / "fold-0.ckpt", weights_only=True)["state"]["history"]))
    stages = torch.load(tmp_path / "fold-0.ckpt", weights_only=True)["state"]["stages"]
    assert stages[0]["trainable"] == [False] * 5 + [True]
    assert stages[1]["trainable"] == [False] * 4 + [True, True]
    for record in history:
        rates = {int(k): v for k, v in record["lr"].items()}
        assert rates == pytest.approx({g: 1e-3 * 0.5 ** (5 - g) for g in range(6)})


def _rates(config: ScheduleConfig, scales: tuple[float, ...] = (0.5, 1.0)) -> LearningRates:
    """Learning rates (lr 1e-2) on a two-group optimizer, at ``scales``."""
    layer = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD([{"params": [layer.weight], "layer_group": 0},
                                 {"params": [layer.bias], "layer_group": 1}], lr=1.0)
    return LearningRates(optimizer, 1e-2, Stage((True, True), scales), config)


def _factors(rates: LearningRates, steps: int) -> list[float]:
    """The schedule's factor before each of ``steps`` optimizer steps."""
    factors = []
    for _ in range(steps):
        factors.append(rates.factor())
        rates.optimizer.step()
        rates.after_step()
    return factors


def test_warmup_poly_and_plateau_schedules() -> None:
    poly = _factors(_rates(ScheduleConfig("warmup_poly", total_steps=100, warmup_steps=10, power=1.0)), 102)
    assert [poly[s] for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert [poly[s] for s in (10, 55, 100, 101)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    # a stage change (linear probing → fine-tuning) rescales the groups where the schedule stands
    rates = _rates(ScheduleConfig("warmup_poly", total_steps=100, warmup_steps=10, power=1.0), (1.0, 1.0))
    _factors(rates, 55)
    rates.begin_epoch(Stage((True, True), (0.01, 0.1)))
    assert [g["lr"] for g in rates.optimizer.param_groups] == pytest.approx([0.5e-4, 0.5e-3])
    plateau = _rates(ScheduleConfig("plateau", total_steps=0, plateau_factor=0.1, plateau_patience=1, mode="min"))
    for value in (1.0, 0.9, 0.95, float("nan"), 0.95):
        plateau.end_epoch(value)
    assert plateau.factor() == pytest.approx(0.1)
    assert [g["lr"] for g in plateau.optimizer.param_groups] == pytest.approx([0.5e-3, 1e-3])
    early = EarlyStopping(patience=2)
    assert [early.update(e, v) for e, v in enumerate((0.6, 0.7, 0.65, 0.69))] == [True, True, False, False]
    assert early.should_stop and early.best_epoch == 1


def test_cutmix_mixes_images_and_targets_by_area() -> None:
    np.random.seed(0)  # timm's Mixup draws from numpy's global generator (seeded per fold)
    for count in (8, 8, 9, 9):  # timm mixes an even number of images: the odd one out stays as it is
        images = torch.cat([torch.zeros(count // 2, 1, 32, 32), torch.ones(count - count // 2, 1, 32, 32)])
        targets = torch.tensor([0.0] * (count // 2) + [1.0] * (count - count // 2))
        mixed, mixed_targets = cutmix(1.0, 1.0, 1, binary=True)(images.clone(), targets)
        # an image's mean is the share of ones in it, which is its target by area
        assert mixed_targets.shape == targets.shape
        assert torch.allclose(mixed_targets, mixed.mean(dim=(1, 2, 3)), atol=1e-6)
        assert ((mixed_targets > 0) & (mixed_targets < 1)).any()
        assert count % 2 == 0 or mixed_targets[-1] == 1.0
    classes = torch.tensor([0, 2, 1, 2])
    mixed, soft = cutmix(1.0, 1.0, 3, binary=False)(torch.rand(4, 1, 16, 16), classes)
    assert soft.shape == (4, 3) and torch.allclose(soft.sum(dim=1), torch.ones(4))
    assert torch.equal(cutmix(0.0, 1.0, 3, binary=False)(torch.rand(4, 1, 8, 8), classes)[1],
                       torch.nn.functional.one_hot(classes, 3).float())  # never applied: plain one-hot


class PowerCut(Exception):
    pass


class CrashingLoader:
    """A loader whose ``crash_in``-th pass (0-based) stops half-way, like a machine losing power."""

    def __init__(self, loader: DataLoader, crash_in: int | None) -> None:
        self.loader, self.crash_in, self.passes = loader, crash_in, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        crashing = self.passes == self.crash_in
        self.passes += 1
        for step, batch in enumerate(self.loader):
            if crashing and step == 1:
                raise PowerCut
            yield batch


def test_resumed_training_equals_uninterrupted_training(tmp_path: Path) -> None:
    def run(directory: Path, crash_in: int | None) -> dict[str, torch.Tensor]:
        trainer = _trainer(["strategy=lp_ft", "lp_epochs=1", "epochs=3", "lr=1e-3", "optimizer=adam",
                            "schedule=warmup_poly", "warmup_epochs=1"])
        paths = FoldPaths.in_dir(directory, 0)
        if crash_in is not None:
            seed_everything(0)
            model = create_model("resnet18", "bpd")
            train_loader, val_loader, generator = _tiny_loaders()
            with pytest.raises(PowerCut):
                trainer.fit(model, CrashingLoader(train_loader, crash_in), val_loader, paths, 0, generator)
            seed_everything(123)  # a new process: nothing carried over in memory
        else:
            seed_everything(0)
        model = create_model("resnet18", "bpd")
        train_loader, val_loader, generator = _tiny_loaders()
        trainer.fit(model, train_loader, val_loader, paths, 0, generator)
        return torch.load(paths.checkpoint, weights_only=True)["model"]

    straight = run(tmp_path / "a", None)
    again = run(tmp_path / "b", None)
    resumed = run(tmp_path / "c", 2)  # the third epoch dies; the checkpoint of the second survives
    assert all(torch.equal(straight[k], again[k]) for k in straight)  # deterministic with a seed
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)  # resume = no interruption


# --- evaluation and the gate --------------------------------------------------------------------


def _naive_delong(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    def components(s: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        pos, neg = s[y == 1], s[y == 0]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        return psi.mean(), psi.mean(axis=1), psi.mean(axis=0)

    (auc_a, a10, a01), (auc_b, b10, b01) = components(a), components(b)
    m, n = (y == 1).sum(), (y == 0).sum()
    s = np.cov(np.vstack([a10, b10])) / m + np.cov(np.vstack([a01, b01])) / n
    return (auc_a - auc_b) / np.sqrt(s[0, 0] + s[1, 1] - 2 * s[0, 1])


def test_fast_delong_matches_the_definition_and_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    a = y + rng.normal(0, 1, 300)
    b = np.round(y + rng.normal(0, 1.6, 300), 1)  # ties
    result = ev.delong_test(y, a, b)
    assert result.auc_a == pytest.approx(roc_auc_score(y, a))
    assert result.auc_b == pytest.approx(roc_auc_score(y, b))
    assert result.z == pytest.approx(_naive_delong(y, a, b))
    assert 0 < result.p_value < 0.05 and result.p_a_lower > 0.95
    assert ev.delong_test(y, a, a).p_value == pytest.approx(1.0)


def test_calibration_threshold_and_bootstrap() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    logits = 3.0 * (2 * y - 1) + rng.normal(0, 2.5, 400)
    overconfident = 4 * logits
    temperature = ev.fit_temperature(y, overconfident)
    assert 2.5 < temperature < 6
    assert ev.expected_calibration_error(y, ev.sigmoid(overconfident / temperature)) < \
        ev.expected_calibration_error(y, ev.sigmoid(overconfident))
    threshold = ev.threshold_for_sensitivity(y, ev.sigmoid(logits), 0.9)
    assert ev.binary_metrics(y, ev.sigmoid(logits), threshold)["sensitivity"] >= 0.9
    groups = np.array([f"p{i // 2}" for i in range(400)])
    interval = ev.bootstrap_ci(y, logits, ev.auroc, resamples=200, groups=groups)
    assert interval.low < interval.estimate < interval.high
    overlap = ev.dice_iou(np.eye(4), np.eye(4) + np.eye(4, k=1))
    assert overlap == pytest.approx((2 * 4 / 11, 4 / 7))


def test_gate_floor_delong_and_dice() -> None:
    gate = GateConfig(min_auroc=0.7, max_auroc_drop=0.0, delong_alpha=0.05)
    assert promote.gate_auroc(gate, 0.52, None).passed is False
    assert promote.gate_auroc(gate, 0.91, None).passed is True
    worse = {"version": "bpd-1", "n": 80, "auc_active": 0.93, "auc_candidate": 0.85, "p_value": 0.01,
             "p_candidate_lower": 0.005}
    decision = promote.gate_auroc(gate, 0.85, worse)
    assert not decision.passed and "significantly lower" in decision.reason
    slightly = {**worse, "auc_candidate": 0.92, "p_value": 0.7, "p_candidate_lower": 0.35}
    assert not promote.gate_auroc(gate, 0.92, slightly).passed
    assert promote.gate_auroc(gate.model_copy(update={"max_auroc_drop": 0.02}), 0.92, slightly).passed
    better = {**worse, "auc_candidate": 0.95, "p_value": 0.3, "p_candidate_lower": 0.85}
    assert promote.gate_auroc(gate, 0.95, better).passed
    assert not promote.gate_auroc(gate.model_copy(update={"require_significant": True}), 0.95, better).passed
    dice = {"version": "lung-seg-1", "n": 3, "dice_active": 0.9, "dice_candidate": 0.88}
    assert not promote.gate_dice(gate, 0.88, dice).passed
    assert promote.gate_dice(gate, 0.92, {**dice, "dice_candidate": 0.92}).passed


# --- recipes, initialisation, queue -------------------------------------------------------------


def test_recipes_and_overrides() -> None:
    for task in ("bpd", "pneumonia", "view", "lung-seg"):
        recipe = load_recipe(task)
        for key in ("arch", "image_size", "epochs", "batch_size", "folds", "strategy", "lr", "seed", "init"):
            assert getattr(recipe, key) is not None
    assert load_recipe("bpd").strategy == "progressive" and load_recipe("bpd").cutmix_prob > 0
    assert load_recipe("view").arch == "inception_v3" and load_recipe("view").class_balanced
    recipe = load_recipe("bpd", overrides=["gate.min_auroc=0.8", "augment={hflip: 0.5}", "views=[]", "lr=3e-4"])
    assert recipe.gate.min_auroc == 0.8 and recipe.gate.delong_alpha == 0.05
    assert recipe.augment.hflip == 0.5 and recipe.augment.rotate_degrees == 10  # merged into the YAML's
    assert recipe.views == [] and recipe.lr == 3e-4
    with pytest.raises(RecipeError, match="gat: unknown key"):
        load_recipe("bpd", overrides=["gat.min_auroc=1"])
    with pytest.raises(RecipeError, match="divisible by 32"):
        load_recipe("lung-seg", overrides=["image_size=100"])
    assert load_recipe("bpd").digest() == load_recipe("bpd", overrides=["num_workers=4"]).digest()
    assert load_recipe("bpd").digest() != load_recipe("bpd", overrides=["seed=1"]).digest()


def test_view_model_initialises_downstream_backbones() -> None:
    view = create_model("resnet18", "view", num_classes=7).state_dict()
    bpd = create_model("resnet18", "bpd")
    loaded, total = transfer_weights(bpd, view, whole=False)
    assert loaded == total > 100
    assert all(torch.equal(bpd.state_dict()[k], view[k]) for k in view if not k.startswith("fc."))
    assert not torch.equal(bpd.state_dict()["fc.weight"], view["fc.weight"][:1])  # the head stays new
    unet = create_model("flexible_unet_resnet18", "lung-seg")
    loaded, _ = transfer_weights(unet, view, whole=False)
    assert loaded > 100  # the U-Net's ResNet-18 encoder takes the view model's layers
    assert torch.equal(unet.state_dict()["encoder.layer3.0.conv1.weight"], view["layer3.0.conv1.weight"])
    assert "fc.weight" not in backbone_names(bpd)


@pytest.mark.slow
@pytest.mark.timeout(TRAINING_TIMEOUT)
def test_queued_run_reaches_the_training_queue_and_runs_on_a_worker(node: Node, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """``cradle train --queue`` puts the run on the ``training`` queue; ``cradle worker --queue training``,
    a real process on the same broker, trains it and registers the version."""
    from training.tasks import TRAINING_QUEUE

    tiny = ["--set", "arch=resnet18", "--set", "image_size=32", "--set", "epochs=1", "--set", "folds=2",
            "--set", "bootstrap=0", "--set", "batch_size=32"]
    registry = ModelRegistry(node.settings.models_dir)
    before = {v.version for v in registry.versions("view")}
    capsys.readouterr()
    assert main(["train", "view", "--config", str(node.config), *tiny, "--queue", "--json"]) == 0
    queued = json.loads(capsys.readouterr().out)
    assert queued["queued"] and queued["queue"] == TRAINING_QUEUE
    assert {v.version for v in registry.versions("view")} == before  # nothing trained here

    log = tmp_path / "worker.log"
    with log.open("wb") as output:
        worker = subprocess.Popen([sys.executable, "-m", "cradle.cli", "worker", "--config", str(node.config),
                                   "--queue", TRAINING_QUEUE], cwd=REPOSITORY, stdout=output,
                                  stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and {v.version for v in registry.versions("view")} == before:
            assert worker.poll() is None, log.read_text()[-3000:]
            time.sleep(1)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=120)
    new = [v for v in registry.versions("view") if v.version not in before]
    assert len(new) == 1, log.read_text()[-3000:]
    assert new[0].provenance["recipe"]["image_size"] == 32 and "auroc_mean" in new[0].metrics
    assert f"training run view: version {new[0].version}" in log.read_text()


# --- starting from weights: a site's checkpoint file, the in-domain view model -------------------------


def _timm_checkpoint(arch: str = "resnet18", in_chans: int = 3) -> dict[str, torch.Tensor]:
    """A state dict as timm/torchvision save an ImageNet model: 3 input channels, 1000 classes."""
    seed_everything(0)
    return create_model(arch, "bpd", num_classes=1000, in_chans=in_chans).state_dict()


def test_a_checkpoint_file_in_timm_torchvision_or_hub_layout_starts_the_backbone(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from training.initialise import checkpoint_file, read_checkpoint

    source = _timm_checkpoint()
    timm_file = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in source.items()}, timm_file)
    torchvision_file = tmp_path / "resnet18.pth"  # wrapped, with DataParallel's prefix
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.items()}, "epoch": 90}, torchvision_file)
    hub = tmp_path / "models--timm--resnet18.a1_in1k" / "snapshots" / "0123abc"
    hub.mkdir(parents=True)
    shutil.copy(timm_file, hub / "model.safetensors")
    stem = source["conv1.weight"].sum(dim=1, keepdim=True)  # timm's adapt_input_conv for 1 channel
    for path in (timm_file, torchvision_file, checkpoint_file(tmp_path / "models--timm--resnet18.a1_in1k")):
        model = create_model("resnet18", "bpd")
        state, report, reading = read_checkpoint(path, model)
        model.load_state_dict(state, strict=False)
        assert report.adapted == ["conv1.weight"] and not report.missing
        assert set(report.unused) == {"fc.weight", "fc.bias"}  # the ImageNet head is replaced by the task's
        assert torch.allclose(model.state_dict()["conv1.weight"], stem)
        assert torch.equal(model.state_dict()["layer4.1.conv2.weight"], source["layer4.1.conv2.weight"])
        assert model.state_dict()["fc.weight"].shape == (1, 512)
    assert "'module.' prefix" in read_checkpoint(torchvision_file, create_model("resnet18", "bpd"))[2]
    unet = create_model("flexible_unet_resnet18", "lung-seg")  # the U-Net's encoder takes a ResNet checkpoint
    state, report, _ = read_checkpoint(timm_file, unet)
    assert report.loaded and not report.missing and "encoder.conv1.weight" in report.adapted
    other = tmp_path / "other.safetensors"
    save_file({"transformer.h.0.attn.weight": torch.zeros(4, 4)}, other)
    with pytest.raises(RecipeError, match="no tensor of other.safetensors fits"):
        read_checkpoint(other, create_model("resnet18", "bpd"))


def test_a_freezing_strategy_from_random_weights_is_refused(tmp_path: Path) -> None:
    for strategy in ("progressive", "linear_probe", "lp_ft"):
        with pytest.raises(RecipeError, match="head would learn on random features"):
            load_recipe("bpd", overrides=[f"strategy={strategy}", "init=random", "lp_epochs=1"])
    assert load_recipe("bpd", overrides=["strategy=full", "init=random"]).strategy == "full"
    config = tmp_path / "cradle.yaml"
    config.write_text(yaml.safe_dump(_settings(tmp_path, free_port())))
    assert main(["train", "bpd", "--config", str(config), "--set", "init=random", "--json"]) == 1


def _own_models(node: Node, tmp_path: Path) -> Path:
    """A config on the module's archive and index with its own models and runs folders."""
    values = yaml.safe_load(node.config.read_text())
    values["models_dir"] = str(tmp_path / "models")
    values["training"] = {**values["training"], "runs_dir": str(tmp_path / "runs")}
    config = tmp_path / "cradle.yaml"
    config.write_text(yaml.safe_dump(values))
    return config


def _train_with(config: Path, task: str, sets: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    output = io.StringIO()
    with capsys.disabled(), contextlib.redirect_stdout(output):
        assert main(["train", task, "--config", str(config), *sets, "--json"]) == 0
    return json.loads(output.getvalue())


def _set(*pairs: str) -> list[str]:
    return [item for pair in pairs for item in ("--set", pair)]


@pytest.mark.slow
@pytest.mark.timeout(TRAINING_TIMEOUT)
def test_init_auto_and_view_name_what_is_missing(node: Node, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    config = _own_models(node, tmp_path)
    settings = load_settings(config)
    register_active(ModelRegistry(settings.models_dir), "view", "resnet18", {VIEWS.index("chest_frontal"): 6.0},
                    CXR_SPEC)
    capsys.readouterr()
    # init=view with no view model of resnet10t: an error naming the architectures there are
    assert main(["train", "bpd", "--config", str(config), *BPD, *_set("init=view"), "--json"]) == 1
    error = capsys.readouterr().err
    assert "no view model of resnet10t" in error and "view has models of resnet18" in error
    # init: auto with a freezing strategy and no view model of the architecture: random, so refused
    assert main(["train", "bpd", "--config", str(config), *BPD, *_set("init=auto", "strategy=progressive"),
                 "--json"]) == 1
    error = capsys.readouterr().err
    assert "training from random weights" in error and "head would learn on random features" in error


@pytest.mark.slow
@pytest.mark.timeout(TRAINING_TIMEOUT)
def test_a_site_checkpoint_in_timm_or_torchvision_layout_starts_a_run(node: Node, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A "pretrained" checkpoint made by a short run, saved as timm (safetensors) and as torchvision
    (a wrapped .pth, 3-channel stem) would save it, starts ``cradle train bpd --set init=FILE``: its
    file and sha256 are in the summary and the provenance; a short run from it beats one from random."""
    from safetensors.torch import save_file

    from inference.registry.weights import sha256_of_file

    config = _own_models(node, tmp_path)
    registry = ModelRegistry(load_settings(config).models_dir)
    short = _set("epochs=2", "min_epochs=2", "folds=2", "bootstrap=0")
    # the same split: the pretraining run never saw the held-out test patients either
    pretrain = _train_with(config, "bpd", [*BPD, *_set("epochs=3", "min_epochs=3", "folds=2", "bootstrap=0")], capsys)
    weights = {k: v.contiguous() for k, v in registry.load(registry.get("bpd", pretrain["version"])).state_dict().items()}
    timm_file = tmp_path / "resnet10t-site.safetensors"
    save_file(weights, timm_file)
    from_file = _train_with(config, "bpd", [*BPD, *short, *_set(f"init={timm_file}")], capsys)
    assert pretrain["init"] == "random"
    assert from_file["init"] == {"file": timm_file.name, "sha256": sha256_of_file(timm_file)}
    assert from_file["init_transfer"]["loaded"] == from_file["init_transfer"]["wanted"] > 50
    version = registry.get("bpd", from_file["version"])
    assert version.provenance["init"] == from_file["init"]
    report = (Path(registry.models_dir) / "bpd" / "reports" / from_file["version"] / "report.md").read_text()
    assert timm_file.name in report and "tensors loaded" in report
    print(f"bpd, 2 epochs, 2 folds from a site checkpoint: held-out AUROC {from_file['metrics']['test_auroc']:.3f} "
          f"(the 3-epoch run it came from: {pretrain['metrics']['test_auroc']:.3f})", file=sys.__stderr__)
    assert from_file["metrics"]["test_auroc"] >= 0.8

    rgb = dict(weights)  # torchvision style: a 3-channel stem (each channel a third), wrapped, prefixed
    rgb["conv1.0.weight"] = weights["conv1.0.weight"].repeat(1, 3, 1, 1) / 3
    torchvision_file = tmp_path / "resnet10t-site.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in rgb.items()}}, torchvision_file)
    from_rgb = _train_with(config, "bpd", [*BPD, *_set("epochs=1", "min_epochs=1", "folds=2", "bootstrap=0",
                                                       f"init={torchvision_file}")], capsys)
    assert from_rgb["init"] == {"file": torchvision_file.name, "sha256": sha256_of_file(torchvision_file)}
    assert from_rgb["init_transfer"]["adapted"] == 1
    print(f"bpd, 1 epoch from the torchvision-layout copy: held-out AUROC {from_rgb['metrics']['test_auroc']:.3f}",
          file=sys.__stderr__)  # one epoch is noisy: what is tested is that the 3-channel stem loads
