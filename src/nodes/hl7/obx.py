"""SR content items → OBX segments, rendered to ER7 as the content tree is walked. Pure.

The hot path of SR → ORU: a report is mostly its content items, one OBX each. Walking the
tree into :class:`~nodes.hl7.sr.ContentItem` s, building each OBX's field values and
rendering those in :meth:`Segment.to_er7 <nodes.hl7.model.Segment.to_er7>` did the same
work three times over (every field looked at again to find out whether it needs escaping,
though most are set IDs, paths, statuses and codes already rendered). Here each item's
elements are read once, from one mapping of tag → value (:func:`_plain`), and its OBX is
written as text straight away, with the fields whose form is known (set ID, value type,
sub-ID, status) not looked at again. The segments come back pre-rendered
(:meth:`Segment.from_er7 <nodes.hl7.model.Segment.from_er7>`): a handler that reads or
changes one gets the same fields as ever, parsed from that text on first use.

The mapping (docs/hl7.md, "SR content items"): OBX-1 set ID, OBX-2 the HL7 type (only with
a value), OBX-3 the concept name (``VT^VT content item^99DCMSR`` without one), OBX-4 the
item's position (``2.1``: the content item identifier without the root's ``1``), OBX-5 the
value, OBX-6 units (NUM), OBX-11 the result status, OBX-14 the Observation DateTime.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset

from . import fields as f
from .fields import Code, code_of, tags
from .model import Segment, _components, _leaf, field_er7, text_lines
from ..dicom._pydicom import value_dict
from ..dicom.items import RawItem

PERSON_OBSERVER_NAME = "121008"  # TID 1002: the observer context of the document

(_VALUE_TYPE, _CONCEPT, _CHILDREN, _OBSERVED, _TEXT, _CODE, _MEASURED, _NUMBER, _FLOAT,
 _UNITS, _DATE, _TIME, _DATETIME, _NAME, _UID, _REFERENCED, _REFERENCED_UID, _GRAPHIC_TYPE,
 _RANGE_TYPE, _GRAPHIC_DATA) = tags(
    "ValueType", "ConceptNameCodeSequence", "ContentSequence", "ObservationDateTime",
    "TextValue", "ConceptCodeSequence", "MeasuredValueSequence", "NumericValue",
    "FloatingPointValue", "MeasurementUnitsCodeSequence", "Date", "Time", "DateTime",
    "PersonName", "UID", "ReferencedSOPSequence", "ReferencedSOPInstanceUID",
    "GraphicType", "TemporalRangeType", "GraphicData")


class _Elements:
    """``get(tag)`` on a Dataset that still holds raw elements (read from a file, converted
    by pydicom as a sequence item): what :func:`fields.get` and :func:`fields.items` give,
    element by element."""

    __slots__ = ("item",)

    def __init__(self, item: Dataset) -> None:
        self.item = item

    def get(self, tag: int, default: Any = None) -> Any:
        item = self.item
        keyword = keyword_for_tag(tag)
        if dictionary_VR(tag) == "SQ":
            return f.items(item, keyword) or default
        return f.get(item, keyword, default)


def _plain(item: Dataset | RawItem) -> Any:
    """The item's values by tag, as something with ``get(tag)``: a RawItem's own dict when
    every value in it is final, else the RawItem itself (it converts what it is asked
    for); a dict of a Dataset's values when it was built in memory, else an
    :class:`_Elements` that converts what it is asked for."""
    if type(item) is RawItem:
        return item if item._pending else item._values
    try:
        return value_dict(item)
    except AttributeError:  # a RawDataElement, read from a file and not converted yet
        return _Elements(item)


def _item(values: Any, tag: int) -> Dataset | RawItem | None:
    """The first item of sequence ``tag``, or None."""
    sequence = values.get(tag)
    if sequence is None:
        return None
    try:  # [0] alone: a pydicom Sequence's len() would be one more Python call
        return sequence[0]
    except IndexError:
        return None


def _first(values: Any, tag: int) -> Any:
    """The first item of sequence ``tag`` as its values (:func:`_plain`), or None."""
    item = _item(values, tag)
    return _plain(item) if item is not None else None


# Rendered CE fields by Code: a report names the same few dozen concepts over and over.
# The key is the Code (its three texts), so an entry is exactly what rendering it gives.
# Emptied at 4096 entries.
_CE: dict[Code, str] = {}


def ce_er7(code: Code) -> str:
    """A coded entry as an ER7 CE field: identifier ^ text ^ coding system."""
    text = _CE.get(code)
    if text is None:
        if len(_CE) >= 4096:
            _CE.clear()
        text = _CE[code] = _components((code.value, code.meaning, code.scheme))
    return text


def _code(values: Any, tag: int) -> Code | None:
    """The code of the first item of code sequence ``tag``, or None."""
    item = _item(values, tag)
    if item is None:
        return None
    if type(item) is RawItem:
        code = item._code  # read before: coded entries are shared (see nodes.dicom.items)
        if code is not None:
            return code
    return code_of(item)


# -- values, by value type: (OBX-2, OBX-5 as ER7 or None for no value) ---------------------


def _text(values: Any) -> str | None:
    text = values.get(_TEXT)
    if not text:
        return None
    text = str(text)
    if "\n" not in text and "\r" not in text:  # one line: text_lines, without its Rep
        return _leaf(text.rstrip())
    return field_er7(text_lines(text))  # one repetition per line (HL7 v2.5.1 §2.A.79)


def _coded(values: Any) -> str | None:
    code = _code(values, _CODE)
    return ce_er7(code) if code is not None else None


def _date(values: Any) -> str | None:
    return _leaf(f.da(values.get(_DATE))) or None


def _time(values: Any) -> str | None:
    return _leaf(f.tm(values.get(_TIME))) or None


def _datetime(values: Any) -> str | None:
    return _leaf(f.dt(values.get(_DATETIME))) or None


def _person(values: Any) -> str | None:
    name = f.xpn(values.get(_NAME))
    return field_er7(name) if name is not None else None


def _uid(values: Any) -> str | None:
    return _leaf(str(values.get(_UID) or "")) or None


def _reference(values: Any) -> str | None:
    reference = _first(values, _REFERENCED)
    if reference is None:
        return None
    return _leaf(str(reference.get(_REFERENCED_UID) or "")) or None


def _coordinates(values: Any) -> str | None:
    kind = str(values.get(_GRAPHIC_TYPE) or values.get(_RANGE_TYPE) or "")
    data = values.get(_GRAPHIC_DATA)
    if data is None:
        data = ()
    elif isinstance(data, (int, float)):  # one value: pydicom gives it bare
        data = (data,)
    return _leaf(" ".join([kind, *(str(v) for v in data)]).strip()) or None


def _none(values: Any) -> None:
    return None


_VALUES: dict[str, tuple[str, Callable[[Any], str | None]]] = {
    "TEXT": ("TX", _text),
    "CODE": ("CE", _coded),
    "DATE": ("DT", _date),
    "TIME": ("TM", _time),
    "DATETIME": ("DTM", _datetime),
    "PNAME": ("XPN", _person),
    "UIDREF": ("ST", _uid),
    "IMAGE": ("ST", _reference),
    "COMPOSITE": ("ST", _reference),
    "WAVEFORM": ("ST", _reference),
    "SCOORD": ("ST", _coordinates),
    "SCOORD3D": ("ST", _coordinates),
    "TCOORD": ("ST", _coordinates),
    "CONTAINER": ("", _none),
}
_UNKNOWN = ("ST", _none)


def _measurement(values: Any) -> tuple[str | None, str]:
    """(OBX-5, OBX-6) of a NUM item: the number as NM and its units as CE."""
    measured = _first(values, _MEASURED)
    if measured is None:
        return None, ""
    # from the bytes, the number's text without pydicom's DS conversion, when it is one
    number = measured.number_text(_NUMBER) if type(measured) is RawItem else None
    if number is None:
        value = measured.get(_NUMBER)
        number = "" if value is None else str(value).strip()
        if not number:  # no Numeric Value: the Floating Point Value, if any
            number = str(measured.get(_FLOAT, "")).strip()
    units = _code(measured, _UNITS)
    return (_leaf(f.numeric(number)) if number else None,
            ce_er7(units) if units is not None else "")


class Observer:
    """The root's first Person Observer Name item (TID 1002), for OBR-32 when the document
    names no verifying or author observer: ``found`` and its Person Name value."""

    __slots__ = ("found", "name")

    def __init__(self) -> None:
        self.found = False
        self.name: Any = None


def content_obxs(ds: Dataset, status: str, *, max_depth: int = 64
                 ) -> tuple[list[Segment], Observer]:
    """One OBX per content item under ``ds`` (the document root), depth first, in order,
    set IDs from 1; and the root's Person Observer Name (see :class:`Observer`).
    ``status`` is OBX-11 (HL7 table 0085: P, F, C…).

    Items that are only a reference to another item (no Value Type) take their position
    but make no OBX. A tree deeper than ``max_depth`` raises ValueError (a malformed or
    hostile object, not a report)."""
    texts: list[str] = []  # the OBXs' ER7, made Segments in one call at the end
    observer = Observer()
    status = _leaf(status)  # written into every OBX as it is
    root = f.items(ds, "ContentSequence")
    levels = [iter(enumerate(root[:], start=1))]  # a slice: a plain list, not a Sequence
    prefixes = [""]
    n = 0
    while levels:
        # a for loop per level (not next() and StopIteration per item): once per item
        for position, item in levels[-1]:
            values = _plain(item)
            path = f"{prefixes[-1]}{position}"
            value_type = values.get(_VALUE_TYPE)
            if value_type:
                value_type = str(value_type)
                # _code(values, _CONCEPT) and ce_er7, inline: the two calls cost more than
                # the lookups they make
                concept = values.get(_CONCEPT)
                if concept is not None:
                    try:  # [0] alone: a pydicom Sequence's len() is one more Python call
                        concept = code_of(concept[0])
                    except IndexError:  # an empty Concept Name Code Sequence
                        concept = None
                if concept is None:
                    concept_er7 = ce_er7(Code(value_type, "99DCMSR",
                                              f"{value_type} content item"))
                else:
                    concept_er7 = _CE.get(concept) or ce_er7(concept)
                units = ""
                if value_type == "NUM":
                    hl7_type = "NM"
                    value, units = _measurement(values)
                else:
                    hl7_type, read = _VALUES.get(value_type, _UNKNOWN)
                    value = read(values)
                    if (value_type == "PNAME" and "." not in path and not observer.found
                            and concept is not None
                            and concept.value == PERSON_OBSERVER_NAME):
                        observer.found = True
                        observer.name = values.get(_NAME)
                observed = values.get(_OBSERVED)
                n += 1
                if value is None:
                    text = f"OBX|{n}||{concept_er7}|{path}||{units}|||||{status}"
                else:
                    text = f"OBX|{n}|{hl7_type}|{concept_er7}|{path}|{value}|{units}|||||{status}"
                if observed:
                    text = f"{text}|||{_leaf(f.dt(observed))}"
                texts.append(text.rstrip("|"))
            children = values.get(_CHILDREN)
            if children:
                if len(levels) >= max_depth:
                    raise ValueError(f"SR content tree deeper than {max_depth} levels")
                levels.append(iter(enumerate(children[:], start=1)))
                prefixes.append(path + ".")
                break
        else:
            levels.pop()
            prefixes.pop()
    return Segment.all_from_er7(texts), observer
