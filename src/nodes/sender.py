"""The sender base: what every sink that delivers a lane to one destination shares.

A sender (:class:`~nodes.dimse.sender.CStoreSender`, :class:`~nodes.stow.sender.StowSender`,
:class:`~nodes.hl7.sender.MllpSender`, :class:`~nodes.fhir.sender.FhirStudySender`) is the
last node of a lane: it takes :class:`~nodes.delivery.Delivery` items, sends them with its
protocol and settles each one exactly once. What is not protocol lives here, so that each
sender module holds only its protocol:

- :class:`Sender`: no output port; per-lane counters (``counters``, created when the lane
  first runs and kept across restarts); :meth:`Sender.report` for ``flow status`` — always
  ``{"lanes": {lane: {counter: n, ...}}}`` plus what :meth:`Sender.lane_report` adds;
  settling (commit, let the context forget the delivery, count its outcome class), alone,
  several together so that they share one of the Store's group commits, or beside the
  sending (:meth:`Sender.settling_beside`: the next item goes out while the Store commits
  the last one's outcome).
- :class:`TcpSender`: the egress target is the config's ``host``/``port``.
- :class:`HttpSender`: the egress target is the config's ``url``; the connection pool's life
  (built by ``open``, closed by ``close``; a lane run without ``open`` builds its own and
  closes it); the probe's ``GET``; one request, retried once at once when a kept-alive
  connection turns out dropped.

Every counter name and value is routing-safe (counts, bytes).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import aclosing, asynccontextmanager, nullcontext
from typing import TYPE_CHECKING, Any, ClassVar

import trio

from flow import Context, HttpTarget, Node, TcpTarget

from .delivery import Delivery
from .http import HttpClientConfig, build_client, classify_transport_error
from .outcome import Outcome, Transient, kind_of

if TYPE_CHECKING:  # imported where a request is made (nodes.http): not every process sends
    import httpx

__all__ = ["HttpSender", "Sender", "TcpSender", "count", "elapsed_ms", "read_capped"]


def count(stats: dict[str, int], key: str, n: int = 1) -> None:
    """Add ``n`` to the counter ``key`` (created at 0 when the lane has not got it yet)."""
    stats[key] = stats.get(key, 0) + n


def elapsed_ms(started: float, ndigits: int | None = None) -> float:
    """Milliseconds since ``started`` (``time.monotonic()``), rounded to ``ndigits``
    (``None``: a whole number, as ``round`` gives it)."""
    return round((time.monotonic() - started) * 1000, ndigits)


class Sender(Node):
    """Base of the sink nodes that deliver a lane to one destination (module docstring).

    Subclasses set ``counters`` (the lane figures ``report`` shows, in that order), keep
    their configuration in ``config`` and count into :meth:`lane_stats`.
    """

    outputs = ()
    counters: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any, *, name: str, capacity: int | None = None) -> None:
        super().__init__(name=name, capacity=capacity)
        self.config = config
        self._stats: dict[str, dict[str, int]] = {}

    def report(self) -> dict[str, Any]:
        """Per lane: the counters, then what :meth:`lane_report` adds."""
        return {"lanes": {lane: {**figures, **self.lane_report(lane)}
                          for lane, figures in self._stats.items()}}

    def lane_report(self, lane: str) -> dict[str, Any]:
        """Figures of ``lane`` that are not counters (e.g. connections open right now)."""
        return {}

    def lane_stats(self, lane: str) -> dict[str, int]:
        """The counters of ``lane``, every one of ``counters`` present (0 when new)."""
        stats = self._stats.setdefault(lane, {})
        for key in self.counters:
            stats.setdefault(key, 0)
        return stats

    async def settle(self, ctx: Context, delivery: Delivery, outcome: Outcome,
                     stats: dict[str, int] | None = None) -> None:
        """Settle ``delivery`` (the Store has committed it when this returns), release it
        from ``ctx`` (a crash from now on does not abandon it) and, given ``stats``, count
        its outcome class there."""
        await delivery.settle(outcome)
        ctx.release(delivery)
        if stats is not None:
            count(stats, kind_of(outcome))

    async def settle_together(self, ctx: Context,
                              settled: Iterable[tuple[Delivery, Outcome]],
                              stats: dict[str, int]) -> None:
        """:meth:`settle` every (delivery, outcome) at once, counting each into ``stats``."""
        # Together, not one after the other: the Store commits each outcome with a sync, and
        # only outcomes that wait at the same time share one (group commit). One by one, a
        # STOW batch of 50 cost 50 syncs and halved the lane's throughput.
        async with trio.open_nursery() as settling:
            for delivery, outcome in settled:
                settling.start_soon(self.settle, ctx, delivery, outcome, stats)


    @asynccontextmanager
    async def settling_beside(self, ctx: Context
                              ) -> AsyncIterator[Callable[..., Any]]:
        """``settle_soon(delivery, outcome, stats=None)`` settles in the background and
        returns once it has started; at most ``PENDING_SETTLES`` wait for the Store's commit
        at a time (then it waits for room). Every settle has ended when the block does.

        For a sender whose protocol does one item at a time: it need not wait for each
        outcome's commit (a sync, or a linger window in a process that runs lanes only)
        before the next send, and outcomes settled close together share one group commit.
        A crash or cancellation before a settle ends leaves that delivery unsettled: the
        Store re-queues it (at-least-once, as for a delivery in flight)."""
        pending = trio.Semaphore(PENDING_SETTLES)

        async def one(delivery: Delivery, outcome: Outcome,
                      stats: dict[str, int] | None) -> None:
            try:
                await self.settle(ctx, delivery, outcome, stats)
            finally:
                pending.release()

        async with trio.open_nursery() as settles:
            async def settle_soon(delivery: Delivery, outcome: Outcome,
                                  stats: dict[str, int] | None = None) -> None:
                await pending.acquire()
                settles.start_soon(one, delivery, outcome, stats)

            yield settle_soon


PENDING_SETTLES = 64  # outcomes awaiting the Store's commit before a sender pauses


class TcpSender(Sender):
    """A sender whose config names the one ``host``/``port`` it connects to."""

    def egress(self) -> list[TcpTarget]:
        return [TcpTarget(self.config.host, self.config.port)]

    @property
    def peer_address(self) -> str:
        """``host:port`` of the destination (routing-safe, for logs)."""
        return f"{self.config.host}:{self.config.port}"


async def read_capped(response: httpx.Response, limit: int) -> bytes | None:
    """The body, or None when it is larger than ``limit`` (not an answer we would trust)."""
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


Request = Callable[[], tuple[dict[str, str], Any]]


class HttpSender(Sender):
    """A sender to one HTTP destination (an :class:`~nodes.http.HttpClientConfig`).

    Subclasses set ``log`` (their logger) and ``reconnect_event`` (the event logged when a
    request is retried on a fresh connection). ``client``: an httpx client to use instead of
    building one (the caller closes it).
    """

    log: ClassVar[Any]
    reconnect_event: ClassVar[str]

    def __init__(self, config: HttpClientConfig, *, name: str, capacity: int | None = None,
                 client: httpx.AsyncClient | None = None) -> None:
        super().__init__(config, name=name, capacity=capacity)
        self._given_client = client
        self._client: httpx.AsyncClient | None = client

    def egress(self) -> list[HttpTarget]:
        return [HttpTarget(self.config.url)]

    async def open(self) -> None:
        """Build the connection pool; a missing auth secret or CA file fails the start."""
        if self._client is None:
            self._client = build_client(self.config)

    async def close(self) -> None:
        if self._client is not None and self._client is not self._given_client:
            client, self._client = self._client, None
            await client.aclose()

    @asynccontextmanager
    async def lane_client(self) -> AsyncIterator[httpx.AsyncClient]:
        """The pool ``open`` built, or (not opened) one of the lane's own, closed at exit."""
        if self._client is not None:
            yield self._client
            return
        client = build_client(self.config)
        try:
            yield client
        finally:
            with trio.CancelScope(shield=True):
                await client.aclose()

    async def probe_get(self, ctx: Context, url: str, *, headers: dict[str, str],
                        params: dict[str, str] | None = None) -> dict[str, Any]:
        """``GET url``: ``{"ok", "http_status"}`` (ok for 2xx), or ``{"ok": False,
        "reason"}`` when no answer came. Egress is checked first."""
        import httpx

        ctx.check_http(url)
        client = self._client or build_client(self.config)
        try:
            response = await client.get(url, params=params, headers=headers)
        except httpx.TransportError as exc:
            return {"ok": False, "reason": classify_transport_error(exc).reason}
        finally:
            if client is not self._client:
                await client.aclose()
        return {"ok": 200 <= response.status_code < 300, "http_status": response.status_code}

    async def exchange(self, ctx: Context, client: httpx.AsyncClient, method: str, url: str,
                       request: Request, *, limit: int, params: dict[str, str] | None = None
                       ) -> tuple[httpx.Response, bytes | None] | Transient:
        """One request: (response, body or None when larger than ``limit``), or the
        Transient of a request left unanswered.

        ``request()`` gives (headers, content) for each attempt, after the egress check;
        content may be an async generator (a streamed body, closed after the attempt). A
        protocol, read or write error is retried once at once (maybe a kept-alive
        connection the server had closed); nothing else is retried here.
        """
        import httpx

        for attempt in (1, 2):
            ctx.check_http(url)
            headers, content = request()
            closing = aclosing(content) if hasattr(content, "aclose") else nullcontext()
            try:
                async with closing, client.stream(method, url, params=params, content=content,
                                                  headers=headers) as response:
                    body = await read_capped(response, limit)
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                if attempt == 1:
                    self.log.info(self.reconnect_event, lane=ctx.lane,
                                  error_class=type(exc).__name__)
                    continue
                return classify_transport_error(exc)
            except httpx.TransportError as exc:
                return classify_transport_error(exc)
            return response, body
        raise AssertionError("unreachable")
