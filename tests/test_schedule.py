"""The learning-rate schedule a recipe asks for, and the warning when its warm-up cannot end."""

from __future__ import annotations

import logging

import pytest
import torch

from training.engine import make_schedule
from training.recipe import load_recipe
from training.strategies import LearningRates, Stage


def _schedule(recipe, steps_per_epoch: int) -> LearningRates:  # noqa: ANN001 - a Recipe
    layer = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD([{"params": layer.parameters(), "layer_group": 0}], lr=recipe.lr)
    return make_schedule(recipe, optimizer, Stage((True,), (1.0,)), steps_per_epoch=steps_per_epoch, mode="max")


def _factor_at(rates: LearningRates, step: int) -> float:
    for _ in range(step):
        rates.optimizer.step()
        rates.after_step()
    return rates.factor()


def test_a_warmup_as_long_as_the_run_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    """config/train/view.yaml warms up for 5 epochs: a shorter run would never train at its lr."""
    short = load_recipe("view", overrides=["epochs=4"])
    with caplog.at_level(logging.WARNING, logger="training.engine"):
        schedule = _schedule(short, steps_per_epoch=10)
    assert _factor_at(schedule, 39) < 1.0  # the last step of the run is still warming up
    assert [r.getMessage() for r in caplog.records] == [
        "warmup_epochs 5 >= epochs 4: the learning rate never reaches lr 0.0001 (set warmup_epochs below "
        "epochs, or schedule=constant)"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="training.engine"):
        schedule = _schedule(load_recipe("view", overrides=["epochs=6"]), steps_per_epoch=10)
    assert _factor_at(schedule, 49) == pytest.approx(1.0) and caplog.records == []
