"""OperationOutcome parsing and FHIR outcome classes (pure)."""

from __future__ import annotations

import json

import pytest

from nodes.fhir import SearchError, classify_fhir, parse_operation_outcome, search_match
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


# -- the search for the current resource ------------------------------------------------------

def bundle(*entries, **extra) -> bytes:
    return json.dumps({"resourceType": "Bundle", "type": "searchset", **extra,
                       "entry": list(entries)}).encode()


def match(resource, mode="match"):
    return {"resource": resource, "search": {"mode": mode}}


STUDY_RESOURCE = {"resourceType": "ImagingStudy", "id": "1", "status": "available"}


def test_search_with_no_match_has_no_current_resource():
    assert search_match(bundle(total=0)) is None
    assert search_match(json.dumps({"resourceType": "Bundle", "type": "searchset"})) is None


def test_search_with_one_match_gives_it_and_ignores_outcomes_and_includes():
    warning = {"resourceType": "OperationOutcome", "issue": [{"code": "informational"}]}
    patient = {"resourceType": "Patient", "id": "p"}
    body = bundle(match(warning, "outcome"), match(STUDY_RESOURCE), match(patient, "include"),
                  total=1)
    assert search_match(body) == STUDY_RESOURCE


def test_an_entry_without_search_mode_counts_as_a_match():
    assert search_match(bundle({"resource": STUDY_RESOURCE})) == STUDY_RESOURCE
    with pytest.raises(SearchError, match="ambiguous: 2 ImagingStudy"):
        search_match(bundle(match(STUDY_RESOURCE), {"resource": STUDY_RESOURCE}))


@pytest.mark.parametrize("body, total, n", [((STUDY_RESOURCE, STUDY_RESOURCE), None, 2),
                                            ((STUDY_RESOURCE,), 3, 3)])
def test_more_than_one_match_is_ambiguous(body, total, n):
    extra = {} if total is None else {"total": total}
    with pytest.raises(SearchError) as raised:
        search_match(bundle(*map(match, body), **extra))
    assert str(raised.value) == f"ambiguous: {n} ImagingStudy resources match"


@pytest.mark.parametrize("body", [b"", b"<html>proxy</html>", b"[]", oo(issue("processing")),
                                  json.dumps(STUDY_RESOURCE).encode()])
def test_an_answer_that_is_not_a_bundle_is_refused_without_quoting_it(body):
    with pytest.raises(SearchError) as raised:
        search_match(body)
    assert str(raised.value) == "search: answer is not a FHIR Bundle"


def test_a_counted_match_missing_from_the_page_is_refused():
    with pytest.raises(SearchError, match="search: the match is not in the answer"):
        search_match(bundle(total=1))
