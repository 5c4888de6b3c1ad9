"""Run a StowSender in a real flow graph: a feed node hands it deliveries, a Recorder
settles them; or behind the real Store (``store_graph``: an arrival feeder commits into a
Store whose lane pumps feed the senders). Shared by the sender tests, the Orthanc interop
tests, the FHIR Store tests and bench/stow.py."""

from __future__ import annotations

import io
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial

import trio
from pydicom import dcmread

from flow import EgressConfig, EgressPolicy, Graph, Node, RestartPolicy, Runner
from nodes.arrival import Arrival, Envelope
from nodes.delivery import Delivery, Recorder
from nodes.payload import BytesPayload, Payload
from nodes.store import Store, StoreConfig
from nodes.stow import StowConfig, StowSender
from support.flownodes import Feed


def envelope_of(part10: bytes | str | os.PathLike) -> Envelope:
    """The routing-safe envelope of Part 10 bytes or a Part 10 file."""
    src = io.BytesIO(part10) if isinstance(part10, bytes) else part10
    ds = dcmread(src, stop_before_pixels=True)
    return Envelope(sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                    transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                    study_instance_uid=str(ds.StudyInstanceUID), modality=str(ds.Modality))


def deliveries(recorder: Recorder, files: Sequence[bytes | tuple[Envelope, Payload]],
               lane: str = "archive") -> list[Delivery]:
    out = []
    for f in files:
        env, payload = (envelope_of(f), BytesPayload(f)) if isinstance(f, bytes) else f
        out.append(recorder.delivery(env, payload, lane))
    return out


async def run_sender(config: StowConfig, items: Sequence[Delivery], *,
                     allowed: Sequence[str] | None = None, running: EgressPolicy | None = None,
                     restart: RestartPolicy | None = None,
                     sender: StowSender | None = None) -> tuple[StowSender, Runner]:
    """Run feed >> sender until every item went through; returns (sender, runner)."""
    sender = sender or StowSender(config)
    graph = Graph(Feed(items, name="feed") >> sender, egress=EgressPolicy(
        EgressConfig(allowed_http=list(allowed if allowed is not None else [config.url]))))
    runner = Runner(graph, egress=running, restart=restart or RestartPolicy(
        backoff_initial_s=0.01, backoff_max_s=0.05, max_failures=3))
    await runner.run()
    return sender, runner


# -- through the real Store -------------------------------------------------------------------

class ArrivalFeeder(Node):
    """Source: emits the Arrival items the test hands it and awaits their receipts, as a
    receiver would (commit-before-ack). ``await feeder.commit(arrivals)`` returns once the
    Store committed every one of them (raises the receipt's error otherwise)."""

    inputs = ()

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self._send, self._recv = trio.open_memory_channel[
            tuple[list[Arrival], trio.Event]](16)

    async def commit(self, arrivals: Sequence[Arrival]) -> None:
        batch, done = list(arrivals), trio.Event()
        await self._send.send((batch, done))
        await done.wait()
        for item in batch:
            await item.receipt.wait()  # answered already: raises StoreFull/StoreFailed

    async def run(self, ctx) -> None:
        async for batch, done in self._recv:
            for item in batch:
                await ctx.send(item)
            for item in batch:
                try:
                    await item.receipt.wait()
                except Exception:  # noqa: BLE001 - the test reads the receipt itself
                    pass
            done.set()


def arrivals(files: Sequence[bytes | tuple[Envelope, Payload]]) -> list[Arrival]:
    """One Arrival per Part 10 file (or prepared (envelope, payload) pair)."""
    out = []
    for f in files:
        env, payload = (envelope_of(f), BytesPayload(f)) if isinstance(f, bytes) else f
        out.append(Arrival(env, payload))
    return out


@asynccontextmanager
async def store_graph(data_dir: str | os.PathLike | Store,
                      lanes: dict[str, Node] | Callable[[Store], dict[str, Node]],
                      allowed: Sequence[str], config: StoreConfig | None = None
                      ) -> AsyncIterator[tuple[ArrivalFeeder, Store, Runner]]:
    """Run ``feeder >> Store(data_dir) >> lanes`` (``lanes`` may be a callable taking the
    store, for senders that need it, e.g. the FHIR sender's ``study_members``; a Store may
    be given instead of its data dir) while the body runs; stop the graph gracefully on exit
    (pumps stop, senders drain)."""
    store = (data_dir if isinstance(data_dir, Store)
             else Store(data_dir, config or StoreConfig(min_free_disk_mb=0)))
    feeder = ArrivalFeeder(name="feeder")
    branches = lanes(store) if callable(lanes) else lanes
    graph = Graph(feeder >> store >> branches,
                  egress=EgressPolicy(EgressConfig(allowed_http=list(allowed))))
    runner = Runner(graph, restart=RestartPolicy(backoff_initial_s=0.01, backoff_max_s=0.05,
                                                 max_failures=3))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(runner.run, deadline=10))
        await runner.started.wait()
        try:
            yield feeder, store, runner
        finally:
            runner.stop()


async def preload(data_dir: str | os.PathLike, lanes: Sequence[str], items: Sequence[Arrival],
                  config: StoreConfig | None = None) -> float:
    """Commit ``items`` into a Store with ``lanes`` declared (queued for each) while no lane
    runs, then close it; returns the seconds the commit took. A graph opened on the same
    data dir afterwards finds the items waiting in its lanes."""
    store = Store(data_dir, config or StoreConfig(min_free_disk_mb=0))
    for lane in lanes:
        store.branch(lane)
    await store.open()
    try:
        start = time.perf_counter()
        await store.commit(items)
        elapsed = time.perf_counter() - start
        for item in items:
            await item.receipt.wait()  # answered already: raises StoreFull/StoreFailed
    finally:
        await store.close()
    return elapsed


async def wait_for_lane(store: Store, lane: str, predicate: Callable[[dict], bool], *,
                        timeout: float = 30.0, poll_s: float = 0.02) -> dict:
    """Poll ``store.report()`` until ``predicate(lane figures)`` holds; return the figures.
    Bounded by ``timeout`` (a failure, never a verdict on speed)."""
    with trio.fail_after(timeout):
        while True:
            figures = store.report()["lanes"][lane]
            if predicate(figures):
                return figures
            await trio.sleep(poll_s)


async def commit_stats(store: Store, predicate: Callable[[dict], bool], *,
                       timeout: float = 10.0) -> dict:
    """``store.stats`` once ``predicate`` holds. A round's figures are counted in its thread
    right after its transaction commits, so a reader that has just seen the round's writes
    in LMDB (``wait_for_lane``) can read them a moment before they include that round.
    Bounded by ``timeout``: then the last figures are checked as they are."""
    with trio.move_on_after(timeout):
        while not predicate(store.stats):
            await trio.sleep(0.01)
    return store.stats
