"""An edge's direct way (flow.Direct): an upstream node's thread hands an item to the
downstream node and has its answer in one call while that node serves, and sends on the
channel otherwise; a node that stops serving waits for the calls in progress."""

from __future__ import annotations

import threading

import trio

import flow
from flow import NOT_SERVED, Direct, Graph, Node


async def test_a_call_runs_in_the_callers_thread_only_while_the_node_serves():
    direct = Direct()
    seen: list[int] = []

    def double(x: int) -> int:
        seen.append(threading.get_ident())
        return 2 * x

    assert await trio.to_thread.run_sync(direct.call, 1) is NOT_SERVED
    async with direct.serving(double):
        assert direct.served
        caller = await trio.to_thread.run_sync(lambda: (direct.call(21), threading.get_ident()))
    assert caller[0] == 42 and seen == [caller[1]] != [threading.get_ident()]
    assert not direct.served and await trio.to_thread.run_sync(direct.call, 1) is NOT_SERVED


async def test_a_node_stops_serving_only_after_its_calls_returned():
    direct = Direct()
    entered, release = threading.Event(), threading.Event()
    stopped = trio.Event()
    answers: list = []

    def slow(x: int) -> int:
        entered.set()
        release.wait(10)
        return x

    async def node():
        async with direct.serving(slow):
            await trio.sleep_forever()

    async def call(x: int) -> None:
        answers.append(await trio.to_thread.run_sync(direct.call, x))

    with trio.fail_after(20):
        async with trio.open_nursery() as outer:
            scope = trio.CancelScope()

            async def run_node():
                with scope:
                    await node()
                stopped.set()

            outer.start_soon(run_node)
            while not direct.served:
                await trio.sleep(0.01)
            outer.start_soon(call, 1)
            await trio.to_thread.run_sync(entered.wait, 10)
            scope.cancel()  # the node stops while a call is in progress
            await trio.sleep(0.2)
            assert not stopped.is_set() and answers == []
            assert await trio.to_thread.run_sync(direct.call, 2) is NOT_SERVED
            release.set()
            await stopped.wait()
    assert answers == [1]


class ThreadedSource(Node):
    """Hands ``items`` over from a thread of its own: directly while the sink serves (each
    answer kept), else on the channel."""

    inputs = ()

    def __init__(self, items: list[int]) -> None:
        super().__init__(name="source")
        self.items = items
        self.answers: list = []

    async def run(self, ctx):
        direct = ctx.direct()
        for item in self.items:
            answer = await trio.to_thread.run_sync(direct.call, item)
            self.answers.append(answer)
            if answer is NOT_SERVED:
                await ctx.send(item)


class Sink(Node):
    """Serves its input's direct way after ``serve_after`` items came on the channel."""

    outputs = ()

    def __init__(self, serve_after: int) -> None:
        super().__init__(name="sink")
        self.serve_after = serve_after
        self.by_channel: list[int] = []
        self.by_call: list[tuple[int, int]] = []

    def take(self, item: int) -> str:
        self.by_call.append((item, threading.get_ident()))
        return f"took {item}"

    async def run(self, ctx):
        async for item in ctx.receive():
            self.by_channel.append(item)
            if len(self.by_channel) == self.serve_after:
                break
        async with ctx.serve_direct(self.take):
            async for item in ctx.receive():
                self.by_channel.append(item)


async def test_the_runner_joins_both_ends_of_an_edge_to_one_direct_way():
    source, sink = ThreadedSource(list(range(6))), Sink(serve_after=2)
    with trio.fail_after(30):
        await flow.run(Graph(source >> sink, name="direct"))
    # The first items went on the channel (the sink did not serve yet), the rest by call,
    # each in the source's thread and answered; nothing lost, nothing twice.
    assert sink.by_channel[:2] == [0, 1]
    called = [item for item, _ in sink.by_call]
    assert sorted(sink.by_channel + called) == list(range(6))
    assert called and all(ident != threading.get_ident() for _, ident in sink.by_call)
    assert [a for a in source.answers if a is not NOT_SERVED] == [f"took {i}" for i in called]
