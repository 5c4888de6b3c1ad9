"""DIMSE outcome classification (DESIGN.md, "DIMSE"): pure functions, no sockets.

=============================================================  ==========================
what happened                                                  class
=============================================================  ==========================
0x0000; 0xB000, 0xB006, 0xB007 (warnings)                      Delivered (warning audited)
0xA700–0xA7FF out of resources; connection refused, reset,     Transient
timeout, abort; association rejected-transient
0xA900–0xA9FF; 0xC000–0xCFFF; 0x0122; 0x0124; no accepted      Permanent (dead-letter)
presentation context (the object's transfer syntax named when
the peer takes its SOP class in others); association
rejected-permanent
any other status                                               Transient, reason says
                                                               "unknown status"
=============================================================  ==========================

Every reason is routing-safe: status codes, AE-level facts and peer addresses only.

The listener side answers with the codes in :data:`LISTENER_STATUS`.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from ..arrival import StoreFailed, StoreFull
from ..outcome import Delivered, Outcome, Permanent, Transient
from .contexts import uid_name

WARNINGS = frozenset({0xB000, 0xB006, 0xB007})
PERMANENT_CODES = frozenset({0x0122, 0x0124})

# What the listener answers (PS3.4 B.2.3): only STORED means "we have it".
STORED = 0x0000
OUT_OF_RESOURCES = 0xA700        # the Store is full: retry later
STORE_FAILED = 0xA701            # the Store could not commit (crash, I/O error): retry later
NOT_NOW = 0xA702                 # commit timed out or the listener is stopping: retry later
DATASET_MISMATCH = 0xA900        # data set's SOP Class/Instance UID differs from the command
CANNOT_UNDERSTAND = 0xC000       # data set could not be parsed: never committed

LISTENER_STATUS = {
    "stored": STORED, "store_full": OUT_OF_RESOURCES, "store_failed": STORE_FAILED,
    "not_now": NOT_NOW, "mismatch": DATASET_MISMATCH, "malformed": CANNOT_UNDERSTAND,
}


def hex_status(status: int) -> str:
    return f"0x{status:04X}"


def classify_status(status: int) -> Outcome:
    """The outcome of a C-STORE response status (see the module table)."""
    code = hex_status(status)
    if status == 0x0000:
        return Delivered()
    if status in WARNINGS:
        return Delivered(f"C-STORE warning {code}")
    if 0xA700 <= status <= 0xA7FF:
        return Transient(f"C-STORE status {code}")
    if 0xA900 <= status <= 0xA9FF or 0xC000 <= status <= 0xCFFF or status in PERMANENT_CODES:
        return Permanent(f"C-STORE status {code}")
    return Transient(f"C-STORE status {code} (unknown status, retried)")


_REJECT_RESULT = {1: "permanent", 2: "transient"}


def classify_rejection(result: int, source: int, reason: int) -> Outcome:
    """An A-ASSOCIATE-RJ: result 1 is permanent, 2 transient (PS3.8 9.3.4); an invalid
    result is treated as transient and says so."""
    kind = _REJECT_RESULT.get(result)
    text = (f"association rejected ({kind or 'unknown'}) "
            f"result={result} source={source} reason={reason}")
    return Permanent(text) if kind == "permanent" else Transient(text)


def no_context(sop_class_uid: str, transfer_syntax_uid: str,
               accepted_syntaxes: Sequence[str] = ()) -> Permanent:
    """The peer accepted no presentation context for this SOP class in this transfer syntax
    (objects are sent as received, so there is nothing to convert to).

    ``accepted_syntaxes``: the syntaxes the peer did accept for this SOP class. When there
    are some, the reason says it is the transfer syntax the peer refuses, naming it and the
    class (UID and name) and what the peer takes instead."""
    if not accepted_syntaxes:
        return Permanent(f"no accepted presentation context for {sop_class_uid} "
                         f"in {transfer_syntax_uid}")
    instead = ", ".join(uid_name(ts) for ts in accepted_syntaxes)
    return Permanent(f"transfer syntax not accepted by the peer: {uid_name(transfer_syntax_uid)} "
                     f"({transfer_syntax_uid}) for {uid_name(sop_class_uid)} ({sop_class_uid}); "
                     f"it accepts that SOP class only in {instead} (objects are forwarded as "
                     "received, never converted)")


def connection_failed(kind: str, host: str, port: int) -> Transient:
    """Refused, reset, timed out, TLS handshake failed, aborted: always transient.

    ``kind`` is a short routing-safe phrase, e.g. ``"connection refused"``."""
    return Transient(f"{kind} {_address(host, port)}")


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- what the listener answers ----------------------------------------------------------------


def commit_status(answered: bool, error: BaseException | None) -> int:
    """The C-STORE status for an arrival handed to the Store (:mod:`.handover`): STORED only
    when it was answered without error (committed); OUT_OF_RESOURCES when the Store is full;
    NOT_NOW when no answer came, the commit timed out or the listener is stopping (the
    sender keeps its copy and retries); STORE_FAILED for a Store failure and for anything
    unexpected (never Success without a commit)."""
    if not answered:
        return NOT_NOW
    if error is None:
        return STORED
    if isinstance(error, StoreFull):
        return OUT_OF_RESOURCES
    if isinstance(error, StoreFailed):
        return STORE_FAILED
    if isinstance(error, (trio.TooSlowError, trio.ClosedResourceError, trio.BrokenResourceError)):
        return NOT_NOW
    return STORE_FAILED


# A-ASSOCIATE-RJ (source, diagnostic) → the reason /metrics counts (PS3.8 9.3.4; what
# pynetdicom sends for require_calling_aet, require_called_aet, maximum_associations).
_REJECTIONS = {(1, 3): "calling_ae", (1, 7): "called_ae", (3, 2): "limit", (3, 1): "congestion"}


def rejection_reason(source: int | None, diagnostic: int | None) -> str:
    """Why an association was rejected, as /metrics counts it (``other`` when unknown)."""
    return _REJECTIONS.get((source, diagnostic), "other")
