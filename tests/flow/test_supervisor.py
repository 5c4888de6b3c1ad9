"""Supervision, backpressure and lane isolation, in process on Trio's virtual clock."""

import functools
import random

import trio
import trio.testing

from flow import Graph, RestartPolicy, Runner
from flow._supervisor import backoff_delay
from support.flownodes import Collect, Counter, Crasher, Item, MemoryDurable, Pass


class ItemCounter(Counter):
    async def run(self, ctx):
        while self.limit is None or self.produced < self.limit:
            await ctx.send(Item(self.produced))
            self.produced += 1


async def test_slow_sink_bounds_items_in_flight_to_edge_capacities():
    gate = trio.Event()
    src, mid, sink = Counter(1000), Pass(capacity=4), Collect(gate=gate, capacity=3)
    runner = Runner(Graph(src >> mid >> sink))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        await trio.testing.wait_all_tasks_blocked()
        in_flight = src.produced - len(sink.items)
        # Two edges (4 + 3) plus at most one item held by each of the two consumers.
        assert 0 < in_flight <= 4 + 3 + 2
        gate.set()
    # Once the sink moves, everything arrives in order and the lane finishes by itself.
    assert sink.items == list(range(1000))
    assert runner.lane_state("counter") == "finished"


async def test_fast_lane_after_durable_fan_out_is_not_held_by_a_stuck_lane():
    never = trio.Event()
    fast, stuck = Collect(name="fast_sink"), Collect(gate=never, name="stuck_sink", capacity=1)
    graph = Graph(Counter(200) >> MemoryDurable(name="store") >> {"fast": fast, "stuck": stuck})
    runner = Runner(graph)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        await trio.testing.wait_all_tasks_blocked()
        assert fast.items == list(range(200))
        assert stuck.items == []
        nursery.cancel_scope.cancel()


async def test_crashing_node_is_restarted_with_growing_backoff(autojump_clock):
    policy = RestartPolicy(backoff_initial_s=1.0, backoff_max_s=8.0, jitter=0.0,
                           max_failures=100, window_s=1000)
    crasher = Crasher(bad={0, 1, 2, 3})
    graph = Graph(ItemCounter(6) >> crasher)
    runner = Runner(graph, restart=policy)
    await runner.run()
    gaps = [b - a for a, b in zip(crasher.runs, crasher.runs[1:])]
    assert [round(g, 3) for g in gaps] == [1.0, 2.0, 4.0, 8.0]
    assert crasher.seen == [4, 5]
    health = runner.health["crasher"]
    assert health.restarts == 4 and health.last_error_class == "ValueError"
    assert health.state == "finished"


async def test_crash_hands_the_held_item_back(autojump_clock):
    items = []

    class Src(Counter):
        async def run(self, ctx):
            for i in range(2):
                item = Item(i)
                items.append(item)
                await ctx.send(item)

    graph = Graph(Src() >> Crasher(bad={1}))
    await Runner(graph, restart=RestartPolicy(backoff_initial_s=0.1, max_failures=9)).run()
    assert items[0].abandoned == [] and items[1].abandoned == ["ValueError"]


async def test_items_taken_as_they_wait_are_held_and_handed_back_on_a_crash(autojump_clock):
    """ctx.receive_ready takes what already waits, without waiting, up to its limit; each
    item counts as held until released, so a crash hands back exactly those not released."""
    items = [Item(i) for i in range(5)]
    taken: list[list[int]] = []

    class Src(Counter):
        async def run(self, ctx):
            for item in items:
                await ctx.send(item)

    class TakeWaiting(Crasher):
        async def run(self, ctx):
            await trio.sleep(1)  # every item is waiting by now
            first = await ctx.receive_one()
            batch = [first, *ctx.receive_ready(2)]
            taken.append([item.value for item in batch])
            ctx.release(first)
            rest = ctx.receive_ready(10)
            taken.append([item.value for item in rest])
            assert ctx.receive_ready(10) == []  # nothing waits any more: no waiting here
            raise ValueError("synthetic failure")

    graph = Graph(Src() >> TakeWaiting())
    await Runner(graph, restart=RestartPolicy(backoff_initial_s=0.1, max_failures=1)).run()
    assert taken[:2] == [[0, 1, 2], [3, 4]]
    assert [item.abandoned for item in items] == [[], ["ValueError"], ["ValueError"],
                                                  ["ValueError"], ["ValueError"]]


async def test_node_that_keeps_failing_stops_its_lane_only(autojump_clock):
    policy = RestartPolicy(backoff_initial_s=0.1, max_failures=3, window_s=60, jitter=0.1)
    bad, good = Crasher(name="bad"), Collect(name="good")
    graph = Graph(ItemCounter(50) >> MemoryDurable(name="store") >> {"ris": bad, "pacs": good})
    runner = Runner(graph, restart=policy)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        await trio.sleep(30)
        assert runner.health["bad"].state == "failed"
        assert runner.health["bad"].restarts == 2
        assert runner.lane_state("ris") == "failed"
        assert runner.lane_state("pacs") == "running"
        assert good.items == list(range(50))
        snapshot = runner.snapshot()
        assert snapshot["lanes"]["ris"] == "failed"
        nursery.cancel_scope.cancel()


async def test_graceful_stop_drains_in_flight_work_then_returns():
    src, sink = Counter(), Collect()
    runner = Runner(Graph(src >> Pass() >> sink))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        await runner.started.wait()
        await sink.arrived.wait()
        runner.stop()
    # Everything the source emitted before it stopped was delivered: nothing dropped.
    assert len(sink.items) == src.produced
    assert runner.health["collect"].state == "finished"


async def test_deadline_cancels_work_that_does_not_finish(autojump_clock):
    never = trio.Event()
    runner = Runner(Graph(Counter() >> Collect(gate=never)))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(runner.run, deadline=5.0))
        await trio.testing.wait_all_tasks_blocked()  # the sink holds an item it never finishes
        runner.stop()
        start = trio.current_time()
    assert 5.0 <= trio.current_time() - start < 6.0


def test_backoff_is_capped_and_jittered():
    policy = RestartPolicy(backoff_initial_s=0.5, backoff_max_s=4.0, jitter=0.25)
    rng = random.Random(7)
    delays = [backoff_delay(policy, n, rng) for n in range(1, 12)]
    assert 0.375 <= delays[0] <= 0.625
    assert all(d <= 4.0 * 1.25 for d in delays)
    assert len({round(d, 6) for d in delays[5:]}) > 1  # jitter spreads the capped delays


async def test_connect_time_egress_check_denies_a_target_outside_the_running_policy(autojump_clock):
    # The graph passed its load-time check; the policy in force at start no longer allows the
    # target, so the node's connect-time check refuses and the node never reaches the peer.
    from flow import EgressConfig, EgressPolicy

    from support.flownodes import Dialer

    dialer = Dialer("127.0.0.1", 2575)
    graph = Graph(ItemCounter(3) >> dialer, egress=EgressPolicy(
        EgressConfig(allowed_tcp=["127.0.0.1:2575"])))
    narrowed = EgressPolicy(EgressConfig(allowed_tcp=["127.0.0.1:2576"]))
    runner = Runner(graph, egress=narrowed,
                    restart=RestartPolicy(backoff_initial_s=0.1, max_failures=2))
    await runner.run()
    assert runner.health["dialer"].last_error_class == "EgressDenied"
    assert runner.lane_state("item_counter") == "failed"
