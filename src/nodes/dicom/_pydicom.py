"""The pydicom adapter: every reach past pydicom's public API (pydicom 3.0, pinned).

Nothing else in dicomflow names a private attribute of pydicom. What this reaches, and why:

=============================  ==========================================  =================
pydicom internal               used by                                     why
=============================  ==========================================  =================
``Dataset._dict``              :func:`element_dict`, :func:`values_of`,    an element by tag
                               :func:`code_values`, :func:`value_dict`:    without keyword
                               hl7.fields (``get``, ``values``,            resolution (~10×)
                               ``items``, ``code_of``), hl7.obx
``DataElement._value``         :data:`value` and the same                  a value without
                                                                           the property call
``Dataset._character_set``     :func:`character_set`: dicom.header (as     the encodings
                               dcmread does), hl7.fields                   text is read in
=============================  ==========================================  =================

Checked once, on import, against a Dataset built the public way. If one is missing or
behaves otherwise, the public equivalent is used (``Dataset.elements()``,
``DataElement.value``, the Specific Character Set converted by
``pydicom.charset.convert_encodings``) — slower, and for a nested item whose own Specific
Character Set is absent the default repertoire instead of its parent's — and ONE WARNING
``dicom.adapter_fallback`` names what is missing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from operator import attrgetter
from typing import Any

from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset

from flow import get_logger, register_safe_fields

_log = get_logger("nodes.dicom")
register_safe_fields("missing")  # names of pydicom internals


def _probe() -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientID = "probe"  # not a patient: a value to read back
    return ds


def _dict_ok() -> bool:
    ds = _probe()
    found = getattr(ds, "_dict", None)
    return isinstance(found, dict) and found.get(0x00100020) is ds["PatientID"]


def _value_ok() -> bool:
    return getattr(_probe()["PatientID"], "_value", None) == "probe"


def _charset_ok() -> bool:
    return getattr(_probe(), "_character_set", None) == ["latin_1"]


def _check() -> tuple[str, ...]:
    checks = {"Dataset._dict": _dict_ok, "DataElement._value": _value_ok,
              "Dataset._character_set": _charset_ok}
    missing = []
    for name, check in checks.items():
        try:
            ok = check()
        except Exception:  # a changed pydicom may raise anything here: then it is missing
            ok = False
        if not ok:
            missing.append(name)
    return tuple(missing)


MISSING = _check()


def _public_dict(ds: Dataset) -> dict[Any, Any]:
    return {elem.tag: elem for elem in ds.elements()}


def _public_value(elem: Any) -> Any:
    if elem.__class__ is RawDataElement:  # as _value: a raw element has none
        raise AttributeError("_value")
    return elem.value


def _public_character_set(ds: Dataset) -> Any:
    elem = ds.get(0x00080005)
    return convert_encodings(elem.value) if elem is not None and elem.value else \
        default_encoding  # as pydicom for a top-level data set (a str, not a list)


element_dict: Callable[[Dataset], dict[Any, Any]] = (
    _public_dict if "Dataset._dict" in MISSING else attrgetter("_dict"))
"""``ds``'s elements by tag (DataElements, or RawDataElements not converted yet); the
dataset's own dict: read it, never change it."""

value: Callable[[DataElement], Any] = (
    _public_value if "DataElement._value" in MISSING else attrgetter("_value"))
"""A DataElement's value as ``DataElement.value`` returns it; AttributeError for a
RawDataElement (not converted yet)."""

character_set: Callable[[Dataset], Any] = (
    _public_character_set if "Dataset._character_set" in MISSING
    else attrgetter("_character_set"))
"""The encodings ``ds``'s text values are read in (its Specific Character Set, else its
parent's), as pydicom's reader uses them."""



def values_of(ds: Dataset, keys: Iterable[Any],
              raw: Callable[[Dataset, Any, RawDataElement], Any]) -> list[Any]:
    """The values of the elements ``keys`` (tags) of ``ds`` as :data:`value` gives them: None
    for an absent one, ``raw(ds, tag, element)`` for one not converted yet. One loop here rather
    than a call per element in the caller: the HL7 lane reads every content item this way."""
    if MISSING:
        elements = element_dict(ds)
        return [None if (e := elements.get(tag)) is None else
                raw(ds, tag, e) if e.__class__ is RawDataElement else e.value for tag in keys]
    out = []
    elements = ds._dict
    for tag in keys:  # a loop: an attrgetter("_value") map costs more than the reads
        elem = elements.get(tag)
        if elem is None:
            out.append(None)
        elif elem.__class__ is RawDataElement:
            out.append(raw(ds, tag, elem))
        else:
            out.append(elem._value)  # what DataElement.value returns, without its call
    return out


def code_values(ds: Dataset, value_tag: Any, scheme_tag: Any, meaning_tag: Any
                ) -> tuple[Any, Any, Any] | None:
    """The values of a coded entry's three elements as :data:`value` gives them, or None
    when one is absent or not converted yet: one call for each coded entry of a report."""
    if MISSING:
        elements = element_dict(ds)
        found = [elements.get(tag) for tag in (value_tag, scheme_tag, meaning_tag)]
        if any(e is None or e.__class__ is RawDataElement for e in found):
            return None
        return found[0].value, found[1].value, found[2].value
    elements = ds._dict
    try:
        return (elements[value_tag]._value, elements[scheme_tag]._value,
                elements[meaning_tag]._value)
    except (KeyError, AttributeError):
        return None


def value_dict(ds: Dataset) -> dict[Any, Any]:
    """Every element's value by tag, as :data:`value` gives it; AttributeError when one is
    not converted yet (a RawDataElement)."""
    values = {}
    if MISSING:
        for tag, element in element_dict(ds).items():
            values[tag] = value(element)
        return values
    # A loop: a comprehension is one more function call in Python 3.11.
    for tag, element in ds._dict.items():
        values[tag] = element._value
    return values


if MISSING:
    _log.warning("dicom.adapter_fallback", missing=", ".join(MISSING),
                 reason="this pydicom lacks internals the fast paths rely on: pydicom's "
                        "public API is used instead (slower)")
