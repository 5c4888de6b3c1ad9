"""Reading and rewriting a stored object's header (up to Pixel Data) as pydicom's Dataset.

Blocking functions over payloads (call them in ``trio.to_thread.run_sync``). Pixel data is
never decoded and, for every transfer syntax but deflate, never even read into memory: a
rewritten object is the new header followed by the original bytes from the Pixel Data
element on (:class:`~nodes.payload.SplicedPayload`).

:func:`read_header` returns what :func:`dcmread_header` (pydicom's ``dcmread(f,
stop_before_pixels=True)``) returns — a ``FileDataset`` with the file meta, the preamble and
the data set's elements left raw (``RawDataElement``) for pydicom to convert when first
accessed — at about half the cost, without pydicom's reader: dcmread reads each element
through a generator with per-element hooks and builds several Datasets per object, ~0.5 ms
for an SR header, as long as mapping the whole report to HL7.

One difference, on purpose: a top-level sequence of undefined length stays raw too (its
bytes up to and including its Sequence Delimitation Item), where dcmread parses it into
Datasets on the spot (~6 ms for a 50-item SR content tree written that way, as many
modalities write them). Its items are read from those bytes by :mod:`nodes.dicom.items`
as they are read here, and kept with the dataset for :func:`nodes.hl7.fields.items`.
Converted by pydicom, such an element is a ``DataElement`` with ``is_undefined_length``,
its items as dcmread would give them; only the ``Sequence.is_undefined_length`` attribute
(not used by pydicom's writer) is not set.

Everything else is left to dcmread, which then reads the whole header as before: no
preamble, a file meta that is not plain explicit VR little endian, big endian or deflated
transfer syntaxes, a private transfer syntax, a data set whose first element disagrees
with the transfer syntax about its VR encoding, command set elements, unknown VRs, an
undefined-length value that is not a sequence, an item delimiter at the top level, a
sequence this module's reader does not read (:class:`~nodes.dicom.items.Unsupported`),
a file cut between elements or inside its file meta. Errors are dcmread's, too, but for
one: a value that runs past the end of the file raises :class:`TruncatedObject`.
"""

from __future__ import annotations

import io
from typing import Any, BinaryIO

from pydicom import dcmread, dcmwrite
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import RawDataElement, empty_value_for_VR
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.tag import BaseTag
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
                         ImplicitVRLittleEndian, PrivateTransferSyntaxes)
from pydicom.values import convert_string

from ..payload import BytesPayload, Payload, SplicedPayload, read_all
from . import _pydicom
from .elements import (PIXEL_TAGS, SPECIFIC_CHARACTER_SET, UNDEFINED, VR_NAMES, Unscannable,
                       element_header, implicit_vr)
from .filemeta import MAX_META_BYTES, MetaCutShort, NotPart10, meta_elements
from .items import Incomplete, RawItem, Unsupported, parse_undefined_length

_GROUP_LENGTH, _TRANSFER_SYNTAX = 0x00020000, 0x00020010
_CHUNK = 64 * 1024
_NOT_OURS = frozenset([ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian])

_raw_element = tuple.__new__  # RawDataElement without its NamedTuple __new__ (a Python call)

# The undefined-length sequences read here, kept on the dataset for fields.items():
# tag → (the RawDataElement, the encodings they were read in, the items).
STASH = "_raw_sequences"


class _Fallback(Exception):
    """Bytes this reader leaves to dcmread."""


class TruncatedObject(ValueError):
    """An element's value runs past the end of the file: the object was cut short.

    dcmread reads such a value as the bytes that are there, and an SR whose content tree
    is cut becomes a report with half its findings; the lanes refuse it instead (ToHL7
    dead-letters it: ``unreadable header (TruncatedObject)``; a Filter or the FHIR sender
    settles it Permanent)."""


def read_header(payload: Payload) -> Dataset:
    """The object's file meta and data set up to (not including) Pixel Data, as
    :func:`dcmread_header` gives them (see the module docstring). Raises
    :class:`TruncatedObject`, or dcmread's error for what dcmread cannot read."""
    try:
        with payload.open() as f:
            return _Reader(f).dataset()
    except TruncatedObject:
        raise
    except Exception:  # anything unexpected: dcmread reads it, or says why it cannot
        return dcmread_header(payload)


def dcmread_header(payload: Payload) -> Dataset:
    """pydicom's reading of the object's file meta and data set up to Pixel Data
    (``dcmread(f, stop_before_pixels=True)``): what :func:`read_header` falls back to."""
    with payload.open() as f:
        return dcmread(f, stop_before_pixels=True)


def stashed_items(ds: Dataset, tag: int, element: RawDataElement,
                  encodings: Any) -> tuple[RawItem, ...] | None:
    """The items of ``element`` read with the header, if it is still ``ds``'s element
    ``tag`` and they were read in ``encodings``; else None."""
    stash = ds.__dict__.get(STASH)
    if stash is None:
        return None
    kept = stash.get(tag)
    if kept is None or kept[0] is not element or kept[1] != encodings:
        return None
    return kept[2]


class _Reader:
    """One pass over a file: ``buf`` holds its bytes from the start, read as needed."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.buf = f.read(_CHUNK)
        self.eof = not self.buf  # only an empty read says so: a stream may read short

    def fill(self, end: int) -> bool:
        """Read until the buffer holds ``end`` bytes; False when the file is shorter."""
        while len(self.buf) < end and not self.eof:
            more = self.f.read(max(_CHUNK, end - len(self.buf), len(self.buf)))
            self.eof = not more
            self.buf += more
        return len(self.buf) >= end

    def need(self, end: int) -> bytes:
        """The buffer, holding at least ``end`` bytes (TruncatedObject when the file is
        shorter)."""
        if len(self.buf) < end and not self.fill(end):
            raise TruncatedObject("an element's value runs past the end of the file")
        return self.buf

    def dataset(self) -> FileDataset:
        if not self.fill(132) or self.buf[128:132] != b"DICM":
            raise _Fallback("no preamble")
        meta, pos = self.file_meta()
        file_meta = FileMetaDataset(meta)
        file_meta.set_original_encoding(False, True, default_encoding)
        # as dcmread: the first element converted (its check for an implicit VR file
        # meta), the group length read (it only logs a mismatch), the transfer syntax
        # read (converted too)
        file_meta[next(iter(meta))]
        if _GROUP_LENGTH in meta:
            file_meta[_GROUP_LENGTH]
        if _TRANSFER_SYNTAX not in meta:
            raise _Fallback("no transfer syntax")
        uid = file_meta[_TRANSFER_SYNTAX].value
        if uid in _NOT_OURS or uid in PrivateTransferSyntaxes:
            raise _Fallback("big endian, deflated or private")
        implicit = uid == ImplicitVRLittleEndian
        if not self.fill(pos + 8):
            if len(self.buf) > pos:
                raise _Fallback("a few bytes after the file meta")
            implicit = True  # as dcmread: nothing after the file meta, implicit VR assumed
        elements, stash = self.elements(pos, implicit)
        ds = FileDataset(self.f, elements, self.buf[:128], file_meta, implicit, True)
        # as dcmread: the character set converts Specific Character Set in the dataset
        ds.set_original_encoding(implicit, True, _pydicom.character_set(ds))
        if stash:
            encodings = ds.original_character_set
            object.__setattr__(ds, STASH, {tag: (elements[tag], enc, items)
                                           for tag, (enc, items) in stash.items()
                                           if enc == encodings})
        return ds

    def file_meta(self) -> tuple[dict[BaseTag, RawDataElement], int]:
        """The group 2 elements after ``DICM`` (explicit VR little endian, PS3.10 §7.1), read
        by :func:`~nodes.dicom.filemeta.meta_elements`, and where the data set starts."""
        while True:
            try:
                found, end = meta_elements(self.buf, whole=self.eof)
                break
            except MetaCutShort:
                if self.eof or len(self.buf) >= MAX_META_BYTES:
                    raise _Fallback("file meta cut short") from None
                self.fill(len(self.buf) + 1)
            except NotPart10:
                raise _Fallback("no file meta") from None
        buf = self.buf
        meta: dict[BaseTag, RawDataElement] = {}
        for tag, vr_bytes, start, stop in found:
            vr = VR_NAMES.get(vr_bytes)
            if vr is None:
                raise _Fallback("file meta not in explicit VR")
            key = BaseTag(tag)
            length = stop - start
            value = buf[start:stop] if length else empty_value_for_VR(vr, raw=True)
            meta[key] = _raw_element(RawDataElement, (key, vr, length, value, start, False,
                                                      True, True, False))
        return meta, end

    def elements(self, pos: int, implicit: bool) -> tuple[dict, dict]:
        """The data set's elements from ``pos`` up to Pixel Data or the end, and the items
        of its undefined-length sequences (tag → (encodings, items))."""
        elements: dict[BaseTag, RawDataElement] = {}
        stash: dict[int, tuple] = {}
        encodings: Any = default_encoding
        if self.fill(pos + 8):  # dcmread's checks of where the data set starts
            if self.buf[pos:pos + 2] == b"\x00\x00":
                raise _Fallback("command set elements")
            vr_bytes = self.buf[pos + 4:pos + 6]
            if implicit == (0x40 < vr_bytes[0] < 0x5B and 0x40 < vr_bytes[1] < 0x5B):
                raise _Fallback("VR encoding differs from the transfer syntax")
        buf = self.buf
        while True:
            if pos + 12 > len(buf):  # (the buffer is only extended here and below)
                if not self.fill(pos + 8):
                    break  # as dcmread: fewer than 8 bytes left end the data set
                self.fill(pos + 12)
                buf = self.buf
            try:
                tag, start, length, vr_bytes = element_header(buf, pos, implicit)
            except Unscannable:
                raise _Fallback("not an explicit VR") from None
            if implicit:
                vr = None
            else:
                vr = VR_NAMES.get(vr_bytes)
                if vr is None:
                    raise _Fallback("unknown VR")
            if tag in PIXEL_TAGS:
                break
            if tag >> 16 == 0xFFFE:
                raise _Fallback("delimiter at the top level")
            if length == UNDEFINED:
                if (vr or implicit_vr(tag)) != "SQ":
                    raise _Fallback("undefined-length value that is not a sequence")
                items, pos = self.undefined_length(start, implicit, encodings)
                buf = self.buf
                stash[tag] = (encodings, items)
                value = buf[start:pos]
            else:
                pos = start + length
                if pos > len(buf):
                    buf = self.need(pos)
                value = buf[start:pos] if length else empty_value_for_VR(vr, raw=True)
                if tag == SPECIFIC_CHARACTER_SET:  # as dcmread: for the sequences after it
                    encodings = convert_encodings(convert_string(value or b"", True))
            key = BaseTag(tag)
            elements[key] = _raw_element(RawDataElement, (key, vr, length, value, start,
                                                          implicit, True, True, False))
        return elements, stash

    def undefined_length(self, start: int, implicit: bool,
                         encodings: Any) -> tuple[tuple[RawItem, ...], int]:
        """An undefined-length sequence's items and the position after its delimiter,
        reading more of the file until it is whole."""
        while True:
            try:
                return parse_undefined_length(self.buf, start, implicit, encodings)
            except Incomplete:  # the bytes read so far end inside it: read more
                if not self.fill(len(self.buf) + 1):
                    raise _Fallback("a sequence cut short") from None
            except Unsupported:  # never the file's rest (it may be pixel data) for this
                raise _Fallback("a sequence the raw reader does not read") from None


def _header_and_offset(f: BinaryIO) -> tuple[Dataset, int]:
    ds = dcmread(f, stop_before_pixels=True)
    # pydicom rewinds to the start of the element that stopped the read (Pixel Data or a
    # later tag), so everything from here on is copied verbatim.
    return ds, f.tell()


def _encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def header_for_edit(payload: Payload) -> tuple[Dataset, int | None]:
    """(header, offset of the untouched remainder), both read by pydicom. For a deflated
    data set the remainder cannot be spliced: the whole object is read (offset None) and
    re-encoded by :func:`rewrite`."""
    with payload.open() as f:
        ds, offset = _header_and_offset(f)
    if ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian:
        return dcmread(io.BytesIO(read_all(payload))), None
    return ds, offset


def rewrite(payload: Payload, ds: Dataset, offset: int | None) -> Payload:
    """The edited object: header ``ds`` followed by ``payload``'s bytes from ``offset`` on
    (both from :func:`header_for_edit`), or wholly re-encoded when ``offset`` is None."""
    if offset is None:
        return BytesPayload(_encode(ds))
    return SplicedPayload(_encode(ds), payload, offset)
