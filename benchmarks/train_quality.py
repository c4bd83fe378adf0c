"""Training quality: ``cradle train`` against a bare PyTorch loop on the same films and folds, and three starts.

    python -m benchmarks.train_quality [--arch resnet18] [--size 64] [--epochs 10] [--folds 3]
                                       [--films 300] [--threads 2] [--json]

A synthetic archive of day-1 films with a learnable BPD texture (``training.synth``) is pushed over
C-STORE to a listener and its labels imported, as a site would. Then, on the BPD task:

1. *ratio*: ``cradle train bpd`` (from random weights, ``strategy=full``, AdamW at the bare loop's learning
   rate for every layer (``layer_decay=1``: the recipe's discriminative rates are for a pretrained start), a
   constant schedule, no CutMix, no early stopping; everything else the recipe's: augmentation, batch-norm
   re-estimation)
   against a bare loop (``model(x) / BCE / backward / AdamW.step``, no augmentation) with the same
   architecture, input size, epochs, batch size and optimiser, on the same preprocessed images and the same
   cross-validation folds (``training.datasets.split``). Each reports the mean over folds of the validation
   AUROC at its best epoch. Target: ratio >= 0.98.
2. *starts*: the BPD recipe (its strategy: linear probing, then progressive unfreezing, CutMix) from
   the view model of the same architecture (``cradle train view --set arch=ARCH`` on the archive's own
   headers, then ``init=view``) and from a site checkpoint (a bare loop on *other* films of the same kind,
   saved as a timm safetensors file and named in ``training.checkpoints`` for ``init: auto``), beside the
   random start (which the recipe's freezing strategy refuses: ``strategy=full``). Cross-validated and
   held-out AUROC.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file
from sklearn.metrics import roc_auc_score

from config.settings import Settings, load_settings
from inference.models import create_model
from training import datasets as ds
from training import synth
from training.engine import seed_everything
from training.recipe import load_recipe
from training.run import collect, open_context, run_training

TARGET = 0.98


# --- a node with a labelled archive --------------------------------------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_node(root: Path, films: int, seed: int) -> Settings:
    """``films`` synthetic radiographs (about 3/4 labelled day-1 frontal chests) pushed with DCMTK's
    storescu to a listener, labels imported with ``cradle labels import``."""
    from cradle.cli import main
    from node.server import Listener

    root.mkdir(parents=True)
    values = {"node": {"ae_title": "CRADLE", "host": "127.0.0.1", "port": _free_port(),
                       "allowed_calling_aets": ["STORESCU"]},
              "storage": {"archive_dir": str(root / "archive"), "database_url": f"sqlite:///{root / 'cradle.db'}",
                          "fsync": False},
              "queue": {"broker_url": f"sqla+sqlite:///{root / 'broker.db'}"},
              "models_dir": str(root / "models"),
              "training": {"runs_dir": str(root / "runs"), "cache_dir": str(root / "cache")},
              "completion": {"quiet_seconds": 60}}
    config = root / "cradle.yaml"
    config.write_text(yaml.safe_dump(values))
    settings = load_settings(config)
    summary = synth.generate(root / "synth", n_cxr=films, n_mri=0, seed=seed, cxr_size=128)
    storescu = shutil.which("storescu")
    if storescu is None:
        raise SystemExit("storescu (DCMTK) is needed to push the archive")
    with Listener(settings, enqueue=lambda _job: None):
        subprocess.run([storescu, "-aet", "STORESCU", "-aec", "CRADLE", "-R", "127.0.0.1", str(settings.node.port),
                        *map(str, summary.cxr_paths)], check=True, capture_output=True, timeout=900)
    with contextlib.redirect_stdout(io.StringIO()):
        imported = main(["labels", "import", str(summary.labels_csv), "--config", str(config)])
    if imported != 0:
        raise SystemExit("cradle labels import failed")
    return settings


# --- the two loops -------------------------------------------------------------------------------------

def common(args: argparse.Namespace) -> list[str]:
    """What ``cradle train`` and the bare loop share."""
    return [f"arch={args.arch}", f"image_size={args.size}", f"epochs={args.epochs}", f"folds={args.folds}",
            "batch_size=16", "optimizer=adamw", f"lr={args.lr}", "layer_decay=1", "weight_decay=1e-4", "bootstrap=200"]


def cradle_train(settings: Settings, task: str, overrides: list[str]) -> dict[str, Any]:
    recipe = load_recipe(task, overrides=overrides, catalogue=settings.catalogue())
    started = time.monotonic()
    summary = run_training(settings, recipe, progress=False)
    summary["wall_seconds"] = time.monotonic() - started
    print(f"cradle train {task} {' '.join(overrides)}: CV AUROC {summary['metrics'].get('auroc_mean', float('nan')):.3f}"
          f", held-out {summary['metrics'].get('test_auroc', float('nan')):.3f} ({summary['wall_seconds']:.0f} s)",
          file=sys.stderr, flush=True)
    return summary


def preprocessed(ctx, collection: ds.Collection, samples: list[ds.Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = ctx.kind.dataset(ctx, collection, samples, train=False)  # cradle's preprocessing, no augmentation
    images, targets = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images), torch.stack(targets).float()


def bare_fit(arch: str, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor] | None,
             epochs: int, lr: float, seed: int, *, task: str = "bpd",
             num_classes: int = 1) -> tuple[float, torch.nn.Module]:
    """The 30-line loop: AdamW, shuffled batches of 16, BCE on one output (a binary task) or cross-entropy
    over ``num_classes`` (a multiclass task, targets the class indices); the best validation AUROC over
    the epochs (one-vs-rest macro for several classes; NaN without validation data) and the model after
    the last epoch."""
    seed_everything(seed)
    model = create_model(arch, task, num_classes=num_classes, in_chans=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    best = float("nan")
    for _ in range(epochs):
        model.train()
        for index in torch.randperm(len(train[0]), generator=generator).split(16):
            if len(index) < 2:
                continue  # batch norm needs two
            optimizer.zero_grad()
            logits, targets = model(train[0][index]), train[1][index]
            loss = (F.binary_cross_entropy_with_logits(logits[:, 0], targets) if num_classes == 1
                    else F.cross_entropy(logits, targets.long()))
            loss.backward()
            optimizer.step()
        if val is not None:
            best = np.nanmax([best, _auroc(model, val, num_classes)])
    return best, model


def _auroc(model: torch.nn.Module, val: tuple[torch.Tensor, torch.Tensor], num_classes: int) -> float:
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(chunk) for chunk in val[0].split(64)])
    if num_classes == 1:
        return roc_auc_score(val[1].numpy(), logits[:, 0].numpy())
    return roc_auc_score(val[1].long().numpy(), logits.softmax(dim=1).numpy(), multi_class="ovr")


def bare_cross_validate(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """The bare loop on the folds ``cradle train`` uses (same recipe split settings, same images)."""
    recipe = load_recipe("bpd", overrides=[*common(args), "strategy=full", "init=random"])
    ctx = open_context(settings, recipe, progress=False)
    collection = collect(ctx)
    split = ds.split(collection.samples, recipe.kind, folds=recipe.folds, test_fraction=recipe.test_fraction,
                     salt=recipe.split_salt, seed=recipe.seed)
    started, aurocs = time.monotonic(), []
    for k, (train_index, val_index) in enumerate(split.folds):
        train = preprocessed(ctx, collection, [split.dev[i] for i in train_index])
        val = preprocessed(ctx, collection, [split.dev[i] for i in val_index])
        aurocs.append(bare_fit(args.arch, train, val, args.epochs, args.lr, recipe.seed + k)[0])
        print(f"bare loop, fold {k + 1}: AUROC {aurocs[-1]:.3f}", file=sys.stderr, flush=True)
    return {"auroc_mean": float(np.mean(aurocs)), "folds": aurocs, "wall_seconds": time.monotonic() - started,
            "labelled": {"development": len(split.dev), "test": len(split.test)}}


def site_checkpoint(settings: Settings, args: argparse.Namespace, path: Path) -> Path:
    """A checkpoint "pretrained on similar films": the bare loop on every labelled film of another
    archive, saved as timm saves a model (safetensors, the head included: it is replaced on loading)."""
    recipe = load_recipe("bpd", overrides=[*common(args), "strategy=full", "init=random"])
    ctx = open_context(settings, recipe, progress=False)
    collection = collect(ctx)
    _, model = bare_fit(args.arch, preprocessed(ctx, collection, collection.samples), None, args.epochs, args.lr, 0)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, path)
    return path


# --- the measurement -----------------------------------------------------------------------------------

def _row(start: str, summary: dict[str, Any]) -> dict[str, Any]:
    metrics = summary["metrics"]
    return {"start": start, "init": summary["init"], "auroc_mean": metrics["auroc_mean"],
            "auroc_std": metrics["auroc_std"], "test_auroc": metrics["test_auroc"],
            "seconds": round(summary["wall_seconds"], 1)}


def starts(settings: Settings, root: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The BPD recipe as shipped (only architecture, size and length made small) from three starts."""
    small = [f"arch={args.arch}", f"image_size={args.size}", f"epochs={args.epochs}", f"folds={args.folds}",
             "bootstrap=200"]
    rows = [_row("random (strategy=full: the recipe's freezing refuses a random start)",
                 cradle_train(settings, "bpd", [*small, "init=random", "strategy=full"]))]
    other = build_node(root / "other-films", args.films, args.seed + 1)
    checkpoint = site_checkpoint(other, args, root / f"{args.arch}-site.safetensors")
    values = yaml.safe_load(Path(root / "node" / "cradle.yaml").read_text())
    values["training"]["checkpoints"] = {args.arch: str(checkpoint)}
    (root / "node" / "site.yaml").write_text(yaml.safe_dump(values))
    with_checkpoint = load_settings(root / "node" / "site.yaml")
    rows.append(_row("site checkpoint (init: auto -> training.checkpoints)",
                     cradle_train(with_checkpoint, "bpd", [*small, "init=auto"])))
    view = cradle_train(settings, "view", [f"arch={args.arch}", f"image_size={args.size}", f"epochs={args.epochs}",
                                           "folds=2", "lr=1e-3", "warmup_epochs=1", "bootstrap=0"])
    row = _row("view-pretrained (cradle train view, then init=view)",
               cradle_train(settings, "bpd", [*small, "init=view"]))
    row["view_model"] = {"version": view["version"], "balanced_accuracy_mean": view["metrics"].get(
        "balanced_accuracy_mean"), "seconds": round(view["wall_seconds"], 1)}
    rows.append(row)
    return rows


def measure(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="train-quality-") as tmp:
        root = Path(tmp)
        started = time.monotonic()
        settings = build_node(root / "node", args.films, args.seed)
        built = time.monotonic() - started
        ours = cradle_train(settings, "bpd", [*common(args), "strategy=full", "init=random", "schedule=constant",
                                              "early_stopping_patience=0", "cutmix_prob=0"])
        bare = bare_cross_validate(settings, args)
        ratio = ours["metrics"]["auroc_mean"] / bare["auroc_mean"]
        table = [] if args.no_starts else starts(settings, root, args)
    return {"arch": args.arch, "image_size": args.size, "epochs": args.epochs, "folds": args.folds,
            "films": args.films, "labelled": bare["labelled"],
            "archive_seconds": round(built, 1),
            "cradle": {"auroc_mean": ours["metrics"]["auroc_mean"], "test_auroc": ours["metrics"]["test_auroc"],
                       "seconds": round(ours["wall_seconds"], 1)},
            "bare": {"auroc_mean": bare["auroc_mean"], "folds": bare["folds"],
                     "seconds": round(bare["wall_seconds"], 1)},
            "ratio": ratio, "target": TARGET, "passed": ratio >= TARGET, "starts": table}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--films", type=int, default=300,
                        help="radiographs in the archive (about 3/4 labelled; at 160 the bare loop itself is near chance)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of the ratio's two loops")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-starts", action="store_true", help="only the ratio")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = measure(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0 if result["passed"] else 1
    print(f"bpd, {result['arch']} at {result['image_size']} px, {result['epochs']} epochs, {result['folds']} folds, "
          f"{result['films']} films ({result['labelled']['development']} labelled for development, "
          f"{result['labelled']['test']} held out; archive built in {result['archive_seconds']:.0f} s)")
    print(f"cross-validated AUROC: cradle train {result['cradle']['auroc_mean']:.3f} "
          f"({result['cradle']['seconds']:.0f} s), bare loop {result['bare']['auroc_mean']:.3f} "
          f"({result['bare']['seconds']:.0f} s)")
    print(f"ratio cradle/bare = {result['ratio']:.3f} (target >= {TARGET}) {'PASS' if result['passed'] else 'FAIL'}")
    if result["starts"]:
        print("\nthe BPD recipe (as shipped, only architecture, size and length made small) from three starts:")
        print(f"{'start':<72} {'CV AUROC':>14} {'held-out':>9} {'seconds':>8}")
        for row in result["starts"]:
            print(f"{row['start']:<72} {row['auroc_mean']:.3f} ± {row['auroc_std']:.3f} {row['test_auroc']:>9.3f} "
                  f"{row['seconds']:>8.0f}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
