"""The Prometheus endpoint (``node.metrics_port``, served by the listener process).

Two kinds of numbers, one endpoint:

* :class:`ListenerMetrics`: counters kept by the listener as it works — instances received (by
  outcome), bytes received, associations (accepted/rejected) and rejections by reason (calling AE,
  called AE, host, TLS handshake, association limit), C-STORE responses by status; the completion
  queue's backlog and what it left to the monitor.
* :class:`IndexCollector`: read from the index at scrape time (cached ``cache_seconds``) — queue depth
  and the oldest queued job's age, jobs by pipeline and state, job durations and outcomes by pipeline
  and model version (a histogram over finished jobs, refreshed off the scrape, every minute), dispatch states, sends delivered and failed by
  destination. The workers and the dispatcher write these outcomes to the index, which is the truth
  for jobs, so one endpoint covers every worker process on every machine: no per-process ports, no
  multiprocess files, nothing lost when a worker is killed. Counts derived from rows only grow
  (``cradle_sends_total``) or are gauges; the duration histogram can step back when a job is re-run
  (its row holds the last attempt), which Prometheus treats as a counter reset.

Each Listener owns its registry (no module-level metric objects), so several listeners in one test
process do not collide. Nothing here reads a data set or a patient row.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from sqlalchemy.orm import Session, sessionmaker

from storage import stats

log = logging.getLogger(__name__)


class ListenerMetrics:
    """The listener's own counters, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.instances = Counter("cradle_instances_received", "C-STORE data sets received, by outcome "
                                 "(stored, duplicate, conflict_*, failed)", ["outcome"], registry=r)
        self.bytes = Counter("cradle_received_bytes", "Bytes of C-STORE data sets received", registry=r)
        self.associations = Counter("cradle_associations", "Association requests, by result (accepted, rejected)",
                                    ["result"], registry=r)
        self.rejections = Counter("cradle_association_rejections", "Associations rejected, by reason "
                                  "(calling_ae, called_ae, host, tls, limit)", ["reason"], registry=r)
        self.responses = Counter("cradle_c_store_responses", "C-STORE responses sent, by DIMSE status",
                                 ["status"], registry=r)
        self.completion_waiting = Gauge("cradle_completion_queue_waiting", "Stored instances waiting for "
                                        "completion and routing (answered already)", registry=r)
        self.completion_left = Gauge("cradle_completion_queue_left_to_monitor", "Stored instances the full "
                                     "completion queue left to the completion monitor, since start", registry=r)

    def response(self, status: int) -> None:
        self.responses.labels(status=f"0x{status:04X}").inc()


class IndexCollector:
    """Queue depth, jobs, dispatch and sends read from the index at scrape time (cached
    ``cache_seconds``); job durations, an aggregate over every finished job ever, refreshed on a
    thread of their own every ``history_seconds``, so a scrape never waits for a scan of the whole
    job table (about 2 s at 200,000 jobs on SQLite). The first scrape waits up to ``history_wait``
    for them; when they take longer they appear from the next scrape on."""

    def __init__(self, sessions: sessionmaker[Session], cache_seconds: float = 5.0, *,
                 history_seconds: float = 60.0, history_wait: float = 0.5) -> None:
        self.sessions = sessions
        self.cache_seconds = cache_seconds
        self.history_seconds, self.history_wait = history_seconds, history_wait
        self._lock = threading.Lock()
        self._cached: tuple[float, list[Metric]] | None = None
        self._history: list[Metric] = []
        self._history_at: float | None = None
        self._history_thread: threading.Thread | None = None

    def describe(self) -> list[Metric]:
        return []  # families are dynamic; the registry need not query the index when this is registered

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            if self._cached is None or time.monotonic() - self._cached[0] > self.cache_seconds:
                self._cached = (time.monotonic(), self._read())
            current = self._cached[1]
        yield from current
        yield from self._durations()

    def _read(self) -> list[Metric]:
        up = GaugeMetricFamily("cradle_index_up", "1 when the index answered the last scrape")
        try:
            with self.sessions() as session:
                families = self._families(session)
        except Exception as exc:  # noqa: BLE001 - a scrape must answer even with the database down
            log.warning("metrics: index unavailable (%s)", type(exc).__name__)
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        return [up, *families]

    def _durations(self) -> list[Metric]:
        """The last durations computed; starts their refresh when due."""
        with self._lock:
            due = self._history_at is None or time.monotonic() - self._history_at > self.history_seconds
            if due and (self._history_thread is None or not self._history_thread.is_alive()):
                self._history_thread = threading.Thread(target=self._refresh_durations, name="metrics-durations",
                                                        daemon=True)
                self._history_thread.start()
            waiting = self._history_thread if self._history_at is None else None
        if waiting is not None:
            waiting.join(self.history_wait)
        with self._lock:
            return list(self._history)

    def _refresh_durations(self) -> None:
        families = None
        try:
            with self.sessions() as session:
                families = self.duration_families(session)
        except Exception as exc:  # noqa: BLE001 - the scrape goes on with the last values
            log.warning("metrics: job durations not read (%s)", type(exc).__name__)
        with self._lock:
            if families is not None:
                self._history = families
            self._history_at = time.monotonic()

    @staticmethod
    def duration_families(session: Session) -> list[Metric]:
        durations = HistogramMetricFamily(
            "cradle_job_duration_seconds", "Duration of finished jobs (last attempt), by pipeline, model "
            "version and outcome (done, failed, skipped)", labels=["pipeline", "model_version", "outcome"])
        finished = CounterMetricFamily("cradle_jobs_finished", "Finished jobs by pipeline, model version and "
                                       "outcome", labels=["pipeline", "model_version", "outcome"])
        for d in stats.durations(session):
            labels = [d.pipeline, d.model_version, d.outcome]
            buckets = [(_le(bound), n) for bound, n in zip(stats.DURATION_BUCKETS, d.buckets)] + [("+Inf", d.count)]
            durations.add_metric(labels, buckets, sum_value=d.total_seconds)
            finished.add_metric(labels, d.count)
        return [durations, finished]

    @staticmethod
    def _families(session: Session) -> list[Metric]:
        queue = stats.queue(session)
        depth = GaugeMetricFamily("cradle_queue_depth", "Jobs waiting for a worker (state queued)")
        depth.add_metric([], queue["queued"])
        oldest = GaugeMetricFamily("cradle_queue_oldest_seconds", "Age of the oldest queued job, seconds")
        oldest.add_metric([], queue["oldest_queued_seconds"])
        jobs = GaugeMetricFamily("cradle_jobs", "Jobs by pipeline and state", labels=["pipeline", "state"])
        for pipeline, state, n in stats.jobs_by_pipeline_and_state(session):
            jobs.add_metric([pipeline, state], n)
        dispatch = GaugeMetricFamily("cradle_dispatch_jobs", "Jobs by dispatch state (pending, sent, failed)",
                                     labels=["state"])
        for state, n in stats.dispatch_states(session).items():
            dispatch.add_metric([state], n)
        sends = CounterMetricFamily("cradle_sends", "C-STORE attempts of results, by destination and result "
                                    "(delivered, failed)", labels=["destination", "result"])
        failures = CounterMetricFamily("cradle_send_failures", "C-STORE attempts of results a destination did "
                                       "not take (failure status or no answer)", labels=["destination"])
        for destination, counts in stats.sends(session).items():
            sends.add_metric([destination, "delivered"], counts["delivered"])
            sends.add_metric([destination, "failed"], counts["failed"])
            failures.add_metric([destination], counts["failed"])
        return [depth, oldest, jobs, dispatch, sends, failures]


def _le(bound: float) -> str:
    return f"{bound:g}" if bound != int(bound) else f"{bound:.1f}"


class MetricsServer:
    """``http://host:port/metrics`` over a registry; ``stop()`` closes it."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.registry, self.host, self.port = registry, host, port
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> "MetricsServer":
        self._server, self._thread = start_http_server(self.port, addr=self.host, registry=self.registry)
        self.port = self._server.server_address[1]
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
