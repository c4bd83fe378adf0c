"""The learning-rate schedule a recipe asks for, and the warning when its warm-up cannot end."""

from __future__ import annotations

import logging

import pytest

from training.engine import make_schedule
from training.recipe import load_recipe


def test_a_warmup_as_long_as_the_run_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    """config/train/view.yaml warms up for 5 epochs: a shorter run would never train at its lr."""
    short = load_recipe("view", overrides=["epochs=4"])
    with caplog.at_level(logging.WARNING, logger="training.engine"):
        schedule = make_schedule(short, steps_per_epoch=10, mode="max")
    assert schedule.factor(39) < 1.0  # the last step of the run is still warming up
    assert [r.getMessage() for r in caplog.records] == [
        "warmup_epochs 5 >= epochs 4: the learning rate never reaches lr 0.0001 (set warmup_epochs below "
        "epochs, or schedule=constant)"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="training.engine"):
        schedule = make_schedule(load_recipe("view", overrides=["epochs=6"]), steps_per_epoch=10, mode="max")
    assert schedule.factor(49) == pytest.approx(1.0) and caplog.records == []
