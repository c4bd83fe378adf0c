"""Issue 15: lung MRI in 3D. The 3D recipe and its checks, volume errors; and what the end-to-end test
in test_training.py (``test_3d_candidate_gated_against_2d_then_serves_seg_and_sr``, on its synthetic
archive) uses: the small 3D settings, the figures it prints, and ``cradle serve`` receiving an MR series
from storescu and sending SEG + SR to a destination."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from sqlalchemy import select

from benchmarks.latency import write_config
from conftest import free_port, require
from cradle.demo import PACS_AE, Pacs
from storage.db import open_index
from storage.models import Job
from test_end_to_end import SEG_STORAGE, SR_STORAGE, dciodvfy_errors, wait_for
from training import synth
from training.kinds import shipped
from training.recipe import RecipeError, load_recipe

# A 3D U-Net of 4-8-16-32 filters on the 16 × 64 × 64 series, the patch the whole series, at most 12 epochs.
# Measured under load (2 cores shared by 5 engineers): about 20 s an epoch; fold Dice 0.92 at epoch 10.
LUNG_3D = ["--set", "dims=3", "--set", "arch=dynunet3d_tiny", "--set", "image_size=64", "--set",
           "patch_size=[16,64,64]", "--set", "patches_per_volume=4", "--set", "epochs=12", "--set", "min_epochs=10",
           "--set", "early_stopping_patience=2", "--set", "folds=2", "--set", "batch_size=2", "--set", "lr=1e-2",
           "--set", "bootstrap=200", "--set", "gate.max_dice_drop=0.05"]


def test_dims3_recipe_has_its_own_defaults_and_checks() -> None:
    recipe = load_recipe("lung-seg", overrides=["dims=3"])
    assert (recipe.dims, recipe.arch, recipe.patch_size) == (3, "dynunet3d", (32, 128, 128))
    assert load_recipe("lung-seg").dims == 2 and load_recipe("lung-seg").arch == "flexible_unet_resnet50"
    for overrides, message in ((["dims=3", "arch=flexible_unet_resnet18"], "is 2D but dims=3"),
                               (["dims=3", "patch_size=[15,64,64]"], "divisible by [2, 8, 8]"),
                               (["arch=dynunet3d"], "is 3D but dims=2")):
        with pytest.raises(RecipeError, match=re.escape(message)):
            load_recipe("lung-seg", overrides=overrides)
    with pytest.raises(RecipeError, match="dims=3 is for segmentation"):
        load_recipe("bpd", overrides=["dims=3"])


def test_volume_errors_follow_bland_altman() -> None:
    def outcome(predicted: float, reference: float) -> shipped.VolumeOutcome:
        return shipped.VolumeOutcome("1.2.3", 0.9, 0.9, 0.8, 0.8, 0.9, {"left": predicted, "right": 10.0},
                                     {"left": reference, "right": 10.0}, {"left": 0.9, "right": 0.9}, False, 0.1)

    errors = shipped.volume_errors([outcome(12.0, 10.0), outcome(10.0, 10.0), outcome(11.0, 12.0)])
    differences = np.array([2.0, 0.0, -1.0])
    sd = differences.std(ddof=1)
    assert errors["left"]["bias_ml"] == pytest.approx(1 / 3)
    assert errors["left"]["limits_ml"] == pytest.approx([1 / 3 - 1.96 * sd, 1 / 3 + 1.96 * sd])
    assert errors["left"]["mae_ml"] == pytest.approx(1.0)
    assert errors["right"]["bias_ml"] == 0.0


def print_figures(two_d: dict, three_d: dict, report: dict) -> None:
    comparison = report["comparisons"]["active"]
    lines = [f"2D {two_d['version']}: test Dice {two_d['metrics']['test_dice']:.3f} post-processed, "
             f"{two_d['metrics']['test_dice_raw']:.3f} raw; peak RSS {two_d['peak_rss_mb']} MB; {two_d['seconds']} s",
             f"3D {three_d['version']}: test Dice {three_d['metrics']['test_dice']:.3f} post-processed, "
             f"{three_d['metrics']['test_dice_raw']:.3f} raw; peak RSS {three_d['peak_rss_mb']} MB; "
             f"{three_d['seconds']} s; {three_d['reason']}"]
    for uid, values in comparison["per_volume"].items():
        lines.append(f"  {uid[-12:]}: 2D raw {values['active_raw']:.3f} post {values['active']:.3f} | "
                     f"3D raw {values['candidate_raw']:.3f} post {values['candidate']:.3f}")
    for row in report["test"]["volumes"]:
        lines.append(f"  {row['series_uid'][-12:]} 3D volumes mL: left {row['predicted_ml']['left']:.2f} "
                     f"(ref {row['reference_ml']['left']:.2f}), right {row['predicted_ml']['right']:.2f} "
                     f"(ref {row['reference_ml']['right']:.2f}); {row['seconds']:.2f} s")
    lines.append(f"  3D volume error: {json.dumps(report['test']['metrics']['volume_error'])}")
    print("\n".join(lines), file=sys.__stderr__)


def serve_and_push(models_dir: Path, tmp_path: Path) -> None:
    """``cradle serve`` on the trained models; a new MR series by storescu; SEG + SR at the destination."""
    node_port, pacs_port = free_port(), free_port()
    config = write_config(tmp_path / "serve", node_port, pacs_port, quiet_seconds=2, destination_ae=PACS_AE,
                          models_dir=models_dir)
    series = synth.generate(tmp_path / "synth", n_cxr=0, n_mri=1, seed=11, mri_shape=(20, 64, 64))
    files = sorted(series.mri_series_dirs[0].glob("*.dcm"))
    pacs = Pacs(tmp_path / "pacs", pacs_port)
    pacs.start()
    serve = subprocess.Popen([sys.executable, "-m", "cradle.cli", "serve", "--config", str(config)],
                             stdout=subprocess.DEVNULL, stderr=open(tmp_path / "serve.log", "w"))
    try:
        assert wait_for(lambda: subprocess.run([require("echoscu"), "-aet", "MODALITY", "-aec", "CRADLE",
                                                "127.0.0.1", str(node_port)], capture_output=True).returncode == 0, 90)
        sent = subprocess.run([require("storescu"), "-aet", "MODALITY", "-aec", "CRADLE", "127.0.0.1",
                               str(node_port), *map(str, files)], capture_output=True, text=True)
        assert sent.returncode == 0, sent.stderr[-2000:]
        classes = lambda: {dcmread(p, stop_before_pixels=True).SOPClassUID for p in pacs.received}  # noqa: E731
        assert wait_for(lambda: {SEG_STORAGE, SR_STORAGE} <= classes(), 240), \
            (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        serve.terminate()
        serve.wait(timeout=90)
        pacs.stop()
    for path in pacs.received:
        assert dciodvfy_errors(path) == [], path.name
    with open_index(f"sqlite:///{tmp_path / 'serve' / 'c.db'}")() as session:
        summary = session.scalar(select(Job)).result["summary"]
    assert summary["dims"] == 3 and summary["slices"] == len(files) and summary["peak_rss_mb"] > 0
    assert summary["volumes_ml"]["left"] > 0 and summary["volumes_ml"]["right"] > 0
    print(f"3D served: {len(files)} slices, forward {summary['forward_seconds']} s, stages "
          f"{summary['stage_seconds']}, worker peak RSS {summary['peak_rss_mb']} MB", file=sys.__stderr__)


def test_the_lung_pipeline_runs_a_3d_version_to_seg_and_sr(tmp_path: Path) -> None:
    """A registered 3D version (sliding window) through the same pipeline: SEG and volume SR, dciodvfy-clean.
    Its output bias makes every voxel lung, so the pipeline's split decides the two lungs."""
    from config.settings import load_settings
    from inference.models import create_model
    from inference.pipelines import PipelineContext, get_pipeline
    from inference.registry import InputSpec, ModelCache, ModelRegistry
    from test_pipelines import dciodvfy_errors as dataset_errors
    from training.synth import make_mr_series

    settings = load_settings(None, models_dir=str(tmp_path / "models"))
    registry = ModelRegistry(settings.models_dir)
    state = create_model("dynunet3d_tiny", "lung-seg").state_dict()
    state["output_block.conv.conv.bias"][0] = 8.0
    spec = InputSpec(image_size=32, patch=(8, 32, 32))
    version = registry.register("lung-seg", "dynunet3d_tiny", state, input_spec=spec)
    registry.activate("lung-seg", version.version, accept_unvalidated=True, reason="test weights")
    series, _ = make_mr_series(np.random.default_rng(5), shape=(12, 48, 48))
    context = PipelineContext(registry=registry, device="cpu", settings=settings, models=ModelCache())
    output = get_pipeline("lung-mri").run(series, context)
    seg, sr = output.datasets
    assert seg.NumberOfFrames == 2 * len(series)
    assert output.summary["dims"] == 3 and output.summary["peak_rss_mb"] > 0
    volumes = output.summary["volumes_ml"]
    assert volumes["left"] > 0 and volumes["right"] > 0
    for ds, name in ((seg, "seg.dcm"), (sr, "sr.dcm")):
        assert dataset_errors(ds, tmp_path / name) == []
    with pytest.raises(Exception, match="sliding-window patch"):
        registry.register("lung-seg", "dynunet3d_tiny", state, input_spec=InputSpec(image_size=32))


def test_training_patches_are_drawn_on_lung_and_background_equally_and_repeat(tmp_path: Path) -> None:
    """What the 3D recipe trains on: ``patches_per_volume`` patches of ``patch_size`` from each whole series
    (MONAI's RandCropByPosNegLabeld, pos=neg=1), padded when the series is smaller, repeatable by seed."""
    import hashlib

    import torch

    from inference.registry import InputSpec
    from training import datasets as ds

    archive = synth.generate(tmp_path / "mr", n_cxr=0, n_mri=1, seed=4, mri_shape=(12, 48, 48))
    root, series_dir, seg = archive.outdir, archive.mri_series_dirs[0], archive.seg_paths[0]
    files = sorted(series_dir.glob("*.dcm"), key=lambda p: int(dcmread(p, stop_before_pixels=True).InstanceNumber))
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    volume = ds.Volume(series_dir.name, tuple((dcmread(p, stop_before_pixels=True).SOPInstanceUID,
                                               str(p.relative_to(root)), sha(p)) for p in files),
                       str(seg.relative_to(root)), sha(seg), (1, 2))
    cache = ds.PreprocessCache(tmp_path / "cache", InputSpec(image_size=32))
    patches = ds.VolumeDataset([volume], root, cache, patch=(8, 16, 16), patches=40)
    image, mask = patches.arrays(volume)
    assert image.shape == mask.shape == (12, 32, 32) and 0 < mask.mean() < 0.5

    def draw(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        torch.manual_seed(seed)
        return [patches[i] for i in range(len(patches))]

    first = draw(0)
    assert len(first) == 40 and {tuple(x.shape) for pair in first for x in pair} == {(1, 8, 16, 16)}
    centred_on_lung = sum(bool(m[0, 4, 8, 8] > 0) for _, m in first)  # a positive draw centres on lung
    assert 10 <= centred_on_lung <= 30
    assert all(torch.equal(a, b) for pair_a, pair_b in zip(first, draw(0)) for a, b in zip(pair_a, pair_b))
    padded = ds.VolumeDataset([volume], root, cache, patch=(16, 32, 32), patches=1)
    assert tuple(padded[0][0].shape) == (1, 16, 32, 32)  # 12 slices padded to the patch's 16
