"""What a receiver hands to the Store: routing-safe envelope plus the object's bytes.

The envelope holds only routing-safe fields and may be stored and logged in clear. The
payload is PHI: the Store encrypts it at rest and nobody logs it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import trio

from .payload import Payload


class Envelope(msgspec.Struct, frozen=True):
    """Routing-safe facts about one received object (no PHI)."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    modality: str = ""
    calling_ae: str = ""
    called_ae: str = ""
    peer: str = ""
    received_at: float = 0.0


class StoreFailed(Exception):
    """The Store could not commit an arrival (its node crashed, or the write failed).

    The object is *not* acknowledged: a DICOM listener answers an error status and the
    sender keeps its copy. ``reason`` is routing-safe.
    """


class Receipt:
    """The Store's answer to one arrival, awaited by the receiver (commit-before-ack).

    The Store calls exactly one of :meth:`committed` or :meth:`failed`; the receiver awaits
    :meth:`wait`, which returns normally only after the commit, and raises
    :class:`StoreFull` or :class:`StoreFailed` otherwise. Trio-side object.

    ``notify``, if set, is called (in the Trio thread, once) when the answer is in: a
    receiver that waits in another thread sets its own wake-up there instead of running a
    Trio task per arrival to await :meth:`wait`.
    """

    __slots__ = ("_done", "error", "duplicate", "notify")

    def __init__(self) -> None:
        self._done = trio.Event()
        self.error: Exception | None = None
        self.duplicate = False
        self.notify: Callable[[], None] | None = None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def committed(self, *, duplicate: bool = False) -> None:
        if not self._done.is_set():
            self.duplicate = duplicate
            self._done.set()
            if self.notify is not None:
                self.notify()

    def failed(self, error: Exception) -> None:
        if not self._done.is_set():
            self.error = error
            self._done.set()
            if self.notify is not None:
                self.notify()

    async def wait(self) -> None:
        await self._done.wait()
        if self.error is not None:
            raise self.error


@dataclass(slots=True)
class Arrival:
    """One object to commit. ``payload`` is a complete Part 10 file exactly as received.

    A :class:`~nodes.payload.FilePayload` points at the receiver's temporary file: the Store
    copies (and encrypts) it into its own spool before the commit, and the receiver deletes
    its file after the commit returns.
    """

    envelope: Envelope
    payload: Payload
    receipt: Receipt = field(default_factory=Receipt)

    def abandon(self, error_class: str) -> None:
        """The Store node crashed holding this arrival: the receiver must not ack it."""
        self.receipt.failed(StoreFailed(f"store crashed: {error_class}"))


class StoreFull(Exception):
    """The Store refuses new arrivals for now (map or disk above its high-water mark).

    Transient by definition: a DICOM listener answers 0xA700 (Out of Resources) and the
    sender retries. Nothing already acknowledged is affected.
    """
