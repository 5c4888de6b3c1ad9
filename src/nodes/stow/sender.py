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
from contextlib import aclosing
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import trio

from flow import Context, HttpTarget, Node, get_logger, register_safe_fields

from ..delivery import Delivery
from ..http import HttpClientConfig, build_client, classify_transport_error, parse_retry_after
from ..outcome import Delivered, Outcome, kind_of
from ..payload import CHUNK, BytesPayload, Payload
from .multipart import closing, content_type, multipart_length, new_boundary, part_head
from .response import parse_stow_response

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


async def _read_capped(response: httpx.Response, limit: int) -> bytes:
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limit:
            return b""  # not a Store Instances Response we would trust: treat as no body
    return bytes(body)


class StowSender(Node):
    """Sink: sends deliveries to a DICOMweb archive with STOW-RS, settling each one.

    Its input edge holds at least one whole batch (``capacity`` defaults to
    ``max(16, batch_max_instances)``): a Store's lane pump claims as many items as the edge
    has room for in one sync commit, so a smaller edge would cost several claims per batch.
    """

    outputs = ()

    def __init__(self, config: StowConfig, *, name: str = "archive_sender",
                 capacity: int | None = None) -> None:
        super().__init__(name=name,
                         capacity=capacity or max(Node.capacity, config.batch_max_instances))
        self.config = config
        self._client: httpx.AsyncClient | None = None
        self._stats: dict[str, dict[str, int]] = {}

    # -- declared facts / lifecycle ------------------------------------------------------------

    def egress(self) -> list[HttpTarget]:
        return [HttpTarget(self.config.url)]

    async def open(self) -> None:
        """Build the connection pool; a missing auth secret or CA file fails the start."""
        if self._client is None:
            self._client = build_client(self.config)

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    def report(self) -> dict[str, Any]:
        return {"lanes": {lane: dict(figures) for lane, figures in self._stats.items()}}

    async def probe(self, ctx: Context) -> dict[str, Any]:
        """A QIDO-RS ``GET {url}/studies?limit=1``: reachable, authorised, not redirected."""
        url = self.config.studies_url
        ctx.check_http(url)
        client = self._client or build_client(self.config)
        try:
            response = await client.get(url, params={"limit": "1"},
                                        headers={"Accept": ACCEPT})
        except httpx.TransportError as exc:
            return {"ok": False, "reason": classify_transport_error(exc).reason}
        finally:
            if client is not self._client:
                await client.aclose()
        return {"ok": 200 <= response.status_code < 300, "http_status": response.status_code}

    # -- behaviour -----------------------------------------------------------------------------

    async def run(self, ctx: Context) -> None:
        own = self._client is None
        client = self._client or build_client(self.config)
        stats = self._stats.setdefault(ctx.lane, {
            "batches": 0, "delivered": 0, "transient": 0, "permanent": 0, "skipped": 0,
            "bytes": 0, "in_flight": 0})
        slots = trio.Semaphore(self.config.max_connections)
        try:
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
        finally:
            if own:
                with trio.CancelScope(shield=True):
                    await client.aclose()

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

        async def settle(delivery: Delivery, outcome: Outcome) -> None:
            await delivery.settle(outcome)
            ctx.release(delivery)
            stats[kind_of(outcome)] += 1

        # Settled together, not one after the other: the Store commits each outcome with a
        # sync, and only outcomes that wait at the same time share one (group commit). One
        # by one, a batch of 50 cost 50 syncs and halved the lane's throughput.
        async with trio.open_nursery() as settling:
            for delivery, outcome in zip(batch, outcomes):
                kind = kind_of(outcome)
                counts[kind] += 1
                if not isinstance(outcome, Delivered):
                    log.warning("stow.instance_not_delivered", lane=ctx.lane,
                                sop_instance_uid=delivery.uid, outcome=kind,
                                reason=getattr(outcome, "reason", ""), http_status=status)
                settling.start_soon(settle, delivery, outcome)
        log.info("stow.batch", lane=ctx.lane, instances=len(batch), bytes=nbytes,
                 http_status=status, ms=ms, **counts)

    async def _post(self, ctx: Context, client: httpx.AsyncClient, batch: list[Delivery]
                    ) -> tuple[list[Outcome], int | None, int, float]:
        """Send one batch; (outcomes in batch order, HTTP status or None, body bytes, ms)."""
        url = self.config.studies_url
        items = [(d.uid, d.payload, d.payload.size) for d in batch]
        uids = [uid for uid, _, _ in items]
        started = time.monotonic()
        for attempt in (1, 2):
            boundary = new_boundary()
            length = multipart_length([size for _, _, size in items], boundary)
            headers = {"Content-Type": content_type(boundary), "Accept": ACCEPT,
                       "Content-Length": str(length)}
            ctx.check_http(url)
            try:
                async with aclosing(stream_body(items, boundary)) as content, \
                        client.stream("POST", url, content=content, headers=headers) as response:
                    body = await _read_capped(response, MAX_RESPONSE_BYTES)
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                if attempt == 1:  # maybe a kept-alive connection the server had closed
                    log.info("stow.reconnect", lane=ctx.lane, error_class=type(exc).__name__)
                    continue
                outcome = classify_transport_error(exc)
                return [outcome] * len(batch), None, length, _ms(started)
            except httpx.TransportError as exc:
                outcome = classify_transport_error(exc)
                return [outcome] * len(batch), None, length, _ms(started)
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            outcomes = parse_stow_response(response.status_code,
                                           response.headers.get("Content-Type"), body, uids,
                                           retry_after=retry_after)
            return outcomes, response.status_code, length, _ms(started)
        raise AssertionError("unreachable")


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)


