"""What the listener does before and while it reads a peer's bytes, so that no peer can lock the
node or make it grow: a deadline and a cap on connections not yet associated, a cap on associations,
and limits on every PDU and data set read.

* :class:`ConnectionGate` — every accepted socket is *pending* until its A-ASSOCIATE-RQ has been
  read (the TLS handshake included). At most ``node.max_pending_connections`` are pending at once
  (one more is closed at accept), and each must finish within ``node.association_deadline`` seconds
  of its accept, whatever it trickles meanwhile: a watchdog thread shuts the socket down, which also
  wakes pynetdicom's blocking ``recv``. Associations are counted here too (``node.max_associations``),
  so a pending connection never takes an association's slot; pynetdicom's own limit is set above
  ours (:func:`pynetdicom_association_limit`) and never binds first.
* :class:`ReceiveGuard` — on each association's socket (:class:`GuardedAssociationSocket`), every PDU
  header is checked before its body is read: a P-DATA-TF PDU no longer than ``node.max_pdu_size``
  (what we announced), an A-ASSOCIATE-RQ no longer than 1 MiB, other PDUs no longer than 64 KiB; a
  declared 4 GiB PDU is refused after 6 bytes. Data set fragments are summed per message: beyond
  ``node.max_dataset_size`` the connection is closed (the data set is not read into memory, and
  nothing is stored). A refusal closes the connection, is logged and audited with its reason.

Nothing here reads a data set's values; log lines carry addresses and reasons only.
"""

from __future__ import annotations

import copy
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable

from pynetdicom.transport import AssociationSocket, RequestHandler

from config.settings import NodeSettings

log = logging.getLogger(__name__)

MAX_ASSOCIATE_RQ = 1024 * 1024
"""An A-ASSOCIATE-RQ with every storage SOP Class and many transfer syntaxes is below 100 KiB."""
MAX_OTHER_PDU = 64 * 1024
MAX_PDU_HARD_CAP = 64 * 1024 * 1024
"""``node.max_pdu_size: 0`` (unlimited, as announced) still reads no PDU above this."""
MAX_COMMAND_SET = 64 * 1024

_A_ASSOCIATE_RQ, _P_DATA_TF = 0x01, 0x04
_KNOWN_PDU_TYPES = frozenset(range(1, 8))

Reporter = Callable[[str, tuple, bool], None]
"""(reason, peer address, associated yet?): how a refusal is counted and audited."""


def cut(sock: socket.socket) -> None:
    """Shut a socket down in both directions (no close: its owner closes it). A thread blocked in
    ``recv`` on it wakes up with end-of-file. For a TLS socket the plain socket's own shutdown is
    used, which leaves the TLS state alone (another thread may be inside it)."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except (OSError, ValueError):
        pass


def pynetdicom_association_limit(node: NodeSettings) -> int:
    """pynetdicom counts every acceptor thread, pending ones included, against its limit: set it
    above ours, so that only :meth:`ConnectionGate.reserve` decides."""
    return node.max_associations + 2 * node.max_pending_connections + 8


class ContextsCopiedCheaply(list):
    """The server's presentation contexts, which pynetdicom deep-copies for every connection: with
    every storage SOP Class and transfer syntax that is about 7,600 UIDs, 90 ms of CPU per TCP
    connection (11 connections a second would take a whole core). Copying each context and its
    lists does the same for a hundredth of that: UIDs themselves are immutable strings."""

    def __deepcopy__(self, memo: dict) -> list:
        copies = []
        for context in self:
            duplicate = copy.copy(context)
            for name, value in vars(duplicate).items():
                if isinstance(value, list):
                    setattr(duplicate, name, list(value))
            copies.append(duplicate)
        return copies


class ConnectionGate:
    """Pending connections (deadline, cap) and associations (cap) of one listening server."""

    def __init__(self, node: NodeSettings, report: Reporter | None = None, poll_seconds: float = 0.1) -> None:
        self.max_pending = node.max_pending_connections
        self.deadline_seconds = min(node.association_deadline, node.acse_timeout)
        self.max_associations = node.max_associations
        self.max_per_calling_ae = node.max_associations_per_calling_ae
        self.report = report or (lambda reason, address, associated: None)
        self._poll = poll_seconds
        self._lock = threading.Lock()
        self._pending: dict[socket.socket, tuple[float, tuple]] = {}
        self._associations: dict[threading.Thread, str] = {}
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self.refused_pending = 0
        self.expired = 0

    # --- pending connections ----------------------------------------------------------------

    def admit(self, sock: socket.socket, address: tuple) -> bool:
        """At accept: whether the connection may wait for its association (else it is closed)."""
        with self._lock:
            self._prune_closed()
            if len(self._pending) >= self.max_pending:
                self.refused_pending += 1
                refused = True
            else:
                self._pending[sock] = (time.monotonic() + self.deadline_seconds, address)
                refused = False
        if refused:
            self.report("pending_limit", address, False)
        return not refused

    def associating(self, sock: socket.socket | None) -> None:
        """The A-ASSOCIATE-RQ has been read: the connection is no longer pending."""
        if sock is not None:
            with self._lock:
                self._pending.pop(sock, None)

    @property
    def pending(self) -> int:
        with self._lock:
            self._prune_closed()
            return len(self._pending)

    def _prune_closed(self) -> None:
        for sock in [s for s in self._pending if s.fileno() < 0]:
            del self._pending[sock]

    # --- associations -------------------------------------------------------------------------

    def reserve(self, assoc: threading.Thread, calling: str = "") -> bool:
        """An association slot for ``assoc`` (False: ``node.max_associations`` are running, or
        ``node.max_associations_per_calling_ae`` of this calling AE title: one sender cannot take
        every place)."""
        with self._lock:
            self._associations = {a: ae for a, ae in self._associations.items() if a.is_alive()}
            if len(self._associations) >= self.max_associations:
                return False
            if sum(1 for ae in self._associations.values() if ae == calling) >= self.max_per_calling_ae:
                return False
            self._associations[assoc] = calling
            return True

    def release(self, assoc: threading.Thread) -> None:
        with self._lock:
            self._associations.pop(assoc, None)

    @property
    def associations(self) -> int:
        with self._lock:
            self._associations = {a: ae for a, ae in self._associations.items() if a.is_alive()}
            return len(self._associations)

    # --- the watchdog -------------------------------------------------------------------------

    def start(self) -> "ConnectionGate":
        self._watchdog = threading.Thread(target=self._watch, name="cradle-connection-deadline", daemon=True)
        self._watchdog.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.join(5)

    def _watch(self) -> None:
        while not self._stop.wait(self._poll):
            now = time.monotonic()
            with self._lock:
                expired = [(s, a) for s, (deadline, a) in self._pending.items() if deadline <= now]
                for sock, _ in expired:
                    del self._pending[sock]
            for sock, address in expired:
                if sock.fileno() >= 0:
                    self.expired += 1
                    cut(sock)
                    self.report("deadline", address, False)


class ReceiveGuard:
    """The limits on what one association's peer may send (see the module's docstring)."""

    def __init__(self, node: NodeSettings, address: tuple, report: Reporter | None = None) -> None:
        self.max_pdata = node.max_pdu_size or MAX_PDU_HARD_CAP
        self.max_dataset = node.max_dataset_size
        self.address = address
        self.report = report or (lambda reason, address, associated: None)
        self.reason = ""
        self.associated = False
        self._header_next = True
        self._pdu_type = 0
        self._dataset_bytes = 0
        self._command_bytes = 0

    def header(self, data: bytes) -> str:
        """Check a PDU header (type, reserved, length); returns why it is refused, or ""."""
        if len(data) != 6:
            return ""  # the connection closed: pynetdicom handles it
        pdu_type, _, length = struct.unpack(">BBL", data)
        if pdu_type not in _KNOWN_PDU_TYPES:
            return ""  # pynetdicom answers an unknown PDU with an abort without reading further
        if pdu_type == _P_DATA_TF:
            limit, name = self.max_pdata, "P-DATA-TF PDU above node.max_pdu_size"
        elif pdu_type == _A_ASSOCIATE_RQ:
            limit, name = MAX_ASSOCIATE_RQ, "A-ASSOCIATE-RQ PDU above 1 MiB"
        else:
            limit, name = MAX_OTHER_PDU, f"PDU type 0x{pdu_type:02X} above 64 KiB"
        if length > limit:
            return name
        self._header_next, self._pdu_type = False, pdu_type
        return ""

    def body(self, data: bytes) -> str:
        """Sum a P-DATA-TF PDU's data set fragments per message; returns why it is refused, or ""."""
        self._header_next = True
        if self._pdu_type != _P_DATA_TF:
            return ""
        view, pos = memoryview(data), 0
        while pos + 6 <= len(view):
            item_length = struct.unpack_from(">L", view, pos)[0]
            control = view[pos + 5]
            fragment = max(item_length - 2, 0)
            if control & 1:
                self._command_bytes += fragment
                if self._command_bytes > MAX_COMMAND_SET:
                    return "command set above 64 KiB"
                if control & 2:
                    self._command_bytes = 0
            else:
                self._dataset_bytes += fragment
                if self._dataset_bytes > self.max_dataset:
                    return "data set above node.max_dataset_size"
                if control & 2:
                    self._dataset_bytes = 0
            pos += 4 + item_length
        return ""

    @property
    def header_next(self) -> bool:
        return self._header_next

    def refuse(self, reason: str, sock: socket.socket | None) -> None:
        self.reason = reason
        if sock is not None:
            cut(sock)
        log.warning("closed the connection from %s: %s", self.address[0], reason)
        self.report(reason, self.address, self.associated)


class GuardedAssociationSocket(AssociationSocket):
    """pynetdicom's association socket, reading through a :class:`ReceiveGuard`.

    pynetdicom's DUL reads each PDU as ``recv(6)`` (the header) then ``recv(length)``; the header is
    checked before the body is read, the body before it is decoded. A refused PDU reads as a
    connection closed by the peer (pynetdicom then ends the association), and the socket is shut down.
    """

    guard: ReceiveGuard

    def recv(self, nr_bytes: int) -> bytearray:
        guard = self.guard
        if guard.reason:
            return bytearray()
        if guard.header_next:
            data = super().recv(nr_bytes)
            reason = guard.header(bytes(data))
            if reason:
                guard.refuse(reason, self.socket)
            return data
        data = super().recv(nr_bytes)
        reason = guard.body(data)
        if reason:
            guard.refuse(reason, self.socket)
            return bytearray()
        return data


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's request handler, giving each association a :class:`GuardedAssociationSocket`.

    The server passes it as ``request_handler`` (a keyword of ``AE.make_server``); the server must
    have ``node`` (NodeSettings) and ``report`` (a :data:`Reporter`) attributes."""

    def _create_association(self):  # noqa: ANN202 - pynetdicom Association
        assoc = super()._create_association()
        sock = assoc.dul.socket
        sock.__class__ = GuardedAssociationSocket  # same state, the guarded recv
        sock.guard = ReceiveGuard(self.server.node, tuple(self.client_address), self.server.report)
        return assoc


def guard_of(assoc) -> ReceiveGuard | None:  # noqa: ANN001 - pynetdicom Association
    return getattr(getattr(assoc.dul, "socket", None), "guard", None)


def raw_socket(assoc) -> socket.socket | None:  # noqa: ANN001 - pynetdicom Association
    return getattr(getattr(assoc.dul, "socket", None), "socket", None)
