"""``cradle listen``, ``cradle status`` and ``cradle config check``.

Each function takes the parsed arguments and the loaded settings (``cradle.cli`` loads them and
answers exit code 2 with the bad key named when the configuration is invalid) and returns the exit
code. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import yaml

from common.logs import protect_logs
from config.settings import Settings
from node.queue import JobQueue
from node.server import Listener

log = logging.getLogger(__name__)

Enqueue = Callable[[int], None]
EXIT_FAILURE = 1


# --- cradle listen ----------------------------------------------------------------------------

def listen(args: argparse.Namespace, settings: Settings) -> int:
    """The listener and the completion monitor, in the foreground until SIGTERM or SIGINT."""
    protect_logs()
    listener = Listener(settings, enqueue=load_enqueue(settings))
    stopping = threading.Event()
    with _stop_on_signals(stopping):
        try:
            listener.start()
        except OSError as exc:
            node = settings.node
            log.error("cannot listen on %s:%d: %s", node.host, node.port, exc.strerror or exc)
            return EXIT_FAILURE
        try:
            while not stopping.wait(1.0):
                pass
        finally:
            listener.stop()
    return 0


def load_enqueue(settings: Settings) -> Enqueue | None:
    """``JobQueue(settings).enqueue``; None when the broker cannot be reached, and the jobs wait in
    the database (state ``queued``) for the reconciler."""
    try:
        queue = JobQueue(settings)
    except Exception as exc:  # noqa: BLE001 - a broker that is down must not stop the listener
        log.warning("job queue unavailable (%s): jobs stay queued for the reconciler", type(exc).__name__)
        return None
    return queue.enqueue


@contextmanager
def _stop_on_signals(stopping: threading.Event) -> Iterator[None]:
    def handle(signum: int, _frame: object) -> None:
        log.info("%s received: stopping", signal.Signals(signum).name)
        stopping.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --- cradle status ----------------------------------------------------------------------------

def status(args: argparse.Namespace, settings: Settings) -> int:
    """The node at a glance, from the index: what it holds, jobs by state, the queue, job durations
    and outcomes by pipeline and model version, dispatch, sends by destination, recent failures.
    ``--json`` keeps ``patients``, ``studies``, ``series``, ``instances``, ``jobs`` (state → count) and
    adds the rest under their own keys; ``durations`` are of the jobs finished in the last 24 h (an
    index range, not the whole job table). The same numbers as the Prometheus endpoint (storage.stats)."""
    from storage.db import open_configured_index

    sessions = open_configured_index(settings.storage)
    with sessions() as session:
        summary = status_summary(session)
    if getattr(args, "json", False):
        from common.output import print_json
        print_json(summary)
    else:
        print(format_status(summary))
    return 0


def status_summary(session) -> dict:  # noqa: ANN001 - SQLAlchemy Session
    import datetime as dt

    from storage import stats
    from storage.index import counts
    from storage.models import utcnow

    day_ago = utcnow() - dt.timedelta(hours=24)
    summary = counts(session)
    summary["queue"] = stats.queue(session)
    summary["dispatch"] = stats.dispatch_states(session)
    summary["received"] = stats.received(session)
    summary["received_24h"] = stats.received(session, since=day_ago)
    summary["sends"] = stats.sends(session)
    summary["sends_24h"] = stats.sends(session, since=day_ago)
    summary["durations"] = [
        {"pipeline": d.pipeline, "model_version": d.model_version, "outcome": d.outcome, "count": d.count,
         "mean_seconds": round(d.mean_seconds, 3), "max_seconds": round(d.max_seconds, 3)}
        for d in sorted(stats.durations(session, since=day_ago), key=lambda d: (d.pipeline, d.model_version, d.outcome))]
    summary["recent_failures"] = stats.recent_failures(session)
    return summary


def format_status(summary: dict) -> str:
    rows = [(key, str(summary[key])) for key in ("patients", "studies", "series", "instances")]
    jobs = summary.get("jobs") or {}
    rows += [(f"jobs {state}", str(n)) for state, n in sorted(jobs.items())] or [("jobs", "0")]
    if "queue" in summary:
        queue = summary["queue"]
        rows.append(("queue depth", f"{queue['queued']} (oldest {queue['oldest_queued_seconds']:.0f} s)"))
        rows += [(f"dispatch {state}", str(n)) for state, n in sorted(summary["dispatch"].items())]
        day = summary["received_24h"]
        rows.append(("received 24 h", f"{day['instances']} instances, {_size(day['bytes'])}"))
        for destination, counts in sorted(summary["sends_24h"].items()):
            rows.append((f"sent 24 h {destination}", f"{counts['delivered']} delivered, {counts['failed']} failed"))
    width = max(len(key) for key, _ in rows)
    lines = [f"{key:<{width}}  {value:>8}" for key, value in rows]
    if summary.get("durations"):
        lines += ["", f"{'PIPELINE':<10} {'MODEL':<22} {'OUTCOME':<8} {'JOBS':>6} {'MEAN S':>8} {'MAX S':>8}"]
        lines += [f"{d['pipeline']:<10} {(d['model_version'] or '-')[:22]:<22} {d['outcome']:<8} {d['count']:>6} "
                  f"{d['mean_seconds']:>8.2f} {d['max_seconds']:>8.2f}" for d in summary["durations"]]
    failures = summary.get("recent_failures") or {}
    if failures.get("jobs") or failures.get("sends"):
        lines += ["", "recent failures:"]
        lines += [f"  job {f['id']} ({f['pipeline']}, series {f['series_pk']}) {f['finished_at'] or ''}: "
                  f"{f['error'][:100]}" for f in failures.get("jobs", [])]
        lines += [f"  send of job {f['job_id']} to {f['destination']} {f['sent_at']}: {f['status'] or 'no answer'} "
                  f"{f['error'][:80]}" for f in failures.get("sends", [])]
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


# --- cradle config check ----------------------------------------------------------------------

def config_check(args: argparse.Namespace, settings: Settings) -> int:
    """Print the resolved configuration (passwords hidden) as YAML; warn about risky choices."""
    yaml.safe_dump(settings.redacted(), sys.stdout, sort_keys=False, default_flow_style=False)
    for warning in config_warnings(settings):
        print(f"cradle: warning: {warning}", file=sys.stderr)
    return 0


def config_warnings(settings: Settings) -> list[str]:
    warnings = []
    if settings.node.loopback_only:
        warnings.append("node.allowed_calling_aets is not set: any calling AE title may associate, "
                        "from the loopback address (127.0.0.1, ::1) only")
    elif not settings.node.allowed_calling_aets:
        warnings.append("node.allowed_calling_aets is empty: no modality can send to this node")
    if not settings.storage.fsync:
        warnings.append("storage.fsync is off: success may be answered before the data is on disk")
    if settings.completion.quiet_seconds < settings.completion.poll_seconds:
        warnings.append("completion.quiet_seconds is below completion.poll_seconds")
    return warnings


# --- cradle serve lives in node/serve.py (the lead's): it composes Listener with the worker and
# --- dispatcher; see Listener.start()/stop() and load_enqueue() above.
