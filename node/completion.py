"""Completion: deciding when a series has fully arrived, then routing it.

- A projection radiograph (CR, DX, mammography and intra-oral SOP classes, or modality CR/DX/MG/IO/PX)
  is one image: its series completes on arrival.
- Any other series completes when the index holds its expected count of instances (Images in
  Acquisition, when the modality sends it) or after ``completion.quiet_seconds`` without a new
  instance (checked by :class:`CompletionMonitor` every ``completion.poll_seconds``).
- A late instance re-opens a complete series (``record_instance`` reports it); its next completion
  routes it again, and the existing jobs are re-queued with ``generation + 1``.

Completing is a state change under a row lock (``receiving`` → ``complete``), so two associations
finishing the same series at once, or the monitor racing a C-STORE, route it once.

None of this is on the C-STORE response path: the handler answers once the instance is on disk and
indexed, and hands it to :class:`CompletionQueue` (one thread, bounded). Whatever that part loses (a
full queue, an exception, a process killed before it ran) leaves the series ``receiving`` in the
index, and the monitor completes it: a single-image series within ``LOST_COMPLETION_SECONDS``,
any other after the quiet period. A job row whose publish was lost stays ``queued`` for the reconciler.
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydicom.uid import (
    ComputedRadiographyImageStorage, DigitalIntraOralXRayImageStorageForPresentation,
    DigitalIntraOralXRayImageStorageForProcessing, DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing, DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
)
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from config.settings import RoutingRule
from common.logs import log_context
from node.routing import RoutingDecision, route_series
from storage.audit import audit
from storage.db import transaction
from storage.index import InstanceHeader
from storage.ingest import Outcome, StoreResult
from storage.models import Series, SeriesState, utcnow

log = logging.getLogger(__name__)

PROJECTION_RADIOGRAPHY_SOP_CLASSES = frozenset({
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation, DigitalXRayImageStorageForProcessing,
    DigitalMammographyXRayImageStorageForPresentation, DigitalMammographyXRayImageStorageForProcessing,
    DigitalIntraOralXRayImageStorageForPresentation, DigitalIntraOralXRayImageStorageForProcessing,
})
SINGLE_IMAGE_MODALITIES = frozenset({"CR", "DX", "MG", "IO", "PX"})

Enqueue = Callable[[int], None]

LOST_COMPLETION_SECONDS = 2.0
"""A single-image series still receiving this long after its instance was stored lost its completion
(a full completion queue, an exception, a crash); before, the completion queue is still on it."""


def complete_on_arrival(header: InstanceHeader) -> bool:
    """A projection radiograph is a series of one image: nothing more is coming."""
    return (header.sop_class_uid in PROJECTION_RADIOGRAPHY_SOP_CLASSES
            or header.modality.upper() in SINGLE_IMAGE_MODALITIES)


@dataclass(frozen=True)
class Completed:
    """A series that completed just now, how it was routed, and the jobs handed to the queue."""

    series_pk: int
    decision: RoutingDecision
    job_ids: tuple[int, ...]
    recompleted: bool


class Completion:
    """Completes series and routes them; thread-safe (each call uses its own session)."""

    def __init__(self, sessions: sessionmaker[Session], rules: Sequence[RoutingRule], *,
                 quiet_seconds: float, enqueue: Enqueue | None = None) -> None:
        self.sessions = sessions
        self.rules = list(rules)
        self.quiet = dt.timedelta(seconds=quiet_seconds)
        self.enqueue = enqueue

    def after_store(self, result: StoreResult, header: InstanceHeader) -> Completed | None:
        """Called by the C-STORE handler once an instance is committed."""
        if result.series_pk is None or result.outcome not in (Outcome.stored, Outcome.conflict_replaced):
            return None
        expected_count_reached = (header.expected_count and result.series_instances is not None
                                  and result.series_instances >= header.expected_count)
        if complete_on_arrival(header) or expected_count_reached:
            return self.complete(result.series_pk)
        return None

    def complete_quiet(self, now: dt.datetime | None = None) -> list[Completed]:
        """Complete every receiving series that has had no new instance for the quiet period, and
        every single-image series (CR, DX, ...: complete on arrival) still receiving
        ``LOST_COMPLETION_SECONDS`` after its instance arrived: its completion was lost."""
        now = now or utcnow()
        cutoff = now - self.quiet
        lost = now - dt.timedelta(seconds=LOST_COMPLETION_SECONDS)
        with self.sessions() as session:
            quiet = list(session.scalars(select(Series.id).where(
                Series.state == SeriesState.receiving, Series.last_received_at <= cutoff)
                .order_by(Series.last_received_at)))
            single = list(session.scalars(select(Series.id).where(
                Series.state == SeriesState.receiving, Series.last_received_at > cutoff,
                Series.last_received_at <= lost, Series.modality.in_(sorted(SINGLE_IMAGE_MODALITIES)))
                .order_by(Series.last_received_at)))
        completed = [self.complete(series_pk, received_before=cutoff) for series_pk in quiet]
        completed += [self.complete(series_pk) for series_pk in single]
        return [done for done in completed if done is not None]

    def complete(self, series_pk: int, *, received_before: dt.datetime | None = None) -> Completed | None:
        """Mark the series complete and route it, unless it already is complete (or, for a quiet-period
        completion, an instance arrived after ``received_before``). Jobs are enqueued after commit."""
        with transaction(self.sessions) as session:
            series = session.scalar(select(Series).where(Series.id == series_pk).with_for_update())
            if series is None or series.state != SeriesState.receiving:
                return None
            if received_before is not None and series.last_received_at > received_before:
                return None
            series.state = SeriesState.complete
            series.completed_at = utcnow()
            series.completions = (series.completions or 0) + 1
            decision, job_ids = route_series(session, series, self.rules)
            recompleted = series.completions > 1
            study_pk, series_uid = series.study_pk, series.series_uid
        with log_context(series_pk=series_pk, study_pk=study_pk):
            log.info("series %s complete%s: %s; jobs %s", series_pk, " again" if recompleted else "",
                     decision.reason, list(job_ids) or "none")
            audit("series.complete", series_pk=series_pk, study_pk=study_pk, series_uid=series_uid,
                  rules=list(decision.rules), pipelines=list(decision.pipelines), job_ids=list(job_ids),
                  reopened=recompleted)
            for job_id in job_ids:
                audit("job.queued", job_id=job_id, series_pk=series_pk, study_pk=study_pk,
                      reason="series complete again" if recompleted else "series complete")
            self._enqueue(job_ids)
        return Completed(series_pk, decision, tuple(job_ids), recompleted)

    def _enqueue(self, job_ids: Sequence[int]) -> None:
        """Hand the job ids to the queue (which notes ``Job.enqueued_at``); a failure leaves the job
        ``queued`` for the reconciler."""
        if self.enqueue is None:
            return
        for job_id in job_ids:
            try:
                self.enqueue(job_id)
            except Exception as exc:  # noqa: BLE001 - the database row is the truth; the reconciler retries
                log.warning("job %s stays queued, enqueue failed: %s", job_id, type(exc).__name__)


class CompletionMonitor:
    """A background thread completing series after their quiet period; ``stop()`` ends it."""

    def __init__(self, completion: Completion, poll_seconds: float) -> None:
        self.completion = completion
        self.poll_seconds = poll_seconds
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="cradle-completion", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stopping.wait(self.poll_seconds):
            try:
                self.completion.complete_quiet()
            except Exception as exc:  # noqa: BLE001 - keep polling; the database may come back
                log.exception("completion monitor: %s", type(exc).__name__)


class CompletionQueue:
    """Completion, routing and the job publish, off the C-STORE response path.

    The store handler calls :meth:`submit` once an instance is committed and answers the sender at
    once; one thread runs :meth:`Completion.after_store` in arrival order, so a slow or blocked
    broker delays jobs, never a response. At most ``capacity`` instances wait: beyond that (or after
    ``stop``) an instance is not queued and the monitor completes its series (see the module's
    docstring). ``stop`` drains what is queued, for at most ``timeout`` seconds.
    """

    def __init__(self, completion: Completion, capacity: int = 10_000) -> None:
        self.completion = completion
        self._queue: queue.Queue[tuple[StoreResult, InstanceHeader] | None] = queue.Queue(maxsize=capacity)
        self._thread: threading.Thread | None = None
        self.dropped = 0

    def start(self) -> "CompletionQueue":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cradle-after-store", daemon=True)
            self._thread.start()
        return self

    def submit(self, result: StoreResult, header: InstanceHeader) -> bool:
        """Queue a committed instance for completion; False (left to the monitor) when full or stopped."""
        if self._thread is None:
            return False
        try:
            self._queue.put_nowait((result, header))
            return True
        except queue.Full:
            self.dropped += 1
            log.warning("completion queue full: series %s is left to the completion monitor", result.series_pk)
            return False

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def stop(self, timeout: float = 10.0) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        deadline = time.monotonic() + timeout
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive() or self.waiting:
            log.warning("completion queue stopped with work left (%d waiting); the completion monitor "
                        "completes those series at the next start", self.waiting)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            result, header = item
            try:
                self.completion.after_store(result, header)
            except Exception as exc:  # noqa: BLE001 - the instance is committed; the monitor catches up
                log.exception("completion after instance %s failed (%s); the completion monitor will "
                              "complete series %s", result.instance_pk, type(exc).__name__, result.series_pk)
