"""Telling a service manager how the process is doing: the sd_notify protocol, stdlib only.

systemd (``Type=notify``) passes ``$NOTIFY_SOCKET``, the address of a Unix datagram socket:
a path, or a name in the abstract namespace when it starts with ``@``. Each state change is
one datagram of newline-separated ``KEY=VALUE`` fields (sd_notify(3)): ``READY=1`` once the
service serves, ``RELOADING=1`` (with ``MONOTONIC_USEC``) when a reload begins and ``READY=1``
again when it is done, ``STOPPING=1`` when a stop begins, ``STATUS=...`` free text that
``systemctl status`` shows.

Contract: without ``$NOTIFY_SOCKET`` (not started by systemd, or a service type that does not
listen) every call does nothing and returns False. A socket that cannot be reached is logged
once as ``notify.failed`` and never raises: readiness reporting must not stop the engine.
Sending never blocks for long (a full receive queue times out after a second).
"""

from __future__ import annotations

import os
import socket
import time

from ._log import get_logger

log = get_logger("flow.notify")

_SEND_TIMEOUT_S = 1.0


def _address(value: str) -> str | None:
    """The ``connect()`` address of ``$NOTIFY_SOCKET``; None for one we cannot use."""
    if value.startswith("@"):
        return "\0" + value[1:]  # abstract namespace (Linux)
    if value.startswith("/"):
        return value
    return None  # e.g. vsock:...: systemd in a VM host; not needed here


class Notifier:
    """Sends sd_notify datagrams to ``$NOTIFY_SOCKET`` (read once, at construction)."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        value = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
        self.address = _address(value) if value else None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """One datagram with ``fields`` (``send(READY=1, STATUS="...")``); True if sent."""
        if self.address is None:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(_SEND_TIMEOUT_S)
                sock.connect(self.address)
                sock.sendall(message.encode("utf-8"))
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("notify.failed", error_class=type(exc).__name__)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send(READY=1, STATUS=status)

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd (Type=notify-reload) tell this reload from an older one.
        return self.send(RELOADING=1, STATUS="reloading",
                         MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self) -> bool:
        return self.send(STOPPING=1, STATUS="stopping")
