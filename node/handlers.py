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
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO

from pydicom import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.events import Event

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


class MalformedDataset(ValueError):
    """The received bytes are not a well-formed data set (truncated, bad lengths, bad delimiters)."""


# --- association control ---------------------------------------------------------------------

def handle_requested(event: Event, called_ae_title: str, allowed: dict[str, list[str]]) -> None:
    """EVT_REQUESTED: reject an unknown calling AE (or a known one from a host not its own), before
    any presentation context is accepted, so nothing from it can be stored. An empty ``allowed``
    rejects everybody."""
    assoc = event.assoc
    request = assoc.requestor.primitive  # A-ASSOCIATE-RQ; requestor.ae_title is set only after this event
    calling, called = request.calling_ae_title.strip(), request.called_ae_title.strip()
    address = assoc.requestor.address
    if called != called_ae_title:
        _reject(assoc, DIAGNOSTIC_CALLED_AE_NOT_RECOGNISED)
        log.warning("rejected association from %r at %s: called AE title %r is not %r",
                    calling, address, called, called_ae_title)
        return
    if calling not in allowed:
        _reject(assoc, DIAGNOSTIC_CALLING_AE_NOT_RECOGNISED)
        log.warning("rejected association from %r at %s: not in node.allowed_calling_aets", calling, address)
        return
    hosts = allowed[calling]
    if hosts and address not in hosts:
        _reject(assoc, DIAGNOSTIC_CALLING_AE_NOT_RECOGNISED)
        log.warning("rejected association from %r at %s: host not allowed for this AE title", calling, address)


def _reject(assoc, diagnostic: int) -> None:  # noqa: ANN001 - pynetdicom Association
    assoc.acse.send_reject(REJECTED_PERMANENT, SOURCE_SERVICE_USER, diagnostic)
    evt.trigger(assoc, evt.EVT_REJECTED, {})
    assoc.kill()


def handle_accepted(event: Event) -> None:
    requestor = event.assoc.requestor
    log.info("association from %r at %s:%s accepted", requestor.ae_title, requestor.address, requestor.port)


def handle_released(event: Event) -> None:
    log.info("association from %r released", event.assoc.requestor.ae_title)


def handle_aborted(event: Event) -> None:
    log.warning("association from %r aborted", event.assoc.requestor.ae_title)


def handle_echo(event: Event) -> int:
    return SUCCESS


# --- C-STORE ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Received:
    """One C-STORE's data set, checked and with its header read (pixel data not decoded)."""

    header: InstanceHeader
    transfer_syntax_uid: str


def handle_store(event: Event, ingest: Ingest, after_store: AfterStore | None = None) -> int | Dataset:
    """EVT_C_STORE: archive the data set as received and answer the truth about it."""
    calling = event.assoc.requestor.ae_title.strip()
    command_sop_uid = str(event.request.AffectedSOPInstanceUID or "")
    try:
        received = read_received(event)
    except (MalformedDataset, MissingIdentifiers) as exc:
        log.warning("C-STORE %s from %r: cannot understand the data set: %s", command_sop_uid, calling, exc)
        return status(FAILURE_CANNOT_UNDERSTAND, str(exc))
    header = received.header
    mismatch = command_mismatch(event, header)
    if mismatch:
        log.warning("C-STORE %s from %r: %s", command_sop_uid, calling, mismatch)
        return status(FAILURE_DOES_NOT_MATCH, "data set UIDs differ from the C-STORE command's")
    try:
        result = ingest.store(encoded_parts(event), header, transfer_syntax_uid=received.transfer_syntax_uid,
                              calling_ae_title=calling)
    except TransientStoreError as exc:
        log.error("C-STORE %s from %r: not stored, sender should retry: %s", header.sop_uid, calling, exc)
        return status(FAILURE_OUT_OF_RESOURCES, "temporary storage failure, please retry")
    except Exception as exc:  # noqa: BLE001 - pynetdicom would answer 0xC211 (permanent) otherwise
        log.exception("C-STORE %s from %r: unexpected %s", header.sop_uid, calling, type(exc).__name__)
        return status(FAILURE_OUT_OF_RESOURCES, "temporary storage failure, please retry")
    _log_result(result, calling)
    _run_after_store(after_store, result, header)
    return status_for(result)


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

_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_DELIMITER = 0xFFFEE00D
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_PIXEL_DATA_GROUP = 0x7FE0
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})


def inflate(data: bytes) -> bytes:
    """A Deflated Explicit VR Little Endian data set, inflated; a cut-off stream is malformed."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(data) + inflater.flush()
    except zlib.error as exc:
        raise MalformedDataset(f"deflated data set does not inflate: {exc}") from None
    if not inflater.eof:
        raise MalformedDataset("deflated data set is truncated")
    return inflated


def check_structure(data: bytes, *, implicit: bool, little: bool) -> None:
    """Walk every element's tag and length (values are skipped, not read): each value must lie
    within the data, every undefined-length sequence and item must be delimited, and the data
    must end where its last element ends. pydicom itself reads a truncated value silently."""
    if not data:
        raise MalformedDataset("empty data set")
    try:
        _walk_elements(memoryview(data), 0, len(data), implicit, "<" if little else ">", None)
    except RecursionError:
        raise MalformedDataset("sequences nested too deeply") from None
    except struct.error as exc:
        raise MalformedDataset(f"truncated: {exc}") from None


def _walk_elements(buf: memoryview, pos: int, end: int, implicit: bool, order: str,
                   delimiter: int | None) -> int:
    tag_format, long_format, short_format = order + "HH", order + "L", order + "H"
    while pos < end:
        if pos + 8 > end:
            raise MalformedDataset(f"truncated element header at byte {pos}")
        group, element = struct.unpack_from(tag_format, buf, pos)
        tag = group << 16 | element
        if tag == delimiter:
            return pos + 8
        if group == 0xFFFE:
            raise MalformedDataset(f"unexpected item or delimiter tag ({group:04X},{element:04X}) at byte {pos}")
        vr = b""
        if implicit:
            length, pos = struct.unpack_from(long_format, buf, pos + 4)[0], pos + 8
        else:
            vr = bytes(buf[pos + 4:pos + 6])
            if not (vr.isalpha() and vr.isupper()):
                raise MalformedDataset(f"invalid VR at byte {pos + 4} in ({group:04X},{element:04X})")
            if vr in _LONG_VRS:
                length, pos = struct.unpack_from(long_format, buf, pos + 8)[0], pos + 12
            else:
                length, pos = struct.unpack_from(short_format, buf, pos + 6)[0], pos + 8
        if length == _UNDEFINED:
            # PS3.5 6.2.2: a UN value of undefined length is encoded in Implicit VR Little Endian
            inner_implicit, inner_order = (True, "<") if vr == b"UN" else (implicit, order)
            pos = _walk_items(buf, pos, end, inner_implicit, inner_order)
        elif pos + length > end:
            raise MalformedDataset(f"truncated: ({group:04X},{element:04X}) lacks {pos + length - end} bytes")
        else:
            pos += length
    if delimiter is not None:
        raise MalformedDataset("item without its delimiter")
    return pos


def _walk_items(buf: memoryview, pos: int, end: int, implicit: bool, order: str) -> int:
    header_format = order + "HHL"
    while True:
        if pos + 8 > end:
            raise MalformedDataset("sequence without its delimiter")
        group, element, length = struct.unpack_from(header_format, buf, pos)
        tag = group << 16 | element
        pos += 8
        if tag == _SEQUENCE_DELIMITER:
            return pos
        if tag != _ITEM:
            raise MalformedDataset(f"expected an item, found ({group:04X},{element:04X})")
        if length == _UNDEFINED:
            pos = _walk_elements(buf, pos, end, implicit, order, _ITEM_DELIMITER)
        elif pos + length > end:
            raise MalformedDataset("item runs past the end of the data set")
        else:
            pos += length


def _at_pixel_data(tag: int, vr: str | None, length: int) -> bool:
    return tag >> 16 >= _PIXEL_DATA_GROUP


def read_header(data: bytes, *, implicit: bool, little: bool) -> Dataset:
    """The data set up to its pixel data (values stay raw until used)."""
    return read_dataset(BytesIO(data), implicit, little, stop_when=_at_pixel_data)
