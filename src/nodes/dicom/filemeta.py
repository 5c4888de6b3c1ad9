"""DICOM Part 10 file meta: build it, read it, find where the data set starts. Pure, no pydicom.

The file meta group (0002,xxxx) is always Explicit VR Little Endian (PS3.10 §7.1), so a few
struct calls are enough. The listener builds the meta of what it received with
:func:`encode_file_meta`; the sender reads which SOP class / transfer syntax a stored object
has, and where its data set begins, with :func:`parse_file_meta`; the header reader
(:mod:`nodes.dicom.header`) takes the group's elements from :func:`meta_elements`. None of
them touches the data set: objects travel byte for byte.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

from .elements import EXPLICIT, LENGTH32, LONG_VR_BYTES, UNDEFINED

PREAMBLE = b"\x00" * 128
MAGIC = b"DICM"

# Deterministic sub-arc of pydicom's root (generate_uid with fixed entropy), stable across
# releases: peers log it as the implementation that wrote the file meta.
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.99917419520202306348574428554894828457"
IMPLEMENTATION_VERSION_NAME = "DICOMFLOW_01"

MAX_META_BYTES = 64 << 10


class NotPart10(ValueError):
    """The bytes are not a DICOM Part 10 file with a readable file meta group."""


class MetaCutShort(NotPart10):
    """The bytes end inside the file meta group: more of the file may make it whole."""


@dataclass(frozen=True, slots=True)
class FileMeta:
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    dataset_offset: int  # where the data set (after the meta group) starts


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if vr in LONG_VR_BYTES:
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b" " if len(raw) % 2 else raw


def encode_file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str,
                     *, source_ae_title: str = "") -> bytes:
    """Preamble, ``DICM`` and the file meta group for one object (PS3.10 §7.1).

    ``source_ae_title`` (0002,0016) is the AE that sent us the object; left out when empty.
    """
    body = b"".join((
        _element(0x0002, 0x0001, b"OB", b"\x00\x01"),
        _element(0x0002, 0x0002, b"UI", _uid(sop_class_uid)),
        _element(0x0002, 0x0003, b"UI", _uid(sop_instance_uid)),
        _element(0x0002, 0x0010, b"UI", _uid(transfer_syntax_uid)),
        _element(0x0002, 0x0012, b"UI", _uid(IMPLEMENTATION_CLASS_UID)),
        _element(0x0002, 0x0013, b"SH", _text(IMPLEMENTATION_VERSION_NAME)),
        _element(0x0002, 0x0016, b"AE", _text(source_ae_title.strip())) if source_ae_title.strip()
        else b"",
    ))
    return PREAMBLE + MAGIC + _element(0x0002, 0x0000, b"UL", struct.pack("<I", len(body))) + body


MetaElement = tuple[int, bytes, int, int]  # (tag, VR, value offset, value end)


def meta_elements(head: bytes, *, whole: bool = False) -> tuple[list[MetaElement], int]:
    """The file meta group of a Part 10 file from its first bytes (at least the whole meta
    group; ``whole`` says ``head`` is the entire file, so it may end right after the group),
    element by element in the order written, and the offset where the data set starts.

    Walks the group element by element, so a wrong (0002,0000) group length does not matter;
    a VR is taken as written (the caller decides what an unknown one means). Raises
    :class:`NotPart10` when ``head`` has no ``DICM`` prefix, is cut inside the meta group
    (:class:`MetaCutShort`: more bytes may help) or holds no meta element.
    """
    if len(head) < 132 or head[128:132] != MAGIC:
        raise NotPart10("no DICM prefix at byte 128")
    pos, elements = 132, []
    while True:
        if len(head) < pos + 8:
            if len(head) >= MAX_META_BYTES:
                raise NotPart10("file meta group too long")
            if whole and pos == len(head) and elements:
                break  # a file that holds only a meta group
            raise MetaCutShort("file meta group cut short")
        group, elem, vr, length = EXPLICIT(head, pos)
        if group != 0x0002:
            break
        start = pos + 8
        if vr in LONG_VR_BYTES:
            if len(head) < pos + 12:
                raise MetaCutShort("file meta group cut short")
            (length,) = LENGTH32(head, start)
            start += 4
        if length == UNDEFINED or len(head) < start + length:
            raise MetaCutShort("file meta group cut short")
        pos = start + length
        elements.append((group << 16 | elem, vr, start, pos))
    if not elements:
        raise NotPart10("no file meta group after DICM")
    return elements, pos


def parse_file_meta(head: bytes, *, whole: bool = False) -> FileMeta:
    """The meta facts of a Part 10 file from its first bytes (see :func:`meta_elements`).

    Raises :class:`NotPart10` as :func:`meta_elements` does, and when the group lacks one of
    the three UIDs.
    """
    elements, pos = meta_elements(head, whole=whole)
    values = {tag: head[start:end] for tag, _, start, end in elements}
    try:
        sop_class, sop_instance, ts = (values[t].rstrip(b"\x00 ").decode("ascii")
                                       for t in (0x00020002, 0x00020003, 0x00020010))
    except KeyError:
        raise NotPart10("file meta lacks a SOP class, SOP instance or transfer syntax UID") \
            from None
    except UnicodeDecodeError:
        raise NotPart10("file meta UID is not ASCII") from None
    return FileMeta(sop_class, sop_instance, ts, pos)


def read_file_meta(f: BinaryIO) -> FileMeta:
    """:func:`parse_file_meta` from a stream positioned at byte 0 (blocking). The stream is
    left somewhere after the meta group; seek before reading on."""
    head = f.read(4096)
    while True:
        try:
            return parse_file_meta(head)
        except MetaCutShort:
            if len(head) >= MAX_META_BYTES:
                raise
            more = f.read(4096)
            if not more:
                return parse_file_meta(head, whole=True)
            head += more
