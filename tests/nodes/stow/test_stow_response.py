"""STOW-RS response → one outcome per instance (pure; PS3.18 §10.5.3)."""

from __future__ import annotations

import json

import pytest

from nodes.outcome import Delivered, Permanent, Transient
from nodes.stow import parse_stow_response
from nodes.stow.response import failure_outcome, parse_body

A, B, C = "1.2.826.0.1.1", "1.2.826.0.1.2", "1.2.826.0.1.3"
CT = "1.2.840.10008.5.1.4.1.1.2"
JSON = "application/dicom+json"
XML = "application/dicom+xml"


def _item(uid, reason_tag=None, code=None):
    item = {"00081150": {"vr": "UI", "Value": [CT]}, "00081155": {"vr": "UI", "Value": [uid]}}
    if reason_tag:
        item[reason_tag] = {"vr": "US", "Value": [code]}
    return item


def json_body(failed=(), referenced=()):
    doc = {"00081190": {"vr": "UR", "Value": ["http://x/studies/1"]},
           "00081198": {"vr": "SQ", "Value": [_item(u, "00081197", c) for u, c in failed]}
           if failed else {"vr": "SQ"},
           "00081199": {"vr": "SQ", "Value": [_item(u, "00081196", c) if c is not None
                                              else _item(u) for u, c in referenced]}}
    return json.dumps(doc).encode()


def _xml_item(n, uid, reason_tag=None, code=None):
    extra = (f'<DicomAttribute tag="{reason_tag}" vr="US"><Value number="1">{code}</Value>'
             f'</DicomAttribute>') if reason_tag else ""
    return (f'<Item number="{n}"><DicomAttribute tag="00081150" vr="UI"><Value number="1">{CT}'
            f'</Value></DicomAttribute><DicomAttribute tag="00081155" vr="UI" '
            f'keyword="ReferencedSOPInstanceUID"><Value number="1">{uid}</Value>'
            f'</DicomAttribute>{extra}</Item>')


def xml_body(failed=(), referenced=()):
    f = "".join(_xml_item(i + 1, u, "00081197", c) for i, (u, c) in enumerate(failed))
    r = "".join(_xml_item(i + 1, u, "00081196", c) if c is not None else _xml_item(i + 1, u)
                for i, (u, c) in enumerate(referenced))
    return (f'<?xml version="1.0" encoding="utf-8"?><NativeDicomModel '
            f'xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM">'
            f'<DicomAttribute tag="00081198" vr="SQ" keyword="FailedSOPSequence">{f}'
            f'</DicomAttribute><DicomAttribute tag="00081199" vr="SQ">{r}</DicomAttribute>'
            f'</NativeDicomModel>').encode()


BODIES = [(JSON, json_body), (XML, xml_body)]


def test_200_delivers_all():
    assert parse_stow_response(200, None, b"", [A, B]) == [Delivered(), Delivered()]
    body = json_body(referenced=[(A, None), (B, None)])
    assert parse_stow_response(200, JSON, body, [A, B]) == [Delivered(), Delivered()]


@pytest.mark.parametrize("ctype,make", BODIES)
def test_202_settles_each_instance_from_the_sequences(ctype, make):
    body = make(failed=[(B, 0xA900)], referenced=[(A, None), (C, 0xB000)])
    assert parse_stow_response(202, ctype, body, [A, B, C]) == [
        Delivered(), Permanent("STOW failure reason 0xA900"),
        Delivered("STOW warning reason 0xB000")]


@pytest.mark.parametrize("ctype,make", BODIES)
def test_202_instance_in_neither_sequence_is_transient(ctype, make):
    body = make(referenced=[(A, None)])
    out = parse_stow_response(202, ctype, body, [A, B])
    assert out == [Delivered(), Transient("STOW 202: instance not in response")]


def test_202_without_a_readable_body_is_transient_for_all():
    for ctype, body in ((JSON, b"{not json"), (XML, b"<html>oops</html>"), (None, b"")):
        out = parse_stow_response(202, ctype, body, [A, B])
        assert all(isinstance(o, Transient) for o in out)


def test_out_of_resources_failure_is_transient():
    body = json_body(failed=[(A, 0xA700), (B, 0x0110)])
    assert parse_stow_response(202, JSON, body, [A, B]) == [
        Transient("STOW failure reason 0xA700"), Permanent("STOW failure reason 0x0110")]


def test_failed_item_without_reason_is_permanent():
    doc = {"00081198": {"vr": "SQ", "Value": [_item(A)]}}
    out = parse_stow_response(202, JSON, json.dumps(doc).encode(), [A])
    assert out == [Permanent("STOW failure reason unknown")]


def test_409_without_body_is_permanent_for_the_whole_batch():
    assert parse_stow_response(409, "text/plain", b"conflict", [A, B]) == \
        [Permanent("HTTP 409")] * 2


def test_409_body_dead_letters_only_the_listed_instance_and_keeps_stored_ones():
    body = json_body(failed=[(A, 0x0122)], referenced=[(C, None)])
    assert parse_stow_response(409, JSON, body, [A, B, C]) == [
        Permanent("STOW failure reason 0x0122"), Permanent("HTTP 409"), Delivered()]


def test_orthanc_400_after_storing_the_readable_parts():
    # Orthanc 1.10 + DICOMweb 1.7 answer 400 for a batch with an unreadable part, listing
    # the instances it *did* store in the Referenced SOP Sequence.
    body = json_body(referenced=[(B, None)])
    assert parse_stow_response(400, JSON, body, [A, B]) == [Permanent("HTTP 400"), Delivered()]


@pytest.mark.parametrize("status", [408, 429])
def test_408_429_transient_with_retry_after(status):
    assert parse_stow_response(status, None, b"", [A, B], retry_after=7.0) == \
        [Transient(f"HTTP {status}", 7.0)] * 2


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_5xx_transient(status):
    assert parse_stow_response(status, "text/html", b"<html/>", [A]) == \
        [Transient(f"HTTP {status}")]


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirects_are_permanent_and_body_is_ignored(status):
    body = json_body(referenced=[(A, None)])
    assert parse_stow_response(status, JSON, body, [A]) == \
        [Permanent(f"HTTP {status}: redirect not followed")]


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 415])
def test_other_4xx_permanent(status):
    assert parse_stow_response(status, None, b"", [A]) == [Permanent(f"HTTP {status}")]


def test_reasons_never_quote_the_response_text():
    body = json.dumps({"00081198": {"vr": "SQ", "Value": [
        {**_item(A, "00081197", 0xC000),
         "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Zzcanary^Phiprobe"}]}}]},
        "00404009": {"vr": "LO", "Value": ["Zzcanary^Phiprobe"]}}).encode()
    out = parse_stow_response(202, JSON, body, [A])
    assert out == [Permanent("STOW failure reason 0xC000")]
    assert "Zzcanary" not in repr(parse_stow_response(500, "text/plain",
                                                       b"Zzcanary^Phiprobe", [A]))


def test_json_array_form_and_lowercase_tags_are_understood():
    doc = [{"00081198": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [A]},
                                                "00081197": {"vr": "US", "Value": [272]}}]}}]
    parsed = parse_body(JSON, json.dumps(doc).encode())
    assert parsed is not None and parsed.failed == {A: 272}


def test_content_type_missing_is_sniffed():
    assert parse_body(None, xml_body(failed=[(A, 1)])).failed == {A: 1}
    assert parse_body("application/octet-stream", json_body(failed=[(A, 2)])).failed == {A: 2}


def test_xml_entities_are_not_expanded_into_a_bomb():
    bomb = (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa">'
            + b"".join(b'<!ENTITY a%d "&a%s;&a%s;&a%s;&a%s;&a%s;&a%s;&a%s;&a%s;&a%s;&a%s;">'
                       % (i, *([b"" if i == 1 else str(i - 1).encode()] * 10))
                       for i in range(1, 10))
            + b']><NativeDicomModel>&a9;</NativeDicomModel>')
    out = parse_stow_response(202, XML, bomb, [A])
    assert isinstance(out[0], Transient)


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_UIDS = [f"1.2.826.0.1.9.{i}" for i in range(8)]


@settings(max_examples=150, deadline=None)
@given(fate=st.lists(st.sampled_from(["failed", "referenced", "warned", "absent"]),
                     min_size=1, max_size=8),
       code=st.integers(0, 0xFFFF), status=st.sampled_from([200, 202, 400, 409, 503]),
       xml=st.booleans())
def test_every_instance_gets_the_outcome_its_entry_says(fate, code, status, xml):
    uids = _UIDS[:len(fate)]
    failed = [(u, code) for u, f in zip(uids, fate) if f == "failed"]
    referenced = [(u, 0xB000 if f == "warned" else None) for u, f in zip(uids, fate)
                  if f in ("referenced", "warned")]
    body = (xml_body if xml else json_body)(failed=failed, referenced=referenced)
    out = parse_stow_response(status, XML if xml else JSON, body, uids)
    assert len(out) == len(uids)
    for f, o in zip(fate, out):
        if f == "failed":
            assert o == failure_outcome(code) and f"0x{code:04X}" in o.reason
        elif f == "referenced":
            assert o == Delivered()
        elif f == "warned":
            assert o == Delivered("STOW warning reason 0xB000")
        else:
            assert o == {200: Delivered(), 202: Transient("STOW 202: instance not in response"),
                         400: Permanent("HTTP 400"), 409: Permanent("HTTP 409"),
                         503: Transient("HTTP 503")}[status]
