"""The data dir's format version and key record: what a Store checks before it touches data.

Contract
--------
The ``meta`` database holds two records besides the counters:

- ``format``: the layout version (ASCII digits). **Format 1** is the layout of releases
  before it was recorded (no ``format`` record, no key record, objects without a key id).
  **Format 2** adds the key record below and :attr:`ObjectRecord.key` (the fingerprint of
  the key that sealed the object's bytes; empty: the key record's ``original``).
- ``keys``: a :class:`KeyLedger`: the current key's fingerprint, the retired keys objects
  may still be sealed with, and the ``pending`` key of a rotation in progress.

**Format 3** adds the ingest journals (``journal/*.journal`` beside LMDB, see
:mod:`.journal`) and the ``journal\0<file>`` records of what LMDB took in from each: an
acknowledged arrival may be in a journal only, so a release that does not read journals
must not open the data dir. Format 2 becomes 3 when opened (nothing else changes).

:func:`settle` runs when a Store opens (and before ``flow keys`` acts). It:

- refuses a data dir newer than :data:`FORMAT` (:class:`DataDirError` naming both versions);
- records :data:`FORMAT` over format 2 (``"upgraded"``);
- loads the keyring, generating a key only for a data dir that holds no data;
- format 2 and later: refuses a key whose fingerprint is not the recorded current one (nor the
  pending one of a rotation that crashed half-way, which it then completes), naming both
  fingerprints and where the key came from; refuses when a retired key that objects still
  use is missing from the keyring;
- format 1 with objects: unseals up to :data:`PROBE` stored objects with the key; if none
  authenticates (and at least one was read) it refuses, else it upgrades in place in one
  transaction (writes ``format`` and ``keys``; no object or lane item changes);
- empty: records format 3 and the key.

The check and the record or upgrade happen in one write transaction, so processes that open
the same data dir at once take turns: the first records or upgrades, the others find it
done. A refusal changes nothing: no item changes state, nothing is dead-lettered. Fingerprints
(:attr:`AtRestKey.key_id`) are HKDF-derived and safe to print; no message holds key material
or PHI.
"""

from __future__ import annotations

import time
from pathlib import Path

import lmdb
import msgspec

from flow import ConfigError

from .crypto import AtRestKey, Tampered
from .db import Env, ObjectRecord, decode_object, uid_key
from .keyring import Keyring, KeySource, publish_staged, rotate_files
from .objects import blob_aad, spool_aad
from .spool import SpoolPayload

__all__ = ["DataDirError", "FORMAT", "KeyLedger", "settle", "rotate", "key_usage",
           "read_format", "read_ledger"]

FORMAT = 3
PROBE = 16  # format-1 objects tried when verifying the key of an unrecorded data dir
_FORMAT_KEY = b"format"
_KEYS_KEY = b"keys"


class DataDirError(ConfigError):
    """The data dir cannot be used as configured (wrong key, newer format, ...). One line."""


class KeyLedger(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The data dir's record of its keys (fingerprints only)."""

    current: str
    original: str = ""          # the key of format-1 objects (ObjectRecord.key == "")
    retired: list[str] = []     # older current keys, oldest first
    pending: str = ""           # the new key of a rotation between its two commits
    rotated_at: float = 0.0


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(KeyLedger)


def read_format(env: Env, txn: lmdb.Transaction) -> int:
    """The recorded format; 1 for a data dir that records none (made before format 2)."""
    raw = txn.get(_FORMAT_KEY, db=env.meta)
    return int(raw.decode("ascii")) if raw else 1


def read_ledger(env: Env, txn: lmdb.Transaction) -> KeyLedger | None:
    raw = txn.get(_KEYS_KEY, db=env.meta)
    return _dec.decode(raw) if raw else None


def _write(env: Env, txn: lmdb.Transaction, ledger: KeyLedger) -> None:
    txn.put(_FORMAT_KEY, str(FORMAT).encode("ascii"), db=env.meta)
    txn.put(_KEYS_KEY, _enc.encode(ledger), db=env.meta)


def sealed_with(obj: ObjectRecord, ledger: KeyLedger) -> str:
    """The fingerprint of the key that sealed ``obj``'s bytes."""
    return obj.key or ledger.original


def settle(env: Env, source: KeySource, spool_dir: Path, *, where: str) -> tuple[Keyring, str]:
    """Check (and if needed record or upgrade) the data dir against the configured key.

    Returns the keyring and what happened: ``"created"``, ``"upgraded"`` or ``"checked"``.
    ``where`` names the Store in messages. Blocking; raises :class:`DataDirError` or
    :class:`~nodes.store.crypto.KeyFileError` and then has changed nothing.
    """
    # One write transaction from the first read to the last write: LMDB's writer lock makes
    # processes opening the data dir at once take turns (the key file is created, when it
    # is, under the same lock; publish_key_file lets the first one win anyway).
    with env.begin(write=True) as txn:
        fmt, ledger = read_format(env, txn), read_ledger(env, txn)
        empty = ledger is None and txn.stat(env.objects)["entries"] == 0
        if fmt > FORMAT:
            raise DataDirError(
                f"{where}: data dir {str(env.path.parent)!r} has format {fmt}, newer than "
                f"format {FORMAT} that this release reads; run the release that wrote it "
                f"(or newer)")
        keyring = Keyring.load(source, create=empty)
        key = keyring.current
        if empty:
            _write(env, txn, KeyLedger(current=key.key_id, original=key.key_id))
            keyring.original = key.key_id
            return keyring, "created"
        if ledger is None:
            _verify_format1(env, txn, key, spool_dir, source, where)
            _write(env, txn, KeyLedger(current=key.key_id, original=key.key_id))
            keyring.original = key.key_id
            return keyring, "upgraded"
        if key.key_id == ledger.pending:  # the rotation crashed after replacing the key file
            ledger = _promote(ledger)
            _write(env, txn, ledger)
        elif key.key_id == ledger.current and ledger.pending:  # ... before replacing it
            ledger.pending = ""
            _write(env, txn, ledger)
        elif key.key_id != ledger.current:
            state = "a retired key of" if key.key_id in ledger.retired else "not the key of"
            raise DataDirError(
                f"{where}: the at-rest key from {source.describe()} has fingerprint "
                f"{key.key_id}, {state} data dir {str(env.path.parent)!r}, whose current key "
                f"is {ledger.current}; nothing was changed. Configure the key this data dir "
                f"uses (restore it from its backup), see `flow keys status`")
        _check_retired_present(env, txn, keyring, ledger, where)
        upgraded = fmt < FORMAT
        if upgraded:
            _write(env, txn, ledger)
    keyring.original = ledger.original
    return keyring, "upgraded" if upgraded else "checked"


def _promote(ledger: KeyLedger) -> KeyLedger:
    retired = [k for k in ledger.retired if k != ledger.current] + [ledger.current]
    return KeyLedger(current=ledger.pending, original=ledger.original, retired=retired,
                     rotated_at=time.time())


def _check_retired_present(env: Env, txn: lmdb.Transaction, keyring: Keyring,
                           ledger: KeyLedger, where: str) -> None:
    missing = {k for k in ledger.retired if k not in keyring}
    if not missing:
        return
    used = {k: n for k, n in key_usage(env, txn, ledger).items() if k in missing and n}
    if used:
        names = ", ".join(f"{k} ({n} objects)" for k, n in sorted(used.items()))
        raise DataDirError(
            f"{where}: retired keys {names} are missing from the keyring "
            f"{str(keyring.source.keyring_dir)!r}; restore their files "
            f"(<fingerprint>.key) from the backup")


def key_usage(env: Env, txn: lmdb.Transaction, ledger: KeyLedger) -> dict[str, int]:
    """How many stored objects each key sealed (every known key, zeros included)."""
    counts = {k: 0 for k in (*ledger.retired, ledger.current)}
    for _, raw in txn.cursor(db=env.objects):
        k = sealed_with(decode_object(raw), ledger)
        counts[k] = counts.get(k, 0) + 1
    return counts


def _verify_format1(env: Env, txn: lmdb.Transaction, key: AtRestKey, spool_dir: Path,
                     source: KeySource, where: str) -> None:
    """A format-1 data dir records no fingerprint: some stored object must unseal."""
    tried, failed_uid = 0, ""
    for _, raw in txn.cursor(db=env.objects):
        if tried >= PROBE:
            break
        obj = decode_object(raw)
        uid = obj.envelope.sop_instance_uid
        try:
            if obj.spool:
                payload = SpoolPayload(key, spool_dir / obj.spool, spool_aad(uid, obj.spool),
                                       obj.size)
                with payload.open() as reader:
                    reader.read(1)
            else:
                blob = txn.get(uid_key(uid), db=env.blobs)
                if blob is None:
                    continue
                key.unseal(blob, blob_aad(uid, obj.content_hash))
        except FileNotFoundError:
            continue
        except Tampered:
            tried, failed_uid = tried + 1, failed_uid or uid
            continue
        return  # one object unseals: this is the data dir's key
    if tried:
        raise DataDirError(
            f"{where}: data dir {str(env.path.parent)!r} (format 1, no key fingerprint "
            f"recorded) was not written with the at-rest key from {source.describe()} "
            f"(fingerprint {key.key_id}): {tried} stored objects, e.g. {failed_uid}, do not "
            f"unseal with it; nothing was changed. Configure the key it was written with")


def rotate(env: Env, source: KeySource, spool_dir: Path, *, where: str) -> tuple[str, str]:
    """Make a new random key current: the old one moves into the keyring (still used to
    read), the key file gets the new one. Returns ``(old, new)`` fingerprints.

    Crash-safe in this order: old key into the keyring; new key staged; ``pending`` recorded;
    key file replaced; ``pending`` promoted to ``current``. A start between the last two
    finds the pending key in the key file and completes the promotion (:func:`settle`).
    Works on a stopped data dir or beside a running graph: the running Store keeps sealing
    with the old key (readable from the keyring) until it restarts or reloads (SIGHUP).
    """
    settle(env, source, spool_dir, where=where)
    old, staged, new = rotate_files(source)
    with env.begin(write=True) as txn:
        ledger = read_ledger(env, txn)
        assert ledger is not None  # settle() recorded it
        if ledger.current != old.key_id:
            staged.unlink(missing_ok=True)
            raise DataDirError(f"{where}: the key changed while rotating; run it again")
        ledger.pending = new.key_id
        _write(env, txn, ledger)
    publish_staged(source, staged)
    with env.begin(write=True) as txn:
        ledger = read_ledger(env, txn)
        assert ledger is not None
        _write(env, txn, _promote(ledger))
    return old.key_id, new.key_id
