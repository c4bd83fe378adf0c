"""Training throughput of cradle's loop over a bare PyTorch loop, same model, same batches, same run.

    python -m benchmarks.train_throughput [--arch resnet18] [--size 128] [--batch 16] [--steps 8]
                                          [--rounds 5] [--threads 2] [--json]

*ours*: ``training.engine.train_epoch`` as the Trainer calls it, with everything it does per step:
the schedule's per-step learning-rate update (torch's warm-up + polynomial decay schedulers over the
strategy's layer groups), the recipe's optimizer (fused Adam with per-group weight decay),
channels-last memory format, the objective's loss, and the end-of-epoch loss. *bare*: ``zero_grad / model(x) / loss / backward /
step`` over the same in-memory batches, on an identical copy of the model with the same optimizer
and memory format, so the ratio measures the loop, not a choice of kernels. A second bare loop with
PyTorch's defaults (for-each Adam, contiguous NCHW) shows what the recipe's defaults buy.

Every *ours* run sits between two *bare* runs, after a warm-up round; the ratio (target ≥ 0.9) is
the median over rounds of ours over the mean of the two bare runs around it, so that drifting load
from other processes stays out of the comparison.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

from inference.models import create_model
from training.engine import make_optimizer, make_schedule, memory_format_of, train_epoch
from training.kinds import BinaryObjective
from training.recipe import load_recipe
from training.strategies import layer_groups, parameter_groups, stage_at

TARGET = 0.9


def make_batches(steps: int, batch: int, size: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.rand(batch, 1, size, size, generator=generator),
             torch.randint(0, 2, (batch,), generator=generator).float()) for _ in range(steps)]


def ours(model: torch.nn.Module, recipe, batches: list) -> Callable[[], float]:  # noqa: ANN001 - Recipe
    groups = layer_groups(model)
    fmt = memory_format_of(recipe)
    model.to(memory_format=fmt)
    optimizer = make_optimizer(recipe, parameter_groups(model, groups, recipe.weight_decay))
    rates = make_schedule(recipe, optimizer, stage_at(recipe.strategy_config(), 0, len(groups)), len(batches), "max")
    objective = BinaryObjective()

    def run() -> float:
        model.train()
        started = time.perf_counter()
        train_epoch(model, batches, optimizer, objective.loss, torch.device("cpu"), after_step=rates.after_step,
                    memory_format=fmt)
        return time.perf_counter() - started

    return run


def bare(model: torch.nn.Module, batches: list, *, fused: bool, channels_last: bool,
         weight_decay: float, lr: float) -> Callable[[], float]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=fused or None)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def run() -> float:
        model.train()
        started = time.perf_counter()
        for images, targets in batches:
            images = images.to(memory_format=fmt)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(images)[:, 0], targets)
            loss.backward()
            optimizer.step()
        return time.perf_counter() - started

    return run


def measure(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    recipe = load_recipe("bpd", overrides=[f"arch={args.arch}", f"image_size={args.size}", "optimizer=adamw",
                                            "weight_decay=1e-4", "schedule=warmup_poly", "warmup_epochs=1",
                                            "strategy=full", "layer_decay=0.8", "init=random"])
    batches = make_batches(args.steps, args.batch, args.size)
    base = create_model(args.arch, "bpd")
    ours_run = ours(copy.deepcopy(base), recipe, batches)
    bare_run = bare(copy.deepcopy(base), batches, fused=True, channels_last=recipe.channels_last,
                    weight_decay=recipe.weight_decay, lr=recipe.lr)
    default_run = bare(copy.deepcopy(base), batches, fused=False, channels_last=False,
                       weight_decay=recipe.weight_decay, lr=recipe.lr)
    for run in (bare_run, ours_run, default_run):  # warm-up: allocator, kernels, optimizer state
        run()
    rounds = []
    previous = bare_run()
    for _ in range(args.rounds):
        mine = ours_run()
        following = bare_run()
        defaults = default_run()
        rounds.append({"ours": mine, "bare": (previous + following) / 2, "bare_defaults": defaults})
        previous = following
    images = args.steps * args.batch
    ratio = statistics.median(images / r["ours"] / (images / r["bare"]) for r in rounds)
    return {
        "arch": args.arch, "image_size": args.size, "batch": args.batch, "steps": args.steps,
        "threads": args.threads, "rounds": len(rounds),
        "ours_images_per_second": statistics.median(images / r["ours"] for r in rounds),
        "bare_images_per_second": statistics.median(images / r["bare"] for r in rounds),
        "bare_defaults_images_per_second": statistics.median(images / r["bare_defaults"] for r in rounds),
        "ratio": ratio, "target": TARGET, "passed": ratio >= TARGET,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = measure(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['arch']} {result['image_size']} px, batch {result['batch']}, {result['threads']} threads: "
              f"ours {result['ours_images_per_second']:.1f} img/s, bare {result['bare_images_per_second']:.1f} img/s, "
              f"bare with PyTorch defaults {result['bare_defaults_images_per_second']:.1f} img/s")
        print(f"ratio ours/bare = {result['ratio']:.3f} (target >= {TARGET}) "
              f"{'PASS' if result['passed'] else 'FAIL'}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
