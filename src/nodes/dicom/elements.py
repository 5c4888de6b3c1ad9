"""DICOM data elements at the byte level (PS3.5 §7): their headers, and stepping over them.

Little endian only; explicit VR unless ``implicit``. Pure: bytes (or an ``mmap``) in, offsets
and values out; nothing here builds a pydicom object.

- :func:`element_header`: one element's tag, value offset, value length and VR;
- :func:`skip_undefined`: past an undefined-length value (a sequence, encapsulated data);
- :func:`walk`: over the top-level elements of a data set, values skipped, until a stop tag
  or the end, keeping the values asked for;
- :func:`check_complete`: whether a data set ends inside an element.

The constants are the ones every reader of element headers shares (the item and delimiter
tags, the VRs with a 32-bit length, the header layouts as ``struct`` unpackers).
"""

from __future__ import annotations

import mmap
import struct

from pydicom.datadict import dictionary_VR

# PS3.5 §7.5: items and delimiters carry a 32-bit length and no VR, in every VR encoding.
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF  # PS3.5 §7.1.1: an undefined length
SPECIFIC_CHARACTER_SET = 0x00080005
PIXEL_TAGS = frozenset([0x7FE00008, 0x7FE00009, 0x7FE00010])  # Float, Double Float, Pixel Data

# PS3.5 §7.1.2: these VRs have two reserved bytes and a 32-bit length in explicit VR.
LONG_VRS = frozenset(["OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT",
                      "UV"])
LONG_VR_BYTES = frozenset(vr.encode("ascii") for vr in LONG_VRS)
VR_NAMES: dict[bytes, str] = {vr.encode("ascii"): vr for vr in [
    "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OD", "OF",
    "OL", "OV", "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN",
    "UR", "US", "UT", "UV"]}
_IS_LONG = {raw: name in LONG_VRS for raw, name in VR_NAMES.items()}

# Header layouts, as unpackers: one struct call reads a whole header.
EXPLICIT = struct.Struct("<HH2sH").unpack_from  # group, element, VR, 16-bit length
IMPLICIT = struct.Struct("<HHL").unpack_from    # group, element, 32-bit length (items too)
LENGTH32 = struct.Struct("<L").unpack_from      # the length after a long VR's reserved bytes
_TAG = struct.Struct("<HH").unpack_from


class Unscannable(ValueError):
    """The data set is not laid out as its transfer syntax says (or uses a form these walkers
    leave to pydicom); the caller falls back to pydicom, which names the fault."""


class CutShort(Unscannable):
    """The data set ends inside an element: a value runs past its end, or an
    undefined-length sequence or item has no delimiter before it ends."""


def element_header(data: bytes | mmap.mmap, pos: int,
                   implicit: bool) -> tuple[int, int, int, bytes]:
    """(tag, value offset, value length, VR or b"" in implicit VR) of the element whose
    header starts at ``pos``. Raises :class:`Unscannable` for an explicit VR that is not two
    upper-case letters, ``struct.error`` when the header runs past the end of ``data``."""
    if implicit:
        group, elem, length = IMPLICIT(data, pos)
        return group << 16 | elem, pos + 8, length, b""
    group, elem, vr, length = EXPLICIT(data, pos)
    long = _IS_LONG.get(vr)  # one lookup for a known VR; the letters checked for another
    if long:
        return group << 16 | elem, pos + 12, LENGTH32(data, pos + 8)[0], vr
    if long is None and not (0x41 <= vr[0] <= 0x5A and 0x41 <= vr[1] <= 0x5A):
        raise Unscannable("not an explicit VR")
    return group << 16 | elem, pos + 8, length, vr


def skip_undefined(data: bytes | mmap.mmap, pos: int, implicit: bool, end: int | None = None,
                   depth: int = 0) -> int:
    """The offset after the Sequence Delimitation Item of the undefined-length value (a
    sequence, or encapsulated data) that starts at ``pos``, its items skipped. The items of an
    undefined-length UN are implicit VR (PS3.5 §6.2.2): pass ``implicit`` for them. Raises
    :class:`CutShort` when ``data[:end]`` ends first, :class:`Unscannable` for something other
    than items or nesting deeper than 32."""
    if depth > 32:
        raise Unscannable("sequences nested too deep")
    end = len(data) if end is None else end
    while True:
        if pos + 8 > end:
            raise CutShort("sequence without its delimiter")
        group, elem, length = IMPLICIT(data, pos)
        tag = group << 16 | elem
        pos += 8
        if tag == SEQUENCE_END:
            return pos
        if tag != ITEM:
            raise Unscannable("sequence holds something other than items")
        if length != UNDEFINED:
            pos += length
            continue
        while True:  # an undefined-length item: its elements, then the Item Delimiter
            if pos + 8 > end:
                raise CutShort("item without its delimiter")
            group, elem = _TAG(data, pos)
            if group << 16 | elem == ITEM_END:
                pos += 8
                break
            _, start, length, vr = element_header(data, pos, implicit)
            if length == UNDEFINED:
                pos = skip_undefined(data, start, implicit or vr == b"UN", end, depth + 1)
            else:
                pos = start + length


def walk(data: bytes | mmap.mmap, implicit: bool, start: int = 0, end: int | None = None, *,
         stop: int | None = None, values: dict[int, bytes | None] | None = None) -> int:
    """Step over the top-level elements of the data set in ``data[start:end]`` by their headers
    and return where the walk ended: at the first element whose tag is above ``stop``, or
    where fewer than 8 bytes are left (not an element: pydicom leaves them too).

    ``values``: its keys are the tags whose values are wanted; each one met with a defined
    length is set to its value's bytes (an undefined-length value is skipped, not kept).
    Raises :class:`CutShort` when the data set ends inside an element (a value longer than
    the bytes left, an undefined-length value without its delimiter), :class:`Unscannable`
    for a layout it does not know."""
    pos, end = start, len(data) if end is None else end
    try:
        while pos + 8 <= end:
            if stop is not None:
                group, elem = _TAG(data, pos)
                if group << 16 | elem > stop:
                    break
            tag, value, length, vr = element_header(data, pos, implicit)
            if length == UNDEFINED:
                pos = skip_undefined(data, value, implicit or vr == b"UN", end)
                continue
            pos = value + length
            if pos > end:
                raise CutShort("element value runs past the end of the data set")
            if values is not None and tag in values:
                values[tag] = data[value:pos]
    except struct.error:  # an explicit VR header with a 32-bit length, cut inside
        raise CutShort("data set ends inside an element header") from None
    return pos


def check_complete(data: bytes | mmap.mmap, implicit: bool, start: int = 0,
                   end: int | None = None) -> None:
    """Raise :class:`CutShort` when the little endian data set in ``data[start:end]`` ends
    inside an element: a value longer than the bytes left, an undefined-length sequence or
    item (encapsulated Pixel Data included) without its delimiter. Only element headers are
    read (a spooled object is passed as an ``mmap``: Pixel Data is never read). Raises
    :class:`Unscannable` for a layout it does not know (the caller decides; nothing is said
    about such a data set). Fewer than 8 bytes after the last element are not an element:
    left as they are, as pydicom leaves them."""
    walk(data, implicit, start, end)


_IMPLICIT_VRS: dict[int, str] = {}


def implicit_vr(tag: int) -> str:
    """The VR pydicom gives element ``tag`` in implicit VR: its dictionary VR, "UN" for a
    private, unknown or ambiguous ("US or SS") one, "" for an item or delimiter. Cached."""
    vr = _IMPLICIT_VRS.get(tag)
    if vr is None:
        if tag >> 16 == 0xFFFE:
            vr = ""
        else:
            try:
                vr = dictionary_VR(tag)
            except KeyError:  # private or unknown: its bytes as they are
                vr = "UN"
            if vr not in _VR_SET:  # ambiguous ("US or SS"): pydicom decides
                vr = "UN"
        _IMPLICIT_VRS[tag] = vr
    return vr


_VR_SET = frozenset(VR_NAMES.values())
