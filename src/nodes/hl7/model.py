"""A small typed HL7 v2 message model: build, escape, serialize to ER7, parse back. Pure.

A :class:`Message` is a list of :class:`Segment` s. A segment holds its fields by HL7
position (``pid[5]`` is PID-5). A field value is one of:

- ``None`` or ``""``: empty;
- ``str``: one component (text, escaped on output);
- ``tuple``: components, each a ``str``/``None`` or a :class:`Sub` of subcomponents;
- :class:`Rep`: repetitions, each one of the forms above.

So ``pid[5] = ("Doe", "John")`` is ``Doe^John``, ``pid[3] = ("42", None, None,
Sub(("HOSP", "1.2.3", "ISO")))`` is ``42^^^HOSP&1.2.3&ISO`` and ``obx[5] = Rep(("line 1",
"line 2"))`` is ``line 1~line 2``. Leaves are plain text: :func:`escape` is applied when the
message is serialized, never by the caller.

Escaping (HL7 v2.5.1 §2.7): the delimiters become ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\``. A carriage
return, line feed or any other control character inside a value becomes the hexadecimal
escape ``\\X0D\\`` / ``\\X0A\\`` / ``\\Xhh\\`` (§2.7.4) because CR ends a segment, 0x0B and
0x1C would end an MLLP frame, and ``\\.br\\`` is a formatting command that §2.7.6 allows in FT
fields only. Text meant to be shown as several lines (TX) is better sent as
repetitions, one per line (§2.A.79): that is what :func:`text_lines` is for.

Encoding: :meth:`Message.encode` encodes the ER7 text in the character set MSH-18 declares
(table 0211: ``8859/1`` → ISO-8859-1, ``UNICODE UTF-8`` → UTF-8, empty/``ASCII`` → ASCII,
...); ``Message.charset_fallback`` lets MSH-18 switch when the text does not fit.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Union

FIELD_SEP = "|"
ENCODING_CHARS = "^~\\&"  # component, repetition, escape, subcomponent (MSH-2)
_MSH_HEAD = "MSH" + FIELD_SEP + ENCODING_CHARS

# HL7 table 0211 (MSH-18) → Python codec. Empty means the default, 7-bit ASCII.
CHARSETS: dict[str, str] = {
    "": "ascii",
    "ASCII": "ascii",
    "8859/1": "latin-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "UNICODE UTF-8": "utf-8",
    "GB 18030-2000": "gb18030",
}


class Sub(tuple):
    """Subcomponents of one component: ``Sub(("HOSP", "1.2.3", "ISO"))`` → ``HOSP&1.2.3&ISO``."""

    __slots__ = ()


class Rep(tuple):
    """Repetitions of one field: ``Rep(("a", "b"))`` → ``a~b``."""

    __slots__ = ()


Leaf = Union[str, None]
Component = Union[Leaf, Sub]
Single = Union[Leaf, tuple]      # one repetition: text or a tuple of components
FieldValue = Union[Single, Rep]

_ESCAPES = str.maketrans({
    "\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "&": "\\T\\", "~": "\\R\\",
    # Control characters are not text in any HL7 data type (§2.A: "printable characters"),
    # CR ends a segment and 0x0B/0x1C would break MLLP framing: all go as hex (§2.7.4).
    # Every MSH-18 set we write is ASCII-compatible, so the byte is the code point.
    **{chr(c): f"\\X{c:02X}\\" for c in (*range(0x20), 0x7F)},
})


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _hex_escape(match: re.Match[str]) -> str:
    return f"\\X{ord(match.group()):02X}\\"


def escape(text: str) -> str:
    """``text`` with every delimiter and line break escaped (default encoding characters)."""
    # Same result as text.translate(_ESCAPES), ~5x faster: translate looks every character
    # up in a Python dict. The backslash goes first, as the escapes that follow add some.
    text = (text.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\")
            .replace("&", "\\T\\").replace("~", "\\R\\"))
    return _CONTROL.sub(_hex_escape, text) if _CONTROL.search(text) else text


_UNESCAPES = {"F": "|", "S": "^", "T": "&", "R": "~", "E": "\\"}


def unescape(text: str, codec: str = "latin-1") -> str:
    """Inverse of :func:`escape`; also understands ``\\.br\\`` (a line break, from FT),
    ``\\Xhh..\\`` (bytes in ``codec``) and drops the highlight marks ``\\H\\``/``\\N\\``.
    An unterminated or unknown escape is kept as it is."""
    if "\\" not in text:
        return text
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        start = text.find("\\", i)
        end = text.find("\\", start + 1) if start >= 0 else -1
        if end < 0:
            out.append(text[i:])
            break
        out.append(text[i:start])
        code = text[start + 1:end]
        if code in _UNESCAPES:
            out.append(_UNESCAPES[code])
        elif code == ".br":
            out.append("\n")
        elif code in ("H", "N"):
            pass
        elif code[:1] == "X" and len(code) % 2 == 1 and _is_hex(code[1:]):
            out.append(bytes.fromhex(code[1:]).decode(codec, "replace"))
        else:
            # Not an escape we know: keep the first backslash and look again from the
            # second, which may open a real escape sequence.
            out.append(text[start:end])
            i = end
            continue
        i = end + 1
    return "".join(out)


def _is_hex(s: str) -> bool:
    return bool(s) and all(ch in "0123456789abcdefABCDEF" for ch in s)


def text_lines(text: str) -> Rep:
    """Multi-line text as TX repetitions, one per line (HL7 v2.5.1 §2.A.79); trailing spaces
    of each line are dropped as §2.A.79 asks, leading spaces kept."""
    if "\n" not in text and "\r" not in text:
        return Rep((text.rstrip(),))
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    while len(lines) > 1 and not lines[-1].strip():
        lines.pop()
    return Rep(line.rstrip() for line in lines)


# -- serialization --------------------------------------------------------------------------


# Most leaves need no escaping; finding that out is cheaper than translating them. Most are
# letters and digits only (codes, set IDs, statuses): str.isalnum says so before the regex
# is even called (no delimiter or control character is alphanumeric).
_NEEDS_ESCAPE = re.compile(r"[\\|^&~\x00-\x1f\x7f]").search


def _leaf(text: str) -> str:
    return text if text.isalnum() or not _NEEDS_ESCAPE(text) else escape(text)


def _component(value: Component) -> str:
    if value is None:
        return ""
    if value.__class__ is str:
        return _leaf(value)
    if isinstance(value, Sub):
        return "&".join(["" if s is None else _leaf(s) for s in value]).rstrip("&")
    return _leaf(value)


def _single(value: Single) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return _leaf(value)
    return "^".join([_component(c) for c in value]).rstrip("^")


# Rendered components of plain-text tuples (codes: OBX-3, OBX-6, CE values), by their
# texts. A report names the same few dozen concepts in every OBX. Only tuples whose
# components are all ``str`` are kept: equal keys are then equal texts, so an entry is
# exactly what rendering the key gives and nothing of one message reaches another that does
# not hold the same texts. Emptied at 4096 entries (a flood of distinct codes).
_RENDERED: dict[tuple, str] = {}


def _components(value: tuple) -> str:
    """A tuple field's ER7 text, through :data:`_RENDERED`."""
    text = _RENDERED.get(value)
    if text is not None:
        return text
    try:
        # The common case, components that are all plain text none of which needs
        # escaping, found with one C-level join and one search instead of a call per
        # component.
        joined = "".join(value)
    except TypeError:  # a None or Sub component: the general path, not kept
        return _single(value)
    if joined.isalnum() or not _NEEDS_ESCAPE(joined):
        text = "^".join(value).rstrip("^")
    else:
        text = _single(value)
    if len(_RENDERED) >= 4096:
        _RENDERED.clear()
    _RENDERED[value] = text
    return text


def field_er7(value: FieldValue) -> str:
    """One field value as ER7 text (trailing empty components/subcomponents trimmed)."""
    if value is None:
        return ""
    cls = value.__class__
    if cls is str:
        return _leaf(value)
    if cls is tuple:
        return _components(value)
    if isinstance(value, Rep):
        return "~".join([_single(v) for v in value])
    return _single(value)


_NAMES: set[str] = set()  # names already checked (a few dozen in practice)


def _checked_name(name: str) -> str:
    if name not in _NAMES:
        if len(name) != 3 or not name.isalnum() or name != name.upper():
            raise ValueError(f"segment name {name!r} is not three upper-case letters/digits")
        if len(_NAMES) < 4096:
            _NAMES.add(name)
    return name


class Segment:
    """One segment: a name and fields by position (``seg[1]`` is the first field).

    For MSH, MSH-1 (field separator) and MSH-2 (encoding characters) are fixed and written
    by the serializer; set MSH-3 onward.

    A segment may also be made from its ER7 text (:meth:`from_er7`: what the SR mapping
    does for its OBXs, rendered as the content tree is walked). Its fields are then parsed
    from that text the first time they are read, and it renders from them again once they
    may have changed (a field set, or :attr:`fields` handed out).
    """

    __slots__ = ("name", "_fields", "_er7")

    def __init__(self, name: str, fields: dict[int, FieldValue] | None = None) -> None:
        self.name = _checked_name(name)
        self._er7: str | None = None
        self._fields: list[FieldValue] | None = []
        if fields:
            if min(fields) < (3 if name == "MSH" else 1):
                raise IndexError("HL7 field positions start at 1 (MSH-1 and MSH-2 are "
                                 "written by the serializer)")
            values: list[FieldValue] = [None] * max(fields)
            for position, value in fields.items():
                values[position - 1] = value
            self._fields = values

    @classmethod
    def from_fields(cls, name: str, fields: list[FieldValue]) -> Segment:
        """A segment whose fields are ``fields`` in order (``fields[0]`` is field 1; for
        MSH, MSH-1 and MSH-2 take their places and are ignored). The list is kept, not
        copied: the cheap way to build the hundreds of OBXs of a report."""
        seg = cls.__new__(cls)
        seg.name = name if name in _NAMES else _checked_name(name)
        seg._fields = fields
        seg._er7 = None
        return seg

    @classmethod
    def from_er7(cls, text: str) -> Segment:
        """A segment from its ER7 text (default encoding characters, no segment
        terminator), which :meth:`to_er7` gives back as it is until a field changes. The
        text is trusted to be one well-formed segment: this is for builders that render a
        segment themselves (a received message is read with :func:`parse`)."""
        return cls.all_from_er7((text,))[0]

    @classmethod
    def all_from_er7(cls, texts: Iterable[str]) -> list[Segment]:
        """:meth:`from_er7` of each of ``texts``, in one call: a report's hundreds of OBXs
        (a call per segment cost more than making it)."""
        out = []
        new = object.__new__
        for text in texts:
            seg = new(cls)
            name = text[:3]
            seg.name = name if name in _NAMES else _checked_name(name)
            seg._fields = None
            seg._er7 = text
            out.append(seg)
        return out

    @property
    def fields(self) -> list[FieldValue]:
        """The field values in order (``fields[0]`` is field 1; for MSH, the first two
        places stand for MSH-1 and MSH-2 and are not written). The list itself, to change
        in place: the segment renders from it from now on."""
        fields = self._fields
        if fields is None:
            fields = self._parse()
        self._er7 = None
        return fields

    @fields.setter
    def fields(self, values: list[FieldValue]) -> None:
        self._fields = values
        self._er7 = None

    def _parse(self) -> list[FieldValue]:
        """The fields of a segment made :meth:`from_er7`, parsed from its text (kept)."""
        assert self._er7 is not None
        parts = self._er7.split(FIELD_SEP)
        # MSH-1 is the separator after the name, MSH-2 the encoding characters: both
        # written by the serializer, their places kept empty
        texts = ["", "", *parts[2:]] if self.name == "MSH" else parts[1:]
        fields = self._fields = [parse_field(text) if text else None for text in texts]
        return fields

    def __setitem__(self, position: int, value: FieldValue) -> None:
        if position < 1:
            raise IndexError("HL7 field positions start at 1")
        if self.name == "MSH" and position <= 2:
            raise IndexError("MSH-1 and MSH-2 are written by the serializer")
        fields = self.fields  # parsed first if the segment was made from its text
        missing = position - len(fields)
        if missing > 0:
            fields.extend([None] * missing)
        fields[position - 1] = value

    def __getitem__(self, position: int) -> FieldValue:
        if position < 1:
            raise IndexError("HL7 field positions start at 1")
        if self.name == "MSH" and position == 1:
            return FIELD_SEP
        if self.name == "MSH" and position == 2:
            return ENCODING_CHARS
        fields = self._fields
        if fields is None:  # made from its text: parsed, and the text kept
            fields = self._parse()
        return fields[position - 1] if position <= len(fields) else None

    def get(self, position: int, component: int = 1, subcomponent: int = 1,
            repetition: int = 1) -> str:
        """The text at ``position.component.subcomponent`` of one repetition ("" if absent)."""
        value = self[position]
        if isinstance(value, Rep):
            value = value[repetition - 1] if repetition <= len(value) else None
        elif repetition != 1:
            return ""
        if isinstance(value, tuple):
            value = value[component - 1] if component <= len(value) else None
        elif component != 1:
            return ""
        if isinstance(value, Sub):
            value = value[subcomponent - 1] if subcomponent <= len(value) else None
        elif subcomponent != 1:
            return ""
        return value or ""

    def to_er7(self) -> str:
        if self._er7 is not None:
            return self._er7
        assert self._fields is not None
        if self.name == "MSH":
            head, fields = _MSH_HEAD, self._fields[2:]
        else:
            head, fields = self.name, self._fields
        if not fields:
            return head
        # A rendered field never ends in "|" (it is escaped), so rstrip trims exactly the
        # trailing empty fields.
        parts = [head]  # a loop, not a comprehension: cheaper for a dozen fields in 3.11
        for v in fields:
            if v is None:
                parts.append("")
            elif v.__class__ is str and (v.isalnum() or not _NEEDS_ESCAPE(v)):
                parts.append(v)
            elif v.__class__ is tuple:
                parts.append(_components(v))  # through _RENDERED: one lookup when kept
            else:
                parts.append(field_er7(v))
        return FIELD_SEP.join(parts).rstrip(FIELD_SEP)

    def __repr__(self) -> str:
        return f"<Segment {self.name}>"  # never the content: it may be PHI


class Message:
    """An HL7 v2 message: segments in order, MSH first.

    ``charset_fallback`` (a table 0211 name, e.g. ``UNICODE UTF-8``): when the text does not
    fit the character set MSH-18 declares, MSH-18 becomes the fallback instead of the
    message failing to encode. It is settled the first time the message is encoded or its
    :attr:`charset` is read, so the bytes always say truthfully what they are in.
    """

    __slots__ = ("segments", "charset_fallback")

    def __init__(self, segments: Iterable[Segment] = (), *,
                 charset_fallback: str | None = None) -> None:
        self.segments: list[Segment] = list(segments)
        self.charset_fallback = charset_fallback

    def add(self, segment: Segment) -> Segment:
        self.segments.append(segment)
        return segment

    def __iter__(self) -> Iterator[Segment]:
        return iter(self.segments)

    def __len__(self) -> int:
        return len(self.segments)

    def segment(self, name: str) -> Segment | None:
        """The first segment called ``name``, or None."""
        for seg in self.segments:
            if seg.name == name:
                return seg
        return None

    def all(self, name: str) -> list[Segment]:
        return [seg for seg in self.segments if seg.name == name]

    @property
    def msh(self) -> Segment:
        if not self.segments or self.segments[0].name != "MSH":
            raise ValueError("an HL7 message starts with MSH")
        return self.segments[0]

    @property
    def control_id(self) -> str:
        return self.msh.get(10)

    @property
    def charset(self) -> str:
        """MSH-18 (first repetition), "" when absent — after the fallback is applied if the
        text needs it (which renders the message once to find out)."""
        if self.charset_fallback is not None:
            self.encode()
        return self.msh.get(18)

    @property
    def codec(self) -> str:
        """The Python codec for :attr:`charset`; ValueError for a set we cannot write."""
        return _codec(self.charset)

    def to_er7(self) -> str:
        """ER7 text: segments each terminated by CR."""
        if not self.segments:
            return ""
        # a segment made from its text gives it without the call (most OBXs of a report)
        return "\r".join([seg._er7 or seg.to_er7() for seg in self.segments]) + "\r"

    def encode(self) -> bytes:
        """ER7 bytes in the character set MSH-18 declares. When the text does not fit it:
        MSH-18 becomes ``charset_fallback`` if there is one, else UnicodeEncodeError (the
        builder declared the wrong set)."""
        declared = self.msh.get(18)
        text = self.to_er7()
        try:
            return text.encode(_codec(declared))
        except UnicodeEncodeError:
            fallback = self.charset_fallback
            if fallback is None or fallback == declared:
                raise
        self.msh[18] = fallback
        return self.to_er7().encode(_codec(fallback))

    def __repr__(self) -> str:
        return f"<Message {' '.join(s.name for s in self.segments)}>"


def _codec(charset: str) -> str:
    try:
        return CHARSETS[charset]
    except KeyError:
        raise ValueError(f"unsupported MSH-18 character set {charset!r}") from None


# -- parsing ----------------------------------------------------------------------------------


def _parse_single(text: str, enc: str, codec: str) -> Single:
    comp_sep, rep_sep, esc, sub_sep = enc
    if comp_sep not in text and sub_sep not in text:
        return _unescape_with(text, enc, codec)
    comps: list[Component] = []
    for comp in text.split(comp_sep):
        if sub_sep in comp:
            comps.append(Sub(_unescape_with(s, enc, codec) for s in comp.split(sub_sep)))
        else:
            comps.append(_unescape_with(comp, enc, codec))
    return tuple(comps)


def _unescape_with(text: str, enc: str, codec: str) -> str:
    if enc != ENCODING_CHARS:
        # Rare: a sender with other encoding characters. Map them onto the defaults first.
        table = {ord(enc[2]): "\\", ord("\\"): enc[2]} if enc[2] != "\\" else {}
        text = text.translate(table)
    return unescape(text, codec)


def parse_field(text: str, enc: str = ENCODING_CHARS, codec: str = "latin-1") -> FieldValue:
    """One ER7 field back into the model's value forms (inverse of :func:`field_er7`)."""
    if enc[1] in text:
        return Rep(_parse_single(t, enc, codec) for t in text.split(enc[1]))
    return _parse_single(text, enc, codec)


def parse(text: str | bytes, codec: str | None = None) -> Message:
    """An ER7 message (CR, LF or CRLF between segments) into a :class:`Message`.

    Bytes are decoded with ``codec`` or, by default, the codec MSH-18 names (read from the
    raw bytes first). Raises ValueError when the text does not start with an MSH segment.
    """
    if isinstance(text, bytes):
        codec = codec or _sniff_codec(text)
        text = text.decode(codec, "replace")
    codec = codec or "latin-1"
    text = text.replace("\r\n", "\r").replace("\n", "\r")
    lines = [line for line in text.split("\r") if line]
    if not lines or not lines[0].startswith("MSH") or len(lines[0]) < 8:
        raise ValueError("not an HL7 v2 message (no MSH segment)")
    sep = lines[0][3]
    enc = lines[0][4:8]
    if sep != FIELD_SEP:
        lines = [line.replace(FIELD_SEP, "\\F\\").replace(sep, FIELD_SEP) for line in lines]
    message = Message()
    for line in lines:
        parts = line.split(FIELD_SEP)
        name = parts[0]
        try:
            seg = Segment(name)
        except ValueError:
            continue  # not a segment we can address; skip it rather than fail the whole ACK
        values = parts[2:] if name == "MSH" else parts[1:]
        first = 3 if name == "MSH" else 1
        for offset, raw in enumerate(values):
            if raw:
                seg[first + offset] = parse_field(raw, enc, codec)
        message.add(seg)
    return message


def _sniff_codec(data: bytes) -> str:
    first = data.split(b"\r", 1)[0].split(b"\n", 1)[0]
    if not first.startswith(b"MSH") or len(first) < 4:
        return "latin-1"
    fields = first.split(first[3:4])
    charset = fields[17].split(b"~")[0].decode("ascii", "replace") if len(fields) > 17 else ""
    return CHARSETS.get(charset, "latin-1")

