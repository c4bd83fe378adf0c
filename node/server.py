"""The listener: a pynetdicom AE answering C-ECHO and C-STORE, plus the completion monitor.

``Listener(settings, enqueue=...)`` is what ``cradle listen`` runs in the foreground and what
``cradle serve`` composes with the worker and dispatcher: ``start()`` finishes interrupted writes, opens
the port and starts the monitor; ``stop()`` closes the port, lets running associations finish, drains
the completion queue and stops the monitor. A C-STORE is answered once its instance is on disk and
indexed; completion, routing and the job publish run after, on the completion queue
(:class:`node.completion.CompletionQueue`).

pynetdicom logs identifiers (patient name and ID in its data set dumps) at DEBUG and pydicom logs
invalid element values (a malformed birth date, say) as warnings: :func:`protect_logs` keeps both
at WARNING/ERROR whatever ``logging.level`` says. Our own log lines carry UIDs, row ids and AE titles.
"""

from __future__ import annotations

import errno
import logging
import secrets
import ssl
import threading
import time
from collections.abc import Callable

from pydicom._uid_dict import UID_dictionary
from pydicom.uid import AllTransferSyntaxes, MediaStorageDirectoryStorage
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.orm import Session, sessionmaker

from common.logs import protect_logs
from config.settings import NodeSettings, Settings
from node import handlers
from node.completion import Completion, CompletionMonitor, CompletionQueue
from node.guard import ConnectionGate, ContextsCopiedCheaply, GuardedRequestHandler, pynetdicom_association_limit
from node.metrics import IndexCollector, ListenerMetrics, MetricsServer
from node.tls import tls_context
from storage.archive import Archive
from storage.db import open_configured_index
from storage.disk import watermark_of
from storage.ingest import Ingest, RecoveryReport

log = logging.getLogger(__name__)

Enqueue = Callable[[int], None]


def storage_sop_classes() -> list[str]:
    """Every standard storage SOP Class: pynetdicom's list plus those pydicom's dictionary names
    "... Storage" that it lacks (retired ones included; a modality may still send them)."""
    known = [cx.abstract_syntax for cx in AllStoragePresentationContexts]
    extra = sorted(uid for uid, (name, kind, *_rest) in UID_dictionary.items()
                   if kind == "SOP Class" and name.endswith(" Storage") and uid != MediaStorageDirectoryStorage
                   and uid not in known)
    return [str(uid) for uid in known] + extra


def supported_contexts() -> list[PresentationContext]:
    """Verification, and each storage SOP Class with every transfer syntax pydicom knows."""
    syntaxes = [str(ts) for ts in AllTransferSyntaxes]
    contexts = [build_context(Verification)]
    contexts.extend(build_context(uid, syntaxes) for uid in storage_sop_classes())
    return contexts


def build_ae(node: NodeSettings) -> AE:
    ae = AE(ae_title=node.ae_title)
    ae.supported_contexts = supported_contexts()
    ae.require_called_aet = True
    titles = list(node.calling_ae_hosts())
    if not titles and not node.loopback_only:
        # pynetdicom reads an empty list as "anyone": name a title nobody has (and EVT_REQUESTED rejects
        # everybody anyway, failing closed)
        titles = [f"NOBODY{secrets.token_hex(5).upper()}"]
    ae.require_calling_aet = titles  # checked again, with hosts and "empty means nobody", on EVT_REQUESTED
    ae.maximum_associations = pynetdicom_association_limit(node)  # ours is ConnectionGate.reserve
    ae.maximum_pdu_size = node.max_pdu_size
    # also how long an acceptor thread waits for the A-ASSOCIATE-RQ: just beyond the gate's deadline
    # (which cuts, logs and audits the connection first), so that no thread outlives it for long
    ae.acse_timeout = min(node.acse_timeout, node.association_deadline) + 1
    ae.dimse_timeout = node.dimse_timeout
    ae.network_timeout = node.network_timeout
    return ae


class AssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with the TLS handshake moved into the connection's own thread.

    pynetdicom wraps an accepted socket in ``get_request()``, on the accepting thread, with the
    handshake done at once and no timeout: one peer that connects and stays silent would stop the
    node from accepting anybody. Here the accepting thread only wraps; the handshake runs in the
    connection's thread with ``acse_timeout``, and a failure (plaintext peer, no or untrusted client
    certificate, TLS below 1.2) closes the connection, counted and audited as a rejection.
    """

    request_queue_size = 128  # the listen() backlog: socketserver's 5 drops SYNs (1 s client retries) in a burst
    metrics: ListenerMetrics | None = None
    handshake_timeout: float = 30.0
    read_timeout: float | None = None
    """Each ``recv``/``send`` on an accepted socket waits at most this long (``node.network_timeout``)."""
    gate: ConnectionGate | None = None
    node: NodeSettings | None = None
    _accept_trouble_logged: float = 0.0

    def report(self, reason: str, address: tuple, associated: bool) -> None:
        """A connection refused or cut by the gate or a receive guard: counted and audited."""
        handlers.connection_refused(reason, address, associated, self.metrics)

    def get_request(self):  # noqa: ANN201 - (socket, address)
        try:
            client, address = self.socket.accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # The connection stays in the backlog and select() keeps saying "readable": without
                # a pause the acceptor would spin at 100 % CPU until a descriptor is free.
                now = time.monotonic()
                if now - self._accept_trouble_logged > 10:
                    self._accept_trouble_logged = now
                    log.error("cannot accept connections: %s (raise LimitNOFILE, or lower "
                              "node.max_associations / node.max_pending_connections)", exc.strerror)
                time.sleep(0.1)
            raise
        client.settimeout(self.read_timeout)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def verify_request(self, request, client_address) -> bool:  # noqa: ANN001 - socketserver types
        """At most ``node.max_pending_connections`` connections wait for their association, each
        under the deadline; one more is closed at once (socketserver shuts it down)."""
        return self.gate is None or self.gate.admit(request, tuple(client_address))

    def process_request_thread(self, request, client_address) -> None:  # noqa: ANN001 - socketserver types
        if isinstance(request, ssl.SSLSocket):
            try:
                request.settimeout(self.handshake_timeout)
                request.do_handshake()
                request.settimeout(self.read_timeout)  # the gate's deadline still runs
            except (OSError, ValueError) as exc:
                if self.gate is not None:
                    self.gate.associating(request)
                handlers.tls_rejected(client_address, _ssl_reason(exc), self.metrics)
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or exc.__class__.__name__
    if isinstance(exc, TimeoutError):
        return "no handshake within the time limit"
    return type(exc).__name__


def event_handlers(node: NodeSettings, ingest: Ingest, completions: CompletionQueue | None,
                   metrics: ListenerMetrics | None = None, gate: ConnectionGate | None = None) -> list:
    after_store = completions.submit if completions is not None else None
    allowed = None if node.loopback_only else node.calling_ae_hosts()
    return [
        (evt.EVT_REQUESTED, handlers.handle_requested, [node.ae_title, allowed, gate, node.calling_ae_certificates()]),
        (evt.EVT_ACCEPTED, handlers.handle_accepted, [metrics]),
        (evt.EVT_REJECTED, handlers.handle_rejected, [metrics]),
        (evt.EVT_RELEASED, handlers.handle_released, [gate]),
        (evt.EVT_ABORTED, handlers.handle_aborted, [gate]),
        (evt.EVT_CONN_CLOSE, handlers.handle_connection_closed, [gate]),
        (evt.EVT_C_ECHO, handlers.handle_echo),
        (evt.EVT_C_STORE, handlers.handle_store, [ingest, after_store, metrics, handlers.StoreLimits.of(node)]),
    ]


class Listener:
    """The DICOM listener and the completion monitor of one node."""

    def __init__(self, settings: Settings, *, enqueue: Enqueue | None = None,
                 sessions: sessionmaker[Session] | None = None) -> None:
        self.settings = settings
        self._owns_index = sessions is None
        self.sessions = sessions if sessions is not None else open_configured_index(settings.storage)
        self.archive = Archive(settings.storage.archive_dir, fsync=settings.storage.fsync)
        storage = settings.storage
        self.ingest = Ingest(self.archive, self.sessions, duplicate_policy=settings.node.duplicate_policy,
                             watermark=watermark_of(storage.archive_dir, storage.min_free_bytes,
                                                    storage.min_free_percent))
        self.completion = Completion(self.sessions, settings.routing.rules,
                                     quiet_seconds=settings.completion.quiet_seconds, enqueue=enqueue)
        self.monitor = CompletionMonitor(self.completion, settings.completion.poll_seconds)
        self.completions = CompletionQueue(self.completion, settings.completion.queue_capacity)
        self.ae = build_ae(settings.node)
        self.metrics = ListenerMetrics()
        self.metrics.completion_waiting.set_function(lambda: self.completions.waiting)
        self.metrics.completion_left.set_function(lambda: self.completions.dropped)
        self.metrics.registry.register(IndexCollector(self.sessions))
        self.metrics_server: MetricsServer | None = None
        self._server = None
        self.gate: ConnectionGate | None = None
        self._previous_receive_to_files = False

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            return self.settings.node.host, self.settings.node.port
        return self._server.server_address[:2]

    def start(self) -> RecoveryReport:
        """Finish the writes a crash interrupted (the archive's journal, not a walk of the archive),
        then accept associations and start the completion monitor."""
        protect_logs()
        self.archive.ensure_root()
        report = self.ingest.recover()
        log.info("start: %d interrupted writes, %d temporary files removed, %d files re-indexed, %d unreadable "
                 "files", report.interrupted_writes, report.temporaries_removed, report.files_reindexed,
                 report.unreadable_files)
        node = self.settings.node
        if node.loopback_only:
            log.warning("node.allowed_calling_aets is not set: any calling AE title may associate, from the "
                        "loopback address only (set the list to accept modalities on the network)")
        elif not node.allowed_calling_aets:
            log.warning("node.allowed_calling_aets is empty: every association will be rejected")
        self.completions.start()
        self._server = self._start_server(node)
        self.monitor.start()
        if node.metrics_port:
            self.metrics_server = MetricsServer(self.metrics.registry, node.metrics_host, node.metrics_port).start()
        log.info("listening as %s on %s:%d%s", node.ae_title, *self.address, " (DICOM TLS)" if node.tls.enabled else "")
        return report

    def _start_server(self, node: NodeSettings) -> AssociationServer:
        """``AE.start_server(block=False)`` with our server class (see :class:`AssociationServer`)."""
        self._previous_receive_to_files = handlers.receive_to_files(True)
        gate = ConnectionGate(node)
        server = self.ae.make_server((node.host, node.port), ae_title=node.ae_title,
                                     ssl_context=tls_context(node.tls), server_class=AssociationServer,
                                     request_handler=GuardedRequestHandler,
                                     evt_handlers=event_handlers(node, self.ingest, self.completions, self.metrics,
                                                                 gate))
        server.contexts = ContextsCopiedCheaply(server.contexts)
        server.metrics = self.metrics
        server.node = node
        server.handshake_timeout = min(node.acse_timeout, node.association_deadline)
        server.read_timeout = node.network_timeout
        gate.report = server.report
        server.gate = gate.start()
        self.gate = gate
        thread = threading.Thread(target=server.serve_forever, name="cradle-acceptor", daemon=True)
        thread.start()
        self.ae._servers.append(server)  # as start_server does: ae.shutdown() and server.shutdown() use it
        return server

    def stop(self, grace_seconds: float = 10.0) -> None:
        """Close the port, give running associations ``grace_seconds`` to finish (an answered
        C-STORE is durable either way; an unanswered one is re-sent by its sender), drain the
        completion queue (for at most ``grace_seconds`` too: what is left, the monitor completes
        at the next start), stop the monitor."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            self.gate.stop()
        deadline = time.monotonic() + grace_seconds
        while self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.ae.active_associations:
            log.warning("aborting %d association(s) still running", len(self.ae.active_associations))
        self.ae.shutdown()
        handlers.receive_to_files(self._previous_receive_to_files)
        self.completions.stop(grace_seconds)
        self.monitor.stop()
        if self.metrics_server is not None:
            self.metrics_server.stop()
            self.metrics_server = None
        if self._owns_index:
            self.sessions.kw["bind"].dispose()
        log.info("listener stopped")

    def __enter__(self) -> "Listener":
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
