"""Re-sealing objects under the current key after a rotation (blocking helpers).

The Store runs :func:`stale` / :func:`respool` / :func:`commit` in the background after it
opens (see ``Store.reseal``): every object whose bytes a retired key sealed is sealed again
under the current key, in small transactions beside ingest and lanes. A small object's blob
is unsealed and sealed again inside the write transaction; a spooled object gets a new spool
file (written and fsynced before the commit that points to it; the old file is removed
after). An object changed since it was read (replaced, purged) is left alone, and a spooled
one that a lane holds in flight (it may be streaming the old file) is left for a later pass.
Lane items never change state: re-sealing is invisible to delivery.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import lmdb

from . import lanes, objects
from .crypto import Tampered
from .db import IN_FLIGHT, Env, ObjectRecord, decode_object, encode, uid_key
from .keyring import Keyring, KeyNotInKeyring
from .objects import blob_aad, spool_aad
from .spool import SpoolPayload, write_spool

BATCH = 32


@dataclass
class Pass:
    """What one commit of a batch did."""

    resealed: int = 0
    skipped: int = 0                                      # left for a later pass
    obsolete: list[str] = field(default_factory=list)      # old spool files to remove
    unused: list[str] = field(default_factory=list)        # new spool files not committed


def stale(env: Env, keyring: Keyring, after: bytes, limit: int = BATCH
          ) -> list[tuple[str, ObjectRecord]]:
    """Up to ``limit`` objects after the key ``after`` not sealed with the current key."""
    current = keyring.current.key_id
    found: list[tuple[str, ObjectRecord]] = []
    with env.begin() as txn:
        cursor = txn.cursor(db=env.objects)
        if not cursor.set_range(after):
            return found
        for key, raw in cursor:
            if key == after:
                continue
            obj = decode_object(raw)
            if (obj.key or keyring.original) != current:
                found.append((key.decode("ascii"), obj))
                if len(found) >= limit:
                    break
    return found


def respool(keyring: Keyring, spool_dir: Path, uid: str, obj: ObjectRecord) -> str:
    """A new spool file of ``obj`` sealed with the current key; returns its name."""
    old = SpoolPayload(keyring.key_for(obj), spool_dir / obj.spool, spool_aad(uid, obj.spool),
                       obj.size)
    name = f"{os.urandom(12).hex()}.spool"
    with old.open() as source:
        write_spool(keyring.current, source, spool_dir / name, spool_aad(uid, name))
    return name


def commit(env: Env, keyring: Keyring, batch: list[tuple[str, ObjectRecord]],
           respooled: dict[str, str], txn: lmdb.Transaction) -> Pass:
    """Point each object of ``batch`` at bytes sealed with the current key (one transaction)."""
    done = Pass()
    current = keyring.current.key_id
    for uid, seen in batch:
        new_spool = respooled.get(uid, "")
        obj = objects.get(env, txn, uid)
        if (obj is None or obj.content_hash != seen.content_hash or obj.spool != seen.spool
                or (obj.key or keyring.original) == current):
            if new_spool:
                done.unused.append(new_spool)
            continue
        if obj.spool:
            if not new_spool or any(
                    (item := lanes.get(env, txn, lane, uid)) is not None
                    and item.state == IN_FLIGHT for lane in obj.lanes):
                done.skipped += 1
                if new_spool:
                    done.unused.append(new_spool)
                continue
            done.obsolete.append(obj.spool)
            obj.spool = new_spool
        else:
            blob = txn.get(uid_key(uid), db=env.blobs)
            if blob is None:
                continue
            aad = blob_aad(uid, obj.content_hash)
            try:
                plain = keyring.key_for(obj).unseal(blob, aad)
            except (Tampered, KeyNotInKeyring):
                continue  # left as it is: its lanes report it when they reach it
            txn.put(uid_key(uid), keyring.current.seal(plain, aad), db=env.blobs)
        obj.key = current
        txn.put(uid_key(uid), encode(obj), db=env.objects)
        done.resealed += 1
    return done
