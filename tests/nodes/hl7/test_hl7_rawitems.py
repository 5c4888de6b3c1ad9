"""A Part 10 SR is mapped from its raw bytes (nodes.dicom.items), not through pydicom's
element conversion: the ORU must be byte for byte the one pydicom's own conversion gives,
for every transfer syntax, sequence length encoding and character set."""

from __future__ import annotations

import os
import struct
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
                         ExplicitVRLittleEndian, ImplicitVRLittleEndian)

from nodes.dicom.header import dcmread_header as read_header
from nodes.hl7 import SRReportHandler
from nodes.hl7.fields import get, items
from nodes.dicom import header as part10
from nodes.dicom import items as rawitems
from nodes.dicom.items import RawItem, Unsupported, parse_items, sequence_items
from nodes.payload import BytesPayload
from support.synth import to_part10

sys.path.insert(0, os.path.dirname(__file__))  # the helpers next to this file
import hl7_samples as samples  # noqa: E402

FIXED = dict(clock=lambda: samples.FIXED_NOW, control_ids=lambda: "CTRL0001")

SAMPLES = {
    **samples.REPORTS,
    "iso2022_name": lambda: samples.basic_text(
        name="Yamada^Tarou=山田^太郎=やまだ^たろう", charset=["", "ISO 2022 IR 87"]),
}
SYNTAXES = {"explicit_le": ExplicitVRLittleEndian, "implicit_le": ImplicitVRLittleEndian,
            "explicit_be": ExplicitVRBigEndian, "deflated": DeflatedExplicitVRLittleEndian}


def undefined_lengths(ds: Dataset, *, below: int = 0) -> Dataset:
    """The sequences and items of ``ds`` written with undefined length (as many modalities
    write them) instead of pydicom's defined lengths, from depth ``below`` down (pydicom
    reads an undefined-length sequence as it parses the file: the ones below a
    defined-length top-level sequence are left to our reader)."""
    for elem in ds:
        if elem.VR == "SQ":
            elem.is_undefined_length = below <= 0
            for item in elem.value:
                item.is_undefined_length_sequence_item = below <= 0
                undefined_lengths(item, below=below - 1)
    return ds


def pydicom_converted(ds: Dataset) -> Dataset:
    """``ds`` with every element converted by pydicom: the mapping sees no raw element."""
    for _ in ds.iterall():
        pass
    return ds


def both_ways(ds: Dataset, syntax=ExplicitVRLittleEndian) -> tuple[bytes, bytes]:
    """(ORU mapped from the raw Part 10 header, ORU mapped after pydicom converted it)."""
    payload = BytesPayload(to_part10(ds, syntax))
    handler = SRReportHandler(samples.RIS, **FIXED)
    fast = handler.handle(read_header(payload)).encode()
    slow = handler.handle(pydicom_converted(read_header(payload))).encode()
    return fast, slow


@pytest.mark.parametrize("undefined_below", [None, 0, 1],
                         ids=["defined", "undefined", "nested_undefined"])
@pytest.mark.parametrize("syntax", sorted(SYNTAXES))
@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_part10_report_maps_byte_identical_to_pydicom_conversion(kind, syntax,
                                                                   undefined_below):
    ds = SAMPLES[kind]()
    if undefined_below is not None:
        undefined_lengths(ds, below=undefined_below)
    fast, slow = both_ways(ds, SYNTAXES[syntax])
    assert fast == slow
    # and both are the ORU of the object as built in memory
    assert fast == SRReportHandler(samples.RIS, **FIXED).handle(SAMPLES[kind]()).encode()


def assert_same_values(raw: RawItem, converted: Dataset) -> None:
    """Every element of ``raw`` reads as pydicom converts it (text compared as text)."""
    assert len(raw) == len(converted)
    for tag in raw.tags():
        ours, theirs = raw.value(tag), converted[tag].value
        if converted[tag].VR == "SQ":
            assert len(ours) == len(theirs)
            for child, item in zip(ours, theirs):
                assert_same_values(child, item)
        else:
            assert str(ours) == str(theirs), f"{converted[tag].tag} {converted[tag].VR}"


@pytest.mark.parametrize("nested_undefined", [False, True])
@pytest.mark.parametrize("syntax", ["explicit_le", "implicit_le"])
@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_every_raw_item_value_reads_as_pydicom_converts_it(kind, syntax, nested_undefined):
    ds = SAMPLES[kind]()
    if nested_undefined:
        undefined_lengths(ds, below=1)
    payload = BytesPayload(to_part10(ds, SYNTAXES[syntax]))
    raw, converted = read_header(payload), pydicom_converted(read_header(payload))
    for keyword in ("ContentSequence", "ReferencedRequestSequence",
                    "ConceptNameCodeSequence", "VerifyingObserverSequence"):
        ours, theirs = items(raw, keyword), converted.get(keyword) or []
        assert all(isinstance(item, RawItem) for item in ours)
        assert len(ours) == len(theirs)
        for child, item in zip(ours, theirs):
            assert_same_values(child, item)


def test_mapping_leaves_the_raw_header_unconverted():
    """items() reads a raw sequence without converting it in the caller's dataset."""
    ds = read_header(BytesPayload(to_part10(samples.fifty_items())))
    SRReportHandler(samples.RIS).handle(ds)
    assert type(ds._dict[0x0040A730]).__name__ == "RawDataElement"


# Text as a report carries it: delimiters of both standards, line breaks, spaces at the
# ends, letters of the declared repertoire.
LATIN1 = st.characters(codec="latin-1", exclude_categories=("Cc",)) | st.sampled_from(
    "\\|^&~=\n\r ")
UNICODE = st.characters(exclude_categories=("Cc", "Cs")) | st.sampled_from("\\|^&~=\n ")


@st.composite
def reports(draw):
    charset = draw(st.sampled_from([None, "ISO_IR 100", "ISO_IR 192"]))
    letters = UNICODE if charset == "ISO_IR 192" else LATIN1 if charset else st.sampled_from(
        "abcXYZ019 .,-\\|^&~=\n")
    text = st.text(letters, min_size=1, max_size=40)
    children = []
    for _ in range(draw(st.integers(1, 4))):
        finding = samples.text(samples.code("121071", "DCM", draw(text)), draw(text))
        person = samples.content("PNAME", samples.code("121008", "DCM", "Person Observer"),
                                 PersonName=draw(text))
        children.append(samples.container(samples.code("125007", "DCM", draw(text)),
                                          finding, person))
    ds = samples.report(samples.COMPREHENSIVE_SR, children, name=draw(text), charset=charset)
    below = draw(st.sampled_from([None, 0, 1, 2]))
    if below is not None:
        undefined_lengths(ds, below=below)
    return ds, draw(st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reports())
def test_any_report_maps_from_raw_bytes_as_from_pydicom_conversion(report):
    """dcmread's header and the lane's own (nodes.dicom.header) alike."""
    ds, syntax = report
    fast, slow = both_ways(ds, syntax)
    assert fast == slow
    assert both_readers(ds, syntax) == (fast, slow)


def test_raw_sequence_reader_leaves_what_it_does_not_read_to_pydicom():
    item = b"\x08\x00\x00\x01SH\x04\x00ABCD"              # (0008,0100) SH "ABCD"
    one = struct.pack("<HHL", 0xFFFE, 0xE000, len(item)) + item
    assert [get(i, "CodeValue") for i in parse_items(one, False, "iso8859")] == ["ABCD"]
    with pytest.raises(Unsupported):
        parse_items(one[:-2], False, "iso8859")               # truncated
    with pytest.raises(Unsupported):
        parse_items(item, False, "iso8859")                   # not an item
    with pytest.raises(Unsupported):                         # undefined length, no delimiter
        parse_items(struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + item, False, "iso8859")
    big_endian = read_header(BytesPayload(to_part10(samples.basic_text(),
                                                    ExplicitVRBigEndian)))
    assert sequence_items(big_endian._dict[0x0040A730], "iso8859") is None
    assert items(big_endian, "ContentSequence")[0].ValueType == "CODE"  # pydicom's


def test_an_item_with_its_own_character_set_is_read_in_it():
    """PS3.5 §6.1.2.5.3: a sequence item may declare its own Specific Character Set."""
    finding = samples.text(samples.code("121071", "DCM", "Finding"), "Ωmega naïve 山田")
    finding.SpecificCharacterSet = "ISO_IR 192"
    ds = samples.report(samples.COMPREHENSIVE_SR, [
        samples.container(samples.code("121070", "DCM", "Findings"), finding)],
        name="Müller^Jörg", charset="ISO_IR 100")
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        fast, slow = both_ways(ds, syntax)
        assert fast == slow
        assert "Ωmega naïve 山田".encode() in fast and b"M\xc3\xbcller" in fast  # UTF-8 ORU


@pytest.mark.filterwarnings("ignore:Failed to decode byte string")
def test_text_that_does_not_decode_in_its_character_set_is_left_to_pydicom():
    finding = samples.text(samples.code("121071", "DCM", "Finding"), "x")
    finding["TextValue"].value = b"caf\xe9 latin-1 in a UTF-8 object"
    ds = samples.report(samples.COMPREHENSIVE_SR, [finding], charset="ISO_IR 192")
    ds["PatientName"].value = b"M\xfcller^J\xf6rg"
    fast, slow = both_ways(ds)
    assert fast == slow and "\ufffd".encode() in fast  # pydicom's replacement character


# -- the parse's shortcuts: text decoded during the parse, coded entries kept by their bytes

def both_readers(ds: Dataset, syntax=ExplicitVRLittleEndian) -> tuple[bytes, bytes]:
    """(ORU from the lane's own header reader, ORU after pydicom converted dcmread's)."""
    payload = BytesPayload(to_part10(ds, syntax))
    handler = SRReportHandler(samples.RIS, **FIXED)
    return (handler.handle(part10.read_header(payload)).encode(),
            handler.handle(pydicom_converted(read_header(payload))).encode())


CODE_TEXT = st.text(st.characters(codec="latin-1", exclude_categories=("Cc",))
                    | st.sampled_from("\\ "), max_size=12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(CODE_TEXT, CODE_TEXT, CODE_TEXT), min_size=1, max_size=6),
       st.sampled_from(["iso8859", "latin_1", "utf_8"]), st.booleans())
def test_coded_entries_read_again_are_what_pydicom_reads(codes, encoding, implicit):
    """Kept coded entries: the same bytes read twice (and in other character sets) give
    what pydicom gives for them, every time."""
    seq = []
    for value, scheme, meaning in codes * 2:  # each entry twice: the second is kept
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
        seq.append(item)
    ds = Dataset()
    ds.ConceptNameCodeSequence = seq
    ds.SpecificCharacterSet = {"iso8859": "ISO_IR 100", "latin_1": "ISO_IR 100",
                               "utf_8": "ISO_IR 192"}[encoding]
    payload = BytesPayload(to_part10_bare(ds, implicit))
    for _ in range(2):
        raw, converted = read_header(payload), pydicom_converted(read_header(payload))
        ours = items(raw, "ConceptNameCodeSequence")
        assert len(ours) == len(converted.ConceptNameCodeSequence)
        for child, theirs in zip(ours, converted.ConceptNameCodeSequence):
            assert_same_values(child, theirs)


def to_part10_bare(ds: Dataset, implicit: bool) -> bytes:
    ds.SOPClassUID, ds.SOPInstanceUID = samples.COMPREHENSIVE_SR, "1.2.3.4"
    return to_part10(ds, ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian)


def test_the_same_code_bytes_read_in_two_character_sets_are_two_texts():
    """A kept coded entry is kept per character set: é in Latin-1 is not é in UTF-8."""
    raw_meaning = "Lésion".encode("utf-8")
    texts = []
    for charset in ("ISO_IR 100", "ISO_IR 192"):
        ds = Dataset()
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator = "X1", "99T"
        item.add_new(0x00080104, "LO", raw_meaning)
        ds.ConceptNameCodeSequence = [item]
        ds.SpecificCharacterSet = charset
        payload = BytesPayload(to_part10_bare(ds, False))
        for _ in range(2):
            texts.append(get(items(read_header(payload), "ConceptNameCodeSequence")[0],
                             "CodeMeaning"))
    assert texts == ["LÃ©sion", "LÃ©sion", "Lésion", "Lésion"]


def test_kept_coded_entries_are_bounded():
    codes = [samples.code(f"C{i}", "99T", f"Code {i}") for i in range(5000)]
    ds = Dataset()
    ds.ConceptNameCodeSequence = codes
    payload = BytesPayload(to_part10_bare(ds, False))
    read = items(read_header(payload), "ConceptNameCodeSequence")
    assert [get(i, "CodeValue") for i in read[-3:]] == ["C4997", "C4998", "C4999"]
    assert all(len(table) <= 4096 for table in rawitems._CODE_ITEMS.values())


def test_an_item_s_iso2022_character_set_of_several_values_is_read_in_it():
    """An item's own Specific Character Set with several values (ISO 2022 code extensions):
    not text the parse decodes itself, but still the item's character set."""
    finding = samples.text(samples.code("121071", "DCM", "Finding"), "所見 Yamada")
    finding.SpecificCharacterSet = ["ISO 2022 IR 6", "ISO 2022 IR 87"]
    ds = samples.report(samples.COMPREHENSIVE_SR, [
        samples.container(samples.code("121070", "DCM", "Findings"), finding)],
        name="Yamada^Tarou", charset=None)
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        fast, slow = both_ways(ds, syntax)
        assert fast == slow
        assert both_readers(ds, syntax) == (fast, slow)
        assert "所見 Yamada".encode() in fast


def element(tag: int, vr: str, value: bytes) -> bytes:
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(value)) + value


def test_a_character_set_after_other_elements_is_left_to_pydicom():
    """PS3.5 §6.1.2.5.3: an item's Specific Character Set applies to all its text; one that
    comes after text already decoded makes the reader hand the sequence to pydicom."""
    body = element(0x00080100, "SH", b"X1  ") + element(0x00080005, "CS", b"ISO_IR 192")
    one = struct.pack("<HHL", 0xFFFE, 0xE000, len(body)) + body
    with pytest.raises(Unsupported):
        parse_items(one, False, "iso8859")
    first = element(0x00080005, "CS", b"ISO_IR 192") + element(0x00080104, "LO",
                                                               "é".encode() + b" ")
    item = parse_items(struct.pack("<HHL", 0xFFFE, 0xE000, len(first)) + first, False,
                       "iso8859")[0]
    assert get(item, "CodeMeaning") == "é"


def test_a_value_pydicom_converts_is_converted_once_and_kept():
    ds = read_header(BytesPayload(to_part10(samples.fifty_items())))
    measured = items(items(items(ds, "ContentSequence")[0], "ContentSequence")[1],
                     "MeasuredValueSequence")[0]
    number = get(measured, "NumericValue")
    assert str(number) == "1.5" and get(measured, "NumericValue") is number


@pytest.mark.parametrize("implicit", [False, True])
def test_undefined_length_items_and_sequences_inside_an_item(implicit):
    """Undefined lengths below the top level (items and sequences, nested), both VR
    encodings: read as pydicom reads them."""
    ds = undefined_lengths(samples.fifty_items(), below=1)
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    raw = read_header(BytesPayload(to_part10(ds, syntax)))
    converted = pydicom_converted(read_header(BytesPayload(to_part10(ds, syntax))))
    for child, item in zip(items(raw, "ContentSequence"), converted.ContentSequence):
        assert_same_values(child, item)
