"""The OBXs of a report, rendered as the content tree is walked (nodes.hl7.obx), are the
ones the typed model gives: a content item walked with ``sr.walk``, its field values built
with the ``fields`` helpers, rendered by ``Segment.to_er7`` (the mapping before it was fused,
kept here as the reference). Every value type, for the three ways a handler gets a report:
a Dataset built in memory, the lane's own Part 10 reader (content items as RawItems), and
pydicom's dcmread with its sequences converted (Datasets of raw elements)."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from nodes.hl7 import fields as f
from nodes.hl7.fields import Code, code_of, first
from nodes.hl7.model import FieldValue, Segment, parse, text_lines
from nodes.hl7.obx import content_obxs
from nodes.dicom.header import read_header
from nodes.hl7.sr import ContentItem, numeric_value, walk
from nodes.payload import BytesPayload
from support.synth import to_part10

sys.path.insert(0, os.path.dirname(__file__))  # the helpers next to this file
import hl7_samples as samples  # noqa: E402

# partial dates and ACR-NEMA times are in the trees on purpose: pydicom warns, we map them
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR")

# -- the reference: the mapping as the typed model does it --------------------------------


def _reference_sop(item) -> FieldValue:
    ref = first(item, "ReferencedSOPSequence")
    return str(f.get(ref, "ReferencedSOPInstanceUID", "") or "") or None if ref else None


def _coordinates(item) -> FieldValue:
    kind = str(f.get(item, "GraphicType", "") or f.get(item, "TemporalRangeType", "") or "")
    data = f.get(item, "GraphicData")
    data = () if data is None else (data,) if isinstance(data, (int, float)) else data
    return " ".join([kind, *(str(v) for v in data)]).strip() or None


def _coded(item) -> FieldValue:
    code = code_of(first(item, "ConceptCodeSequence"))
    return code.ce() if code is not None else None


def _text(item) -> FieldValue:
    text = str(f.get(item, "TextValue", "") or "")
    return text_lines(text) if text else None


REFERENCE_VALUES: dict[str, tuple[str, Callable]] = {
    "TEXT": ("TX", _text),
    "CODE": ("CE", _coded),
    "DATE": ("DT", lambda i: f.da(f.get(i, "Date")) or None),
    "TIME": ("TM", lambda i: f.tm(f.get(i, "Time")) or None),
    "DATETIME": ("DTM", lambda i: f.dt(f.get(i, "DateTime")) or None),
    "PNAME": ("XPN", lambda i: f.xpn(f.get(i, "PersonName"))),
    "UIDREF": ("ST", lambda i: str(f.get(i, "UID", "") or "") or None),
    "IMAGE": ("ST", _reference_sop),
    "COMPOSITE": ("ST", _reference_sop),
    "WAVEFORM": ("ST", _reference_sop),
    "SCOORD": ("ST", _coordinates),
    "SCOORD3D": ("ST", _coordinates),
    "TCOORD": ("ST", _coordinates),
}


def reference_obx(n: int, content: ContentItem, status: str) -> str:
    item, value_type = content.item, content.value_type
    concept = content.concept or Code(value_type, "99DCMSR", f"{value_type} content item")
    observed = f.get(item, "ObservationDateTime")
    observed = f.dt(observed) if observed else ""
    units = None
    if value_type == "NUM":
        hl7_type = "NM"
        number, unit = numeric_value(item)
        value = f.numeric(number) if number else None
        units = unit.ce() if unit else None
    elif value_type == "CONTAINER":
        hl7_type, value = "", None
    else:
        hl7_type, read = REFERENCE_VALUES.get(value_type, ("ST", lambda i: None))
        value = read(item)
    fields = [str(n), hl7_type if value is not None else None,
              (concept.value, concept.meaning, concept.scheme), content.path or None, value,
              units, None, None, None, None, status]
    if observed:
        fields += (None, None, observed)
    return Segment.from_fields("OBX", fields).to_er7()


def reference(ds: Dataset, status: str) -> list[str]:
    return [reference_obx(n, c, status) for n, c in enumerate(walk(ds), start=1)]


def fused(ds: Dataset, status: str) -> list[str]:
    segments, _ = content_obxs(ds, status)
    return [seg.to_er7() for seg in segments]


# -- content trees ------------------------------------------------------------------------

TEXT = st.text(st.sampled_from("ab Z9|^&~\\\n\r\t.-é"), max_size=24)
CODES = st.sampled_from([("121071", "DCM", "Finding"), ("mm", "UCUM", "millimeter"),
                         ("RID3874", "RADLEX", "Nodule ^ & | mass"), ("x~y", "99L", "tilde")])
DECIMAL = st.from_regex(r"[+-]?[0-9]{1,5}(\.[0-9]{0,3})?([eE][+-]?[0-9]{1,2})?",
                        fullmatch=True)


def code_item(code: tuple[str, str, str]) -> Dataset:
    return samples.code(*code)


@st.composite
def leaf(draw) -> Dataset:
    value_type = draw(st.sampled_from([
        "TEXT", "CODE", "NUM", "DATE", "TIME", "DATETIME", "PNAME", "UIDREF", "IMAGE",
        "COMPOSITE", "WAVEFORM", "SCOORD", "SCOORD3D", "TCOORD", "XYZ", None]))
    item = Dataset()
    if value_type is None:  # only a reference to another item: a position, no OBX
        item.RelationshipType = "INFERRED FROM"
        item.ReferencedContentItemIdentifier = [1, 2]
        return item
    item.RelationshipType = "CONTAINS"
    item.ValueType = value_type
    concept = draw(st.sampled_from(["code", "none", "empty"]))
    if concept == "code":
        item.ConceptNameCodeSequence = [code_item(draw(CODES))]
    elif concept == "empty":
        item.ConceptNameCodeSequence = []
    if draw(st.booleans()):
        item.ObservationDateTime = draw(st.sampled_from(
            ["20260101101500", "20260101101500.123456+0100", "2026"]))
    if value_type == "TEXT":
        item.TextValue = draw(TEXT)
    elif value_type == "CODE":
        item.ConceptCodeSequence = draw(st.sampled_from([[], [code_item(draw(CODES))]]))
    elif value_type == "NUM":
        shape = draw(st.sampled_from(["number", "float", "none", "no-units"]))
        if shape != "none":
            measured = Dataset()
            if shape == "float":
                measured.NumericValue = ""
                measured.FloatingPointValue = draw(st.floats(-1e6, 1e6, width=32))
            else:
                measured.NumericValue = draw(DECIMAL)
            if shape != "no-units":
                measured.MeasurementUnitsCodeSequence = [code_item(draw(CODES))]
            item.MeasuredValueSequence = [measured]
    elif value_type == "DATE":
        item.Date = draw(st.sampled_from(["20251231", "2025", ""]))
    elif value_type == "TIME":
        item.Time = draw(st.sampled_from(["1015", "101500.123456", "10:15:00", ""]))
    elif value_type == "DATETIME":
        item.DateTime = draw(st.sampled_from(["20260101101500.5+0100", "2026010110", ""]))
    elif value_type == "PNAME":
        item.PersonName = draw(st.sampled_from([
            "Second^Sam^^Dr.^Jr.", "Only", "", "A^B=C^D=E^F", "=Ideo^Graphic"]))
    elif value_type == "UIDREF":
        item.UID = draw(st.sampled_from(["1.2.826.0.1.3680043.10.1234.9", ""]))
    elif value_type in ("IMAGE", "COMPOSITE", "WAVEFORM"):
        if draw(st.booleans()):
            reference = Dataset()
            reference.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
            reference.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.10.1234.7"
            item.ReferencedSOPSequence = [reference]
    elif value_type in ("SCOORD", "SCOORD3D"):
        item.GraphicType = draw(st.sampled_from(["POINT", "POLYLINE"]))
        item.GraphicData = draw(st.lists(st.floats(-100, 100, width=32), max_size=4))
    elif value_type == "TCOORD":
        item.TemporalRangeType = "POINT"
    return item


def container(children: list[Dataset]) -> Dataset:
    item = samples.container(code_item(("121070", "DCM", "Findings")), *children)
    return item


TREES = st.recursive(st.lists(leaf(), min_size=1, max_size=4),
                     lambda inner: st.lists(inner.map(container) | leaf(), min_size=1,
                                            max_size=4),
                     max_leaves=12)


def sr(children: list[Dataset]) -> Dataset:
    return samples.report(samples.COMPREHENSIVE_SR, children, charset="ISO_IR 100")


# -- the three ways in ---------------------------------------------------------------------


def from_lane_reader(ds: Dataset, syntax: str) -> Dataset:
    """What the ris lane hands a handler: nodes.dicom.header on the Part 10 bytes."""
    return read_header(BytesPayload(to_part10(ds, syntax)))


def from_dcmread_converted(ds: Dataset, syntax: str) -> Dataset:
    """pydicom's dcmread, with the content sequences converted by pydicom (Datasets whose
    elements are still raw): what a handler gets when something has read them before."""
    read = dcmread(io.BytesIO(to_part10(ds, syntax)))
    read.ContentSequence  # noqa: B018 - pydicom converts the sequence on access
    return read


SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(TREES, st.sampled_from(["F", "P", "C"]))
def test_in_memory_tree_renders_as_the_typed_model_does(children, status):
    ds = sr(children)
    assert fused(ds, status) == reference(ds, status)


@SETTINGS
@given(TREES, st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
def test_part10_tree_read_by_the_lane_renders_as_the_typed_model_does(children, syntax):
    ds = from_lane_reader(sr(children), syntax)
    assert fused(ds, "F") == reference(ds, "F")


@SETTINGS
@given(TREES, st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
def test_tree_of_raw_pydicom_datasets_renders_as_the_typed_model_does(children, syntax):
    ds = from_dcmread_converted(sr(children), syntax)
    assert fused(ds, "P") == reference(ds, "P")


def test_every_obx_parses_back_into_the_fields_it_was_rendered_from():
    """A pre-rendered OBX read through the model: the fields the typed model would hold."""
    ds = samples.comprehensive()
    segments, _ = content_obxs(ds, "F")
    for segment, expected in zip(segments, reference(ds, "F"), strict=True):
        assert segment.to_er7() == expected
        model = parse(f"MSH|^~\\&|\r{expected}\r").segments[1]
        assert segment.fields == model.fields
        assert segment.to_er7() == expected  # handed out: rendered again from the fields


def test_the_observer_found_is_the_roots_first_person_observer_name():
    ds = samples.comprehensive()  # a root-level observer, and one nested deeper
    _, observer = content_obxs(ds, "F")
    assert observer.found and str(observer.name) == "Observer^Olga"
    _, observer = content_obxs(samples.report(samples.COMPREHENSIVE_SR, [
        samples.container(code_item(("121070", "DCM", "Findings")), samples.observer())]),
        "F")
    assert not observer.found


def test_a_tree_too_deep_is_refused():
    item = samples.text(code_item(("121071", "DCM", "Finding")), "deep")
    for _ in range(70):
        item = container([item])
    try:
        content_obxs(sr([item]), "F")
    except ValueError as error:
        assert "deeper than 64" in str(error)
    else:
        raise AssertionError("a 71-level tree was walked")


def test_the_status_is_escaped_like_any_other_field():
    segments, _ = content_obxs(samples.basic_text(), "F|X")
    assert segments and all("|F\\F\\X" in seg.to_er7() for seg in segments)
    assert all(seg.get(11) == "F|X" for seg in segments)
