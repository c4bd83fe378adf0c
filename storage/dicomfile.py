"""The structure of encoded DICOM data, checked without decoding any value.

pydicom reads a truncated value silently (it returns the bytes that are there), so "pydicom could
read it" does not mean "it is complete". :func:`check_structure` walks every element's tag and
length instead. The C-STORE handler checks each received data set with it before anything is
written (a malformed one answers 0xC000), and the start (and ``cradle archive check``) checks every archived file
that has no index row with :func:`check_file` before indexing it: a file that does not end where its last
element ends is never indexed, so never served.
"""

from __future__ import annotations

import struct
import zlib

from pydicom.datadict import dictionary_VR
from pydicom.uid import UID


class MalformedDataset(ValueError):
    """The bytes are not a well-formed data set (truncated, bad lengths, bad delimiters)."""


class DatasetLimitExceeded(ValueError):
    """The data set is larger than the node accepts: inflates too far, or has too many elements."""


_PREFIX_END = 132  # 128-byte preamble + b"DICM" (PS3.10 7.1)
_FILE_META_GROUP = b"\x02\x00"  # group 0002, little endian
_TRANSFER_SYNTAX_ELEMENT = 0x0010

_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_DELIMITER = 0xFFFEE00D
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_ITEM_LE = 0xE000FFFE  # the item tag's bytes read as one little-endian 32-bit number
_PIXEL_DATA_GROUP = 0x7FE0
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})


_INFLATE_CHUNK = 1024 * 1024


def inflate(data: bytes, *, limit: int | None = None) -> bytearray:
    """A Deflated Explicit VR Little Endian data set, inflated; a cut-off stream is malformed. With
    ``limit``, inflating stops (DatasetLimitExceeded) as soon as the output would pass it: a
    "deflate bomb" never takes more than ``limit`` bytes of memory."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = bytearray()
    pending = data
    try:
        while True:
            room = _INFLATE_CHUNK if limit is None else min(_INFLATE_CHUNK, limit - len(inflated) + 1)
            chunk = inflater.decompress(pending, room)
            inflated += chunk
            if limit is not None and len(inflated) > limit:
                raise DatasetLimitExceeded(f"deflated data set inflates beyond {limit} bytes "
                                           "(node.max_inflation_ratio, node.max_dataset_size)")
            pending = inflater.unconsumed_tail
            if inflater.eof or (not chunk and not pending):
                break
        inflated += inflater.flush()
    except zlib.error as exc:
        raise MalformedDataset(f"deflated data set does not inflate: {exc}") from None
    if not inflater.eof:
        raise MalformedDataset("deflated data set is truncated")
    return inflated


def check_structure(data: bytes, *, implicit: bool, little: bool, max_elements: int | None = None) -> None:
    """Walk every element's tag and length (values are skipped, not read): each value must lie
    within the data, every undefined-length sequence and item must be delimited, and the data
    must end where its last element ends. pydicom itself reads a truncated value silently. Items
    of defined length are walked too, and so are sequences of defined length: a sequence (VR SQ,
    or in Implicit VR a tag the dictionary names SQ) strictly; a UN or Implicit VR value that starts
    with an item tag (how pydicom reads it as a sequence) as such when it parses as one. With
    ``max_elements``, more elements and items than that (nested ones included, at any depth)
    raise DatasetLimitExceeded, after that many steps at most."""
    if not len(data):
        raise MalformedDataset("empty data set")
    budget = [max_elements if max_elements is not None else -1]
    try:
        _walk_elements(memoryview(data), 0, len(data), implicit, "<" if little else ">", None, budget)
    except RecursionError:
        raise MalformedDataset("sequences nested too deeply") from None
    except struct.error as exc:
        raise MalformedDataset(f"truncated: {exc}") from None


def _dictionary_vr(tag: int) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return ""


def _spend(budget: list[int]) -> None:
    budget[0] -= 1
    if budget[0] == -1:  # started at max_elements, not at -1 (unlimited)
        raise DatasetLimitExceeded("data set has more elements than node.max_elements")


def _walk_elements(buf: memoryview, pos: int, end: int, implicit: bool, order: str,
                   delimiter: int | None, budget: list[int]) -> int:
    tag_format, long_format, short_format = order + "HH", order + "L", order + "H"
    while pos < end:
        if budget[0] >= 0:
            _spend(budget)
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
            fragments = group == _PIXEL_DATA_GROUP or vr in (b"OB", b"OW")  # encapsulated pixel data (PS3.5 A.4)
            pos = _walk_items(buf, pos, end, inner_implicit, inner_order, budget, fragments=fragments)
        elif pos + length > end:
            raise MalformedDataset(f"truncated: ({group:04X},{element:04X}) lacks {pos + length - end} bytes")
        else:
            _walk_defined_value(buf, pos, pos + length, tag, vr, implicit, order, budget)
            pos += length
    if delimiter is not None:
        raise MalformedDataset("item without its delimiter")
    return pos


def _walk_items(buf: memoryview, pos: int, end: int, implicit: bool, order: str, budget: list[int],
                delimited: bool = True, fragments: bool = False) -> int:
    """The items of a sequence: up to its delimiter (undefined length), or up to ``end`` (defined).
    Items of encapsulated pixel data (``fragments``) are bytes, not data sets."""
    header_format = order + "HHL"
    while True:
        if not delimited and pos == end:
            return pos
        if budget[0] >= 0:
            _spend(budget)
        if pos + 8 > end:
            raise MalformedDataset("sequence without its delimiter" if delimited else "truncated item header")
        group, element, length = struct.unpack_from(header_format, buf, pos)
        tag = group << 16 | element
        pos += 8
        if tag == _SEQUENCE_DELIMITER and delimited:
            return pos
        if tag != _ITEM:
            raise MalformedDataset(f"expected an item, found ({group:04X},{element:04X})")
        if length == _UNDEFINED:
            pos = _walk_elements(buf, pos, end, implicit, order, _ITEM_DELIMITER, budget)
        elif pos + length > end:
            raise MalformedDataset("item runs past the end of its sequence")
        else:
            if not fragments:
                _walk_elements(buf, pos, pos + length, implicit, order, None, budget)
            pos += length


def _walk_defined_value(buf: memoryview, pos: int, end: int, tag: int, vr: bytes, implicit: bool, order: str,
                        budget: list[int]) -> None:
    """A value of defined length that is, or may be read as, a sequence: its items and their
    elements are walked (and counted). Only a declared sequence must parse as one."""
    if end == pos or tag >> 16 == _PIXEL_DATA_GROUP:
        return
    if vr == b"SQ" or (implicit and _dictionary_vr(tag) == "SQ"):
        _walk_items(buf, pos, end, implicit, order, budget, delimited=False)
        return
    if (vr == b"UN" or implicit) and end - pos >= 8 and struct.unpack_from("<L", buf, pos)[0] == _ITEM_LE:
        try:
            _walk_items(buf, pos, end, True, "<", budget, delimited=False)  # PS3.5 6.2.2: implicit VR LE
        except MalformedDataset:
            pass  # opaque bytes after all (the steps taken still count: the walk stays bounded)


def check_file(data: bytes) -> None:
    """A whole DICOM file (PS3.10: preamble, ``DICM``, file meta group, data set): the file meta
    elements lie within the file and name a known transfer syntax, and the data set, read in that
    syntax, is structurally complete (:func:`check_structure`)."""
    if len(data) < _PREFIX_END or data[128:_PREFIX_END] != b"DICM":
        raise MalformedDataset("no DICOM preamble and prefix")
    pos, transfer_syntax = _PREFIX_END, ""
    try:
        while data[pos:pos + 2] == _FILE_META_GROUP:  # always explicit VR little endian
            element, vr = struct.unpack_from("<H", data, pos + 2)[0], data[pos + 4:pos + 6]
            if vr in _LONG_VRS:
                length, pos = struct.unpack_from("<L", data, pos + 8)[0], pos + 12
            else:
                length, pos = struct.unpack_from("<H", data, pos + 6)[0], pos + 8
            if element == _TRANSFER_SYNTAX_ELEMENT:
                transfer_syntax = data[pos:pos + length].rstrip(b"\0 ").decode("ascii", "replace")
            pos += length
    except struct.error:
        raise MalformedDataset("truncated in the file meta information") from None
    if pos > len(data):
        raise MalformedDataset("truncated in the file meta information")
    syntax = UID(transfer_syntax)
    if not syntax.is_transfer_syntax:
        raise MalformedDataset(f"the file meta information names no known transfer syntax ({transfer_syntax!r})")
    body = data[pos:]
    if syntax.is_deflated:
        body = inflate(body)
    check_structure(body, implicit=syntax.is_implicit_VR, little=syntax.is_little_endian)
