"""Walking a DICOM Structured Report content tree (PS3.3 C.17.3). Pure, no HL7 here.

:func:`walk` yields every content item below the document root in document order, with its
position path: the root's children are ``1``, ``2``, …, a child of ``2`` is ``2.1``. The path
is the item's DICOM content item identifier without the root's leading ``1`` (PS3.3
C.17.3.2.5), so a by-reference relationship could be resolved from it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

from pydicom.dataset import Dataset

from .fields import Code, code_of, first, get, items, tags, values
from ..dicom.items import RawItem

# Completion Flag / Verification Flag → HL7 table 0123 (OBR-25, OBX-11).
PRELIMINARY, FINAL, CORRECTED = "P", "F", "C"


class ContentItem(NamedTuple):
    """One content item: where it sits, how it relates to its parent, what it says.
    (A NamedTuple: a report has hundreds of them and they are built in the hot path.)"""

    path: str
    relationship: str
    value_type: str
    concept: Code | None
    item: Dataset | RawItem  # the item, for values this module does not interpret (read
    #                          them with fields.get/items: a Part 10 tree comes as RawItems)

    @property
    def depth(self) -> int:
        return self.path.count(".") + 1


_new_item = tuple.__new__

# what the walk reads of every content item, in one call
_ITEM_TAGS = tags("ValueType", "RelationshipType", "ConceptNameCodeSequence",
                  "ContentSequence")


def walk(ds: Dataset, max_depth: int = 64) -> Iterator[ContentItem]:
    """Every content item under ``ds`` (the document root), depth first, in order.

    Items that are only a reference to another item (Referenced Content Item Identifier,
    no Value Type) take their position but are not yielded. A tree deeper than ``max_depth``
    raises ValueError (a malformed or hostile object, not a report).
    """
    iterators: list[Iterator[tuple[int, Any]]] = [
        iter(enumerate(items(ds, "ContentSequence")[:], start=1))]
    prefixes = [""]
    while iterators:
        # a for loop per level (not next() and StopIteration per item): this is the hot
        # path of SR → ORU, once per content item
        for position, item in iterators[-1]:
            path = f"{prefixes[-1]}{position}"
            value_type, relationship, concept, children = values(item, _ITEM_TAGS)
            if value_type:
                try:  # [0] alone: a pydicom Sequence's len() would be one more Python call
                    concept = concept[0] if concept is not None else None
                except IndexError:  # an empty Concept Name Code Sequence
                    concept = None
                concept = code_of(concept)
                # tuple.__new__ builds the NamedTuple without its Python-level __new__
                yield _new_item(ContentItem, (path, str(relationship or ""), str(value_type),
                                              concept, item))
            if children:
                if len(iterators) >= max_depth:
                    raise ValueError(f"SR content tree deeper than {max_depth} levels")
                # a slice of pydicom's Sequence is a plain list: iterating the Sequence
                # itself resumes a generator per item
                iterators.append(iter(enumerate(children[:], start=1)))
                prefixes.append(path + ".")
                break
        else:
            iterators.pop()
            prefixes.pop()



def result_status(ds: Dataset) -> str:
    """OBR-25 / OBX-11 from the document's flags (PS3.3 C.17.2):

    PARTIAL → P; COMPLETE + UNVERIFIED → P; COMPLETE + VERIFIED → F, or C when the document
    replaces earlier ones (Predecessor Documents Sequence present: a corrected report).
    A Preliminary Flag of PRELIMINARY keeps it P.
    """
    completion = str(get(ds, "CompletionFlag", "") or "").upper()
    verification = str(get(ds, "VerificationFlag", "") or "").upper()
    if str(get(ds, "PreliminaryFlag", "") or "").upper() == "PRELIMINARY":
        return PRELIMINARY
    if completion == "COMPLETE" and verification == "VERIFIED":
        return CORRECTED if items(ds, "PredecessorDocumentsSequence") else FINAL
    return PRELIMINARY


_MEASURED_TAGS = tags("NumericValue", "MeasurementUnitsCodeSequence")


def numeric_value(item: Dataset) -> tuple[str, Code | None]:
    """(number text, units) of a NUM item; ("", None) when it has no measured value."""
    measured = first(item, "MeasuredValueSequence")
    if measured is None:
        return "", None
    value, units = values(measured, _MEASURED_TAGS)
    if value is None or str(value).strip() == "":
        value = get(measured, "FloatingPointValue", "")
    return str(value).strip(), code_of(units[0] if units else None)
