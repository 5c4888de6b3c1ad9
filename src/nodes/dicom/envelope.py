"""The routing envelope of a received data set, read from its element headers.

The listener needs five elements of every object it receives (the routing-safe
:class:`~nodes.arrival.Envelope`), all before (0020,000F). :func:`scan_envelope` (pure)
walks the top-level element headers up to there (:func:`~nodes.dicom.elements.walk`)
instead of building pydicom elements, whose UID validation and objects cost ~0.5 ms of CPU
per object in the receive path, where every millisecond is taken from pynetdicom's threads.
:func:`read_envelope` scans what it can and leaves the rest to pydicom.
"""

from __future__ import annotations

from typing import BinaryIO

from pydicom import dcmread

from .elements import Unscannable, walk

ENVELOPE_KEYWORDS = {
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x00080060: "Modality",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
}
_LAST_ENVELOPE_TAG = 0x0020000E


def scan_envelope(data: bytes, implicit: bool) -> dict[str, str]:
    """The envelope elements (:data:`ENVELOPE_KEYWORDS`) of a little endian data set, by
    keyword; an absent element is left out.

    Values are returned as pydicom gives them as ``str`` (trailing NUL and spaces removed).
    Raises :class:`~nodes.dicom.elements.Unscannable` for anything out of the ordinary
    (a layout the walk does not know, a non-ASCII or multi-valued envelope value) and its
    :class:`~nodes.dicom.elements.CutShort` for a data set that ends inside an element before
    (0020,000F).
    """
    values: dict[int, bytes | None] = dict.fromkeys(ENVELOPE_KEYWORDS)
    walk(data, implicit, stop=_LAST_ENVELOPE_TAG, values=values)
    return {ENVELOPE_KEYWORDS[tag]: _text_value(raw) for tag, raw in values.items()
            if raw is not None}


def read_envelope(data: bytes | None, implicit: bool | None,
                  part10: str | BinaryIO) -> dict[str, str]:
    """The envelope's elements by keyword (an absent one as ""); never reads as far as Pixel
    Data. Blocking.

    ``data``: the data set in memory (None when it is not), ``implicit``: its VR encoding
    when it is little endian as received (None for deflate, big endian); ``part10``: the
    same object as a Part 10 file (a path, or a stream at byte 0). A little endian data set
    in memory is scanned (:func:`scan_envelope`); anything else, or one the scan leaves
    alone, is read by pydicom from ``part10``, which raises what it finds wrong.
    """
    if data is not None and implicit is not None:
        try:
            return scan_envelope(data, implicit)
        except Unscannable:
            pass  # pydicom reads it, or says what is wrong with it
    ds = dcmread(part10, stop_before_pixels=True, specific_tags=_KEYWORDS)
    return {keyword: str(ds.get(keyword, "")) for keyword in _KEYWORDS}


_KEYWORDS = list(ENVELOPE_KEYWORDS.values())


def _text_value(raw: bytes) -> str:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise Unscannable("non-ASCII value in an envelope element") from None
    if "\\" in text:
        raise Unscannable("multi-valued envelope element")
    return text.rstrip("\x00 ")
