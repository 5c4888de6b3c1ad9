"""Sequence items read straight from the bytes of a raw sequence element. Pure, read-only.

pydicom reads a Part 10 object lazily: a sequence stays a ``RawDataElement`` (its encoded
bytes) until it is first accessed, and converting it then builds a ``Dataset`` per item and
a ``DataElement`` per element, each through pydicom's hooks and validators. For an SR
content tree that is ~0.5 ms per content item, ~25 ms for a 50-item report: 20× the whole
mapping to HL7. A handler only reads, so :func:`parse_items` walks the bytes once into
:class:`RawItem` s, decoding text as it goes (a report reads nearly every element of its
content tree, once) and leaving the rest to pydicom until it is asked for. Coded entries,
most of a report's items and the same few dozen over and over, are kept by their bytes
(see ``_CODE_ITEMS``).

Contract:

- :meth:`RawItem.value` gives what pydicom's ``Dataset.get`` would give for the element,
  except that a single-valued text element (AE AS CS DA DT TM UI LO SH UC LT ST UT UR PN) is
  a plain ``str`` (pydicom: ``str``, or the ``UID``/``PersonName`` subclass-like types whose
  ``str()`` is the same text) and pydicom's value validators do not run (they only warn).
  Everything else (numbers, multi-valued text, ISO 2022 code extensions, text that does not
  decode in its character set) is converted by pydicom's own ``convert_value`` when first
  read, and kept (as pydicom keeps a converted element).
- A sequence element's value is a tuple of :class:`RawItem` (the same tuple and items for
  the same coded entries: they are immutable and shared).
- Explicit and implicit VR little endian, defined and undefined lengths. Anything else
  (big endian, an undefined-length value that is not a sequence, a sequence encoded as
  UN, truncated bytes) raises :class:`Unsupported`: the caller lets pydicom convert the
  element instead (see :func:`nodes.hl7.fields.items`).
"""

from __future__ import annotations

import codecs
import re
import struct
from collections.abc import MutableSequence
from typing import Any

from pydicom import config
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import RawDataElement
from pydicom.tag import BaseTag
from pydicom.values import convert_value

from .elements import (EXPLICIT, IMPLICIT, ITEM_END, LENGTH32, LONG_VRS, SPECIFIC_CHARACTER_SET,
                       UNDEFINED, VR_NAMES, implicit_vr)

Encodings = str | MutableSequence[str]

# How pydicom decodes single-valued text (pydicom.values): string VRs in the default
# encoding with trailing spaces/NULs dropped, text VRs in the Specific Character Set.
_STRING_VRS = frozenset(["AS", "CS", "UI"])
_DATETIME_VRS = frozenset(["DA", "DT", "TM"])   # strings unless config.datetime_conversion
_TEXT_VRS = frozenset(["LO", "SH", "UC", "PN"])  # split at backslashes: one value only here
_SINGLE_TEXT_VRS = frozenset(["LT", "ST", "UT"])


# One DS value (PS3.5 Table 6.2-1): a fixed or floating point number, no spaces inside.
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?").fullmatch


class Unsupported(ValueError):
    """Bytes this reader leaves to pydicom (see the module docstring)."""


class Incomplete(Unsupported):
    """The bytes end before the sequence does: truncated, or (for a reader that has not read
    the whole file yet, nodes.dicom.header) more bytes are needed."""


class _Undecoded(tuple):
    """(VR, start, end) of a value the parse left to pydicom's conversion."""

    __slots__ = ()


_undecoded = tuple.__new__


class RawItem:
    """One sequence item: element values by tag (immutable).

    Text values are decoded as the item is parsed, once (a report reads nearly every element
    of its content items, and a decode inside the parse loop costs less than a call per
    read); the rest are converted by pydicom when first asked for, and kept.
    """

    __slots__ = ("_values", "_buf", "_encodings", "_implicit", "_pending", "_code")

    def __init__(self, values: dict[int, Any], buf: bytes, encodings: Encodings,
                 implicit: bool, pending: bool = True) -> None:
        self._values = values   # tag → value, or _Undecoded for pydicom to convert
        self._buf = buf
        self._encodings = encodings
        self._implicit = implicit
        self._pending = pending  # False: no _Undecoded among the values
        self._code: Any = None   # fields.code_of's answer, kept (coded entries are shared)

    def __contains__(self, tag: int) -> bool:
        return tag in self._values

    def __len__(self) -> int:
        return len(self._values)

    def tags(self) -> list[int]:
        return sorted(self._values)

    def value(self, tag: int, default: Any = None) -> Any:
        """The value of element ``tag`` (see the module docstring), ``default`` if absent."""
        value = self._values.get(tag, default)
        if value.__class__ is _Undecoded:
            return self.convert(tag)
        return value

    get = value  # a RawItem reads like a dict of its values (nodes.hl7.obx)

    def number_text(self, tag: int) -> str | None:
        """The text of a DS value that is one decimal number, without converting it:
        what ``str()`` of pydicom's DSfloat gives (its original text), stripped. None when
        the element is absent, converted already, not DS, several values or not a number
        (read those with :meth:`value`). pydicom's conversion is most of the cost of a
        NUM content item, and the HL7 mapping wants the text."""
        value = self._values.get(tag)
        if value.__class__ is not _Undecoded or value[0] != "DS":
            return None
        text = self._buf[value[1]:value[2]].decode("latin-1").strip(" \x00")
        return text if _DECIMAL(text) else None

    def convert(self, tag: int) -> Any:
        """pydicom's conversion of an element the parse did not decode, kept for the next
        read (as pydicom keeps a converted element in its dataset)."""
        vr, start, end = self._values[tag]
        value = self._values[tag] = _convert(vr, self._buf[start:end], self._encodings, tag,
                                             self._implicit)
        return value

    def __repr__(self) -> str:
        return f"<RawItem {len(self._values)} elements>"  # never the values: PHI


def parse_items(buf: bytes, implicit: bool, encodings: Encodings) -> tuple[RawItem, ...]:
    """The items of a sequence value ``buf`` (little endian; explicit VR unless ``implicit``),
    whose text is in ``encodings`` (pydicom's Python codec names) unless an item says
    otherwise. Raises :class:`Unsupported`."""
    try:
        items, _ = _items(buf, 0, len(buf), _context(implicit, encodings))
    except struct.error:
        raise Incomplete("truncated sequence") from None
    return items


def parse_undefined_length(buf: bytes, pos: int, implicit: bool,
                           encodings: Encodings) -> tuple[tuple[RawItem, ...], int]:
    """The items of an undefined-length sequence whose value starts at ``pos`` in ``buf``,
    and the position just after its Sequence Delimitation Item. Raises :class:`Unsupported`
    (also when ``buf`` ends before the delimiter: more bytes may be needed)."""
    try:
        return _items(buf, pos, None, _context(implicit, encodings))
    except struct.error:
        raise Incomplete("truncated sequence") from None


def sequence_items(element: RawDataElement, encodings: Encodings) -> tuple[RawItem, ...] | None:
    """The items of a sequence element pydicom has not converted yet, or None when this
    reader leaves it to pydicom (not a sequence, big endian, deferred, :class:`Unsupported`).
    ``encodings``: the dataset's, as pydicom would pass them (``original_character_set``)."""
    tag = int(element.tag)
    vr = element.VR or implicit_vr(tag)
    if vr != "SQ" or not element.is_little_endian or element.value is None:
        return None
    try:
        return parse_items(element.value, element.is_implicit_VR, encodings)
    except Unsupported:
        return None


# What reading a sequence depends on besides its bytes, in one tuple handed down the
# recursion: (implicit VR, encodings, text codec or None, how each element is decoded (by its
# VR's bytes in explicit VR, by its tag in implicit VR), the coded entries already read in
# this same context).
_Context = tuple[bool, Encodings, "str | None", dict, dict]


def _context(implicit: bool, encodings: Encodings) -> _Context:
    codec = _text_codec(encodings)
    datetimes = bool(config.datetime_conversion)
    kinds = (_IMPLICIT_KINDS if implicit else _EXPLICIT_KINDS)[datetimes]
    key = (implicit, codec, datetimes)
    codes = _CODE_ITEMS.get(key)
    if codes is None:
        codes = _CODE_ITEMS[key] = {}
    return (implicit, encodings, codec, kinds, codes)


# Coded entries (PS3.3 Table 8.8-1, the Code Sequence Macro): the items a report is mostly
# made of (every content item names its concept with one) and the same few dozen over and
# over. An item of only these elements, all decoded text, is kept by its bytes, and so is
# a sequence of such items, in a table per context (VR encoding, codec, date/time setting):
# a hit is exactly what parsing those bytes gives, and holds nothing to convert or change.
# Each table is emptied at 4096 entries (a site's vocabulary fits, a flood of distinct
# codes does not grow it).
_CODE_ITEM_TAGS = frozenset([
    0x00080100, 0x00080102, 0x00080103, 0x00080104, 0x00080105, 0x00080106, 0x00080107,
    0x0008010B, 0x0008010C, 0x0008010D, 0x0008010F, 0x00080117, 0x00080118, 0x00080119,
    0x00080120, 0x00080122])
_CODE_ITEM_MAX = 512
_CODE_ITEMS: dict[tuple, dict[bytes, Any]] = {}


def _is_code_item(item: RawItem) -> bool:
    values = item._values
    return values.keys() <= _CODE_ITEM_TAGS and all(
        v.__class__ is str for v in values.values())


def _keep(codes: dict[bytes, Any], key: bytes, value: Any) -> None:
    if len(codes) >= 4096:
        codes.clear()
    codes[key] = value


def _items(buf: bytes, pos: int, end: int | None,
           context: _Context) -> tuple[tuple[RawItem, ...], int]:
    """Items from ``pos`` to ``end``, or to a Sequence Delimitation Item when ``end`` is None
    (undefined length). Returns the items and the position after them."""
    out = []
    limit = len(buf) if end is None else end
    codes = context[4]
    while pos < limit:
        group, element, length = IMPLICIT(buf, pos)
        pos += 8
        if group == 0xFFFE and element == 0xE0DD:  # Sequence Delimitation Item
            return tuple(out), pos
        if group != 0xFFFE or element != 0xE000:
            raise Unsupported("sequence content that is not an item")
        if length == UNDEFINED:
            item, pos = _item(buf, pos, None, context)
        else:
            if pos + length > limit:
                raise (Incomplete if end is None else Unsupported)(
                    "item overruns its sequence")
            if buf.startswith(b"\x08\x00", pos):  # group 0008 first: maybe a coded entry
                key = buf[pos:pos + length]
                item = codes.get(key)
                if item is None:
                    item, _ = _item(buf, pos, pos + length, context)
                    if length <= _CODE_ITEM_MAX and _is_code_item(item):
                        # no buffer: every value is text, nothing is left to convert
                        item = RawItem(item._values, b"", context[1], context[0], False)
                        _keep(codes, key, item)
            else:  # a content item (group 0040 first), or anything else
                item, _ = _item(buf, pos, pos + length, context)
            pos += length
        out.append(item)
    if end is None:
        raise Incomplete("undefined-length sequence without its delimiter")
    return tuple(out), pos


def _item(buf: bytes, pos: int, end: int | None, context: _Context) -> tuple[RawItem, int]:
    """One item's elements from ``pos`` to ``end``, or to an Item Delimitation Item.

    The hot loop of reading a Part 10 report: one pass per element, text decoded in place
    (the cases of :func:`decode_text`, inline: a call per element costs as much as the
    decode), the element's kind found with one lookup (:data:`_EXPLICIT_KINDS`)."""
    implicit, encodings, codec, kinds, codes = context
    values: dict[int, Any] = {}
    pending = False
    limit = len(buf) if end is None else end
    while pos < limit:
        if implicit:
            group, element, length = IMPLICIT(buf, pos)
            tag = group << 16 | element
            kind = kinds.get(tag) or _implicit_kind(kinds, tag)
            vr_bytes = b""
            start = pos + 8
        else:
            group, element, vr_bytes, length = EXPLICIT(buf, pos)
            tag = group << 16 | element
            kind = kinds.get(vr_bytes, 0)  # 0: no VR (a delimiter) or an unknown one
            start = pos + 8
            if kind > _LONG:
                length = LENGTH32(buf, start)[0]
                start += 4
                kind -= _LONG
        if group == 0xFFFE or not kind:  # a delimiter has no VR and a 32-bit length
            if tag == ITEM_END and end is None:
                return RawItem(values, buf, encodings, implicit, pending), pos + 8
            raise Unsupported("delimiter out of place, or an unknown VR")
        if kind < _SEQUENCE:  # single-valued text, as decode_text decodes it
            # (an undefined length overruns the item: the checks after the loop raise)
            pos = start + length
            raw = buf[start:pos]
            if kind == _STRING:
                text = raw.decode("latin-1").rstrip(" \x00")  # _DEFAULT_CODEC
                if raw and "\\" not in text and "\x1b" not in text:
                    values[tag] = text
                else:  # empty, several values or ISO 2022 escapes: pydicom's
                    values[tag] = _undecoded(_Undecoded, (_name(tag, implicit, vr_bytes),
                                                          start, pos))
                    pending = True
                if tag == SPECIFIC_CHARACTER_SET:
                    # an item may declare its own character set (PS3.5 §6.1.2.5.3) for
                    # all its text; it comes first, else what was decoded before it
                    # would be wrong
                    if len(values) > 1:
                        raise Unsupported("Specific Character Set after other elements")
                    encodings = _item_encodings(raw, encodings)
                    context = _context(implicit, encodings)
                    codec, codes = context[2], context[4]
                continue
            elif raw and codec is not None and kind != _OTHER and b"\x1b" not in raw:
                try:
                    text = raw.decode(codec)
                except UnicodeError:  # pydicom warns and replaces: its to do
                    pass
                else:
                    if kind == _SINGLE or "\\" not in text:
                        values[tag] = text.rstrip("\x00 ")
                        continue
            elif kind == _OTHER:
                text = decode_text(_name(tag, implicit, vr_bytes), raw, encodings)
                if text is not None:
                    values[tag] = text
                    continue
            values[tag] = _undecoded(_Undecoded, (_name(tag, implicit, vr_bytes), start,
                                                  pos))
            pending = True
            continue
        if kind == _SEQUENCE:
            if length == UNDEFINED:
                values[tag], pos = _items(buf, start, None, context)
                continue
            pos = start + length
            key = buf[start:pos]
            children = codes.get(key)  # a sequence of coded entries read before
            if children is None:
                children, _ = _items(buf, start, pos, context)
                if length <= _CODE_ITEM_MAX and all(
                        item._buf == b"" for item in children):  # coded entries
                    _keep(codes, key, children)
            values[tag] = children
            continue
        # anything else is pydicom's to convert (numbers, bytes, several values, ...)
        if length == UNDEFINED:
            raise Unsupported("undefined-length value that is not a sequence")
        vr = _name(tag, implicit, vr_bytes)
        if vr == "UN" and not implicit and implicit_vr(tag) != "UN":
            raise Unsupported("UN element whose real VR pydicom knows")
        pos = start + length
        values[tag] = _undecoded(_Undecoded, (vr, start, pos))
        pending = True
    if end is None:
        raise Incomplete("undefined-length item without its delimiter")
    if pos != limit:
        raise Unsupported("element overruns its item")
    return RawItem(values, buf, encodings, implicit, pending), pos


def _name(tag: int, implicit: bool, vr_bytes: bytes) -> str:
    """The VR of an element (off the hot path: for pydicom's conversion)."""
    return implicit_vr(tag) if implicit else VR_NAMES[vr_bytes]


# What the parse does with each element: _STRING decodes in the default repertoire,
# _TEXT (one value) / _SINGLE in the item's character set, _OTHER (AE, UR) through
# decode_text; a _SEQUENCE is read into items; _CONVERT is left to pydicom.
_STRING, _TEXT, _SINGLE, _OTHER, _SEQUENCE, _CONVERT = 1, 2, 3, 4, 5, 6
_LONG = 8  # added in explicit VR: two reserved bytes and a 32-bit length follow the VR


def _kinds(datetimes: bool) -> dict[str, int]:
    """Kind by VR name; ``datetimes``: pydicom.config.datetime_conversion (DA, DT and TM
    become pydicom's date/time objects)."""
    kinds = dict.fromkeys(VR_NAMES.values(), _CONVERT)
    kinds.update(dict.fromkeys(["AS", "CS", "UI", "DA", "DT", "TM"], _STRING))
    kinds.update(dict.fromkeys(["LO", "SH", "UC", "PN"], _TEXT))
    kinds.update(dict.fromkeys(["LT", "ST", "UT"], _SINGLE))
    kinds.update(dict.fromkeys(["AE", "UR"], _OTHER))
    kinds["SQ"] = _SEQUENCE
    if datetimes:
        kinds.update(dict.fromkeys(["DA", "DT", "TM"], _CONVERT))
    return kinds


_KINDS = (_kinds(False), _kinds(True))
# explicit VR: kind by the VR's two bytes, + _LONG for a 32-bit length
_EXPLICIT_KINDS = tuple({raw: kinds[vr] + (_LONG if vr in LONG_VRS else 0)
                         for raw, vr in VR_NAMES.items()} for kinds in _KINDS)
# implicit VR: kind by tag, filled in as tags are met (the VR is the dictionary's)
_IMPLICIT_KINDS: tuple[dict[int, int], dict[int, int]] = ({}, {})


def _implicit_kind(kinds: dict[int, int], tag: int) -> int:
    vr = implicit_vr(tag)
    kind = kinds[tag] = _KINDS[kinds is _IMPLICIT_KINDS[1]].get(vr, 0) if vr else 0
    return kind


def _text_codec(encodings: Encodings) -> str | None:
    """:func:`_codec`, or None when Python has no such codec (pydicom decides then)."""
    try:
        return _codec(encodings)
    except LookupError:
        return None


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
    return decode_text(element.VR or implicit_vr(int(element.tag)), raw, encodings)


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
assert _DEFAULT_CODEC == "latin-1"  # what the parse decodes the default repertoire with
