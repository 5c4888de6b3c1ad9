"""Start and stop real peers (DCMTK, Orthanc) on loopback, by process id.

A test that needs a peer calls :func:`need`. Without the peer it skips, except under
``DICOMFLOW_REQUIRE_PEERS=1`` (set by CI), where the missing peer is a failure: CI must
never go green by skipping the interop suite.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

REQUIRE_PEERS = os.environ.get("DICOMFLOW_REQUIRE_PEERS") == "1"


def need(*binaries: str) -> dict[str, str]:
    """Return {name: path} for each binary, or skip (fail under DICOMFLOW_REQUIRE_PEERS=1)."""
    found: dict[str, str] = {}
    for name in binaries:
        path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
        if path is None:
            message = f"peer {name!r} not installed"
            if REQUIRE_PEERS:
                pytest.fail(message + " (DICOMFLOW_REQUIRE_PEERS=1)")
            pytest.skip(message)
        found[name] = path
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProcessEnded(RuntimeError):
    """The process that was to listen ended before anything accepted."""


def wait_for_port(port: int, timeout: float = 15.0, host: str = "127.0.0.1",
                  process: "Process | None" = None) -> None:
    """Block until something accepts on host:port, or raise TimeoutError (ProcessEnded
    as soon as ``process``, the one to listen, has ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and not process.alive():
            raise ProcessEnded(f"{process.args[0]} ended before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


class Process:
    """A child process started by the test and stopped by its own pid."""

    def __init__(self, args: Sequence[str], *, cwd: str | Path | None = None,
                 env: dict[str, str] | None = None, log: Path | None = None) -> None:
        self.args = list(args)
        self.log = log
        out = open(log, "ab") if log else subprocess.DEVNULL
        self.popen = subprocess.Popen(self.args, cwd=cwd, env=env, stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        if log:
            out.close()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def pause(self) -> None:
        """SIGSTOP by pid: the process stays, its sockets stay open, and it does nothing
        (the kernel still completes TCP handshakes into its listen backlog) until
        :meth:`resume`. :meth:`stop` and :meth:`kill` end a paused process too."""
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM by pid, then SIGKILL after ``timeout``; returns the exit code."""
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            os.kill(self.pid, signal.SIGCONT)  # a paused process acts on SIGTERM once resumed
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
        return self.popen.wait(timeout)

    def kill(self) -> int:
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        return self.popen.wait(10)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""

    def __enter__(self) -> "Process":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
