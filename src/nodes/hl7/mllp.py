"""MLLP (HL7 v2 Minimal Lower Layer Protocol): framing, ACK classification, the sender node.

Framing and classification are pure (:func:`frame`, :class:`Deframer`, :func:`classify_ack`);
:class:`MllpSender` does the I/O.

MllpSender — ports: in (deliveries of ``x-application/hl7-v2+er7``), no output; a sink that
settles every delivery exactly once.

- One persistent TCP connection (TLS when configured), TCP_NODELAY, opened on first use and
  reused; ``ctx.check_tcp`` runs right before every connect (fail-closed egress).
- One message in flight: send a frame, wait up to ``ack_timeout_ms`` for the ACK frame, then
  the next message. Order is kept.
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

import re
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any

import trio

from flow import Context, Node, TcpTarget, get_logger, register_safe_fields

from ..delivery import Delivery
from ..outcome import Delivered, Outcome, Permanent, Transient
from ..payload import BytesPayload, read_all
from .config import RisConfig
from .model import parse

log = get_logger("nodes.hl7.mllp")
register_safe_fields("reconnects", "delivered", "transient", "permanent")

MEDIA_TYPE = "x-application/hl7-v2+er7"  # what ToHL7 passes on
START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
MAX_FRAME = 16 << 20          # a frame larger than this is not an ACK we will read
# What may travel from an ACK into a reason: MSA-1 is two letters (table 0008); an error
# code is digits (table 0357 and the v2.3 table 0357 codes alike). A RIS's local
# alphanumeric "code" could be a name, so it is dropped rather than judged.
_ACK_CODE = re.compile(r"^[A-Z]{2}$")
_ERROR_CODE = re.compile(r"^[0-9]{1,6}$")


def frame(message: bytes) -> bytes:
    """One MLLP block: 0x0B message 0x1C 0x0D."""
    if START_BLOCK in message or b"\x1c" in message:
        raise ValueError("an HL7 message must not contain the MLLP block characters")
    return START_BLOCK + message + END_BLOCK


def unframe(block: bytes) -> bytes:
    """The message inside one complete MLLP block (ValueError if ``block`` is not one)."""
    if not block.startswith(START_BLOCK) or not block.endswith(END_BLOCK):
        raise ValueError("not an MLLP block")
    return block[1:-2]


class MllpError(Exception):
    """Bytes that are not MLLP framing (the peer is not an MLLP endpoint)."""


class Deframer:
    """Incremental MLLP reader: feed bytes as they come, get complete messages out.

    CR/LF between blocks is tolerated (some peers end a block with 1C 0D 0A); any other byte
    outside a block raises :class:`MllpError`, as does a block larger than ``max_frame``.
    """

    __slots__ = ("_buffer", "_in_block", "max_frame")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buffer = bytearray()
        self._in_block = False
        self.max_frame = max_frame

    @property
    def pending(self) -> bool:
        """True while a block has started and not ended."""
        return self._in_block

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        buf = self._buffer
        buf += data
        while buf:
            if not self._in_block:
                stripped = buf.lstrip(b"\r\n")
                if not stripped:
                    buf.clear()
                    break
                if stripped[:1] != START_BLOCK:
                    buf.clear()
                    raise MllpError("bytes outside an MLLP block")
                del buf[:len(buf) - len(stripped) + 1]
                self._in_block = True
            end = buf.find(END_BLOCK)
            if end < 0:
                if len(buf) > self.max_frame:
                    buf.clear()
                    raise MllpError("MLLP block too large")
                break
            out.append(bytes(buf[:end]))
            del buf[:end + 2]
            self._in_block = False
        return out


# -- ACKs ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ack:
    """The routing-safe facts of an ACK: MSA-1, MSA-2, the first ERR-3 code (if safe)."""

    code: str
    control_id: str
    error_code: str = ""


def parse_ack(data: bytes) -> Ack:
    """An ACK message's facts (ValueError when it has no MSA segment)."""
    message = parse(data)
    msa = message.segment("MSA")
    if msa is None:
        raise ValueError("no MSA segment")
    error = ""
    err = message.segment("ERR")
    if err is not None:
        # v2.5 ERR-3 (HL7 error code, table 0357); v2.3/2.4 ERR-1's fourth component
        error = err.get(3) or err.get(1, 4)
    error = error.strip()
    return Ack(msa.get(1).strip().upper(), msa.get(2).strip(),
               error if _ERROR_CODE.match(error) else "")


def classify_ack(ack: Ack, control_id: str) -> Outcome:
    """What an ACK means for the message with MSH-10 ``control_id``."""
    if ack.control_id != control_id:
        return Transient("ack for another message")
    if ack.code in ("AA", "CA"):
        return Delivered()
    if ack.code in ("AE", "AR", "CE", "CR"):
        return Permanent(f"ack {ack.code}" + (f" err {ack.error_code}" if ack.error_code else ""))
    return Transient("ack with unknown code" if _ACK_CODE.match(ack.code) is None
                     else f"ack with unknown code {ack.code}")


def control_id_of(message: bytes) -> str:
    """MSH-10 of an ER7 message, read from the raw bytes (no full parse)."""
    first = message.split(b"\r", 1)[0]
    if not first.startswith(b"MSH") or len(first) < 4:
        raise ValueError("not an HL7 v2 message")
    fields = first.split(first[3:4])
    return fields[9].decode("ascii", "replace") if len(fields) > 9 else ""


# -- the sender ------------------------------------------------------------------------------------


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


class MllpSender(Node):
    """Sink: sends HL7 v2 messages over MLLP and settles each on its ACK (module docstring)."""

    outputs = ()

    def __init__(self, config: RisConfig, *, name: str = "ris_sender",
                 capacity: int | None = None) -> None:
        super().__init__(name=name, capacity=capacity)
        self.config = config
        self._stream: trio.abc.Stream | None = None
        self._deframer = Deframer()
        self._stats: dict[str, dict[str, int]] = {}

    # -- declared facts / lifecycle ----------------------------------------------------------

    def egress(self) -> list[TcpTarget]:
        return [TcpTarget(self.config.host, self.config.port)]

    async def close(self) -> None:
        await self._disconnect()

    def report(self) -> dict[str, Any]:
        return {"lanes": {lane: dict(figures) for lane, figures in self._stats.items()}}

    async def probe(self, ctx: Context) -> dict[str, Any]:
        """Open (and close) a connection to the RIS: reachable, TLS handshake passes."""
        try:
            stream = await self._connect(ctx)
        except _Failed as failed:
            return {"ok": False, "reason": getattr(failed.outcome, "reason", "")}
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
                    try:
                        ack = parse_ack(blocks[0])
                    except ValueError:
                        raise _Failed(Transient("answer is not an HL7 ACK")) from None
                    outcome = classify_ack(ack, control_id)
                    if ack.control_id != control_id or len(blocks) > 1:
                        raise _Failed(outcome if len(blocks) == 1
                                      else Transient("more than one ack"))
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
                self._stats.setdefault(ctx.lane, {}).setdefault("reconnects", 0)
                self._stats[ctx.lane]["reconnects"] += 1
                log.info("mllp.reconnect", lane=ctx.lane, peer=self._peer)
                continue
            except _Failed as failed:
                await self._disconnect()
                return failed.outcome
            except BaseException:
                await self._disconnect()
                raise
        raise AssertionError("unreachable")

    @property
    def _peer(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    # -- behaviour -------------------------------------------------------------------------------

    async def run(self, ctx: Context) -> None:
        stats = self._stats.setdefault(ctx.lane, {})
        for key in ("sent", "delivered", "transient", "permanent", "reconnects"):
            stats.setdefault(key, 0)
        try:
            async for delivery in ctx.receive():
                await self._deliver(ctx, delivery, stats)
        finally:
            await self._disconnect()

    async def _deliver(self, ctx: Context, delivery: Delivery, stats: dict[str, int]) -> None:
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
        ms = round((time.monotonic() - started) * 1000)
        stats["sent"] += 1
        kind = type(outcome).__name__.lower()
        stats[kind] = stats.get(kind, 0) + 1
        if isinstance(outcome, Delivered):
            log.debug("mllp.delivered", lane=ctx.lane, sop_instance_uid=delivery.uid, ms=ms)
        else:
            log.warning("mllp.not_delivered", lane=ctx.lane, sop_instance_uid=delivery.uid,
                        outcome=kind, reason=getattr(outcome, "reason", ""), peer=self._peer,
                        ms=ms)
        await delivery.settle(outcome)
