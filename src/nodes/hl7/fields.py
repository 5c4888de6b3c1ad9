"""DICOM values → HL7 v2.5.1 field values: names, codes, identifiers, dates, character sets.

Pure functions over pydicom values; the results are :mod:`nodes.hl7.model` field values.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

from .model import FieldValue, Rep, Sub
from ..dicom._pydicom import (character_set, code_values, element_dict, value as element_value,
                              values_of)
from ..dicom.header import stashed_items
from ..dicom.items import RawItem, raw_text, sequence_items


class _LookupTag(BaseTag):
    """A tag to look elements up with, compared at C speed.

    A Dataset's element dict (:func:`~nodes.dicom._pydicom.element_dict`) is keyed by
    BaseTag, whose ``__eq__`` is Python code, and a dict lookup calls it on every hit. Python tries a right-hand operand's comparison first when its
    type is a subclass of the left one's, so a BaseTag subclass comparing with ``int.__eq__``
    makes each lookup ~5× cheaper. All six comparisons are int's: with only ``__eq__``
    replaced, the type's comparison slot stays the generic one that finds ``__eq__`` and
    calls it through a wrapper (argument tuple and all); with all six, CPython installs
    int's C comparison itself in the slot, and a lookup costs ~2.5× less again. Only ever
    a lookup key: never stored in a dataset.
    """

    __slots__ = ()
    __eq__ = int.__eq__
    __ne__ = int.__ne__
    __lt__ = int.__lt__
    __le__ = int.__le__
    __gt__ = int.__gt__
    __ge__ = int.__ge__
    __hash__ = int.__hash__


_TAGS: dict[str, _LookupTag] = {}


def _tag(keyword: str) -> _LookupTag:
    tag = _TAGS.get(keyword)
    if tag is None:
        number = tag_for_keyword(keyword)
        if number is None:
            raise ValueError(f"{keyword!r} is not a DICOM keyword")
        tag = _TAGS[keyword] = _LookupTag(number)
    return tag


def get(ds: Dataset | RawItem | None, keyword: str, default: Any = None) -> Any:
    """``ds.get(keyword, default)``, about ten times faster; ``ds`` may also be a
    :class:`~nodes.dicom.items.RawItem` from :func:`items`.

    An SR report → ORU mapping reads several hundred elements; ``Dataset.get`` spends ~5 µs
    on each resolving the keyword through ``__getattr__``. This looks the element up in the
    dataset's element dict by tag (:func:`~nodes.dicom._pydicom.element_dict`, the mapping
    pydicom itself keeps).
    An element read from a file and not converted yet (a RawDataElement) that holds one
    text value is decoded as pydicom would, without converting it in ``ds`` (a plain
    ``str`` where pydicom gives a ``PersonName`` or ``UID``: same text); pydicom converts
    every other one, as ``Dataset.get`` does.
    """
    if ds is None:
        return default
    tag = _TAGS.get(keyword) or _tag(keyword)
    # type(), not .__class__: every attribute read of a Dataset goes through the
    # __getattr__ hook pydicom defines (~35 ns more each, hundreds per report)
    if type(ds) is RawItem:
        return ds.value(tag, default)
    elem = element_dict(ds).get(tag)
    if elem is None:
        return default
    if elem.__class__ is RawDataElement:
        text = raw_text(elem, ds.original_character_set or character_set(ds))
        if text is not None:
            return text
        elem = ds[int(tag)]
    return element_value(elem)  # what DataElement.value returns, without its call


def tags(*keywords: str) -> tuple[_LookupTag, ...]:
    """The tags of ``keywords``, for :func:`values`."""
    return tuple(_TAGS.get(k) or _tag(k) for k in keywords)


def values(ds: Dataset | RawItem, keys: tuple[_LookupTag, ...]) -> list[Any]:
    """The values of the :func:`tags` ``keys`` in one call, each as :func:`get` gives it,
    or as :func:`items` gives it for a sequence: the reads done for every content item of a
    report, where a call per element costs more than the lookup itself."""
    if type(ds) is RawItem:
        if not ds._pending:  # all decoded: one map, no Python loop
            return list(map(ds._values.get, keys))
        return [ds.value(tag) for tag in keys]
    return values_of(ds, keys, _unconverted)


def _unconverted(ds: Dataset, tag: _LookupTag, elem: RawDataElement) -> Any:
    """What :func:`values` gives for an element pydicom has not converted yet."""
    keyword = keyword_for_tag(tag)
    is_sequence = (elem.VR or dictionary_VR(tag)) == "SQ"
    return items(ds, keyword) if is_sequence else get(ds, keyword)


def items(ds: Dataset | RawItem | None, keyword: str) -> Sequence[Dataset | RawItem]:
    """The items of sequence ``keyword`` (empty when absent), to read with :func:`get`.

    A sequence pydicom has not converted yet (a Part 10 object's, until first accessed) is
    read from its bytes into :class:`~nodes.dicom.items.RawItem` s, leaving ``ds``
    untouched: 20× cheaper than pydicom's conversion (see :mod:`nodes.dicom.items`).
    Encodings that reader leaves alone are converted by pydicom as :func:`get` does.
    """
    if ds is None:
        return ()
    tag = _TAGS.get(keyword) or _tag(keyword)
    if type(ds) is RawItem:
        return ds.value(tag) or ()
    elem = element_dict(ds).get(tag)
    if elem is None:
        return ()
    if elem.__class__ is RawDataElement:
        encodings = ds.original_character_set or character_set(ds)
        parsed = None
        if elem.length == 0xFFFFFFFF:  # read with the header (nodes.dicom.header)
            parsed = stashed_items(ds, tag, elem, encodings)
        if parsed is None:
            parsed = sequence_items(elem, encodings)
        if parsed is not None:
            return parsed
        elem = ds[int(tag)]
    found = element_value(elem)  # what DataElement.value returns, without its call
    return found if found is not None else ()


class Code(NamedTuple):
    """A DICOM coded entry (PS3.3 §8.8): value, scheme designator, meaning."""

    value: str
    scheme: str
    meaning: str

    def ce(self) -> tuple[str, str, str]:
        """HL7 CE: identifier ^ text ^ name of coding system (the DICOM designator as is:
        DCM, LN, SCT, SRT, UCUM are the names HL7 table 0396 uses too)."""
        return (self.value, self.meaning, self.scheme)


_CODE_TAGS = tags("CodeValue", "CodingSchemeDesignator", "CodeMeaning")
_CODE_VALUE, _SCHEME, _MEANING = _CODE_TAGS


def code_of(item: Dataset | RawItem | None) -> Code | None:
    """The :class:`Code` of a code sequence item (Code Value, Long or URN Code Value).

    The same :class:`Code` object for the same three texts: a report names the same few
    dozen concepts over and over (every content item has one) and a NamedTuple is slow to
    build; looking the texts up is three times cheaper. The key is the whole value, so a
    report only ever gets back what it gave; the table is emptied when it reaches 4096 codes
    (a site's vocabulary fits, a flood of distinct codes does not grow it).
    """
    if item is None:
        return None
    if type(item) is RawItem:
        code = item._code  # a coded entry read before (shared: see nodes.dicom.items)
        if code is not None:
            return code
        value, scheme, meaning = values(item, _CODE_TAGS)
    else:
        # a Dataset: its three elements straight from its element dict, as values()
        # would read them (a missing or not yet converted element: values() itself)
        found = code_values(item, _CODE_VALUE, _SCHEME, _MEANING)
        value, scheme, meaning = found if found is not None else values(item, _CODE_TAGS)
    code = None
    if value:
        # The texts as read are the key when they are plain text, as they almost always
        # are: a hit is then the Code of exactly these texts (a None or a non-text value
        # equals no key, and misses; several values, a MultiValue, cannot even be hashed).
        try:
            code = _CODES.get((value, scheme, meaning))
        except TypeError:
            pass
    if code is None:
        code = _new_code(item, value, scheme, meaning)
    if type(item) is RawItem:
        item._code = code  # the same for any read of these bytes
    return code


def _new_code(item: Dataset | RawItem, value: Any, scheme: Any, meaning: Any) -> Code:
    value = value or get(item, "LongCodeValue") or get(item, "URNCodeValue") or ""
    key = (str(value), str(scheme or ""), str(meaning or ""))
    code = _CODES.get(key)
    if code is None:
        if len(_CODES) >= 4096:
            _CODES.clear()
        code = _CODES[key] = Code(*key)
    return code


_CODES: dict[tuple[str, str, str], Code] = {}


def first(ds: Dataset | RawItem | None, keyword: str) -> Dataset | RawItem | None:
    """The first item of sequence ``keyword`` in ``ds``, or None."""
    seq = items(ds, keyword)
    try:  # [0] alone: a pydicom Sequence's len() would be one more Python call
        return seq[0]
    except IndexError:
        return None


# -- names ------------------------------------------------------------------------------------

_REPRESENTATION = ("A", "I", "P")  # HL7 table 4000: alphabetic, ideographic, phonetic


def _groups(pn: Any) -> list[str]:
    """The three component groups of a DICOM PN value, decoded (alphabetic, ideographic,
    phonetic); missing groups are ""."""
    if pn is None:
        return ["", "", ""]
    components = getattr(pn, "components", None)
    groups = list(components) if components is not None else str(pn).split("=")
    groups = [str(g) for g in groups[:3]]
    return groups + [""] * (3 - len(groups))


def _parts(group: str) -> list[str]:
    parts = [p.strip() for p in group.split("^")[:5]]
    return parts + [""] * (5 - len(parts))


def xpn(pn: Any) -> FieldValue:
    """DICOM PN → HL7 XPN.

    DICOM orders a group family^given^middle^prefix^suffix; XPN orders
    family^given^middle^suffix^prefix, so the last two swap. A name with only an alphabetic
    group is one XPN; otherwise each non-empty group is one repetition with XPN-8 (name
    representation code) A, I or P, as JAHIS/IHE-J do for Japanese names.
    """
    groups = _groups(pn)
    present = [(i, g) for i, g in enumerate(groups) if g.replace("^", "").strip()]
    if not present:
        return None
    if len(present) == 1 and present[0][0] == 0:
        family, given, middle, prefix, suffix = _parts(present[0][1])
        return (family, given, middle, suffix, prefix)
    reps = []
    for index, group in present:
        family, given, middle, prefix, suffix = _parts(group)
        reps.append((family, given, middle, suffix, prefix, None, None, _REPRESENTATION[index]))
    return Rep(reps)


def xcn_parts(pn: Any, identifier: str = "") -> tuple[str, ...]:
    """ID, family, given, middle, suffix, prefix of one person (the CNN/XCN order), from the
    alphabetic group or, without one, the ideographic group."""
    groups = _groups(pn)
    group = next((g for g in groups if g.replace("^", "").strip()), "")
    family, given, middle, prefix, suffix = _parts(group)
    return (identifier, family, given, middle, suffix, prefix)


def ndl(pn: Any, identifier: str = "") -> FieldValue:
    """HL7 NDL (OBR-32 principal result interpreter): its first component is a CNN, whose
    parts are subcomponents."""
    parts = xcn_parts(pn, identifier)
    if not any(parts):
        return None
    return (Sub(parts),)


# -- identifiers --------------------------------------------------------------------------------


def hd_sub(namespace: str = "", universal_id: str = "", universal_type: str = "") -> Sub | str:
    """An HD inside a component (CX-4): namespace&universal id&type."""
    if not universal_id and not universal_type:
        return namespace
    return Sub((namespace, universal_id, universal_type))


def cx(identifier: str, issuer: str = "", universal_id: str = "", universal_type: str = "",
       type_code: str = "") -> tuple:
    """HL7 CX: ID ^^^ assigning authority (HD) ^ identifier type code."""
    return (identifier, None, None, hd_sub(issuer, universal_id, universal_type),
            type_code or None)


def patient_identifiers(ds: Dataset) -> FieldValue:
    """PID-3 from Patient ID with its issuer, plus Other Patient IDs Sequence items."""
    reps: list[tuple] = []

    def add(item: Dataset) -> None:
        pid = str(get(item, "PatientID", "") or "").strip()
        if not pid:
            return
        quals = first(item, "IssuerOfPatientIDQualifiersSequence")
        universal = str(get(quals, "UniversalEntityID", "") or "") if quals is not None else ""
        utype = str(get(quals, "UniversalEntityIDType", "") or "") if quals is not None else ""
        type_code = str(get(quals, "IdentifierTypeCode", "") or "") if quals is not None else ""
        reps.append(cx(pid, str(get(item, "IssuerOfPatientID", "") or ""), universal, utype,
                       type_code))

    add(ds)
    for other in items(ds, "OtherPatientIDsSequence"):
        add(other)
    if not reps:
        return None
    return reps[0] if len(reps) == 1 else Rep(reps)


def sex(value: Any) -> str | None:
    """DICOM Patient's Sex → HL7 table 0001 (M, F, O; anything else U)."""
    text = str(value or "").strip().upper()
    if not text:
        return None
    return text if text in ("M", "F", "O") else "U"


# -- dates and times ---------------------------------------------------------------------------


def _tm(value: Any) -> str:
    text = str(value or "").strip().replace(":", "")
    if "." in text:
        whole, frac = text.split(".", 1)
        frac = frac[:4].rstrip("0")  # HL7 DTM/TM carry at most 4 fractional digits
        text = f"{whole}.{frac}" if frac and len(whole) == 6 else whole
    return text


def tm(value: Any) -> str:
    """DICOM TM → HL7 TM (colons of old ACR-NEMA times dropped, fraction ≤ 4 digits)."""
    return _tm(value)


def da(value: Any) -> str:
    return str(value or "").strip().replace(".", "").replace("-", "")


def dtm(date: Any, time: Any = "", offset: Any = "") -> str:
    """DICOM DA (+ TM, + Timezone Offset From UTC) → HL7 DTM; "" without a date."""
    day = da(date)
    if not day:
        return ""
    moment = day + (_tm(time) if len(day) == 8 else "")
    zone = str(offset or "").strip()
    if zone and len(moment) >= 10:
        moment += zone
    return moment


def dt(value: Any) -> str:
    """DICOM DT (YYYYMMDDHHMMSS.FFFFFF&ZZXX) → HL7 DTM (same shape, fraction ≤ 4 digits)."""
    text = str(value or "").strip()
    zone = ""
    for sign in "+-":
        if sign in text[4:]:
            cut = text.index(sign, 4)
            text, zone = text[:cut], text[cut:]
            break
    if "." in text:
        whole, frac = text.split(".", 1)
        frac = frac[:4].rstrip("0")
        text = f"{whole}.{frac}" if frac else whole
    return text + zone


def numeric(value: Any) -> str:
    """A DICOM DS/FD number as HL7 NM: optional sign, digits, optional decimal point — no
    exponent (§2.A.47)."""
    text = str(value).strip()
    if "e" not in text.lower():
        return text
    from decimal import Decimal

    return format(Decimal(text), "f")


# -- character sets -----------------------------------------------------------------------------

# DICOM Specific Character Set (PS3.3 C.12.1.1.2) → HL7 table 0211 (MSH-18), for the
# single-byte sets HL7 names. Everything else that is not ASCII (ISO 2022 code extensions,
# GB18030, GBK) is written as UTF-8: pydicom has decoded it already, and UTF-8 holds it all.
_SINGLE_BYTE = {
    "ISO_IR 100": "8859/1", "ISO_IR 101": "8859/2", "ISO_IR 109": "8859/3",
    "ISO_IR 110": "8859/4", "ISO_IR 144": "8859/5", "ISO_IR 127": "8859/6",
    "ISO_IR 126": "8859/7", "ISO_IR 138": "8859/8", "ISO_IR 148": "8859/9",
    "ISO_IR 203": "8859/15",
}
UTF8 = "UNICODE UTF-8"


def charset_for(specific_character_set: Any) -> str:
    """MSH-18 for a DICOM Specific Character Set: "" (ASCII) for the default repertoire,
    8859/n for ISO_IR 100… single-byte sets, UNICODE UTF-8 for ISO_IR 192 and the rest."""
    if specific_character_set is None:
        return ""
    values: Iterable[Any] = (specific_character_set if isinstance(specific_character_set,
                             (list, tuple)) or hasattr(specific_character_set, "__iter__")
                             and not isinstance(specific_character_set, str)
                             else [specific_character_set])
    terms = [str(v).strip() for v in values]
    terms = [t for t in terms if t and t not in ("ISO_IR 6", "ISO 2022 IR 6")]
    if not terms:
        return ""
    if len(terms) == 1 and terms[0] in _SINGLE_BYTE:
        return _SINGLE_BYTE[terms[0]]
    return UTF8
