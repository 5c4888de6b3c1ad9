"""What a STOW-RS answer means for each instance of the batch (PS3.18 §10.5.3). Pure.

:func:`parse_stow_response` maps ``(status, Content-Type, body, the batch's UIDs)`` to one
outcome per instance, in batch order. The rules (docs/operations-stow.md has the table):

1. 3xx: the whole batch is Permanent ("redirect not followed"); the body is not read.
2. A body that parses as a Store Instances Response (DICOM JSON ``application/dicom+json``
   or Native DICOM Model XML ``application/dicom+xml``) decides for every instance it lists,
   whatever the status: an instance in the Failed SOP Sequence (0008,1198) gets its Failure
   Reason (0008,1197) — Permanent "STOW failure reason 0xXXXX", except the "out of
   resources" family (0xA7xx, 0x0213), which is Transient; an instance only in the
   Referenced SOP Sequence (0008,1199) is Delivered, with "STOW warning reason 0xXXXX" as
   detail when a Warning Reason (0008,1196) is present. Honouring the lists for 4xx matters:
   Orthanc answers 400 for a batch with one unreadable part *after* storing the others,
   and a 409 body lists the instances that caused it.
3. Instances the body does not list (or all of them, without a readable body) follow the
   status: 200 → Delivered; 202 → Transient "not in response" (the server stored only part
   of the batch and did not say what became of this one; a retry is safe because storing
   the same SOP instance again is idempotent for STOW, and it is bounded by the Store's
   retry policy); 408/429 → Transient with Retry-After; other 4xx → Permanent "HTTP nnn";
   5xx → Transient; any other 2xx → Delivered.

Reasons hold status codes only, never response text (a server may echo dataset values).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ..http import classify_http
from ..outcome import Delivered, Outcome, Permanent, Transient

FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"


@dataclass
class StoreResponse:
    """The per-instance facts of a Store Instances Response."""

    failed: dict[str, int | None] = field(default_factory=dict)    # uid → Failure Reason
    referenced: dict[str, int | None] = field(default_factory=dict)  # uid → Warning Reason


def transient_failure(code: int) -> bool:
    """Failure reasons that mean "not now" rather than "never" (PS3.7 C.4.2, C.4.1 0x0213)."""
    return 0xA700 <= code <= 0xA7FF or code == 0x0213


def _code(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


# -- DICOM JSON (PS3.18 F.2) ------------------------------------------------------------------

def _json_first(item: dict[str, Any], tag: str) -> Any:
    attr = item.get(tag) or item.get(tag.lower())
    if not isinstance(attr, dict):
        return None
    values = attr.get("Value")
    return values[0] if isinstance(values, list) and values else None


def _json_items(dataset: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    attr = dataset.get(tag) or dataset.get(tag.lower())
    if not isinstance(attr, dict):
        return []
    values = attr.get("Value")
    return [v for v in values if isinstance(v, dict)] if isinstance(values, list) else []


def parse_json_body(body: bytes) -> StoreResponse:
    """Raises ValueError when ``body`` is not a DICOM JSON dataset (or an array of one)."""
    try:
        doc = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise ValueError("not JSON") from exc
    if isinstance(doc, list) and len(doc) == 1:
        doc = doc[0]
    if not isinstance(doc, dict):
        raise ValueError("not a DICOM JSON dataset")
    out = StoreResponse()
    for tag, reason_tag, into in ((FAILED_SOP_SEQUENCE, FAILURE_REASON, out.failed),
                                  (REFERENCED_SOP_SEQUENCE, WARNING_REASON, out.referenced)):
        for item in _json_items(doc, tag):
            uid = _json_first(item, REFERENCED_SOP_INSTANCE_UID)
            if isinstance(uid, str) and uid:
                into[uid.strip()] = _code(_json_first(item, reason_tag))
    return out


# -- Native DICOM Model XML (PS3.19 A.1) ------------------------------------------------------

def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _xml_children(element: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in element if _local(c.tag) == name]


def _xml_attribute(element: ET.Element, tag: str) -> ET.Element | None:
    for child in _xml_children(element, "DicomAttribute"):
        if child.get("tag", "").upper() == tag:
            return child
    return None


def _xml_first_value(element: ET.Element, tag: str) -> str | None:
    attr = _xml_attribute(element, tag)
    if attr is None:
        return None
    values = _xml_children(attr, "Value")
    return (values[0].text or "").strip() if values else None


def parse_xml_body(body: bytes) -> StoreResponse:
    """Raises ValueError when ``body`` is not a NativeDicomModel document.

    ElementTree does not fetch external entities, and the expat bundled with supported
    Pythons refuses entity-expansion bombs; the body size is capped by the caller.
    """
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise ValueError("not XML") from exc
    if _local(root.tag) != "NativeDicomModel":
        raise ValueError("not a NativeDicomModel document")
    out = StoreResponse()
    for tag, reason_tag, into in ((FAILED_SOP_SEQUENCE, FAILURE_REASON, out.failed),
                                  (REFERENCED_SOP_SEQUENCE, WARNING_REASON, out.referenced)):
        seq = _xml_attribute(root, tag)
        for item in _xml_children(seq, "Item") if seq is not None else ():
            uid = _xml_first_value(item, REFERENCED_SOP_INSTANCE_UID)
            if uid:
                into[uid] = _code(_xml_first_value(item, reason_tag))
    return out


def parse_body(content_type: str | None, body: bytes) -> StoreResponse | None:
    """The Store Instances Response in ``body``, or None when there is none to read."""
    if not body or not body.strip():
        return None
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if "xml" in kind:
        parse = parse_xml_body
    elif "json" in kind:
        parse = parse_json_body
    else:  # missing or generic type: sniff
        parse = parse_xml_body if body.lstrip()[:1] == b"<" else parse_json_body
    try:
        return parse(body)
    except ValueError:
        return None


# -- outcomes ---------------------------------------------------------------------------------

def failure_outcome(code: int | None) -> Outcome:
    if code is None:
        return Permanent("STOW failure reason unknown")
    reason = f"STOW failure reason 0x{code:04X}"
    return Transient(reason) if transient_failure(code) else Permanent(reason)


def _default(status: int, retry_after: float | None) -> Outcome:
    if status == 202:
        return Transient("STOW 202: instance not in response")
    outcome = classify_http(status, retry_after)
    return outcome if outcome is not None else Transient(f"HTTP {status}: unexpected status")


def parse_stow_response(status: int, content_type: str | None, body: bytes,
                        uids: Sequence[str], *, retry_after: float | None = None
                        ) -> list[Outcome]:
    """One outcome per entry of ``uids`` (the batch, in request order); see the module doc.

    ``uids`` should be distinct: the sender never puts one SOP Instance UID twice in a batch,
    because the response could not tell the two apart.
    """
    if 300 <= status < 400:
        return [classify_http(status)] * len(uids)  # type: ignore[list-item]
    parsed = parse_body(content_type, body)
    default = _default(status, retry_after)
    outcomes: list[Outcome] = []
    for uid in uids:
        if parsed is not None and uid in parsed.failed:
            outcomes.append(failure_outcome(parsed.failed[uid]))
        elif parsed is not None and uid in parsed.referenced:
            warning = parsed.referenced[uid]
            outcomes.append(Delivered(f"STOW warning reason 0x{warning:04X}")
                            if warning is not None else Delivered())
        else:
            outcomes.append(default)
    return outcomes
