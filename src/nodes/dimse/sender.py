"""The C-STORE sender node: forwards stored objects to a PACS, byte for byte.

Port ``in`` receives :class:`~nodes.delivery.Delivery` items of ``application/dicom``; the
node is a sink and settles every delivery exactly once with the outcome
:func:`~nodes.dimse.status.classify_status` (and friends) gives it.

Guarantees:

- Objects are sent as stored: the presentation context is the object's own SOP Class and
  transfer syntax (from its file meta), the data set bytes go out unchanged (pynetdicom's
  chunked send from a file; nothing is decoded or re-encoded). A PACS that accepts no
  context for that pair makes the delivery Permanent (never a conversion; the reason names
  the transfer syntax when the PACS takes the SOP class in others); other objects are
  unaffected.
- Associations are reused across objects and released after ``idle_release_ms`` without
  work. Up to ``max_associations`` run in parallel; a new one opens only while every open
  one is busy. An object whose (SOP Class, transfer syntax) the current association did not
  propose gets a new association proposing it together with the pairs seen recently.
- An object waits for an association only when the lane has none open or opening (then a
  refusal is that object's outcome). A further association is opened ahead, without an
  object, and takes work once the PACS has accepted it; meanwhile objects keep going to the
  open ones. A PACS that refuses it while another is open, or accepts it only once the
  lane's other associations are gone (it serves one association at a time, e.g. DCMTK
  ``storescp`` without ``--fork``), gets one association from this lane from then on
  (until a reload or a new ``flow`` process).
- Objects already waiting when an association is free are sent on it back to back, up to
  ``RUN_MAX`` in one call of its worker thread (each C-STORE still waits for its response
  before the next request), when the association accepted each one's context: no hop
  between Trio and the thread per object. Whatever stops a run (a context to plan again, a
  payload that cannot be read, a lost association) sends the rest one at a time. A run is
  taken from the lane's channel, so up to ``RUN_MAX`` deliveries per association are held
  beside it (small objects in memory, spooled ones still read as they are sent).
- ``ctx.check_tcp`` runs before every connection (fail-closed egress). TCP_NODELAY is set on
  every connection. TLS 1.2+ with the PACS verified; mTLS with a client certificate.
- Outcomes (DESIGN.md table): Success and warnings → Delivered (the warning in the
  detail); 0xA7xx, refused/reset/timed-out/aborted connections, transient rejections →
  Transient; 0xA9xx, 0xCxxx, 0x0122, 0x0124, no accepted context, permanent rejections →
  Permanent; any other status → Transient whose reason says "unknown status". Reasons are
  routing-safe (status codes, rejection codes, host:port).

Cancellation: a blocking pynetdicom call in flight is abandoned by Trio, the association is
aborted, and the node waits (bounded by the timeout) for the worker thread to return, so no
thread outlives the node. Deliveries in flight stay unsettled; the Store re-queues them
(at-least-once; re-sending an object to a PACS is harmless).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import trio

from flow import Context, get_logger, register_safe_fields

from ..delivery import Delivery
from ..outcome import Delivered, Outcome, Permanent, Transient, kind_of, reason_of
from ..payload import CHUNK, FilePayload, Payload
from ..sender import TcpSender, elapsed_ms
from . import _pynetdicom
from ._pynetdicom import AssociationFailed, Peer, accepted, associate, echo
from .config import PacsConfig
from .contexts import MAX_CONTEXTS, uid_name
from ..dicom.filemeta import FileMeta, NotPart10, read_file_meta
from .status import classify_status, connection_failed, hex_status, no_context
from .tls import client_context

log = get_logger("nodes.dimse.sender")
register_safe_fields("delivered", "transient", "permanent", "in_flight", "associations",
                     "transfer_syntax_uid", "association", "established", "others_open")

T = TypeVar("T")
MEMORY_MAX = 16 << 20  # objects up to this size are staged in memory (memfd), larger on disk
OPEN_AHEAD = object()  # a slot's inbox item: open an association, no object yet
RUN_MAX = 8  # objects already waiting that one association sends in one worker call


@dataclass
class _Staged:
    """An object ready for ``send_c_store(path)``: a plain file holding its Part 10 bytes."""

    meta: FileMeta
    path: str
    size: int
    _keep: Any = None  # the open memfd/temp file backing ``path`` (closed by ``close``)

    def close(self) -> None:
        if self._keep is not None:
            self._keep.close()
            self._keep = None


def _stage(payload: Payload, spool_dir: str | None) -> _Staged:
    """Blocking: make ``payload`` a file pynetdicom can stream (FilePayloads already are).

    Other payloads (the Store's decrypting streams, spliced header rewrites) are copied in
    CHUNK-sized blocks into an anonymous memory file, or into a temp file in ``spool_dir``
    when larger than MEMORY_MAX; never held whole in Python memory.
    """
    if isinstance(payload, FilePayload):
        with open(payload.path, "rb") as f:
            return _Staged(read_file_meta(f), payload.path, os.fstat(f.fileno()).st_size)
    size = payload.size
    if size <= MEMORY_MAX and hasattr(os, "memfd_create"):
        keep = os.fdopen(os.memfd_create("dicomflow-send", os.MFD_CLOEXEC), "w+b")
        path = f"/proc/self/fd/{keep.fileno()}"
    else:
        keep = tempfile.NamedTemporaryFile(dir=spool_dir, suffix=".dcm")
        path = keep.name
    try:
        with payload.open() as src:
            shutil.copyfileobj(src, keep, CHUNK)
        keep.flush()
        keep.seek(0)
        return _Staged(read_file_meta(keep), path, size, keep)
    except BaseException:
        keep.close()
        raise


def _stage_and_send(payload: Payload, spool_dir: str | None, assoc: Any,
                    planned: tuple[str, str] | None) -> FileMeta | tuple[int | None, int]:
    """Blocking: stage ``payload`` and C-STORE it on ``assoc`` when its meta is ``planned``:
    (the response's status, None for no response; bytes). Otherwise send nothing and return
    the meta (the caller plans again)."""
    staged = _stage(payload, spool_dir)
    try:
        meta = staged.meta
        if assoc is None or (meta.sop_class_uid, meta.transfer_syntax_uid) != planned:
            return meta
        status = _pynetdicom.store(assoc, staged.path, meta.sop_class_uid,
                                   meta.sop_instance_uid, meta.transfer_syntax_uid,
                                   meta.dataset_offset)
        return status, staged.size
    finally:
        staged.close()


def _store_run(items: list[tuple[Payload, tuple[str, str]]], spool_dir: str | None,
               assoc: Any) -> list[tuple[Any, float]]:
    """Blocking: :func:`_stage_and_send` each (payload, planned) in turn on ``assoc``; per
    object (its result or the exception it raised, milliseconds). Stops after the first
    that did not end in a response (the association may be gone) or sent nothing (its meta
    is not the planned one): the caller sends the rest one at a time."""
    done: list[tuple[Any, float]] = []
    for payload, planned in items:
        started = time.monotonic()
        try:
            result: Any = _stage_and_send(payload, spool_dir, assoc, planned)
        except Exception as exc:
            result = exc
        done.append((result, elapsed_ms(started, 1)))
        if isinstance(result, (Exception, FileMeta)) or result[0] is None:
            break
    return done


def _pair(envelope: Any) -> tuple[str, str] | None:
    """The (SOP class, transfer syntax) an envelope names, or None when it lacks one."""
    if envelope.sop_class_uid and envelope.transfer_syntax_uid:
        return envelope.sop_class_uid, envelope.transfer_syntax_uid
    return None


class _Slot:
    """One association's worth of sending: owns at most one open association."""

    def __init__(self, index: int, wake: Callable[[], None]) -> None:
        self.index = index
        self.wake = wake  # tell the lane an association opened (another may open ahead)
        self.inbox_send, self.inbox = trio.open_memory_channel[Any](0)  # Delivery, OPEN_AHEAD
        self.assoc: Any = None
        self.opening = False  # an A-ASSOCIATE-RQ is (about to be) waiting for the PACS
        self.proposed: set[tuple[str, str]] = set()
        self.accepted: set[tuple[str, str]] = set()

    @property
    def open(self) -> bool:
        return self.assoc is not None and self.assoc.is_established

    def forget(self) -> None:
        self.assoc = None
        self.proposed, self.accepted = set(), set()


class CStoreSender(TcpSender):
    """Sink: C-STOREs deliveries to one PACS, settling each one."""

    config: PacsConfig
    counters = ("delivered", "transient", "permanent", "bytes", "in_flight", "associations")

    def __init__(self, config: PacsConfig, *, name: str = "pacs_sender",
                 capacity: int | None = None) -> None:
        super().__init__(config, name=name, capacity=capacity)
        self._ssl = None
        # (SOP class, transfer syntax) pairs seen, most recent last: proposed together.
        self._pairs: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._slots: dict[str, list[_Slot]] = {}
        self._one_at_a_time: set[str] = set()  # lanes whose PACS serves one association
        self.spool_dir: str | None = config.spool_dir

    # -- declared facts / lifecycle ------------------------------------------------------------

    async def open(self) -> None:
        """Load the TLS files (a bad file fails the start) and set pynetdicom up."""
        cfg = self.config
        if cfg.tls and self._ssl is None:
            self._ssl = client_context(ca=cfg.tls_ca, cert=cfg.tls_cert, key=cfg.tls_key,
                                       check_hostname=cfg.tls_check_hostname)
        _pynetdicom.configure()

    def peer(self) -> Peer:
        cfg = self.config
        return Peer(cfg.host, cfg.port, cfg.called_ae_title, cfg.ae_title,
                    timeout_s=cfg.timeout_ms / 1000, max_pdu=cfg.max_pdu_length,
                    ssl_context=self._ssl, server_hostname=cfg.tls_server_name or cfg.host)

    def lane_report(self, lane: str) -> dict[str, Any]:
        """Besides the counters (outcomes, bytes, deliveries in flight, associations opened
        so far): ``open_associations`` right now."""
        return {"open_associations": sum(slot.open for slot in self._slots.get(lane, ()))}

    async def probe(self, ctx: Context) -> dict[str, Any]:
        """C-ECHO the PACS and ask which of ``sop_classes`` × ``transfer_syntaxes`` it
        accepts (one association per 127 pairs)."""
        await self.open()
        cfg = self.config
        ctx.check_tcp(cfg.host, cfg.port)
        peer = self.peer()
        pairs = [(c, t) for c in cfg.sop_classes for t in cfg.transfer_syntaxes]
        step = MAX_CONTEXTS - 1  # one context is Verification
        chunks = [pairs[i:i + step] for i in range(0, len(pairs), step)] or [[]]
        got: set[tuple[str, str]] = set()
        first = None
        for chunk in chunks:
            result = await trio.to_thread.run_sync(echo, peer, chunk)
            if first is None:
                first = result
                if not result.ok:
                    return {"ok": False, "reason": result.reason}
            got |= result.accepted
        assert first is not None
        accepts = {uid_name(c): [uid_name(t) for t in cfg.transfer_syntaxes if (c, t) in got]
                   for c in cfg.sop_classes if any((c, t) in got for t in cfg.transfer_syntaxes)}
        refuses = [uid_name(c) for c in cfg.sop_classes if uid_name(c) not in accepts]
        return {"ok": True, "echo": hex_status(first.status or 0), "ms": first.ms,
                "accepts": accepts, "refuses": refuses,
                "warnings": _syntax_warnings(cfg.sop_classes, cfg.transfer_syntaxes, got)}

    # -- behaviour -----------------------------------------------------------------------------

    async def run(self, ctx: Context) -> None:
        await self.open()
        stats = self.lane_stats(ctx.lane)
        peer = self.peer()
        slots: list[_Slot] = []
        self._slots[ctx.lane] = slots
        idle: list[_Slot] = []  # LIFO: the most recently used slot (open association) first
        freed = trio.Event()

        def new_slot(nursery: trio.Nursery) -> _Slot:
            slot = _Slot(len(slots), lambda: freed.set())
            slots.append(slot)
            nursery.start_soon(self._slot_loop, ctx, peer, slot, slots, idle_back, stats,
                               settle_soon)
            return slot

        async def next_slot(nursery: trio.Nursery) -> _Slot:
            """An idle slot with its association open; else, when the lane has no association
            open or opening, a slot that opens one for the object it is given; else wait,
            opening one more ahead when every open association is busy."""
            nonlocal freed
            while True:
                ready = [slot for slot in idle if slot.open]
                if ready:
                    idle.remove(ready[-1])  # the most recently used: its association is warm
                    return ready[-1]
                live = sum(slot.open or slot.opening for slot in slots)
                cap = 1 if ctx.lane in self._one_at_a_time else self.config.max_associations
                if not live:
                    if idle:
                        return idle.pop()
                    if len(slots) < cap:
                        return new_slot(nursery)
                elif live < cap and not any(slot.opening for slot in slots):
                    # Never hand an object to an association the PACS has not accepted yet:
                    # one that serves associations one at a time would hold it until the
                    # open one is released on idle.
                    ahead = idle.pop() if idle else \
                        new_slot(nursery) if len(slots) < cap else None
                    if ahead is not None:
                        ahead.opening = True
                        await ahead.inbox_send.send(OPEN_AHEAD)
                        continue
                await freed.wait()
                freed = trio.Event()

        def idle_back(slot: _Slot) -> None:
            idle.append(slot)
            freed.set()

        async with self.settling_beside(ctx) as settle_soon, trio.open_nursery() as nursery:
            try:
                while True:
                    slot = await next_slot(nursery)
                    try:
                        delivery = await ctx.receive_one()
                    except trio.EndOfChannel:
                        idle.append(slot)
                        break
                    if not slot.open:  # released while the lane waited for work: choose now
                        idle.append(slot)
                        slot = await next_slot(nursery)
                    slot.opening = not slot.open
                    run = [delivery]
                    if slot.open:  # what already waits, shared with the other free ones
                        waiting = ctx.inputs["in"].statistics().current_buffer_used
                        free = 1 + sum(other.open for other in idle)
                        run += ctx.receive_ready(min(RUN_MAX - 1, int(waiting) // free))
                    await slot.inbox_send.send(run if len(run) > 1 else delivery)
            finally:
                for slot in slots:
                    slot.inbox_send.close()

    async def _slot_loop(self, ctx: Context, peer: Peer, slot: _Slot, slots: list[_Slot],
                         idle_back: Callable[[_Slot], None], stats: dict[str, int],
                         settle_soon: Callable[..., Any]) -> None:
        idle_s = self.config.idle_release_ms / 1000
        finished = False
        try:
            while True:
                delivery = None
                with trio.move_on_after(idle_s if slot.open else float("inf")):
                    try:
                        delivery = await slot.inbox.receive()
                    except trio.EndOfChannel:
                        finished = True
                        return
                if delivery is None:  # idle: give the association back to the PACS
                    await self._release(slot)
                    continue
                if delivery is OPEN_AHEAD:
                    try:
                        await self._open_ahead(ctx, peer, slot, slots)
                    finally:
                        slot.opening = False
                    idle_back(slot)
                    continue
                run = delivery if isinstance(delivery, list) else [delivery]
                stats["in_flight"] += len(run)
                try:
                    rest = await self._send_run(ctx, peer, slot, run, stats, settle_soon) \
                        if len(run) > 1 else run
                    for one in rest:
                        await self._deliver(ctx, peer, slot, one, stats, settle_soon)
                finally:
                    stats["in_flight"] -= len(run)
                    slot.opening = False
                idle_back(slot)
        finally:
            if slot.assoc is not None:
                with trio.CancelScope(shield=True):
                    if finished:  # the lane ended: a polite A-RELEASE
                        await self._release(slot)
                    else:  # cancelled or crashed: A-ABORT, which cannot hang on the peer
                        assoc = slot.assoc
                        slot.forget()
                        await trio.to_thread.run_sync(_abort, assoc)

    async def _open_ahead(self, ctx: Context, peer: Peer, slot: _Slot,
                          slots: list[_Slot]) -> None:
        """Open an association on ``slot`` (while the lane's others are busy) proposing what
        the lane sends; a PACS that refuses it while another is open, or accepts it only
        once the others are gone, serves one association at a time: the lane keeps to one."""
        if not self._pairs:
            return
        refused = await self._ensure_association(ctx, peer, slot, next(reversed(self._pairs)))
        others = sum(other.open for other in slots if other is not slot)
        log.info("dimse.association_ahead", lane=ctx.lane, association=slot.index,
                 established=slot.open, others_open=others,
                 reason=reason_of(refused) if refused is not None and not slot.open else "")
        if (slot.open and not others) or (not slot.open and others):
            self._one_at_a_time.add(ctx.lane)
            log.warning("dimse.one_association_at_a_time", lane=ctx.lane,
                        peer=self.peer_address)

    async def _release(self, slot: _Slot) -> None:
        assoc = slot.assoc
        slot.forget()
        if assoc is not None and assoc.is_established:
            await trio.to_thread.run_sync(assoc.release)
        elif assoc is not None:
            await trio.to_thread.run_sync(assoc.abort)

    async def _deliver(self, ctx: Context, peer: Peer, slot: _Slot, delivery: Delivery,
                       stats: dict[str, int], settle_soon: Callable[..., Any]) -> None:
        started = time.monotonic()
        outcome, status, size = await self._attempt(ctx, peer, slot, delivery.payload,
                                                    _pair(delivery.envelope))
        await self._report(ctx, slot, delivery, (outcome, status, size),
                           elapsed_ms(started, 1), stats, settle_soon)

    async def _send_run(self, ctx: Context, peer: Peer, slot: _Slot, run: list[Delivery],
                        stats: dict[str, int], settle_soon: Callable[..., Any]
                        ) -> list[Delivery]:
        """Send ``run`` (deliveries that were waiting, in order) back to back on the slot's
        open association in one worker call, as far as each one's envelope names a context
        that association accepted; settle those sent. Returns the deliveries left to send
        one at a time (from the first the run did not send, or whose send did not end in a
        response)."""
        planned: list[tuple[str, str]] = []
        for delivery in run:
            pair = _pair(delivery.envelope)
            if pair is None or pair not in slot.accepted:
                break
            planned.append(pair)
        if len(planned) < 2 or not slot.open:
            return run
        for pair in planned:
            self._seen(pair)
        assoc = slot.assoc
        results = await self._blocking(
            _store_run, [(d.payload, pair) for d, pair in zip(run, planned)], self.spool_dir,
            assoc, on_cancel=partial(_abort_and_wake, assoc))
        for i, (delivery, (result, ms)) in enumerate(zip(run, results)):
            if isinstance(result, FileMeta):  # sent nothing: planned again one at a time
                return run[i:]
            attempted = await self._outcome(peer, slot, delivery.payload, result)
            await self._report(ctx, slot, delivery, attempted, ms, stats, settle_soon)
            if attempted[1] is None:  # the run stopped here (no response, or the payload
                return run[i + 1:]  # could not be sent): the rest go one at a time
        return run[len(results):]

    async def _report(self, ctx: Context, slot: _Slot, delivery: Delivery,
                      attempted: tuple[Outcome, int | None, int], ms: float,
                      stats: dict[str, int], settle_soon: Callable[..., Any]) -> None:
        """Count, log and settle what one C-STORE of ``delivery`` came to."""
        outcome, status, size = attempted
        kind = kind_of(outcome)
        stats[kind] += 1
        if isinstance(outcome, Delivered):
            stats["bytes"] += size
        env = delivery.envelope
        fields = dict(lane=ctx.lane, association=slot.index, sop_instance_uid=delivery.uid,
                      sop_class_uid=env.sop_class_uid, outcome=kind,
                      status=hex_status(status) if status is not None else "", bytes=size,
                      ms=ms)
        if isinstance(outcome, Delivered) and not outcome.detail:
            log.info("dimse.sent", **fields)
        else:
            log.warning("dimse.not_sent" if not isinstance(outcome, Delivered) else "dimse.sent",
                        reason=reason_of(outcome), **fields)
        # The Store commits the outcome (sync): the association moves on to the next object
        # meanwhile, and outcomes settled close together share one group commit.
        await settle_soon(delivery, outcome)

    async def _attempt(self, ctx: Context, peer: Peer, slot: _Slot, payload: Payload,
                       planned: tuple[str, str] | None) -> tuple[Outcome, int | None, int]:
        """One C-STORE of ``payload``: (outcome, status or None, bytes).

        The association is chosen for the envelope's (SOP class, transfer syntax); the worker
        thread that stages the payload checks that its file meta agrees before sending, so an
        object costs one thread hop. A disagreeing meta (an envelope that is not the whole
        truth) is planned again from the meta.
        """
        for _ in range(2):
            if planned is not None:
                refused = await self._ensure_association(ctx, peer, slot, planned)
                if refused is not None:
                    return refused, None, payload.size
            assoc = slot.assoc if planned is not None else None
            try:
                result = await self._blocking(
                    _stage_and_send, payload, self.spool_dir, assoc, planned,
                    on_cancel=partial(_abort_and_wake, assoc) if assoc is not None else None)
            except (NotPart10, OSError, RuntimeError, ValueError) as exc:
                return await self._outcome(peer, slot, payload, exc)
            if isinstance(result, FileMeta):  # sent nothing: plan for what the object is
                planned = (result.sop_class_uid, result.transfer_syntax_uid)
                continue
            return await self._outcome(peer, slot, payload, result)
        raise AssertionError("file meta changed between two reads")

    async def _outcome(self, peer: Peer, slot: _Slot, payload: Payload, result: Any
                       ) -> tuple[Outcome, int | None, int]:
        """(outcome, status or None, bytes) of one send that ended in ``result``: the
        response's (status, bytes), or the exception the send raised. An association that
        is lost, or gave no response, is let go here."""
        if isinstance(result, NotPart10):
            return Permanent(f"payload is not a DICOM Part 10 file ({result})"), None, \
                payload.size
        if isinstance(result, OSError):
            return Transient(f"payload unreadable ({type(result).__name__})"), None, \
                payload.size
        if isinstance(result, (RuntimeError, ValueError)):  # association lost mid-send
            await self._release(slot)
            return connection_failed(f"association lost ({type(result).__name__})",
                                     peer.host, peer.port), None, payload.size
        if isinstance(result, BaseException):
            raise result
        status, size = result
        if status is None:  # no response: DIMSE timeout or abort; pynetdicom aborted
            await self._release(slot)
            return connection_failed("no C-STORE response from", peer.host, peer.port), \
                None, size
        return classify_status(status), status, size

    def _proposal(self, pair: tuple[str, str]) -> list[tuple[str, str]]:
        """Contexts for a new association: ``pair``, its SOP class in the configured
        ``transfer_syntaxes`` (so a refused syntax can be told from a refused class), the
        pairs seen most recently, then the configured common ones (``sop_classes`` ×
        ``transfer_syntaxes``), at most 128 — so that a mixed study (CT, MR, SR, compressed
        or not) usually needs one association."""
        cfg = self.config
        common = [(c, t) for c in cfg.sop_classes for t in cfg.transfer_syntaxes]
        same_class = [(pair[0], t) for t in cfg.transfer_syntaxes]
        ordered = dict.fromkeys([pair, *same_class, *reversed(self._pairs), *common])
        return list(ordered)[:MAX_CONTEXTS]

    def _seen(self, pair: tuple[str, str]) -> None:
        """``pair`` was sent (or is about to be) most recently: proposed early on a new
        association (:meth:`_proposal`)."""
        self._pairs[pair] = None
        self._pairs.move_to_end(pair)

    async def _ensure_association(self, ctx: Context, peer: Peer, slot: _Slot,
                                  pair: tuple[str, str]) -> Outcome | None:
        """An association on ``slot`` with an accepted context for ``pair``, or the outcome
        that makes sending impossible (rejection, refused connection, no context)."""
        self._seen(pair)
        if not slot.open or pair not in slot.proposed:
            if slot.assoc is not None:
                await self._release(slot)
            ctx.check_tcp(peer.host, peer.port)
            contexts = self._proposal(pair)
            slot.opening = True
            requested: list[Any] = []  # the association, once its connection is open
            try:
                # Cancelled while the PACS has not answered (one that serves one association
                # at a time holds the request): abort it now, not after the ACSE timeout.
                slot.assoc = await self._blocking(
                    associate, peer, contexts, requested.append, discard=_abort,
                    on_cancel=lambda: _pynetdicom.abort_request(requested[0])
                    if requested else None)
            except AssociationFailed as exc:
                return exc.outcome
            finally:
                slot.opening = False
            self._stats[ctx.lane]["associations"] += 1
            slot.wake()
            slot.proposed, slot.accepted = set(contexts), accepted(slot.assoc)
            if not slot.assoc.is_established:  # the PACS accepted none of them
                slot.forget()
                return no_context(*pair)
        if pair not in slot.accepted:
            taken = sorted(ts for sop_class, ts in slot.accepted if sop_class == pair[0])
            instead = [ts for ts in dict.fromkeys([*self.config.transfer_syntaxes, *taken])
                       if ts in taken]
            return no_context(*pair, instead)
        return None

    async def _blocking(self, fn: Callable[..., T], *args: Any,
                        on_cancel: Callable[[], None] | None = None,
                        discard: Callable[[T], None] | None = None) -> T:
        """``fn(*args)`` in a worker thread. On cancellation: ``on_cancel()`` (abort the
        association in use), wait, shielded and bounded, for the worker to return so that
        no thread outlives the node, hand a result nobody will use to ``discard`` (abort a
        just-opened association), then re-raise."""
        done = threading.Event()
        box: list[T] = []

        def work() -> T:
            try:
                box.append(fn(*args))
                return box[0]
            finally:
                done.set()

        try:
            return await trio.to_thread.run_sync(work, abandon_on_cancel=True)
        except trio.Cancelled:
            with trio.CancelScope(shield=True):
                if on_cancel is not None:
                    await trio.to_thread.run_sync(on_cancel)
                await trio.to_thread.run_sync(done.wait, self.config.timeout_ms / 1000 * 3)
                if box and discard is not None:
                    await trio.to_thread.run_sync(discard, box[0])
            raise


def _syntax_warnings(sop_classes: list[str], syntaxes: list[str],
                     accepted: set[tuple[str, str]]) -> list[str]:
    """One line per transfer syntax the PACS refuses for a SOP class it does accept: objects
    received in that syntax would be dead-lettered (they are never converted)."""
    taken = [c for c in sop_classes if any((c, t) in accepted for t in syntaxes)]
    lines = []
    for ts in syntaxes:
        refused = [c for c in taken if (c, ts) not in accepted]
        if not refused:
            continue
        which = "any SOP class it accepts" if len(refused) == len(taken) else \
            ", ".join(uid_name(c) for c in refused)
        lines.append(f"transfer syntax {uid_name(ts)} ({ts}) not accepted for {which}: "
                     "objects received in it will be dead-lettered, never converted")
    return lines


def _abort(assoc: Any) -> None:
    assoc.abort()


def _abort_and_wake(assoc: Any) -> None:
    """Abort ``assoc`` while another thread waits in ``send_c_store`` for the response.

    pynetdicom's ``send_c_store`` blocks in ``dimse.get_msg()`` until a response arrives or
    ``dimse_timeout`` passes; a peer abort or a closed connection wakes it with a
    ``(None, None)`` message (pynetdicom fsm AA-2/3/4), a local abort does not. Wake it the
    same way, so that the worker returns now instead of after the DIMSE timeout.
    """
    _pynetdicom.abort_and_wake(assoc)


