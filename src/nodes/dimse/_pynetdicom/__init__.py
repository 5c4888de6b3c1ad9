"""The pynetdicom adapter: every reach past pynetdicom's (and pydicom's) public API.

Nothing else in dicomflow names a private attribute of pynetdicom; the listener and the
sender call the functions here. Everything here blocks: call it from
``trio.to_thread.run_sync`` (the nodes do). Written for pynetdicom 3.0 and pydicom 3.0
(pyproject pins both to those minor releases).

What it patches or reaches, and why (group: what falls back when one of its internals is
missing; :mod:`.internals` holds the exact checks):

============  ===========================================  ==============================
group         reaches                                      why
============  ===========================================  ==============================
receive       ``DIMSEServiceProvider.receive_primitive``,  a plain C-STORE-RQ is read by
              ``.message``, ``.msg_queue``;                the codec, not pydicom: the
              ``Association._accepted_cx``,                listener's CPU per object
              ``.get_handlers``; ``C_STORE._context_id``,  (:mod:`.stores`)
              ``._dataset_path``, ``._dataset_file``;
              ``_config.STORE_RECV_CHUNKED_DATASET``,
              ``ENFORCE_UID_CONFORMANCE``
answer        ``Association._serve_request``,              a plain C-STORE is answered
              ``._sent_release``, ``._is_paused``,         by the codec (:mod:`.stores`)
              ``._abort_nonblocking/_abort_blocking``;
              ``DIMSEServiceProvider.cancel_req``,
              ``.maximum_pdu_size``, ``.send_msg``;
              ``DULServiceProvider.send_pdu``;
              ``StorageServiceClass.SCP/validate_status``;
              ``_config.UNRESTRICTED_STORAGE_SERVICE``
send          ``DIMSEServiceProvider.send_msg``,           the sender writes C-STORE-RQs
              ``.maximum_pdu_size``, ``.msg_queue``;       with the codec; at most
              ``C_STORE._dataset_path`` (set by            ``MAX_QUEUED_PDUS`` queued per
              ``send_c_store``);                           association
              ``DULServiceProvider.send_pdu``,             (:func:`bound_send_queue`); a
              ``.to_provider_queue``, ``._kill_thread``    local abort wakes the waiting
                                                           sender (:func:`abort_and_wake`)
spill         ``dimse_messages.NamedTemporaryFile``,       received data sets stay in
              ``.create_file_meta``,                       memory up to ``INLINE_MAX``
              ``.write_file_meta_info`` (module globals    (:mod:`.spill`); a cut-off one
              replaced); ``DIMSEMessage._data_set_file``   is discarded
contexts      ``PresentationContext._abstract_syntax``,    contexts of UIDs pynetdicom
              ``._transfer_syntax``                        validated are not validated
                                                           again (~0.17 ms per UID):
                                                           :func:`presentation_context`,
                                                           :func:`shared_context`
reactor       ``DULServiceProvider.run_reactor``,          an association's two threads
              ``.stop_dul/kill_dul``, its queues and       wait for work instead of
              timers; ``Association._run_reactor``,        sleeping 1 ms per look
              ``.kill``, ``._is_paused``,                  (:mod:`.reactor`): up to ~3 ms
              ``._reactor_checkpoint``;                    less per C-STORE exchange, no
              ``DIMSEServiceProvider.msg_queue``           CPU while idle
budget        ``AE.make_server(server_class, **kw)``,      the connection budget
              ``RequestHandler.handle``,                   (:mod:`.server`; what each is
              ``AssociationSocket.recv/close``,            for is listed there)
              ``DULServiceProvider._read_pdu_data``,
              ``.to_user_queue``,
              ``Association.run_reactor``,
              ``ACSE.send_reject``,
              ``ACSE._negotiate_as_acceptor``,
              ``ThreadedAssociationServer.get_request/
              process_request``
============  ===========================================  ==============================

:func:`configure` (the listener and the sender call it when they start) checks every one
(:func:`.internals.verify`: present, callable, the parameters it is called with). A group
with anything missing is not used: the listener and the sender take pynetdicom's public path
for it, slower and equally correct, and ONE WARNING ``dimse.adapter_fallback`` names what is
missing (the ``budget`` group has its own: the listener's
``dimse.connection_budget_unavailable``).

pynetdicom's public settings (``pynetdicom._config``) set once for the process:
``STORE_RECV_CHUNKED_DATASET`` (each incoming data set to a file object, so a 2 GB object
never sits in memory), ``STORE_SEND_CHUNKED_DATASET`` (``send_c_store(path)`` streams the
file's data set as is: objects forwarded byte for byte), ``LOG_HANDLER_LEVEL = "none"`` and
the ``pynetdicom`` logger at WARNING (its handlers log every PDU at INFO: time per object,
and free text we would only withhold, see flow._log).
"""

from __future__ import annotations

import copy
import functools
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pynetdicom import AE, _config, build_context, evt
from pynetdicom.association import Association
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext

from flow import get_logger, register_safe_fields

from ...outcome import Outcome
from ..budget import ConnectionBudget
from ...dicom.filemeta import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from ..contexts import syntax_order
from ..status import classify_rejection, connection_failed
from . import internals, reactor, stores
from .internals import usable
from . import server as server_module
from .server import LOCAL_LIMIT_EXCEEDED, BudgetedServer, SharedPortServer, negotiated
from .spill import (INLINE_MAX, SPILL_ORPHAN_AGE_S, SPILL_SUFFIX, SpillFile, _SpillMeta,
                    discard_partial, new_spill, receive_into_spill_files, sweep_spill_files,
                    use_spool_dir)

store = stores.store

__all__ = ["INLINE_MAX", "SPILL_ORPHAN_AGE_S", "SPILL_SUFFIX", "LOCAL_LIMIT_EXCEEDED",
           "BudgetedServer", "SharedPortServer", "SpillFile", "discard_partial", "negotiated", "new_spill",
           "sweep_spill_files", "use_spool_dir", "_SpillMeta", "store", "stores"]

VERIFICATION = "1.2.840.10008.1.1"
_log = get_logger("nodes.dimse")
register_safe_fields("missing")  # names of pynetdicom internals
_configured = threading.Lock()
_done = [False]  # configure() ran in this process
_warned: list[dict[str, tuple[str, ...]]] = [{}]  # what the last adapter warning named


def configure() -> None:
    """Apply the process-wide settings and check the internals (idempotent). Logs one
    WARNING when a group's internals are missing, once for as long as that stays so."""
    with _configured:
        _config.STORE_RECV_CHUNKED_DATASET = True
        _config.STORE_SEND_CHUNKED_DATASET = True
        _config.LOG_HANDLER_LEVEL = "none"
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        found = internals.verify()
        _direct[:] = [usable("contexts")]
        if usable("spill"):
            receive_into_spill_files()
        if usable("reactor"):
            reactor.install()
        else:
            reactor.uninstall()
        fallback = {group: names for group, names in found.items() if group != "budget"}
        if fallback and fallback != _warned[0]:
            _log.warning("dimse.adapter_fallback", missing="; ".join(
                f"{group}: {', '.join(names)}" for group, names in fallback.items()),
                reason="this pynetdicom lacks internals the fast paths rely on: pynetdicom's "
                       "public path is used for those groups (slower, equally correct)")
        _warned[0] = fallback
        _done[0] = True


def configured() -> None:
    """:func:`configure` unless it ran in this process already (checking the internals
    reads pynetdicom's source: ~0.1 s, not for every association a Peer opens)."""
    if not _done[0]:
        configure()


def budget_hooks_missing() -> str:
    """What the connection budget's server relies on and this pynetdicom lacks ("" when
    everything is in place; group ``budget``, checked now)."""
    internals.verify()
    return ", ".join(internals.missing("budget"))


_direct: list[bool] = []  # usable("contexts"), as of the last configure()


def presentation_context(abstract_syntax: Any, transfer_syntaxes: list[Any]) -> Any:
    """A PresentationContext of UIDs that pynetdicom already validated (those of a received
    A-ASSOCIATE-RQ), without validating each again: pynetdicom's setters cost ~0.17 ms per
    UID, ~90 ms for a storescu association of 127 contexts. The public setters when group
    ``contexts`` is missing."""
    if not _direct:
        _direct.append(usable("contexts"))
    context = PresentationContext()
    if _direct[0]:
        context._abstract_syntax = abstract_syntax  # type: ignore[attr-defined]
        context._transfer_syntax = list(transfer_syntaxes)  # type: ignore[attr-defined]
    else:
        context.abstract_syntax = abstract_syntax
        context.transfer_syntax = list(transfer_syntaxes)
    return context


@functools.lru_cache(maxsize=1024)  # a modality proposes the same lists again and again
def _order(proposals: tuple[tuple[str, ...], ...], accepted: frozenset[str],
           preference: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(syntax_order(proposals, accepted, preference))


def acceptor_contexts(proposed: Iterable[Any], supported: Mapping[str, frozenset[str]],
                      preference: tuple[str, ...] = ()) -> list[Any]:
    """The listener's supported contexts for one association, from the requestor's
    proposed ones (pynetdicom PresentationContexts): one per proposed SOP class that is in
    ``supported`` (SOP class → accepted syntaxes), its syntaxes in
    :func:`~.contexts.syntax_order`. A class proposed only in syntaxes we do not accept gets
    an empty list (pynetdicom then answers "transfer syntaxes not supported"); classes not
    in ``supported`` are left out ("abstract syntax not supported"), as with pynetdicom's
    static list."""
    proposals: dict[str, list[tuple[str, ...]]] = {}
    uids: dict[str, Any] = {}  # the requestor's own UID objects, validated by pynetdicom
    for context in proposed:
        sop_class = str(context.abstract_syntax)
        if sop_class in supported:
            proposals.setdefault(sop_class, []).append(
                tuple(str(ts) for ts in context.transfer_syntax))
            uids[sop_class] = context.abstract_syntax
            uids.update((str(ts), ts) for ts in context.transfer_syntax)
    return [presentation_context(uids[sop_class], [uids[ts] for ts in _order(
                tuple(lists), supported[sop_class], tuple(preference))])
            for sop_class, lists in proposals.items()]


class _SharedContext(PresentationContext):
    """A supported context whose deep copy shares its (immutable) UIDs.

    pynetdicom deep-copies the SCP's supported contexts for every association; with every
    storage class in every transfer syntax that is ~6000 UIDs, each re-validated by pydicom
    on copy: ~50 ms per association. The copy only needs its own lists.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> "_SharedContext":
        if not _direct[0]:  # group ``contexts`` missing: pynetdicom's own copy
            plain = PresentationContext()
            plain.__dict__.update(self.__dict__)
            return copy.deepcopy(plain, memo)  # type: ignore[return-value]
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone._transfer_syntax = list(self._transfer_syntax)
        return clone


def shared_context(sop_class: str, transfer_syntaxes: Sequence[str]) -> PresentationContext:
    """A supported context (for ``start_server``) built the public way, whose per-association
    deep copy does not validate its UIDs again (group ``contexts``)."""
    built = build_context(sop_class, list(transfer_syntaxes))
    if not _direct:
        _direct.append(usable("contexts"))
    if not _direct[0]:
        return built
    context = _SharedContext()
    context.__dict__.update(built.__dict__)
    return context


def hook_acceptor(assoc: Association) -> None:
    """Make an acceptor association (the listener's, once its A-ASSOCIATE-RQ is in and
    before it is accepted: the DUL thread hands a request on as soon as it arrives, which
    can be before EVT_ESTABLISHED) receive and answer plain C-STOREs with the codec
    (:mod:`.stores`; each group only if usable). Harmless on one that is then rejected."""
    stores.answer_stores_directly(assoc)
    stores.receive_stores_directly(assoc, new_spill)


def received_spill(request: Any) -> SpillFile | None:
    """The SpillFile a C-STORE request's data set was received into, or None (pynetdicom's
    stock temp file: group ``spill`` missing, or a path pynetdicom handled itself)."""
    received = getattr(request, "_dataset_file", None)
    return received if isinstance(received, SpillFile) else None


def abort_and_wake(assoc: Association) -> None:
    """Abort ``assoc`` while another thread waits in ``send_c_store`` for the response.

    pynetdicom's ``send_c_store`` blocks in ``dimse.get_msg()`` until a response arrives or
    ``dimse_timeout`` passes; a peer abort or a closed connection wakes it with a
    ``(None, None)`` message (pynetdicom fsm AA-2/3/4), a local abort does not. Wake it the
    same way (group ``send``), so that the waiting thread returns now instead of after the
    DIMSE timeout; without the group it returns after the DIMSE timeout.
    """
    assoc.abort()
    if usable("send"):
        assoc.dimse.msg_queue.put((None, None))


def abort_request(assoc: Association) -> None:
    """Abort ``assoc`` while another thread waits in ``associate`` for the PACS's answer
    (e.g. a PACS serving one association at a time holds it until its current one ends).

    The requesting thread waits on the DUL's queue for the A-ASSOCIATE answer until the
    ACSE timeout; a local abort does not wake it. Wake it with what a timeout gives (group
    ``send``), so that it returns now; without the group it returns after the timeout.
    """
    assoc.abort()
    if usable("send"):
        assoc.dul.to_user_queue.put(None)


def set_nodelay(event: Any) -> None:
    """EVT_CONN_OPEN handler: Nagle off, or each C-STORE can wait ~40 ms on a delayed ACK."""
    try:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        pass  # the connection is already gone; the association fails on its own


MAX_QUEUED_PDUS = 16  # × max PDU (≤ 128 KiB here): at most ~2 MiB of an object queued


def bound_send_queue(assoc: Association, limit: int = MAX_QUEUED_PDUS) -> None:
    """Make ``assoc`` queue at most ``limit`` P-DATA PDUs for its DUL thread.

    pynetdicom's DIMSE layer hands every P-DATA of a message to the DUL thread's unbounded
    queue as fast as it reads the file, so a 300 MB object sent to a slow PACS would pile up
    in memory. The sending thread now waits while the queue is full; other primitives
    (release, abort) are never held back, and a dead DUL thread releases the wait. Without
    group ``send``, pynetdicom's unbounded queue stays.
    """
    if not usable("send"):
        return
    dul = assoc.dul
    pending = dul.to_provider_queue
    put = dul.send_pdu

    def send_pdu(primitive: Any) -> None:
        if isinstance(primitive, P_DATA):
            while pending.qsize() >= limit and dul.is_alive() and not dul._kill_thread:
                time.sleep(0.0005)
        put(primitive)

    dul.send_pdu = send_pdu  # type: ignore[method-assign]


def new_ae(ae_title: str, timeout_s: float, max_pdu: int) -> AE:
    ae = AE(ae_title=ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    ae.maximum_pdu_size = max_pdu
    return ae


@dataclass
class Peer:
    """Where and how to reach one DIMSE peer as an SCU."""

    host: str
    port: int
    called_ae_title: str
    calling_ae_title: str = "DICOMFLOW"
    timeout_s: float = 30.0
    max_pdu: int = 131_072
    ssl_context: Any = None
    server_hostname: str | None = None
    nodelay: bool = True
    _ae: AE | None = field(default=None, repr=False)

    def ae(self) -> AE:
        if self._ae is None:
            configured()
            self._ae = new_ae(self.calling_ae_title, self.timeout_s, self.max_pdu)
        return self._ae


class AssociationFailed(Exception):
    """No association: ``outcome`` says why (routing-safe) and whether retrying can help."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(getattr(outcome, "reason", ""))
        self.outcome = outcome


def _diagnose(peer: Peer) -> Outcome:
    """pynetdicom only logs why a connection failed; one plain connect attempt tells us."""
    try:
        with socket.create_connection((peer.host, peer.port), timeout=min(peer.timeout_s, 5.0)):
            pass
    except ConnectionRefusedError:
        return connection_failed("connection refused", peer.host, peer.port)
    except (TimeoutError, socket.timeout):
        return connection_failed("connection timed out", peer.host, peer.port)
    except OSError as exc:
        return connection_failed(f"connection failed ({type(exc).__name__})", peer.host, peer.port)
    if peer.ssl_context is not None:
        return connection_failed("TLS handshake failed", peer.host, peer.port)
    return connection_failed("connection closed by peer", peer.host, peer.port)


def associate(peer: Peer, contexts: list[tuple[str, str]],
              opened: Callable[[Association], None] | None = None) -> Association:
    """An established association proposing one context per (SOP class, transfer syntax).

    ``opened(assoc)`` is called once the connection is open, before the PACS answers: the
    caller can then :func:`abort_request` it from another thread.

    Raises :class:`AssociationFailed` with a classified outcome: rejection per PS3.8
    result, refused/timed-out/TLS-failed connections and aborts as transient. When the peer
    accepted the association but none of the contexts, the (not established) association is
    returned: which object that makes permanent is the caller's business.
    """
    ae = peer.ae()
    handlers = [(evt.EVT_CONN_OPEN, set_nodelay)] if peer.nodelay else []
    if opened is not None:
        handlers.append((evt.EVT_CONN_OPEN, lambda event: opened(event.assoc)))
    tls_args = (peer.ssl_context, peer.server_hostname or peer.host) if peer.ssl_context else None
    cxs = [build_context(sop_class, [ts]) for sop_class, ts in contexts]
    assoc = ae.associate(peer.host, peer.port, contexts=cxs, ae_title=peer.called_ae_title,
                         max_pdu=peer.max_pdu, tls_args=tls_args, evt_handlers=handlers)
    if assoc.is_established:
        bound_send_queue(assoc)
        stores.send_stores_directly(assoc)
        return assoc
    rsp = getattr(assoc.acceptor, "primitive", None)
    if assoc.is_rejected and rsp is not None:
        raise AssociationFailed(classify_rejection(int(rsp.result), int(rsp.result_source),
                                                   int(rsp.diagnostic)))
    if rsp is None:  # no A-ASSOCIATE response at all: the connection itself failed
        raise AssociationFailed(_diagnose(peer))
    if rsp.result == 0x00:
        # Accepted, but not one proposed context: pynetdicom aborts. The caller classifies.
        return assoc
    raise AssociationFailed(connection_failed("association aborted", peer.host, peer.port))


def accepted(assoc: Association) -> set[tuple[str, str]]:
    return {(str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
            for cx in assoc.accepted_contexts}


@dataclass(frozen=True)
class EchoResult:
    ok: bool
    reason: str
    status: int | None
    ms: float
    accepted: frozenset[tuple[str, str]] = frozenset()


def echo(peer: Peer, probe: list[tuple[str, str]] = ()) -> EchoResult:
    """C-ECHO ``peer``, proposing ``probe`` contexts alongside Verification to learn which it
    accepts. Never raises for network trouble: the result says what happened."""
    started = time.monotonic()
    contexts = [(VERIFICATION, "1.2.840.10008.1.2")] + list(probe)
    try:
        assoc = associate(peer, contexts)
    except AssociationFailed as exc:
        return EchoResult(False, exc.outcome.reason, None, _ms(started))  # type: ignore[union-attr]
    if not assoc.is_established:
        return EchoResult(False, "peer accepted no presentation context (not even "
                          "Verification)", None, _ms(started))
    got = accepted(assoc)
    try:
        if not any(sop_class == VERIFICATION for sop_class, _ in got):
            return EchoResult(False, "peer does not accept Verification (C-ECHO)", None,
                              _ms(started), frozenset(got))
        rsp = assoc.send_c_echo()
        status = int(rsp.Status) if "Status" in rsp else None
    finally:
        if assoc.is_established:
            assoc.release()
    if status is None:
        return EchoResult(False, "no C-ECHO response (timeout or abort)", None, _ms(started),
                          frozenset(got))
    ok = status == 0x0000
    return EchoResult(ok, "" if ok else f"C-ECHO status 0x{status:04X}", status, _ms(started),
                      frozenset(got))


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)


def start_server(ae: AE, address: tuple[str, int], *, ssl_context: Any, evt_handlers: list,
                 contexts: list, max_associations: int, budget: "ConnectionBudget",
                 on_event: Any, fallback_handlers: tuple = (), reuse_port: bool = False
                 ) -> tuple[ThreadedAssociationServer, str]:
    """Start ``ae``'s server in a thread of its own: (server, "") with the connection budget,
    or, when :func:`budget_hooks_missing` names something, (pynetdicom's own server with
    ``max_associations`` counting every connection, what is missing); only that one also
    gets ``fallback_handlers`` (what the budget's ``on_event`` reports otherwise).

    ``reuse_port``: bind with SO_REUSEPORT (either server), so that other processes of this
    user bound the same way share the port; a socket bound without it keeps the port to
    itself. Raises OSError when the address cannot be bound."""
    missing = budget_hooks_missing()
    if missing:
        ae.maximum_associations = max_associations
        handlers = [*evt_handlers, *fallback_handlers]
        if not reuse_port:
            server = ae.start_server(address, block=False, ssl_context=ssl_context,
                                     evt_handlers=handlers, contexts=contexts)
            return server, missing
        # What ae.start_server(block=False) does, with a server class that sets the option.
        server = ae.make_server(address, ssl_context=ssl_context, evt_handlers=handlers,
                                contexts=contexts, server_class=SharedPortServer)
        ae._servers.append(server)  # type: ignore[attr-defined]  (ae.shutdown() stops it)
    else:
        ae.maximum_associations = server_module.OUT_OF_REACH  # applied in EVT_REQUESTED, negotiated only
        server = ae.make_server(address, ssl_context=ssl_context, evt_handlers=evt_handlers,
                                contexts=contexts, server_class=BudgetedServer, budget=budget,
                                max_associations=max_associations, on_event=on_event,
                                reuse_port=reuse_port)
    threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{address[1]}",
                     daemon=True).start()
    return server, missing
