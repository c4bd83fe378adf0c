"""``cradle models shadow|compare`` and the promotion gate on shadow cases.

``cradle models shadow TASK VERSION [--stop]`` starts (or stops) running VERSION beside TASK's active
version on every series routed to it; ``cradle models compare TASK VERSION [--since DATE] [--json]``
compares them on the studies both saw and writes the HTML report; ``cradle models promote`` asks for
``promotion.min_shadow_cases`` and ``promotion.min_shadow_agreement`` before it activates a version.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from typing import Any

from config.settings import Settings

EXIT_FAILURE = 1


def add_arguments(models: Any, add: Any) -> None:
    """``shadow`` and ``compare`` under ``cradle models`` (``add`` is the CLI's sub-command helper)."""
    shadow = add(models, "shadow", "cradle.shadow:models_shadow",
                 "run VERSION beside the active version on live studies (results not for clinical use)")
    shadow.add_argument("task")
    shadow.add_argument("version")
    shadow.add_argument("--stop", action="store_true", help="stop the shadow runs of VERSION")
    compare = add(models, "compare", "cradle.shadow:models_compare",
                  "VERSION in shadow against the active version on the studies both saw")
    compare.add_argument("task")
    compare.add_argument("version")
    compare.add_argument("--since", type=_date, metavar="DATE", help="only shadow runs since DATE (YYYY-MM-DD)")
    compare.add_argument("--json", action="store_true", help="print one JSON object (keys cases, agreement, ...)")


def _date(text: str) -> dt.datetime:
    try:
        return dt.datetime.combine(dt.date.fromisoformat(text), dt.time())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def _fail(message: str) -> int:
    print(f"cradle: {message}", file=sys.stderr)
    return EXIT_FAILURE


def _registry(settings: Settings) -> Any:
    from inference.registry import ModelRegistry

    return ModelRegistry(settings.models_dir, settings.catalogue())


def models_shadow(args: argparse.Namespace, settings: Settings) -> int:
    from inference.registry import RegistryError

    registry = _registry(settings)
    try:
        if args.stop:
            stopped = registry.stop_shadow(args.task, args.version)
            print(f"{args.version} is no longer in shadow (it was since {stopped['since']})")
        else:
            shadow = registry.start_shadow(args.task, args.version)
            print(f"{args.version} is in shadow since {shadow['since']}: it runs after the active "
                  f"{args.task} version on every series routed to it; its results are archived, marked not "
                  f"for clinical use, and sent to research destinations only "
                  f"({', '.join(d.name for d in settings.destinations if d.research) or 'none configured'})")
    except RegistryError as exc:
        return _fail(str(exc))
    return 0


def comparison(settings: Settings, task: str, version: str, since: dt.datetime | None = None) -> Any:
    """The :class:`training.shadow.Comparison` of ``version`` with the active version(s) it ran beside."""
    from storage.archive import Archive
    from storage.db import open_configured_index
    from training.shadow import compare

    catalogue = settings.catalogue()
    registry = _registry(settings)
    registry.get(task, version)  # UnknownVersion when there is no such version
    sessions = open_configured_index(settings.storage)
    return compare(sessions, Archive(settings.storage.archive_dir), catalogue.get(task), version, since)


def models_compare(args: argparse.Namespace, settings: Settings) -> int:
    from common.output import print_json
    from inference.registry import RegistryError
    from training.shadow_report import report_dir, write_compare_report

    try:
        result = comparison(settings, args.task, args.version, args.since)
    except RegistryError as exc:
        return _fail(str(exc))
    paths = write_compare_report(report_dir(settings.models_dir, result), result)
    data = {**result.as_dict(), "report": str(paths[1])}
    if args.json:
        print_json(data)
        return 0
    agreement = "n/a" if data["agreement"] is None else f"{data['agreement']:.3f}"
    print(f"{args.version} beside {', '.join(result.active_versions) or 'the active version'}: "
          f"{data['cases']} studies seen by both, agreement {agreement}")
    for key in ("kappa", "disagreements", "mean_absolute_difference"):
        if key in data:
            print(f"  {key}: {data[key]}")
    print(f"  shadow runs: {', '.join(f'{k} {v}' for k, v in sorted(result.runs.items())) or 'none'}")
    print(f"report: {data['report']}")
    return 0


def shadow_gate(settings: Settings, task: str, version: str) -> str | None:
    """Why ``promotion`` refuses ``version`` (too few shadow cases, too little agreement), or None."""
    wanted = settings.promotion
    if wanted.min_shadow_cases == 0 and wanted.min_shadow_agreement == 0:
        return None
    if _registry(settings).active(task) is None:
        return None  # nothing in service to run beside: the first version needs no shadow
    found = comparison(settings, task, version)
    if found.cases < wanted.min_shadow_cases:
        return (f"{version} ran in shadow on {found.cases} studies beside the active version; "
                f"promotion.min_shadow_cases asks for {wanted.min_shadow_cases} "
                f"(cradle models shadow {task} {version})")
    if wanted.min_shadow_agreement > 0 and (found.agreement is None or found.agreement < wanted.min_shadow_agreement):
        shown = "n/a" if found.agreement is None else f"{found.agreement:.3f}"
        return (f"{version} agrees with the active version on {shown} of {found.cases} shadow studies; "
                f"promotion.min_shadow_agreement asks for {wanted.min_shadow_agreement:.3f}")
    return None


def models_promote(args: argparse.Namespace, settings: Settings) -> int:
    """``cradle models promote``: the shadow gate (when the settings ask for one), then the registry's."""
    from inference.commands import models_promote as promote
    from inference.registry import RegistryError

    try:
        refused = shadow_gate(settings, args.task, args.version)
    except RegistryError as exc:
        return _fail(str(exc))
    if refused:
        return _fail(f"not promoted: {refused}")
    return promote(args, settings)
