"""The hand-over of arrivals from pynetdicom's threads to the Store, and back.

A C-STORE handler (a pynetdicom thread) calls :meth:`HandOver.commit`. While the Store
serves the edge's direct way (:class:`flow.Direct`; it does while it runs in this process),
the handler's thread commits the arrival itself and has its answer when the call returns
(:meth:`nodes.store.ingest.Ingest.commit_now`; no thread hop). Otherwise one
``run_sync_soon`` hands the arrival to the Trio thread, which puts it on the output channel
(or queues it, in order, while the channel is full); the handler thread then waits on a
plain ``threading.Event`` that the arrival's receipt sets when the Store answers (no Trio
task per object, no ``from_thread.run`` round trip). An arrival the Store has not answered
within ``commit_timeout_s`` is answered by the hand-over itself (``trio.TooSlowError``), as
is every arrival still waiting when the listener stops (``trio.ClosedResourceError``).
What the answer means as a DIMSE status is :func:`.status.commit_status`'s business.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import trio

from flow import NOT_SERVED, Direct

from ..arrival import Arrival


class Handover:
    """One C-STORE's arrival, waited for by its pynetdicom thread until the Store answers.

    ``done`` is set (in the Trio thread) by the arrival's receipt, or by :meth:`fail` when
    the hand-over answers itself: commit timeout (``deadline``, Trio clock), listener
    stopping, output channel gone. ``error`` is then the hand-over's reason."""

    __slots__ = ("arrival", "done", "error", "deadline", "_waiting")

    def __init__(self, arrival: Arrival) -> None:
        self.arrival = arrival
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.deadline = 0.0
        self._waiting: dict[Handover, None] | None = None
        arrival.receipt.notify = self._answered

    def wait_in(self, waiting: dict[Handover, None], deadline: float) -> None:
        self.deadline = deadline
        self._waiting = waiting
        waiting[self] = None

    def fail(self, error: BaseException) -> None:
        if not self.arrival.receipt.done and self.error is None:
            self.error = error
        self._answered()

    def _answered(self) -> None:
        if self._waiting is not None:
            self._waiting.pop(self, None)
        self.done.set()


class HandOver:
    """The arrivals between pynetdicom's threads and the output channel ``send``.

    ``backlog``: handed over while the channel was full, for :meth:`_pump`; ``waiting``:
    handed over and not answered, in deadline order. :meth:`run` (a Trio task) must run for
    arrivals to be pumped and expired; :meth:`close` answers everything left.
    """

    def __init__(self, commit_timeout_s: float) -> None:
        self.commit_timeout_s = commit_timeout_s
        self.token: trio.lowlevel.TrioToken | None = None
        self.send: trio.MemorySendChannel | None = None
        self.direct: Direct | None = None
        self.backlog: deque[Handover] = deque()
        self.waiting: dict[Handover, None] = {}
        self._backlog_grew = trio.Event()
        self._waiting_grew = trio.Event()

    def start(self, send: trio.MemorySendChannel, direct: Direct | None = None) -> None:
        """From the Trio thread: hand arrivals to ``send`` from now on, or commit them in
        the handler's thread through ``direct`` while the Store serves it."""
        self.token = trio.lowlevel.current_trio_token()
        self.send = send
        self.direct = direct

    # -- the handler's thread ------------------------------------------------------------------

    def commit(self, arrival: Arrival) -> tuple[bool, BaseException | None]:
        """Blocking (a pynetdicom thread): hand ``arrival`` over and wait for its answer.
        Returns (answered at all, the error: None once committed)."""
        direct = self.direct
        if direct is not None and self.send is not None:
            try:
                error = direct.call(arrival, self.commit_timeout_s)
            except Exception as exc:  # answered as a Store failure (commit_status)
                return True, exc
            if error is not NOT_SERVED:
                return True, error
        handover = Handover(arrival)
        try:
            assert self.token is not None
            self.token.run_sync_soon(self._hand_over, handover)
            # The Trio side answers after commit_timeout_s; the margin covers scheduling.
            answered = handover.done.wait(self.commit_timeout_s + 5)
        except trio.RunFinishedError:
            answered = False
        if not answered:
            return False, None
        return True, handover.error if handover.error is not None else arrival.receipt.error

    # -- the Trio side -------------------------------------------------------------------------

    def _hand_over(self, handover: Handover) -> None:
        """Trio thread (run_sync_soon): put the arrival on the output channel, or queue it
        for :meth:`_pump` while the channel is full (keeping the order), or answer at once
        when the listener is stopping. From here, :meth:`_expire` answers it if the Store
        has not answered within commit_timeout_s."""
        send = self.send
        if send is None:
            handover.fail(trio.ClosedResourceError("listener stopped"))
            return
        if not self.waiting:
            self._waiting_grew.set()
        handover.wait_in(self.waiting, trio.current_time() + self.commit_timeout_s)
        if not self.backlog:
            try:
                send.send_nowait(handover.arrival)
                return
            except trio.WouldBlock:
                pass
            except (trio.ClosedResourceError, trio.BrokenResourceError) as exc:
                handover.fail(exc)
                return
        self.backlog.append(handover)
        self._backlog_grew.set()

    async def _pump(self) -> None:
        """Send queued arrivals as the channel makes room, each until its deadline."""
        while True:
            await self._backlog_grew.wait()
            self._backlog_grew = trio.Event()
            while self.backlog:
                handover = self.backlog.popleft()
                if handover.done.is_set():  # expired while queued
                    continue
                send = self.send
                if send is None:
                    handover.fail(trio.ClosedResourceError("listener stopped"))
                    continue
                with trio.move_on_at(handover.deadline):
                    try:
                        await send.send(handover.arrival)
                    except (trio.ClosedResourceError, trio.BrokenResourceError) as exc:
                        handover.fail(exc)
                    continue
                handover.fail(trio.TooSlowError())  # never reached the Store

    async def _expire(self) -> None:
        """Answer every arrival the Store has not answered by its deadline (the Store may
        still commit it: at-least-once, and a re-send is a duplicate)."""
        waiting = self.waiting
        while True:
            if not waiting:
                await self._waiting_grew.wait()
                self._waiting_grew = trio.Event()
                continue
            first = next(iter(waiting))  # deadlines grow in the order of insertion
            if first.deadline <= trio.current_time():
                first.fail(trio.TooSlowError())
            else:
                await trio.sleep_until(first.deadline)

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """:meth:`_pump` and :meth:`_expire`, shielded: during a graceful stop the
        associations still draining get their objects committed; the caller cancels the
        scope passed to ``task_status`` once the drain is over."""
        with trio.CancelScope(shield=True) as scope:
            task_status.started(scope)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump)
                nursery.start_soon(self._expire)

    def stop_sending(self) -> None:
        """Arrivals handed over from now on are answered at once (listener stopped)."""
        self.send = None

    def close(self) -> None:
        """After the drain: every arrival still waiting is answered (listener stopped)."""
        for handover in list(self.backlog) + list(self.waiting):
            handover.fail(trio.ClosedResourceError("listener stopped"))
        self.backlog.clear()
