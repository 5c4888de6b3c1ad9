"""The ingest journal: an arrival is acknowledged once its record is durable here, and LMDB
takes it in behind the acknowledgement.

Why: an LMDB commit with sync writes every page the transaction touched (an object touches
some fifteen: its blob, its record, a queue entry per lane, the indexes, the audit trail),
flushes them (``fdatasync``) and then writes and flushes the meta page: two device flushes
and a writer lock shared with the lanes. Measured on the flagship graph, that was ~2.5 ms of
the ~6 ms a C-STORE took, and with four modalities the ingest's rounds were its bottleneck
(docs/decisions.md, "session 20"). A record appended here is one write of its bytes to
blocks already allocated and written, opened ``O_DSYNC``: one flush, no metadata, no lock
shared with another process.

Guarantees
----------
- :meth:`Journal.append` returns only once the record is on stable storage (``O_DSYNC``
  write into a region the journal zero-filled and flushed beforehand, so the write changes
  no file metadata). The caller acknowledges after it, never before.
- Records are numbered (``seq``) without gaps, across the journal's whole life: the file
  header holds the first number of the records after it, and a reset (:meth:`Journal.reset`)
  starts the next at the number after the last one. LMDB records, in the same transaction
  that takes a batch of records in, the last number it took (:func:`mark_applied`); replay
  takes in only records above it.
- A record is read back only if its header, number and CRC-32 check out; reading stops at
  the first that does not: a torn last write (a crash mid-append, which was never
  acknowledged), the zeros after the last record, or a record left from before a reset
  (its number is below the header's). Appends are serialised, so only the last record can
  be torn.
- Each journal file is held with an exclusive ``flock`` by the process that appends to it:
  no second process appends to it or resets it. A file whose lock is free belongs to no
  running process; whoever opens the Store for ingest replays it (a crashed process, or a
  replica a new configuration no longer runs).
- The file is bounded (``[store] journal_mb``): it grows in :data:`CHUNK` steps while
  records are waiting for LMDB, and starts over from its header (:meth:`Journal.reset`)
  once LMDB holds every record in it; an append that finds no room waits for that.
- Nothing in a record is plaintext that LMDB would hold sealed: the object's bytes are the
  sealed blob the Store keeps (AES-256-GCM), or the name of its encrypted spool file; the
  envelope is routing-safe (UIDs, AE titles), as in LMDB's ``objects`` database.

File format (version 1)
-----------------------
Little-endian. Bytes 0..4095 are the header block::

    0   8  magic b"DFJRNL01"
    8   8  base: the number of the first record after the header
   16   4  CRC-32 of bytes 0..15

Records follow from :data:`DATA_START`, back to back::

    0   4  magic b"DFR1"
    4   8  seq
   12   4  body length n
   16   4  CRC-32 of seq, n and the body
   20   n  body: msgpack of :class:`Record`
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import lmdb
import msgspec

from ..arrival import Envelope
from .db import Env

JOURNAL_DIR = "journal"
SUFFIX = ".journal"
DATA_START = 4096
CHUNK = 1 << 20                 # the file grows by this much, zero-filled and flushed
RESET_AFTER = 512 << 10         # with every record in LMDB, start over once past this
MAGIC = b"DFJRNL01"
_HEADER = struct.Struct("<8sQI")
_RECORD_MAGIC = b"DFR1"
_RECORD = struct.Struct("<4sQII")
_CRC_FIELDS = struct.Struct("<QI")
_MARK_PREFIX = b"journal\0"


class Record(msgspec.Struct, array_like=True):
    """One acknowledged arrival, as :func:`nodes.store.objects.ingest` takes it in."""

    envelope: Envelope
    content_hash: str
    size: int
    sealed: bytes | None      # a small object's sealed bytes (as kept in ``blobs``)
    spool: str                # a large object's spool file (written and fsynced before)
    key: str                  # the fingerprint of the key that sealed it
    received: float           # when it was acknowledged (the audit trail's arrival time)


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Record).decode


class JournalBusy(Exception):
    """Another running process holds this journal (its ``flock``)."""


class RecordTooLarge(Exception):
    """A record that would not fit in the journal even when empty (an object below the
    spool threshold but above ``journal_mb``): commit it the way without the journal."""


class JournalFull(Exception):
    """No room for a record within the wait allowed: LMDB has not taken in the records
    before it yet. Nothing was written; the arrival is not acknowledged."""


def journal_dir(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / JOURNAL_DIR


def journal_name(replica: int) -> str:
    """The journal file of ingest replica ``replica`` (``[listen] workers``)."""
    return f"ingest-{replica}{SUFFIX}"


def mark_key(name: str) -> bytes:
    return _MARK_PREFIX + name.encode()


def applied(env: Env, txn: lmdb.Transaction, name: str) -> int:
    """The number of the last record of journal ``name`` that LMDB holds (0: none)."""
    raw = txn.get(mark_key(name), db=env.meta)
    return int.from_bytes(raw, "big") if raw else 0


def mark_applied(env: Env, txn: lmdb.Transaction, name: str, seq: int) -> None:
    """In the transaction that takes records up to ``seq`` in: LMDB holds them."""
    txn.put(mark_key(name), seq.to_bytes(8, "big"), db=env.meta)


def _header(base: int) -> bytes:
    head = MAGIC + base.to_bytes(8, "little")
    return _HEADER.pack(MAGIC, base, zlib.crc32(head)).ljust(DATA_START, b"\0")


def _encode_record(seq: int, body: bytes) -> bytes:
    crc = zlib.crc32(body, zlib.crc32(_CRC_FIELDS.pack(seq, len(body))))
    return _RECORD.pack(_RECORD_MAGIC, seq, len(body), crc) + body


def read_base(data: bytes | memoryview) -> int | None:
    """The header's first record number, or None: no valid header (a new or torn file)."""
    if len(data) < _HEADER.size:
        return None
    magic, base, crc = _HEADER.unpack_from(data, 0)
    if magic != MAGIC or crc != zlib.crc32(bytes(data[:16])):
        return None
    return base


def records(data: bytes | memoryview) -> Iterator[tuple[int, int, bytes]]:
    """``(seq, end offset, body)`` of every valid record in a journal file's bytes, in
    order, from the header's base on; stops at the first that is not the next valid one."""
    base = read_base(data)
    if base is None:
        return
    view = memoryview(data)
    offset, expected = DATA_START, base
    while offset + _RECORD.size <= len(view):
        magic, seq, length, crc = _RECORD.unpack_from(view, offset)
        start, end = offset + _RECORD.size, offset + _RECORD.size + length
        if magic != _RECORD_MAGIC or seq != expected or end > len(view):
            return
        body = bytes(view[start:end])
        if zlib.crc32(body, zlib.crc32(_CRC_FIELDS.pack(seq, length))) != crc:
            return
        yield seq, end, body
        offset, expected = end, expected + 1


def decode(body: bytes) -> Record:
    return _decode(body)


def encode(record: Record) -> bytes:
    return _encode(record)


def pending(path: Path, after: int) -> list[tuple[int, Record]]:
    """The records of the journal file ``path`` numbered above ``after``; reads the file
    whether or not a process holds it (a reader, e.g. the orphan spool sweep)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return [(seq, decode(body)) for seq, _, body in records(data) if seq > after]


def pending_spools(env: Env, txn: lmdb.Transaction, data_dir: Path) -> set[str]:
    """The spool files that records of the data dir's journals refer to and LMDB has not
    taken in yet (as of ``txn``): not orphans, however old."""
    directory = journal_dir(data_dir)
    if not directory.is_dir():
        return set()
    return {record.spool for path in directory.glob("*" + SUFFIX)
            for _, record in pending(path, applied(env, txn, path.name)) if record.spool}


class Journal:
    """One ingest process's journal file, held (``flock``) for as long as it is open.

    :meth:`append` from any thread (serialised inside); :meth:`applied_up_to` tells it what
    LMDB holds, which lets it start over (:meth:`reset`) and lets waiting appends go on.
    """

    def __init__(self, path: Path, capacity: int, *, wait_s: float = 0.0) -> None:
        """Open (creating) and lock ``path``, waiting up to ``wait_s`` for another process
        to let go of it; raises :class:`JournalBusy` if it does not. Then :meth:`resume`
        (what LMDB lacks) and :meth:`reset`."""
        self.path = path
        self.capacity = max(capacity, DATA_START + CHUNK)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise JournalBusy(str(path)) from None
                time.sleep(0.05)
        self._fd = fd
        # Appends go through a second descriptor opened O_DSYNC: each write returns once its
        # bytes are on stable storage, in the one system call.
        self._sync_fd = os.open(path, os.O_WRONLY | os.O_DSYNC | os.O_CLOEXEC)
        self._lock = threading.Condition()
        self._size = os.fstat(fd).st_size
        self._offset = DATA_START
        self._next = 0              # 0: not reset yet since open (no appends before that)
        self._applied = 0
        self.appended = 0           # records appended since open (figures)
        self.waits = 0              # appends that waited for LMDB to make room

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def last(self) -> int:
        """The number of the last record appended (0: none yet)."""
        return max(self._next - 1, 0)

    @property
    def backlog(self) -> int:
        """Records appended that LMDB does not hold yet."""
        with self._lock:
            return max(self._next - 1 - self._applied, 0)

    def read(self) -> bytes:
        return os.pread(self._fd, self._size, 0) if self._size else b""

    def reset(self, applied: int) -> None:
        """Start over: LMDB holds every record up to ``applied`` (the last in the file)."""
        with self._lock:
            self._reset(applied)

    def _reset(self, applied: int) -> None:
        if self._size < DATA_START:  # a new file: its header block, flushed with its size
            self._grow(DATA_START)
        os.pwrite(self._sync_fd, _header(applied + 1), 0)
        self._offset, self._next, self._applied = DATA_START, applied + 1, applied

    def _grow(self, needed: int) -> None:
        """Zero-fill up to ``needed`` (whole chunks) and flush, data and size: the appends
        after it overwrite written blocks and change no metadata."""
        target = DATA_START + -(-(needed - DATA_START) // CHUNK) * CHUNK
        target = max(min(self.capacity, target), needed)
        if self._size < target:
            zeros = bytes(min(CHUNK, target - self._size))
            offset = self._size
            while offset < target:
                offset += os.pwrite(self._fd, zeros[:target - offset], offset)
            os.fsync(self._fd)
            self._size = target

    def append(self, record: Record, timeout_s: float,
               then: Callable[[int, Record], None] | None = None) -> int:
        """Write ``record`` durably; returns its number. ``then(seq, record)`` runs after
        the write, still under the journal's lock (so in the records' order). Raises
        :class:`RecordTooLarge` for a record no journal of this capacity holds,
        :class:`JournalFull` when no room came within ``timeout_s``, ``OSError`` when the
        write failed (ENOSPC while growing: the disk is full); then nothing was written."""
        body = _encode(record)
        deadline = time.monotonic() + timeout_s
        size = _RECORD.size + len(body)
        if DATA_START + size > self.capacity:
            raise RecordTooLarge(f"a record of {size} bytes exceeds the journal's "
                                 f"{self.capacity} bytes")
        with self._lock:
            if self._next == 0:
                raise RuntimeError("the journal was not reset after opening")
            waited = False
            while True:
                everything_in = self._applied == self._next - 1
                if everything_in and self._offset > RESET_AFTER:
                    self._reset(self._applied)
                if self._offset + size <= self.capacity:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise JournalFull("the journal is full: LMDB has not taken in the "
                                      "records before this one yet")
                if not waited:
                    self.waits += 1
                    waited = True
                self._lock.wait(left)
            if self._offset + size > self._size:
                self._grow(self._offset + size)
            seq = self._next
            data = _encode_record(seq, body)
            written = os.pwrite(self._sync_fd, data, self._offset)
            if written != len(data):  # a short write: never acknowledged
                raise OSError(errno.EIO, "short write to the ingest journal")
            self._offset += len(data)
            self._next = seq + 1
            self.appended += 1
            if then is not None:
                then(seq, record)
            return seq

    def applied_up_to(self, seq: int) -> None:
        """LMDB holds every record up to ``seq``: appends waiting for room may go on."""
        with self._lock:
            if seq > self._applied:
                self._applied = seq
                self._lock.notify_all()

    def resume(self, applied: int) -> tuple[list[tuple[int, Record]], int]:
        """After opening: the records LMDB does not hold (numbered above ``applied``), in
        order, and the number of the last valid record in the file (0: none). Take them in
        (with :func:`mark_applied`), then :meth:`reset` to the greater of the two numbers
        before the first append."""
        found: list[tuple[int, Record]] = []
        last = 0
        for seq, _, body in records(self.read()):
            last = seq
            if seq > applied:
                found.append((seq, decode(body)))
        return found, last

    def close(self) -> None:
        for fd in (self._sync_fd, self._fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self._sync_fd = self._fd = -1
