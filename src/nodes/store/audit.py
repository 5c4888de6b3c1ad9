"""The audit trail: every step of an object's journey, keyed by SOPInstanceUID.

Events are written inside the transaction that makes the step happen, so the trail never
claims something that did not commit (and never misses something that did). Every field is
routing-safe: event names, lane names, outcome classes, reasons and notes that the nodes
promise are free of PHI, content hashes, sizes and durations.
"""

from __future__ import annotations

import time
from typing import Any

import lmdb

from .db import AuditEvent, Env, audit_key, decode_audit, encode, prefixed


def record(env: Env, txn: lmdb.Transaction, uid: str, event: str, **fields: Any) -> None:
    """Append one event for ``uid`` (``t`` defaults to now)."""
    fields.setdefault("t", time.time())
    fields["notes"] = list(fields.get("notes") or ())
    txn.put(audit_key(uid, env.next_seq(txn)), encode(AuditEvent(event=event, **fields)),
            db=env.audit)


def trail(env: Env, txn: lmdb.Transaction, uid: str) -> list[AuditEvent]:
    """Every event recorded for ``uid``, oldest first."""
    prefix = f"{uid}\0".encode()
    return [decode_audit(v) for _, v in prefixed(txn.cursor(db=env.audit), prefix)]
