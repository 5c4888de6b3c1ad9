"""The Store's LMDB environment: its named databases, key layout and record types.

Everything here is blocking and runs in ``trio.to_thread.run_sync`` (or in a CLI process).
Layout of ``<data_dir>/lmdb`` (one environment, several named databases):

==========  =====================================  ============================================
database    key                                    value
==========  =====================================  ============================================
objects     SOPInstanceUID                         :class:`ObjectRecord` (routing-safe, clear)
blobs       SOPInstanceUID                         sealed Part 10 bytes (AES-256-GCM) of small
                                                   objects; large ones are spool files
items       lane NUL uid                           :class:`LaneItem`: the lane's ledger entry
due         lane NUL due_ms seq (big-endian)       uid: what a lane's pump sends next
audit       uid NUL seq                            :class:`AuditEvent`
study       StudyInstanceUID NUL uid               empty (the FHIR lane's study index)
done        done_ms uid                            empty (objects every lane has finished)
purged      purged_ms uid                          empty (trails kept until audit retention)
meta        name                                   counters (per-lane state counts, errors);
                                                   ``format`` and ``keys`` (see :mod:`.layout`)
==========  =====================================  ============================================

Only routing-safe facts are stored in clear (UIDs, SOP class, AE titles, lane states, routing-
safe reasons); the dataset bytes are sealed. ``lock=True`` and no process-local state in the
database keep the door open for several processes sharing one environment.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import msgspec

from ..arrival import Envelope

ENV_DIR = "lmdb"
SPOOL_DIR = "spool"
DATABASES = ("objects", "blobs", "items", "due", "audit", "study", "done", "purged", "meta")
MB = 1 << 20

# Lane item states. QUEUED and RETRYING wait in the due index; IN_FLIGHT was handed to the
# lane; the rest are final (DEAD until an operator replays or purges it).
QUEUED, RETRYING, IN_FLIGHT = "queued", "retrying", "in_flight"
DELIVERED, SKIPPED, DEAD, DISCARDED = "delivered", "skipped", "dead_lettered", "discarded"
WAITING = (QUEUED, RETRYING)
FINISHED = (DELIVERED, SKIPPED, DISCARDED)
STATES = (QUEUED, RETRYING, IN_FLIGHT, DELIVERED, SKIPPED, DEAD, DISCARDED)


class ObjectRecord(msgspec.Struct, kw_only=True):
    """One stored object. ``spool`` names its spool file; empty: sealed in ``blobs``.
    ``key``: the fingerprint of the key that sealed it (format 2; empty in format 1, see
    :mod:`.layout`)."""

    envelope: Envelope
    content_hash: str
    size: int
    stored_at: float
    lanes: list[str]
    spool: str = ""
    done_at: float = 0.0
    key: str = ""


class LaneItem(msgspec.Struct, kw_only=True):
    """One lane's ledger entry for one object (the version is ``content_hash``)."""

    state: str
    content_hash: str
    queued_at: float
    updated_at: float
    attempts: int = 0          # failed attempts of this version
    due_key: bytes = b""       # its key in ``due`` while QUEUED or RETRYING
    outcome: str = ""          # tag of the last outcome
    reason: str = ""           # routing-safe reason of the last failure


class AuditEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One step of an object's journey (``flow trace``). Routing-safe by construction."""

    t: float
    event: str                 # arrival, duplicate, replace, attempt, dead_letter, ...
    lane: str = ""
    outcome: str = ""
    reason: str = ""
    detail: str = ""
    notes: list[str] = []
    attempt: int = 0
    duration_ms: float | None = None
    content_hash: str = ""
    size: int = 0
    stale: bool = False


def _enc_hook(value: object) -> object:
    # Envelope fields built from pydicom values are ``str`` subclasses (pydicom's UID).
    if isinstance(value, str):
        return str(value)
    raise NotImplementedError(f"cannot store a {type(value).__name__}")


_enc = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_dec_object = msgspec.msgpack.Decoder(ObjectRecord)
_dec_item = msgspec.msgpack.Decoder(LaneItem)
_dec_audit = msgspec.msgpack.Decoder(AuditEvent)
encode = _enc.encode


def decode_object(raw: bytes) -> ObjectRecord:
    return _dec_object.decode(raw)


def decode_item(raw: bytes) -> LaneItem:
    return _dec_item.decode(raw)


def decode_audit(raw: bytes) -> AuditEvent:
    return _dec_audit.decode(raw)


# -- keys ---------------------------------------------------------------------------------

def uid_key(uid: str) -> bytes:
    return uid.encode("ascii")


def item_key(lane: str, uid: str) -> bytes:
    return f"{lane}\0{uid}".encode()


def lane_prefix(lane: str) -> bytes:
    return f"{lane}\0".encode()


def due_key(lane: str, due: float, seq: int) -> bytes:
    return lane_prefix(lane) + struct.pack(">QQ", max(0, int(due * 1000)), seq)


def due_time(key: bytes) -> float:
    return struct.unpack(">Q", key[-16:-8])[0] / 1000.0


def audit_key(uid: str, seq: int) -> bytes:
    return f"{uid}\0".encode() + struct.pack(">Q", seq)


def study_key(study_uid: str, uid: str) -> bytes:
    return f"{study_uid}\0{uid}".encode()


def done_key(done_at: float, uid: str) -> bytes:
    return struct.pack(">Q", int(done_at * 1000)) + uid_key(uid)


def prefixed(cursor: lmdb.Cursor, prefix: bytes):
    """(key, value) pairs of ``cursor``'s database whose key starts with ``prefix``."""
    if not cursor.set_range(prefix):
        return
    for key, value in cursor:
        if not key.startswith(prefix):
            return
        yield key, value


# -- the environment ----------------------------------------------------------------------

@dataclass(eq=False)
class _Round:
    """What :meth:`Env.begin_round` keeps in memory for one commit round."""

    txn: lmdb.Transaction
    counters: dict[bytes, int]
    dirty: set[bytes] = field(default_factory=set)
    appends: dict[Any, list[tuple[bytes, bytes]]] = field(default_factory=dict)


# The environments open in this process, by path: LMDB allows one handle per environment
# per process. A second one opened beside it can hang in its open (seen: four threads
# opening and closing read-only handles deadlocked), and closing it clears the reader slots
# of the first, whose snapshots then stop being protected from the writers. (Seen: the
# admin server of a several-process graph, which opens the data dir for each request and
# for the chart's samples, answered a trace with 500.)
_opened: dict[Path, Env] = {}
_opening = threading.Condition()
OPEN_WAIT_S = 60.0  # a writable open waits this long for read-only users to finish


class Env:
    """An open environment with its databases. ``readonly`` for status/trace from a CLI.

    Open with :meth:`open`: one handle per environment in a process, shared by its users
    and closed when the last one closes it."""

    @classmethod
    def open(cls, data_dir: str | os.PathLike[str], *, map_size_mb: int,
             max_readers: int = 126, readonly: bool = False) -> Env:
        """This process's handle on ``data_dir``'s environment, opened now or shared with
        its other users (a read-only one is shared too when a writable one is open; a
        writable one waits up to :data:`OPEN_WAIT_S` for a read-only one's users to close
        it, then opens it anew). Every call is matched by one :meth:`close`."""
        key = (Path(data_dir) / ENV_DIR).resolve()  # a symlinked path is the same one
        with _opening:
            if not _opening.wait_for(lambda: readonly or key not in _opened
                                     or not _opened[key].readonly, OPEN_WAIT_S):
                raise lmdb.Error(f"{key}: held read-only in this process for "
                                 f"{OPEN_WAIT_S:.0f} s; cannot open it for writing")
            env = _opened.get(key)
            if env is None:
                env = _opened[key] = cls(key.parent, map_size_mb=map_size_mb,
                                         max_readers=max_readers, readonly=readonly)
            env._users += 1
            return env

    def __init__(self, data_dir: str | os.PathLike[str], *, map_size_mb: int,
                 max_readers: int = 126, readonly: bool = False) -> None:
        """Opens a handle of its own: use :meth:`open`."""
        self.path = Path(data_dir) / ENV_DIR
        self.readonly = readonly
        self._users = 0
        if not readonly:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.env = lmdb.open(str(self.path), map_size=map_size_mb * MB, subdir=True,
                             max_dbs=len(DATABASES) + 1, max_readers=max_readers,
                             readonly=readonly, create=not readonly, sync=True,
                             metasync=True, writemap=False, lock=True)
        txn = None if readonly else self.env.begin(write=True)
        try:
            self.dbs = {name: self.env.open_db(name.encode(), txn=txn, create=not readonly)
                        for name in DATABASES}
        except BaseException:
            if txn is not None:
                txn.abort()
            self.env.close()
            raise
        if txn is not None:
            txn.commit()
            # Reader slots of a killed process would pin old pages and keep the map growing.
            self.env.reader_check()
        self._psize: int = self.env.stat()["psize"]
        self._buffered: _Round | None = None
        self._known_counters: tuple[int, dict[bytes, int]] | None = None
        self.objects, self.blobs, self.items, self.due = (
            self.dbs[n] for n in ("objects", "blobs", "items", "due"))
        self.audit, self.study, self.done, self.purged, self.meta = (
            self.dbs[n] for n in ("audit", "study", "done", "purged", "meta"))

    @staticmethod
    def exists(data_dir: str | os.PathLike[str]) -> bool:
        return (Path(data_dir) / ENV_DIR / "data.mdb").exists()

    def close(self) -> None:
        """This user is done; the last one closes the handle."""
        with _opening:
            self._users -= 1
            if self._users > 0:
                return
            if _opened.get(self.path) is self:
                del _opened[self.path]
            self.env.close()
            _opening.notify_all()

    def begin(self, write: bool = False, parent: lmdb.Transaction | None = None):
        return self.env.begin(write=write, parent=parent)

    def used_fraction_over(self, txn: lmdb.Transaction, limit: float) -> float | None:
        """:meth:`used_fraction` when it exceeds ``limit``, else None.

        Every live page lies at or below the file's last page, so while the file itself
        fills no more than ``limit`` of the map there is nothing to count: one LMDB call
        instead of one per database. That matters in the commit thread, where every LMDB
        call releases the GIL and must win it back from pynetdicom's threads.
        """
        info = self.env.info()
        if (info["last_pgno"] + 1) * self._psize / info["map_size"] <= limit:
            return None
        used = self.used_fraction(txn)
        return used if used > limit else None

    def used_fraction(self, txn: lmdb.Transaction) -> float:
        """Live pages (every database's tree) over the map size. Freed pages do not count:
        LMDB reuses them, which is how a purge makes room again."""
        psize = self._psize
        pages = 2  # the two meta pages
        for db in (None, *self.dbs.values()):
            st = txn.stat(db) if db is not None else self.env.stat()
            pages += st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
        return pages * psize / self.env.info()["map_size"]

    # -- the commit round's buffers ----------------------------------------------------------
    #
    # Every py-lmdb call releases the GIL and must win it back, and in a listening process
    # pynetdicom's threads hold it often: a round's cost grows with its LMDB call count. Two
    # kinds of writes are therefore kept in memory during a round (``begin_round``) and
    # reach LMDB in one ``putmulti`` call each just before the commit (``flush_round``):
    #
    # - counters (a lane's state counts, touched on every transition: ~4 calls each);
    #   after a commit (``round_committed``) their values are kept for the next round, which
    #   uses them only if no other transaction committed in between (LMDB numbers write
    #   transactions: the next must be ours + 1); the CLI writing from another process, or
    #   a round that failed, simply makes the next round read LMDB again;
    # - appends (audit events: keys never written twice, never read back within a round).

    def begin_round(self, txn: lmdb.Transaction) -> None:
        """Buffer counters and appends written through ``txn`` until :meth:`flush_round`;
        :meth:`drop_round` if ``txn`` does not commit. Only the commit thread's round
        transaction is buffered; any other transaction reads and writes LMDB directly."""
        known = self._known_counters
        values = dict(known[1]) if known is not None and txn.id() == known[0] + 1 else {}
        self._buffered = _Round(txn, values)

    def flush_round(self, txn: lmdb.Transaction) -> None:
        buffered = self._buffered
        if buffered is None or buffered.txn is not txn:
            return
        if buffered.dirty:
            txn.cursor(db=self.meta).putmulti(
                sorted((key, buffered.counters[key].to_bytes(8, "big", signed=True))
                       for key in buffered.dirty))
        for db, items in buffered.appends.items():
            txn.cursor(db=db).putmulti(sorted(items))

    def round_committed(self, txn_id: int) -> None:
        """The buffered transaction committed as ``txn_id``: its counter values are LMDB's."""
        buffered, self._buffered = self._buffered, None
        self._known_counters = (txn_id, buffered.counters) if buffered is not None else None

    def drop_round(self) -> None:
        self._buffered = None
        self._known_counters = None

    def append(self, txn: lmdb.Transaction, key: bytes, value: bytes, db: Any) -> None:
        """Write a key that is never written twice nor read back in the same round."""
        buffered = self._buffered
        if buffered is not None and buffered.txn is txn:
            buffered.appends.setdefault(db, []).append((key, value))
        else:
            txn.put(key, value, db=db)

    # -- counters (meta) --------------------------------------------------------------------

    def counter(self, txn: lmdb.Transaction, name: str) -> int:
        key = name.encode()
        buffered = self._buffered
        if buffered is not None and buffered.txn is txn:
            value = buffered.counters.get(key)
            if value is None:
                raw = txn.get(key, db=self.meta)
                value = int.from_bytes(raw, "big", signed=True) if raw else 0
                buffered.counters[key] = value
            return value
        raw = txn.get(key, db=self.meta)
        return int.from_bytes(raw, "big", signed=True) if raw else 0

    def add(self, txn: lmdb.Transaction, name: str, delta: int = 1) -> int:
        value = self.counter(txn, name) + delta
        buffered = self._buffered
        if buffered is not None and buffered.txn is txn:
            key = name.encode()
            buffered.counters[key] = value
            buffered.dirty.add(key)
        else:
            txn.put(name.encode(), value.to_bytes(8, "big", signed=True), db=self.meta)
        return value

    def next_seq(self, txn: lmdb.Transaction) -> int:
        """A number greater than any this process handed out before, and (being the wall
        clock in nanoseconds) practically unique across processes: it orders audit events
        and breaks ties in the due index without a shared counter to read and write."""
        with _seq_lock:
            global _last_seq
            _last_seq = max(_last_seq + 1, time.time_ns())
            return _last_seq


_seq_lock = threading.Lock()
_last_seq = 0
