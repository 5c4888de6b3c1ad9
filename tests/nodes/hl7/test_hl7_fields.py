"""DICOM values → HL7 types: PN → XPN, dates, sex, numbers, character sets, result status."""

import os
import sys
from datetime import datetime, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName

from nodes.hl7 import Rep, SRReportHandler
from nodes.hl7.fields import (_CODES, charset_for, code_of, da, dt, dtm, ndl, numeric, sex,
                              tm, xpn)
from nodes.hl7.model import field_er7
from nodes.hl7.sr import result_status

sys.path.insert(0, os.path.dirname(__file__))  # the helpers next to this file
import hl7_samples as samples  # noqa: E402


def test_pn_to_xpn_swaps_prefix_and_suffix():
    # DICOM: family^given^middle^prefix^suffix; XPN: family^given^middle^suffix^prefix
    assert xpn("Adams^John^Robert^Rev.^B.A. M.Div.") == (
        "Adams", "John", "Robert", "B.A. M.Div.", "Rev.")
    assert field_er7(xpn("Adams^John^Robert^Rev.^B.A. M.Div.")) == \
        "Adams^John^Robert^B.A. M.Div.^Rev."
    assert field_er7(xpn("Doe^Jane")) == "Doe^Jane"
    assert xpn("") is None and xpn(None) is None


def test_pn_groups_become_repetitions_with_representation_codes():
    name = PersonName("Yamada^Tarou=山田^太郎=やまだ^たろう")
    value = xpn(name)
    assert isinstance(value, Rep)
    assert field_er7(value) == ("Yamada^Tarou^^^^^^A~山田^太郎^^^^^^I~やまだ^たろう^^^^^^P")
    # no alphabetic group: the ideographic one still comes first
    assert field_er7(xpn("=山田^太郎")) == "山田^太郎^^^^^^I"


def test_delimiters_inside_names_are_escaped_not_structural():
    assert field_er7(xpn("O&Brien^Mary|Ann")) == "O\\T\\Brien^Mary\\F\\Ann"


def test_ndl_for_the_interpreter_uses_subcomponents():
    assert field_er7(ndl("Radiologist^Rita^M^Dr.^PhD", "RAD42")) == \
        "RAD42&Radiologist&Rita&M&PhD&Dr."
    assert ndl("") is None


@pytest.mark.parametrize("value, expected", [("M", "M"), ("F", "F"), ("O", "O"), ("X", "U"),
                                             ("", None), (None, None)])
def test_sex_maps_to_table_0001(value, expected):
    assert sex(value) == expected


def test_dates_and_times():
    assert dtm("20260101", "101500.123456", "+0100") == "20260101101500.1234+0100"
    assert dtm("20260101", "") == "20260101"
    assert dtm("", "101500") == ""
    assert tm("10:15:00") == "101500" and tm("1015") == "1015"
    assert da("2026.01.01") == "20260101"
    assert dt("20260101101500.500000+0100") == "20260101101500.5+0100"
    assert dt("202601011015-0500") == "202601011015-0500"


def test_numbers_never_carry_an_exponent():
    assert numeric("12.5") == "12.5" and numeric("1.5E3") == "1500" and numeric("-2e-2") == "-0.02"


@pytest.mark.parametrize("dicom, hl7", [
    (None, ""), ("", ""), ("ISO_IR 6", ""), ("ISO_IR 100", "8859/1"), ("ISO_IR 192", "UNICODE UTF-8"),
    ("ISO_IR 144", "8859/5"), (["", "ISO 2022 IR 87"], "UNICODE UTF-8"), ("GB18030", "UNICODE UTF-8"),
])
def test_specific_character_set_to_msh18(dicom, hl7):
    assert charset_for(dicom) == hl7


def flags(completion, verification, predecessor=False, preliminary=None):
    ds = Dataset()
    ds.CompletionFlag, ds.VerificationFlag = completion, verification
    if predecessor:
        ds.PredecessorDocumentsSequence = [Dataset()]
    if preliminary:
        ds.PreliminaryFlag = preliminary
    return ds


@pytest.mark.parametrize("ds, status", [
    (flags("PARTIAL", "UNVERIFIED"), "P"),
    (flags("COMPLETE", "UNVERIFIED"), "P"),
    (flags("COMPLETE", "VERIFIED"), "F"),
    (flags("COMPLETE", "VERIFIED", predecessor=True), "C"),
    (flags("COMPLETE", "VERIFIED", preliminary="PRELIMINARY"), "P"),
    (flags("PARTIAL", "VERIFIED"), "P"),
])
def test_result_status_from_completion_and_verification_flags(ds, status):
    assert result_status(ds) == status


def test_fast_get_reads_what_dataset_get_reads_in_memory_and_from_a_file():
    import io
    import os
    import sys

    from pydicom import dcmread

    from nodes.hl7.fields import get
    from support.synth import to_part10

    sys.path.insert(0, os.path.dirname(__file__))
    import hl7_samples as samples

    built = samples.comprehensive(name="Müller^Jörg", charset="ISO_IR 100")
    read = dcmread(io.BytesIO(to_part10(built)))  # raw elements until first access
    for ds in (built, read):
        for keyword in ("PatientName", "PatientID", "StudyDate", "CompletionFlag",
                        "ContentSequence", "AccessionNumber", "PatientComments"):
            assert get(ds, keyword) == ds.get(keyword)
        item = get(ds, "ContentSequence")[2]["ContentSequence"].value[1]  # a nested group
        assert get(item, "ValueType") == item.get("ValueType") == "CONTAINER"
    assert str(get(read, "PatientName")) == "Müller^Jörg"
    assert get(None, "PatientID", "x") == "x"
    with pytest.raises(ValueError):
        get(built, "NotAKeyword")


# -- interned codes (fields.code_of) ---------------------------------------------------------

_CODE_TEXT = st.text(st.sampled_from("ab1 ^|é"), min_size=1, max_size=6)


@st.composite
def coded_reports(draw):
    """A report whose concepts share code values but may differ in scheme and meaning:
    what an interning mistake would mix up."""

    def concept():
        return samples.code(draw(st.sampled_from(["1", "2"])), draw(_CODE_TEXT),
                            draw(_CODE_TEXT))

    children = [samples.content("CODE", concept(), ConceptCodeSequence=[concept()])
                for _ in range(draw(st.integers(1, 4)))]
    return samples.report(samples.COMPREHENSIVE_SR, children, charset="ISO_IR 100")


@settings(max_examples=30, deadline=None)
@given(coded_reports(), coded_reports())
def test_interned_codes_never_carry_one_report_into_the_next(first_report, second_report):
    handler = SRReportHandler(samples.RIS, control_ids=lambda: "1",
                              clock=lambda: datetime(2026, 1, 1, tzinfo=timezone.utc))
    _CODES.clear()
    alone = handler.handle(second_report).encode()
    _CODES.clear()
    handler.handle(first_report)
    assert handler.handle(second_report).encode() == alone


def test_interned_codes_are_bounded():
    for i in range(5000):
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = str(i), "99X", "m"
        assert code_of(item) == (str(i), "99X", "m")
    assert 0 < len(_CODES) <= 4096


# -- lookup tags (fields._LookupTag) -----------------------------------------------------------


@given(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF))
def test_lookup_tags_compare_and_hash_as_the_tags_they_stand_for(a, b):
    from pydicom.tag import BaseTag

    from nodes.hl7.fields import _LookupTag

    key, tag = _LookupTag(a), BaseTag(b)
    assert (key == tag, key != tag, key < tag, key <= tag, key > tag, key >= tag) == (
        a == b, a != b, a < b, a <= b, a > b, a >= b)
    assert (tag == key, tag < key) == (a == b, b < a)
    assert hash(key) == hash(BaseTag(a))
    ds = Dataset()
    ds.add_new(BaseTag(a), "LO", "x")
    assert ds._dict.get(key) is ds._dict[BaseTag(a)]


def test_code_texts_as_read_find_only_their_own_code():
    plain = Dataset()
    plain.CodeValue, plain.CodingSchemeDesignator, plain.CodeMeaning = "1", "99X", "m"
    several = Dataset()
    several.CodeValue, several.CodingSchemeDesignator = "1", "99X"
    several.CodeMeaning = ["m", "n"]  # a MultiValue: unhashable, normalized as before
    long_value = Dataset()
    long_value.CodeValue, long_value.CodingSchemeDesignator, long_value.CodeMeaning = (
        "", "99X", "m")
    long_value.LongCodeValue = "L" * 70
    empty = Dataset()
    empty.CodeValue, empty.CodingSchemeDesignator, empty.CodeMeaning = "", "99X", "m"
    for _ in range(2):  # cold, then with every code interned
        assert code_of(plain) == ("1", "99X", "m")
        assert code_of(several) == ("1", "99X", str(several.CodeMeaning))
        assert code_of(empty) == ("", "99X", "m")
        assert code_of(long_value) == ("L" * 70, "99X", "m")


def test_first_item_of_a_present_empty_or_absent_sequence():
    from nodes.hl7.fields import first, items

    ds = Dataset()
    ds.ContentSequence = [samples.code("1", "99X", "m")]
    ds.ProcedureCodeSequence = []
    assert first(ds, "ContentSequence") is ds.ContentSequence[0]
    assert first(ds, "ProcedureCodeSequence") is None
    assert not items(ds, "ProcedureCodeSequence")
    assert first(ds, "ConceptNameCodeSequence") is None
    assert first(None, "ContentSequence") is None
