"""Ingest: arrivals into one group commit, each receipt answered after the sync.

:class:`Ingest` seals (or spools) each arrival, commits the waiting ones in one sync
transaction through the :class:`~.commit.GroupCommitter`, answers every receipt, and tells
the lanes through ``on_committed`` (it knows nothing else of them). :class:`Space` is the
room check that refuses new arrivals with :class:`~nodes.arrival.StoreFull`.

A listener's thread (:meth:`Ingest.commit_now`) goes through the ingest journal instead
when the Store has one (:mod:`.journal`): the arrival is acknowledged once its record is
durable there, and the :class:`Applier` takes the records into LMDB behind it, in group
commits of its own; a record LMDB does not hold yet is taken in at the next start.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import lmdb
import trio

from flow import get_logger

from ..arrival import Arrival, StoreFailed, StoreFull
from . import journal as journal_file
from . import objects
from .commit import FULL_RETRY_MAX_S, FULL_RETRY_S, GroupCommitter, Op
from .config import StoreConfig
from .crypto import AtRestKey
from .db import MB, Env
from .journal import Journal, JournalBusy, JournalFull, Record, RecordTooLarge
from .keyring import Keyring
from .objects import blob_aad, spool_aad
from .spool import remove_spools, write_spool

log = get_logger("nodes.store")

# The free-space check is skipped for DISK_RECHECK_S after one that found more than
# DISK_RECHECK_HEADROOM_MB above min_free_disk_mb (a disk that fills faster still refuses:
# ENOSPC while writing is StoreFull too).
DISK_RECHECK_S = 0.5
DISK_RECHECK_HEADROOM_MB = 1024


class Space:
    """Whether new arrivals fit: the map below ``high_water``, the disk above
    ``min_free_disk_mb``. Its :meth:`refusal` is the committer's."""

    def __init__(self, env: Env, data_dir: Path, config: StoreConfig) -> None:
        self.env = env
        self.data_dir = data_dir
        self.config = config
        self._disk_ok_until = 0.0

    def refusal(self, txn: lmdb.Transaction) -> str | None:
        """Why new arrivals must wait (routing-safe), or None. Runs in the commit thread."""
        used = self.env.used_fraction_over(txn, self.config.high_water)
        if used is not None:
            return (f"map {used:.0%} used, above the high-water mark "
                    f"{self.config.high_water:.0%}")
        return self.disk_refusal()

    def refusal_now(self) -> str | None:
        """:meth:`refusal` in a read transaction of its own (before a journal append)."""
        with self.env.begin() as txn:
            return self.refusal(txn)

    def disk_refusal(self) -> str | None:
        """Why the disk takes no new arrivals (routing-safe), or None. Blocking."""
        now = time.monotonic()
        if now < self._disk_ok_until:
            return None
        free_mb = shutil.disk_usage(self.data_dir).free // MB
        if free_mb < self.config.min_free_disk_mb:
            return f"disk free {free_mb} MB below {self.config.min_free_disk_mb} MB"
        # With ample room left, the next commit rounds need not ask the disk again for a
        # moment (a round writes at most a few MB); near the limit, every round asks.
        if free_mb - self.config.min_free_disk_mb > DISK_RECHECK_HEADROOM_MB:
            self._disk_ok_until = now + DISK_RECHECK_S
        return None


@dataclass(eq=False)
class Ingest:
    """Commits arrivals for a Store whose objects are queued on ``lanes``.

    ``on_committed(queued)`` is called after every commit round (``queued``: something new
    is due on every lane now). Trio-side, like the committer.
    """

    env: Env
    keyring: Keyring
    committer: GroupCommitter
    space: Space
    spool_dir: Path
    config: StoreConfig
    lanes: list[str]
    name: str
    on_committed: Callable[[bool], None]
    journal: Journal | None = None  # acknowledge direct arrivals once journaled
    applier: "Applier | None" = field(default=None, init=False)
    _full: bool = field(default=False, init=False)
    # What commits in callers' threads have to tell the Trio thread (_tell_trio).
    _told_lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _told_refused: list[BaseException] = field(default_factory=list, init=False)
    _told_queued: bool = field(default=False, init=False)
    _told_pending: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if self.journal is not None:
            self.applier = Applier(self.journal, self.committer, self.env, self.lanes,
                                   self.spool_dir, self._tell_trio)

    async def commit(self, arrivals: list[Arrival]) -> None:
        """Commit ``arrivals`` in one transaction and answer each receipt.

        On return every receipt is answered. If this raises (or is cancelled), arrivals not
        answered yet are failed with :class:`StoreFailed`: nothing is acknowledged unless
        committed.
        """
        try:
            await self._commit(arrivals)
        finally:
            for arrival in arrivals:
                if not arrival.receipt.done:
                    arrival.abandon("StoreInterrupted")

    async def _commit(self, arrivals: list[Arrival]) -> None:
        key = self.keyring.current
        large = [a for a in arrivals if self._spools(a)]
        spooled: dict[int, Any] = {}
        if large:  # spool files are written and fsynced before the commit that refers to them
            prepared = await trio.to_thread.run_sync(self._prepare_all, key, large)
            spooled = {id(a): item for a, item in zip(large, prepared)}
        now = time.time()
        ops: list[tuple[Arrival, Op]] = []
        refused: list[BaseException] = []
        for arrival in arrivals:
            item = spooled.get(id(arrival))
            if isinstance(item, Exception):
                if isinstance(item, StoreFull):  # the spool write found the disk full
                    refused.append(item)
                arrival.receipt.failed(item)
                continue
            ops.append((arrival, Op(partial(self._ingest, key, arrival, item, now),
                                    ingest=True)))
        await self.committer.run([op for _, op in ops])
        obsolete: list[str] = []
        queued = False  # something new is due on every lane now
        for arrival, op in ops:
            error, stored = self._outcome(arrival, op, spooled.get(id(arrival)), obsolete,
                                          refused)
            if error is not None:
                arrival.receipt.failed(error)
                continue
            arrival.receipt.committed(duplicate=stored is objects.Stored.DUPLICATE)
            queued = queued or stored is not objects.Stored.DUPLICATE
        if obsolete:
            await trio.to_thread.run_sync(remove_spools, self.spool_dir, obsolete)
        self._rounded(refused, queued)

    def commit_now(self, arrival: Arrival, timeout_s: float) -> Exception | None:
        """Blocking, in the caller's thread (not Trio's): with a journal, append
        ``arrival``'s record to it (the :class:`Applier` commits it into LMDB behind);
        without one (or for a record too large for it), commit it in a round of its own or
        shared with what waits meanwhile (:meth:`.commit.GroupCommitter.commit_blocking`).
        Returns None once durable (or found a duplicate), else the error to answer with:
        :class:`StoreFull`, :class:`StoreFailed`, or ``trio.TooSlowError`` when no round
        (or no room in the journal) came within ``timeout_s``. The receipt is not used (it
        is Trio-side); the lanes, and whether the Store is full, are told in the Trio thread
        once LMDB holds the arrival."""
        key = self.keyring.current
        if self._spools(arrival):
            item = self._prepare_all(key, [arrival])[0]
        elif self.journal is not None:  # sealed here: the journal takes it as it is kept
            item = self._prepare(key, arrival)
        else:
            item = None  # sealed in the commit round (one thread hop, not two)
        if isinstance(item, Exception):
            if isinstance(item, StoreFull):  # the spool write found the disk full
                self._tell_trio([item], False)
            return item
        if self.journal is not None and item is not None:
            answer = self._journal(item, timeout_s)
            if answer is not _TOO_LARGE:
                return answer
        op = Op(partial(self._ingest, key, arrival, item, time.time()), ingest=True)
        if not self.committer.commit_blocking([op], timeout_s):
            if op.withdrawn and item is not None and item.spool:
                remove_spools(self.spool_dir, [item.spool])  # never referred to
            return trio.TooSlowError()
        refused: list[BaseException] = []
        obsolete: list[str] = []
        error, stored = self._outcome(arrival, op, item, obsolete, refused)
        self._tell_trio(refused, error is None and stored is not objects.Stored.DUPLICATE)
        if obsolete:
            remove_spools(self.spool_dir, obsolete)
        return error

    def _journal(self, item: objects.Prepared, timeout_s: float) -> Any:
        """:meth:`commit_now` through the journal: None once the record is durable (the
        :class:`Applier` takes it into LMDB), else the error to answer with, or
        ``_TOO_LARGE``: a record the journal cannot hold, to commit the other way."""
        assert self.journal is not None and self.applier is not None
        # While LMDB cannot take acknowledged records in (map or disk full), new arrivals
        # are refused, as they would be without the journal: it does not fill up meanwhile.
        refusal = self.applier.full or self.space.refusal_now()
        if refusal is not None:
            error: Exception = StoreFull(refusal)
            self._tell_trio([error], False)
        else:
            record = Record(item.envelope, item.content_hash, item.size, item.sealed,
                            item.spool, item.key, time.time())
            try:
                self.journal.append(record, timeout_s, then=self.applier.add)
            except RecordTooLarge:
                return _TOO_LARGE
            except JournalFull:
                error = trio.TooSlowError()
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    error = StoreFull("disk full")
                    self._tell_trio([error], False)
                else:
                    log.error("store.journal_failed", node=self.name,
                              sop_instance_uid=item.envelope.sop_instance_uid,
                              error_class=type(exc).__name__)
                    error = StoreFailed(f"journal write failed: {type(exc).__name__}")
            else:
                return None
        if item.spool:  # never referred to
            remove_spools(self.spool_dir, [item.spool])
        return error

    def _tell_trio(self, refused: list[BaseException], queued: bool) -> None:
        """From a caller's thread: :meth:`_rounded` in the Trio thread, once for every
        commit that ended before it runs (one wake-up of the Trio thread, not one each)."""
        with self._told_lock:
            # The latest commit says whether the Store is full now; refusals in a row count.
            if refused:
                self._told_refused.extend(refused)
            else:
                self._told_refused = []
            self._told_queued = self._told_queued or queued
            if self._told_pending:
                return
            self._told_pending = True
        self.committer.call_soon(self._told)

    def _told(self) -> None:
        with self._told_lock:
            refused, queued = self._told_refused, self._told_queued
            self._told_refused, self._told_queued, self._told_pending = [], False, False
        self._rounded(refused, queued)

    def _outcome(self, arrival: Arrival, op: Op, item: objects.Prepared | None,
                 obsolete: list[str], refused: list[BaseException]
                 ) -> tuple[Exception | None, objects.Stored | None]:
        """What ``arrival``'s committed (or failed) ``op`` means: (the error to answer with,
        None once committed; how it was stored). Spool files no longer needed are added to
        ``obsolete``, refusals for want of room to ``refused``."""
        if op.error is not None:
            if item is not None and item.spool:
                obsolete.append(item.spool)
            error = op.error
            if isinstance(error, StoreFull):
                refused.append(error)
            if isinstance(error, (StoreFull, StoreFailed)):
                return error, None
            log.error("store.ingest_failed", sop_instance_uid=arrival.envelope.sop_instance_uid,
                      error_class=type(error).__name__)
            return StoreFailed(f"commit failed: {type(error).__name__}"), None
        result: objects.IngestResult = op.result
        if result.obsolete_spool:
            obsolete.append(result.obsolete_spool)
        log.debug("store.committed", sop_instance_uid=arrival.envelope.sop_instance_uid,
                  stored=result.stored.value)
        return None, result.stored

    def _rounded(self, refused: list[BaseException], queued: bool) -> None:
        """Trio thread, after a commit: say whether the Store is full, wake the lanes."""
        self._note_full(refused)
        self.on_committed(queued)

    def _spools(self, arrival: Arrival) -> bool:
        try:
            return arrival.payload.size > self.config.spool_threshold_kb * 1024
        except Exception:
            return True  # let _prepare report the unreadable payload

    def _ingest(self, key: AtRestKey, arrival: Arrival, item: objects.Prepared | None,
                now: float, txn: lmdb.Transaction) -> objects.IngestResult:
        """The ingest operation, in the commit thread. Small objects are hashed and sealed
        here rather than in a thread of their own: one thread hop per round, not two."""
        if item is None:
            prepared = self._prepare(key, arrival)
            if isinstance(prepared, Exception):
                raise prepared
            item = prepared
        return objects.ingest(self.env, txn, item, self.lanes, now)

    def _note_full(self, refused: list[BaseException]) -> None:
        if refused and not self._full:
            log.warning("store.full", node=self.name, refused=len(refused),
                        reason=str(refused[0]))
        elif not refused and self._full:
            log.info("store.space_returned", node=self.name)
        self._full = bool(refused)

    def _prepare_all(self, key: AtRestKey, arrivals: list[Arrival]) -> list[Any]:
        low = self.space.disk_refusal()
        return [StoreFull(low) if low else self._prepare(key, a) for a in arrivals]

    def _prepare(self, key: AtRestKey, arrival: Arrival) -> objects.Prepared | Exception:
        uid = arrival.envelope.sop_instance_uid
        try:
            size = arrival.payload.size
            if size > self.config.spool_threshold_kb * 1024:
                name = f"{os.urandom(12).hex()}.spool"
                with arrival.payload.open() as source:
                    info = write_spool(key, source, self.spool_dir / name, spool_aad(uid, name))
                return objects.Prepared(arrival.envelope, info.sha256, info.size, spool=name,
                                        key=key.key_id)
            with arrival.payload.open() as source:
                data = source.read()
            digest = hashlib.sha256(data).hexdigest()
            return objects.Prepared(arrival.envelope, digest, len(data),
                                    sealed=key.seal(data, blob_aad(uid, digest)),
                                    key=key.key_id)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return StoreFull("disk full")
            error = exc
        except Exception as exc:  # a broken payload fails its arrival, not the Store
            error = exc
        log.error("store.read_failed", sop_instance_uid=uid, error_class=type(error).__name__)
        return StoreFailed(f"cannot read or spool the object: {type(error).__name__}")


_TOO_LARGE = object()  # Ingest._journal: the record does not fit in the journal


def take_in(env: Env, name: str, lane_names: list[str], batch: list[tuple[int, Record]],
            txn: lmdb.Transaction) -> list[objects.IngestResult]:
    """Take journal ``name``'s records ``batch`` (in order) into LMDB, as their arrivals'
    commits would have, and record the last one as taken in: one operation, so that a
    failure leaves none of them recorded."""
    results = [objects.ingest(env, txn, objects.Prepared(record.envelope, record.content_hash,
                                                         record.size, sealed=record.sealed,
                                                         spool=record.spool, key=record.key),
                              lane_names, record.received)
               for _, record in batch]
    journal_file.mark_applied(env, txn, name, batch[-1][0])
    return results


def replay_journals(env: Env, data_dir: Path, lane_names: list[str], own: str | None,
                    capacity: int, *, wait_s: float = 10.0
                    ) -> tuple[Journal | None, int, list[str]]:
    """At open, in a process that ingests, before it listens: take into LMDB the records
    it lacks of this process's own journal (``own``; None: no journal) and of every other
    journal no running process holds (a replica that crashed, or that the configuration no
    longer runs), then start each of them over. Returns the open own journal (None without
    one), how many records were taken in, and the spool files they made obsolete.

    Raises :class:`JournalBusy` when another process holds ``own`` for longer than
    ``wait_s`` (one that is starting may be replaying it); a failure to take records in
    leaves them in their journal. Blocking."""
    directory = journal_file.journal_dir(data_dir)
    names = sorted(p.name for p in directory.glob("*" + journal_file.SUFFIX)) \
        if directory.is_dir() else []
    if own is not None and own not in names:
        names.append(own)
    mine: Journal | None = None
    replayed, obsolete = 0, []
    try:
        for name in names:
            try:
                journal = Journal(directory / name, capacity, wait_s=wait_s if name == own else 0)
            except JournalBusy:
                if name == own:
                    raise
                continue  # a running process's
            try:
                with env.begin() as txn:
                    done = journal_file.applied(env, txn, name)
                found, last = journal.resume(done)
                if found:
                    with env.begin(write=True) as txn:
                        results = take_in(env, name, lane_names, found, txn)
                    replayed += len(found)
                    obsolete += [r.obsolete_spool for r in results if r.obsolete_spool]
                try:
                    journal.reset(max(done, last))
                except OSError as exc:
                    if name != own or exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    # A full disk: this run commits in LMDB before it answers (what the
                    # journal held is in LMDB now; its file is read again at the next open).
                    log.warning("store.journal_unavailable", journal=name, reason="disk full")
                    journal.close()
                    continue
            except BaseException:
                journal.close()
                raise
            if name == own:
                mine = journal
            else:
                journal.close()
    except BaseException:
        if mine is not None:
            mine.close()
        raise
    return mine, replayed, obsolete


class Applier:
    """Takes journaled arrivals into LMDB behind their acknowledgement: :meth:`run` in a
    thread of its own (``trio.to_thread.run_sync``) commits whatever was appended meanwhile
    in one operation of the group committer (rounds it leads itself, shared with what else
    waits), then tells the journal (room for more) and the Trio side (``tell``: wake the
    lanes, the Store is not full). A round that finds the Store full is tried again (the
    arrivals are acknowledged: they are never refused now) and, until one commits,
    :attr:`full` says why, for new arrivals to be refused; any other failure ends
    :meth:`run` with it, and the records stay in the journal for the next start.
    """

    def __init__(self, journal: Journal, committer: GroupCommitter, env: Env,
                 lane_names: list[str], spool_dir: Path,
                 tell: Callable[[list[BaseException], bool], None]) -> None:
        self.journal = journal
        self.committer = committer
        self.env = env
        self.lane_names = lane_names
        self.spool_dir = spool_dir
        self.tell = tell
        self._cond = threading.Condition()
        self._pending: list[tuple[int, Record]] = []
        self._stopping = False
        self.batches = 0
        self.full: str | None = None  # why LMDB cannot take records in now (map/disk full)

    def add(self, seq: int, record: Record) -> None:
        """Called by :meth:`.journal.Journal.append` under its lock, right after the write:
        records arrive here in journal order, so every batch is a run of numbers and the
        last one recorded as taken in covers all before it."""
        with self._cond:
            self._pending.append((seq, record))
            self._cond.notify()

    def stop(self) -> None:
        """:meth:`run` returns once what was appended before is in LMDB (or the Store is
        full: then at the next start)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending:
                    return
                batch, self._pending = self._pending, []
            if not self._apply(batch):
                return

    def _apply(self, batch: list[tuple[int, Record]]) -> bool:
        """Commit ``batch``; False: stopping while the Store is full (left to the next
        start)."""
        delay = FULL_RETRY_S
        while True:
            op = Op(partial(take_in, self.env, self.journal.name, self.lane_names, batch))
            if not self.committer.commit_blocking([op], timeout_s=60.0):
                continue  # withdrawn after waiting behind long rounds: offer it again
            if op.error is None:
                break
            full = self.committer.full_reason(op.error)
            if full is None:
                raise op.error
            if self.full is None:
                self.full = full
                self.tell([StoreFull(full)], False)  # logged once: store.full
            with self._cond:
                if self._stopping or self._cond.wait_for(lambda: self._stopping, delay):
                    return False
            delay = min(delay * 2, FULL_RETRY_MAX_S)
        results: list[objects.IngestResult] = op.result
        self.full = None
        self.batches += 1
        self.journal.applied_up_to(batch[-1][0])
        obsolete = [r.obsolete_spool for r in results if r.obsolete_spool]
        if obsolete:
            remove_spools(self.spool_dir, obsolete)
        self.tell([], any(r.stored is not objects.Stored.DUPLICATE for r in results))
        return True
