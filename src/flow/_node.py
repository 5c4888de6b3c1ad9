"""Nodes: actors with declared ports, run by the supervisor in their own task.

A node subclasses :class:`Node`, declares its ports (``inputs``/``outputs``, one ``"in"`` and
one ``"out"`` by default) and implements ``async def run(self, ctx)``. Items arrive on
``ctx.receive()`` and leave through ``await ctx.send(item)``; both honour backpressure.

Contract with the supervisor:

- ``run`` returning normally means "finished" (e.g. the input reached end of stream): the
  node's output edges are closed and it is not restarted.
- ``run`` raising an :class:`Exception` means "crashed": the node is restarted with backoff
  (its edges stay open, queued items are kept), and an item it was holding is handed back via
  the item's ``abandon(error_class)`` method when it has one.
- Cancellation (shutdown, a failed lane) arrives as ``trio.Cancelled``: never catch it.
- Readiness: a node whose class sets ``signals_ready = True`` calls ``ctx.ready()`` once it
  serves (a listener: once its socket accepts). The graph counts as ready (what a service
  manager is told) when every such node has done so; nodes without the flag are ready once
  started.
"""

from __future__ import annotations

import abc
import inspect
import re
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import trio

from ._egress import EgressPolicy, Target
from ._log import Logger

if TYPE_CHECKING:
    from ._graph import Pipeline
    from ._metrics import Metric
    from ._supervisor import NodeHealth


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class Node(abc.ABC):
    """Base class of every node. Subclasses set ports and implement :meth:`run`.

    Class attributes:
        inputs / outputs: port names.
        durable: the node keeps what it receives durably and can feed several lanes
            independently; only a durable node may fan out (see :meth:`branch`).
        capacity: default capacity of the edges into this node.
        signals_ready: the node calls ``ctx.ready()`` once it serves; until then the graph
            is not ready (see the module docstring).
    """

    inputs: ClassVar[tuple[str, ...]] = ("in",)
    outputs: ClassVar[tuple[str, ...]] = ("out",)
    durable: ClassVar[bool] = False
    signals_ready: ClassVar[bool] = False
    capacity: int = 16

    def __init__(self, *, name: str | None = None, capacity: int | None = None) -> None:
        if name is not None:
            self._name = name
        if capacity is not None:
            if capacity < 1:
                raise ValueError("capacity must be at least 1")
            self.capacity = capacity

    @property
    def name(self) -> str:
        return self.__dict__.get("_name") or _snake(type(self).__name__)

    @name.setter
    def name(self, value: str) -> None:
        self._name = value

    # -- declared facts ---------------------------------------------------------------------

    def egress(self) -> Sequence[Target]:
        """Outbound targets this node connects to; checked against the allowlist."""
        return ()

    def branch(self, lane: str) -> "Node":
        """For durable nodes: the source node that feeds ``lane`` from durable storage."""
        raise TypeError(f"{type(self).__name__} is not durable and has no branches")

    def report(self) -> dict[str, Any] | None:
        """Routing-safe status for ``flow status`` (may be called from another process)."""
        return None

    # What the admin endpoint serves (flow._admin). Called on each request, from a worker
    # thread of the running graph's process: read current state, keep no copy for it.

    def metrics(self) -> "Iterable[Metric]":
        """Routing-safe figures for ``GET /metrics`` (see :class:`flow.Metric`)."""
        return ()

    def dead_letters(self, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` items this node gave up on, newest first: dicts with
        ``lane``, ``item`` (the key :meth:`trace` takes), ``reason`` and ``since`` (epoch
        seconds), plus any other routing-safe fields to show."""
        return []

    def trace(self, item: str) -> dict[str, Any] | None:
        """``item``'s journey through this node (routing-safe), or None if it knows none."""
        return None

    # -- behaviour --------------------------------------------------------------------------

    @abc.abstractmethod
    async def run(self, ctx: "Context") -> None:
        """The node's work; see the module docstring for the contract."""

    async def probe(self, ctx: "Context") -> dict[str, Any] | None:
        """Optional live check for ``flow check --probe`` (e.g. a C-ECHO). None: nothing to do.

        The result's ``ok`` (default true) decides the exit status; ``warnings`` (a list of
        routing-safe sentences) are printed one per line; the rest is printed as JSON."""
        return None

    # -- composition ------------------------------------------------------------------------

    def __rshift__(self, other: Any) -> "Pipeline":
        from ._graph import Pipeline

        return Pipeline.of(self) >> other

    def __rrshift__(self, other: Any) -> "Pipeline":
        from ._graph import Pipeline

        return Pipeline.of(other) >> self

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


async def _maybe_await(value: Any) -> None:
    if inspect.isawaitable(value):
        await value


class Context:
    """What a running node sees: its channels, logger, egress policy and health."""

    def __init__(self, node: Node, lane: str, inputs: dict[str, trio.MemoryReceiveChannel],
                 outputs: dict[str, trio.MemorySendChannel], log: Logger,
                 egress: EgressPolicy, health: "NodeHealth",
                 on_ready: Callable[[str], None] | None = None) -> None:
        self.node = node
        self.name = node.name
        self.lane = lane
        self.inputs = inputs
        self.outputs = outputs
        self.log = log
        self.egress = egress
        self.health = health
        self._on_ready = on_ready
        # Items this node received and has not passed on or released yet, by identity. A
        # crash hands each back via its ``abandon(error_class)`` (see the module docstring).
        self._held: dict[int, Any] = {}

    @property
    def held(self) -> list[Any]:
        return list(self._held.values())

    async def receive(self, port: str = "in") -> AsyncIterator[Any]:
        """Items from ``port`` until end of stream.

        Each item counts as held while the loop body runs for it; when the body moves on to
        the next item, the previous one counts as handled.
        """
        channel = self.inputs[port]
        async for item in channel:
            self._held[id(item)] = item
            yield item
            self._held.pop(id(item), None)

    async def receive_one(self, port: str = "in") -> Any:
        """One item (raises trio.EndOfChannel at end of stream). It counts as held until
        it is sent on or :meth:`release`-d: nodes that work on several items at once use this."""
        item = await self.inputs[port].receive()
        self._held[id(item)] = item
        return item

    async def send(self, item: Any, port: str = "out") -> None:
        """Pass ``item`` downstream; waits while the edge is full (backpressure)."""
        await self.outputs[port].send(item)
        self._held.pop(id(item), None)

    def release(self, item: Any = None) -> None:
        """``item`` (or every held item) is settled: a crash from now on does not abandon it."""
        if item is None:
            self._held.clear()
        else:
            self._held.pop(id(item), None)

    def ready(self) -> None:
        """The node serves now (for nodes with ``signals_ready``; idempotent)."""
        if self._on_ready is not None:
            self._on_ready(self.name)

    def check_tcp(self, host: str, port: int) -> None:
        """Connect-time egress check (raises :class:`~flow.EgressDenied`)."""
        self.egress.check_tcp(host, port, node=self.name)

    def check_http(self, url: str) -> None:
        self.egress.check_http(url, node=self.name)

    async def abandon_held(self, error_class: str) -> None:
        items, self._held = list(self._held.values()), {}
        for item in items:
            abandon = getattr(item, "abandon", None)
            if abandon is not None:
                await _maybe_await(abandon(error_class))
