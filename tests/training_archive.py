"""The synthetic archive the training tests share: radiographs and MR series pushed over C-STORE to a
real listener, labels imported with ``cradle labels import`` (built once a session, tests/conftest.py)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from config.settings import Settings, load_settings
from conftest import free_port, require
from training import synth


@dataclass
class Node:
    settings: Settings
    config: Path
    synth: synth.SynthSummary
    root: Path


def _settings(root: Path, port: int) -> dict:
    return {
        "node": {"ae_title": "CRADLE", "host": "127.0.0.1", "port": port, "allowed_calling_aets": ["STORESCU"]},
        "storage": {"archive_dir": str(root / "archive"), "database_url": f"sqlite:///{root / 'cradle.db'}",
                    "fsync": False},
        "queue": {"broker_url": f"sqla+sqlite:///{root / 'broker.db'}"},
        "models_dir": str(root / "models"),
        "training": {"runs_dir": str(root / "runs"), "cache_dir": str(root / "cache")},
        "completion": {"quiet_seconds": 60},
    }


def push(settings: Settings, files: list[Path]) -> None:
    """Send ``files`` with DCMTK's storescu to a running listener (``-R``: only the contexts needed)."""
    command = [require("storescu"), "-aet", "STORESCU", "-aec", "CRADLE", "-R", "127.0.0.1",
               str(settings.node.port), *map(str, files)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def build_archive(root: Path) -> Node:
    """300 radiographs (225 labelled neonatal frontal chests) and 8 MR series with reviewer SEGs,
    received by the listener over C-STORE; labels imported from the generator's CSV."""
    from cradle.cli import main
    from node.server import Listener

    values = _settings(root, free_port())
    config = root / "cradle.yaml"
    config.write_text(yaml.safe_dump(values))
    settings = load_settings(config)
    summary = synth.generate(root / "synth", n_cxr=300, n_mri=8, seed=0, cxr_size=128, mri_shape=(16, 64, 64))
    files = [*summary.cxr_paths, *sorted(p for d in summary.mri_series_dirs for p in d.glob("*.dcm")),
             *summary.seg_paths]
    with Listener(settings, enqueue=lambda _job: None):
        push(settings, files)
    assert main(["labels", "import", str(summary.labels_csv), "--config", str(config)]) == 0
    return Node(settings, config, summary, root)


CHILDREN = {"n_pediatric_cxr": 240, "n_extremity": 300, "n_hand": 240}
"""The children's films of :func:`build_children_archive`: pediatric chests (80 normal, 80 bacterial, 80
viral), limb films (150 with a fracture, 150 without) and 240 hand/wrist films (bone age). Measured: with
120 limb films even a bare loop at 96 px stayed below AUROC 0.65; at 128 px (the films' own size) and 300
films `cradle train fracture` reached 0.93. With 120 hands bone age stayed near predicting the mean."""


def build_children_archive(root: Path) -> Node:
    """Children's films (:data:`CHILDREN`, 128 px) beside 40 neonatal-feed radiographs (day-1 chests whose
    pneumonia column says 0/1, adults, other views), received by the listener over C-STORE; labels
    imported from the generator's CSV."""
    from cradle.cli import main
    from node.server import Listener

    values = _settings(root, free_port())
    config = root / "cradle.yaml"
    config.write_text(yaml.safe_dump(values))
    settings = load_settings(config)
    summary = synth.generate(root / "synth", n_cxr=40, n_mri=0, seed=2, cxr_size=128, **CHILDREN)
    with Listener(settings, enqueue=lambda _job: None):
        push(settings, [*summary.cxr_paths, *summary.pediatric_paths])
    assert main(["labels", "import", str(summary.labels_csv), "--config", str(config)]) == 0
    return Node(settings, config, summary, root)


def site_checkpoint(node: Node, task: str, arch: str, size: int, epochs: int, path: Path,
                    num_classes: int = 1) -> Path:
    """A checkpoint "pretrained on chest films" for ``arch``: the bare loop of benchmarks/train_quality.py
    on the task's development patients only (the held-out test patients stay unseen), saved as timm saves
    a model (safetensors, 3-channel stem, as an ImageNet checkpoint has it)."""
    from safetensors.torch import save_file

    from benchmarks.train_quality import bare_fit, preprocessed
    from training import datasets as ds
    from training.recipe import load_recipe
    from training.run import collect, open_context

    recipe = load_recipe(task, overrides=[f"arch={arch}", f"image_size={size}", "strategy=full", "init=random"])
    ctx = open_context(node.settings, recipe, progress=False)
    collection = collect(ctx)
    split = ds.split(collection.samples, recipe.kind, folds=2, test_fraction=recipe.test_fraction,
                     salt=recipe.split_salt, seed=recipe.seed)
    _, model = bare_fit(arch, preprocessed(ctx, collection, split.dev), None, epochs, 1e-3, 0, task=task,
                        num_classes=num_classes)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    stem = next(k for k, v in state.items() if v.ndim == 4)
    state[stem] = state[stem].repeat(1, 3, 1, 1) / 3  # an RGB stem, summed back to 1 channel on loading
    save_file(state, path)
    return path
