"""Job state transitions on the index: leases, outcomes, manual retries, and the reconciler.

The ``Job`` row is the truth; the broker only carries job ids. Every transition here is a
compare-and-set ``UPDATE`` whose ``WHERE`` names the state (and lease owner, attempts, generation)
the caller saw, so two workers, a worker and the reconciler, or two dispatchers can race freely:
exactly one wins, the others see zero rows changed and back off.

States: ``queued`` → ``running`` (leased) → ``done`` | ``skipped`` | ``failed``; a failed attempt
goes back to ``queued`` until ``queue.max_attempts``. A lease expires ``LEASE_GRACE_SECONDS`` after
the hard time limit (by then the worker process is surely gone), or at once when its owner is a
process on this host that no longer exists (a worker killed mid-job).

Torch-free: imported by the listener, the dispatcher and the CLI.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from config.settings import QueueSettings
from storage.audit import audit, current_user
from storage.db import transaction
from storage.models import DispatchState, Job, JobState, utcnow

log = logging.getLogger(__name__)

LEASE_GRACE_SECONDS = 60
"""A lease outlives the hard time limit by this much: the pool kills the task before it expires."""

ERROR_LIMIT = 2000
NEW_JOB_GRACE_SECONDS = 5
"""A job created this recently and not yet enqueued is its creator's to enqueue, not the reconciler's."""


@dataclass(frozen=True)
class Lease:
    """A job taken by one worker process: what the runner needs, and what the CAS checks."""

    job_id: int
    owner: str
    series_pk: int
    pipeline: str
    generation: int
    attempts: int
    shadow: str = ""
    """The model version of a shadow run; empty for the clinical run."""


class Finish(str, enum.Enum):
    done = "done"
    skipped = "skipped"
    failed = "failed"
    requeued = "requeued"        # back to queued: another attempt (or a superseding re-run) is due
    lost = "lost"                # the lease was taken over meanwhile; nothing was written
    not_run = "not-run"          # not taken: finished already, or running under a live lease


class RetryAction(str, enum.Enum):
    rerun = "rerun"              # back to queued: enqueue it
    resend = "resend"            # dispatch again (same result UIDs)


class RetryRefused(Exception):
    """The job is not in a state a manual retry applies to; the message says why."""


# --- lease owners ------------------------------------------------------------------------------


def process_identity(pid: int | None = None) -> str:
    """``host/pid/start``: names this process uniquely even after its pid is reused."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()[:80]}/{pid}/{_process_start(pid) or '-'}"


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), or None when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def owner_is_dead(owner: str) -> bool:
    """True when ``owner`` is a process of this host that has exited. Owners on other hosts are
    never declared dead here: their leases end by expiry."""
    try:
        host, pid_text, start = owner.rsplit("/", 2)
        pid = int(pid_text)
    except ValueError:
        return False
    if host != socket.gethostname()[:80]:
        return False
    current = _process_start(pid)
    if current is not None and start != "-":
        return current != start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def lease_seconds(queue: QueueSettings) -> int:
    return queue.task_time_limit + LEASE_GRACE_SECONDS


# --- worker side -------------------------------------------------------------------------------


def claim(sessions: sessionmaker[Session], job_id: int, owner: str, *, lease_for: int,
          max_attempts: int) -> Lease | None:
    """Take the lease on ``job_id`` if it is queued, or running under a stale lease.

    Returns None when the job is gone, finished, or running under a live lease elsewhere. A stale
    job that already used ``max_attempts`` is failed instead of taken.
    """
    with sessions() as session:
        job = session.get(Job, job_id)
        if job is None:
            log.warning("job %d: not in the index", job_id)
            return None
        seen = _snapshot(job)
    now = utcnow()
    if seen["state"] == JobState.running:
        if not lease_is_stale(seen, now):
            log.info("job %d: running under a live lease elsewhere; not taken", job_id)
            return None
        if seen["attempts"] >= max_attempts:
            _fail_stale(sessions, job_id, seen, max_attempts)
            return None
    elif seen["state"] != JobState.queued:
        log.info("job %d: already %s; nothing to do", job_id, seen["state"].value)
        return None
    values = {"state": JobState.running, "lease_owner": owner, "attempts": seen["attempts"] + 1,
              "lease_expires_at": now + dt.timedelta(seconds=lease_for), "started_at": now,
              "finished_at": None}
    if not _compare_and_set(sessions, job_id, seen, values):
        log.info("job %d: another worker took it first", job_id)
        return None
    audit("job.running", job_id=job_id, series_pk=seen["series_pk"], pipeline=seen["pipeline"],
          attempt=seen["attempts"] + 1, generation=seen["generation"], owner=owner,
          reason="stale lease taken over" if seen["state"] == JobState.running else None)
    return Lease(job_id, owner, seen["series_pk"], seen["pipeline"], seen["generation"], seen["attempts"] + 1,
                 seen["shadow"] or "")


def lease_is_stale(seen: dict[str, Any], now: dt.datetime) -> bool:
    expires = seen["lease_expires_at"]
    return expires is None or expires < now or owner_is_dead(seen["lease_owner"])


def _snapshot(job: Job) -> dict[str, Any]:
    return {key: getattr(job, key) for key in (
        "state", "lease_owner", "lease_expires_at", "attempts", "generation", "series_pk", "pipeline", "shadow")}


def _compare_and_set(sessions: sessionmaker[Session], job_id: int, seen: dict[str, Any],
                     values: dict[str, Any]) -> bool:
    statement = (update(Job)
                 .where(Job.id == job_id, Job.state == seen["state"], Job.lease_owner == seen["lease_owner"],
                        Job.attempts == seen["attempts"], Job.generation == seen["generation"])
                 .values(**values).execution_options(synchronize_session=False))
    with transaction(sessions) as session:
        return session.execute(statement).rowcount == 1


def _fail_stale(sessions: sessionmaker[Session], job_id: int, seen: dict[str, Any], max_attempts: int) -> bool:
    error = (f"worker lost (killed, out of memory, or over the time limit) on attempt "
             f"{seen['attempts']} of {max_attempts}")
    failed = _compare_and_set(sessions, job_id, seen, {
        "state": JobState.failed, "error": error, "lease_owner": "", "lease_expires_at": None,
        "finished_at": utcnow()})
    if failed:
        log.warning("job %d: failed: %s", job_id, error)
        audit("job.failed", job_id=job_id, series_pk=seen["series_pk"], pipeline=seen["pipeline"],
              attempt=seen["attempts"], reason="worker lost", owner=seen["lease_owner"])
    return failed


def _owned(lease: Lease) -> tuple:
    return (Job.id == lease.job_id, Job.state == JobState.running, Job.lease_owner == lease.owner)


def _update_owned(sessions: sessionmaker[Session], lease: Lease, *extra: Any, **values: Any) -> bool:
    statement = (update(Job).where(*_owned(lease), *extra).values(**values)
                 .execution_options(synchronize_session=False))
    with transaction(sessions) as session:
        return session.execute(statement).rowcount == 1


_RELEASE: Mapping[str, Any] = MappingProxyType({"lease_owner": "", "lease_expires_at": None})


def complete(sessions: sessionmaker[Session], lease: Lease, *, model_version: str,
             result: dict[str, Any], has_output: bool) -> Finish:
    """Mark the leased job done with its result; hand it to dispatch when it produced instances.

    If the series was re-opened while the job ran (``generation`` moved), the job goes back to
    ``queued`` instead (the caller enqueues it): the re-run supersedes, with the same UIDs.
    """
    now = utcnow()
    dispatch = ({"dispatch_state": DispatchState.pending, "dispatch_round": Job.dispatch_round + 1,
                 "dispatch_attempts": 0, "dispatch_due_at": now, "dispatched_at": None}
                if has_output else {"dispatch_state": DispatchState.none})
    if _update_owned(sessions, lease, Job.generation == lease.generation, state=JobState.done,
                     model_version=model_version[:128], result=result, error="", finished_at=now,
                     **_RELEASE, **dispatch):
        audit("job.done", **_about(lease), model_version=model_version[:128],
              result_uids=[item.get("sop_uid") for item in result.get("instances") or []],
              dispatch_state="pending" if has_output else "none")
        return Finish.done
    if release_superseded(sessions, lease) == Finish.requeued:
        log.info("job %d: series re-opened while running; re-queued to supersede", lease.job_id)
        return Finish.requeued
    log.warning("job %d: lease lost before completion; result left to the current owner", lease.job_id)
    return Finish.lost


def still_owned(sessions: sessionmaker[Session], lease: Lease) -> bool:
    """The job is still running under this lease, for the generation it started with."""
    with sessions() as session:
        row = session.execute(select(Job.state, Job.lease_owner, Job.generation)
                              .where(Job.id == lease.job_id)).first()
    return row is not None and tuple(row) == (JobState.running, lease.owner, lease.generation)


def release_superseded(sessions: sessionmaker[Session], lease: Lease) -> Finish:
    """Give back a lease whose series was re-opened meanwhile: ``queued`` again, this attempt not
    counted. When someone else already re-queued or took the job, nothing is written."""
    if _update_owned(sessions, lease, Job.generation != lease.generation, state=JobState.queued,
                     attempts=Job.attempts - 1, error="", **_RELEASE):
        audit("job.queued", **_about(lease), reason="series re-opened while running: superseded")
        return Finish.requeued
    return Finish.lost


def skip(sessions: sessionmaker[Session], lease: Lease, reason: str) -> Finish:
    """No clinical output by design (e.g. no active model): ``skipped`` with the reason."""
    if _update_owned(sessions, lease, state=JobState.skipped, error=reason[:ERROR_LIMIT], result=None,
                     finished_at=utcnow(), dispatch_state=DispatchState.none, **_RELEASE):
        audit("job.skipped", **_about(lease), reason=reason[:200])
        return Finish.skipped
    return Finish.lost


def fail_attempt(sessions: sessionmaker[Session], lease: Lease, error: str, *, max_attempts: int,
                 permanent: bool = False) -> Finish:
    """An attempt raised: back to ``queued`` (the error stays visible) or, after the last attempt
    (or at once when retrying cannot help), ``failed``."""
    error = error[:ERROR_LIMIT]
    error_type = error.split(":", 1)[0][:80]  # the audit trail keeps the kind of error, not its text
    if permanent:
        if _update_owned(sessions, lease, state=JobState.failed, error=error, finished_at=utcnow(), **_RELEASE):
            audit("job.failed", **_about(lease), error_type=error_type, reason="permanent")
            return Finish.failed
        return Finish.lost
    if lease.attempts >= max_attempts:
        message = f"failed on attempt {lease.attempts} of {max_attempts}: {error}"
        if _update_owned(sessions, lease, state=JobState.failed, error=message[:ERROR_LIMIT],
                         finished_at=utcnow(), **_RELEASE):
            audit("job.failed", **_about(lease), error_type=error_type, reason="last attempt")
            return Finish.failed
        return Finish.lost
    if _update_owned(sessions, lease, state=JobState.queued, error=error, **_RELEASE):
        audit("job.queued", **_about(lease), error_type=error_type, reason="attempt failed; retried")
        return Finish.requeued
    return Finish.lost


def _about(lease: Lease) -> dict[str, Any]:
    return {"job_id": lease.job_id, "series_pk": lease.series_pk, "pipeline": lease.pipeline,
            "attempt": lease.attempts, "generation": lease.generation, "shadow": lease.shadow or None}


def mark_enqueued(sessions: sessionmaker[Session], job_id: int) -> None:
    with transaction(sessions) as session:
        session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=utcnow())
                        .execution_options(synchronize_session=False))


# --- manual retry ------------------------------------------------------------------------------


def retry(sessions: sessionmaker[Session], job_id: int) -> RetryAction:
    """``cradle jobs retry``: re-run a job that failed before output (or was skipped), re-send one
    that failed at dispatch (only what no destination acknowledged), or send a done job's results
    again to every destination. The result UIDs stay the same."""
    with transaction(sessions) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise RetryRefused(f"job {job_id} does not exist")
        action = _retry_action(job)
        now = utcnow()
        if action == RetryAction.rerun:
            job.state, job.attempts, job.error = JobState.queued, 0, ""
            job.lease_owner, job.lease_expires_at, job.finished_at = "", None, None
            job.dispatch_state = DispatchState.none
        else:
            if job.state == JobState.done:
                job.dispatch_round += 1
            job.state, job.error = JobState.done, ""
            job.dispatch_state, job.dispatch_attempts, job.dispatch_due_at = DispatchState.pending, 0, now
    log.info("job %d: manual retry: %s", job_id, action.value)
    audit("job.retry", job_id=job_id, action=action.value, by=current_user(),
          state="queued" if action == RetryAction.rerun else "done", dispatch_state="pending"
          if action == RetryAction.resend else None)
    return action


def _retry_action(job: Job) -> RetryAction:
    if job.state == JobState.failed and job.dispatch_state == DispatchState.failed:
        return RetryAction.resend
    if job.state in (JobState.failed, JobState.skipped):
        return RetryAction.rerun
    if job.state == JobState.done and job.result and job.result.get("instances"):
        return RetryAction.resend
    raise RetryRefused(f"job {job.id} is {job.state.value}; only failed, skipped, or done jobs "
                       f"with results can be retried")


# --- reconciler --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReconcileReport:
    requeued_lost: int = 0
    requeued_stale: int = 0
    failed_stale: int = 0


class Reconciler:
    """Re-enqueues jobs a lost message or a dead worker left behind.

    * ``queued`` jobs never enqueued (``NEW_JOB_GRACE_SECONDS`` after their creation: the broker
      was down when the listener tried), or enqueued longer ago than ``requeue_after`` (a message
      lost by the broker; a duplicate message is harmless: the lease lets one run);
    * ``running`` jobs whose lease expired or whose owner process on this host is gone: back to
      ``queued`` and enqueued, or ``failed`` once they used ``max_attempts``.
    """

    def __init__(self, sessions: sessionmaker[Session], enqueue: Callable[[int], None],
                 queue: QueueSettings, housekeeping: Sequence[Callable[[], object]] = ()) -> None:
        self.sessions = sessions
        self.enqueue = enqueue
        self.queue = queue
        self.housekeeping = tuple(housekeeping)

    @property
    def requeue_after(self) -> float:
        return max(float(self.queue.task_time_limit), 2 * self.queue.reconcile_seconds)

    def run_once(self) -> ReconcileReport:
        now = utcnow()
        lost = self._lost_queued(now)
        requeued, failed = self._stale_running(now)
        for job_id in [*lost, *requeued]:
            try:
                self.enqueue(job_id)
            except Exception as exc:  # noqa: BLE001 - broker down: the job stays queued; next pass
                log.warning("reconciler: job %d not enqueued (%s)", job_id, type(exc).__name__)
                break
        if lost or requeued or failed:
            log.info("reconciler: re-enqueued %d queued and %d stale jobs, failed %d",
                     len(lost), len(requeued), failed)
        for task in self.housekeeping:
            task()
        return ReconcileReport(len(lost), len(requeued), failed)

    def run(self, stop: threading.Event) -> None:
        """Every ``queue.reconcile_seconds`` until ``stop`` is set; errors are logged, not fatal."""
        while not stop.is_set():
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - the loop must survive a database or broker outage
                log.exception("reconciler pass failed; trying again in %.0f s", self.queue.reconcile_seconds)
            stop.wait(self.queue.reconcile_seconds)

    def _lost_queued(self, now: dt.datetime) -> list[int]:
        cutoff = now - dt.timedelta(seconds=self.requeue_after)
        new = now - dt.timedelta(seconds=NEW_JOB_GRACE_SECONDS)
        never_sent = Job.enqueued_at.is_(None) & (Job.created_at < new)
        with self.sessions() as session:
            return list(session.scalars(
                select(Job.id).where(Job.state == JobState.queued, never_sent | (Job.enqueued_at < cutoff))
                .order_by(Job.id)))

    def _stale_running(self, now: dt.datetime) -> tuple[list[int], int]:
        with self.sessions() as session:
            running = [(job.id, _snapshot(job)) for job in
                       session.scalars(select(Job).where(Job.state == JobState.running))]
        requeued, failed = [], 0
        for job_id, seen in running:
            if not lease_is_stale(seen, now):
                continue
            if seen["attempts"] >= self.queue.max_attempts:
                failed += _fail_stale(self.sessions, job_id, seen, self.queue.max_attempts)
            elif _compare_and_set(self.sessions, job_id, seen, {"state": JobState.queued, **_RELEASE}):
                log.warning("job %d: worker lost on attempt %d; re-queued", job_id, seen["attempts"])
                audit("job.queued", job_id=job_id, series_pk=seen["series_pk"], pipeline=seen["pipeline"],
                      attempt=seen["attempts"], owner=seen["lease_owner"], reason="worker lost; re-queued")
                requeued.append(job_id)
        return requeued, failed
