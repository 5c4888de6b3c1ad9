"""Ingest: arrivals into one group commit, each receipt answered after the sync.

:class:`Ingest` seals (or spools) each arrival, commits the waiting ones in one sync
transaction through the :class:`~.commit.GroupCommitter`, answers every receipt, and tells
the lanes through ``on_committed`` (it knows nothing else of them). :class:`Space` is the
room check that refuses new arrivals with :class:`~nodes.arrival.StoreFull`.
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
from . import objects
from .commit import GroupCommitter, Op
from .config import StoreConfig
from .crypto import AtRestKey
from .db import MB, Env
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
    _full: bool = field(default=False, init=False)
    # What commits in callers' threads have to tell the Trio thread (_tell_trio).
    _told_lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _told_refused: list[BaseException] = field(default_factory=list, init=False)
    _told_queued: bool = field(default=False, init=False)
    _told_pending: bool = field(default=False, init=False)

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
        """Blocking, in the caller's thread (not Trio's): commit ``arrival`` in a round of its
        own or shared with what waits meanwhile (:meth:`.commit.GroupCommitter.
        commit_blocking`). Returns None once committed (or found a duplicate), else the
        error to answer with: :class:`StoreFull`, :class:`StoreFailed`, or
        ``trio.TooSlowError`` when no round took it within ``timeout_s``. The receipt is
        not used (it is Trio-side); the lanes, and whether the Store is full, are told in
        the Trio thread once the commit says so."""
        key = self.keyring.current
        item = self._prepare_all(key, [arrival])[0] if self._spools(arrival) else None
        if isinstance(item, Exception):
            if isinstance(item, StoreFull):  # the spool write found the disk full
                self._tell_trio([item], False)
            return item
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
