"""``cradle jobs list|show|retry`` and ``cradle dispatch``.

What they print names jobs, series and results by row id and UID, never the patient (no names,
IDs, birth dates or accession numbers).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import signal
import sys
import threading
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from common.output import print_json
from config.settings import Settings
from storage import jobs
from storage.db import open_configured_index
from storage.models import Job, JobState, Send, Series

log = logging.getLogger(__name__)

EXIT_FAILURE = 1
EXIT_USAGE = 2


def job_summary(job: Job, series: Series | None) -> dict[str, Any]:
    return {
        "id": job.id, "series_pk": job.series_pk, "series_uid": series.series_uid if series else None,
        "modality": series.modality if series else None, "pipeline": job.pipeline, "shadow": job.shadow or None,
        "state": job.state.value, "attempts": job.attempts, "generation": job.generation,
        "model_version": job.model_version, "error": job.error,
        "dispatch_state": job.dispatch_state.value, "dispatch_attempts": job.dispatch_attempts,
        "dispatch_round": job.dispatch_round,
        "created_at": _iso(job.created_at), "enqueued_at": _iso(job.enqueued_at),
        "started_at": _iso(job.started_at), "finished_at": _iso(job.finished_at),
        "dispatch_due_at": _iso(job.dispatch_due_at), "dispatched_at": _iso(job.dispatched_at),
    }


def send_summary(send: Send) -> dict[str, Any]:
    return {"destination": send.destination, "sop_uid": send.sop_uid, "round": send.round,
            "attempt": send.attempt, "status": None if send.status is None else f"0x{send.status:04X}",
            "error": send.error, "sent_at": _iso(send.sent_at)}


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


JOBS_LIST_LIMIT = 100


def _rows(session: Session, state: str | None, limit: int | None = JOBS_LIST_LIMIT
          ) -> list[tuple[Job, Series | None]]:
    """The newest ``limit`` jobs (all with None), in id order: read through the primary key (and the
    state index), so the answer does not grow with the job table."""
    query = select(Job, Series).join(Series, Series.id == Job.series_pk, isouter=True).order_by(Job.id.desc())
    if state:
        query = query.where(Job.state == JobState(state))
    if limit:
        query = query.limit(limit)
    return [(job, series) for job, series in reversed(session.execute(query).all())]


def jobs_list(args: argparse.Namespace, settings: Settings) -> int:
    state = getattr(args, "state", None)
    if state and state not in JobState.__members__:
        print(f"cradle: unknown state {state!r}; one of {', '.join(JobState.__members__)}", file=sys.stderr)
        return EXIT_USAGE
    limit = getattr(args, "limit", JOBS_LIST_LIMIT)
    sessions = open_configured_index(settings.storage)
    with sessions() as session:
        listed = [job_summary(job, series) for job, series in _rows(session, state, limit)]
    if getattr(args, "json", False):
        print_json(listed)
    else:
        _print_table(listed)
    return 0


def _print_table(listed: list[dict[str, Any]]) -> None:
    header = f"{'ID':>6}  {'SERIES':>6}  {'PIPELINE':<10} {'STATE':<8} {'TRIES':>5}  {'DISPATCH':<8} " \
             f"{'MODEL':<20} ERROR"
    print(header)
    for job in listed:
        error = (job["error"] or "")[:80]
        model = (job["model_version"] or job["shadow"] or "-")[:20]
        print(f"{job['id']:>6}  {job['series_pk']:>6}  {job['pipeline']:<10} {job['state']:<8} "
              f"{job['attempts']:>5}  {job['dispatch_state']:<8} {model:<20} {error}")


def jobs_show(args: argparse.Namespace, settings: Settings) -> int:
    sessions = open_configured_index(settings.storage)
    with sessions() as session:
        job = session.get(Job, args.job_id)
        if job is None:
            print(f"cradle: job {args.job_id} does not exist", file=sys.stderr)
            return EXIT_FAILURE
        shown = job_summary(job, session.get(Series, job.series_pk))
        shown["result"] = job.result
        shown["sends"] = [send_summary(s) for s in session.scalars(
            select(Send).where(Send.job_pk == job.id).order_by(Send.id))]
    print_json(shown)
    return 0


def jobs_retry(args: argparse.Namespace, settings: Settings) -> int:
    sessions = open_configured_index(settings.storage)
    try:
        action = jobs.retry(sessions, args.job_id)
    except jobs.RetryRefused as exc:
        print(f"cradle: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if action == jobs.RetryAction.rerun:
        from node.queue import BrokerUnavailable, JobQueue

        queue = JobQueue(settings, sessions)
        try:
            queue.enqueue(args.job_id)
            print(f"job {args.job_id}: queued to run again")
        except BrokerUnavailable:
            print(f"job {args.job_id}: queued to run again; the broker is unavailable, so the worker's "
                  f"reconciler will send it")
        finally:
            queue.close()
    else:
        print(f"job {args.job_id}: results queued to be sent again (same UIDs)")
    return 0


def dispatch(args: argparse.Namespace, settings: Settings) -> int:
    """The dispatcher loop in the foreground; SIGTERM or Ctrl-C stop it between sends."""
    from node.dispatch import Dispatcher
    from node.server import protect_logs

    protect_logs()
    sessions = open_configured_index(settings.storage)
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping the dispatcher", signum)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    Dispatcher(settings, sessions).run(stop)
    log.info("dispatcher stopped")
    return 0

