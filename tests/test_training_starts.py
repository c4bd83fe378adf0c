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
from training.engine import FoldPaths, Trainer, seed_everything
from training.kinds import BinaryObjective
from training.recipe import RecipeError, load_recipe
from training.run import initial_state, open_context
from training.strategies import layer_groups, stage_at
from training_archive import Node, _settings

TRAINING_TIMEOUT = 2400


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
