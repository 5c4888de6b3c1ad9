"""A lane's queue as its pump sees it, and the pump that feeds the lane from it.

:class:`LaneQueue` is everything a lane needs from its durable queue: claim what is due,
give back what never reached the lane, settle an outcome (the queue decides retry schedule
and dead-letter), and wait until work may be due. :class:`~.ledger.LaneLedger` implements
it on the Store's LMDB environment; a queue on a message broker would implement the same
four calls.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import trio

from flow import Context, Node

from ..delivery import Delivery
from ..outcome import Outcome


class Claim(NamedTuple):
    """What one claim handed out: the deliveries, now in flight, and when the lane's next
    waiting item is due (None: nothing else waits)."""

    deliveries: list[Delivery]
    next_due: float | None


class LaneQueue(Protocol):
    """The durable queue of one or more lanes, as the lanes' pumps use it."""

    async def claim(self, lane: str, limit: int) -> Claim:
        """Hand out up to ``limit`` due items of ``lane`` as deliveries, marked in flight
        (each is settled through :meth:`Delivery.settle`)."""
        ...

    async def unclaim(self, lane: str, deliveries: list[Delivery]) -> None:
        """Put claimed deliveries that never reached the lane back at the head of its
        queue."""
        ...

    async def settle(self, delivery: Delivery, outcome: Outcome) -> None:
        """Commit what became of a claimed delivery (each delivery settles through the
        queue that handed it out, via :meth:`Delivery.settle`)."""
        ...

    async def idle(self, lane: str, next_due: float | None) -> None:
        """Wait until work may be due on ``lane``: new work (committed in this process, or
        announced by another: the backend's own wake-up), ``next_due``, or a bounded poll
        for work no one announced."""
        ...


class LanePump(Node):
    """Source node of one lane: feeds the lane's durable queue into ``out``.

    Claims as many due items as the channel has room for (at least one, waiting for room),
    so the lane's bounded channel is the only buffer in memory. Items claimed but not yet
    handed over when the pump is cancelled go back to the head of the queue.
    """

    inputs = ()
    outputs = ("out",)

    def __init__(self, queue: LaneQueue, lane: str, *, name: str) -> None:
        super().__init__(name=name)
        self.queue = queue
        self.lane = lane

    async def run(self, ctx: Context) -> None:
        out = ctx.outputs["out"]
        while True:
            stats = out.statistics()
            room = stats.max_buffer_size - stats.current_buffer_used
            limit = max(1, min(int(room) if room != float("inf") else 64, 256))
            deliveries, next_due = await self.queue.claim(self.lane, limit)
            if not deliveries:
                await self.queue.idle(self.lane, next_due)
                continue
            pending = list(deliveries)
            try:
                while pending:
                    await ctx.send(pending[0])
                    pending.pop(0)
            finally:
                if pending:
                    with trio.CancelScope(shield=True):
                        await self.queue.unclaim(self.lane, pending)
