"""The STOW-RS sender node: batches deliveries into ``POST {url}/studies`` requests.

Port ``in`` receives :class:`~nodes.delivery.Delivery` items of ``application/dicom``; the
node is a sink and settles every delivery exactly once, individually, with the outcome
:func:`~nodes.stow.response.parse_stow_response` gives it.

Guarantees:

- A batch closes when it holds ``batch_max_instances``, when the next instance would take it
  past ``batch_max_bytes`` (an instance larger than that travels alone), when the next
  instance has a SOP Instance UID already in the batch (the response could not tell the two
  apart), or ``linger_ms`` after its first instance arrived, whichever comes first.
  Instances already queued are taken without waiting, even with ``linger_ms = 0``.
- Up to ``max_connections`` batches are in flight at once, one pooled keep-alive HTTP/1.1
  connection each.
- Bodies are streamed: each instance is read from its payload in CHUNK-sized blocks in a
  worker thread (small ones together in one thread hop), so a 300 MB instance never sits
  whole in memory. The bytes are sent exactly as stored (Part 10 with file meta); the body
  has an exact Content-Length.
- ``ctx.check_http`` runs right before every request (fail-closed egress).
- A transport error on a request is retried once at once (a pooled connection the server
  had dropped); otherwise the batch settles Transient. No other retrying happens here: the
  Store owns retries and dead-letters.

Cancellation: in-flight requests are abandoned; their deliveries stay unsettled and the
Store re-queues them (at-least-once; re-storing an instance is harmless for STOW). A crash
(e.g. a payload whose size changed) hands every held delivery back as Transient.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

import trio

from flow import Context, Node, get_logger, register_safe_fields

from ..delivery import Delivery
from ..http import HttpClientConfig, parse_retry_after
from ..outcome import Delivered, Outcome, Transient, kind_of, reason_of
from ..payload import CHUNK, BytesPayload, Payload
from ..sender import HttpSender, count, elapsed_ms
from .multipart import closing, content_type, multipart_length, new_boundary, part_head
from .response import parse_stow_response

if TYPE_CHECKING:  # imported where a request is made (nodes.http): not every process sends
    import httpx

log = get_logger("nodes.stow")
register_safe_fields("delivered", "transient", "permanent", "in_flight")

ACCEPT = "application/dicom+json"
MAX_RESPONSE_BYTES = 8 << 20   # a Store Instances Response for a batch is a few KB per instance
SMALL_RUN_BYTES = 4 * CHUNK    # consecutive small instances read together, up to this much


class StowConfig(HttpClientConfig):
    """One STOW-RS destination (a site-config table, e.g. ``[archive]``).

    Besides :class:`~nodes.http.HttpClientConfig`'s keys (url — the DICOMweb base, e.g.
    ``http://pacs:8042/dicom-web`` —, timeout_ms, max_connections, tls_ca,
    auth_header_file / auth_header_env / auth_header_name):
    """

    batch_max_instances: int = 20
    batch_max_bytes: int = 64 << 20
    linger_ms: int = 50

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_max_instances < 1:
            raise ValueError("batch_max_instances must be at least 1")
        if self.batch_max_bytes < 1:
            raise ValueError("batch_max_bytes must be positive")
        if self.linger_ms < 0:
            raise ValueError("linger_ms must not be negative")

    @property
    def studies_url(self) -> str:
        return self.url.rstrip("/") + "/studies"


class PayloadSizeError(Exception):
    """A payload yielded a different number of bytes than its declared size (a Store bug);
    the request is aborted because its Content-Length would be wrong."""


def _read_small(payloads: Sequence[Payload]) -> list[bytes]:
    """Blocking: read several small payloads whole (one worker-thread hop for all)."""
    out = []
    for payload in payloads:
        with payload.open() as f:
            out.append(f.read())
    return out


async def _read_small_run(payloads: Sequence[Payload]) -> list[bytes]:
    if all(isinstance(p, BytesPayload) for p in payloads):  # already in memory: no thread
        return [p.data for p in payloads]  # type: ignore[attr-defined]
    return await trio.to_thread.run_sync(_read_small, payloads)


async def _stream_one(payload: Payload, size: int, uid: str) -> AsyncIterator[bytes]:
    f = await trio.to_thread.run_sync(payload.open)
    try:
        sent = 0
        while True:
            chunk = await trio.to_thread.run_sync(f.read, CHUNK)
            if not chunk:
                break
            sent += len(chunk)
            if sent > size:
                break
            yield chunk
    finally:
        f.close()
    if sent != size:
        raise PayloadSizeError(f"payload of {uid} is not {size} bytes")


async def stream_body(items: Sequence[tuple[str, Payload, int]], boundary: str
                      ) -> AsyncIterator[bytes]:
    """The multipart body for ``(uid, payload, size)`` items, streamed (see the module doc)."""
    i = 0
    while i < len(items):
        j, run = i, 0
        while j < len(items) and items[j][2] <= CHUNK and run + items[j][2] <= SMALL_RUN_BYTES:
            run += items[j][2]
            j += 1
        if j > i:
            # One thread hop and one socket write for the whole run of small instances.
            datas = await _read_small_run([p for _, p, _ in items[i:j]])
            block = bytearray()
            for k, data in enumerate(datas, start=i):
                if len(data) != items[k][2]:
                    raise PayloadSizeError(f"payload of {items[k][0]} is not {items[k][2]} bytes")
                block += part_head(boundary, first=k == 0)
                block += data
            if j == len(items):
                block += closing(boundary)
                yield bytes(block)
                return
            yield bytes(block)
            i = j
            continue
        uid, payload, size = items[i]
        yield part_head(boundary, first=i == 0)
        async for chunk in _stream_one(payload, size, uid):
            yield chunk
        i += 1
    yield closing(boundary)


class StowSender(HttpSender):
    """Sink: sends deliveries to a DICOMweb archive with STOW-RS, settling each one.

    Its input edge holds at least one whole batch (``capacity`` defaults to
    ``max(16, batch_max_instances)``): a Store's lane pump claims as many items as the edge
    has room for in one sync commit, so a smaller edge would cost several claims per batch.
    """

    config: StowConfig
    counters = ("batches", "delivered", "transient", "permanent", "skipped", "bytes",
                "in_flight")
    log = log
    reconnect_event = "stow.reconnect"

    def __init__(self, config: StowConfig, *, name: str = "archive_sender",
                 capacity: int | None = None) -> None:
        super().__init__(config, name=name,
                         capacity=capacity or max(Node.capacity, config.batch_max_instances))

    async def probe(self, ctx: Context) -> dict[str, Any]:
        """A QIDO-RS ``GET {url}/studies?limit=1``: reachable, authorised, not redirected."""
        return await self.probe_get(ctx, self.config.studies_url, params={"limit": "1"},
                                    headers={"Accept": ACCEPT})

    # -- behaviour -----------------------------------------------------------------------------

    async def run(self, ctx: Context) -> None:
        async with self.lane_client() as client:
            stats = self.lane_stats(ctx.lane)
            slots = trio.Semaphore(self.config.max_connections)
            async with trio.open_nursery() as nursery:
                carry: Delivery | None = None
                done = False
                while not done:
                    # The next batch fills while earlier ones are in flight; it waits for a
                    # free connection only once it is closed.
                    batch, carry, done = await self._collect(ctx, carry)
                    if batch:
                        await slots.acquire()
                        nursery.start_soon(self._send_batch, ctx, client, batch, slots, stats)

    async def _collect(self, ctx: Context, carry: Delivery | None
                       ) -> tuple[list[Delivery], Delivery | None, bool]:
        """One batch; returns (batch, the item that starts the next one, end of stream)."""
        cfg = self.config
        channel = ctx.inputs["in"]
        if carry is None:
            try:
                carry = await ctx.receive_one()
            except trio.EndOfChannel:
                return [], None, True
        batch, uids, size = [carry], {carry.uid}, carry.payload.size
        deadline = trio.current_time() + cfg.linger_ms / 1000
        queued = 0
        while len(batch) < cfg.batch_max_instances and size < cfg.batch_max_bytes:
            item: Delivery | None = None
            if not queued:
                queued = channel.statistics().current_buffer_used
            try:
                if queued:  # already waiting in the edge: taking it cannot block
                    queued -= 1
                    item = await ctx.receive_one()
                else:
                    with trio.move_on_at(deadline):
                        item = await ctx.receive_one()
            except trio.EndOfChannel:
                return batch, None, True
            if item is None:
                break
            item_size = item.payload.size
            if item.uid in uids or size + item_size > cfg.batch_max_bytes:
                return batch, item, False
            batch.append(item)
            uids.add(item.uid)
            size += item_size
        return batch, None, False

    async def _send_batch(self, ctx: Context, client: httpx.AsyncClient,
                          batch: list[Delivery], slots: trio.Semaphore,
                          stats: dict[str, int]) -> None:
        stats["in_flight"] += 1
        try:
            outcomes, status, nbytes, ms = await self._post(ctx, client, batch)
        finally:
            stats["in_flight"] -= 1
            slots.release()
        stats["batches"] += 1
        stats["bytes"] += nbytes
        counts = {"delivered": 0, "transient": 0, "permanent": 0, "skipped": 0}
        for delivery, outcome in zip(batch, outcomes):
            kind = kind_of(outcome)
            count(counts, kind)
            if not isinstance(outcome, Delivered):
                log.warning("stow.instance_not_delivered", lane=ctx.lane,
                            sop_instance_uid=delivery.uid, outcome=kind,
                            reason=reason_of(outcome), http_status=status)
        await self.settle_together(ctx, zip(batch, outcomes), stats)
        log.info("stow.batch", lane=ctx.lane, instances=len(batch), bytes=nbytes,
                 http_status=status, ms=ms, **counts)

    async def _post(self, ctx: Context, client: httpx.AsyncClient, batch: list[Delivery]
                    ) -> tuple[list[Outcome], int | None, int, float]:
        """Send one batch; (outcomes in batch order, HTTP status or None, body bytes, ms)."""
        items = [(d.uid, d.payload, d.payload.size) for d in batch]
        started = time.monotonic()
        length = 0

        def request() -> tuple[dict[str, str], AsyncIterator[bytes]]:
            nonlocal length  # a new boundary each attempt: the streamed body is used up
            boundary = new_boundary()
            length = multipart_length([size for _, _, size in items], boundary)
            return {"Content-Type": content_type(boundary), "Accept": ACCEPT,
                    "Content-Length": str(length)}, stream_body(items, boundary)

        got = await self.exchange(ctx, client, "POST", self.config.studies_url, request,
                                  limit=MAX_RESPONSE_BYTES)
        if isinstance(got, Transient):
            return [got] * len(batch), None, length, elapsed_ms(started, 1)
        response, body = got
        # A body over the limit is not a Store Instances Response we would trust: no body.
        outcomes = parse_stow_response(
            response.status_code, response.headers.get("Content-Type"),
            body if body is not None else b"", [uid for uid, _, _ in items],
            retry_after=parse_retry_after(response.headers.get("Retry-After")))
        return outcomes, response.status_code, length, elapsed_ms(started, 1)
