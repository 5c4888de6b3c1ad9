"""The Store node and its lane pumps: commit-before-ack, durable lanes, retries, purge.

``Store`` takes :class:`~nodes.arrival.Arrival` items on ``in`` and answers each receipt only
after the LMDB transaction holding the object committed with sync. Every ``store.branch(lane)``
is a :class:`LanePump`, the source node of that lane, that feeds :class:`~nodes.delivery.Delivery`
items from the lane's durable queue as its channel has room; lanes settle deliveries and the
Store commits each outcome (see :mod:`.lanes` for the state machine).
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any

import lmdb
import trio

from flow import Context, Metric, Node, get_logger, register_safe_fields

from ..arrival import Arrival, Envelope, StoreFailed, StoreFull
from ..delivery import Delivery
from ..outcome import Outcome, Permanent, Transient
from ..payload import BytesPayload, Payload
from . import admin, audit, lanes, layout, objects, reseal
from .commit import GroupCommitter, Op
from .config import StoreConfig
from .crypto import AtRestKey
from .db import MB, SPOOL_DIR, Env, ObjectRecord, uid_key
from .keyring import Keyring, KeyNotInKeyring, KeySource
from .objects import blob_aad, spool_aad
from .retry import retry_delay
from .spool import SpoolPayload, remove_spool, write_spool

log = get_logger("nodes.store")
register_safe_fields("refused", "requeued", "purged", "orphans", "key_id", "stored",
                     "data_dir_format", "resealed", "skipped")


_UID = re.compile(r"[0-9.]{1,64}")  # a DICOM UID (PS3.5 9.1): what trace() looks up

# A spool file no object refers to is an orphan once it is this old (see Store._sweep_spool).
ORPHAN_AGE_S = 60.0
SWEEP_INTERVAL_S = 600.0  # a sweep reads every object record: not more often than this
# The free-space check is skipped for DISK_RECHECK_S after one that found more than
# DISK_RECHECK_HEADROOM_MB above min_free_disk_mb (a disk that fills faster still refuses:
# ENOSPC while writing is StoreFull too).
DISK_RECHECK_S = 0.5
DISK_RECHECK_HEADROOM_MB = 1024


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")


class Store(Node):
    """Durable node: commits arrivals, then feeds one durable queue per lane.

    Ports: ``in`` (Arrival items); no outputs: lanes are fed by :meth:`branch` sources.

    Guarantees:
        - An arrival's receipt is ``committed()`` only after the LMDB transaction holding it
          (and its fsynced spool file, for a large object) committed with sync; arrivals
          waiting together share one transaction and one sync (group commit).
        - Idempotent on SOPInstanceUID: identical bytes → ``committed(duplicate=True)``, not
          re-sent; changed bytes → replaced and queued again for every lane.
        - When the map is above ``high_water``, the disk below ``min_free_disk_mb`` or LMDB
          reports the map full, new arrivals fail with :class:`StoreFull`; nothing committed
          is touched and ingest resumes by itself once space returns.
        - Every queued or in-flight item is re-queued at :meth:`open` (at-least-once).
        - :meth:`open` refuses a key other than the data dir's recorded one, a missing key
          file for a data dir that holds data, and a data dir of a newer format, with a
          :class:`flow.ConfigError` and before any item changes state; it upgrades an older
          format in place (see :mod:`.layout`). After a key rotation, objects sealed with a
          retired key stay readable and are re-sealed under the current key in the
          background (:meth:`reseal`).

    Cancellation: arrivals the Store holds when cancelled or crashing are answered with
    :class:`StoreFailed` (never acknowledged); a commit already running in its worker
    thread completes.
    """

    durable = True
    inputs = ("in",)
    outputs = ()

    def __init__(self, data_dir: str | os.PathLike[str], config: StoreConfig | None = None, *,
                 name: str = "store", rng: random.Random | None = None) -> None:
        config = config or StoreConfig()
        super().__init__(name=name, capacity=config.input_capacity)
        self.data_dir = Path(data_dir)
        self.config = config
        self.spool_dir = self.data_dir / SPOOL_DIR
        self.pumps: dict[str, LanePump] = {}
        self.rng = rng or random.Random()
        self._env: Env | None = None
        self._keyring: Keyring | None = None
        self._committer: GroupCommitter | None = None
        self._wake: dict[str, trio.Event] = {}
        self._due_now: dict[str, bool] = {}  # this process queued something due for the lane
        self._purge_wake: trio.Event | None = None
        self._handed: dict[tuple[str, str, str], float] = {}
        self._full = False
        self._disk_ok_until = 0.0

    # -- graph --------------------------------------------------------------------------------

    def branch(self, lane: str) -> "LanePump":
        if "\0" in lane or not lane:
            raise ValueError(f"invalid lane name {lane!r}")
        if lane in self.pumps:
            raise ValueError(f"store {self.name!r} already has a lane {lane!r}")
        name = f"{lane}_queue" if self.name == "store" else f"{self.name}_{lane}_queue"
        pump = LanePump(self, lane, name=name)
        self.pumps[lane] = pump
        return pump

    @property
    def lanes(self) -> list[str]:
        return list(self.pumps)

    @property
    def stats(self) -> dict[str, int]:
        """``commits``: sync commits so far in this process; ``operations``: writes in them."""
        c = self._committer
        return {"commits": c.commits if c else 0, "operations": c.operations if c else 0}

    # -- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        """Open LMDB, check the key and format against the data dir's record (see
        :func:`.layout.settle`), re-queue what was in flight, remove orphan spool files."""
        if self._env is not None:
            return
        self._env = await trio.to_thread.run_sync(self._open_blocking)
        self._committer = GroupCommitter(self._env, self._refusal)
        self._wake = {lane: trio.Event() for lane in self.pumps}
        self._due_now = {lane: False for lane in self.pumps}
        self._purge_wake = trio.Event()

    @property
    def key_source(self) -> KeySource:
        return KeySource(self.data_dir, self.config.key_file, self.config.key_env)

    def _open_blocking(self) -> Env:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.spool_dir.mkdir(exist_ok=True, mode=0o700)
        env = Env(self.data_dir, map_size_mb=self.config.map_size_mb,
                  max_readers=self.config.max_readers)
        try:
            # Before anything reads or changes an item: a wrong key or a newer data dir is
            # refused here, with nothing dead-lettered (see layout.settle).
            self._keyring, settled = layout.settle(env, self.key_source, self.spool_dir,
                                                   where=f"store {self.name!r}")
            if settled != "checked":
                log.info(f"store.data_dir_{settled}", node=self.name,
                         data_dir_format=layout.FORMAT, key_id=self._keyring.current.key_id)
            with env.begin(write=True) as txn:
                requeued = lanes.requeue_in_flight(env, txn, self.lanes, time.time())
            orphans = self._sweep_spool(env)
        except BaseException:
            env.close()
            raise
        log.info("store.opened", node=self.name, lanes=",".join(self.lanes) or "-",
                 requeued=requeued, orphans=orphans, key_id=self._keyring.current.key_id)
        return env

    def _sweep_spool(self, env: Env) -> int:
        """Delete spool files no object refers to: written for a commit that never happened
        (a crash between the spool's fsync and the commit). Files younger than
        ``ORPHAN_AGE_S`` are left alone: another process sharing the store may be about to
        commit them. Blocking; returns how many went."""
        cutoff = time.time() - ORPHAN_AGE_S
        candidates = [p for p in self.spool_dir.iterdir() if _mtime(p) < cutoff]
        if not candidates:
            return 0
        with env.begin() as txn:  # read after listing: a file committed meanwhile is kept
            referenced = objects.referenced_spools(env, txn)
        orphans = [p for p in candidates if p.name not in referenced]
        for path in orphans:
            path.unlink(missing_ok=True)
        return len(orphans)

    async def close(self) -> None:
        env, self._env = self._env, None
        self._committer = None
        if env is not None:
            await trio.to_thread.run_sync(env.close)

    def _require(self) -> tuple[Env, GroupCommitter, Keyring]:
        if self._env is None or self._committer is None or self._keyring is None:
            raise RuntimeError(f"store {self.name!r} is not open (the runner opens it)")
        return self._env, self._committer, self._keyring

    # -- ingest -------------------------------------------------------------------------------

    async def run(self, ctx: Context) -> None:
        """Drain every waiting arrival, commit them together, answer their receipts."""
        channel = ctx.inputs["in"]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._purge_loop)
            nursery.start_soon(self._reseal_loop)
            while True:
                try:
                    batch = [await ctx.receive_one()]
                except trio.EndOfChannel:
                    break
                while True:
                    try:
                        batch.append(channel.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await self.commit(batch)
                ctx.release()
            nursery.cancel_scope.cancel()

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
        env, committer, keyring = self._require()
        key = keyring.current
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
            ops.append((arrival, Op(partial(self._ingest, env, key, arrival, item, now),
                                    ingest=True)))
        await committer.run([op for _, op in ops])
        obsolete: list[str] = []
        queued = False  # something new is due on every lane now
        for arrival, op in ops:
            uid = arrival.envelope.sop_instance_uid
            if op.error is not None:
                item = spooled.get(id(arrival))
                if item is not None:
                    obsolete.append(item.spool)
                if isinstance(op.error, StoreFull):
                    refused.append(op.error)
                elif not isinstance(op.error, StoreFailed):
                    log.error("store.ingest_failed", sop_instance_uid=uid,
                              error_class=type(op.error).__name__)
                    op.error = StoreFailed(f"commit failed: {type(op.error).__name__}")
                arrival.receipt.failed(op.error)
                continue
            result: objects.IngestResult = op.result
            if result.obsolete_spool:
                obsolete.append(result.obsolete_spool)
            arrival.receipt.committed(duplicate=result.stored is objects.Stored.DUPLICATE)
            if result.stored is not objects.Stored.DUPLICATE:
                queued = True
            log.debug("store.committed", sop_instance_uid=uid, stored=result.stored.value)
        self._note_full(refused)
        if obsolete:
            await trio.to_thread.run_sync(self._remove_spools, obsolete)
        for lane in self.lanes:
            if queued:
                self._due_now[lane] = True
            self._wake[lane].set()

    def _spools(self, arrival: Arrival) -> bool:
        try:
            return arrival.payload.size > self.config.spool_threshold_kb * 1024
        except Exception:
            return True  # let _prepare report the unreadable payload

    def _ingest(self, env: Env, key: AtRestKey, arrival: Arrival,
                item: objects.Prepared | None, now: float,
                txn: lmdb.Transaction) -> objects.IngestResult:
        """The ingest operation, in the commit thread. Small objects are hashed and sealed
        here rather than in a thread of their own: one thread hop per round, not two."""
        if item is None:
            prepared = self._prepare(key, arrival)
            if isinstance(prepared, Exception):
                raise prepared
            item = prepared
        return objects.ingest(env, txn, item, self.lanes, now)

    def _note_full(self, refused: list[BaseException]) -> None:
        if refused and not self._full:
            log.warning("store.full", node=self.name, refused=len(refused),
                        reason=str(refused[0]))
        elif not refused and self._full:
            log.info("store.space_returned", node=self.name)
        self._full = bool(refused)

    def _prepare_all(self, key: AtRestKey, arrivals: list[Arrival]) -> list[Any]:
        low = self._disk_refusal()
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

    def _disk_refusal(self) -> str | None:
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

    def _refusal(self, txn: lmdb.Transaction) -> str | None:
        """Why new arrivals must wait (routing-safe), or None. Runs in the commit thread."""
        assert self._env is not None
        used = self._env.used_fraction_over(txn, self.config.high_water)
        if used is not None:
            return (f"map {used:.0%} used, above the high-water mark "
                    f"{self.config.high_water:.0%}")
        return self._disk_refusal()

    def _remove_spools(self, names: list[str]) -> None:
        for name in names:
            remove_spool(self.spool_dir / name)

    # -- lanes --------------------------------------------------------------------------------

    async def take(self, lane: str, limit: int) -> tuple[list[Delivery], float | None]:
        """Claim up to ``limit`` due items of ``lane`` (marked in flight); also returns when
        the next waiting item is due (None: nothing waits)."""
        env, committer, keyring = self._require()
        self._wake[lane] = trio.Event()  # a wake-up from now on ends the next idle wait
        now = time.time()

        def due_now() -> float | None:
            with env.begin() as txn:
                return lanes.next_due(env, txn, lane)

        # A read first, so that a lane with nothing due does not take the single LMDB
        # writer; skipped when this process just queued something for the lane.
        if self._due_now.get(lane):
            self._due_now[lane] = False
        else:
            first = await trio.to_thread.run_sync(due_now)
            if first is None or first > now:
                return [], first

        def claim(txn: lmdb.Transaction) -> tuple[list[Any], float | None]:
            """Claim and build the deliveries in the commit thread (unsealing a small
            object takes microseconds; another thread hop per claim costs more)."""
            found = []
            claimed, upcoming = lanes.claim(env, txn, lane, limit, now)
            for uid, item in claimed:
                obj = objects.get(env, txn, uid)
                blob = txn.get(uid_key(uid), db=env.blobs) if obj and not obj.spool else None
                found.append((uid, item, obj, blob))
            return self._deliveries(keyring, lane, found), upcoming

        # Shielded: items claimed in LMDB must reach the caller, which hands them over or
        # returns them (LanePump.run); a cancellation lands at its next checkpoint.
        with trio.CancelScope(shield=True):
            try:  # not waiting for space in here: the shield would hold up a graceful stop
                built, upcoming = await committer.one(
                    claim, linger=self.config.lane_linger_ms / 1000, wait_for_space=False)
            except Exception as exc:
                if committer.full_reason(exc) is None:
                    raise
                return [], None  # map or disk full: nothing claimed; the next idle tries again
            handed = time.monotonic()
            for d in built:
                if isinstance(d, Delivery):
                    self._handed[(lane, d.uid, d.content_hash)] = handed
            for broken in built:
                if not isinstance(broken, Delivery):
                    # The stored bytes cannot be read back (e.g. tampered): retrying cannot
                    # help, an operator must look (flow deadletters). A key this process
                    # has not loaded (another process rotated it) is a wait, not a loss.
                    uid, content_hash, outcome = broken
                    await self._commit_outcome(lane, uid, content_hash, outcome, 1, (), 0.0)
        return [d for d in built if isinstance(d, Delivery)], upcoming

    def _deliveries(self, keyring: Keyring, lane: str, claimed: list) -> list[Any]:
        out: list[Any] = []
        for uid, item, obj, blob in claimed:
            if obj is None:
                out.append((uid, item.content_hash,
                            Permanent("object missing from the store")))
                continue
            try:
                payload = self._payload(keyring, uid, obj, blob)
            except KeyNotInKeyring as exc:
                out.append((uid, item.content_hash, Transient(str(exc))))
                continue
            except Exception as exc:
                out.append((uid, item.content_hash,
                            Permanent(f"stored bytes unreadable: {type(exc).__name__}")))
                continue
            out.append(Delivery(obj.envelope, payload, lane, self._settle,
                                attempt=item.attempts + 1, content_hash=item.content_hash))
        return out

    def _payload(self, keyring: Keyring, uid: str, obj: ObjectRecord,
                 blob: bytes | None) -> Payload:
        key = keyring.key_for(obj)
        if obj.spool:
            return SpoolPayload(key, self.spool_dir / obj.spool, spool_aad(uid, obj.spool),
                                obj.size)
        if blob is None:
            raise LookupError("no stored bytes")
        return BytesPayload(key.unseal(blob, blob_aad(uid, obj.content_hash)))

    async def untake(self, lane: str, deliveries: list[Delivery]) -> None:
        """Return claimed deliveries that never reached the lane to the head of its queue."""
        env, committer, _ = self._require()
        for d in deliveries:
            self._handed.pop((lane, d.uid, d.content_hash), None)
        await committer.one(partial(lanes.unclaim, env, lane=lane,
                                    uids=[(d.uid, d.content_hash) for d in deliveries],
                                    now=time.time()))
        self._due_now[lane] = True
        self._wake[lane].set()

    async def idle(self, lane: str, next_due: float | None) -> None:
        """Wait until work may be due: a local commit woke the lane, the next retry is due,
        or ``poll_s`` passed (work committed by another process, e.g. a CLI replay)."""
        timeout = self.config.poll_s
        if next_due is not None:
            timeout = min(timeout, max(0.0, next_due - time.time()))
        with trio.move_on_after(timeout):
            await self._wake[lane].wait()

    async def _settle(self, delivery: Delivery, outcome: Outcome) -> None:
        started = self._handed.pop((delivery.lane, delivery.uid, delivery.content_hash), None)
        duration_ms = (time.monotonic() - started) * 1000 if started is not None else 0.0
        await self._commit_outcome(delivery.lane, delivery.uid, delivery.content_hash, outcome,
                                   delivery.attempt, delivery.notes, duration_ms)

    async def _commit_outcome(self, lane: str, uid: str, content_hash: str, outcome: Outcome,
                              attempt: int, notes: tuple[str, ...], duration_ms: float) -> None:
        env, committer, _ = self._require()
        now = time.time()
        cfg = self.config

        def delay(failures: int, retry_after: float | None) -> float:
            return retry_delay(failures, initial=cfg.retry_initial_s, maximum=cfg.retry_max_s,
                               jitter=cfg.retry_jitter, retry_after=retry_after,
                               retry_after_max=cfg.retry_after_max_s, unit=self.rng.random())

        def commit(txn: lmdb.Transaction) -> bool:
            finished = lanes.settle(env, txn, lane, uid, content_hash, outcome, attempt=attempt,
                                    notes=notes, duration_ms=duration_ms, now=now, delay=delay,
                                    max_attempts=cfg.max_attempts)
            if not finished:
                return False
            obj = objects.get(env, txn, uid)
            if obj is None or not lanes.finished_everywhere(env, txn, uid, obj=obj,
                                                            finished_lane=lane):
                return False
            objects.mark_done(env, txn, uid, now, obj)
            return True

        done = await committer.one(commit, linger=self.config.lane_linger_ms / 1000)
        if isinstance(outcome, Permanent):
            log.warning("store.dead_letter", sop_instance_uid=uid, lane=lane,
                        reason=outcome.reason, attempt=attempt)
        elif isinstance(outcome, Transient):
            log.info("store.retry", sop_instance_uid=uid, lane=lane, reason=outcome.reason,
                     attempt=attempt)
        self._wake[lane].set()
        if done and self.config.retention_s == 0 and self._purge_wake is not None:
            self._purge_wake.set()

    # -- purge --------------------------------------------------------------------------------

    async def purge_expired(self) -> int:
        """Purge objects finished more than ``retention_s`` ago; returns how many went.
        Runs by itself every ``purge_interval_s`` while the Store runs."""
        env, committer, _ = self._require()

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
                await trio.to_thread.run_sync(self._remove_spools, spools)
            total += count
        await self._expire_audit(env, committer)
        return total

    async def _expire_audit(self, env: Env, committer: GroupCommitter) -> None:
        """Drop the trails of objects purged more than ``audit_retention_s`` ago."""
        def anything_due() -> bool:
            with env.begin() as txn:
                first = audit.first_purged(env, txn)
            return first is not None and first + self.config.audit_retention_s <= time.time()

        while await trio.to_thread.run_sync(anything_due):
            await committer.one(partial(audit.expire, env, now=time.time(),
                                        retention_s=self.config.audit_retention_s))

    async def _purge_loop(self) -> None:
        env, _, _ = self._require()
        swept = time.monotonic()
        while True:
            assert self._purge_wake is not None
            purged = await self.purge_expired()
            if purged:
                log.info("store.purged", node=self.name, purged=purged)
            if time.monotonic() - swept > SWEEP_INTERVAL_S:
                swept = time.monotonic()
                orphans = await trio.to_thread.run_sync(self._sweep_spool, env)
                if orphans:
                    log.info("store.orphans_removed", node=self.name, orphans=orphans)
            with trio.move_on_after(self.config.purge_interval_s):
                await self._purge_wake.wait()
            self._purge_wake = trio.Event()

    # -- re-sealing after a key rotation ------------------------------------------------------

    async def reseal(self) -> tuple[int, int]:
        """One pass: seal every object that an older key sealed again under the current key.

        Returns ``(resealed, skipped)``; skipped objects (a spooled object a lane holds in
        flight) are left for a later pass. Safe beside ingest, lanes and other processes:
        each batch commits in one short transaction that re-reads what it changes, and no
        lane item changes state (see :mod:`.reseal`).
        """
        env, committer, keyring = self._require()
        resealed = skipped = 0
        after = b""
        while batch := await trio.to_thread.run_sync(reseal.stale, env, keyring, after):
            after = uid_key(batch[-1][0])
            respooled = await trio.to_thread.run_sync(self._respool_all, keyring, batch)
            done = await committer.one(partial(reseal.commit, env, keyring, batch, respooled))
            await trio.to_thread.run_sync(self._remove_spools, done.obsolete + done.unused)
            resealed += done.resealed
            skipped += done.skipped
        return resealed, skipped

    def _respool_all(self, keyring: Keyring, batch: list[tuple[str, ObjectRecord]]
                     ) -> dict[str, str]:
        out = {}
        for uid, obj in batch:
            if not obj.spool:
                continue
            try:
                out[uid] = reseal.respool(keyring, self.spool_dir, uid, obj)
            except Exception as exc:  # unreadable or gone: its lanes report it when they reach it
                log.warning("store.reseal_failed", node=self.name, sop_instance_uid=uid,
                            error_class=type(exc).__name__)
        return out

    async def _reseal_loop(self) -> None:
        _, _, keyring = self._require()
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

    # -- queries ------------------------------------------------------------------------------

    async def study_members(self, study_uid: str) -> list[tuple[Envelope, Payload]]:
        """Every stored instance of ``study_uid`` (envelope + decrypting payload)."""
        env, _, keyring = self._require()

        def read() -> list[tuple[Envelope, Payload]]:
            members = []
            with env.begin() as txn:
                for obj in objects.study(env, txn, study_uid):
                    uid = obj.envelope.sop_instance_uid
                    blob = None if obj.spool else txn.get(uid_key(uid), db=env.blobs)
                    members.append((obj, blob))
            return [(obj.envelope, self._payload(keyring, obj.envelope.sop_instance_uid, obj,
                                                 blob))
                    for obj, blob in members]

        return await trio.to_thread.run_sync(read)

    def report(self) -> dict[str, Any]:
        """Per-lane figures read from LMDB: works from another process (read-only), while
        the graph runs or not."""
        return admin.report(self)

    def metrics(self) -> list[Metric]:
        return admin.metrics(self)

    def dead_letters(self, limit: int) -> list[dict[str, Any]]:
        rows = sorted(admin.dead_letters(self), key=lambda r: r["since"], reverse=True)[:limit]
        return [{"since": r["since"], "lane": r["lane"], "item": r["uid"], "reason": r["reason"],
                 "attempts": r["attempts"], "sop_class_uid": r["sop_class_uid"]} for r in rows]

    def trace(self, item: str) -> dict[str, Any] | None:
        if not _UID.fullmatch(item):
            return None
        doc = admin.trace(self, item)
        return doc if doc["stored"] is not None or doc["events"] else None


class LanePump(Node):
    """Source node of one lane: feeds the Store's durable queue for ``lane`` into ``out``.

    Claims as many due items as the channel has room for (at least one, waiting for room),
    so the lane's bounded channel is the only buffer in memory. Items claimed but not yet
    handed over when the pump is cancelled go back to the head of the queue.
    """

    inputs = ()
    outputs = ("out",)

    def __init__(self, store: Store, lane: str, *, name: str) -> None:
        super().__init__(name=name)
        self.store = store
        self.lane = lane

    async def run(self, ctx: Context) -> None:
        out = ctx.outputs["out"]
        while True:
            stats = out.statistics()
            room = stats.max_buffer_size - stats.current_buffer_used
            limit = max(1, min(int(room) if room != float("inf") else 64, 256))
            deliveries, next_due = await self.store.take(self.lane, limit)
            if not deliveries:
                await self.store.idle(self.lane, next_due)
                continue
            pending = list(deliveries)
            try:
                while pending:
                    await ctx.send(pending[0])
                    pending.pop(0)
            finally:
                if pending:
                    with trio.CancelScope(shield=True):
                        await self.store.untake(self.lane, pending)
