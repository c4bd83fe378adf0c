"""The job queue: one Celery app built from the node's settings, and job publishing.

The broker carries job ids only; the ``Job`` row is the truth (:mod:`storage.jobs`). Embedded
default: kombu's SQLAlchemy transport on a SQLite file (``sqla+sqlite:///...``), which survives a
restart and needs no server; Redis (``redis://host:6379/N``) in production, with its
``visibility_timeout`` above the hard time limit so a running job is not re-delivered.

There is no module-level app: ``make_celery(settings)`` builds one. ``JobQueue(settings).enqueue(job_id)``
is what the listener calls; ``cradle worker`` adds the tasks it runs (:mod:`inference.worker`,
:mod:`training.tasks`) and runs the app in the foreground. Torch-free, like the rest of ``node``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from celery import Celery
from kombu.transport import sqlalchemy as kombu_sqla
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from storage import jobs
from storage.db import configured_engine, create_private_file, session_factory

log = logging.getLogger(__name__)

DEFAULT_QUEUE = "cradle"
RUN_JOB = "cradle.run_job"
SQLITE_POLL_SECONDS = 0.1
"""How often a worker polls the embedded SQLite broker: cheap, and most of a CR's latency budget."""

BROKER_SOCKET_TIMEOUT = 10
"""Seconds a Redis broker may take to answer (connect, publish) before the publish fails."""

EMBEDDED_TRANSPORT = "node.queue:EmbeddedTransport"
_SQLA_PREFIXES = ("sqla+", "sqlalchemy+")
_ENGINE_OPTIONS = ("connect_args", "pool_pre_ping", "pool_recycle", "echo")


# --- the embedded broker -----------------------------------------------------------------------


class _EmbeddedChannel(kombu_sqla.Channel):
    """kombu's SQLAlchemy channel, but only engine options reach ``create_engine`` (kombu passes
    every transport option, so ``polling_interval`` would break it), and SQLite runs in WAL mode
    with a busy timeout so the listener's publishes and the worker's polls wait for each other."""

    def _engine_from_config(self) -> Engine:
        from sqlalchemy import create_engine, event

        conninfo = self.connection.client
        options = {k: v for k, v in conninfo.transport_options.items() if k in _ENGINE_OPTIONS}
        engine = create_engine(conninfo.hostname, **options)
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", _broker_sqlite_pragmas)
        return engine


def _broker_sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


class EmbeddedTransport(kombu_sqla.Transport):
    Channel = _EmbeddedChannel


class DeliveredMessages:
    """kombu's SQL transport marks a delivered message invisible and never deletes it; kombu puts
    an unacknowledged message back as a new row, so the invisible rows are dead weight."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self._engine: Engine | None = None

    def prune(self) -> int:
        from sqlalchemy import create_engine, text
        from sqlalchemy.exc import OperationalError

        if self._engine is None:
            self._engine = create_engine(self.database_url, connect_args={"timeout": 30})
        try:
            with self._engine.begin() as connection:
                removed = connection.execute(text("DELETE FROM kombu_message WHERE visible = :no"),
                                             {"no": False}).rowcount
        except OperationalError:  # no table yet: nothing was ever published
            return 0
        if removed:
            log.debug("embedded broker: pruned %d delivered messages", removed)
        return removed


def _is_sqla(url: str) -> bool:
    return url.startswith(_SQLA_PREFIXES)


def _sqla_database_url(url: str) -> str:
    return url.split("+", 1)[1]


def _prepare_sqlite_broker(url: str) -> None:
    """The embedded broker's file, created owner-only (SQLite would use the umask)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        create_private_file(Path(parsed.database))


# --- configuration -----------------------------------------------------------------------------


def broker_options(settings: Settings) -> tuple[str, str | None, dict[str, Any]]:
    """(broker URL, transport, transport options) for the configured ``queue.broker_url``."""
    url = settings.queue.broker_url
    if _is_sqla(url):
        database = _sqla_database_url(url)
        _prepare_sqlite_broker(database)
        return database, EMBEDDED_TRANSPORT, {"polling_interval": SQLITE_POLL_SECONDS,
                                              "connect_args": {"timeout": 30}}
    # a broker that accepts connections and never answers would hang a publish for ever
    options: dict[str, Any] = {"visibility_timeout": settings.queue.visibility_timeout,
                               "socket_timeout": BROKER_SOCKET_TIMEOUT, "socket_connect_timeout": BROKER_SOCKET_TIMEOUT}
    return url, None, options


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery settings cradle relies on (see DESIGN.md, 'Celery task design')."""
    url, transport, transport_options = broker_options(settings)
    limit = settings.queue.task_time_limit
    config: dict[str, Any] = {
        "broker_url": url,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": limit,
        "task_soft_time_limit": max(1, limit - max(1, min(30, limit // 10))),
        "task_default_queue": DEFAULT_QUEUE,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_publish_retry_policy": {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5,
                                      "interval_max": 2},
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,  # the lease stops a double run
        "worker_send_task_events": False,
        "worker_proc_alive_timeout": 120,  # the pool child loads the pipelines (torch) before it is up
        "task_send_sent_event": False,
    }
    if transport is not None:
        config["broker_transport"] = transport
        config["worker_enable_remote_control"] = False  # the SQL transport has no fanout
    return config


def make_celery(settings: Settings) -> Celery:
    """A Celery app configured from ``settings``. Publishing needs no task: a message names its
    task (``cradle.run_job``, ``cradle.train``); the worker registers what it runs
    (``inference.worker.register``, ``training.tasks.register``)."""
    app = Celery("cradle", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def publish(app: Celery, job_id: int, countdown: float | None = None) -> None:
    """Put job ``job_id`` on the queue for ``cradle.run_job`` (after ``countdown`` seconds)."""
    app.send_task(RUN_JOB, args=[job_id], countdown=countdown, retry=True)


# --- the listener's side -----------------------------------------------------------------------


class BrokerUnavailable(Exception):
    """The broker did not take the message (after kombu's publish retries)."""


class JobQueue:
    """Puts job ids on the broker and notes when (``Job.enqueued_at``, for the reconciler).

    ``enqueue`` raises BrokerUnavailable when the broker is down: the caller's job row stays
    ``queued`` and the reconciler enqueues it once the broker is back.
    """

    def __init__(self, settings: Settings, sessions: sessionmaker[Session] | None = None,
                 app: Celery | None = None) -> None:
        self.settings = settings
        self.app = app if app is not None else make_celery(settings)
        self.sessions = sessions if sessions is not None else session_factory(configured_engine(settings.storage))

    def enqueue(self, job_id: int, countdown: float | None = None) -> None:
        try:
            publish(self.app, job_id, countdown)
        except Exception as exc:  # noqa: BLE001 - kombu raises transport-specific errors
            log.warning("job %d: broker unavailable (%s); it stays queued for the reconciler",
                        job_id, type(exc).__name__)
            raise BrokerUnavailable(type(exc).__name__) from exc
        jobs.mark_enqueued(self.sessions, job_id)
        log.debug("job %d: enqueued", job_id)

    def reconciler(self) -> jobs.Reconciler:
        """The reconciler, with the embedded broker's housekeeping when that is the broker."""
        housekeeping = []
        if _is_sqla(self.settings.queue.broker_url):
            housekeeping.append(DeliveredMessages(_sqla_database_url(self.settings.queue.broker_url)).prune)
        return jobs.Reconciler(self.sessions, self.enqueue, self.settings.queue, housekeeping)

    def close(self) -> None:
        self.app.close()
