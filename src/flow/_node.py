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

Composition: ``a >> b`` joins the free output of ``a`` to the free input of ``b`` and returns
a :class:`Pipeline`, a graph fragment under construction (a mapping or list on the right is
a fan-out into lanes); :class:`~flow.Graph` validates the whole.
"""

from __future__ import annotations

import abc
import inspect
import re
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar

import trio

from ._direct import Direct
from ._egress import EgressPolicy, Target
from ._errors import GraphError
from ._health import NodeHealth
from ._log import Logger
from ._metrics import Metric
from ._placement import Placement


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
        replicas: when the graph runs in several processes, how many processes run this
            node's lane side by side (a listener sharing its port with SO_REUSEPORT); the
            lane's count is the highest of its nodes'. 1 in one-process mode.
    """

    inputs: ClassVar[tuple[str, ...]] = ("in",)
    outputs: ClassVar[tuple[str, ...]] = ("out",)
    durable: ClassVar[bool] = False
    signals_ready: ClassVar[bool] = False
    capacity: int = 16
    replicas: int = 1
    placement: Placement = Placement()

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

    def place(self, placement: Placement) -> None:
        """Where this node runs (before ``open()``; see :mod:`flow._placement`). A node that
        does something only once per graph, or only for the lanes of this process, reads
        ``self.placement``; overriding methods call ``super().place(placement)``."""
        self.placement = placement

    def report(self) -> dict[str, Any] | None:
        """Routing-safe status for ``flow status`` (may be called from another process)."""
        return None

    # What the admin endpoint serves (flow._admin). Called on each request, from a worker
    # thread of the running graph's process: read current state, keep no copy for it.

    def metrics(self) -> Iterable[Metric]:
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
        return Pipeline.of(self) >> other

    def __rrshift__(self, other: Any) -> "Pipeline":
        return Pipeline.of(other) >> self

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


# -- composition: what ``>>`` builds (beside Node: each of the two makes the other) -----


@dataclass(frozen=True, slots=True)
class Edge:
    src: Node
    src_port: str
    dst: Node
    dst_port: str

    def __str__(self) -> str:
        return f"{self.src.name}.{self.src_port} -> {self.dst.name}.{self.dst_port}"


@dataclass(slots=True)
class FanOut:
    durable: Node
    branches: dict[str, "Pipeline"]


@dataclass(slots=True)
class Pipeline:
    """A fragment of a graph under construction (what ``>>`` returns)."""

    nodes: list[Node] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)
    fanouts: list[FanOut] = field(default_factory=list)
    head: Node | None = None
    tail: Node | None = None

    @classmethod
    def of(cls, part: Any) -> "Pipeline":
        if isinstance(part, Pipeline):
            return part
        if isinstance(part, Node):
            return cls([part], head=part, tail=part)
        raise GraphError(f"cannot use {type(part).__name__} in a graph: expected a Node, "
                         "a pipeline (a >> b), or a mapping of lane name to branch")

    def __rshift__(self, other: Any) -> "Pipeline":
        if self.tail is None:
            raise GraphError("nothing can follow a fan-out: put the rest inside its branches")
        if isinstance(other, Mapping | list | tuple):
            return self._fan_out(other)
        right = Pipeline.of(other)
        if right.head is None:
            raise GraphError("the right side of >> has no input port")
        # A durable node followed by one branch is a one-lane fan-out named after that branch.
        if self.tail.durable:
            return self._fan_out({right.head.name: right})
        src_port = free_port(self.tail, self.tail.outputs, self.edges, output=True)
        dst_port = free_port(right.head, right.head.inputs, right.edges, output=False)
        edge = Edge(self.tail, src_port, right.head, dst_port)
        return Pipeline(merge_nodes(self.nodes, right.nodes), [*self.edges, *right.edges, edge],
                        [*self.fanouts, *right.fanouts], self.head, right.tail)

    def __rrshift__(self, other: Any) -> "Pipeline":
        return Pipeline.of(other) >> self

    def _fan_out(self, branches: Mapping[str, Any] | Sequence[Any]) -> "Pipeline":
        tail = self.tail
        assert tail is not None
        if not tail.durable:
            raise GraphError(
                f"node {tail.name!r} fans out but is not durable: a slow lane would block its "
                "siblings through the shared memory edge; put a durable node (a Store) first")
        if isinstance(branches, Mapping):
            named = {str(k): Pipeline.of(v) for k, v in branches.items()}
        else:
            named = {}
            for part in branches:
                p = Pipeline.of(part)
                if p.head is None:
                    raise GraphError("a fan-out branch has no input port")
                named[p.head.name] = p
        if not named:
            raise GraphError(f"node {tail.name!r} fans out to no branch")
        nodes = list(self.nodes)
        edges = list(self.edges)
        fanouts = [*self.fanouts, FanOut(tail, named)]
        for pipeline in named.values():
            nodes = merge_nodes(nodes, pipeline.nodes)
            edges.extend(pipeline.edges)
            fanouts.extend(pipeline.fanouts)
        return Pipeline(nodes, edges, fanouts, self.head, None)


def merge_nodes(a: list[Node], b: list[Node]) -> list[Node]:
    seen = {id(n) for n in a}
    return a + [n for n in b if id(n) not in seen]


def free_port(node: Node, ports: Sequence[str], edges: list[Edge], *, output: bool) -> str:
    used = {e.src_port for e in edges if e.src is node} if output else \
        {e.dst_port for e in edges if e.dst is node}
    for port in ports:
        if port not in used:
            return port
    kind = "output" if output else "input"
    if not ports:
        raise GraphError(f"node {node.name!r} has no {kind} port to connect")
    raise GraphError(f"node {node.name!r} has no free {kind} port (all of {list(ports)} "
                     "are connected)")


async def _maybe_await(value: Any) -> None:
    if inspect.isawaitable(value):
        await value


class Context:
    """What a running node sees: its channels, logger, egress policy and health."""

    def __init__(self, node: Node, lane: str, inputs: dict[str, trio.MemoryReceiveChannel],
                 outputs: dict[str, trio.MemorySendChannel], log: Logger,
                 egress: EgressPolicy, health: NodeHealth,
                 on_ready: Callable[[str], None] | None = None,
                 direct: tuple[dict[str, Direct], dict[str, Direct]] | None = None) -> None:
        self.node = node
        self.name = node.name
        self.lane = lane
        self.inputs = inputs
        self.outputs = outputs
        self.log = log
        self.egress = egress
        self.health = health
        self._on_ready = on_ready
        self._direct_in, self._direct_out = direct or ({}, {})
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

    def receive_ready(self, limit: int, port: str = "in") -> list[Any]:
        """Up to ``limit`` items already waiting on ``port``, without waiting: fewer, or
        none, when fewer wait or the stream has ended. Each counts as held, as with
        :meth:`receive_one`: a node that takes several at once works off what has queued."""
        channel = self.inputs[port]
        items: list[Any] = []
        while len(items) < limit:
            try:
                item = channel.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            self._held[id(item)] = item
            items.append(item)
        return items

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

    def direct(self, port: str = "out") -> Direct | None:
        """The direct way of output ``port``'s edge (:mod:`flow._direct`): a thread of this
        node hands an item to the downstream node with ``.call(...)``, and sends it on the
        channel when that returns ``NOT_SERVED``. None: the port has no edge here."""
        return self._direct_out.get(port)

    def serve_direct(self, fn: Callable[..., Any],
                     port: str = "in") -> AbstractAsyncContextManager[None]:
        """``async with ctx.serve_direct(fn):`` upstream threads' direct calls on input
        ``port``'s edge run ``fn`` in their thread inside the block; leaving it waits for the
        calls in progress (:meth:`flow._direct.Direct.serving`)."""
        direct = self._direct_in.get(port)
        return direct.serving(fn) if direct is not None else nullcontext()

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
