"""What processes sharing one data dir hold in its ``run`` directory: locks and doorbells.

Contract
--------
``<data_dir>/run`` (mode 0700) holds, per *name* (``lane-<lane>`` for a lane, see
:func:`lane_name`; ``housekeeping`` for the Store's purge/sweep/re-seal):

- ``<name>.lock``: :meth:`RunDir.take` holds an exclusive, non-blocking ``flock`` on it and
  writes this process's pid into it, or reports the holder's pid and holds nothing. The
  kernel releases the lock when the holder exits for any reason (SIGKILL included), so its
  successor takes it over. An ``flock`` belongs to one open file: a second Store in the same
  process is refused like another process (its holder pid is then this process's own).
- ``<name>.sock``: a Unix datagram socket, bound only by the holder of ``<name>.lock``
  (:meth:`RunDir.listen`, which first removes a file a killed holder left behind). Any
  process rings it (:meth:`RunDir.ring`: one datagram, non-blocking, nothing when no one
  listens or the listener's buffer is full, which means a wake-up is already waiting);
  :meth:`RunDir.wait` returns on a datagram or a local event. Datagrams carry no data.

The socket is a file inside the 0700 data dir, so only the data dir's owner can ring it or
bind its name; when the path does not fit ``sun_path`` (107 bytes) its address is a name in
Linux's abstract namespace derived from the path instead (see docs/decisions.md).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import socket
from collections.abc import Iterable
from pathlib import Path

import trio

from flow import get_logger

from .layout import DataDirError

log = get_logger("nodes.store")

RUN_DIR = "run"
HOUSEKEEPING = "housekeeping"
_SUN_PATH = 107  # sizeof(sockaddr_un.sun_path) on Linux, less the terminating NUL
_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
# Nobody to wake (no socket, nobody bound, gone meanwhile) or a wake-up already waiting.
_NOTHING_TO_WAKE = {errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN, errno.EWOULDBLOCK,
                    errno.ENOBUFS}


class LaneTaken(DataDirError):
    """Another process (or another Store of this one) already pumps the lane. One line."""


def lane_name(lane: str) -> str:
    """The run dir name of ``lane``'s lock and socket: the lane itself when it is a plain
    short name, else a readable part and a digest (lane names are free text)."""
    if _PLAIN.fullmatch(lane):
        return f"lane-{lane}"
    readable = re.sub(r"[^A-Za-z0-9_.-]", "_", lane)[:32]
    return f"lane-{readable}-{hashlib.sha256(lane.encode()).hexdigest()[:12]}"


class RunDir:
    """This process's locks and sockets in one data dir's run directory (blocking calls
    unless async; the socket calls run in the Trio thread)."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / RUN_DIR
        self._locks: dict[str, int] = {}
        self._bound: dict[str, socket.socket] = {}
        self._sender: socket.socket | None = None
        self._warned: set[str] = set()
        self._addresses: dict[str, str] = {}

    # -- locks --------------------------------------------------------------------------

    def lock_path(self, name: str) -> Path:
        return self.path / f"{name}.lock"

    def take(self, name: str) -> int | None:
        """Hold ``name``'s lock: None when this process holds it now, else the pid of the
        process that does (0 when it has not written its pid yet)."""
        if name in self._locks:
            return None
        self.path.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(self.lock_path(name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            finally:
                os.close(fd)
            return int(holder) if holder.isdigit() else 0
        except BaseException:
            os.close(fd)
            raise
        self._locks[name] = fd  # from here on release() gives it back
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        return None

    def release(self) -> None:
        """Unbind every socket, then give every lock back (in that order: a successor
        binds only once it holds the lock)."""
        for name in list(self._bound):
            self._unbind(name)
        if self._sender is not None:
            self._sender.close()
            self._sender = None
        for fd in self._locks.values():
            try:
                os.ftruncate(fd, 0)  # no stale pid for the next reader to name
            finally:
                os.close(fd)  # releases the flock
        self._locks.clear()

    # -- doorbells ----------------------------------------------------------------------

    def address(self, name: str) -> str:
        """``name``'s socket address: its file in the run dir when the path fits
        ``sun_path``, else an abstract-namespace name derived from the real path."""
        address = self._addresses.get(name)
        if address is None:
            path = str(self.path.resolve() / f"{name}.sock")
            address = path if len(path.encode()) <= _SUN_PATH else (
                "\0dicomflow-" + hashlib.sha256(path.encode()).hexdigest()[:40])
            self._addresses[name] = address
        return address

    def listen(self, name: str) -> bool:
        """Bind ``name``'s socket (this process must hold ``name``'s lock). A socket that
        cannot be bound (an abstract name another user took, say) is logged and left out:
        the listener then finds its work by polling, later but complete."""
        assert name in self._locks, f"listen({name!r}) without its lock"
        address = self.address(name)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            if not address.startswith("\0"):
                Path(address).unlink(missing_ok=True)  # left by a holder that was killed
            sock.bind(address)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            log.warning("store.wakeup_unavailable", target=name,
                        error_class=errno.errorcode.get(exc.errno or 0, type(exc).__name__))
            return False
        except BaseException:
            sock.close()
            raise
        self._bound[name] = sock
        return True

    def listening(self, name: str) -> bool:
        return name in self._bound

    def ring(self, name: str) -> None:
        """Wake whoever listens on ``name`` (one datagram; never blocks, never raises)."""
        if self._sender is None:
            self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sender.setblocking(False)
        try:
            self._sender.sendto(b"!", self.address(name))
        except OSError as exc:
            if exc.errno not in _NOTHING_TO_WAKE and name not in self._warned:
                self._warned.add(name)  # the listener still finds the work by its poll
                log.warning("store.wakeup_failed", target=name,
                            error_class=errno.errorcode.get(exc.errno or 0, type(exc).__name__))

    async def wait(self, name: str, event: trio.Event) -> None:
        """Return once ``event`` is set or a datagram for ``name`` arrived (when this process
        listens on ``name``); every datagram waiting is consumed."""
        sock = self._bound.get(name)
        if sock is None:
            await event.wait()
            return
        if event.is_set() or self._drain(sock):
            return
        async with trio.open_nursery() as nursery:
            async def rung() -> None:
                while True:
                    await trio.lowlevel.wait_readable(sock)
                    if self._drain(sock):
                        nursery.cancel_scope.cancel()
                        return

            async def set_locally() -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(rung)
            nursery.start_soon(set_locally)

    @staticmethod
    def _drain(sock: socket.socket) -> bool:
        got = False
        while True:
            try:
                sock.recv(16)
            except (BlockingIOError, InterruptedError):
                return got
            got = True

    def _unbind(self, name: str) -> None:
        sock = self._bound.pop(name)
        address = self.address(name)
        try:
            trio.lowlevel.notify_closing(sock)  # a task waiting on it wakes with an error
        except RuntimeError:
            pass  # not in the Trio thread: nothing can be waiting on it
        sock.close()
        if not address.startswith("\0"):
            Path(address).unlink(missing_ok=True)


def ring(data_dir: Path, names: Iterable[str]) -> None:
    """Ring ``names`` in ``data_dir`` once each, from a process that holds nothing there
    (e.g. ``flow deadletters replay``)."""
    run = RunDir(data_dir)
    try:
        for name in names:
            run.ring(name)
    finally:
        run.release()


async def woken(run: RunDir | None, name: str, event: trio.Event) -> None:
    """:meth:`RunDir.wait` when there is a run dir to listen in, else ``event.wait()``."""
    if run is None:
        await event.wait()
    else:
        await run.wait(name, event)
