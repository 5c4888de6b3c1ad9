"""Process-wide pynetdicom settings and the blocking helpers both DIMSE nodes share.

Everything here blocks: call it from ``trio.to_thread.run_sync`` (the nodes do).

pynetdicom keeps some settings module-global (``pynetdicom._config``); :func:`configure`
sets them once for the process:

- ``STORE_RECV_CHUNKED_DATASET``: the SCP writes each incoming data set to a file object
  instead of a BytesIO, so a 2 GB object never sits in memory. The file object is a
  :class:`SpillFile`: it keeps the data set in memory up to ``INLINE_MAX`` and moves it to a
  file in the spool dir only beyond that. pynetdicom would create a named temp file and
  encode a file meta with pydicom for every object, ~1 ms of CPU in its receive thread even
  for an 8 KB object; a small object now never touches the disk before the Store commits it;
- ``STORE_SEND_CHUNKED_DATASET``: ``send_c_store(path)`` streams the file's encoded data set
  as is (no decode, no re-encode: objects are forwarded byte for byte);
- ``LOG_HANDLER_LEVEL = "none"`` and the ``pynetdicom`` logger at WARNING: pynetdicom's
  standard handlers log every PDU and request at INFO, which costs time per object and is
  free text we would only withhold anyway (see flow._log).

:func:`acceptor_contexts` builds the listener's supported contexts for one association
(its ``EVT_REQUESTED`` handler sets them through pynetdicom's public
``assoc.acceptor.supported_contexts``) from UIDs pynetdicom already validated, without its
per-UID validation (:func:`presentation_context`).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import selectors
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from weakref import WeakKeyDictionary

from pynetdicom import AE, _config, build_context, evt
from pynetdicom import dimse_messages
from pynetdicom.association import Association
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext
from pydicom.filewriter import write_file_meta_info as _pydicom_write_file_meta

from flow import get_logger

from ..outcome import Outcome
from .budget import ConnectionBudget, first_pdu_problem
from . import cstore
from ..dicom.filemeta import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, encode_file_meta
from .contexts import syntax_order
from .status import classify_rejection, connection_failed

VERIFICATION = "1.2.840.10008.1.1"
_log = get_logger("nodes.dimse")
_configured = threading.Lock()
_spool_dir: list[str | None] = [None]


def configure() -> None:
    """Apply the process-wide settings (idempotent)."""
    with _configured:
        _config.STORE_RECV_CHUNKED_DATASET = True
        _config.STORE_SEND_CHUNKED_DATASET = True
        _config.LOG_HANDLER_LEVEL = "none"
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        _receive_into_spill_files()


def use_spool_dir(path: str | None) -> None:
    """Where received data sets above ``INLINE_MAX`` are written (process-wide; None: the
    system temp dir)."""
    with _configured:
        _spool_dir[0] = path


INLINE_MAX = 2 << 20  # a received data set up to this size stays in memory


class _SpillMeta:
    """What pynetdicom's ``create_file_meta`` is asked for, kept as three strings: the meta
    group is encoded by :func:`encode_file_meta` only if the data set spills to a file."""

    __slots__ = ("sop_class_uid", "sop_instance_uid", "transfer_syntax_uid")

    def __init__(self, sop_class_uid: Any, sop_instance_uid: Any, transfer_syntax: Any,
                 **_implementation: Any) -> None:  # implementation UID/version: ours go in
        self.sop_class_uid = str(sop_class_uid)
        self.sop_instance_uid = str(sop_instance_uid)
        self.transfer_syntax_uid = str(transfer_syntax)


class SpillFile:
    """pynetdicom's chunked-receive target for one C-STORE data set.

    pynetdicom writes the preamble, ``DICM`` and the file meta, then every P-DATA fragment
    of the data set. The data set stays in memory while it is at most ``threshold`` bytes;
    past that, a Part 10 file (our meta, then the data set so far) is created at ``name``
    and the rest is appended there. ``name`` is reserved from the start because pynetdicom
    reads it at once; the file exists only once spilled (pynetdicom's best-effort unlink
    after the C-STORE handler tolerates a file that never existed).
    """

    def __init__(self, directory: str | None, threshold: int = INLINE_MAX) -> None:
        self.name = os.path.join(directory or tempfile.gettempdir(),
                                 f"{os.urandom(12).hex()}{SPILL_SUFFIX}")
        self.threshold = threshold
        self.file = self  # pynetdicom flushes ``.file`` after every fragment
        self.meta: _SpillMeta | None = None
        self.dataset_offset = 0  # where the data set starts in the spilled file
        self._chunks: list[bytes] = []
        self._size = 0
        self._fh: Any = None
        self._discarded = False
        self.failed: OSError | None = None  # the spill file could not be written (disk full)

    @property
    def spilled(self) -> bool:
        return self._fh is not None

    @property
    def dataset_size(self) -> int:
        return self._size

    def begin_dataset(self, meta: _SpillMeta) -> None:
        """The meta is known: whatever was written so far (preamble, ``DICM``) is the file
        header, rebuilt by :func:`encode_file_meta` if the data set spills."""
        self.meta = meta
        self._chunks, self._size = [], 0

    def write(self, data: bytes) -> int:
        # Discarded: the association ended mid-transfer, nothing will read this. Failed:
        # the rest of the data set is read off the wire and dropped; the listener answers.
        if self._discarded or self.failed is not None:
            return len(data)
        if self._fh is not None:
            self._size += len(data)
            try:
                return self._fh.write(data)
            except ValueError:  # closed under us by discard() from the association's thread
                if self._discarded:
                    return len(data)
                raise
            except OSError as exc:
                self._fail(exc)
                return len(data)
        self._chunks.append(bytes(data))
        self._size += len(data)
        if self.meta is not None and self._size > self.threshold:
            try:
                self._spill()
            except OSError as exc:
                self._fail(exc)
        return len(data)

    def _fail(self, exc: OSError) -> None:
        """The spill file cannot be written (ENOSPC, say): keep nothing of it, remember why.
        Raising instead would abort the association from pynetdicom's thread, and the
        sender would get no answer at all; the listener answers from :attr:`failed`."""
        self.failed = exc
        self._chunks = []
        if self._fh is not None:
            try:
                self._fh.close()  # flushing what is buffered can fail the same way
            except OSError:
                pass
        try:
            os.unlink(self.name)
        except FileNotFoundError:
            pass

    def _spill(self) -> None:
        assert self.meta is not None
        meta = self.meta
        header = encode_file_meta(meta.sop_class_uid, meta.sop_instance_uid,
                                  meta.transfer_syntax_uid)
        fd = os.open(self.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._fh = os.fdopen(fd, "wb")
        self._fh.write(header)
        self.dataset_offset = len(header)
        for chunk in self._chunks:
            self._fh.write(chunk)
        self._chunks = []

    def getvalue(self) -> bytes:
        """The data set received so far (only while it is in memory)."""
        if self._fh is not None:
            raise ValueError("the data set was spilled to a file")
        return b"".join(self._chunks)

    def flush(self) -> None:
        if self._fh is not None and self.failed is None and not self._fh.closed:
            try:
                self._fh.flush()
            except OSError as exc:
                self._fail(exc)

    def close(self) -> None:
        if self._fh is not None and not self._fh.closed:
            self._fh.close()

    def discard(self) -> None:
        """Drop a data set whose C-STORE will never be handled (the association aborted or
        ended mid-transfer): pynetdicom deletes a spool file only after the handler ran."""
        self._discarded = True
        self._chunks = []
        self.close()
        if self._fh is not None:
            try:
                os.unlink(self.name)
            except FileNotFoundError:
                pass


SPILL_SUFFIX = ".dcm"
_SPILL_NAME = re.compile(r"[0-9a-f]{24}\.dcm")
SPILL_ORPHAN_AGE_S = 3600.0  # far longer than any network timeout: no transfer is live


def discard_partial(assoc: Any) -> None:
    """Discard the data set ``assoc`` was receiving when it ended, if any."""
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    spill = getattr(message, "_data_set_file", None)
    if isinstance(spill, SpillFile):
        spill.discard()


def sweep_spill_files(directory: str | None, *, older_than_s: float = SPILL_ORPHAN_AGE_S,
                      now: float | None = None) -> int:
    """Delete spill files a killed process left in ``directory`` (None: the system temp
    dir): names of our form, not written to for ``older_than_s``. Returns how many."""
    directory = directory or tempfile.gettempdir()
    limit = (time.time() if now is None else now) - older_than_s
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if not _SPILL_NAME.fullmatch(entry.name):
            continue
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < limit:
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:
            pass
    return removed


def _new_spill_file(*_args: Any, **_kwargs: Any) -> SpillFile:
    return SpillFile(_spool_dir[0])


def new_spill(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> SpillFile:
    """A SpillFile ready for a data set's bytes (what pynetdicom's chunked receive makes of
    its temp file, preamble and file meta), for :func:`.cstore.receive_stores_directly`."""
    spill = SpillFile(_spool_dir[0])
    spill.begin_dataset(_SpillMeta(sop_class_uid, sop_instance_uid, transfer_syntax_uid))
    return spill


def _write_file_meta(fp: Any, file_meta: Any, enforce_standard: bool = True) -> None:
    if isinstance(fp, SpillFile) and isinstance(file_meta, _SpillMeta):
        fp.begin_dataset(file_meta)
    else:  # not ours: pynetdicom's own behaviour
        _pydicom_write_file_meta(fp, file_meta, enforce_standard)


def _receive_into_spill_files() -> None:
    """Point pynetdicom's chunked receive (module ``dimse_messages``, where these three names
    are used for nothing else) at :class:`SpillFile`. If a pynetdicom release no longer has
    them, its stock temp-file receive stays in place: slower, equally correct (the listener
    reads either)."""
    names = ("NamedTemporaryFile", "create_file_meta", "write_file_meta_info")
    if all(hasattr(dimse_messages, name) for name in names):
        dimse_messages.NamedTemporaryFile = _new_spill_file  # type: ignore[attr-defined]
        dimse_messages.create_file_meta = _SpillMeta  # type: ignore[attr-defined]
        dimse_messages.write_file_meta_info = _write_file_meta  # type: ignore[attr-defined]


def _builds_directly() -> bool:
    """Whether PresentationContext keeps its UIDs where :func:`presentation_context` puts
    them (pynetdicom 2.x, 3.0): checked once against a context built the public way."""
    probe = build_context("1.2.840.10008.1.1", ["1.2.840.10008.1.2"])
    direct = PresentationContext()
    try:
        direct._abstract_syntax = probe.abstract_syntax  # type: ignore[attr-defined]
        direct._transfer_syntax = list(probe.transfer_syntax)  # type: ignore[attr-defined]
    except AttributeError:
        return False
    return (direct.abstract_syntax, direct.transfer_syntax) == \
        (probe.abstract_syntax, probe.transfer_syntax)


_direct: list[bool] = []  # _builds_directly(), decided on first use


def presentation_context(abstract_syntax: Any, transfer_syntaxes: list[Any]) -> Any:
    """A PresentationContext of UIDs that pynetdicom already validated (those of a received
    A-ASSOCIATE-RQ), without validating each again: pynetdicom's setters cost ~0.17 ms per
    UID, ~90 ms for a storescu association of 127 contexts. The public setters when the
    attributes relied on are gone (:func:`_builds_directly`; logged once)."""
    if not _direct:
        _direct.append(_builds_directly())
        if not _direct[0]:
            _log.error("dimse.adapter_fallback", reason="pynetdicom's PresentationContext "
                       "changed: contexts are built through its validating setters (slower)")
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
    (release, abort) are never held back, and a dead DUL thread releases the wait.
    """
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
            configure()
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


def associate(peer: Peer, contexts: list[tuple[str, str]]) -> Association:
    """An established association proposing one context per (SOP class, transfer syntax).

    Raises :class:`AssociationFailed` with a classified outcome: rejection per PS3.8
    result, refused/timed-out/TLS-failed connections and aborts as transient. When the peer
    accepted the association but none of the contexts, the (not established) association is
    returned: which object that makes permanent is the caller's business.
    """
    ae = peer.ae()
    handlers = [(evt.EVT_CONN_OPEN, set_nodelay)] if peer.nodelay else []
    tls_args = (peer.ssl_context, peer.server_hostname or peer.host) if peer.ssl_context else None
    cxs = [build_context(sop_class, [ts]) for sop_class, ts in contexts]
    assoc = ae.associate(peer.host, peer.port, contexts=cxs, ae_title=peer.called_ae_title,
                         max_pdu=peer.max_pdu, tls_args=tls_args, evt_handlers=handlers)
    if assoc.is_established:
        bound_send_queue(assoc)
        cstore.send_stores_directly(assoc)
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


# -- the listener's server: a budget for connections still negotiating (issue 17) -------------
#
# pynetdicom gives every accepted TCP connection an association thread and counts it against
# ``maximum_associations`` from the accept on, and waits ``acse_timeout`` for its
# A-ASSOCIATE-RQ; a DUL thread blocked mid-PDU waits for ever, and a PDU header's length is
# read in full whatever it says. So a few dozen connections that send garbage, half a
# request or nothing lock every modality out. :class:`BudgetedServer` accepts itself and
# applies :class:`~.budget.ConnectionBudget` (the rules are in budget.py).
#
# What it relies on in pynetdicom 3.0 (:func:`budget_hooks_missing` checks at start; when
# any is gone the listener starts pynetdicom's own server, as before, and says so loudly):
#  1. ``AE.make_server(..., server_class=..., **kwargs)`` builds the server with our kwargs;
#  2. the accepted socket becomes ``assoc.dul.socket.socket`` and EVT_CONN_OPEN fires in the
#     request thread before ``assoc.start()`` (``RequestHandler.handle``);
#  3. the DUL reads every PDU as ``AssociationSocket.recv(6)`` then ``recv(length)``, and
#     closes a connection with ``AssociationSocket.close()``;
#  4. the acceptor waits ``assoc.acse_timeout`` on ``assoc.dul.to_user_queue`` for the
#     A-ASSOCIATE-RQ, and a None there ends the wait like a timeout
#     (``Association.run_reactor``);
#  5. EVT_REQUESTED fires in the acceptor's thread once the request is decoded
#     (``assoc.requestor.primitive`` set), before negotiation, and an A-ASSOCIATE-RJ sent
#     there with ``assoc.acse.send_reject`` skips negotiation (``run_reactor``);
#  6. the ACSE's own limit counts every acceptor thread against ``ae.maximum_associations``
#     (``ACSE._negotiate_as_acceptor``), so it is set out of reach and the limit applied in
#     EVT_REQUESTED instead, to negotiated associations only.

LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)  # PS3.8 9.3.4: transient, presentation, local limit
_OUT_OF_REACH = 1 << 30


def budget_hooks_missing() -> str:
    """What of the above this pynetdicom lacks ("" when everything is in place)."""
    import inspect

    from pynetdicom.acse import ACSE
    from pynetdicom.dul import DULServiceProvider
    from pynetdicom.transport import AssociationSocket, RequestHandler

    def source(obj: Any) -> str:
        try:
            return inspect.getsource(obj)
        except (OSError, TypeError):
            return ""

    run_reactor = source(Association.run_reactor)
    checks = {
        "AE.make_server(server_class, **kwargs)":
            {"server_class", "kwargs"} <= set(inspect.signature(AE.make_server).parameters),
        "EVT_CONN_OPEN before assoc.start() in RequestHandler.handle":
            "EVT_CONN_OPEN" in source(RequestHandler.handle),
        "AssociationSocket.recv/close": callable(getattr(AssociationSocket, "recv", None))
            and callable(getattr(AssociationSocket, "close", None)),
        "DUL reads PDU headers with recv(6)":
            "recv(6)" in source(DULServiceProvider._read_pdu_data),
        "DUL.to_user_queue": "self.to_user_queue" in source(DULServiceProvider.__init__),
        "acceptor waits acse_timeout for the request":
            "receive_pdu(wait=True, timeout=self.acse_timeout)" in run_reactor,
        "EVT_REQUESTED before negotiation, a reject there honoured":
            "EVT_REQUESTED" in run_reactor and "is_rejected" in run_reactor,
        "ACSE.send_reject": callable(getattr(ACSE, "send_reject", None)),
        "ThreadedAssociationServer.get_request/process_request":
            callable(getattr(ThreadedAssociationServer, "get_request", None))
            and callable(getattr(ThreadedAssociationServer, "process_request", None)),
    }
    return ", ".join(name for name, ok in checks.items() if not ok)


def negotiated(server: Any) -> list[Association]:
    """The server's associations whose A-ASSOCIATE-RQ arrived and that are neither rejected
    nor over: what ``max_associations`` counts, and what a graceful stop drains."""
    return [assoc for assoc in server.active_associations
            if assoc.requestor.primitive is not None
            and not (assoc.is_rejected or assoc.is_aborted or assoc.is_released)]


def _shut(sock: socket.socket) -> None:
    """Shut the connection down now; a thread blocked reading it returns at once. The base
    class's shutdown, so an SSLSocket's TLS state is left to the thread using it."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


class BudgetedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the connection budget (budget.py) and no polling.

    - Accepts in its own loop, which wakes for a connection, for :meth:`shutdown` and for the
      next negotiation deadline only: :meth:`shutdown` returns at once.
    - An admitted connection waits in that loop until its first bytes (or its end) arrive;
      only then does pynetdicom give it an association and threads (one of them polls every
      millisecond), so an idle connection costs a file descriptor and nothing else.
    - A connection past the budget's bounds is closed as soon as it is accepted; an admitted
      one gets the rest of its deadline as its ACSE timeout, and is closed at the deadline,
      on a first PDU that is not a plausible A-ASSOCIATE-RQ, or on any PDU after it before
      the request was decoded.
    - ``max_associations`` counts negotiated associations only (:func:`negotiated`); a
      request past it is answered A-ASSOCIATE-RJ (transient, local limit exceeded).
    - ``on_event(kind, peer, reason)`` reports, from whichever thread saw it, a connection
      closed by the budget: ``refused`` (bounds), ``timeout`` (deadline), ``protocol``
      (first PDU), ``tls`` (the TLS handshake failed).
    """

    # socketserver's default backlog is 5: a burst of connections past it waits for the
    # client's SYN retransmission (1 s, 3 s, ...) before the accept loop even sees it.
    request_queue_size = socket.SOMAXCONN

    def __init__(self, *args: Any, budget: "ConnectionBudget", max_associations: int,
                 on_event: Any = None, **kwargs: Any) -> None:
        self.budget = budget
        self.max_associations = max_associations
        self.on_event = on_event or (lambda kind, peer, reason: None)
        self.closed_at_stop = 0
        self._keys: WeakKeyDictionary[Association, socket.socket] = WeakKeyDictionary()
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector: selectors.BaseSelector | None = None
        self._waiting: dict[socket.socket, Any] = {}  # admitted, silent so far: accept thread
        self._stopping = False
        self._loop_done = threading.Event()
        super().__init__(*args, **kwargs)
        self.bind(evt.EVT_CONN_OPEN, self._on_conn_open)
        self.bind(evt.EVT_REQUESTED, self._on_requested)

    # -- the accept loop (accept thread) -----------------------------------------------------

    def serve_forever(self, poll_interval: float | None = None) -> None:
        try:
            with selectors.DefaultSelector() as selector:
                self._selector = selector
                selector.register(self.socket, selectors.EVENT_READ)
                selector.register(self._wake_r, selectors.EVENT_READ)
                while not self._stopping:
                    for key, _ in selector.select(self.budget.seconds_to_next_deadline()):
                        if key.fileobj is self._wake_r:
                            self._wake_r.recv(64)
                        elif self._stopping:
                            break
                        elif key.fileobj is self.socket:
                            self._accept()
                        else:
                            self._hand_over(key.fileobj, key.data)
                    for sock, record in self.budget.expired():
                        self._closed(sock, record, "timeout",
                                     "no A-ASSOCIATE-RQ within negotiation_timeout_ms")
        finally:
            self._selector = None
            self._loop_done.set()

    def _accept(self) -> None:
        try:
            request, address = self.get_request()
        except OSError:
            return
        record, why = self.budget.admit(request, str(address[0]))
        if record is None:
            _shut(request)
            request.close()
            self.on_event("refused", str(address[0]), why)
            return
        assert self._selector is not None
        self._waiting[request] = address
        self._selector.register(request, selectors.EVENT_READ, address)

    def _hand_over(self, request: Any, address: Any) -> None:
        """``request`` has something to read: pynetdicom takes it from here."""
        assert self._selector is not None
        self._selector.unregister(request)
        del self._waiting[request]
        try:
            self.process_request(request, address)
        except Exception:
            self.budget.release(request)
            self.handle_error(request, address)
            self.shutdown_request(request)

    def shutdown(self) -> None:
        """Stop accepting now and close every connection still negotiating (nothing of
        theirs is in flight); negotiated associations are the caller's to drain."""
        self._stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._loop_done.wait()
        drained = self.budget.drain()
        for sock, record in drained:
            self._closed(sock, record, "stopping", "")
        self.closed_at_stop = len(drained)
        self.server_close()
        self._wake_r.close()
        self._wake_w.close()

    # -- per connection (request / DUL / acceptor threads) -------------------------------------

    def _closed(self, sock: socket.socket, record: Any, kind: str | None, why: str) -> None:
        """``record`` (released) stopped negotiating: shut its connection if we close it
        (``kind``), and end its acceptor's wait for a request at once."""
        if kind is not None:
            _shut(sock)
            # Never handed over (only the accept thread, or shutdown() after it, gets here):
            if self._waiting.pop(sock, None) is not None:
                if self._selector is not None:
                    self._selector.unregister(sock)
                sock.close()
        assoc = record.attached
        if assoc is not None:
            assoc.dul.to_user_queue.put(None)
        if kind in ("timeout", "protocol", "tls"):
            self.on_event(kind, record.peer, why)

    def _on_conn_open(self, event: Any) -> None:
        assoc = event.assoc
        sock = assoc.dul.socket.socket
        record = self.budget.get(sock)
        if record is None:  # expired, or the listener stopped, before its thread ran
            assoc.acse_timeout = 0
            return
        self._keys[assoc] = sock
        record.attached = assoc
        assoc.acse_timeout = max(self.budget.remaining_s(record), 0.001)
        self._guard(assoc, sock)

    def _guard(self, assoc: Association, sock: socket.socket) -> None:
        """Watch what the DUL reads while ``assoc`` is pending: the first PDU header must pass
        :func:`~.budget.first_pdu_problem` before its body is read, nothing may follow it,
        and a connection that ends releases its place at once."""
        conn = assoc.dul.socket
        recv, close = conn.recv, conn.close
        reads = [0]

        def guarded_recv(nr_bytes: int) -> bytearray:
            record = self.budget.get(sock)
            if record is None:
                return recv(nr_bytes)
            reads[0] += 1
            try:
                data = recv(nr_bytes)
            except ssl.SSLError:  # the deferred handshake failed: no association to reject
                self._end(sock, "tls", "TLS handshake failed")
                raise
            except OSError:
                self._end(sock, None, "")
                raise
            if len(data) < nr_bytes:  # closed by the peer (or by us)
                self._end(sock, None, "")
                return data
            why = None
            if reads[0] == 1:
                why = first_pdu_problem(bytes(data))
            elif reads[0] > 2:
                why = "more data before the A-ASSOCIATE-RQ was answered"
            if why:
                self._end(sock, "protocol", why)
                return bytearray()  # the DUL sees a closed connection
            return data

        def guarded_close() -> None:
            self._end(sock, None, "")
            close()

        conn.recv = guarded_recv  # type: ignore[method-assign]
        conn.close = guarded_close  # type: ignore[method-assign]

    def _end(self, sock: socket.socket, kind: str | None, why: str) -> None:
        record = self.budget.release(sock)
        if record is not None:
            self._closed(sock, record, kind, why)

    def _on_requested(self, event: Any) -> None:
        assoc = event.assoc
        sock = self._keys.get(assoc)
        if sock is not None:
            self.budget.release(sock)
            conn = assoc.dul.socket
            for name in ("recv", "close"):  # the class's own from here on
                conn.__dict__.pop(name, None)
        if len(negotiated(self)) > self.max_associations:  # this one included
            assoc.acse.send_reject(*LOCAL_LIMIT_EXCEEDED)
            evt.trigger(assoc, evt.EVT_REJECTED, {})
            assoc.kill()
            return
        assoc.acse_timeout = self.ae.acse_timeout


def start_server(ae: AE, address: tuple[str, int], *, ssl_context: Any, evt_handlers: list,
                 contexts: list, max_associations: int, budget: "ConnectionBudget",
                 on_event: Any) -> tuple[ThreadedAssociationServer, str]:
    """Start ``ae``'s server in a thread of its own: (server, "") with the connection budget,
    or, when :func:`budget_hooks_missing` names something, (pynetdicom's own server with
    ``max_associations`` counting every connection, what is missing)."""
    missing = budget_hooks_missing()
    if missing:
        ae.maximum_associations = max_associations
        server = ae.start_server(address, block=False, ssl_context=ssl_context,
                                 evt_handlers=evt_handlers, contexts=contexts)
        return server, missing
    ae.maximum_associations = _OUT_OF_REACH  # applied in EVT_REQUESTED, negotiated only
    server = ae.make_server(address, ssl_context=ssl_context, evt_handlers=evt_handlers,
                            contexts=contexts, server_class=BudgetedServer, budget=budget,
                            max_associations=max_associations, on_event=on_event)
    threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{address[1]}",
                     daemon=True).start()
    return server, ""
