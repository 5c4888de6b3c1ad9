"""Plain-Python nodes the runtime tests compose. No DICOM: the runtime must not need it."""

from __future__ import annotations

from collections import deque

import trio

from flow import Node, TcpTarget


class Feed(Node):
    """Source: sends the given items in order, then ends (which ends its lane), unless
    ``hold`` keeps it open until set. Stands in for a Store pump in node tests."""

    inputs = ()

    def __init__(self, items, *, hold: trio.Event | None = None, **kw) -> None:
        super().__init__(**kw)
        self.items = list(items)
        self.hold = hold

    async def run(self, ctx) -> None:
        while self.items:  # popped: a restarted Feed does not send an item twice
            await ctx.send(self.items.pop(0))
        if self.hold is not None:
            await self.hold.wait()


class Counter(Node):
    """Emits 0, 1, 2, ... (``limit`` items, or forever); counts what it produced."""

    inputs = ()

    def __init__(self, limit: int | None = None, **kw) -> None:
        super().__init__(**kw)
        self.limit = limit
        self.produced = 0

    async def run(self, ctx) -> None:
        while self.limit is None or self.produced < self.limit:
            await ctx.send(self.produced)
            self.produced += 1


class Pass(Node):
    async def run(self, ctx) -> None:
        async for item in ctx.receive():
            await ctx.send(item)


class Collect(Node):
    """Sink that records items; ``gate`` (if given) must be set before each item is taken."""

    outputs = ()

    def __init__(self, gate: trio.Event | None = None, **kw) -> None:
        super().__init__(**kw)
        self.items: list = []
        self.gate = gate
        self.arrived = trio.Event()

    async def run(self, ctx) -> None:
        async for item in ctx.receive():
            if self.gate is not None:
                await self.gate.wait()
            self.items.append(getattr(item, "value", item))
            ctx.release()
            self.arrived.set()


class MemoryDurable(Node):
    """Stands in for the Store in runtime tests: per-lane unbounded queues in memory.

    It honours the durable-node contract (its input never waits on any lane), which is all
    the runtime relies on; real durability is the Store's job (nodes.store).
    """

    durable = True
    outputs = ()

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.queues: dict[str, deque] = {}
        self.wakeups: dict[str, trio.Event] = {}
        self.done = False

    def branch(self, lane: str) -> Node:
        self.queues[lane] = deque()
        self.wakeups[lane] = trio.Event()
        return _LaneFeed(self, lane, name=f"{self.name}.{lane}")

    async def run(self, ctx) -> None:
        async for item in ctx.receive():
            for lane, q in self.queues.items():
                q.append(item)
                self.wakeups[lane].set()
            ctx.release()


class _LaneFeed(Node):
    inputs = ()

    def __init__(self, durable: MemoryDurable, lane: str, **kw) -> None:
        super().__init__(**kw)
        self.durable_node = durable
        self.lane = lane

    async def run(self, ctx) -> None:
        q = self.durable_node.queues[self.lane]
        while True:
            while q:
                await ctx.send(q.popleft())
            event = self.durable_node.wakeups[self.lane] = trio.Event()
            if not q:
                await event.wait()


class Item:
    """An item that records being abandoned by a crashing node."""

    def __init__(self, value) -> None:
        self.value = value
        self.abandoned: list[str] = []

    def abandon(self, error_class: str) -> None:
        self.abandoned.append(error_class)


class Crasher(Node):
    """Raises on every item whose value is in ``bad`` (or on every item if bad is None)."""

    outputs = ()

    def __init__(self, bad: set | None = None, **kw) -> None:
        super().__init__(**kw)
        self.bad = bad
        self.runs: list[float] = []
        self.seen: list = []

    async def run(self, ctx) -> None:
        self.runs.append(trio.current_time())
        async for item in ctx.receive():
            value = getattr(item, "value", item)
            if self.bad is None or value in self.bad:
                raise ValueError("synthetic failure")
            self.seen.append(value)
            ctx.release()


class Dialer(Node):
    """Declares an outbound TCP target, and checks it again when it 'connects'."""

    outputs = ()

    def __init__(self, host: str, port: int, **kw) -> None:
        super().__init__(**kw)
        self.target = TcpTarget(host, port)

    def egress(self):
        return [self.target]

    async def run(self, ctx) -> None:
        async for _ in ctx.receive():
            ctx.check_tcp(self.target.host, self.target.port)


class Ticker(Counter):
    """A source that emits one item every ``interval`` seconds, forever (a stand-in listener)."""

    def __init__(self, interval: float = 0.01, **kw) -> None:
        super().__init__(**kw)
        self.interval = interval

    async def run(self, ctx) -> None:
        while True:
            await ctx.send(self.produced)
            self.produced += 1
            await trio.sleep(self.interval)


class Stuck(Node):
    """A sink that takes one item and never finishes it (a send that hangs)."""

    outputs = ()

    async def run(self, ctx) -> None:
        async for _ in ctx.receive():
            await trio.sleep_forever()
