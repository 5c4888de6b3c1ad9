"""DIMSE outcome classification: every status range of the DESIGN.md table, no sockets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodes.dimse import classify_rejection, classify_status
from nodes.dimse.status import connection_failed, no_context
from nodes.outcome import Delivered, Permanent, Transient


def test_success_is_delivered_without_detail():
    assert classify_status(0x0000) == Delivered()


@pytest.mark.parametrize("code", [0xB000, 0xB006, 0xB007])
def test_warnings_are_delivered_and_audited(code):
    assert classify_status(code) == Delivered(f"C-STORE warning 0x{code:04X}")


@pytest.mark.parametrize("code", [0xA700, 0xA701, 0xA750, 0xA7FF])
def test_out_of_resources_is_transient(code):
    assert classify_status(code) == Transient(f"C-STORE status 0x{code:04X}")


@pytest.mark.parametrize("code", [0xA900, 0xA9FF, 0xC000, 0xC211, 0xCFFF, 0x0122, 0x0124])
def test_refusals_are_permanent_with_the_code_as_reason(code):
    assert classify_status(code) == Permanent(f"C-STORE status 0x{code:04X}")


@pytest.mark.parametrize("code", [0x0001, 0x0110, 0x0117, 0x0210, 0x0211, 0x0212, 0xA6FF, 0xA800,
                                  0xAA00, 0xB001, 0xBFFF, 0xD000, 0xFE00, 0xFF00, 0xFFFF])
def test_unknown_codes_are_transient_and_say_so(code):
    outcome = classify_status(code)
    assert isinstance(outcome, Transient)
    assert outcome.reason == f"C-STORE status 0x{code:04X} (unknown status, retried)"


@given(st.integers(min_value=0, max_value=0xFFFF))
def test_every_code_has_exactly_the_class_of_its_range(code):
    outcome = classify_status(code)
    if code == 0 or code in (0xB000, 0xB006, 0xB007):
        assert isinstance(outcome, Delivered)
    elif 0xA700 <= code <= 0xA7FF:
        assert isinstance(outcome, Transient) and "unknown" not in outcome.reason
    elif 0xA900 <= code <= 0xA9FF or 0xC000 <= code <= 0xCFFF or code in (0x0122, 0x0124):
        assert isinstance(outcome, Permanent)
    else:
        assert isinstance(outcome, Transient) and "unknown status" in outcome.reason
    assert f"0x{code:04X}" in (getattr(outcome, "reason", "") or getattr(outcome, "detail", "")
                               or "0x0000")


def test_rejections_follow_the_result_field():
    assert classify_rejection(1, 1, 3) == Permanent(
        "association rejected (permanent) result=1 source=1 reason=3")
    assert classify_rejection(2, 3, 1) == Transient(
        "association rejected (transient) result=2 source=3 reason=1")
    assert isinstance(classify_rejection(7, 1, 1), Transient)


def test_no_context_and_connection_failures():
    assert no_context("1.2.3", "1.2.840.10008.1.2.4.50") == Permanent(
        "no accepted presentation context for 1.2.3 in 1.2.840.10008.1.2.4.50")
    assert connection_failed("connection refused", "127.0.0.1", 11113) == Transient(
        "connection refused 127.0.0.1:11113")
    assert connection_failed("connection timed out", "::1", 104).reason == \
        "connection timed out [::1]:104"


def test_a_refused_transfer_syntax_is_named_with_what_the_peer_takes_instead():
    assert no_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.5",
                      ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]) == Permanent(
        "transfer syntax not accepted by the peer: RLE Lossless (1.2.840.10008.1.2.5) for "
        "CT Image Storage (1.2.840.10008.5.1.4.1.1.2); it accepts that SOP class only in "
        "Explicit VR Little Endian, Implicit VR Little Endian (objects are forwarded as "
        "received, never converted)")
