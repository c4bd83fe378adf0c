"""Event handlers of the listener: association control, C-ECHO and C-STORE.

Collaborators are bound through pynetdicom's handler arguments, e.g.
``(evt.EVT_C_STORE, handle_store, [ingest, after_store])``; nothing here is global.

C-STORE statuses (PS3.4 Annex B.2.3, PS3.7 Annex C):

======  ==========================================================================
0x0000  file and index row committed (or an identical copy was already archived)
0xB000  warning: a different dataset under an archived SOP Instance UID, the first
        copy kept (``duplicate_policy: keep_first``); the archive does not hold
        what was just sent, which is what "coercion" tells the sender
0x0111  failure: duplicate SOP Instance (``duplicate_policy: reject``)
0xA700  refused, out of resources: disk full or unwritable, the index unreachable or
        busy; nothing committed; a retry can succeed (and only then is this answered)
0xA900  the dataset's SOP Instance / SOP Class UID differs from the command's
0xC000  the dataset cannot be parsed (malformed, truncated), lacks its UIDs, has an
        invalid UID, or exceeds a limit (``node.max_elements``, ``node.max_inflation_ratio``)
0x0110  processing failure: anything else (a bug, data the index refuses); permanent,
        logged with its type; a retry of the same data set would fail the same way
======  ==========================================================================

A data set larger than ``node.max_dataset_size``, or a PDU larger than announced, is not answered:
the connection is closed as soon as its size is known (``node/guard.py``), and nothing is stored.
Data sets are received into a temporary file (pynetdicom's ``STORE_RECV_CHUNKED_DATASET``), read
from there and copied into the archive, never held whole in memory.

Logs carry UIDs, row ids, AE titles and addresses only, never patient identifiers.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import mmap
import os
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID
from pynetdicom import _config as pynetdicom_config
from pynetdicom import evt
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.events import Event

from common.logs import log_context
from config.settings import NodeSettings
from node.guard import guard_of, raw_socket
from node.tls import peer_subject, subject_matches
from storage.archive import FileRange
from storage.audit import audit
from storage.dicomfile import DatasetLimitExceeded, MalformedDataset, check_structure, inflate
from storage.index import InstanceHeader, InvalidIdentifiers, MissingIdentifiers
from storage.ingest import Ingest, Outcome, PermanentStoreError, StoreResult, TransientStoreError

log = logging.getLogger(__name__)

SUCCESS = 0x0000
WARNING_COERCION = 0xB000
FAILURE_DUPLICATE_SOP_INSTANCE = 0x0111
FAILURE_OUT_OF_RESOURCES = 0xA700
FAILURE_DOES_NOT_MATCH = 0xA900
FAILURE_CANNOT_UNDERSTAND = 0xC000
FAILURE_PROCESSING = 0x0110

# A-ASSOCIATE-RJ (PS3.8 9.3.4): permanent, by the service user, and why; or transient, by the
# service provider (presentation related), local limit exceeded
REJECTED_PERMANENT = 0x01
REJECTED_TRANSIENT = 0x02
SOURCE_SERVICE_USER = 0x01
SOURCE_PROVIDER_PRESENTATION = 0x03
DIAGNOSTIC_CALLING_AE_NOT_RECOGNISED = 0x03
DIAGNOSTIC_CALLED_AE_NOT_RECOGNISED = 0x07
DIAGNOSTIC_LOCAL_LIMIT_EXCEEDED = 0x02

AfterStore = Callable[[StoreResult, InstanceHeader], object]
"""Called once an instance is committed, before the answer: hands it to completion and routing, which
run off the response path (the listener's is ``CompletionQueue.submit``, which returns at once); its
failures never change the status."""


# --- association control ---------------------------------------------------------------------
#
# Every outcome is counted (``metrics``: a node.metrics.ListenerMetrics, or None) and written to the
# audit trail with the calling AE title and the peer address. Per association, the instances stored
# and failed are counted on the Association object and audited when it ends.

REJECT_REASON = "_cradle_reject_reason"
COUNTS = "_cradle_counts"


def handle_requested(event: Event, called_ae_title: str, allowed: dict[str, list[str]] | None,
                     gate=None, certificates: dict[str, str] | None = None) -> None:  # noqa: ANN001 - ConnectionGate
    """EVT_REQUESTED: reject an unknown calling AE (or a known one from a host not its own, or without
    the verified TLS client certificate ``certificates`` binds it to), before any presentation
    context is accepted, so nothing from it can be stored. An empty ``allowed``
    rejects everybody; ``allowed=None`` (no allow-list configured) admits any calling AE title from
    the loopback address only. Beyond ``node.max_associations`` running, the rejection is transient
    ("local limit exceeded"). pynetdicom ignores a notification handler's exception: any error here
    rejects (fails closed)."""
    assoc = event.assoc
    if gate is not None:
        gate.associating(raw_socket(assoc))  # the request is read: the accept deadline is over
    try:
        _check_request(assoc, called_ae_title, allowed, gate, certificates or {})
    except Exception as exc:  # noqa: BLE001 - never accept because a check failed
        log.error("rejected association from %s: the check failed (%s)", assoc.requestor.address,
                  type(exc).__name__)
        try:
            _reject(assoc, DIAGNOSTIC_CALLING_AE_NOT_RECOGNISED, "error")
        except Exception:  # noqa: BLE001
            assoc.kill()


def _check_request(assoc, called_ae_title: str, allowed: dict[str, list[str]] | None,  # noqa: ANN001
                   gate, certificates: dict[str, str]) -> None:  # noqa: ANN001
    request = assoc.requestor.primitive  # A-ASSOCIATE-RQ; requestor.ae_title is set only after this event
    calling, called = request.calling_ae_title.strip(), request.called_ae_title.strip()
    address = assoc.requestor.address
    if called != called_ae_title:
        log.warning("rejected association from %r at %s: called AE title %r is not %r",
                    calling, address, called, called_ae_title)
        _reject(assoc, DIAGNOSTIC_CALLED_AE_NOT_RECOGNISED, "called_ae")
        return
    if allowed is None:
        if not is_loopback(address):
            log.warning("rejected association from %r at %s: node.allowed_calling_aets is not set, so only "
                        "loopback peers may associate", calling, address)
            _reject(assoc, DIAGNOSTIC_CALLING_AE_NOT_RECOGNISED, "host")
            return
    elif calling not in allowed:
        log.warning("rejected association from %r at %s: not in node.allowed_calling_aets", calling, address)
        _reject(assoc, DIAGNOSTIC_CALLING_AE_NOT_RECOGNISED, "calling_ae")
        return
    elif allowed[calling] and address not in allowed[calling]:
        log.warning("rejected association from %r at %s: host not allowed for this AE title", calling, address)
        _reject(assoc, DIAGNOSTIC_CALLING_AE_NOT_RECOGNISED, "host")
        return
    elif calling in certificates and not subject_matches(peer_subject(raw_socket(assoc)), certificates[calling]):
        log.warning("rejected association from %r at %s: its TLS client certificate is not the one bound to "
                    "this AE title", calling, address)
        _reject(assoc, DIAGNOSTIC_CALLING_AE_NOT_RECOGNISED, "certificate")
        return
    if gate is not None and not gate.reserve(assoc, calling):
        _reject(assoc, DIAGNOSTIC_LOCAL_LIMIT_EXCEEDED, "limit", result=REJECTED_TRANSIENT,
                source=SOURCE_PROVIDER_PRESENTATION)


def is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def _reject(assoc, diagnostic: int, reason: str, *, result: int = REJECTED_PERMANENT,  # noqa: ANN001
            source: int = SOURCE_SERVICE_USER) -> None:
    setattr(assoc, REJECT_REASON, reason)
    assoc.acse.send_reject(result, source, diagnostic)
    evt.trigger(assoc, evt.EVT_REJECTED, {})
    assoc.kill()


def handle_rejected(event: Event, metrics=None) -> None:  # noqa: ANN001 - ListenerMetrics
    """EVT_REJECTED: ours (reason set by handle_requested) and pynetdicom's own (association limit)."""
    assoc = event.assoc
    request = assoc.requestor.primitive
    reason = getattr(assoc, REJECT_REASON, "limit")
    if reason == "limit":
        log.warning("rejected association from %s: node.max_associations reached", assoc.requestor.address)
    if metrics is not None:
        metrics.associations.labels(result="rejected").inc()
        metrics.rejections.labels(reason=reason).inc()
    audit("association.rejected", reason=reason, address=assoc.requestor.address, port=assoc.requestor.port,
          calling_ae=request.calling_ae_title.strip() if request is not None else None,
          called_ae=request.called_ae_title.strip() if request is not None else None, tls=_tls(assoc)[0])


def connection_refused(reason: str, address: tuple, associated: bool,
                       metrics=None) -> None:  # noqa: ANN001 - ListenerMetrics
    """A connection closed by the node's guards (``node/guard.py``): too many pending, no association
    within the deadline, a PDU or data set above the limits. Before an association it is audited
    here as a rejection; an association cut short is audited when pynetdicom reports the abort."""
    if metrics is not None:
        if not associated:
            metrics.associations.labels(result="rejected").inc()
        metrics.rejections.labels(reason=_REFUSAL_LABELS.get(reason, "size")).inc()
    if not associated:
        if reason in ("pending_limit", "deadline"):
            log.warning("closed the connection from %s: %s", address[0], _REFUSAL_TEXT[reason])
        audit("association.rejected", reason=reason, address=address[0], port=address[1])


_REFUSAL_LABELS = {"pending_limit": "pending_limit", "deadline": "deadline"}
_REFUSAL_TEXT = {"pending_limit": "node.max_pending_connections connections are waiting to associate",
                 "deadline": "no association within node.association_deadline"}


def tls_rejected(address: tuple, reason: str, metrics=None) -> None:  # noqa: ANN001 - ListenerMetrics
    """A TLS handshake that failed (plaintext peer, no or untrusted client certificate, old protocol):
    the connection is closed before any DICOM message is read."""
    log.warning("rejected connection from %s: TLS handshake failed: %s", address[0], reason)
    if metrics is not None:
        metrics.associations.labels(result="rejected").inc()
        metrics.rejections.labels(reason="tls").inc()
    audit("association.rejected", reason=f"tls: {reason}"[:200], address=address[0], port=address[1], tls=True)


def handle_accepted(event: Event, metrics=None) -> None:  # noqa: ANN001 - ListenerMetrics
    assoc = event.assoc
    requestor = assoc.requestor
    setattr(assoc, COUNTS, {"stored": 0, "failed": 0})
    guard = guard_of(assoc)
    if guard is not None:
        guard.associated = True
    tls, version, peer = _tls(assoc)
    log.info("association from %r at %s:%s accepted%s", requestor.ae_title, requestor.address, requestor.port,
             f" ({version})" if tls else "")
    if metrics is not None:
        metrics.associations.labels(result="accepted").inc()
    audit("association.accepted", calling_ae=requestor.ae_title.strip(), called_ae=assoc.acceptor.ae_title.strip(),
          address=requestor.address, port=requestor.port, tls=tls, tls_version=version, peer_certificate=peer)


def _tls(assoc) -> tuple[bool, str | None, str | None]:  # noqa: ANN001 - pynetdicom Association
    """(TLS in use, protocol version, the peer certificate's subject) of an association."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if not isinstance(sock, ssl.SSLSocket):
        return False, None, None
    try:
        certificate = sock.getpeercert() or {}
        subject = ", ".join(f"{k}={v}" for rdn in certificate.get("subject", ()) for k, v in rdn) or None
        return True, sock.version(), subject
    except (OSError, ValueError):
        return True, None, None


def _ended(event: Event, how: str, gate=None) -> None:  # noqa: ANN001 - node.guard.ConnectionGate
    assoc = event.assoc
    if gate is not None:
        gate.release(assoc)
    counts = getattr(assoc, COUNTS, None)
    if counts is None:  # rejected before it was accepted: audited as rejected
        return
    guard = guard_of(assoc)
    reason = guard.reason if guard is not None and guard.reason else None
    audit(f"association.{how}", calling_ae=assoc.requestor.ae_title.strip(), address=assoc.requestor.address,
          port=assoc.requestor.port, stored=counts["stored"], failed=counts["failed"], reason=reason)


def handle_released(event: Event, gate=None) -> None:  # noqa: ANN001 - node.guard.ConnectionGate
    log.info("association from %r released", event.assoc.requestor.ae_title)
    _ended(event, "released", gate)


def handle_aborted(event: Event, gate=None) -> None:  # noqa: ANN001 - node.guard.ConnectionGate
    if getattr(event.assoc, COUNTS, None) is not None:  # else: never associated, logged as refused
        log.warning("association from %r aborted", event.assoc.requestor.ae_title)
    _ended(event, "aborted", gate)


def handle_connection_closed(event: Event, gate=None) -> None:  # noqa: ANN001 - node.guard.ConnectionGate
    """EVT_CONN_CLOSE: the association's slot is free, and a data set cut off mid-transfer leaves no
    temporary file (pynetdicom removes the file of a complete C-STORE itself, not of an unfinished one)."""
    assoc = event.assoc
    if gate is not None:
        gate.release(assoc)
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    unfinished = getattr(message, "_data_set_file", None)  # pynetdicom's temporary file of this message
    if unfinished is not None:
        with contextlib.suppress(OSError):
            unfinished.close()
        with contextlib.suppress(OSError):
            os.unlink(unfinished.name)


def receive_to_files(enabled: bool = True) -> bool:
    """At the listener's start: pynetdicom writes each received data set to a temporary file as it
    arrives (instead of keeping it in memory). Returns the previous setting (to restore at stop)."""
    previous = pynetdicom_config.STORE_RECV_CHUNKED_DATASET
    pynetdicom_config.STORE_RECV_CHUNKED_DATASET = enabled
    return previous


def handle_echo(event: Event) -> int:
    return SUCCESS


# --- C-STORE ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class StoreLimits:
    """What one received data set may be (``node.max_*``)."""

    max_dataset_size: int = 2 * 1024 ** 3
    max_inflation_ratio: float = 200
    max_elements: int = 500_000

    @classmethod
    def of(cls, node: NodeSettings) -> "StoreLimits":
        return cls(node.max_dataset_size, node.max_inflation_ratio, node.max_elements)


@dataclass(frozen=True)
class Received:
    """One C-STORE's data set, checked and with its header read (pixel data not decoded)."""

    header: InstanceHeader
    transfer_syntax_uid: str


class ReceivedData:
    """The data set of one C-STORE as received: in pynetdicom's temporary file (the listener's
    mode: :func:`receive_to_files`), or in memory. ``view`` maps the file (nothing is read into
    memory until touched); ``parts`` is what is written to the archive."""

    def __init__(self, event: Event) -> None:
        self.path: Path | None = None
        self.offset = 0
        path = getattr(event.request, "_dataset_path", None)  # what Event.dataset_path returns
        if path is not None and not isinstance(path, tuple):
            self.path = Path(path)
            self.offset = _dataset_offset(self.path)
            self.size = self.path.stat().st_size - self.offset
        elif event.request.DataSet is not None:
            self._bytes = event.request.DataSet.getvalue()
            self.size = len(self._bytes)
        else:
            self.size = 0
        self._map: mmap.mmap | None = None

    def view(self) -> memoryview:
        if self.path is None:
            return memoryview(getattr(self, "_bytes", b""))
        if self.size == 0:
            return memoryview(b"")
        if self._map is None:
            with open(self.path, "rb") as file:
                self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        return memoryview(self._map)[self.offset:]

    def parts(self, preamble_and_meta: bytes) -> tuple:
        if self.path is None:
            return preamble_and_meta, getattr(self, "_bytes", b"")
        return preamble_and_meta, FileRange(self.path, self.offset, self.size)


def _dataset_offset(path: Path) -> int:
    """Where the data set starts in pynetdicom's temporary file: after the preamble, ``DICM`` and the
    file meta group, whose length its first element gives."""
    with open(path, "rb") as file:
        head = file.read(144)
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
        raise MalformedDataset("received file without its file meta information")
    return 144 + struct.unpack_from("<L", head, 140)[0]


def handle_store(event: Event, ingest: Ingest, after_store: AfterStore | None = None,
                 metrics=None, limits: StoreLimits | None = None) -> int | Dataset:  # noqa: ANN001
    """EVT_C_STORE: archive the data set as received and answer the truth about it (and count it)."""
    limits = limits or StoreLimits()
    calling = event.assoc.requestor.ae_title.strip()
    command_sop_uid = str(event.request.AffectedSOPInstanceUID or "")
    received_bytes = 0
    with log_context(sop_uid=command_sop_uid or None):
        try:
            data = ReceivedData(event)
            received_bytes = data.size
        except (OSError, MalformedDataset) as exc:
            log.error("C-STORE %s from %r: the received data set cannot be read back (%s)", command_sop_uid,
                      calling, type(exc).__name__)
            data = None
        if metrics is not None:
            metrics.bytes.inc(received_bytes)
        if data is None:
            answer, result, header = status(FAILURE_OUT_OF_RESOURCES, "temporary storage failure, please retry"), \
                None, None
        else:
            answer, result, header = _store(event, data, ingest, after_store, calling, command_sop_uid, limits)
    code = int(answer.Status) if isinstance(answer, Dataset) else int(answer)
    outcome = result.outcome.value if result is not None else "failed"
    if metrics is not None:
        metrics.instances.labels(outcome=outcome).inc()
        metrics.response(code)
    counts = getattr(event.assoc, COUNTS, None)
    if counts is not None:
        counts["stored" if code == SUCCESS or 0xB000 <= code <= 0xBFFF else "failed"] += 1
    audit("instance.received", sop_uid=header.sop_uid if header else _printable(command_sop_uid),
          sop_class_uid=header.sop_class_uid if header else _printable(str(event.request.AffectedSOPClassUID or "")),
          series_uid=header.series_uid if header else None, study_uid=header.study_uid if header else None,
          instance_pk=result.instance_pk if result else None, series_pk=result.series_pk if result else None,
          study_pk=result.study_pk if result else None, outcome=outcome, status=f"0x{code:04X}",
          calling_ae=calling, address=event.assoc.requestor.address, bytes=received_bytes,
          reopened=result.reopened if result else None)
    return answer


def _printable(uid: str) -> str:
    """A UID from the command as it may be written to logs and the audit trail: UID characters only."""
    return "".join(c for c in uid[:64] if c in "0123456789.") or "(invalid)"


def _store(event: Event, data: ReceivedData, ingest: Ingest, after_store: AfterStore | None, calling: str,
           command_sop_uid: str, limits: StoreLimits) -> tuple[int | Dataset, StoreResult | None,
                                                               InstanceHeader | None]:
    shown_uid = _printable(command_sop_uid)
    try:
        received = read_received(event, data, limits)
    except DatasetLimitExceeded as exc:
        log.warning("C-STORE %s from %r: refused: %s", shown_uid, calling, exc)
        return status(FAILURE_CANNOT_UNDERSTAND, str(exc)), None, None
    except (MalformedDataset, MissingIdentifiers, InvalidIdentifiers) as exc:
        log.warning("C-STORE %s from %r: cannot understand the data set: %s", shown_uid, calling, exc)
        return status(FAILURE_CANNOT_UNDERSTAND, str(exc)), None, None
    header = received.header
    mismatch = command_mismatch(event, header)
    if mismatch:
        log.warning("C-STORE %s from %r: %s", shown_uid, calling, mismatch)
        return status(FAILURE_DOES_NOT_MATCH, "data set UIDs differ from the C-STORE command's"), None, header
    try:
        result = ingest.store(data.parts(_preamble_and_meta(event)), header,
                              transfer_syntax_uid=received.transfer_syntax_uid, calling_ae_title=calling)
    except TransientStoreError as exc:
        log.error("C-STORE %s from %r: not stored, sender should retry: %s", header.sop_uid, calling, exc)
        return status(FAILURE_OUT_OF_RESOURCES, "temporary storage failure, please retry"), None, header
    except PermanentStoreError as exc:
        log.error("C-STORE %s from %r: not stored, a retry would fail the same way: %s", header.sop_uid,
                  calling, exc)
        return status(FAILURE_PROCESSING, "the index cannot hold this data set"), None, header
    except Exception as exc:  # noqa: BLE001 - pynetdicom would answer 0xC211 (permanent) otherwise
        log.exception("C-STORE %s from %r: unexpected %s", header.sop_uid, calling, type(exc).__name__)
        return status(FAILURE_PROCESSING, f"processing failure ({type(exc).__name__})"), None, header
    with log_context(instance_pk=result.instance_pk, series_pk=result.series_pk, study_pk=result.study_pk):
        _log_result(result, calling)
        _run_after_store(after_store, result, header)
    return status_for(result), result, header


def read_received(event: Event, data: ReceivedData | None = None, limits: StoreLimits | None = None) -> Received:
    """Check the received bytes' structure and read the header (everything before the pixel data)."""
    data = data if data is not None else ReceivedData(event)
    limits = limits or StoreLimits()
    transfer_syntax = UID(event.context.transfer_syntax)
    if data.size == 0:
        raise MalformedDataset("C-STORE without a data set")
    raw = data.view()
    if transfer_syntax.is_deflated:
        limit = min(limits.max_dataset_size, int(limits.max_inflation_ratio * len(raw)))
        raw = memoryview(inflate(raw, limit=limit))
    implicit, little = transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian
    check_structure(raw, implicit=implicit, little=little, max_elements=limits.max_elements)
    try:
        header = InstanceHeader.from_dataset(read_header(raw, implicit=implicit, little=little))
    except (MissingIdentifiers, InvalidIdentifiers):
        raise
    except Exception as exc:  # noqa: BLE001 - whatever pydicom raises on bytes it cannot read
        raise MalformedDataset(f"header cannot be read ({type(exc).__name__})") from None
    return Received(header, str(transfer_syntax))


def _preamble_and_meta(event: Event) -> bytes:
    return b"".join((b"\x00" * 128, b"DICM", encode_file_meta(event.file_meta)))


def encoded_parts(event: Event) -> tuple:
    """What ``event.encoded_dataset()`` returns (preamble, file meta, the data set as received), in
    two parts so that the data set is not copied into one more buffer before it is written (the
    second part is a :class:`storage.archive.FileRange` when the data set is in a file)."""
    return ReceivedData(event).parts(_preamble_and_meta(event))


def command_mismatch(event: Event, header: InstanceHeader) -> str:
    """Why the data set does not belong to the C-STORE command carrying it ("" when it does)."""
    command_sop_uid = str(event.request.AffectedSOPInstanceUID or "").strip()
    command_class_uid = str(event.request.AffectedSOPClassUID or "").strip()
    if header.sop_uid != command_sop_uid:
        return f"data set SOP Instance UID {header.sop_uid} differs from the command's {command_sop_uid}"
    if header.sop_class_uid != command_class_uid:
        return f"data set SOP Class UID {header.sop_class_uid} differs from the command's {command_class_uid}"
    return ""


def status_for(result: StoreResult) -> int | Dataset:
    if result.outcome in (Outcome.stored, Outcome.duplicate, Outcome.conflict_replaced):
        return SUCCESS
    if result.outcome is Outcome.conflict_kept:
        return status(WARNING_COERCION, "already archived with other content; first copy kept")
    return status(FAILURE_DUPLICATE_SOP_INSTANCE, "already archived with other content")


def status(code: int, comment: str = "") -> int | Dataset:
    """A status, with an Error Comment (0000,0902; at most 64 characters) when one helps the sender."""
    if not comment:
        return code
    answer = Dataset()
    answer.Status = code
    answer.ErrorComment = comment[:64]
    return answer


def _log_result(result: StoreResult, calling: str) -> None:
    if result.outcome is Outcome.duplicate:
        log.info("C-STORE %s from %r: identical copy already archived", result.sop_uid, calling)
    elif result.outcome in (Outcome.stored, Outcome.conflict_replaced):
        log.info("C-STORE %s from %r: %s as instance %s of series %s%s", result.sop_uid, calling,
                 result.outcome.value, result.instance_pk, result.series_pk,
                 " (series re-opened)" if result.reopened else "")
    # conflicts are logged by Ingest.store


def _run_after_store(after_store: AfterStore | None, result: StoreResult, header: InstanceHeader) -> None:
    if after_store is None or result.instance_pk is None:
        return
    try:
        after_store(result, header)
    except Exception as exc:  # noqa: BLE001 - the instance is committed; the monitor catches up
        log.exception("completion after %s failed (%s); the completion monitor will retry",
                      result.sop_uid, type(exc).__name__)


# --- reading the received bytes ---------------------------------------------------------------

_PIXEL_DATA_GROUP = 0x7FE0


def _at_pixel_data(tag: int, vr: str | None, length: int) -> bool:
    return tag >> 16 >= _PIXEL_DATA_GROUP


_DEFER_ABOVE = 64 * 1024


def read_header(data, *, implicit: bool, little: bool) -> Dataset:  # noqa: ANN001 - bytes-like
    """The data set up to its pixel data (values stay raw until used; values above 64 KiB are not
    read at all, so a large element before the pixel data costs no memory)."""
    return read_dataset(_BufferReader(data), implicit, little, stop_when=_at_pixel_data,
                        defer_size=_DEFER_ABOVE)


class _BufferReader(BytesIO):
    """A read-only file over a bytes-like object (a memory map too) that copies only what is read."""

    def __init__(self, data) -> None:  # noqa: ANN001 - bytes-like
        super().__init__()
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def read(self, size: int | None = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else min(len(self._view), self._pos + size)
        chunk = bytes(self._view[self._pos:end])
        self._pos = end
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos
