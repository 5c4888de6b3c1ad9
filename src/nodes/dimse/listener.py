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

from dataclasses import replace

import errno
import os
import threading
import time
from collections import deque
from typing import Any

import trio
from pynetdicom import evt, register_uid
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.transport import ThreadedAssociationServer

from flow import COUNTER, GAUGE, Context, Metric, Node, get_logger, register_safe_fields

from ..arrival import Arrival, StoreFailed
from . import _pynetdicom
from . import arrived
from .arrived import Received, Refused, Request
from .budget import ConnectionBudget
from .config import ListenConfig
from .contexts import ACCEPTED_TRANSFER_SYNTAXES, STORAGE_SOP_CLASSES
from .handover import Handover, HandOver
from .status import (OUT_OF_RESOURCES, STORE_FAILED, STORED, commit_status, hex_status,
                     rejection_reason)
from .tls import server_context

log = get_logger("nodes.dimse.listener")
register_safe_fields("objects", "associations", "in_flight", "transfer_syntax_uid", "allowlist",
                     "removed", "pending", "suppressed")

BUDGET_LOG_EVERY_S = 10.0
_BUDGET_EVENTS = {"refused": "dimse.connection_refused", "timeout": "dimse.negotiation_timeout",
                  "protocol": "dimse.connection_closed", "tls": "dimse.tls_failed",
                  "oversized": "dimse.pdu_too_long"}


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


def _register_storage_class(sop_class: str) -> None:
    """Make pynetdicom route C-STOREs of a private/unknown class to the Storage service
    (without this it answers them with no service class and drops the association)."""
    if sop_class not in STORAGE_SOP_CLASSES and uid_to_service_class(sop_class) is not \
            StorageServiceClass:
        register_uid(sop_class, "Storage_" + sop_class.replace(".", "_"), StorageServiceClass)


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
        self._handover = HandOver(config.commit_timeout_ms / 1000)
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

    @property
    def _backlog(self) -> deque[Handover]:
        """Handed over while the output channel was full (:class:`.handover.HandOver`)."""
        return self._handover.backlog

    @property
    def _waiting(self) -> dict[Handover, None]:
        """Handed over and not answered yet, in deadline order."""
        return self._handover.waiting

    # -- declared facts / lifecycle ------------------------------------------------------------

    @property  # type: ignore[override]
    def replicas(self) -> int:
        """``[listen] workers``: how many processes run this listener's lane side by side,
        each bound to the port with SO_REUSEPORT (see :class:`flow.Node`)."""
        return self.config.workers

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
        # A large object being received when a process was killed left its spill file; a
        # sibling worker's (sharing spool_dir) stays while that process lives.
        removed = await trio.to_thread.run_sync(_pynetdicom.sweep_spill_files, cfg.spool_dir)
        if removed:
            log.warning("dimse.spool_swept", node=self.name, removed=removed,
                        reason="partial objects left by a process that stopped mid-transfer")

    def report(self) -> dict[str, Any]:
        """Routing-safe counters of this process's listener, under its lane once running."""
        figures = {"ae_title": self.config.ae_title, "port": self.address[1], **self._stats}
        return {"listener": figures, "lanes": {self._lane: figures} if self._lane else {}}

    def metrics(self) -> list[Metric]:
        """This process's listener counters (labels: node, AE title, reason, status); each is
        ``per_process``: every ingest process counts its own."""
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
        return [replace(m, per_process=True) for m in out]

    # -- behaviour -----------------------------------------------------------------------------

    async def run(self, ctx: Context) -> None:
        if self._ssl is None and self.config.tls:
            await self.open()
        _pynetdicom.configure()
        self._lane = ctx.lane
        self._handover.start(ctx.outputs["out"], ctx.direct("out"))
        # A stop can come at any await from here (a process's SIGTERM right after it
        # started): whatever started by then is stopped and every waiting C-STORE answered.
        async with trio.open_nursery() as nursery:
            handovers: trio.CancelScope | None = None
            server: ThreadedAssociationServer | None = None
            try:
                handovers = await nursery.start(self._handover.run)
                server = await trio.to_thread.run_sync(self._start_server)
                self._server = server
                self._announce(ctx)
                await trio.sleep_forever()
            finally:
                if server is not None:
                    with trio.CancelScope(shield=True):
                        await self._stop(server)
                if handovers is not None:
                    handovers.cancel()
                self._handover.close()

    def _announce(self, ctx: Context) -> None:
        """The server accepts: say so (tools, the service manager, the log)."""
        self.listening.set()
        ctx.ready()
        cfg = self.config
        host, port = self.address
        log.info("dimse.listening", node=self.name, host=host, port=port, ae_title=cfg.ae_title,
                 tls=cfg.tls, allowlist=",".join(cfg.calling_ae_titles) or "ANY")
        if not cfg.calling_ae_titles:
            log.warning("dimse.any_calling_ae", node=self.name, ae_title=cfg.ae_title,
                        reason="calling_ae_titles is empty: any calling AE title is accepted")

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
        self._handover.stop_sending()
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
        contexts = [_pynetdicom.shared_context(sop_class, syntaxes)
                    for sop_class in dict.fromkeys([*STORAGE_SOP_CLASSES,
                                                    *cfg.extra_sop_classes])]
        contexts.append(_pynetdicom.shared_context(_pynetdicom.VERIFICATION,
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
        # On pynetdicom's own server a TLS connection that closes unanswered failed its
        # handshake; the budgeted server reports that itself (its "tls" event).
        tls_counting = () if self._ssl is None else (
            (evt.EVT_CONN_OPEN, self._on_tls_connection),
            (evt.EVT_CONN_CLOSE, self._on_tls_connection_closed))
        budget = ConnectionBudget(cfg.max_pending_connections, cfg.max_pending_per_peer,
                                  cfg.negotiation_timeout_ms / 1000)
        # Only processes started as replicas of one lane share the port; otherwise a second
        # listener on it fails to bind, as it always did.
        shared = self.placement.replicas > 1
        try:
            server, missing = _pynetdicom.start_server(
                ae, (cfg.host, cfg.port), ssl_context=self._ssl, evt_handlers=handlers,
                contexts=contexts, max_associations=cfg.max_associations, budget=budget,
                on_event=self._on_budget_event, fallback_handlers=tls_counting,
                reuse_port=shared)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                log.error("dimse.address_in_use", node=self.name, host=cfg.host, port=cfg.port,
                          reason="another process listens on this port; processes share it "
                                 "only as [listen] workers of one graph")
            raise
        if missing:
            log.warning("dimse.connection_budget_unavailable", node=self.name,
                        reason=f"this pynetdicom lacks: {missing}; every connection counts "
                               "against max_associations until acse_timeout_ms")
        return server

    def _on_budget_event(self, kind: str, peer: str, reason: str) -> None:
        """A connection the budget closed, or an association aborted on an oversized PDU
        (accept/DUL thread): counted, and logged at most once per BUDGET_LOG_EVERY_S per kind
        (a flood must not fill the log)."""
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
        Should that fail, pynetdicom's own order stays, and the log says so. The codec's
        receive and answer are hooked in here too: once the A-ASSOCIATE-AC is out, the DUL
        thread may hand the first request on before EVT_ESTABLISHED fires."""
        assoc = event.assoc
        _pynetdicom.hook_acceptor(assoc)
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
            why = "other" if rsp is None else rejection_reason(rsp.result_source,
                                                               rsp.diagnostic)
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
        except Refused as refused:
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
        spill = _pynetdicom.received_spill(event.request)
        if spill is not None and spill.failed is not None:
            raise Refused(OUT_OF_RESOURCES, "no room to receive the data set in the spool dir "
                          f"({errno.errorcode.get(spill.failed.errno or 0, 'OSError')})")
        request = Request(sop_class, sop_instance, ts, calling_ae=assoc.requestor.ae_title,
                          called_ae=assoc.acceptor.ae_title, peer=_peer(assoc))
        received: Received | str = path  # pynetdicom's stock temp file: read back from disk
        if spill is not None and not spill.spilled:
            data = spill.getvalue()
            received = Received(path, data, 0, len(data))
        elif spill is not None:
            received = Received(path, None, spill.dataset_offset, spill.dataset_size)
        return arrived.arrival(request, received)

    def _commit(self, arrival: Arrival) -> int:
        """Hand ``arrival`` to the Trio side, block until the Store answered
        (:meth:`.handover.HandOver.commit`), and say what that answer is as a status."""
        with self._lock:
            self._stats["in_flight"] += 1
        try:
            answered, error = self._handover.commit(arrival)
        finally:
            with self._lock:
                self._stats["in_flight"] -= 1
        status = commit_status(answered, error)
        if status == STORE_FAILED and isinstance(error, StoreFailed):
            log.warning("dimse.store_failed", node=self.name,
                        sop_instance_uid=arrival.envelope.sop_instance_uid,
                        error_class=type(error).__name__)
        elif status == STORE_FAILED:
            log.error("dimse.commit_error", node=self.name,
                      sop_instance_uid=arrival.envelope.sop_instance_uid,
                      error_class=type(error).__name__)
        return status
