"""Event-driven reactors for pynetdicom's two threads per association (group ``reactor``).

pynetdicom 3.0 runs two loops per association that poll: the DUL thread sleeps 1 ms
whenever it finds nothing to do (``DULServiceProvider._run_loop_delay``), and the
association's reactor sleeps 1 ms before every look at its queues
(``Association._run_reactor``). Every C-STORE exchange crosses those loops three times (the
request read, the request served, the response written), so up to ~3 ms of each object's
turn-around is sleeping, and every idle association wakes 2,000 times a second. Measured on
the listener with one association (bench/route.py's path): 1.2 ms between storescu's
next PDU and the DUL reading it, 0.6 ms before the reactor takes a decoded request, 0.7 ms
before the DUL writes the response, of a ~10 ms turn-around.

The loops here are pynetdicom's, step for step (adapted from pynetdicom 3.0.4,
``dul.py`` and ``association.py``, MIT licence), except how they wait: they block until
there is something to do and are woken by it.

- The DUL thread waits in ``select`` on its socket and a wake-up socket pair; a primitive
  queued for it (``to_provider_queue``: every PDU to send, release, abort), ``kill_dul`` and
  ``stop_dul`` wake it. It wakes at least every ``TICK_S`` to check its ARTIM timer.
- The association's reactor waits on an Event that its queues set: a decoded request
  (``DIMSEServiceProvider.msg_queue``), a primitive for the user (``to_user_queue``:
  release request, abort), the DUL thread ending, ``kill``. It wakes at least every
  ``TICK_S`` for the network idle timer. While it waits it counts as paused, so a
  ``send_*()`` in another thread (the sender's C-STORE, a release) goes on at once instead of
  spinning until the reactor's next turn.

The queues wake their reader by a change of class (:class:`WakingQueue`, a ``queue.Queue``
whose ``put`` also calls the wakers), made in place on the queue objects pynetdicom
created, so no item put before can be lost and every holder of the queue keeps it.

:func:`install` replaces ``DULServiceProvider.run_reactor`` and ``Association._run_reactor``
for the process (the DUL thread's target is bound when the DUL is constructed, so only the
class attribute reaches it); :func:`uninstall` puts pynetdicom's back (a pynetdicom whose
internals changed: :mod:`.internals`, group ``reactor``).
"""

from __future__ import annotations

import queue
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ

from flow import get_logger

log = get_logger("nodes.dimse")
TICK_S = 0.05  # the longest a reactor waits unwoken: its timers' resolution
_WAKE = b"\0"


class WakingQueue(queue.Queue):
    """A ``queue.Queue`` whose ``put`` also calls each of ``_wakers`` (set before the class
    of an existing queue is changed to this one)."""

    _wakers: tuple[Callable[[], None], ...] = ()

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        for wake in self._wakers:
            wake()


def wake_on_put(q: queue.Queue, wake: Callable[[], None]) -> None:
    """Make ``q`` (a plain ``queue.Queue`` or already a WakingQueue) call ``wake`` after
    every ``put``."""
    q._wakers = (*getattr(q, "_wakers", ()), wake)  # type: ignore[attr-defined]
    if q.__class__ is queue.Queue:
        q.__class__ = WakingQueue


# -- the DUL thread ------------------------------------------------------------------------------

class _DulWake:
    """A socket pair: ``wake()`` from any thread makes the DUL's ``select`` return."""

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)

    def wake(self) -> None:
        try:
            self.writer.send(_WAKE)
        except OSError:  # full (a wake-up is pending anyway) or closed (the DUL is gone)
            pass

    def drain(self) -> None:
        try:
            while self.reader.recv(4096):
                pass
        except OSError:
            pass

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


def _wait(dul: Any, wake: _DulWake) -> None:
    """Block until the DUL's socket is readable, ``wake`` is called, or TICK_S passes."""
    if dul._kill_thread or dul.to_provider_queue.qsize() or dul.event_queue.qsize():
        return
    watched = [wake.reader]
    transport = getattr(dul.socket, "socket", None)  # None before connecting, after closing
    if transport is not None and transport.fileno() >= 0:
        if getattr(transport, "pending", None) and transport.pending():
            return  # TLS bytes already decrypted: select cannot see them
        watched.append(transport)
    try:
        select.select(watched, [], [], TICK_S)
    except (OSError, ValueError):
        pass  # the socket closed under us: the loop's own check finds it (Evt17)
    wake.drain()


def dul_run_reactor(self: Any) -> None:
    """``DULServiceProvider.run_reactor``, waiting instead of polling."""
    wake = _DulWake()
    wake_on_put(self.to_provider_queue, wake.wake)
    kill_dul, stop_dul = self.kill_dul, self.stop_dul

    def kill() -> None:
        kill_dul()
        wake.wake()

    def stop() -> bool:
        # pynetdicom's stop_dul, woken: it sets the flag and waits for the thread to end.
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            wake.wake()
            while self.is_alive():
                time.sleep(0.001)
            return True
        return False

    self.kill_dul, self.stop_dul = kill, stop
    self._idle_timer.start()
    idle = False
    try:
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                idle = True  # as pynetdicom: one wait before the first look
            if idle:
                _wait(self, wake)
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                # pynetdicom's: bypass the state machine, send an A-ABORT, stop both loops.
                log.error("dimse.dul_error", error_class=type(exc).__name__)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                idle = True
                continue
            self.state_machine.do_action(event)
            idle = False
    finally:
        self.__dict__.pop("kill_dul", None)
        self.__dict__.pop("stop_dul", None)
        wake.close()
        _close_transport(self)
        _wake_reactor(self.assoc)


def _close_transport(dul: Any) -> None:
    """The connection closed once the DUL thread is gone. A DUL told to stop
    (``kill_dul`` from another thread) before its state machine closed the connection would
    otherwise leave it open, to the peer an established association, until the garbage
    collector finds the socket (woken at once, the loop can see the flag before a queued
    A-ABORT that would have closed it)."""
    transport = dul.socket
    if transport is not None and getattr(transport, "socket", None) is not None:
        try:
            transport.close()
        except OSError:
            pass


# -- the association's reactor -------------------------------------------------------------------

def _wake_reactor(assoc: Any) -> None:
    event = assoc.__dict__.get("_dicomflow_wake")
    if event is not None:
        event.set()


def assoc_run_reactor(self: Any) -> None:
    """``Association._run_reactor`` (the acceptor's, and the requestor's while idle),
    waiting on its queues instead of polling them."""
    wake = threading.Event()
    self._dicomflow_wake = wake
    wake_on_put(self.dimse.msg_queue, wake.set)
    wake_on_put(self.dul.to_user_queue, wake.set)
    kill = self.kill

    def woken_kill() -> None:
        self._kill = True
        wake.set()
        kill()

    self.kill = woken_kill
    if not self.dul.is_alive():
        wake.set()  # it ended before the event existed
    self._is_paused = False
    try:
        while not self._kill:
            # Paused while waiting: a send_*() in another thread that clears the checkpoint
            # goes on at once; the reactor then stops at the checkpoint until it is set.
            self._is_paused = True
            self._reactor_checkpoint.wait()
            wake.wait(TICK_S)
            wake.clear()
            # Unpaused only with the checkpoint still set *after* saying so: a send_*() that
            # cleared it and saw the loop paused finds it paused until it sets it again
            # (pynetdicom's loop reads the checkpoint first, leaving a window in which the
            # reactor could take that send's response).
            while True:
                self._is_paused = False
                if self._reactor_checkpoint.is_set():
                    break
                self._is_paused = True
                self._reactor_checkpoint.wait()
            if self._kill:
                break
            if _serve_and_check(self):
                return
    finally:
        self.__dict__.pop("kill", None)


def _serve_and_check(self: Any) -> bool:
    """One turn of pynetdicom's reactor loop after its sleep: serve a decoded request, then
    the release, abort, DUL and idle-timer checks. True when the association ended."""
    context_id, msg = self.dimse.get_msg(block=False)
    if msg:
        self._serve_request(msg, context_id)
        self._dicomflow_wake.set()  # another request may already be queued

    if self.is_established and self.acse.is_release_requested():
        self.acse.send_release(is_response=True)
        self.is_released = True
        self.is_established = False
        evt.trigger(self, evt.EVT_RELEASED, {})
        self.kill()
        return True

    if self.acse.is_aborted():
        self.dul.receive_pdu(wait=False)  # EVT_ACSE_RECV fires for subscribers
        self.is_aborted = True
        self.is_established = False
        evt.trigger(self, evt.EVT_ABORTED, {})
        self.kill()
        return True

    if not self.dul.is_alive():
        self.kill()
        return True

    if self.dul.idle_timer_expired():
        log.warning("dimse.network_timeout")  # pynetdicom logs "Network timeout reached"
        if self.network_timeout_response == "A-RELEASE":
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self.release()
            self._is_paused = False
        else:
            self.abort()
        self.kill()
        return True
    return False


# -- installing ----------------------------------------------------------------------------------

PYNETDICOM_DUL_RUN_REACTOR = DULServiceProvider.run_reactor
PYNETDICOM_RUN_REACTOR = Association._run_reactor
_lock = threading.Lock()


def pynetdicoms(cls: type, name: str) -> Any:
    """``cls.name`` as pynetdicom defines it (what :mod:`.internals` checks), also while
    this module's replacement is installed."""
    current = getattr(cls, name)
    if current is dul_run_reactor:
        return PYNETDICOM_DUL_RUN_REACTOR
    if current is assoc_run_reactor:
        return PYNETDICOM_RUN_REACTOR
    return current


def install() -> None:
    """Both loops event-driven, for every association created from now on."""
    with _lock:
        DULServiceProvider.run_reactor = dul_run_reactor  # type: ignore[method-assign]
        Association._run_reactor = assoc_run_reactor  # type: ignore[method-assign]


def uninstall() -> None:
    """pynetdicom's polling loops again."""
    with _lock:
        if DULServiceProvider.run_reactor is dul_run_reactor:
            DULServiceProvider.run_reactor = PYNETDICOM_DUL_RUN_REACTOR  # type: ignore
        if Association._run_reactor is assoc_run_reactor:
            Association._run_reactor = PYNETDICOM_RUN_REACTOR  # type: ignore[method-assign]


def installed() -> bool:
    return DULServiceProvider.run_reactor is dul_run_reactor
