"""``cradle labels import``, ``cradle train``, ``cradle synth``: the training side of the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from config.settings import Settings

EXIT_FAILURE = 1
EXIT_REJECTED = 3
"""``labels import``: the file was read but rows were rejected; nothing was applied."""


def _err(message: str) -> None:
    print(message, file=sys.stderr)


def labels_import(args: argparse.Namespace, settings: Settings) -> int:
    """Validate the whole CSV, then apply it in one transaction, or report every rejected row."""
    from storage.db import open_configured_index
    from training.labels import LabelFileError, import_labels

    path = Path(args.file)
    sessions = open_configured_index(settings.storage)
    try:
        report = import_labels(sessions, path, settings.catalogue())
    except LabelFileError as exc:
        _err(f"cradle: {exc}")
        return EXIT_FAILURE
    finally:
        sessions.kw["bind"].dispose()
    if not report.ok:
        _err(f"{path.name}: {len(report.rejections)} problem(s); nothing was applied")
        for rejection in report.rejections:
            _err(f"  {rejection}")
        return EXIT_REJECTED
    print(f"{path.name}: {report.rows} rows, {report.labels_written} labels on {report.studies} studies applied")
    return 0


HEADLINES = (("dice", "Dice", 3), ("mae", "MAE", 2), ("auroc", "AUROC", 3))
"""The metric a summary line leads with, by the first the run reports: segmentation, regression, classification."""


def _summary_line(summary: dict[str, Any]) -> str:
    metrics = summary["metrics"]
    name, label, digits = next((h for h in HEADLINES if f"{h[0]}_mean" in metrics), HEADLINES[-1])

    def number(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    scores = (f"{label} {number(metrics.get(f'{name}_mean'))} ± {number(metrics.get(f'{name}_std'))} (folds), "
              f"{number(metrics.get(f'test_{name}'))} held-out")
    state = "promoted to active" if summary["promoted"] else "kept as candidate"
    left = (summary.get("left_out") or {}).get("outside_population")
    outside = f"; {left} film(s) outside the population left out" if left else ""
    return (f"{summary['version']}: {scores}; {state}: {summary['reason']}{outside}\n"
            f"report: {summary['report']}")


def train(args: argparse.Namespace, settings: Settings) -> int:
    """Train TASK from the archive (or queue the run), evaluate, register, gate."""
    from training.recipe import RecipeError, load_recipe

    try:
        recipe = load_recipe(args.task, args.recipe, args.overrides, catalogue=settings.catalogue())
    except RecipeError as exc:
        _err(f"cradle: {exc}")
        return EXIT_FAILURE
    if args.queue:
        return _queue(args, settings)
    from training.run import run_training

    say = _err if args.json else print
    try:
        summary = run_training(settings, recipe, progress=sys.stderr.isatty(), say=say)
    except (ValueError, LookupError) as exc:
        _err(f"cradle: {exc}")
        return EXIT_FAILURE
    if args.json:
        json.dump(summary, sys.stdout, indent=2, allow_nan=False)
        sys.stdout.write("\n")
    else:
        print(_summary_line(summary))
    return 0


def _queue(args: argparse.Namespace, settings: Settings) -> int:
    from training.tasks import TRAINING_QUEUE, submit

    try:
        message = submit(settings, args.task, args.recipe, args.overrides)
    except Exception as exc:  # noqa: BLE001 - kombu raises transport-specific errors
        _err(f"cradle: the training queue is not available ({type(exc).__name__}: {exc})")
        return EXIT_FAILURE
    result = {"queued": True, "queue": TRAINING_QUEUE, "message_id": message, "task": args.task}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"queued {args.task} training on '{TRAINING_QUEUE}' (message {message}); a worker started with "
              f"`cradle worker --queue {TRAINING_QUEUE}` runs it")
    return 0


def synth(args: argparse.Namespace, settings: Settings) -> int:  # noqa: ARG001 - the CLI's signature
    """Write a synthetic archive (files only; push it with storescu or a modality)."""
    from training.synth import generate

    summary = generate(Path(args.outdir), args.cxr, args.mri, args.seed, n_pediatric_cxr=args.pediatric_cxr,
                       n_extremity=args.extremity, n_hand=args.hand)
    print(f"{summary.outdir}: {summary.n_patients} patients, {summary.n_studies} studies, "
          f"{summary.n_cxr} neonatal-feed radiographs, {len(summary.pediatric_paths)} children's films, "
          f"{summary.n_mri_series} MR series ({summary.n_mri_instances} images), "
          f"{summary.n_seg} reference SEGs\nlabels: {summary.labels_csv}\ntruth: {summary.truth_json}\n"
          "SYNTHETIC - NOT FOR CLINICAL USE")
    return 0
