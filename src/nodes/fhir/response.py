"""A FHIR server's answer to a conditional update → the outcome class (pure, no I/O).

Only status codes and OperationOutcome *issue codes* (a closed FHIR value set) ever reach a
reason: ``diagnostics``, ``details.text`` and ``expression`` are free text a server may fill
with the resource it rejected, i.e. with PHI.
"""

from __future__ import annotations

import json
from typing import Any

from ..http import classify_http, parse_retry_after
from ..outcome import Delivered, Outcome, Transient

__all__ = ["ISSUE_TYPES", "classify_fhir", "parse_operation_outcome"]

# http://hl7.org/fhir/R4/valueset-issue-type.html — anything else is dropped, so a server
# cannot smuggle free text into a reason through the code element.
ISSUE_TYPES = frozenset({
    "invalid", "structure", "required", "value", "invariant", "security", "login", "unknown",
    "expired", "forbidden", "suppressed", "processing", "not-supported", "duplicate",
    "multiple-matches", "not-found", "deleted", "too-long", "code-invalid", "extension",
    "too-costly", "business-rule", "conflict", "transient", "lock-error", "no-store",
    "exception", "timeout", "incomplete", "throttled", "informational",
})
MAX_CODES = 8


def parse_operation_outcome(body: bytes | str | None) -> str:
    """The issue codes of an OperationOutcome body, comma-separated, in order, each once.

    ``"error:"``-style severities, diagnostics and any other text are never included. Returns
    ``""`` when the body is empty, not JSON, not an OperationOutcome or has no known codes.
    """
    if not body:
        return ""
    try:
        doc: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return ""
    if not isinstance(doc, dict) or doc.get("resourceType") != "OperationOutcome":
        return ""
    issues = doc.get("issue")
    if not isinstance(issues, list):
        return ""
    codes: dict[str, None] = {}
    for issue in issues:
        code = issue.get("code") if isinstance(issue, dict) else None
        if isinstance(code, str) and code in ISSUE_TYPES:
            codes[code] = None
        if len(codes) == MAX_CODES:
            break
    return ",".join(codes)


def classify_fhir(status: int, body: bytes | None = None, retry_after: str | None = None, *,
                  detail: str = "") -> Outcome:
    """Outcome of ``PUT ImagingStudy?identifier=…`` answered with ``status``.

    2xx (200 updated, 201 created) → Delivered(``detail``); 408/429/5xx → Transient with
    the Retry-After hint; 3xx and other 4xx (400, 404, 409, 412 several matches, 422
    unprocessable) → Permanent. Reasons are ``"HTTP <status>"`` plus, when the body is an
    OperationOutcome, ``"; OperationOutcome: <codes>"``.
    """
    outcome = classify_http(status, parse_retry_after(retry_after))
    if outcome is None:  # 1xx or beyond 599: not an answer we understand; ask again later
        return Transient(f"HTTP {status}: unexpected status")
    if isinstance(outcome, Delivered):
        return Delivered(detail)
    codes = parse_operation_outcome(body)
    if codes:
        reason = f"{outcome.reason}; OperationOutcome: {codes}"
        return (Transient(reason, outcome.retry_after) if isinstance(outcome, Transient)
                else type(outcome)(reason))
    return outcome
