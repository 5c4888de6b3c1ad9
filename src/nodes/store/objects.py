"""Stored objects: ingest (idempotent on SOPInstanceUID), the study index, and purge.

Blocking functions on an open write transaction, run by the group committer.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

import lmdb

from ..arrival import Envelope
from ..payload import BytesPayload, Payload
from . import audit, lanes
from .db import (Env, ObjectRecord, decode_object, done_key, encode, prefixed, study_key,
                 uid_key)
from .keyring import Keyring
from .spool import SpoolPayload


def blob_aad(uid: str, content_hash: str) -> bytes:
    # Bound to the version too: an older sealed blob of the same object put back in place
    # of the current one fails authentication.
    return b"dicomflow blob v1\0" + uid.encode("ascii") + b"\0" + content_hash.encode("ascii")


def spool_aad(uid: str, name: str) -> bytes:
    # The file name is random per version: an older spool file of the same object put in
    # place of the current one fails authentication.
    return b"dicomflow spool v1\0" + uid.encode("ascii") + b"\0" + name.encode("ascii")


class Stored(enum.Enum):
    NEW = "new"
    DUPLICATE = "duplicate"     # same bytes as stored: acknowledged, not re-sent
    REPLACED = "replaced"       # changed bytes: replaced, re-queued for every lane


@dataclass(slots=True)
class Prepared:
    """An arrival made ready to commit: hashed, and sealed (small) or spooled (large)."""

    envelope: Envelope
    content_hash: str
    size: int
    sealed: bytes | None = None   # small objects: the sealed bytes for ``blobs``
    spool: str = ""               # large objects: the spool file's name (already fsynced)
    key: str = ""                 # the fingerprint of the key that sealed it


@dataclass(slots=True)
class IngestResult:
    stored: Stored
    obsolete_spool: str = ""      # a spool file nothing references after this commit


def ingest(env: Env, txn: lmdb.Transaction, item: Prepared, lane_names: list[str],
           now: float) -> IngestResult:
    """Store ``item`` and queue it for every lane, unless the same bytes are already stored."""
    uid = item.envelope.sop_instance_uid
    raw = txn.get(uid_key(uid), db=env.objects)
    old = decode_object(raw) if raw is not None else None
    if old is not None and old.content_hash == item.content_hash:
        audit.record(env, txn, uid, "duplicate", t=now, content_hash=item.content_hash,
                     size=item.size, detail=_origin(item.envelope))
        return IngestResult(Stored.DUPLICATE, obsolete_spool=item.spool)
    if old is not None:
        _unindex(env, txn, uid, old)
    record = ObjectRecord(envelope=item.envelope, content_hash=item.content_hash,
                          size=item.size, stored_at=now, lanes=list(lane_names),
                          spool=item.spool, done_at=0.0 if lane_names else now,
                          key=item.key)
    txn.put(uid_key(uid), encode(record), db=env.objects)
    if not lane_names:  # nothing to deliver: purged after the retention time
        txn.put(done_key(now, uid), b"", db=env.done)
    if item.sealed is not None:
        txn.put(uid_key(uid), item.sealed, db=env.blobs)
    else:
        txn.delete(uid_key(uid), db=env.blobs)
    if item.envelope.study_instance_uid:
        txn.put(study_key(item.envelope.study_instance_uid, uid), b"", db=env.study)
    audit.record(env, txn, uid, "replace" if old else "arrival", t=now, size=item.size,
                 content_hash=item.content_hash, detail=_origin(item.envelope),
                 notes=[f"lanes {','.join(lane_names) or '-'}"])
    for lane in lane_names:
        lanes.enqueue(env, txn, lane, uid, item.content_hash, now, new_object=old is None)
    obsolete = old.spool if old is not None and old.spool != item.spool else ""
    return IngestResult(Stored.REPLACED if old else Stored.NEW, obsolete_spool=obsolete)


def _origin(envelope: Envelope) -> str:
    return " ".join(f"{k}={v}" for k, v in (("sop_class", envelope.sop_class_uid),
                                            ("calling_ae", envelope.calling_ae),
                                            ("peer", envelope.peer)) if v)


def _unindex(env: Env, txn: lmdb.Transaction, uid: str, old: ObjectRecord) -> None:
    if old.done_at:
        txn.delete(done_key(old.done_at, uid), db=env.done)
    if old.envelope.study_instance_uid:
        txn.delete(study_key(old.envelope.study_instance_uid, uid), db=env.study)


def get(env: Env, txn: lmdb.Transaction, uid: str) -> ObjectRecord | None:
    raw = txn.get(uid_key(uid), db=env.objects)
    return decode_object(raw) if raw is not None else None


def open_payload(keyring: Keyring, spool_dir: Path, uid: str, obj: ObjectRecord,
                 blob: bytes | None) -> Payload:
    """The stored bytes of ``uid`` as a payload: a small object's ``blob`` (read in the
    caller's transaction) unsealed now, a spooled one decrypted as it is read.

    Raises :class:`~.keyring.KeyNotInKeyring` for a key this process has not loaded,
    :class:`LookupError` when a small object has no blob, and what unsealing raises for
    bytes that are not what was sealed."""
    key = keyring.key_for(obj)
    if obj.spool:
        return SpoolPayload(key, spool_dir / obj.spool, spool_aad(uid, obj.spool), obj.size)
    if blob is None:
        raise LookupError("no stored bytes")
    return BytesPayload(key.unseal(blob, blob_aad(uid, obj.content_hash)))


def mark_done(env: Env, txn: lmdb.Transaction, uid: str, now: float,
              obj: ObjectRecord | None = None) -> None:
    """Every lane finished with ``uid``: purge it after the retention time. ``obj``: its
    record as the caller just read it in ``txn`` (else it is read here)."""
    if obj is None:
        obj = get(env, txn, uid)
    if obj is None or obj.done_at:
        return
    obj.done_at = now
    txn.put(uid_key(uid), encode(obj), db=env.objects)
    txn.put(done_key(now, uid), b"", db=env.done)
    audit.record(env, txn, uid, "finished", t=now)


def delete(env: Env, txn: lmdb.Transaction, uid: str, now: float, why: str) -> str:
    """Remove the object, its bytes and its lane entries; returns its spool file name (the
    caller deletes the file after the commit). The audit trail stays for the audit
    retention time."""
    obj = get(env, txn, uid)
    if obj is None:
        return ""
    _unindex(env, txn, uid, obj)
    txn.delete(uid_key(uid), db=env.objects)
    txn.delete(uid_key(uid), db=env.blobs)
    for lane in obj.lanes:
        lanes.remove(env, txn, lane, uid)
    seq = audit.record(env, txn, uid, "purge", t=now, reason=why)
    audit.keep_until_retention(env, txn, uid, now, seq)
    return obj.spool


def first_done(env: Env, txn: lmdb.Transaction) -> float | None:
    """When the object finished longest ago finished (None: none waits for purge)."""
    cursor = txn.cursor(db=env.done)
    return int.from_bytes(cursor.key()[:8], "big") / 1000.0 if cursor.first() else None


def purge_expired(env: Env, txn: lmdb.Transaction, now: float, retention_s: float,
                  limit: int = 500) -> tuple[int, list[str]]:
    """Delete up to ``limit`` objects finished more than ``retention_s`` ago; returns how
    many, and the spool file names to delete once this transaction has committed."""
    expired: list[str] = []
    cursor = txn.cursor(db=env.done)
    if cursor.first():
        for key, _ in cursor:
            done_at = int.from_bytes(key[:8], "big") / 1000.0
            if done_at + retention_s > now or len(expired) >= limit:
                break
            expired.append(key[8:].decode("ascii"))
    spools = []
    for uid in expired:
        spool = delete(env, txn, uid, now, "retention")
        if spool:
            spools.append(spool)
    return len(expired), spools


def study(env: Env, txn: lmdb.Transaction, study_uid: str) -> list[ObjectRecord]:
    """Every stored object of ``study_uid``."""
    prefix = f"{study_uid}\0".encode()
    found = []
    for key, _ in prefixed(txn.cursor(db=env.study), prefix):
        obj = get(env, txn, key[len(prefix):].decode("ascii"))
        if obj is not None:
            found.append(obj)
    return found


def referenced_spools(env: Env, txn: lmdb.Transaction) -> set[str]:
    """Names of every spool file an object refers to (the rest are orphans of a crash)."""
    names = set()
    for _, raw in txn.cursor(db=env.objects):
        obj = decode_object(raw)
        if obj.spool:
            names.add(obj.spool)
    return names
