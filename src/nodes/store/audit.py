"""The audit trail: every step of an object's journey, keyed by SOPInstanceUID.

Events are written inside the transaction that makes the step happen, so the trail never
claims something that did not commit (and never misses something that did). Every field is
routing-safe: event names, lane names, outcome classes, reasons and notes that the nodes
promise are free of PHI, content hashes, sizes and durations.
"""

from __future__ import annotations

import struct
import time
from typing import Any

import lmdb

from .db import AuditEvent, Env, audit_key, decode_audit, done_key, encode, prefixed


def record(env: Env, txn: lmdb.Transaction, uid: str, event: str, **fields: Any) -> int:
    """Append one event for ``uid`` (``t`` defaults to now); returns its sequence number."""
    fields.setdefault("t", time.time())
    fields["notes"] = list(fields.get("notes") or ())
    seq = env.next_seq(txn)
    env.append(txn, audit_key(uid, seq), encode(AuditEvent(event=event, **fields)), env.audit)
    return seq


def trail(env: Env, txn: lmdb.Transaction, uid: str) -> list[AuditEvent]:
    """Every event recorded for ``uid``, oldest first."""
    prefix = f"{uid}\0".encode()
    return [decode_audit(v) for _, v in prefixed(txn.cursor(db=env.audit), prefix)]


def keep_until_retention(env: Env, txn: lmdb.Transaction, uid: str, purged_at: float,
                         last_seq: int) -> None:
    """The object is gone: its trail up to event ``last_seq`` (the purge) expires after the
    audit retention time."""
    txn.put(done_key(purged_at, uid), struct.pack(">Q", last_seq), db=env.purged)


def first_purged(env: Env, txn: lmdb.Transaction) -> float | None:
    cursor = txn.cursor(db=env.purged)
    return int.from_bytes(cursor.key()[:8], "big") / 1000.0 if cursor.first() else None


def expire(env: Env, txn: lmdb.Transaction, now: float, retention_s: float,
           limit: int = 500) -> int:
    """Delete the trails of objects purged more than ``retention_s`` ago (up to ``limit``
    objects); events recorded after the purge (the object came again) stay."""
    expired = []
    cursor = txn.cursor(db=env.purged)
    if cursor.first():
        for key, value in cursor:
            purged_at = int.from_bytes(key[:8], "big") / 1000.0
            if purged_at + retention_s > now or len(expired) >= limit:
                break
            # The boundary is the purge event's own sequence number: the clock it was
            # read from runs after ``purged_at`` when the commit waited its turn.
            expired.append((key, key[8:].decode("ascii"), struct.unpack(">Q", value)[0]))
    for key, uid, last_seq in expired:
        trail_cursor = txn.cursor(db=env.audit)
        prefix = f"{uid}\0".encode()
        stale = [k for k, _ in prefixed(trail_cursor, prefix)
                 if int.from_bytes(k[-8:], "big") <= last_seq]
        for k in stale:
            txn.delete(k, db=env.audit)
        txn.delete(key, db=env.purged)
    return len(expired)
