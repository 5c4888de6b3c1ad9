"""What a receiver hands to the Store: routing-safe envelope plus the object's bytes.

The envelope holds only routing-safe fields and may be stored and logged in clear. The
payload is PHI: the Store encrypts it at rest and nobody logs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from .payload import Payload


class Envelope(msgspec.Struct, frozen=True):
    """Routing-safe facts about one received object (no PHI)."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    calling_ae: str = ""
    called_ae: str = ""
    peer: str = ""
    received_at: float = 0.0


@dataclass(slots=True)
class Arrival:
    """One object to commit. ``payload`` is a complete Part 10 file exactly as received.

    A :class:`~nodes.payload.FilePayload` points at the receiver's temporary file: the Store
    copies (and encrypts) it into its own spool before the commit, and the receiver deletes
    its file after the commit returns.
    """

    envelope: Envelope
    payload: Payload


class StoreFull(Exception):
    """The Store refuses new arrivals for now (map or disk above its high-water mark).

    Transient by definition: a DICOM listener answers 0xA700 (Out of Resources) and the
    sender retries. Nothing already acknowledged is affected.
    """
