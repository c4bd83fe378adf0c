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
0xA700  refused, out of resources: disk or database trouble, nothing committed; retry
0xA900  the dataset's SOP Instance / SOP Class UID differs from the command's
0xC000  the dataset cannot be parsed (malformed, truncated) or lacks its UIDs
======  ==========================================================================

Logs carry UIDs, row ids, AE titles and addresses only, never patient identifiers.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO

from pydicom import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.events import Event

from common.logs import log_context
from storage.audit import audit
from storage.dicomfile import MalformedDataset, check_structure, inflate
from storage.index import InstanceHeader, MissingIdentifiers
from storage.ingest import Ingest, Outcome, StoreResult, TransientStoreError

log = logging.getLogger(__name__)

SUCCESS = 0x0000
WARNING_COERCION = 0xB000
FAILURE_DUPLICATE_SOP_INSTANCE = 0x0111
FAILURE_OUT_OF_RESOURCES = 0xA700
FAILURE_DOES_NOT_MATCH = 0xA900
FAILURE_CANNOT_UNDERSTAND = 0xC000

# A-ASSOCIATE-RJ (PS3.8 9.3.4): permanent, by the service user, and why
REJECTED_PERMANENT = 0x01
SOURCE_SERVICE_USER = 0x01
DIAGNOSTIC_CALLING_AE_NOT_RECOGNISED = 0x03
DIAGNOSTIC_CALLED_AE_NOT_RECOGNISED = 0x07

AfterStore = Callable[[StoreResult, InstanceHeader], object]
"""Called once an instance is committed (completion and routing); its failures never change the status."""


# --- association control ---------------------------------------------------------------------
#
# Every outcome is counted (``metrics``: a node.metrics.ListenerMetrics, or None) and written to the
# audit trail with the calling AE title and the peer address. Per association, the instances stored
# and failed are counted on the Association object and audited when it ends.

REJECT_REASON = "_cradle_reject_reason"
COUNTS = "_cradle_counts"


def handle_requested(event: Event, called_ae_title: str, allowed: dict[str, list[str]]) -> None:
    """EVT_REQUESTED: reject an unknown calling AE (or a known one from a host not its own), before
    any presentation context is accepted, so nothing from it can be stored. An empty ``allowed``
    rejects everybody."""
    assoc = event.assoc
    request = assoc.requestor.primitive  # A-ASSOCIATE-RQ; requestor.ae_title is set only after this event
    calling, called = request.calling_ae_title.strip(), request.called_ae_title.strip()
    address = assoc.requestor.address
    if called != called_ae_title:
        log.warning("rejected association from %r at %s: called AE title %r is not %r",
                    calling, address, called, called_ae_title)
        _reject(assoc, DIAGNOSTIC_CALLED_AE_NOT_RECOGNISED, "called_ae")
        return
    if calling not in allowed:
        log.warning("rejected association from %r at %s: not in node.allowed_calling_aets", calling, address)
        _reject(assoc, DIAGNOSTIC_CALLING_AE_NOT_RECOGNISED, "calling_ae")
        return
    hosts = allowed[calling]
    if hosts and address not in hosts:
        log.warning("rejected association from %r at %s: host not allowed for this AE title", calling, address)
        _reject(assoc, DIAGNOSTIC_CALLING_AE_NOT_RECOGNISED, "host")


def _reject(assoc, diagnostic: int, reason: str) -> None:  # noqa: ANN001 - pynetdicom Association
    setattr(assoc, REJECT_REASON, reason)
    assoc.acse.send_reject(REJECTED_PERMANENT, SOURCE_SERVICE_USER, diagnostic)
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


def _ended(event: Event, how: str) -> None:
    assoc = event.assoc
    counts = getattr(assoc, COUNTS, None)
    if counts is None:  # rejected before it was accepted: audited as rejected
        return
    audit(f"association.{how}", calling_ae=assoc.requestor.ae_title.strip(), address=assoc.requestor.address,
          port=assoc.requestor.port, stored=counts["stored"], failed=counts["failed"])


def handle_released(event: Event) -> None:
    log.info("association from %r released", event.assoc.requestor.ae_title)
    _ended(event, "released")


def handle_aborted(event: Event) -> None:
    log.warning("association from %r aborted", event.assoc.requestor.ae_title)
    _ended(event, "aborted")


def handle_echo(event: Event) -> int:
    return SUCCESS


# --- C-STORE ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Received:
    """One C-STORE's data set, checked and with its header read (pixel data not decoded)."""

    header: InstanceHeader
    transfer_syntax_uid: str


def handle_store(event: Event, ingest: Ingest, after_store: AfterStore | None = None,
                 metrics=None) -> int | Dataset:  # noqa: ANN001 - ListenerMetrics
    """EVT_C_STORE: archive the data set as received and answer the truth about it (and count it)."""
    calling = event.assoc.requestor.ae_title.strip()
    command_sop_uid = str(event.request.AffectedSOPInstanceUID or "")
    if metrics is not None and event.request.DataSet is not None:
        metrics.bytes.inc(len(event.request.DataSet.getbuffer()))
    with log_context(sop_uid=command_sop_uid or None):
        answer, result, header = _store(event, ingest, after_store, calling, command_sop_uid)
    code = int(answer.Status) if isinstance(answer, Dataset) else int(answer)
    outcome = result.outcome.value if result is not None else "failed"
    if metrics is not None:
        metrics.instances.labels(outcome=outcome).inc()
        metrics.response(code)
    counts = getattr(event.assoc, COUNTS, None)
    if counts is not None:
        counts["stored" if code == SUCCESS or 0xB000 <= code <= 0xBFFF else "failed"] += 1
    audit("instance.received", sop_uid=header.sop_uid if header else command_sop_uid,
          sop_class_uid=header.sop_class_uid if header else str(event.request.AffectedSOPClassUID or ""),
          series_uid=header.series_uid if header else None, study_uid=header.study_uid if header else None,
          instance_pk=result.instance_pk if result else None, series_pk=result.series_pk if result else None,
          study_pk=result.study_pk if result else None, outcome=outcome, status=f"0x{code:04X}",
          calling_ae=calling, address=event.assoc.requestor.address,
          bytes=len(event.request.DataSet.getbuffer()) if event.request.DataSet is not None else 0,
          reopened=result.reopened if result else None)
    return answer


def _store(event: Event, ingest: Ingest, after_store: AfterStore | None, calling: str,
           command_sop_uid: str) -> tuple[int | Dataset, StoreResult | None, InstanceHeader | None]:
    try:
        received = read_received(event)
    except (MalformedDataset, MissingIdentifiers) as exc:
        log.warning("C-STORE %s from %r: cannot understand the data set: %s", command_sop_uid, calling, exc)
        return status(FAILURE_CANNOT_UNDERSTAND, str(exc)), None, None
    header = received.header
    mismatch = command_mismatch(event, header)
    if mismatch:
        log.warning("C-STORE %s from %r: %s", command_sop_uid, calling, mismatch)
        return status(FAILURE_DOES_NOT_MATCH, "data set UIDs differ from the C-STORE command's"), None, header
    try:
        result = ingest.store(encoded_parts(event), header, transfer_syntax_uid=received.transfer_syntax_uid,
                              calling_ae_title=calling)
    except TransientStoreError as exc:
        log.error("C-STORE %s from %r: not stored, sender should retry: %s", header.sop_uid, calling, exc)
        return status(FAILURE_OUT_OF_RESOURCES, "temporary storage failure, please retry"), None, header
    except Exception as exc:  # noqa: BLE001 - pynetdicom would answer 0xC211 (permanent) otherwise
        log.exception("C-STORE %s from %r: unexpected %s", header.sop_uid, calling, type(exc).__name__)
        return status(FAILURE_OUT_OF_RESOURCES, "temporary storage failure, please retry"), None, header
    with log_context(instance_pk=result.instance_pk, series_pk=result.series_pk, study_pk=result.study_pk):
        _log_result(result, calling)
        _run_after_store(after_store, result, header)
    return status_for(result), result, header


def read_received(event: Event) -> Received:
    """Check the received bytes' structure and read the header (everything before the pixel data)."""
    transfer_syntax = UID(event.context.transfer_syntax)
    if event.request.DataSet is None:
        raise MalformedDataset("C-STORE without a data set")
    raw = event.request.DataSet.getvalue()
    if transfer_syntax.is_deflated:
        raw = inflate(raw)
    implicit, little = transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian
    check_structure(raw, implicit=implicit, little=little)
    try:
        header = InstanceHeader.from_dataset(read_header(raw, implicit=implicit, little=little))
    except MissingIdentifiers:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever pydicom raises on bytes it cannot read
        raise MalformedDataset(f"header cannot be read ({type(exc).__name__})") from None
    return Received(header, str(transfer_syntax))


def encoded_parts(event: Event) -> tuple[bytes, bytes]:
    """What ``event.encoded_dataset()`` returns (preamble, file meta, the data set as received), in
    two parts so that the data set is not copied into one more buffer before it is written."""
    preamble_and_meta = b"".join((b"\x00" * 128, b"DICM", encode_file_meta(event.file_meta)))
    return preamble_and_meta, event.request.DataSet.getvalue()


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


def read_header(data: bytes, *, implicit: bool, little: bool) -> Dataset:
    """The data set up to its pixel data (values stay raw until used)."""
    return read_dataset(BytesIO(data), implicit, little, stop_when=_at_pixel_data)
