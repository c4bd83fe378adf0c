"""``cradle archive check [--repair] [--json]`` and ``cradle archive prune [--dry-run] [--json]``.

Above the layers they join: the check and the deletions are ``storage.check`` and
``storage.retention``; the studies a registered model version was trained on come from the model
versions' manifests (``training.manifests``), read here and handed down as protected UIDs.

``prune`` first finishes any deletion a crash interrupted, then deletes what ``retention`` allows
(``--dry-run``: lists it and changes nothing). ``--json`` prints one object: ``studies`` and
``bytes`` (deleted, or that would be), ``dry_run``, ``resumed``, ``by_rule`` and ``study_uids``.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from config.settings import Settings


def add_arguments(sub: Any, add: Any) -> None:
    """Register ``archive check`` and ``archive prune`` (``add`` is the CLI's sub-command helper)."""
    archive = sub.add_parser("archive", help="the archive: full check, retention").add_subparsers(
        dest="action", required=True)
    check = add(archive, "check", "cradle.archive:check",
                "compare every archived file with the index (resumable; read-only unless --repair)")
    check.add_argument("--repair", action="store_true", help="drop rows whose file is gone, index files without "
                                                              "a row, remove abandoned temporary files")
    check.add_argument("--restart", action="store_true", help="start from the beginning, not where the last "
                                                               "check stopped")
    check.add_argument("--json", action="store_true")
    prune = add(archive, "prune", "cradle.archive:prune", "delete studies the retention settings allow")
    prune.add_argument("--dry-run", action="store_true", help="list what would be deleted; change nothing")
    prune.add_argument("--json", action="store_true")
    prune.add_argument("--include-labelled", action="store_true",
                       help="also delete studies with imported labels (retention.keep_labelled=false)")
    prune.add_argument("--include-model-studies", action="store_true",
                       help="also delete studies a registered model version was trained on")


def check_state_file(settings: Settings) -> Path:
    """Where a check records how far it got: beside the archive, not in it."""
    return Path(settings.storage.archive_dir).resolve().parent / "archive-check.json"


def check(args: argparse.Namespace, settings: Settings) -> int:
    from dataclasses import asdict

    from common.output import print_json
    from storage.archive import Archive
    from storage.check import ArchiveCheck
    from storage.db import open_configured_index
    from storage.ingest import Ingest

    state = check_state_file(settings)
    if args.restart:
        state.unlink(missing_ok=True)
    archive = Archive(settings.storage.archive_dir, fsync=settings.storage.fsync)
    ingest = Ingest(archive, open_configured_index(settings.storage))
    report = ArchiveCheck(ingest, state, repair=args.repair, progress=sys.stderr.isatty()).run()
    if args.json:
        print_json(asdict(report))
    else:
        print("\n".join(f"{key.replace('_', ' ')}: {value}" for key, value in asdict(report).items()))
    problems = report.rows_without_file + report.size_or_hash_mismatch + report.files_without_row
    return 0 if args.repair or problems == 0 else 1


def prune(args: argparse.Namespace, settings: Settings) -> int:
    from common.output import print_json
    from storage.archive import Archive
    from storage.db import open_configured_index
    from storage.retention import Pruner, plan

    sessions = open_configured_index(settings.storage)
    archive = Archive(settings.storage.archive_dir, fsync=settings.storage.fsync)
    pruner = Pruner(archive, sessions)
    resumed = [] if args.dry_run else pruner.resume()
    with sessions() as session:
        candidates = plan(session, policy_of(settings, args))
    if not args.dry_run:
        pruner.prune(candidates)
    summary = {"studies": len(candidates), "bytes": sum(c.bytes for c in candidates), "dry_run": args.dry_run,
               "resumed": len(resumed), "by_rule": dict(Counter(c.rule for c in candidates)),
               "study_uids": [c.study_uid for c in candidates]}
    if args.json:
        print_json(summary)
    else:
        verb = "would delete" if args.dry_run else "deleted"
        print(f"{verb} {summary['studies']} studies, {summary['bytes']} bytes"
              + (f" (finished {len(resumed)} interrupted)" if resumed else ""))
    return 0


def policy_of(settings: Settings, args: argparse.Namespace):  # noqa: ANN201 - storage.retention.Policy
    """The retention settings, the command line's overrides, the free space missing now and the
    studies of registered model versions."""
    from storage.disk import DiskSpace
    from storage.retention import Policy
    from training.manifests import studies_used_by_models

    retention = settings.retention
    shortfall = 0
    if retention.target_free_bytes:
        archive_dir = Path(settings.storage.archive_dir)
        if archive_dir.exists():
            shortfall = max(0, retention.target_free_bytes - DiskSpace(archive_dir).free_bytes())
    keep_models = retention.keep_model_studies and not args.include_model_studies
    return Policy(max_age_days=retention.max_age_days, shortfall_bytes=shortfall,
                  keep_labelled=retention.keep_labelled and not args.include_labelled,
                  protected=studies_used_by_models(settings.models_dir) if keep_models else frozenset())
