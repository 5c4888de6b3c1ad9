"""Test nodes around the Store: a feed of arrivals, scriptable lane sinks, and the TCP
receiver / file sink pair that the crash test runs in a real ``flow`` process."""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager

import trio

from flow import Config, EgressPolicy, Graph, Node, Runner
from nodes.arrival import Arrival, Envelope
from nodes.delivery import Delivery
from nodes.outcome import Delivered, Outcome
from nodes.payload import BytesPayload, Payload

Behaviour = Callable[[Delivery], Awaitable[Outcome]]


def envelope(uid: str, study: str = "1.2.3.4") -> Envelope:
    return Envelope(sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    transfer_syntax_uid="1.2.840.10008.1.2.1", study_instance_uid=study,
                    calling_ae="MODALITY", peer="127.0.0.1")


def arrival(uid: str, data: bytes | Payload, study: str = "1.2.3.4") -> Arrival:
    payload = BytesPayload(data) if isinstance(data, bytes) else data
    return Arrival(envelope(uid, study), payload)


class Feed(Node):
    """Source: sends what the test puts in; ``await feed.put(a)`` returns once it is queued."""

    inputs = ()

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self._send, self._recv = trio.open_memory_channel[Arrival](1000)

    async def put(self, item: Arrival) -> None:
        await self._send.send(item)

    async def run(self, ctx) -> None:
        async for item in self._recv:
            await ctx.send(item)


def read_payload(payload: Payload) -> tuple[int, str]:
    """Stream a payload in 1 MiB reads: (size, sha256)."""
    digest, size = hashlib.sha256(), 0
    with payload.open() as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


async def deliver(delivery: Delivery) -> Outcome:
    return Delivered()


class Sink(Node):
    """Lane end: reads each payload fully, records it, settles with ``behaviour``'s outcome.

    ``seen``: (uid, sha256 of the bytes read, attempt) per delivery, in order;
    ``delivered``: uids settled Delivered; ``gate``: when given, waits for it per item.
    """

    outputs = ()

    def __init__(self, behaviour: Behaviour = deliver, *, gate: trio.Event | None = None,
                 **kw) -> None:
        super().__init__(**kw)
        self.behaviour = behaviour
        self.gate = gate
        self.seen: list[tuple[str, str, int]] = []
        self.delivered: list[str] = []
        self.changed = trio.Event()

    async def run(self, ctx) -> None:
        async for delivery in ctx.receive():
            if self.gate is not None:
                await self.gate.wait()
            _, digest = await trio.to_thread.run_sync(read_payload, delivery.payload)
            self.seen.append((delivery.uid, digest, delivery.attempt))
            outcome = await self.behaviour(delivery)
            await delivery.settle(outcome)
            if isinstance(outcome, Delivered):
                self.delivered.append(delivery.uid)
            self.changed.set()
            self.changed = trio.Event()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 20) -> None:
        with trio.fail_after(timeout):
            while not predicate():
                await self.changed.wait()


# -- nodes for the crash test (run inside a real `flow` process) ---------------------------

class ReceiverConfig(Config):
    port: int


class TcpReceiver(Node):
    """Source: accepts frames ``u32 uid length, uid, u32 data length, data`` on 127.0.0.1,
    makes an Arrival of each, and answers one byte after the receipt: ``A`` committed,
    ``F`` failed. A stand-in for the DICOM listener's commit-before-ack."""

    inputs = ()

    def __init__(self, config: ReceiverConfig, **kw) -> None:
        super().__init__(**kw)
        self.port = config.port

    async def run(self, ctx) -> None:
        async def serve(stream: trio.SocketStream) -> None:
            buf = bytearray()

            async def exactly(n: int) -> bytes:
                while len(buf) < n:
                    data = await stream.receive_some(65536)
                    if not data:
                        raise EOFError
                    buf.extend(data)
                out = bytes(buf[:n])
                del buf[:n]
                return out

            try:
                while True:
                    uid = (await exactly(struct.unpack(">I", await exactly(4))[0])).decode()
                    data = await exactly(struct.unpack(">I", await exactly(4))[0])
                    item = Arrival(envelope(uid), BytesPayload(data))
                    await ctx.send(item)
                    try:
                        await item.receipt.wait()
                        answer = b"A"
                    except Exception:
                        answer = b"F"
                    await stream.send_all(answer)
            except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
                return

        await trio.serve_tcp(serve, self.port, host="127.0.0.1")


class SinkConfig(Config):
    path: str


class FileSink(Node):
    """Lane end: appends each delivered uid to a file with fsync, then settles Delivered."""

    outputs = ()

    def __init__(self, config: SinkConfig, **kw) -> None:
        super().__init__(**kw)
        self.path = config.path

    async def run(self, ctx) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            async for delivery in ctx.receive():
                line = f"{delivery.uid}\n".encode()
                await trio.to_thread.run_sync(lambda: (os.write(fd, line), os.fsync(fd)))
                await delivery.settle(Delivered())
        finally:
            os.close(fd)


def encode_frame(uid: str, data: bytes) -> bytes:
    raw = uid.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(data)) + data


__all__ = ["Feed", "FileSink", "Sink", "TcpReceiver", "arrival", "encode_frame", "envelope",
           "running", "sink_graph_files"]


SINK_GRAPH = """
from flow import Config, Graph
from nodes.store import Store, StoreConfig
from support.storenodes import Feed, Sink

class Site(Config):
    data_dir: str
    store: StoreConfig = StoreConfig()

site = Graph.config(Site)
store = Store(site.data_dir, site.store)
graph = Graph(Feed() >> store >> {"pacs": Sink(name="pacs_sink")}, name="lanes")
"""


def sink_graph_files(directory, data_dir, store: dict[str, object] | None = None):
    """``Feed >> Store >> {"pacs": Sink}`` as a graph file and site file in ``directory``
    for the operator commands (``flow status``, ``flow keys``, ...): (graph, config)."""
    import json

    settings = {"min_free_disk_mb": 0, **(store or {})}
    graph = directory / "lanes.py"
    graph.write_text(SINK_GRAPH)
    config = directory / "lanes.toml"
    config.write_text(f"data_dir = {json.dumps(str(data_dir))}\n[store]\n" + "".join(
        f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))
    return graph, config


@asynccontextmanager
async def running(data_dir, sinks: dict[str, Node], config=None, **store_kw):
    """Yield (feed, store, runner) while ``feed >> store >> sinks`` runs in this Trio run;
    stop the graph gracefully on exit."""
    from nodes.store import Store, StoreConfig

    for lane, sink in sinks.items():
        if "_name" not in sink.__dict__:
            sink.name = f"{lane}_sink"
    feed = Feed()
    store = Store(data_dir, config or StoreConfig(min_free_disk_mb=0), **store_kw)
    graph = Graph(feed >> store >> sinks if sinks else feed >> store, egress=EgressPolicy())
    runner = Runner(graph)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        await runner.started.wait()
        try:
            yield feed, store, runner
        finally:
            runner.stop()
