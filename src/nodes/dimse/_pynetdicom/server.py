"""The listener's server: a budget for connections still negotiating (group ``budget``)."""

from __future__ import annotations

import selectors
import socket
import ssl
import struct
import threading
from typing import Any
from weakref import WeakKeyDictionary

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.transport import ThreadedAssociationServer

from ..budget import ConnectionBudget, first_pdu_problem, pdu_too_long


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
OUT_OF_REACH = 1 << 30  # ae.maximum_associations: applied in EVT_REQUESTED instead
# A-ABORT (PS3.8 9.3.8): source 2 (service provider), reason 6 (invalid PDU parameter value).
ABORT_INVALID_PARAMETER = struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 2, 6)


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


def share_port(sock: socket.socket) -> None:
    """SO_REUSEPORT on a listening socket before its bind: every socket of this user bound
    the same way to the same address listens on it, and the kernel spreads new connections
    among them (Linux: by a hash of the connection's addresses and ports)."""
    option = getattr(socket, "SO_REUSEPORT", None)
    if option is None:
        raise OSError("several listener workers need SO_REUSEPORT, which this system lacks")
    sock.setsockopt(socket.SOL_SOCKET, option, 1)


class SharedPortServer(ThreadedAssociationServer):
    """pynetdicom's own threaded server (the fallback), bound with :func:`share_port`."""

    def server_bind(self) -> None:
        share_port(self.socket)
        super().server_bind()


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
    - After negotiation a PDU whose header claims more than the maximum length we advertised
      (``ae.maximum_pdu_size``, 0: none) is not read: the association is aborted (A-ABORT,
      invalid PDU parameter value) on its header, so a peer cannot make the DUL buffer up to
      the 4 GiB a header can claim.
    - ``on_event(kind, peer, reason)`` reports, from whichever thread saw it, a connection
      closed by the budget: ``refused`` (bounds), ``timeout`` (deadline), ``protocol``
      (first PDU), ``tls`` (the TLS handshake failed); and ``oversized``: an association
      aborted on an oversized PDU.
    - ``reuse_port``: bound with :func:`share_port` (the port is shared with sibling
      processes).
    """

    # socketserver's default backlog is 5: a burst of connections past it waits for the
    # client's SYN retransmission (1 s, 3 s, ...) before the accept loop even sees it.
    request_queue_size = socket.SOMAXCONN

    def __init__(self, *args: Any, budget: "ConnectionBudget", max_associations: int,
                 on_event: Any = None, reuse_port: bool = False, **kwargs: Any) -> None:
        self.reuse_port = reuse_port
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

    def server_bind(self) -> None:
        if self.reuse_port:
            share_port(self.socket)
        super().server_bind()

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
        self._guard(assoc, sock, record.peer)

    def _guard(self, assoc: Association, sock: socket.socket, peer: str) -> None:
        """Watch what the DUL reads while ``assoc`` is pending: the first PDU header must pass
        :func:`~.budget.first_pdu_problem` before its body is read, nothing may follow it,
        and a connection that ends releases its place at once. Once negotiated, every PDU
        header must pass :func:`pdu_too_long` before its body is read."""
        conn = assoc.dul.socket
        recv, close = conn.recv, conn.close
        reads = [0]  # the DUL reads each PDU as recv(6), its header, then recv(its length)
        max_pdu = self.ae.maximum_pdu_size or 0

        def guarded_recv(nr_bytes: int) -> bytearray:
            reads[0] += 1
            record = self.budget.get(sock)
            if record is None:  # negotiated (or over): only the length of each PDU is checked
                data = recv(nr_bytes)
                why = pdu_too_long(bytes(data), max_pdu) if reads[0] % 2 else None
                if why:
                    try:
                        conn.send(ABORT_INVALID_PARAMETER)
                    except OSError:
                        pass
                    _shut(sock)
                    self.on_event("oversized", peer, why)
                    return bytearray()  # the DUL sees a closed connection
                return data
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
            # The class's own close from here on; recv stays guarded (the PDU length cap).
            assoc.dul.socket.__dict__.pop("close", None)
        if len(negotiated(self)) > self.max_associations:  # this one included
            assoc.acse.send_reject(*LOCAL_LIMIT_EXCEEDED)
            evt.trigger(assoc, evt.EVT_REJECTED, {})
            assoc.kill()
            return
        assoc.acse_timeout = self.ae.acse_timeout

