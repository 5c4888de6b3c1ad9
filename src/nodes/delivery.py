"""What travels down a durable lane, and how a node says what became of it.

The Store's pump for a lane sends :class:`Delivery` items. Every node in the lane either
passes a delivery on (possibly :meth:`~Delivery.derive`-d with a new payload, e.g. an HL7
message made from an SR) or *settles* it with an :class:`~nodes.outcome.Outcome`. The last
node of a lane (a sender) always settles. Settling is how the Store learns to mark the object
delivered, schedule a retry, or dead-letter it; a delivery that is never settled is re-queued
when the process starts again (at-least-once).

A node that crashes while holding a delivery does not lose it: the supervisor calls
:meth:`Delivery.abandon`, which settles it as transient with the error class as reason.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .arrival import Envelope
from .outcome import Delivered, Outcome, Permanent, Skipped, Transient
from .payload import Payload

Settler = Callable[["Delivery", Outcome], Awaitable[None]]


class AlreadySettled(RuntimeError):
    """A delivery was settled twice: a node bug (the first outcome stands)."""


@dataclass(eq=False)
class _Settlement:
    settler: Settler
    outcome: Outcome | None = None


@dataclass(eq=False)
class Delivery:
    """One object on its way through one lane.

    Attributes:
        envelope: routing-safe facts (UIDs, AE titles); may be logged.
        payload: the bytes to send (Part 10 as stored, or what a mapper made of them). PHI.
        lane: the lane's name.
        attempt: 1 for the first try, 2 for the first retry, ...
        content_hash: hex digest of the stored object's bytes (the ledger's version key).
        notes: audit notes added on the way, e.g. ``"handler sr-report 1.1"``; recorded with
            the outcome and shown by ``flow trace``. Routing-safe text only.
        media_type: what ``payload`` holds: ``application/dicom`` or e.g. ``x-application/hl7-v2+er7``.
    """

    envelope: Envelope
    payload: Payload
    lane: str
    settle_with: Settler
    attempt: int = 1
    content_hash: str = ""
    notes: tuple[str, ...] = ()
    media_type: str = "application/dicom"
    _settlement: _Settlement = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._settlement = _Settlement(self.settle_with)

    @property
    def uid(self) -> str:
        return self.envelope.sop_instance_uid

    @property
    def outcome(self) -> Outcome | None:
        """The outcome, once settled (shared with every derived delivery)."""
        return self._settlement.outcome

    @property
    def settled(self) -> bool:
        return self._settlement.outcome is not None

    async def settle(self, outcome: Outcome) -> None:
        """Report what became of this delivery. Exactly once per delivery (and its derivations).

        Raises :class:`AlreadySettled` on a second call. The Store commits the outcome before
        this returns; cancellation while it runs leaves the delivery to be retried.
        """
        if self._settlement.outcome is not None:
            raise AlreadySettled(f"{self.uid} in lane {self.lane} was already settled")
        self._settlement.outcome = outcome
        try:
            await self._settlement.settler(self, outcome)
        except BaseException:
            self._settlement.outcome = None
            raise

    async def abandon(self, error_class: str) -> None:
        """Called by the supervisor when the node holding this delivery crashed."""
        if not self.settled:
            await self.settle(Transient(f"node crashed: {error_class}"))

    def derive(self, payload: Payload, *, note: str = "", media_type: str | None = None) -> "Delivery":
        """A delivery of new bytes standing for this one: settling either settles both."""
        child = Delivery(self.envelope, payload, self.lane, self.settle_with, self.attempt,
                         self.content_hash, self.notes + ((note,) if note else ()),
                         media_type or self.media_type)
        child._settlement = self._settlement
        return child


class Recorder:
    """A settler that keeps outcomes in memory: for tests and tools, not for production."""

    def __init__(self) -> None:
        self.outcomes: dict[str, Outcome] = {}
        self.notes: dict[str, tuple[str, ...]] = {}
        self.times: dict[str, float] = {}

    async def __call__(self, delivery: Delivery, outcome: Outcome) -> None:
        self.outcomes[delivery.uid] = outcome
        self.notes[delivery.uid] = delivery.notes
        self.times[delivery.uid] = time.monotonic()

    def delivery(self, envelope: Envelope, payload: Payload, lane: str = "test") -> Delivery:
        return Delivery(envelope, payload, lane, self)


__all__ = ["AlreadySettled", "Delivered", "Delivery", "Permanent", "Recorder", "Settler",
           "Skipped", "Transient"]
