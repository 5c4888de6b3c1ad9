"""OperationOutcome parsing and FHIR outcome classes (pure)."""

from __future__ import annotations

import json

import pytest

from nodes.fhir import classify_fhir, parse_operation_outcome
from nodes.outcome import Delivered, Permanent, Transient
from support.synth import CANARY, CANARY_ID


def oo(*issues) -> bytes:
    return json.dumps({"resourceType": "OperationOutcome", "issue": list(issues)}).encode()


def issue(code, diagnostics=f"Patient {CANARY} ({CANARY_ID}) rejected"):
    return {"severity": "error", "code": code, "diagnostics": diagnostics,
            "details": {"text": CANARY}, "expression": [f"ImagingStudy.subject {CANARY_ID}"]}


def test_codes_only_never_diagnostics_text():
    body = oo(issue("processing"), issue("required"), issue("processing"))
    assert parse_operation_outcome(body) == "processing,required"


def test_unknown_or_non_string_codes_are_dropped():
    body = oo(issue(CANARY), issue(42), issue("multiple-matches"), {"code": None}, "junk")
    assert parse_operation_outcome(body) == "multiple-matches"


@pytest.mark.parametrize("body", [None, b"", b"not json", b"[]", b'{"resourceType":"Patient"}',
                                  b'{"resourceType":"OperationOutcome","issue":{}}',
                                  "\udcff".encode("utf-8", "surrogatepass")])
def test_bodies_that_are_not_an_operation_outcome_give_no_codes(body):
    assert parse_operation_outcome(body) == ""


def test_at_most_eight_codes():
    codes = ["invalid", "structure", "required", "value", "invariant", "security", "login",
             "unknown", "expired", "forbidden"]
    assert parse_operation_outcome(oo(*map(issue, codes))).split(",") == codes[:8]


@pytest.mark.parametrize("status", [200, 201])
def test_created_and_updated_are_delivered_with_the_detail(status):
    assert classify_fhir(status, b"{}", detail="handler x 1.0") == Delivered("handler x 1.0")


@pytest.mark.parametrize("status", [400, 404, 409, 412, 422])
def test_client_errors_are_permanent_with_the_issue_codes(status):
    out = classify_fhir(status, oo(issue("processing")))
    assert out == Permanent(f"HTTP {status}; OperationOutcome: processing")
    assert CANARY not in out.reason and CANARY_ID not in out.reason


def test_permanent_without_operation_outcome_names_the_status():
    assert classify_fhir(422, b"<html>oops</html>") == Permanent("HTTP 422")


@pytest.mark.parametrize("status, retry_after, expected", [
    (408, None, None), (429, "7", 7.0), (503, "120", 120.0), (500, None, None),
    (502, "soon", None),
])
def test_timeouts_throttling_and_server_errors_are_transient(status, retry_after, expected):
    out = classify_fhir(status, b"", retry_after)
    assert isinstance(out, Transient) and out.retry_after == expected
    assert out.reason == f"HTTP {status}"


def test_transient_keeps_issue_codes_and_retry_after():
    assert classify_fhir(503, oo(issue("transient")), "3") == Transient(
        "HTTP 503; OperationOutcome: transient", 3.0)


def test_redirects_are_permanent_and_unknown_statuses_transient():
    assert isinstance(classify_fhir(301), Permanent)
    assert isinstance(classify_fhir(199), Transient)
