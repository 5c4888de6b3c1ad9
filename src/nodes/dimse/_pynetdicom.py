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
"""

from __future__ import annotations

import logging
import os
import re
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pynetdicom import AE, _config, build_context, evt
from pynetdicom import dimse_messages
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import P_DATA
from pydicom.filewriter import write_file_meta_info as _pydicom_write_file_meta

from ..outcome import Outcome
from . import cstore
from ..dicom.filemeta import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, encode_file_meta
from .status import classify_rejection, connection_failed

VERIFICATION = "1.2.840.10008.1.1"
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
        if self._discarded:  # the association ended mid-transfer: nothing will read this
            return len(data)
        if self._fh is not None:
            self._size += len(data)
            try:
                return self._fh.write(data)
            except ValueError:  # closed under us by discard() from the association's thread
                if self._discarded:
                    return len(data)
                raise
        self._chunks.append(bytes(data))
        self._size += len(data)
        if self.meta is not None and self._size > self.threshold:
            self._spill()
        return len(data)

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
        if self._fh is not None:
            self._fh.flush()

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
