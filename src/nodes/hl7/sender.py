"""The MLLP sender node: HL7 v2 messages to a RIS, each settled on its ACK.

The protocol itself (framing, the frame decoder, ACK parsing and classification) is pure and
lives in :mod:`nodes.hl7.mllp`; this module does the I/O.

MllpSender — ports: in (deliveries of ``x-application/hl7-v2+er7``), no output; a sink that
settles every delivery exactly once.

- One persistent TCP connection (TLS when configured), TCP_NODELAY, opened on first use and
  reused; ``ctx.check_tcp`` runs right before every connect (fail-closed egress).
- One message in flight: send a frame, wait up to ``ack_timeout_ms`` for the ACK frame, then
  the next message. Order is kept. Each outcome is committed by the Store beside the next
  send (:meth:`~nodes.sender.Sender.settling_beside`), not before it.
- MSA-1 AA/CA → Delivered. AE/AR/CE/CR → Permanent ``ack AE`` (+ `` err CODE`` with the ERR-3
  code when the RIS sends one). MSA-3 free text is never used: a RIS may quote the message.
- No ACK in time, an ACK for another control ID, an answer that is not MLLP or not an ACK,
  a refused/reset/closed connection → Transient; the connection is closed (a late ACK must
  not be taken for the next message's) and opened again for the next message.
- A delivery of another media type (a lane without ToHL7) → Permanent, never read or sent.
- A reused connection found closed before the ACK is opened again and the message re-sent
  once (the RIS dropped an idle connection); that is the only retry here — the Store owns
  retries and dead-letters.

Cancellation: the delivery in flight stays unsettled (the Store re-queues it); the
connection is closed.
"""

from __future__ import annotations

import socket
import ssl
import time
from typing import Any

import trio

from flow import Context, get_logger, register_safe_fields

from ..delivery import Delivery
from ..outcome import Delivered, Outcome, Permanent, Transient, kind_of, reason_of
from ..payload import BytesPayload, read_all
from ..sender import TcpSender, count, elapsed_ms
from .config import RisConfig
from .mllp import MEDIA_TYPE, Deframer, MllpError, answer_outcome, control_id_of, frame

# The logger keeps the name it had when this node lived in ``mllp.py`` (operators filter on it).
log = get_logger("nodes.hl7.mllp")
register_safe_fields("reconnects", "delivered", "transient", "permanent")


class _Retry(Exception):
    """The reused connection was closed by the peer before any ACK byte: reconnect once."""


class _Failed(Exception):
    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome)
        self.outcome = outcome


def _reason(exc: BaseException) -> str:
    """A routing-safe reason for a connection failure (the class of error, no message)."""
    cause = exc.__cause__
    if type(exc) is OSError and isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        # trio.open_tcp_stream wraps every failed attempt in one OSError; the first
        # attempt's error says what happened (refused, unreachable, ...).
        exc = cause.exceptions[0]
    if isinstance(exc, trio.BrokenResourceError) and isinstance(cause, ssl.SSLError):
        exc = cause  # trio.SSLStream wraps the handshake's own error
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, (ConnectionResetError, trio.BrokenResourceError)):
        return "connection reset"
    if isinstance(exc, ssl.SSLError):
        return f"tls error {type(exc).__name__}"
    if isinstance(exc, socket.gaierror):
        return "host not resolved"
    return f"connection error {type(exc).__name__}"


class MllpSender(TcpSender):
    """Sink: sends HL7 v2 messages over MLLP and settles each on its ACK (module docstring)."""

    config: RisConfig
    counters = ("sent", "delivered", "transient", "permanent", "reconnects")

    def __init__(self, config: RisConfig, *, name: str = "ris_sender",
                 capacity: int | None = None) -> None:
        super().__init__(config, name=name, capacity=capacity)
        self._stream: trio.abc.Stream | None = None
        self._deframer = Deframer()

    # -- lifecycle -----------------------------------------------------------------------------

    async def close(self) -> None:
        await self._disconnect()

    async def probe(self, ctx: Context) -> dict[str, Any]:
        """Open (and close) a connection to the RIS: reachable, TLS handshake passes."""
        try:
            stream = await self._connect(ctx)
        except _Failed as failed:
            return {"ok": False, "reason": reason_of(failed.outcome)}
        with trio.CancelScope(shield=True):
            await stream.aclose()
        return {"ok": True}

    # -- connection ------------------------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.config.tls_ca)

    async def _connect(self, ctx: Context) -> trio.abc.Stream:
        cfg = self.config
        ctx.check_tcp(cfg.host, cfg.port)
        tcp: trio.SocketStream | None = None
        connected = False
        try:
            with trio.fail_after(cfg.connect_timeout_ms / 1000):
                tcp = await trio.open_tcp_stream(cfg.host, cfg.port)
                tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                stream: trio.abc.Stream = tcp
                if cfg.use_tls:
                    stream = trio.SSLStream(tcp, self._ssl_context(),
                                            server_hostname=cfg.tls_server_name or cfg.host,
                                            https_compatible=False)
                    await stream.do_handshake()
                connected = True
                return stream
        except trio.TooSlowError:
            raise _Failed(Transient("connect timeout")) from None
        except (OSError, trio.BrokenResourceError) as exc:
            raise _Failed(Transient(_reason(exc))) from None
        finally:
            if tcp is not None and not connected:  # a failed handshake leaves no socket open
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(tcp)

    async def _disconnect(self) -> None:
        stream, self._stream = self._stream, None
        self._deframer = Deframer()
        if stream is not None:
            with trio.CancelScope(shield=True):
                try:
                    await trio.aclose_forcefully(stream)
                except (OSError, trio.BrokenResourceError):
                    pass

    # -- one exchange ------------------------------------------------------------------------------

    async def _exchange(self, stream: trio.abc.Stream, data: bytes, control_id: str,
                        reused: bool) -> Outcome:
        """Send one framed message and read its ACK. Raises _Retry or _Failed."""
        try:
            await stream.send_all(frame(data))
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if reused:
                raise _Retry() from None
            raise _Failed(Transient(_reason(exc))) from None
        got_bytes = False
        with trio.move_on_after(self.config.ack_timeout_ms / 1000):
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    if reused and not got_bytes:
                        raise _Retry() from None
                    raise _Failed(Transient(_reason(exc))) from None
                if not chunk:
                    if reused and not got_bytes:
                        raise _Retry()
                    raise _Failed(Transient("connection closed before the ack"))
                got_bytes = True
                try:
                    blocks = self._deframer.feed(chunk)
                except MllpError:
                    raise _Failed(Transient("answer is not MLLP")) from None
                if blocks:
                    outcome, keep = answer_outcome(blocks, control_id)
                    if not keep:
                        raise _Failed(outcome)
                    return outcome
        raise _Failed(Transient(f"no ack within {self.config.ack_timeout_ms} ms"))

    async def send(self, ctx: Context, data: bytes) -> Outcome:
        """Send one message and classify its ACK (the connection is kept when all went well)."""
        try:
            control_id = control_id_of(data)
            frame(data)
        except ValueError:
            return Permanent("not an HL7 v2 message")
        for attempt in (1, 2):
            reused = self._stream is not None
            try:
                if self._stream is None:
                    self._stream = await self._connect(ctx)
                return await self._exchange(self._stream, data, control_id,
                                            reused and attempt == 1)
            except _Retry:
                await self._disconnect()
                count(self._stats.setdefault(ctx.lane, {}), "reconnects")
                log.info("mllp.reconnect", lane=ctx.lane, peer=self.peer_address)
                continue
            except _Failed as failed:
                await self._disconnect()
                return failed.outcome
            except BaseException:
                await self._disconnect()
                raise
        raise AssertionError("unreachable")

    # -- behaviour -------------------------------------------------------------------------------

    async def run(self, ctx: Context) -> None:
        stats = self.lane_stats(ctx.lane)
        try:
            async with self.settling_beside(ctx) as settle_soon:
                async for delivery in ctx.receive():
                    await settle_soon(delivery, await self._deliver(ctx, delivery, stats))
        finally:
            await self._disconnect()

    async def _deliver(self, ctx: Context, delivery: Delivery, stats: dict[str, int]
                       ) -> Outcome:
        """Send ``delivery`` (one message in flight) and count it; its outcome, settled by
        the caller beside the next send."""
        started = time.monotonic()
        if delivery.media_type != MEDIA_TYPE:
            # a lane without a ToHL7 in front: never read (maybe hundreds of MB of) DICOM
            outcome: Outcome = Permanent(f"not an HL7 v2 message ({delivery.media_type})")
        else:
            payload = delivery.payload
            if isinstance(payload, BytesPayload):
                data = payload.data
            else:
                data = await trio.to_thread.run_sync(read_all, payload)
            outcome = await self.send(ctx, data)
        ms = elapsed_ms(started)
        stats["sent"] += 1
        kind = kind_of(outcome)
        count(stats, kind)
        if isinstance(outcome, Delivered):
            log.debug("mllp.delivered", lane=ctx.lane, sop_instance_uid=delivery.uid, ms=ms)
        else:
            log.warning("mllp.not_delivered", lane=ctx.lane, sop_instance_uid=delivery.uid,
                        outcome=kind, reason=reason_of(outcome),
                        peer=self.peer_address, ms=ms)
        return outcome
