"""``cradle models ...``: the model registry from the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from config.settings import Settings

EXIT_FAILURE = 1
DEFAULT_PATCH_SLICES = 16
"""An imported 3D network's sliding window without ``--patch``: 16 slices of the whole input size."""

# --------------------------------------------------------------------------- cradle models ...
# The tasks are the settings' catalogue's (config/tasks.yaml and the site's ``task_catalogue``): an
# imported model's default input size is its task's ``image_size`` (the papers' sizes).


def _fail(message: str) -> int:
    print(f"cradle: {message}", file=sys.stderr)
    return EXIT_FAILURE


def _registry(settings: Settings) -> Any:
    from inference.registry import ModelRegistry

    return ModelRegistry(settings.models_dir, settings.catalogue())


def _row(version: Any) -> dict[str, Any]:
    return {
        "task": version.task, "version": version.version, "arch": version.arch, "state": version.state,
        "validated": version.validated, "image_size": version.input_spec.image_size,
        "threshold": version.threshold, "temperature": version.temperature, "created_at": version.created_at,
        "sha256": version.sha256, "source": version.provenance.get("source", ""), "metrics": version.metrics,
    }


def models_list(args: argparse.Namespace, settings: Settings) -> int:
    """Every registered version of every task, the active one marked."""
    from common.output import print_json

    registry = _registry(settings)
    tasks = {task: {"active": getattr(registry.active(task), "version", None),
                    "shadows": [_shadow_row(s) for s in registry.shadows(task)],
                    "versions": [_row(v) for v in registry.versions(task)]} for task in registry.tasks()}
    if args.json:
        print_json(tasks)
        return 0
    if not tasks:
        print(f"no models registered under {settings.models_dir}")
        return 0
    print(f"{'':1} {'VERSION':<14} {'ARCH':<24} {'STATE':<9} {'VALID':<5} {'SIZE':>4} {'THRESH':>6}  "
          f"{'CREATED':<25} SHA256")
    for task, entry in tasks.items():
        shadows = {s["version"]: s for s in entry["shadows"]}
        for row in entry["versions"]:
            mark = "*" if row["version"] == entry["active"] else "s" if row["version"] in shadows else " "
            threshold = "-" if row["threshold"] is None else f"{row['threshold']:.3f}"
            print(f"{mark} {row['version']:<14} {row['arch']:<24} {row['state']:<9} "
                  f"{'yes' if row['validated'] else 'no':<5} {row['image_size']:>4} {threshold:>6}  "
                  f"{row['created_at']:<25} {row['sha256'][:12]}")
        for shadow in entry["shadows"]:
            print(f"s {shadow['version']} in shadow beside {entry['active'] or 'no active version'} since "
                  f"{shadow['since']} ({shadow['days']:.1f} days)")
    return 0


def _shadow_row(shadow: dict[str, Any]) -> dict[str, Any]:
    """A version in shadow: since when, by whom, for how many days."""
    import datetime as dt

    since = dt.datetime.fromisoformat(shadow["since"])
    days = (dt.datetime.now(dt.timezone.utc) - since).total_seconds() / 86400
    return {**shadow, "days": round(days, 3)}


def models_import(args: argparse.Namespace, settings: Settings) -> int:
    """Register external weights for TASK; ``--activate`` is the admin's validation of them."""
    from inference.models import is_volumetric_arch
    from inference.registry import InputSpec, RegistryError
    from inference.registry.weights import sha256_of_file

    catalogue = settings.catalogue()
    if args.task not in catalogue:
        return _fail(f"unknown task {args.task!r}; known: {', '.join(catalogue.names())}")
    task = catalogue.get(args.task)
    weights = Path(args.weights)
    if not weights.is_file():
        return _fail(f"weights file not found: {weights}")
    try:
        size = args.image_size or task.image_size
        patch = getattr(args, "patch", None)
        if patch is None and is_volumetric_arch(args.arch):
            patch = (DEFAULT_PATCH_SLICES, size, size)
        spec = InputSpec(image_size=size, patch=patch)
    except ValueError as exc:
        return _fail(str(exc))
    try:
        population = _population(args.population)
    except ValueError as exc:
        return _fail(f"--population {args.population}: {exc}")
    registry = _registry(settings)
    provenance = {"source": "import", "source_file": weights.name, "source_sha256": sha256_of_file(weights)}
    try:
        version = registry.register(args.task, args.arch, weights, input_spec=spec, threshold=args.threshold,
                                    classes=args.classes, provenance=provenance, population=population)
        print(f"registered {version.version} ({version.arch}, {spec.image_size} px, sha256 {version.sha256[:12]})")
        if args.activate:
            registry.activate(args.task, version.version, accept_unvalidated=True,
                              reason="cradle models import --activate (admin validation)")
            print(f"{version.version} is now the active {args.task} model (validated by the admin's --activate)")
    except RegistryError as exc:
        return _fail(f"cannot import {weights.name} as {args.task} ({args.arch}): {exc}")
    if version.threshold is None and task.kind == "binary":
        print(f"note: no --threshold given; {args.task} calls will use 0.5 until a calibrated threshold is set")
    return 0


def _population(path: Path | None) -> dict | None:
    """The population of an import's ``--population`` YAML, checked as the catalogue's are."""
    from pydantic import ValidationError

    from config.tasks import Population

    if path is None:
        return None
    try:
        values = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read it: {exc}") from exc
    try:
        return Population.model_validate(values).model_dump(exclude_defaults=True)
    except ValidationError as exc:
        raise ValueError("; ".join(f"{'.'.join(map(str, e['loc'])) or 'the file'}: {e['msg']}"
                                   for e in exc.errors())) from exc


def models_promote(args: argparse.Namespace, settings: Settings) -> int:
    """Make VERSION the active model of TASK (an explicit admin act, recorded with who/when)."""
    from inference.registry import RegistryError

    registry = _registry(settings)
    try:
        before = registry.get(args.task, args.version)
        registry.activate(args.task, args.version, accept_unvalidated=True, reason="cradle models promote")
    except RegistryError as exc:
        return _fail(str(exc))
    if not before.validated:
        print(f"warning: {args.version} had no validation of its own; the promotion is recorded as the admin's",
              file=sys.stderr)
    print(f"{args.version} is now the active {args.task} model")
    return 0


def models_rollback(args: argparse.Namespace, settings: Settings) -> int:
    """Re-activate the version that was active before the current one."""
    from inference.registry import RegistryError

    registry = _registry(settings)
    current = registry.active(args.task) if args.task in registry.tasks() else None
    try:
        version = registry.rollback(args.task, reason="cradle models rollback")
    except RegistryError as exc:
        return _fail(str(exc))
    print(f"{args.task}: {getattr(current, 'version', 'none')} -> {version.version}")
    return 0
