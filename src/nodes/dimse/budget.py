"""The budget for connections that have not finished association negotiation (no I/O here).

A TCP connection to the listener is *pending* from the moment it is accepted until its
A-ASSOCIATE-RQ has arrived (or it is closed). Pending connections are bounded apart from
``max_associations``, which counts negotiated associations only:

- at most ``total`` pending connections overall and ``per_peer`` from one IP address; a
  connection past either bound is closed as soon as it is accepted;
- each has until its deadline (``timeout_s`` after the accept) to deliver its
  A-ASSOCIATE-RQ, then it is closed;
- its first PDU must be an A-ASSOCIATE-RQ no longer than :data:`MAX_ASSOCIATE_RQ`
  (:func:`first_pdu_problem`), so what a pending connection can make us hold is bounded
  before we read it;
- once negotiated, no PDU may be longer than the Maximum Length we advertised
  (:func:`pdu_too_long`).

:class:`ConnectionBudget` is the bookkeeping; the server in ``_pynetdicom`` does the I/O.
It is thread-safe: the accept loop admits and reaps, the connections' own threads release.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

A_ASSOCIATE_RQ = 0x01
# PS3.8 9.3.2: the fixed fields of an A-ASSOCIATE-RQ after its 6-byte header.
MIN_ASSOCIATE_RQ = 68
# 128 presentation contexts (PS3.8 9.3.2.2: odd IDs 1-255) with 20 transfer syntaxes of
# 64 characters each are ~190 KiB; user identity adds two fields of at most 64 KiB.
MAX_ASSOCIATE_RQ = 512 * 1024


def first_pdu_problem(header: bytes) -> str | None:
    """Why the 6-byte PDU header ``header``, the first a connection sent, is not acceptable
    (routing-safe text), or None for an A-ASSOCIATE-RQ of a plausible length."""
    if len(header) < 6:
        return "connection closed before a whole PDU header"
    pdu_type, _, length = struct.unpack(">BBL", header[:6])
    if pdu_type != A_ASSOCIATE_RQ:
        return f"first PDU is type 0x{pdu_type:02X}, not an A-ASSOCIATE-RQ"
    if length > MAX_ASSOCIATE_RQ:
        return f"A-ASSOCIATE-RQ of {length} bytes is over {MAX_ASSOCIATE_RQ}"
    if length < MIN_ASSOCIATE_RQ:
        return f"A-ASSOCIATE-RQ of {length} bytes is shorter than its fixed fields"
    return None


# After negotiation a PDU may be as long as the Maximum Length we advertised (PS3.8 D.1:
# the P-DATA-TF's variable field), plus this much for senders that count a header in it.
PDU_SLACK = 1024
PDU_NAMES = {0x01: "A-ASSOCIATE-RQ", 0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ",
             0x04: "P-DATA-TF", 0x05: "A-RELEASE-RQ", 0x06: "A-RELEASE-RP", 0x07: "A-ABORT"}


def pdu_too_long(header: bytes, max_pdu: int) -> str | None:
    """Why a PDU header read after negotiation is refused (its length is past what we
    advertised, ``max_pdu``; 0: no limit), else None. Routing-safe text."""
    if max_pdu <= 0 or len(header) != 6:
        return None
    kind, _, length = struct.unpack(">BBL", header)
    if length <= max_pdu + PDU_SLACK:
        return None
    return (f"{PDU_NAMES.get(kind, f'PDU type 0x{kind:02X}')} of {length} bytes, past the "
            f"maximum length of {max_pdu} this listener negotiated")


@dataclass(eq=False)
class Pending:
    """One admitted connection still negotiating. ``attached`` is whatever the I/O side
    hangs on it (the association), set once known."""

    peer: str
    deadline: float
    attached: object = None
    released: bool = field(default=False)


class ConnectionBudget:
    """Admits, tracks and expires pending connections (see the module docstring).

    Keys are whatever identifies a connection to the caller (the accepted socket).
    """

    def __init__(self, total: int, per_peer: int, timeout_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if total < 1 or per_peer < 1 or timeout_s <= 0:
            raise ValueError("total, per_peer and timeout_s must be positive")
        self.total = total
        self.per_peer = per_peer
        self.timeout_s = timeout_s
        self.clock = clock
        self._lock = threading.Lock()
        self._pending: dict[Hashable, Pending] = {}
        self._by_peer: dict[str, int] = {}

    def admit(self, key: Hashable, peer: str) -> tuple[Pending | None, str]:
        """Register ``key`` from ``peer`` (an IP address) as pending: (its record, "") or,
        past a bound, (None, why it was refused)."""
        with self._lock:
            if len(self._pending) >= self.total:
                return None, f"{len(self._pending)} connections still negotiating " \
                             f"(max_pending_connections)"
            from_peer = self._by_peer.get(peer, 0)
            if from_peer >= self.per_peer:
                return None, f"{from_peer} connections from this address still " \
                             f"negotiating (max_pending_per_peer)"
            record = Pending(peer, self.clock() + self.timeout_s)
            self._pending[key] = record
            self._by_peer[peer] = from_peer + 1
            return record, ""

    def get(self, key: Hashable) -> Pending | None:
        with self._lock:
            return self._pending.get(key)

    def release(self, key: Hashable) -> Pending | None:
        """``key`` is no longer pending (its request arrived, or it closed): its record, or
        None if it was not pending (released before, expired, never admitted)."""
        with self._lock:
            record = self._pending.pop(key, None)
            if record is not None:
                record.released = True
                left = self._by_peer[record.peer] - 1
                if left:
                    self._by_peer[record.peer] = left
                else:
                    del self._by_peer[record.peer]
            return record

    def expired(self) -> list[tuple[Hashable, Pending]]:
        """Release and return every pending connection past its deadline."""
        now = self.clock()
        with self._lock:
            keys = [key for key, record in self._pending.items() if record.deadline <= now]
        return [(key, record) for key in keys if (record := self.release(key)) is not None]

    def drain(self) -> list[tuple[Hashable, Pending]]:
        """Release and return every pending connection (the listener is stopping)."""
        with self._lock:
            keys = list(self._pending)
        return [(key, record) for key in keys if (record := self.release(key)) is not None]

    def seconds_to_next_deadline(self) -> float | None:
        """How long until the first pending connection expires (None: nothing pending)."""
        with self._lock:
            if not self._pending:
                return None
            first = min(record.deadline for record in self._pending.values())
        return max(0.0, first - self.clock())

    def remaining_s(self, record: Pending) -> float:
        return max(0.0, record.deadline - self.clock())

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)
