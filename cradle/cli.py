"""``cradle``: the one console script. Each sub-command imports only what it needs
(the listener never imports torch).

The settings are loaded before the command line is parsed (``--config`` is read first), because
``cradle train TASK``'s choices are the tasks of their catalogue: the shipped tasks and the site's
``task_catalogue``."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from config.settings import ConfigError, Settings, load_settings
from config.tasks import load_catalogue

EXIT_CONFIG = 2
EXIT_FAILURE = 1


def _call(target: str) -> Callable[[argparse.Namespace, Settings], int | None]:
    """A lazily imported command implementation, ``"module:function"``."""
    module_name, function_name = target.split(":")

    def run(args: argparse.Namespace, settings: Settings) -> int | None:
        return getattr(importlib.import_module(module_name), function_name)(args, settings)

    return run


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="the node's YAML (default: $CRADLE_CONFIG, else /etc/cradle/cradle.yaml, "
                             "else built-in defaults)")


def _add(subparsers: Any, name: str, target: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    _config_option(parser)
    parser.set_defaults(run=_call(target))
    return parser


def config_file(argv: Sequence[str]) -> str | None:
    """``--config FILE`` wherever it stands in ``argv`` (the rest is left to :func:`build_parser`)."""
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    _config_option(parser)
    try:
        known, _ = parser.parse_known_args(argv)
    except argparse.ArgumentError:  # e.g. --config without its FILE: the full parser says so
        return None
    return known.config


def build_parser(tasks: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The command line; ``tasks`` are ``cradle train``'s choices (default: the shipped catalogue's)."""
    tasks = list(tasks) if tasks is not None else list(load_catalogue().names())
    parser = argparse.ArgumentParser(prog="cradle", description="DICOM-native AI node for neonatal chest imaging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_node_commands(sub)
    _add_model_commands(sub)
    _add_training_commands(sub, tasks)
    _add_retrieve_command(sub)
    _add_archive_commands(sub)
    demo = _add(sub, "demo", "cradle.demo:run", "the guided synthetic demo, end to end")
    demo.add_argument("--workdir", default="var/demo", help="where the demo keeps everything (recreated)")
    return parser


def _add_node_commands(sub: Any) -> None:
    _add(sub, "serve", "node.serve:serve", "listener + worker + dispatcher in one process (embedded defaults)")
    _add(sub, "listen", "node.commands:listen", "the DICOM listener (C-ECHO, C-STORE SCP) and completion")
    worker = _add(sub, "worker", "cradle.worker:worker", "a Celery worker running the pipelines")
    worker.add_argument("--queue", dest="queues", action="append", default=[], metavar="NAME",
                        help="consume this queue too (e.g. gpu0 for the worker bound to GPU 0)")
    _add(sub, "dispatch", "node.jobs_commands:dispatch", "send results to the configured destinations")
    status = _add(sub, "status", "node.commands:status", "counts of patients, studies, series, instances, jobs")
    status.add_argument("--json", action="store_true", help="print one JSON object")

    config = sub.add_parser("config", help="configuration").add_subparsers(dest="action", required=True)
    _add(config, "check", "node.commands:config_check", "validate and print the resolved config (no secrets)")

    jobs = sub.add_parser("jobs", help="inspect and retry jobs").add_subparsers(dest="action", required=True)
    jobs_list = _add(jobs, "list", "node.jobs_commands:jobs_list", "list jobs")
    jobs_list.add_argument("--state", help="only jobs in this state")
    jobs_list.add_argument("--json", action="store_true")
    jobs_list.add_argument("--limit", type=int, default=100, metavar="N", help="the newest N jobs (0: all)")
    _add(jobs, "show", "node.jobs_commands:jobs_show", "one job with its sends").add_argument("job_id", type=int)
    _add(jobs, "retry", "node.jobs_commands:jobs_retry", "run a failed job again / send its results again"
         ).add_argument("job_id", type=int)


def _add_model_commands(sub: Any) -> None:
    models = sub.add_parser("models", help="the model registry").add_subparsers(dest="action", required=True)
    models_list = _add(models, "list", "inference.commands:models_list", "registered model versions")
    models_list.add_argument("--json", action="store_true")
    models_import = _add(models, "import", "inference.commands:models_import", "register external weights")
    models_import.add_argument("task")
    models_import.add_argument("weights")
    models_import.add_argument("--arch", required=True)
    models_import.add_argument("--activate", action="store_true")
    models_import.add_argument("--threshold", type=float, default=None, help="operating threshold (binary tasks)")
    models_import.add_argument("--image-size", type=int, default=None)
    models_import.add_argument("--patch", type=lambda text: tuple(int(v) for v in text.split(",")), default=None,
                               help="3D networks: sliding-window patch SLICES,ROWS,COLUMNS (default 16,SIZE,SIZE)")
    models_import.add_argument("--classes", type=lambda text: [v.strip() for v in text.split(",")], default=None,
                               help="the outputs in order: a multiclass task's classes (default the catalogue's), "
                                    "or one name for a one-output model (pneumonia: yes/no)")
    models_import.add_argument("--population", type=Path, default=None,
                               help="YAML of the population the weights were validated on (modalities, body_parts, "
                                    "views, min_age_days, max_age_days); the pipeline runs them only there")
    promote = _add(models, "promote", "cradle.shadow:models_promote", "make VERSION the active one")
    promote.add_argument("task")
    promote.add_argument("version")
    _add(models, "rollback", "inference.commands:models_rollback", "re-activate the previous version"
         ).add_argument("task")
    from cradle.shadow import add_arguments as add_shadow_commands

    add_shadow_commands(models, _add)


def _add_retrieve_command(sub: Any) -> None:
    from cradle.retrieve import add_arguments

    add_arguments(_add(sub, "retrieve", "cradle.retrieve:retrieve",
                       "bring studies from a PACS (C-FIND, then C-MOVE or C-GET) into the archive"))


def _add_archive_commands(sub: Any) -> None:
    from cradle.archive import add_arguments

    add_arguments(sub, _add)


def _add_training_commands(sub: Any, tasks: list[str]) -> None:
    labels = sub.add_parser("labels", help="training labels").add_subparsers(dest="action", required=True)
    _add(labels, "import", "training.commands:labels_import", "attach outcomes from a CSV"
         ).add_argument("file")

    train = _add(sub, "train", "training.commands:train", "train TASK from the archive")
    train.add_argument("task", choices=tasks)
    train.add_argument("--recipe", metavar="FILE", help="YAML recipe (default: config/train/TASK.yaml)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    train.add_argument("--json", action="store_true", help="print the run summary as JSON")
    train.add_argument("--queue", action="store_true", help="send the run to the training queue")

    synth = _add(sub, "synth", "training.commands:synth",
                 "write synthetic neonatal and children's studies (not clinical)")
    synth.add_argument("outdir")
    synth.add_argument("--cxr", type=int, default=20)
    synth.add_argument("--mri", type=int, default=4)
    synth.add_argument("--pediatric-cxr", type=int, default=6,
                       help="frontal chests of 1-5 year olds, normal/bacterial/viral in turn (pneumonia by type)")
    synth.add_argument("--extremity", type=int, default=6,
                       help="children's limb films, with and without a fracture in turn")
    synth.add_argument("--hand", type=int, default=6, help="children's hand/wrist films (bone age)")
    synth.add_argument("--seed", type=int, default=0)


SERVICES = ("listen", "worker", "dispatch")
"""The long-running parts: each records the configuration it starts with in the audit trail."""


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    os.umask(0o077)  # whatever cradle creates (archive, index, audit, models, runs) is the owner's only
    try:
        settings: Settings | None = load_settings(config_file(argv))
        error = None
    except ConfigError as exc:
        settings, error = None, exc
    # With a broken config, usage errors and --help still come first, as they would without one.
    args = build_parser(settings.catalogue().names() if settings else None).parse_args(argv)
    if settings is None:
        print(f"cradle: {error}", file=sys.stderr)
        return EXIT_CONFIG
    component = " ".join(filter(None, (args.command, getattr(args, "action", None))))
    setup_process(settings, component, args.config, record_config=args.command in SERVICES)
    try:
        return int(args.run(args, settings) or 0)
    except KeyboardInterrupt:
        return 130


def setup_process(settings: Settings, component: str, config_file: str | None = None, *,
                  record_config: bool = False) -> None:
    """Logging (text or JSON, with row ids) and the audit trail of this process."""
    from config.settings import resolve_config_path
    from common.logs import configure_logging
    from storage import audit

    configure_logging(settings.logging.level, settings.logging.format, component)
    audit.configure_audit(settings.audit_path(), component)
    if record_config:
        resolved = resolve_config_path(config_file)
        try:
            audit.record_config(settings.redacted(), settings.audit_path(), component,
                                str(resolved) if resolved else None)
        except OSError as exc:
            logging.getLogger(__name__).warning("audit trail %s not writable: %s", settings.audit_path(),
                                                exc.strerror or exc)



if __name__ == "__main__":
    sys.exit(main())
