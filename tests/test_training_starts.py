"""Where training starts and what the shipped recipes do from there: ``init: auto``'s order (view model
of the architecture, the site checkpoint of it, random with a warning), the BPD recipe's stages (linear
probing, then progressive unfreezing with discriminative learning rates, CutMix throughout), and every
shipped recipe at its real architecture learning from the start it is meant for."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from config.settings import load_settings
from conftest import free_port
from cradle.cli import main
from inference.models import create_model
from inference.registry import ModelRegistry
from test_pipelines import CXR_SPEC, VIEWS, register_active
from training.augment import Augment
from training.engine import FoldPaths, Trainer, seed_everything
from training.kinds import BinaryObjective
from training.recipe import RecipeError, load_recipe
from training.run import for_random_start, initial_state, open_context
from training.strategies import layer_groups, stage_at
from training_archive import Node, _settings, site_checkpoint

TRAINING_TIMEOUT = 2400
BARE_EPOCHS = 6
"""Epochs of the bare loop that makes a test's "pretrained" checkpoint."""


def _imagenet_checkpoint(path: Path, arch: str) -> Path:
    """A state dict as timm saves an ImageNet model (3 input channels, 1000 classes), as safetensors."""
    seed_everything(0)
    state = create_model(arch, "bpd", num_classes=1000, in_chans=3).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


# --- init: auto ---------------------------------------------------------------------------------------


def test_init_auto_takes_the_view_model_then_the_site_checkpoint_then_random(tmp_path: Path) -> None:
    checkpoint = _imagenet_checkpoint(tmp_path / "resnet18.a1_in1k.safetensors", "resnet18")
    values = _settings(tmp_path, free_port())
    values["training"]["checkpoints"] = {"resnet18": str(checkpoint), "resnet34": str(tmp_path / "gone.pth")}
    settings = load_settings(None, **values)
    said: list[str] = []

    def start(task: str, *sets: str):
        recipe = load_recipe(task, overrides=["init=auto", *sets])
        return initial_state(open_context(settings, recipe, progress=False, say=said.append))

    bpd = start("bpd", "arch=resnet18")  # no view model yet: the site checkpoint of resnet18
    assert bpd.source["file"] == checkpoint.name and bpd.source["from"] == "auto: training.checkpoints.resnet18"
    assert len(bpd.source["sha256"]) == 64 and not bpd.warnings
    assert bpd.transfer["loaded"] == bpd.transfer["wanted"] and bpd.transfer["adapted"] == 1
    unet = start("lung-seg", "arch=flexible_unet_resnet18", "image_size=64")  # its encoder's ResNet
    assert unet.source["file"] == checkpoint.name and unet.state["encoder.layer4.1.conv2.weight"] is not None

    other = start("bpd", "arch=resnet10t", "strategy=full")  # nothing of resnet10t: random, warned
    assert other.random and len(other.warnings) == 1
    assert "no view model of resnet10t" in other.warnings[0] and "training.checkpoints" in other.warnings[0]
    assert any(line.startswith("warning: init: auto") for line in said)
    with pytest.raises(RecipeError, match="checkpoint not found"):
        start("bpd", "arch=resnet34")

    register_active(ModelRegistry(settings.models_dir), "view", "resnet18", {VIEWS.index("chest_frontal"): 6.0},
                    CXR_SPEC)
    first = start("bpd", "arch=resnet18")  # the in-domain view model of resnet18 comes first
    assert first.source == "view-1" and first.transfer["loaded"] == first.transfer["wanted"]


def test_a_random_start_trains_every_layer_at_lr_and_refuses_freezing(tmp_path: Path) -> None:
    """The BPD recipe's discriminative rates (layer_decay 0.5) are for a pretrained start: from random
    weights they would leave ResNet's stem at lr/32. They are dropped, with a warning; freezing is refused."""
    settings = load_settings(None, **_settings(tmp_path, free_port()))
    said: list[str] = []
    recipe = load_recipe("bpd", overrides=["arch=resnet18", "init=auto", "strategy=full"])
    assert recipe.layer_decay == 0.5
    ctx = open_context(settings, recipe, progress=False, say=said.append)
    start = initial_state(ctx)  # nothing of resnet18: random
    assert start.random and len(start.warnings) == 1
    random_ctx = for_random_start(ctx, start)
    assert random_ctx.recipe.layer_decay == 1.0 and random_ctx.recipe.kind == "binary"
    assert ctx.recipe.layer_decay == 0.5  # the caller's recipe is left as it was
    assert len(start.warnings) == 2 and "layer_decay 0.5" in start.warnings[1]
    assert said[-1].startswith("warning: layer_decay 0.5")
    n = len(layer_groups(create_model("resnet18", "bpd")))
    assert stage_at(random_ctx.recipe.strategy_config(), 0, n).lr_scale == (1.0,) * n
    flat = load_recipe("bpd", overrides=["arch=resnet18", "init=auto", "strategy=full", "layer_decay=1"])
    flat_ctx = open_context(settings, flat, progress=False)
    assert for_random_start(flat_ctx, initial_state(flat_ctx)) is flat_ctx  # nothing to drop, nothing said
    frozen = open_context(settings, load_recipe("bpd", overrides=["arch=resnet18", "init=auto"]), progress=False)
    with pytest.raises(RecipeError, match="strategy progressive freezes the backbone"):
        for_random_start(frozen, initial_state(frozen))


# --- the BPD recipe: linear probing, then progressive unfreezing, CutMix throughout --------------------


def test_the_shipped_bpd_recipe_probes_then_unfreezes_from_the_top_at_discriminative_rates() -> None:
    recipe = load_recipe("bpd")
    assert (recipe.arch, recipe.strategy, recipe.init) == ("resnet50", "progressive", "auto")
    n = len(layer_groups(create_model(recipe.arch, "bpd")))
    assert n == 6  # stem, layer1-4, fc
    stages = [stage_at(recipe.strategy_config(), epoch, n) for epoch in range(recipe.epochs)]
    # epochs 1-3 linear probing (the head alone), then layer4, layer3, ... one more every 2 epochs
    assert [sum(s.trainable) for s in stages[:13]] == [1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]
    for stage in stages:
        assert stage.trainable == tuple(sorted(stage.trainable))  # always a top block: frozen below, trained above
        assert stage.lr_scale == (0.5 ** 5, 0.5 ** 4, 0.5 ** 3, 0.25, 0.5, 1.0)
    assert recipe.cutmix_prob == 0.5 and recipe.cutmix_alpha == 1.0
    # the paper's augmentation is CutMix: per-image augmentation leaves the texture (the signal) as it is
    image = torch.rand(1, 64, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(Augment(recipe.augment)(image), image)


class _Counting(BinaryObjective):
    """The binary objective, counting the batches its CutMix sees and those it mixed."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bool] = []

    def mixer(self, prob: float, alpha: float):
        mix = super().mixer(prob, alpha)

        def counted(images: torch.Tensor, targets: torch.Tensor):
            images, mixed = mix(images, targets)
            self.seen.append(bool(((mixed > 0) & (mixed < 1)).any()))
            return images, mixed

        return counted


def test_the_bpd_recipe_trains_the_head_alone_first_then_more_with_cutmix_in_every_stage(tmp_path: Path) -> None:
    recipe = load_recipe("bpd", overrides=["arch=resnet18", "image_size=32", "epochs=5", "early_stopping_patience=0",
                                           "schedule=constant", "cutmix_prob=1.0", "precise_bn_batches=0"])
    objective = _Counting()
    trainer = Trainer(recipe, objective, torch.device("cpu"), progress=False)
    seed_everything(0)
    model = create_model("resnet18", "bpd")
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(24, 1, 32, 32, generator=generator)
    y = (x.mean(dim=(1, 2, 3)) > x.mean()).float()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True,
                                         generator=generator)
    trainer.fit(model, loader, loader, FoldPaths.in_dir(tmp_path, 0), 0, generator)
    saved = torch.load(tmp_path / "fold-0.ckpt", weights_only=True)["state"]
    assert [sum(s["trainable"]) for s in saved["stages"]] == [1, 1, 1, 2, 2]
    for record in saved["history"]:
        rates = {int(k): v for k, v in record["lr"].items()}
        assert rates == pytest.approx({g: 1e-4 * 0.5 ** (5 - g) for g in range(6)})
    assert len(objective.seen) == 5 * len(loader) and all(objective.seen)  # every batch of every stage mixed


# --- every shipped recipe at its real architecture, from the start it is meant for ---------------------
# Small inputs, two folds, two or three epochs: the shipped recipes with only size and length made small.
# Measured on 2 loaded CPU cores: see each test's docstring. The pneumonia recipe (RegNetY-064 from a site
# checkpoint) is trained once for all the children's tests: tests/test_training_children.py (PLAN).


def _config(node: Node, tmp_path: Path, **training: object) -> Path:
    """A config on the shared archive and index with its own models and runs folders."""
    values = yaml.safe_load(node.config.read_text())
    values["models_dir"] = str(tmp_path / "models")
    values["training"] = {**values["training"], "runs_dir": str(tmp_path / "runs"), **training}
    config = tmp_path / "cradle.yaml"
    config.write_text(yaml.safe_dump(values))
    return config


def _train(config: Path, task: str, sets: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    output = io.StringIO()
    started = time.monotonic()
    with capsys.disabled(), contextlib.redirect_stdout(output):
        assert main(["train", task, "--config", str(config), *[a for s in sets for a in ("--set", s)], "--json"]) == 0
    summary = json.loads(output.getvalue())
    metrics = summary["metrics"]
    shown = {k: round(v, 3) for k, v in metrics.items() if k in ("auroc_mean", "test_auroc", "balanced_accuracy_mean",
                                                                  "dice_mean", "test_dice")}
    print(f"{task} ({summary['init'] if isinstance(summary['init'], str) else summary['init']['file']}): {shown} "
          f"in {time.monotonic() - started:.0f} s", file=sys.__stderr__)
    return summary


@pytest.mark.slow
@pytest.mark.timeout(TRAINING_TIMEOUT)
def test_view_recipe_inception_v3_learns_the_views_from_random(training_archive: Node, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """InceptionV3 takes 75 px at the least (smaller inputs leave nothing for its last 3x3 convolutions).
    Measured: balanced accuracy 0.343 over the 7 views (chance 0.14), held-out macro AUROC 0.75 (the folds'
    0.61: two epochs on half the development films each)."""
    config = _config(training_archive, tmp_path)
    summary = _train(config, "view", ["image_size=75", "epochs=2", "folds=2", "lr=1e-3", "warmup_epochs=0",
                                      "bootstrap=0"], capsys)
    assert summary["init"] == "random"
    metrics = summary["metrics"]
    assert metrics["balanced_accuracy_mean"] >= 2 / 7  # twice chance over the 7 views
    assert metrics["test_auroc"] >= 0.65  # held-out patients, macro over the views
    assert ModelRegistry(load_settings(config).models_dir).get("view", summary["version"]).arch == "inception_v3"


@pytest.mark.slow
@pytest.mark.timeout(TRAINING_TIMEOUT)
def test_bpd_recipe_resnet50_learns_from_a_site_checkpoint_through_init_auto(
        training_archive: Node, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """ResNet-50 as shipped: init: auto finds the site's chest-film checkpoint (no view model of resnet50),
    linear probing, then progressive unfreezing with discriminative rates, CutMix."""
    checkpoint = site_checkpoint(training_archive, "bpd", "resnet50", 64, BARE_EPOCHS, tmp_path / "resnet50.safetensors")
    config = _config(training_archive, tmp_path, checkpoints={"resnet50": str(checkpoint)})
    summary = _train(config, "bpd", ["image_size=64", "epochs=3", "lp_epochs=1", "unfreeze_every=1", "folds=2",
                                     "warmup_epochs=0", "bootstrap=0"], capsys)
    assert summary["init"]["file"] == checkpoint.name and summary["init"]["from"].endswith("checkpoints.resnet50")
    assert summary["init_transfer"]["adapted"] == 1 and summary["init_transfer"]["missing"] == 0
    version = ModelRegistry(load_settings(config).models_dir).get("bpd", summary["version"])
    assert (version.arch, version.provenance["recipe"]["strategy"]) == ("resnet50", "progressive")
    assert summary["metrics"]["test_auroc"] >= 0.75  # held-out patients: unseen by the checkpoint too


@pytest.mark.slow
@pytest.mark.timeout(TRAINING_TIMEOUT)
def test_lung_seg_recipe_flexible_unet_resnet50_learns_from_random(
        training_archive: Node, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The FlexibleUNet with its ResNet-50 encoder, as shipped (init: random), at 32 px, 2 epochs."""
    config = _config(training_archive, tmp_path)
    summary = _train(config, "lung-seg", ["image_size=32", "epochs=2", "folds=2", "bootstrap=0"], capsys)
    assert ModelRegistry(load_settings(config).models_dir).get("lung-seg", summary["version"]).arch \
        == "flexible_unet_resnet50"
    assert summary["metrics"]["test_dice"] >= 0.6
