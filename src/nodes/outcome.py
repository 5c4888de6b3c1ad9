"""What became of one delivery attempt: the small pure API between senders and the Store.

A sending node (C-STORE, STOW-RS, MLLP, FHIR) decides only *which class* an attempt falls in;
the Store owns what happens next (commit the outcome, schedule the retry, dead-letter).

Every ``reason`` and ``detail`` is routing-safe text: status codes, error classes, peer
addresses. Never a patient name, ID, accession number or any dataset content.
"""

from __future__ import annotations

import msgspec


class Delivered(msgspec.Struct, frozen=True, tag="delivered"):
    """The peer has the object. ``detail`` records a warning worth auditing (e.g. 0xB000)."""

    detail: str = ""


class Transient(msgspec.Struct, frozen=True, tag="transient"):
    """Try again later. ``retry_after`` (seconds) is the peer's own hint, e.g. Retry-After."""

    reason: str
    retry_after: float | None = None


class Permanent(msgspec.Struct, frozen=True, tag="permanent"):
    """Retrying cannot help: the object is dead-lettered with ``reason``."""

    reason: str


class Skipped(msgspec.Struct, frozen=True, tag="skipped"):
    """Nothing to send in this lane (a routing filter or a handler said no). Final."""

    reason: str


Outcome = Delivered | Transient | Permanent | Skipped


def kind_of(outcome: Outcome) -> str:
    """The outcome's class as a word for logs and counters: ``delivered``, ``transient``,
    ``permanent`` or ``skipped`` (its msgspec tag)."""
    return outcome.__struct_config__.tag


def reason_of(outcome: Outcome) -> str:
    """The routing-safe text an outcome carries, for logs: a failure's or skip's ``reason``,
    a delivery's warning ``detail`` (empty when it has none)."""
    return outcome.detail if isinstance(outcome, Delivered) else outcome.reason
