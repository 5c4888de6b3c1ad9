"""Housekeeping: purge finished objects, sweep orphan spool files, re-seal after a rotation.

:class:`Housekeeping` runs beside ingest and the lanes while the Store runs (:meth:`run`):
it purges objects finished more than ``retention_s`` ago (and audit trails past
``audit_retention_s``), sweeps the spool dir every ``SWEEP_INTERVAL_S``, and after a key
rotation re-seals objects under the current key (see :mod:`.reseal`). Every write goes
through the committer in short transactions, safe beside other processes. It runs in one
process of those sharing a data dir (``here``); an object finished in another process
rings that one's ``housekeeping`` socket (:mod:`.rundir`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from flow import get_logger

from . import audit, journal, objects, reseal
from .commit import GroupCommitter
from .config import StoreConfig
from .db import Env, ObjectRecord, uid_key
from .keyring import Keyring
from .rundir import HOUSEKEEPING, RunDir, woken
from .spool import remove_spools

log = get_logger("nodes.store")

# A spool file no object refers to is an orphan once it is this old (see sweep_spool).
ORPHAN_AGE_S = 60.0
SWEEP_INTERVAL_S = 600.0  # a sweep reads every object record: not more often than this


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")


def sweep_spool(env: Env, spool_dir: Path) -> int:
    """Delete spool files no object refers to: written for a commit that never happened
    (a crash between the spool's fsync and the commit). Files younger than
    ``ORPHAN_AGE_S`` are left alone: another process sharing the store may be about to
    commit them. Blocking; returns how many went."""
    cutoff = time.time() - ORPHAN_AGE_S
    candidates = [p for p in spool_dir.iterdir() if _mtime(p) < cutoff]
    if not candidates:
        return 0
    with env.begin() as txn:  # read after listing: a file committed meanwhile is kept
        referenced = objects.referenced_spools(env, txn)
        # ... and one an ingest journal holds for LMDB to take in (acknowledged already)
        referenced |= journal.pending_spools(env, txn, spool_dir.parent)
    orphans = [p for p in candidates if p.name not in referenced]
    for path in orphans:
        path.unlink(missing_ok=True)
    return len(orphans)


@dataclass(eq=False)
class Housekeeping:
    """Purge, sweep and re-seal for the Store ``name`` (its log lines name it).

    ``here``: they run in this process (:meth:`run`); ``wakeup``: with other processes on
    the data dir, the run dir to ring or listen in."""

    env: Env
    keyring: Keyring
    committer: GroupCommitter
    spool_dir: Path
    config: StoreConfig
    name: str
    wakeup: RunDir | None = None
    here: bool = True
    _purge_wake: trio.Event = field(default_factory=trio.Event, init=False)

    def finished(self) -> None:
        """An object is finished on every lane: with ``retention_s`` 0 it goes now (in the
        process where housekeeping runs)."""
        if self.config.retention_s != 0:
            return
        if self.here:
            self._purge_wake.set()
        elif self.wakeup is not None:
            self.wakeup.ring(HOUSEKEEPING)

    async def run(self) -> None:
        """Purge and sweep on their schedules, re-seal once after a rotation; until
        cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._purge_loop)
            nursery.start_soon(self._reseal_loop)

    # -- purge --------------------------------------------------------------------------------

    async def purge_expired(self) -> int:
        """Purge objects finished more than ``retention_s`` ago; returns how many went."""
        env, committer = self.env, self.committer

        def anything_due() -> bool:
            with env.begin() as txn:
                first = objects.first_done(env, txn)
            return first is not None and first + self.config.retention_s <= time.time()

        total = 0
        while await trio.to_thread.run_sync(anything_due):
            count, spools = await committer.one(partial(
                objects.purge_expired, env, now=time.time(),
                retention_s=self.config.retention_s))
            if spools:
                await trio.to_thread.run_sync(remove_spools, self.spool_dir, spools)
            total += count
        await self._expire_audit()
        return total

    async def _expire_audit(self) -> None:
        """Drop the trails of objects purged more than ``audit_retention_s`` ago."""
        env = self.env

        def anything_due() -> bool:
            with env.begin() as txn:
                first = audit.first_purged(env, txn)
            return first is not None and first + self.config.audit_retention_s <= time.time()

        while await trio.to_thread.run_sync(anything_due):
            await self.committer.one(partial(audit.expire, env, now=time.time(),
                                             retention_s=self.config.audit_retention_s))

    async def _purge_loop(self) -> None:
        swept = time.monotonic()
        while True:
            purged = await self.purge_expired()
            if purged:
                log.info("store.purged", node=self.name, purged=purged)
            if time.monotonic() - swept > SWEEP_INTERVAL_S:
                swept = time.monotonic()
                orphans = await trio.to_thread.run_sync(sweep_spool, self.env, self.spool_dir)
                if orphans:
                    log.info("store.orphans_removed", node=self.name, orphans=orphans)
            with trio.move_on_after(self.config.purge_interval_s):
                await woken(self.wakeup, HOUSEKEEPING, self._purge_wake)
            self._purge_wake = trio.Event()

    # -- re-sealing after a key rotation ------------------------------------------------------

    async def reseal(self) -> tuple[int, int]:
        """One pass: seal every object that an older key sealed again under the current key.

        Returns ``(resealed, skipped)``; skipped objects (a spooled object a lane holds in
        flight) are left for a later pass. Safe beside ingest, lanes and other processes:
        each batch commits in one short transaction that re-reads what it changes, and no
        lane item changes state (see :mod:`.reseal`).
        """
        env, keyring = self.env, self.keyring
        resealed = skipped = 0
        after = b""
        while batch := await trio.to_thread.run_sync(reseal.stale, env, keyring, after):
            after = uid_key(batch[-1][0])
            respooled = await trio.to_thread.run_sync(self._respool_all, batch)
            done = await self.committer.one(partial(reseal.commit, env, keyring, batch,
                                                    respooled))
            await trio.to_thread.run_sync(remove_spools, self.spool_dir,
                                          done.obsolete + done.unused)
            resealed += done.resealed
            skipped += done.skipped
        return resealed, skipped

    def _respool_all(self, batch: list[tuple[str, ObjectRecord]]) -> dict[str, str]:
        out = {}
        for uid, obj in batch:
            if not obj.spool:
                continue
            try:
                out[uid] = reseal.respool(self.keyring, self.spool_dir, uid, obj)
            except Exception as exc:  # unreadable or gone: its lanes report it when they reach it
                log.warning("store.reseal_failed", node=self.name, sop_instance_uid=uid,
                            error_class=type(exc).__name__)
        return out

    async def _reseal_loop(self) -> None:
        keyring = self.keyring
        if not keyring.retired and keyring.original == keyring.current.key_id:
            return  # never rotated: nothing can be sealed with another key
        total = 0
        while True:
            resealed, skipped = await self.reseal()
            total += resealed
            if not skipped:
                break
            await trio.sleep(max(self.config.poll_s, 1.0))
        log.info("store.resealed", node=self.name, resealed=total,
                 key_id=keyring.current.key_id)
