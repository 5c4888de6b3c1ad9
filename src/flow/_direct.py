"""A way round an edge's channel for an upstream node that works in threads of its own.

An edge's channel costs an upstream node whose work runs in a thread of its own (a
listener's connection threads) two thread hops per item and per answer: the item goes to the
Trio thread, the downstream node takes it there and hands the blocking part of its work to a
worker thread, and the answer comes back the same way. When the downstream node can do its
work for one item in the caller's thread, it *serves* the edge's :class:`Direct`: while it
serves, the upstream node's thread calls it and gets the answer back in one blocking call,
with no hop. The channel stays: items go through it whenever the node does not serve
(before it started, while it restarts after a crash, once it stopped).

Contract: the downstream node serves only from inside its ``run`` (``ctx.serve_direct``),
so a node that is not running is never called; when it stops serving (its run ends, a
crash, a cancellation) it first waits until every call in progress has returned, so that
what the calls use (a database it closes after ``run``) outlives them. A call that raises
raises in the caller's thread: the caller answers for its item as it would for a failure
downstream.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

NOT_SERVED = object()  # what Direct.call returns while no node serves: send on the channel


class Direct:
    """One edge's direct way, shared by every upstream node of the edge's input port."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fn: Callable[..., Any] | None = None
        self._calls = 0  # calls in progress
        self._drained: trio.Event | None = None  # set once the last call returned, after a stop
        self._token: trio.lowlevel.TrioToken | None = None

    @property
    def served(self) -> bool:
        return self._fn is not None

    def call(self, *args: Any) -> Any:
        """Blocking, from any thread but the Trio thread: the serving node's function applied
        to ``args``, or :data:`NOT_SERVED` when no node serves now."""
        with self._lock:
            fn = self._fn
            if fn is None:
                return NOT_SERVED
            self._calls += 1
        try:
            return fn(*args)
        finally:
            with self._lock:
                self._calls -= 1
                drained = self._drained if self._calls == 0 and self._fn is None else None
            if drained is not None and self._token is not None:
                try:
                    self._token.run_sync_soon(drained.set)
                except trio.RunFinishedError:
                    pass

    @asynccontextmanager
    async def serving(self, fn: Callable[..., Any]) -> AsyncIterator[None]:
        """Calls reach ``fn`` (in the caller's thread) inside the block; on leaving it, no
        new call does and the block waits (shielded) for those in progress to return."""
        with self._lock:
            if self._fn is not None:
                raise RuntimeError("this edge is served already")
            self._fn, self._drained = fn, None
            self._token = trio.lowlevel.current_trio_token()
        try:
            yield
        finally:
            with self._lock:
                self._fn = None
                drained = self._drained = trio.Event() if self._calls else None
            if drained is not None:
                with trio.CancelScope(shield=True):
                    await drained.wait()
