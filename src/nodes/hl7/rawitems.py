"""Sequence items read straight from the bytes of a raw sequence element. Pure, read-only.

pydicom reads a Part 10 object lazily: a sequence stays a ``RawDataElement`` (its encoded
bytes) until it is first accessed, and converting it then builds a ``Dataset`` per item and
a ``DataElement`` per element, each through pydicom's hooks and validators. For an SR
content tree that is ~0.5 ms per content item, ~25 ms for a 50-item report: 20× the whole
mapping to HL7. A handler only reads, so :func:`parse_items` walks the bytes once into
:class:`RawItem` s that decode a value only when it is asked for.

Contract:

- :meth:`RawItem.value` gives what pydicom's ``Dataset.get`` would give for the element,
  except that a single-valued text element (AE AS CS DA DT TM UI LO SH UC LT ST UT UR PN) is
  a plain ``str`` (pydicom: ``str``, or the ``UID``/``PersonName`` subclass-like types whose
  ``str()`` is the same text) and pydicom's value validators do not run (they only warn).
  Everything else (numbers, multi-valued text, ISO 2022 code extensions, text that does not
  decode in its character set) is converted by pydicom's own ``convert_value``.
- A sequence element's value is a tuple of :class:`RawItem`.
- Explicit and implicit VR little endian, defined and undefined lengths. Anything else
  (big endian, an undefined-length value that is not a sequence, a sequence encoded as
  UN, truncated bytes) raises :class:`Unsupported`: the caller lets pydicom convert the
  element instead (see :func:`nodes.hl7.fields.items`).
"""

from __future__ import annotations

import codecs
import struct
from collections.abc import MutableSequence
from typing import Any

from pydicom import config
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.tag import BaseTag
from pydicom.values import convert_value

Encodings = str | MutableSequence[str]

_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_SPECIFIC_CHARACTER_SET = 0x00080005

_EXPLICIT = struct.Struct("<HH2sH").unpack_from   # group, element, VR, 16-bit length
_IMPLICIT = struct.Struct("<HHL").unpack_from     # group, element, 32-bit length (also items)
_LENGTH32 = struct.Struct("<L").unpack_from

# PS3.5 §7.1.2: these VRs have two reserved bytes and a 32-bit length in explicit VR.
_LONG_VRS = frozenset(["OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR",
                       "UT", "UV"])
_VR_NAMES: dict[bytes, str] = {vr.encode("ascii"): vr for vr in [
    "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OD", "OF",
    "OL", "OV", "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN",
    "UR", "US", "UT", "UV"]}

# How pydicom decodes single-valued text (pydicom.values): string VRs in the default
# encoding with trailing spaces/NULs dropped, text VRs in the Specific Character Set.
_STRING_VRS = frozenset(["AS", "CS", "UI"])
_DATETIME_VRS = frozenset(["DA", "DT", "TM"])   # strings unless config.datetime_conversion
_TEXT_VRS = frozenset(["LO", "SH", "UC", "PN"])  # split at backslashes: one value only here
_SINGLE_TEXT_VRS = frozenset(["LT", "ST", "UT"])


class Unsupported(ValueError):
    """Bytes this reader leaves to pydicom (see the module docstring)."""


class RawItem:
    """One sequence item: element values by tag, decoded on demand (immutable)."""

    __slots__ = ("_buf", "_elements", "_encodings", "_implicit")

    def __init__(self, buf: bytes, elements: dict[int, tuple], encodings: Encodings,
                 implicit: bool) -> None:
        self._buf = buf
        self._elements = elements      # tag → (VR, start, end, items of a sequence or None)
        self._encodings = encodings
        self._implicit = implicit

    def __contains__(self, tag: int) -> bool:
        return tag in self._elements

    def __len__(self) -> int:
        return len(self._elements)

    def tags(self) -> list[int]:
        return sorted(self._elements)

    def value(self, tag: int, default: Any = None) -> Any:
        """The value of element ``tag`` (see the module docstring), ``default`` if absent."""
        spec = self._elements.get(tag)
        if spec is None:
            return default
        vr, start, end, children = spec
        if children is not None:
            return children
        raw = self._buf[start:end]
        text = decode_text(vr, raw, self._encodings)
        return text if text is not None else _convert(vr, raw, self._encodings, tag,
                                                      self._implicit)

    def __repr__(self) -> str:
        return f"<RawItem {len(self._elements)} elements>"  # never the values: PHI


def parse_items(buf: bytes, implicit: bool, encodings: Encodings) -> tuple[RawItem, ...]:
    """The items of a sequence value ``buf`` (little endian; explicit VR unless ``implicit``),
    whose text is in ``encodings`` (pydicom's Python codec names) unless an item says
    otherwise. Raises :class:`Unsupported`."""
    try:
        items, _ = _items(buf, 0, len(buf), implicit, encodings)
    except struct.error:
        raise Unsupported("truncated sequence") from None
    return items


def sequence_items(element: RawDataElement, encodings: Encodings) -> tuple[RawItem, ...] | None:
    """The items of a sequence element pydicom has not converted yet, or None when this
    reader leaves it to pydicom (not a sequence, big endian, deferred, :class:`Unsupported`).
    ``encodings``: the dataset's, as pydicom would pass them (``original_character_set``)."""
    tag = int(element.tag)
    vr = element.VR or _implicit_vr(tag)
    if vr != "SQ" or not element.is_little_endian or element.value is None:
        return None
    try:
        return parse_items(element.value, element.is_implicit_VR, encodings)
    except Unsupported:
        return None


def _items(buf: bytes, pos: int, end: int | None, implicit: bool,
           encodings: Encodings) -> tuple[tuple[RawItem, ...], int]:
    """Items from ``pos`` to ``end``, or to a Sequence Delimitation Item when ``end`` is None
    (undefined length). Returns the items and the position after them."""
    out = []
    limit = len(buf) if end is None else end
    while pos < limit:
        group, element, length = _IMPLICIT(buf, pos)
        tag = group << 16 | element
        pos += 8
        if tag == _SEQUENCE_END:
            return tuple(out), pos
        if tag != _ITEM:
            raise Unsupported("sequence content that is not an item")
        if length != _UNDEFINED and pos + length > limit:
            raise Unsupported("item overruns its sequence")
        if length == _UNDEFINED:
            item, pos = _item(buf, pos, None, implicit, encodings)
        else:
            item, _ = _item(buf, pos, pos + length, implicit, encodings)
            pos += length
        out.append(item)
    if end is None:
        raise Unsupported("undefined-length sequence without its delimiter")
    return tuple(out), pos


def _item(buf: bytes, pos: int, end: int | None, implicit: bool,
          encodings: Encodings) -> tuple[RawItem, int]:
    """One item's elements from ``pos`` to ``end``, or to an Item Delimitation Item."""
    elements: dict[int, tuple] = {}
    limit = len(buf) if end is None else end
    while pos < limit:
        if implicit:
            group, element, length = _IMPLICIT(buf, pos)
            vr = _implicit_vr(group << 16 | element)
            start = pos + 8
        else:
            group, element, vr_bytes, length = _EXPLICIT(buf, pos)
            vr = _VR_NAMES.get(vr_bytes, "") if group != 0xFFFE else ""
            if vr in _LONG_VRS:
                length = _LENGTH32(buf, pos + 8)[0]
                start = pos + 12
            else:
                start = pos + 8
        tag = group << 16 | element
        if group == 0xFFFE:  # a delimiter has no VR and a 32-bit length
            if tag == _ITEM_END and end is None:
                return RawItem(buf, elements, encodings, implicit), pos + 8
            raise Unsupported("delimiter out of place")
        if not vr:
            raise Unsupported("unknown VR (implicit VR inside explicit?)")
        if vr == "UN" and not implicit and _implicit_vr(tag) != "UN":
            raise Unsupported("UN element whose real VR pydicom knows")
        if tag == _SPECIFIC_CHARACTER_SET:
            # an item may declare its own character set (PS3.5 §6.1.2.5.3); it comes first
            encodings = _item_encodings(buf[start:start + length], encodings)
        if length == _UNDEFINED:
            if vr != "SQ":
                raise Unsupported("undefined-length value that is not a sequence")
            children, pos = _items(buf, start, None, implicit, encodings)
            elements[tag] = ("SQ", start, pos, children)
            continue
        pos = start + length
        if vr == "SQ":
            children, _ = _items(buf, start, pos, implicit, encodings)
            elements[tag] = ("SQ", start, pos, children)
        else:
            elements[tag] = (vr, start, pos, None)
    if end is None:
        raise Unsupported("undefined-length item without its delimiter")
    if pos != limit:
        raise Unsupported("element overruns its item")
    return RawItem(buf, elements, encodings, implicit), pos


_IMPLICIT_VRS: dict[int, str] = {}


def _implicit_vr(tag: int) -> str:
    vr = _IMPLICIT_VRS.get(tag)
    if vr is None:
        if tag >> 16 == 0xFFFE:
            vr = ""
        else:
            try:
                vr = dictionary_VR(tag)
            except KeyError:  # private or unknown: its bytes as they are
                vr = "UN"
            if vr not in _VR_NAMES.values():  # ambiguous ("US or SS"): pydicom decides
                vr = "UN"
        _IMPLICIT_VRS[tag] = vr
    return vr


def _item_encodings(raw: bytes, inherited: Encodings) -> Encodings:
    terms = [t.strip() for t in raw.decode(default_encoding).rstrip(" \x00").split("\\")]
    return convert_encodings(terms) if any(terms) else inherited


def _convert(vr: str, raw: bytes, encodings: Encodings, tag: int, implicit: bool) -> Any:
    """pydicom's conversion of a value :func:`decode_text` leaves to it."""
    element = RawDataElement(BaseTag(tag), vr, len(raw), raw, 0, implicit, True)
    return convert_value(vr, element, encodings)


def raw_text(element: RawDataElement, encodings: Encodings) -> str | None:
    """A raw element's single-valued text as pydicom would decode it (see the module
    docstring), or None when it is not one: then pydicom should convert it."""
    raw = element.value
    if not raw:  # empty (pydicom's empty value for the VR) or deferred
        return None
    return decode_text(element.VR or _implicit_vr(int(element.tag)), raw, encodings)


def decode_text(vr: str, raw: bytes, encodings: Encodings) -> str | None:
    """``raw`` decoded as pydicom decodes one text value of VR ``vr``, or None when it is
    not such a value (another VR, several values, ISO 2022 escapes, bytes that do not decode
    in ``encodings``: pydicom warns and replaces, so it should do that)."""
    if not raw or b"\x1b" in raw:
        return None
    try:
        if vr in _STRING_VRS or (vr in _DATETIME_VRS and not config.datetime_conversion):
            text = raw.decode(_DEFAULT_CODEC).rstrip(" \x00")
            return text if "\\" not in text else None
        if vr in _TEXT_VRS:
            text = raw.decode(_codec(encodings))
            return text.rstrip("\x00 ") if "\\" not in text else None
        if vr in _SINGLE_TEXT_VRS:
            return raw.decode(_codec(encodings)).rstrip("\x00 ")
        if vr == "AE":
            text = raw.decode(_DEFAULT_CODEC)
            return text.strip() if "\\" not in text else None
        if vr == "UR":
            return raw.decode(_DEFAULT_CODEC).rstrip()
    except (UnicodeError, LookupError):
        pass
    return None


_CODECS: dict[str, str] = {}


def _codec(encodings: Encodings) -> str:
    """The codec that decodes text without escape sequences (pydicom: the first one), by
    its canonical name: ``bytes.decode`` has fast paths for "latin-1" and "utf-8" only, and
    pydicom's default "iso8859" costs 7× more through the codec registry."""
    name = encodings if isinstance(encodings, str) else encodings[0]
    codec = _CODECS.get(name)
    if codec is None:
        codec = codecs.lookup(name).name  # LookupError: pydicom decides
        codec = _CODECS[name] = "latin-1" if codec == "iso8859-1" else codec
    return codec


_DEFAULT_CODEC = _codec(default_encoding)
