"""What the index says about the node's work: jobs by state, queue depth, job durations and outcomes
by pipeline and model version, dispatch states, sends by destination, what arrived, recent failures.

One set of queries for two readers: ``cradle status`` (at a glance) and the Prometheus endpoint
(``node.metrics``), so the numbers on the console and on the dashboard are the same. The workers and
the dispatcher write every outcome to the index (the source of truth for jobs), so reading it here
covers every worker on every machine without scraping each one. No patient identifiers are read.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.orm import Session

from storage.models import DispatchState, Instance, Job, JobState, Send, Series, utcnow

DURATION_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
"""Upper bounds (seconds) of the job duration histogram."""
FINISHED = (JobState.done, JobState.failed, JobState.skipped)


def _seconds_between(session: Session, start: Any, end: Any) -> Any:
    if session.get_bind().dialect.name == "postgresql":
        return func.extract("epoch", end - start)
    return (func.julianday(end) - func.julianday(start)) * 86400.0


def delivered_condition() -> Any:
    """A send the destination acknowledged: success (0x0000) or a warning (0x0001, 0xB000-0xBFFF)."""
    return or_(Send.status == 0x0000, Send.status == 0x0001, and_(Send.status >= 0xB000, Send.status <= 0xBFFF))


@dataclass
class Durations:
    pipeline: str
    model_version: str
    outcome: str
    count: int
    total_seconds: float
    max_seconds: float
    buckets: list[int] = field(default_factory=list)  # cumulative, one per DURATION_BUCKETS bound

    @property
    def mean_seconds(self) -> float:
        return self.total_seconds / self.count if self.count else 0.0


def jobs_by_pipeline_and_state(session: Session) -> list[tuple[str, str, int]]:
    rows = session.execute(select(Job.pipeline, Job.state, func.count()).group_by(Job.pipeline, Job.state)).all()
    return [(pipeline, _value(state), n) for pipeline, state, n in rows]


def queue(session: Session, now: dt.datetime | None = None) -> dict[str, Any]:
    """Jobs waiting (``queued``) and running, and how long the oldest has waited."""
    now = now or utcnow()
    queued, oldest = session.execute(select(func.count(), func.min(Job.created_at))
                                     .where(Job.state == JobState.queued)).one()
    running = session.scalar(select(func.count()).select_from(Job).where(Job.state == JobState.running))
    return {"queued": queued or 0, "running": running or 0,
            "oldest_queued_seconds": round((now - oldest).total_seconds(), 1) if oldest else 0.0}


def durations(session: Session, since: dt.datetime | None = None) -> list[Durations]:
    """Duration of the last attempt of every finished job (started → finished), or of those finished
    ``since`` (through the index on ``finished_at``), by pipeline, model version and outcome, with
    cumulative histogram buckets."""
    seconds = _seconds_between(session, Job.started_at, Job.finished_at)
    bucket_columns = [func.sum(case((seconds <= bound, 1), else_=0)) for bound in DURATION_BUCKETS]
    query = (select(Job.pipeline, Job.model_version, Job.state, func.count(), func.sum(seconds), func.max(seconds),
                    *bucket_columns)
             .where(Job.state.in_(FINISHED), Job.started_at.is_not(None), Job.finished_at.is_not(None))
             .group_by(Job.pipeline, Job.model_version, Job.state))
    if since is not None:
        query = query.where(Job.finished_at >= since)
    rows = session.execute(query).all()
    return [Durations(pipeline, model_version or "", _value(state), count, float(total or 0), float(longest or 0),
                      [int(b or 0) for b in buckets])
            for pipeline, model_version, state, count, total, longest, *buckets in rows]


def dispatch_states(session: Session) -> dict[str, int]:
    rows = session.execute(select(Job.dispatch_state, func.count()).where(Job.dispatch_state != DispatchState.none)
                           .group_by(Job.dispatch_state)).all()
    return {_value(state): n for state, n in rows}


def sends(session: Session, since: dt.datetime | None = None) -> dict[str, dict[str, int]]:
    """Destination → {"delivered": n, "failed": m} (every C-STORE attempt; failed includes no answer)."""
    delivered = delivered_condition()
    query = select(Send.destination, func.sum(case((delivered, 1), else_=0)),
                   func.sum(case((delivered, 0), else_=1))).group_by(Send.destination)
    if since is not None:
        query = query.where(Send.sent_at >= since)
    return {dest: {"delivered": int(ok or 0), "failed": int(bad or 0)} for dest, ok, bad in session.execute(query)}


def received(session: Session, since: dt.datetime | None = None) -> dict[str, int]:
    """Instances (and their bytes) received from other AEs, i.e. not this node's own results. Read from
    the index on (received_at, series_pk, file_size) alone, never from the instance rows."""
    results = select(Series.id).where(Series.is_result.is_(True))
    query = (select(func.count(), func.coalesce(func.sum(Instance.file_size), 0))
             .where(Instance.series_pk.not_in(results)))
    if since is not None:
        query = query.where(Instance.received_at >= since)
    count, size = session.execute(query).one()
    return {"instances": int(count or 0), "bytes": int(size or 0)}


def recent_failures(session: Session, limit: int = 5) -> dict[str, list[dict[str, Any]]]:
    """The latest failed jobs (with their error) and the latest sends a destination did not take."""
    jobs = session.execute(
        select(Job.id, Job.pipeline, Job.series_pk, Job.dispatch_state, Job.error, Job.finished_at)
        .where(Job.state == JobState.failed).order_by(Job.finished_at.desc().nulls_last(), Job.id.desc())
        .limit(limit)).all()
    failed_sends = session.execute(
        select(Send.job_pk, Send.destination, Send.sop_uid, Send.status, Send.error, Send.sent_at)
        .where(~delivered_condition() | Send.status.is_(None)).order_by(Send.sent_at.desc(), Send.id.desc())
        .limit(limit)).all()
    return {
        "jobs": [{"id": i, "pipeline": p, "series_pk": s, "dispatch_state": _value(d), "error": (e or "")[:200],
                  "finished_at": _iso(f)} for i, p, s, d, e, f in jobs],
        "sends": [{"job_id": j, "destination": d, "sop_uid": u,
                   "status": None if st is None else f"0x{st:04X}", "error": (e or "")[:200], "sent_at": _iso(t)}
                  for j, d, u, st, e, t in failed_sends],
    }


def _value(state: Any) -> str:
    return state.value if hasattr(state, "value") else str(state)


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None
