"""The DICOM listener node: a C-STORE / C-ECHO SCP that acknowledges only after the commit.

Port ``out`` emits :class:`~nodes.arrival.Arrival` items (connect it to a Store). The node
is a source (no inputs).

Guarantees:

- A C-STORE is answered 0x0000 (Success) only after the Store committed the object (the
  arrival's receipt says committed). Store full → 0xA700; Store failed → 0xA701; no
  commit within ``commit_timeout_ms`` or the listener stopping → 0xA702 (all "out of
  resources": the sender retries later); a data set whose SOP Class/Instance UID differs
  from the command → 0xA900, one that cannot be parsed → 0xC000, neither committed.
- The arrival's payload is the complete Part 10 file exactly as received: a file meta built
  from the command's SOP Class/Instance UID, the accepted transfer syntax, our
  implementation UID and the calling AE title, followed by the received data set bytes,
  unchanged. Pixel data is never decoded; the routing-safe envelope comes from a header
  read that stops before Pixel Data. Data sets up to 2 MiB are received in memory; larger
  ones spill to a file in the spool dir as they arrive (pynetdicom's chunked receive into a
  :class:`~._pynetdicom.SpillFile`) and are streamed from it; the file is deleted once the
  C-STORE is answered.
- Connections that have not delivered their A-ASSOCIATE-RQ are bounded apart from
  ``max_associations`` (overall, per peer address, in time: see :mod:`.budget`) and never
  take a negotiated association's place; ``max_associations`` counts negotiated ones only.
- Every storage SOP class pynetdicom knows (plus ``extra_sop_classes``) in every common
  transfer syntax, and Verification, are accepted. A presentation context proposing several
  syntaxes gets the requestor's first that we accept, or the first of the site's
  ``transfer_syntax_preference`` it proposes (:func:`~._pynetdicom.acceptor_contexts`).
  Calling AE allowlist and called-AE check per config; TLS 1.2+ and opt-in mTLS;
  TCP_NODELAY on accepted sockets.

Cancellation (graceful stop): the server stops accepting associations at once and closes
every connection still negotiating; negotiated associations get ``drain_ms`` to finish
(their C-STOREs are still committed normally) and are then aborted. A C-STORE in flight
at that point is never answered Success unless its commit happened. Logs carry
routing-safe fields only.
"""

from __future__ import annotations

import errno
import io
import mmap
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import trio
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
                         ExplicitVRLittleEndian, ImplicitVRLittleEndian)
from pynetdicom import build_context, evt, register_uid
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import ThreadedAssociationServer

from flow import COUNTER, GAUGE, Context, Metric, Node, get_logger, register_safe_fields

from ..arrival import Arrival, Envelope, StoreFailed, StoreFull
from ..payload import BytesPayload, FilePayload, Payload, SplicedPayload
from . import _pynetdicom, cstore
from .budget import ConnectionBudget
from .config import ListenConfig
from .contexts import ACCEPTED_TRANSFER_SYNTAXES, STORAGE_SOP_CLASSES
from ..dicom import (CutShort, Unscannable, check_complete, encode_file_meta, read_envelope,
                     read_file_meta)
from .status import (CANNOT_UNDERSTAND, DATASET_MISMATCH, NOT_NOW, OUT_OF_RESOURCES, STORE_FAILED,
                     STORED, hex_status)
from .tls import server_context

log = get_logger("nodes.dimse.listener")
register_safe_fields("objects", "associations", "in_flight", "transfer_syntax_uid", "allowlist",
                     "removed", "pending", "suppressed")

INLINE_MAX = _pynetdicom.INLINE_MAX  # data sets up to this size go to the Store in memory
# Compressed syntaxes encode the data set as explicit VR little endian (PS3.5 A.4).
_ENCAPSULATED_LE = frozenset(ACCEPTED_TRANSFER_SYNTAXES) - {
    ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian}
_IMPLICIT = {ImplicitVRLittleEndian: True, ExplicitVRLittleEndian: False}


def _implicit_vr(ts: str) -> bool | None:
    """Whether a data set in transfer syntax ``ts`` is implicit VR little endian; None when
    it is not little endian as received (deflate, big endian): the scanners leave it."""
    return _IMPLICIT.get(ts, False if ts in _ENCAPSULATED_LE else None)


def _check_complete(path: str, data: bytes | None, offset: int, size: int, ts: str) -> None:
    """Raise :class:`~nodes.dicom.CutShort` when the data set received ends inside an element
    (:func:`~nodes.dicom.check_complete`): from memory, or from the spool file through mmap.
    Says nothing of a data set it cannot walk (deflate, big endian, an unknown layout) or
    read."""
    implicit = _implicit_vr(ts)
    if implicit is None or size <= 0:
        return
    try:
        if data is not None:
            check_complete(data, implicit)
        else:
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                check_complete(m, implicit, offset, offset + size)
    except CutShort:
        raise
    except (Unscannable, OSError, ValueError):  # not walkable, or the spool file unreadable:
        pass  # the Store reads the same file and answers for it


def _read_header(path: str, data: bytes | None, ts: str, meta: bytes) -> dict[str, str]:
    """The envelope's elements by keyword (:func:`~nodes.dicom.read_envelope`): ``data``
    if in memory, else pydicom reads the spool file at ``path``; ``meta`` names the accepted
    transfer syntax when pydicom reads ``data``."""
    source: Any = path if data is None else io.BytesIO(meta + data)
    return read_envelope(data, _implicit_vr(ts), source)


def _received(request: Any, path: str) -> tuple[bytes | None, int, int]:
    """(data set bytes if small else None, data set offset in ``path``, data set size).

    A :class:`~._pynetdicom.SpillFile` holds a small data set in memory and says where a
    spilled one starts; pynetdicom's stock temp file (if our receive hook is not in place)
    is read back from disk."""
    spool = getattr(request, "_dataset_file", None)
    if isinstance(spool, _pynetdicom.SpillFile):
        if not spool.spilled:
            data = spool.getvalue()
            return data, 0, len(data)
        return None, spool.dataset_offset, spool.dataset_size
    with open(path, "rb") as f:
        offset = read_file_meta(f).dataset_offset
        size = os.fstat(f.fileno()).st_size - offset
        f.seek(offset)
        return (f.read() if size <= INLINE_MAX else None), offset, size


BUDGET_LOG_EVERY_S = 10.0
_BUDGET_EVENTS = {"refused": "dimse.connection_refused", "timeout": "dimse.negotiation_timeout",
                  "protocol": "dimse.connection_closed", "tls": "dimse.tls_failed"}


class _Throttle:
    """At most one line per key every ``every_s``; :meth:`allow` says how many were
    withheld since the last one (None: withhold this one)."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._withheld: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.every_s:
                self._withheld[key] = self._withheld.get(key, 0) + 1
                return None
            self._last[key] = now
            return self._withheld.pop(key, 0)


class _Refused(Exception):
    """A data set we will not commit; ``status`` is the answer."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status
        self.why = why


class _SharedContext(PresentationContext):
    """A supported context whose deep copy shares its (immutable) UIDs.

    pynetdicom deep-copies the SCP's supported contexts for every association; with every
    storage class in every transfer syntax that is ~6000 UIDs, each re-validated by pydicom
    on copy: ~50 ms per association. The copy only needs its own lists.
    """

    @classmethod
    def of(cls, sop_class: str, transfer_syntaxes: Sequence[str]) -> "_SharedContext":
        built = build_context(sop_class, list(transfer_syntaxes))
        context = cls()
        context.__dict__.update(built.__dict__)
        return context

    def __deepcopy__(self, memo: dict[int, Any]) -> "_SharedContext":
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__)
        copy._transfer_syntax = list(self._transfer_syntax)
        return copy


def _register_storage_class(sop_class: str) -> None:
    """Make pynetdicom route C-STOREs of a private/unknown class to the Storage service
    (without this it answers them with no service class and drops the association)."""
    if sop_class not in STORAGE_SOP_CLASSES and uid_to_service_class(sop_class) is not \
            StorageServiceClass:
        register_uid(sop_class, "Storage_" + sop_class.replace(".", "_"), StorageServiceClass)


class _Handover:
    """One C-STORE's arrival, waited for by its pynetdicom thread until the Store answers.

    ``done`` is set (in the Trio thread) by the arrival's receipt, or by :meth:`fail` when
    the listener answers itself: commit timeout (``deadline``, Trio clock), listener
    stopping, output channel gone. ``error`` is then the listener's reason."""

    __slots__ = ("arrival", "done", "error", "deadline", "_waiting")

    def __init__(self, arrival: Arrival) -> None:
        self.arrival = arrival
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.deadline = 0.0
        self._waiting: dict[_Handover, None] | None = None
        arrival.receipt.notify = self._answered

    def wait_in(self, waiting: dict[_Handover, None], deadline: float) -> None:
        self.deadline = deadline
        self._waiting = waiting
        waiting[self] = None

    def fail(self, error: BaseException) -> None:
        if not self.arrival.receipt.done and self.error is None:
            self.error = error
        self._answered()

    def _answered(self) -> None:
        if self._waiting is not None:
            self._waiting.pop(self, None)
        self.done.set()


# A-ASSOCIATE-RJ (source, diagnostic) → the reason /metrics counts (PS3.8 9.3.4; what
# pynetdicom sends for require_calling_aet, require_called_aet, maximum_associations).
_REJECTIONS = {(1, 3): "calling_ae", (1, 7): "called_ae", (3, 2): "limit", (3, 1): "congestion"}


def rejection_reason(rsp: Any) -> str:
    if rsp is None:
        return "other"
    return _REJECTIONS.get((rsp.result_source, rsp.diagnostic), "other")


def _peer(assoc: Any) -> str:
    info = assoc.requestor.address_info
    return f"{info.address}:{info.port}" if info is not None else ""


class DicomListener(Node):
    """Source: a C-STORE SCP emitting Arrivals; answers Success only after the commit."""

    inputs = ()
    outputs = ("out",)
    signals_ready = True  # ctx.ready() once the server accepts: a service manager's READY

    def __init__(self, config: ListenConfig, *, name: str = "dicom_listener",
                 capacity: int | None = None) -> None:
        super().__init__(name=name, capacity=capacity)
        self.config = config
        self._ssl = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._send: trio.MemorySendChannel | None = None
        self._backlog: deque[_Handover] = deque()  # handed over, channel full: for _pump
        self._backlog_grew = trio.Event()
        self._waiting: dict[_Handover, None] = {}  # handed over, not answered: by deadline
        self._waiting_grew = trio.Event()
        self._server: ThreadedAssociationServer | None = None
        self._lane: str | None = None
        self._lock = threading.Lock()
        self._assocs: dict[int, list[Any]] = {}
        self._supported: dict[str, frozenset[str]] = {}  # SOP class -> accepted syntaxes
        self.listening = trio.Event()  # set once the server accepts (for tests and tools)
        self._stats = {"associations": 0, "stored": 0, "refused": 0, "rejected": 0,
                       "bytes": 0, "in_flight": 0, "connections_closed": 0}
        self._budget_log = _Throttle(BUDGET_LOG_EVERY_S)
        self._rejected_by: dict[str, int] = {}  # by rejection_reason(): for /metrics
        self._unanswered: set[int] = set()  # TLS connections with no association yet
        self._answers: dict[int, int] = {}  # C-STORE answers by status: for /metrics

    # -- declared facts / lifecycle ------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) the server is bound to (the configured one before it runs)."""
        if self._server is not None:
            host, port = self._server.server_address[:2]
            return str(host), int(port)
        return self.config.host, self.config.port

    async def open(self) -> None:
        """Load the TLS files (a bad file fails the start) and set pynetdicom up."""
        cfg = self.config
        if cfg.tls:
            self._ssl = server_context(cert=cfg.tls_cert, key=cfg.tls_key, ca=cfg.tls_ca,
                                       require_client_cert=cfg.require_client_cert,
                                       handshake_timeout=cfg.acse_timeout_ms / 1000)
        _pynetdicom.configure()
        if cfg.spool_dir:
            os.makedirs(cfg.spool_dir, mode=0o700, exist_ok=True)
            _pynetdicom.use_spool_dir(cfg.spool_dir)
        # A large object being received when a process was killed left its spill file.
        removed = await trio.to_thread.run_sync(_pynetdicom.sweep_spill_files, cfg.spool_dir)
        if removed:
            log.warning("dimse.spool_swept", node=self.name, removed=removed,
                        reason="partial objects left by a process that stopped mid-transfer")

    def report(self) -> dict[str, Any]:
        """Routing-safe counters of this process's listener, under its lane once running."""
        figures = {"ae_title": self.config.ae_title, "port": self.address[1], **self._stats}
        return {"listener": figures, "lanes": {self._lane: figures} if self._lane else {}}

    def metrics(self) -> list[Metric]:
        """This process's listener counters (labels: node, AE title, reason, status)."""
        node = {"node": self.name}
        with self._lock:
            stats, open_now = dict(self._stats), len(self._assocs)
            rejected, answers = dict(self._rejected_by), dict(self._answers)
        ae = {**node, "ae_title": self.config.ae_title}
        out = [Metric("ingest_objects", COUNTER, "Objects received and committed", stats["stored"],
                      ae),
               Metric("ingest_bytes", COUNTER, "Data set bytes received and committed",
                      stats["bytes"], ae),
               Metric("associations_open", GAUGE, "Associations open now", open_now, node),
               Metric("associations", COUNTER, "Associations accepted", stats["associations"],
                      node)]
        out += [Metric("associations_rejected", COUNTER, "Associations rejected, by reason",
                       count, {**node, "reason": reason}) for reason, count in rejected.items()]
        out += [Metric("cstore_answers", COUNTER, "C-STORE responses sent, by status",
                       count, {**node, "status": hex_status(status)})
                for status, count in answers.items()]
        return out

    # -- behaviour -----------------------------------------------------------------------------

    async def run(self, ctx: Context) -> None:
        if self._ssl is None and self.config.tls:
            await self.open()
        _pynetdicom.configure()
        self._token = trio.lowlevel.current_trio_token()
        self._lane = ctx.lane
        self._send = ctx.outputs["out"]
        server = await trio.to_thread.run_sync(self._start_server)
        self._server = server
        self.listening.set()
        ctx.ready()
        cfg = self.config
        host, port = self.address
        log.info("dimse.listening", node=self.name, host=host, port=port, ae_title=cfg.ae_title,
                 tls=cfg.tls, allowlist=",".join(cfg.calling_ae_titles) or "ANY")
        if not cfg.calling_ae_titles:
            log.warning("dimse.any_calling_ae", node=self.name, ae_title=cfg.ae_title,
                        reason="calling_ae_titles is empty: any calling AE title is accepted")
        async with trio.open_nursery() as nursery:
            handovers = await nursery.start(self._handovers)
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    await self._stop(server)
                handovers.cancel()
                self._release_waiting()

    async def _stop(self, server: ThreadedAssociationServer) -> None:
        # No new associations from here on; connections still negotiating are closed.
        await trio.to_thread.run_sync(server.shutdown)
        self.listening = trio.Event()
        with trio.move_on_after(self.config.drain_ms / 1000):
            while _pynetdicom.negotiated(server):
                await trio.sleep(0.05)
        left = _pynetdicom.negotiated(server)
        for assoc in left:
            await trio.to_thread.run_sync(assoc.abort)
        self._send = None
        log.info("dimse.stopped", node=self.name, associations=len(left),
                 pending=getattr(server, "closed_at_stop", 0))

    def _start_server(self) -> ThreadedAssociationServer:
        cfg = self.config
        ae = _pynetdicom.new_ae(cfg.ae_title, cfg.network_timeout_ms / 1000, cfg.max_pdu_length)
        ae.acse_timeout = cfg.acse_timeout_ms / 1000
        ae.dimse_timeout = cfg.dimse_timeout_ms / 1000
        ae.require_called_aet = cfg.strict_called_ae
        ae.require_calling_aet = list(cfg.calling_ae_titles)
        for sop_class in cfg.extra_sop_classes:
            _register_storage_class(sop_class)
        # pynetdicom's own order, used only if _on_requested fails: the preference first.
        syntaxes = tuple(dict.fromkeys([*cfg.preferred_transfer_syntaxes,
                                        *ACCEPTED_TRANSFER_SYNTAXES]))
        contexts = [_SharedContext.of(sop_class, syntaxes)
                    for sop_class in dict.fromkeys([*STORAGE_SOP_CLASSES,
                                                    *cfg.extra_sop_classes])]
        contexts.append(_SharedContext.of(_pynetdicom.VERIFICATION,
                                          ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")))
        self._supported = {str(cx.abstract_syntax): frozenset(map(str, cx.transfer_syntax))
                           for cx in contexts}
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        if cfg.tcp_nodelay:
            handlers.append((evt.EVT_CONN_OPEN, _pynetdicom.set_nodelay))
        if self._ssl is not None and _pynetdicom.budget_hooks_missing():
            # pynetdicom's own server: a connection that closes unanswered failed its TLS
            # handshake. With the budget, BudgetedServer reports the failure ("tls" event).
            handlers += [(evt.EVT_CONN_OPEN, self._on_tls_connection),
                         (evt.EVT_CONN_CLOSE, self._on_tls_connection_closed)]
        budget = ConnectionBudget(cfg.max_pending_connections, cfg.max_pending_per_peer,
                                  cfg.negotiation_timeout_ms / 1000)
        server, missing = _pynetdicom.start_server(
            ae, (cfg.host, cfg.port), ssl_context=self._ssl, evt_handlers=handlers,
            contexts=contexts, max_associations=cfg.max_associations, budget=budget,
            on_event=self._on_budget_event)
        if missing:
            log.warning("dimse.connection_budget_unavailable", node=self.name,
                        reason=f"this pynetdicom lacks: {missing}; every connection counts "
                               "against max_associations until acse_timeout_ms")
        return server

    def _on_budget_event(self, kind: str, peer: str, reason: str) -> None:
        """A connection the budget closed (accept/DUL thread): counted, and logged at most
        once per BUDGET_LOG_EVERY_S per kind (a flood must not fill the log)."""
        with self._lock:
            self._stats["connections_closed"] += 1
            if kind == "tls":  # for /metrics: rejected before any A-ASSOCIATE-RQ was read
                self._rejected_by["tls"] = self._rejected_by.get("tls", 0) + 1
        suppressed = self._budget_log.allow(kind)
        if suppressed is not None:
            log.warning(_BUDGET_EVENTS[kind], node=self.name, peer=peer, reason=reason,
                        suppressed=suppressed)

    # -- pynetdicom handlers (run in pynetdicom's threads) -------------------------------------

    def _on_requested(self, event: Any) -> None:
        """Before pynetdicom negotiates: this association's supported contexts, ordered so
        that each proposed context gets the syntax the requestor (or the site) prefers.
        pynetdicom would accept the first of *its* list instead, e.g. Explicit VR Little
        Endian over the JPEG-LS a modality proposed first, and the modality would decompress.
        Should that fail, pynetdicom's own order stays, and the log says so."""
        assoc = event.assoc
        try:
            assoc.acceptor.supported_contexts = _pynetdicom.acceptor_contexts(
                assoc.requestor.requested_contexts, self._supported,
                self.config.preferred_transfer_syntaxes)
        except Exception as exc:  # a pynetdicom release that changed: negotiate as before
            log.error("dimse.negotiation_fallback", node=self.name, peer=_peer(assoc),
                      error_class=type(exc).__name__,
                      reason="transfer syntaxes accepted in the listener's own order, not "
                             "the requestor's: compressed objects may arrive decompressed")

    def _on_tls_connection(self, event: Any) -> None:
        with self._lock:
            self._unanswered.add(id(event.assoc))

    def _on_tls_connection_closed(self, event: Any) -> None:
        """A TLS connection that closes before any A-ASSOCIATE-RQ was answered failed its
        handshake (or its peer gave up before asking): rejected for reason ``tls``."""
        with self._lock:
            if id(event.assoc) in self._unanswered:
                self._unanswered.discard(id(event.assoc))
                self._rejected_by["tls"] = self._rejected_by.get("tls", 0) + 1

    def _on_established(self, event: Any) -> None:
        assoc = event.assoc
        self._unanswered.discard(id(assoc))
        cstore.answer_stores_directly(assoc)  # before its reactor serves the first request
        cstore.receive_stores_directly(assoc, _pynetdicom.new_spill)
        with self._lock:
            self._assocs[id(assoc)] = [0, 0, time.monotonic()]
            self._stats["associations"] += 1
        log.info("dimse.association", node=self.name, calling_ae=assoc.requestor.ae_title,
                 called_ae=assoc.acceptor.ae_title, peer=_peer(assoc))

    def _on_closed(self, event: Any) -> None:
        assoc = event.assoc
        _pynetdicom.discard_partial(assoc)  # an object cut off mid-transfer is never handled
        with self._lock:
            figures = self._assocs.pop(id(assoc), None)
        if figures is None:
            return
        objects, nbytes, opened = figures
        log.info("dimse.association_closed", node=self.name, calling_ae=assoc.requestor.ae_title,
                 peer=_peer(assoc), objects=objects, bytes=nbytes,
                 outcome="aborted" if event.event is evt.EVT_ABORTED else "released",
                 ms=round((time.monotonic() - opened) * 1000, 1))

    def _on_rejected(self, event: Any) -> None:
        assoc = event.assoc
        request, rsp = assoc.requestor.primitive, assoc.acceptor.primitive
        with self._lock:
            self._unanswered.discard(id(assoc))
            self._stats["rejected"] += 1
            why = rejection_reason(rsp)
            self._rejected_by[why] = self._rejected_by.get(why, 0) + 1
        reason = "" if rsp is None else (
            f"result={rsp.result} source={rsp.result_source} reason={rsp.diagnostic}")
        log.warning("dimse.association_rejected", node=self.name,
                    calling_ae=assoc.requestor.ae_title,
                    called_ae=request.called_ae_title if request is not None else "",
                    peer=_peer(assoc), reason=reason)

    def _on_echo(self, event: Any) -> int:
        return STORED

    def _on_store(self, event: Any) -> int:
        started = time.monotonic()
        assoc = event.assoc
        req = event.request
        sop_class = str(req.AffectedSOPClassUID or "")
        sop_instance = str(req.AffectedSOPInstanceUID or "")
        calling = assoc.requestor.ae_title
        path = str(event.dataset_path)
        size = 0
        try:
            arrival, size = self._arrival(event, path, sop_class, sop_instance)
            status = self._commit(arrival)
        except _Refused as refused:
            status = refused.status
            log.warning("dimse.refused", node=self.name, calling_ae=calling,
                        sop_class_uid=sop_class, sop_instance_uid=sop_instance,
                        status=hex_status(status), reason=refused.why)
        with self._lock:
            self._answers[status] = self._answers.get(status, 0) + 1
            figures = self._assocs.get(id(assoc))
            if status == STORED:
                self._stats["stored"] += 1
                self._stats["bytes"] += size
                if figures is not None:
                    figures[0] += 1
                    figures[1] += size
            else:
                self._stats["refused"] += 1
        log.info("dimse.stored" if status == STORED else "dimse.not_stored", node=self.name,
                 calling_ae=calling, sop_class_uid=sop_class, sop_instance_uid=sop_instance,
                 status=hex_status(status), bytes=size,
                 ms=round((time.monotonic() - started) * 1000, 1))
        return status

    def _arrival(self, event: Any, path: str, sop_class: str, sop_instance: str
                 ) -> tuple[Arrival, int]:
        assoc = event.assoc
        ts = str(event.context.transfer_syntax)
        spill = getattr(event.request, "_dataset_file", None)
        if isinstance(spill, _pynetdicom.SpillFile) and spill.failed is not None:
            raise _Refused(OUT_OF_RESOURCES, "no room to receive the data set in the spool dir "
                           f"({errno.errorcode.get(spill.failed.errno or 0, 'OSError')})")
        try:
            meta = encode_file_meta(sop_class, sop_instance, ts,
                                    source_ae_title=assoc.requestor.ae_title)
            data, offset, size = _received(event.request, path)
            header = _read_header(path, data, ts, meta)
            found = (header.get("SOPClassUID", ""), header.get("SOPInstanceUID", ""))
            study = header.get("StudyInstanceUID", "")
            series = header.get("SeriesInstanceUID", "")
            modality = header.get("Modality", "")
        except Exception as exc:  # pydicom raises many kinds on a broken data set
            raise _Refused(CANNOT_UNDERSTAND, f"data set cannot be parsed "
                                              f"({type(exc).__name__})") from None
        if size <= 0:
            raise _Refused(CANNOT_UNDERSTAND, "empty data set")
        if not all(found):
            raise _Refused(CANNOT_UNDERSTAND, "data set has no SOP Class/Instance UID")
        if found != (sop_class, sop_instance):
            raise _Refused(DATASET_MISMATCH, "data set SOP Class/Instance UID differs from "
                                             "the C-STORE request")
        try:  # Success would say it can be delivered: an object cut short cannot
            _check_complete(path, data, offset, size, ts)
        except CutShort as exc:
            raise _Refused(CANNOT_UNDERSTAND, f"data set cut short ({exc})") from None
        payload: Payload
        if data is not None:
            payload = BytesPayload(meta + data)
        else:
            payload = SplicedPayload(meta, FilePayload(path), offset)
        envelope = Envelope(
            sop_instance_uid=sop_instance, sop_class_uid=sop_class, transfer_syntax_uid=ts,
            study_instance_uid=study, series_instance_uid=series, modality=modality,
            calling_ae=assoc.requestor.ae_title, called_ae=assoc.acceptor.ae_title,
            peer=_peer(assoc), received_at=time.time())
        return Arrival(envelope, payload), size

    def _commit(self, arrival: Arrival) -> int:
        """Hand ``arrival`` to the Trio side and block until the Store answered.

        One ``run_sync_soon`` per object hands it over (:meth:`_hand_over`); this thread
        then waits on a plain threading.Event that the arrival's receipt sets when the Store
        answers (no Trio task per object, no ``from_thread.run`` round trip)."""
        with self._lock:
            self._stats["in_flight"] += 1
        handover = _Handover(arrival)
        try:
            assert self._token is not None
            self._token.run_sync_soon(self._hand_over, handover)
            # The Trio side answers after commit_timeout_ms; the margin covers scheduling.
            answered = handover.done.wait(self.config.commit_timeout_ms / 1000 + 5)
        except trio.RunFinishedError:
            answered = False
        finally:
            with self._lock:
                self._stats["in_flight"] -= 1
        if not answered:
            return NOT_NOW  # no answer: the sender keeps its copy and retries
        error = handover.error if handover.error is not None else arrival.receipt.error
        if error is None:
            return STORED
        if isinstance(error, StoreFull):
            return OUT_OF_RESOURCES
        if isinstance(error, StoreFailed):
            log.warning("dimse.store_failed", node=self.name,
                        sop_instance_uid=arrival.envelope.sop_instance_uid,
                        error_class=type(error).__name__)
            return STORE_FAILED
        if isinstance(error, (trio.TooSlowError, trio.ClosedResourceError,
                              trio.BrokenResourceError)):
            return NOT_NOW
        log.error("dimse.commit_error", node=self.name,
                  sop_instance_uid=arrival.envelope.sop_instance_uid,
                  error_class=type(error).__name__)
        return STORE_FAILED  # never Success without a commit, whatever went wrong

    # -- the Trio side of the hand-over --------------------------------------------------------

    def _hand_over(self, handover: _Handover) -> None:
        """Trio thread (run_sync_soon): put the arrival on the output channel, or queue it
        for :meth:`_pump` while the channel is full (keeping the order), or answer at once
        when the listener is stopping. From here, :meth:`_expire` answers it "not now" if
        the Store has not answered within commit_timeout_ms."""
        send = self._send
        if send is None:
            handover.fail(trio.ClosedResourceError("listener stopped"))
            return
        if not self._waiting:
            self._waiting_grew.set()
        handover.wait_in(self._waiting,
                         trio.current_time() + self.config.commit_timeout_ms / 1000)
        if not self._backlog:
            try:
                send.send_nowait(handover.arrival)
                return
            except trio.WouldBlock:
                pass
            except (trio.ClosedResourceError, trio.BrokenResourceError) as exc:
                handover.fail(exc)
                return
        self._backlog.append(handover)
        self._backlog_grew.set()

    async def _pump(self) -> None:
        """Send queued arrivals as the channel makes room, each until its deadline."""
        while True:
            await self._backlog_grew.wait()
            self._backlog_grew = trio.Event()
            while self._backlog:
                handover = self._backlog.popleft()
                if handover.done.is_set():  # expired while queued
                    continue
                send = self._send
                if send is None:
                    handover.fail(trio.ClosedResourceError("listener stopped"))
                    continue
                with trio.move_on_at(handover.deadline):
                    try:
                        await send.send(handover.arrival)
                    except (trio.ClosedResourceError, trio.BrokenResourceError) as exc:
                        handover.fail(exc)
                    continue
                handover.fail(trio.TooSlowError())  # never reached the Store

    async def _expire(self) -> None:
        """Answer "not now" every arrival the Store has not answered by its deadline (the
        Store may still commit it: at-least-once, and a re-send is a duplicate)."""
        waiting = self._waiting
        while True:
            if not waiting:
                await self._waiting_grew.wait()
                self._waiting_grew = trio.Event()
                continue
            first = next(iter(waiting))  # deadlines grow in the order of insertion
            if first.deadline <= trio.current_time():
                first.fail(trio.TooSlowError())
            else:
                await trio.sleep_until(first.deadline)

    async def _handovers(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """:meth:`_pump` and :meth:`_expire`, shielded: during a graceful stop the
        associations still draining get their objects committed; :meth:`run` cancels them
        once the drain is over."""
        with trio.CancelScope(shield=True) as scope:
            task_status.started(scope)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump)
                nursery.start_soon(self._expire)

    def _release_waiting(self) -> None:
        """After the drain: every C-STORE still waiting is answered "not now"."""
        for handover in list(self._backlog) + list(self._waiting):
            handover.fail(trio.ClosedResourceError("listener stopped"))
        self._backlog.clear()
