"""A FHIR server's answers (the search for a study's resource, its conditional update) →
what they mean: the current resource, or the outcome class (pure, no I/O).

Only status codes and OperationOutcome *issue codes* (a closed FHIR value set) ever reach a
reason: ``diagnostics``, ``details.text`` and ``expression`` are free text a server may fill
with the resource it rejected, i.e. with PHI.
"""

from __future__ import annotations

import json
from typing import Any

from ..http import classify_http, parse_retry_after
from ..outcome import Delivered, Outcome, Transient

__all__ = ["ISSUE_TYPES", "SearchError", "classify_fhir", "parse_operation_outcome",
           "search_match"]

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


class SearchError(ValueError):
    """A search answer that cannot tell the current resource (message is routing-safe)."""


def search_match(body: bytes | str | None) -> dict[str, Any] | None:
    """The one ImagingStudy a searchset Bundle matched, or None when it matched none.

    Entries whose ``search.mode`` is ``include`` or ``outcome`` (a server's warnings) and
    resources of other types are not matches. A ``total`` larger than the matches on this
    page counts too. Raises :class:`SearchError` ``"search: answer is not a FHIR Bundle"``
    when the body is not a Bundle, and ``"ambiguous: N ImagingStudy resources match"``
    when more than one does (the conditional update would be refused with 412 as well).
    """
    try:
        doc: Any = json.loads(body or b"")
    except (ValueError, UnicodeDecodeError):
        doc = None
    if not isinstance(doc, dict) or doc.get("resourceType") != "Bundle":
        raise SearchError("search: answer is not a FHIR Bundle")
    entries = doc.get("entry")
    matches = []
    for entry in entries if isinstance(entries, list) else ():
        if not isinstance(entry, dict):
            continue
        resource, search = entry.get("resource"), entry.get("search")
        mode = search.get("mode", "match") if isinstance(search, dict) else "match"
        if (isinstance(resource, dict) and resource.get("resourceType") == "ImagingStudy"
                and mode == "match"):
            matches.append(resource)
    total = doc.get("total")
    count = max(len(matches), total if isinstance(total, int) and not isinstance(
        total, bool) else 0)
    if count > 1:
        raise SearchError(f"ambiguous: {count} ImagingStudy resources match")
    if count == 1 and not matches:
        raise SearchError("search: the match is not in the answer")
    return matches[0] if matches else None
