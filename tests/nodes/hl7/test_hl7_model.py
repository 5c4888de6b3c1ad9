"""The HL7 v2 message model: escaping, ER7 serialization, parsing, character sets."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from nodes.hl7 import Message, Rep, Segment, Sub, escape, parse, text_lines, unescape
from nodes.hl7.model import field_er7, parse_field

DELIMS = "|^&~\\\r\n"


def test_escape_uses_the_hl7_escape_sequences():
    assert escape("a|b^c&d~e\\f") == "a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f"
    assert escape("line 1\r\nline 2") == "line 1\\X0D\\\\X0A\\line 2"
    # other control characters too: 0x0B and 0x1C would otherwise end the MLLP frame
    assert escape("tab\tvt\x0bfs\x1cdel\x7f") == "tab\\X09\\vt\\X0B\\fs\\X1C\\del\\X7F\\"
    assert unescape("a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f") == "a|b^c&d~e\\f"


def test_unescape_understands_br_hex_and_highlight_and_keeps_unknown():
    assert unescape("one\\.br\\two") == "one\ntwo"
    assert unescape("\\X0D0A\\") == "\r\n"
    assert unescape("\\H\\bold\\N\\") == "bold"
    assert unescape("odd \\Q\\ and \\ lone") == "odd \\Q\\ and \\ lone"


@given(st.text())
@settings(max_examples=300)
def test_escaping_round_trips_any_text(text):
    escaped = escape(text)
    assert not any(c in escaped for c in "|^&~")
    assert not any(ord(c) < 0x20 or c == "\x7f" for c in escaped)  # no CR, no MLLP bytes
    assert unescape(escaped) == text


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1))
@settings(max_examples=150, deadline=None)
def test_any_escaped_text_stays_one_field_for_hl7apy(text):
    """An independent parser sees exactly the one field we wrote, whatever the text."""
    seg = Segment("OBX", {1: "1", 2: "ST", 3: ("X", "x", "99T"), 5: text, 11: "F"})
    msg = Message([Segment("MSH", {9: ("ORU", "R01", "ORU_R01"), 10: "1", 11: "P",
                                   12: "2.5.1"}), seg])
    parsed = parse_message(msg.to_er7(), validation_level=VALIDATION_LEVEL.TOLERANT,
                           find_groups=False)
    obx = parsed.children[1]
    assert obx.name == "OBX"
    # The structure first: the text neither split the field nor shifted OBX-11.
    assert [c.name for c in obx.children][-1] == "OBX_11"
    assert obx.obx_11.value == "F" and obx.obx_3.obx_3_1.value == "X"
    # Then the value, where hl7apy can read it: it does not decode \Xhh\ (it re-escapes
    # the backslashes: control characters and escapes of escapes), and it takes a
    # whitespace-only field for an absent one (parser.py: ``if field.strip()``).
    hex_escaped = any(ord(c) < 0x20 or c == "\x7f" for c in text)
    if text.strip() and not hex_escaped:
        assert unescape(obx.obx_5.value) == text


@given(st.recursive(
    st.text(max_size=8),
    lambda inner: st.tuples(inner, inner),
    max_leaves=6))
def test_field_structures_round_trip_through_er7(value):
    if isinstance(value, tuple):
        # components hold text or subcomponents only: flatten deeper nesting into Sub
        value = tuple(Sub(c) if isinstance(c, tuple) and all(isinstance(x, str) for x in c)
                      else (c if isinstance(c, str) else "") for c in value)
    er7 = field_er7(value)
    again = field_er7(parse_field(er7))
    assert again == er7


def test_segment_positions_and_trailing_empties():
    seg = Segment("PID", {3: ("42", None, None, Sub(("HOSP", "1.2.3", "ISO"))), 5: ("Doe", "J")})
    assert seg.to_er7() == "PID|||42^^^HOSP&1.2.3&ISO||Doe^J"
    assert seg.get(3, 4, 2) == "1.2.3" and seg.get(5, 2) == "J" and seg.get(9) == ""
    seg[8] = Rep(("a", ("b", "c")))
    assert seg.to_er7().endswith("|||a~b^c")
    with pytest.raises(IndexError):
        seg[0] = "x"
    with pytest.raises(ValueError):
        Segment("pid")


def test_a_segment_made_from_its_text_renders_it_until_a_field_changes():
    text = "OBX|1|TX|121071^Finding^DCM|1.2|a\\F\\b~second line|||||F"
    seg = Segment.from_er7(text)
    assert seg.name == "OBX" and seg.to_er7() == text
    # read: parsed from the text, which stays
    assert seg.get(3, 2) == "Finding" and seg.get(5, 1, 1, 2) == "second line"
    assert seg[5] == Rep(("a|b", "second line")) and seg[12] is None
    assert seg.to_er7() is text
    # changed through a position: rendered from the fields again
    seg[10] = "C"  # the F
    assert seg.to_er7() == text[:-1] + "C"
    # changed through the list handed out: the same
    seg = Segment.from_er7(text)
    seg.fields[1] = "ST"
    assert seg.to_er7() == text.replace("|TX|", "|ST|")
    # replaced as a whole: the same
    seg = Segment.from_er7(text)
    seg.fields = ["2", None, "X^Y"]
    assert seg.to_er7() == "OBX|2||X\\S\\Y"
    with pytest.raises(ValueError):
        Segment.from_er7("pid|1")
    many = Segment.all_from_er7([text, "NTE|1||note"])
    assert [(s.name, s.to_er7()) for s in many] == [("OBX", text), ("NTE", "NTE|1||note")]
    assert many[1].get(3) == "note"
    with pytest.raises(ValueError):
        Segment.all_from_er7([text, "nte|1"])


def test_an_msh_made_from_its_text_keeps_its_positions():
    text = "MSH|^~\\&|APP|FAC|||20260102||ORU^R01^ORU_R01|C1||2.5.1"
    seg = Segment.from_er7(text)
    assert seg[1] == "|" and seg[2] == "^~\\&" and seg.get(3) == "APP"
    assert seg.get(9, 2) == "R01" and seg.get(12) == "2.5.1"
    assert seg.to_er7() == text
    seg[4] = "OTHER"
    assert seg.to_er7() == text.replace("|FAC|", "|OTHER|")
    assert Message([seg]).control_id == "C1"


def test_msh_serializes_its_separators_and_parses_back():
    msg = Message([Segment("MSH", {3: "APP", 9: ("ORU", "R01", "ORU_R01"), 10: "C1", 12: "2.5.1",
                                   18: "UNICODE UTF-8"}),
                   Segment("PID", {5: ("Müller", "Jörg")})])
    er7 = msg.to_er7()
    assert er7.startswith("MSH|^~\\&|APP||||||ORU^R01^ORU_R01|C1||2.5.1||||||UNICODE UTF-8\r")
    data = msg.encode()
    assert "Müller".encode() in data
    back = parse(data)
    assert back.control_id == "C1" and back.charset == "UNICODE UTF-8"
    assert back.segment("PID").get(5, 2) == "Jörg"
    assert back.to_er7() == er7


def test_encode_uses_the_charset_msh18_declares():
    msg = Message([Segment("MSH", {10: "1", 18: "8859/1"}), Segment("PID", {5: "Müller"})])
    assert b"M\xfcller" in msg.encode()
    msg.msh[18] = None
    with pytest.raises(UnicodeEncodeError):
        msg.encode()
    msg.msh[18] = "KLINGON"
    with pytest.raises(ValueError):
        msg.encode()


def test_parse_accepts_lf_and_rejects_non_hl7():
    back = parse("MSH|^~\\&|A\nMSA|AA|X1\n")
    assert back.segment("MSA").get(2) == "X1"
    with pytest.raises(ValueError):
        parse("HTTP/1.1 400 Bad Request\r\n")


def test_text_lines_are_tx_repetitions_without_trailing_spaces():
    assert text_lines("a  \r\n  b\rc\n\n") == Rep(("a", "  b", "c"))


def test_repr_never_shows_content():
    seg = Segment("PID", {5: "Zzcanary"})
    assert "Zzcanary" not in repr(seg) and "Zzcanary" not in repr(Message([seg]))


def test_charset_fallback_applies_only_when_the_declared_set_cannot_hold_the_text():
    greek = Message([Segment("MSH", {10: "1", 18: "8859/1"}), Segment("PID", {5: "Ωmega"})],
                    charset_fallback="UNICODE UTF-8")
    data = greek.encode()
    assert parse(data).charset == "UNICODE UTF-8" and "Ωmega".encode() in data
    latin = Message([Segment("MSH", {10: "1", 18: "8859/1"}), Segment("PID", {5: "Müller"})],
                    charset_fallback="UNICODE UTF-8")
    assert latin.charset == "8859/1" and b"M\xfcller" in latin.encode()


@given(st.text())
def test_escape_is_the_table_of_section_2_7(text):
    """escape() (chained replaces, for speed) maps every character as the HL7 §2.7 table
    model._ESCAPES says: delimiters to \\F\\ \\S\\ \\T\\ \\R\\ \\E\\, control characters to \\Xhh\\."""
    from nodes.hl7.model import _ESCAPES

    assert escape(text) == text.translate(_ESCAPES)


# -- rendered components (model._RENDERED) -----------------------------------------------------

_COMPONENT = st.one_of(st.none(), st.text(st.sampled_from("ab1 ^|&~\\\r"), max_size=4),
                       st.builds(Sub, st.lists(st.one_of(st.none(), st.text("ab&")),
                                               max_size=3)))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(*[_COMPONENT] * 3) | st.tuples(*[_COMPONENT] * 2), min_size=1,
                max_size=6),
       st.lists(st.tuples(*[_COMPONENT] * 3) | st.tuples(*[_COMPONENT] * 2), min_size=1,
                max_size=6))
def test_rendered_components_never_carry_one_message_into_the_next(first, second):
    """A tuple field renders the same whether or not another message's fields were
    rendered first (the cache is keyed by the texts, never by less)."""
    from nodes.hl7.model import _RENDERED, _single

    def render(fields):
        return Segment.from_fields("OBX", list(fields)).to_er7()

    _RENDERED.clear()
    alone = render(second)
    _RENDERED.clear()
    render(first)
    assert render(second) == alone
    # and each field is what the uncached component renderer gives
    assert [field_er7(v) for v in second] == [_single(v) for v in second]


def test_rendered_components_are_bounded():
    from nodes.hl7.model import _RENDERED

    for i in range(5000):
        assert field_er7((str(i), "x^y", "99X")) == f"{i}^x\\S\\y^99X"
    assert 0 < len(_RENDERED) <= 4096
