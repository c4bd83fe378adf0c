"""The dispatcher: sends each done job's result instances to every configured destination.

A job is due when ``state = done``, ``dispatch_state = pending`` and ``dispatch_due_at`` has
passed. The dispatcher claims it by pushing ``dispatch_due_at`` forward (a compare-and-set, so two
dispatchers never send the same job at once), sends what no destination has acknowledged in the
job's current ``dispatch_round``, records every C-STORE in ``Send``, and then either marks the job
``sent``, schedules the next attempt after ``backoff_seconds × 2^(attempt-1)`` (capped at
``backoff_max_seconds``), or, after ``dispatch.max_attempts``, parks it: job ``failed`` with the
reason, dispatch ``failed``. ``cradle jobs retry`` puts it back to ``pending`` (same UIDs).

Torch-free; runs as ``cradle dispatch`` (its own process under ``cradle serve`` and systemd).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Destination, DispatchSettings, Settings
from node import sender
from common.logs import log_context
from node.sender import Outgoing, SendOutcome
from storage.audit import audit
from storage.archive import Archive
from storage.db import transaction
from storage.models import DispatchState, Instance, Job, JobState, Send, utcnow

log = logging.getLogger(__name__)

CLAIM_SECONDS = 600
"""While a dispatcher works on a job, the job is not due for anybody else for this long."""
POLL_SECONDS = 0.2

SendFunction = Callable[[Destination, Sequence[Outgoing], Any], list[SendOutcome]]


def backoff(settings: DispatchSettings, attempt: int) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
    return min(settings.backoff_max_seconds, settings.backoff_seconds * 2 ** max(0, attempt - 1))


@dataclass(frozen=True)
class Round:
    """One claimed dispatch attempt of one job."""

    job_id: int
    round: int
    attempt: int
    instances: list[dict[str, str]]
    shadow: str = ""


class Dispatcher:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session], *,
                 send: SendFunction = sender.send, archive: Archive | None = None) -> None:
        self.settings = settings
        self.sessions = sessions
        self.send = send
        self.archive = archive or Archive(settings.storage.archive_dir, fsync=settings.storage.fsync)

    def run(self, stop: threading.Event, poll_seconds: float = POLL_SECONDS) -> None:
        """Dispatch due jobs until ``stop`` is set; a database outage is logged and waited out."""
        log.info("dispatcher: %d destination(s): %s", len(self.settings.destinations),
                 ", ".join(d.name for d in self.settings.destinations) or "none")
        while not stop.is_set():
            try:
                busy = self.run_once()
            except Exception:  # noqa: BLE001 - keep dispatching once the index is back
                log.exception("dispatcher pass failed")
                busy = 0
            if not busy:
                stop.wait(poll_seconds)

    def run_once(self) -> int:
        """Dispatch every job due now; return how many were attempted."""
        attempted = 0
        for job_id in self._due():
            with log_context(job_id=job_id):
                claimed = self._claim(job_id)
                if claimed is not None:
                    self.dispatch(claimed)
                    attempted += 1
        return attempted

    def _due(self) -> list[int]:
        with self.sessions() as session:
            return list(session.scalars(
                select(Job.id).where(Job.state == JobState.done, Job.dispatch_state == DispatchState.pending,
                                     (Job.dispatch_due_at.is_(None)) | (Job.dispatch_due_at <= utcnow()))
                .order_by(Job.dispatch_due_at, Job.id).limit(100)))

    def _claim(self, job_id: int) -> Round | None:
        now = utcnow()
        with transaction(self.sessions) as session:
            claimed = session.execute(
                update(Job).where(Job.id == job_id, Job.state == JobState.done,
                                  Job.dispatch_state == DispatchState.pending,
                                  (Job.dispatch_due_at.is_(None)) | (Job.dispatch_due_at <= now))
                .values(dispatch_due_at=now + dt.timedelta(seconds=CLAIM_SECONDS))
                .execution_options(synchronize_session=False)).rowcount
            if not claimed:
                return None
            job = session.get(Job, job_id)
            instances = list((job.result or {}).get("instances") or [])
            return Round(job_id, job.dispatch_round, job.dispatch_attempts + 1, instances, job.shadow or "")

    def dispatch(self, claimed: Round) -> DispatchState:
        """Send one claimed round's undelivered instances, record the sends, decide what next. A
        shadow run's results go to the destinations marked ``research`` only."""
        destinations = [d for d in self.settings.destinations if d.research or not claimed.shadow]
        if not destinations or not claimed.instances:
            return self._finish(claimed, DispatchState.none, "")
        outgoing, missing = self._outgoing(claimed.instances)
        delivered = self._delivered(claimed)
        problems: list[str] = []
        for destination in destinations:
            todo = [o for o in outgoing if (destination.name, o.sop_uid) not in delivered]
            lacking = [uid for uid in missing if (destination.name, uid) not in delivered]
            outcomes = self.send(destination, todo, self.settings.node) if todo else []
            outcomes += [SendOutcome(uid, None, "result instance missing from the archive") for uid in lacking]
            self._record(claimed, destination, outcomes)
            problems += _problems(destination, outcomes)
        if not problems:
            return self._finish(claimed, DispatchState.sent, "")
        return self._retry_or_park(claimed, problems)

    def _outgoing(self, instances: list[dict[str, str]]) -> tuple[list[Outgoing], list[str]]:
        uids = [item["sop_uid"] for item in instances]
        with self.sessions() as session:
            rows = {row.sop_uid: row for row in session.scalars(select(Instance).where(Instance.sop_uid.in_(uids)))}
        outgoing = [Outgoing(uid, rows[uid].sop_class_uid, rows[uid].transfer_syntax_uid,
                             self.archive.absolute(rows[uid].file_path)) for uid in uids if uid in rows]
        return outgoing, [uid for uid in uids if uid not in rows]

    def _delivered(self, claimed: Round) -> set[tuple[str, str]]:
        with self.sessions() as session:
            sends = session.execute(select(Send.destination, Send.sop_uid, Send.status)
                                    .where(Send.job_pk == claimed.job_id, Send.round == claimed.round)).all()
        return {(s.destination, s.sop_uid) for s in sends if SendOutcome(s.sop_uid, s.status).delivered}

    def _record(self, claimed: Round, destination: Destination, outcomes: list[SendOutcome]) -> None:
        if not outcomes:
            return
        now = utcnow()
        with transaction(self.sessions) as session:
            session.add_all(Send(job_pk=claimed.job_id, destination=destination.name, sop_uid=o.sop_uid,
                                 round=claimed.round, attempt=claimed.attempt, status=o.status,
                                 error=o.error[:1000], sent_at=now) for o in outcomes)
        ok = sum(o.delivered for o in outcomes)
        log.info("job %d: %s: %d of %d instance(s) delivered (attempt %d)", claimed.job_id,
                 destination.name, ok, len(outcomes), claimed.attempt)
        for o in outcomes:
            audit("result.sent", job_id=claimed.job_id, destination=destination.name,
                  destination_ae=destination.ae_title, address=destination.host, port=destination.port,
                  tls=destination.tls.enabled, sop_uid=o.sop_uid, delivered=o.delivered,
                  status=None if o.status is None else f"0x{o.status:04X}", round=claimed.round,
                  attempt=claimed.attempt, reason=o.error[:200] or None)

    def _retry_or_park(self, claimed: Round, problems: list[str]) -> DispatchState:
        limit = self.settings.dispatch.max_attempts
        reason = "; ".join(problems)
        if claimed.attempt >= limit:
            log.error("job %d: dispatch failed after %d attempts: %s", claimed.job_id, claimed.attempt, reason)
            return self._finish(claimed, DispatchState.failed,
                                f"dispatch failed after {claimed.attempt} attempts: {reason}")
        delay = backoff(self.settings.dispatch, claimed.attempt)
        log.warning("job %d: dispatch attempt %d of %d incomplete (%s); next in %.1f s",
                    claimed.job_id, claimed.attempt, limit, reason, delay)
        self._update(claimed, dispatch_attempts=claimed.attempt,
                     dispatch_due_at=utcnow() + dt.timedelta(seconds=delay), error=f"dispatch: {reason}")
        return DispatchState.pending

    def _finish(self, claimed: Round, outcome: DispatchState, error: str) -> DispatchState:
        values: dict[str, Any] = {"dispatch_state": outcome, "dispatch_attempts": claimed.attempt,
                                  "dispatch_due_at": None, "error": error[:2000]}
        if outcome == DispatchState.sent:
            values["dispatched_at"] = utcnow()
            log.info("job %d: results delivered to every destination", claimed.job_id)
        if outcome == DispatchState.failed:
            values["state"] = JobState.failed
        if self._update(claimed, **values) and outcome != DispatchState.none:
            audit("job.dispatched" if outcome == DispatchState.sent else "job.failed", job_id=claimed.job_id,
                  dispatch_state=outcome.value, round=claimed.round, attempt=claimed.attempt,
                  reason="dispatch failed after the last attempt" if outcome == DispatchState.failed else None)
        return outcome

    def _update(self, claimed: Round, **values: Any) -> bool:
        """Write the outcome unless the job moved on meanwhile (re-run, or a newer round)."""
        with transaction(self.sessions) as session:
            return session.execute(
                update(Job).where(Job.id == claimed.job_id, Job.state == JobState.done,
                                  Job.dispatch_state == DispatchState.pending, Job.dispatch_round == claimed.round)
                .values(**values).execution_options(synchronize_session=False)).rowcount == 1


def _problems(destination: Destination, outcomes: list[SendOutcome]) -> list[str]:
    failed = [o for o in outcomes if not o.delivered]
    if not failed:
        return []
    first = failed[0]
    what = f"status 0x{first.status:04X}" if first.status is not None else (first.error or "no answer")
    return [f"{destination.name}: {len(failed)} of {len(outcomes)} not delivered ({what})"]
