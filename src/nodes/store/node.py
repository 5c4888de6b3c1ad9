"""The Store node: commit-before-ack, durable lanes, retries, purge.

``Store`` takes :class:`~nodes.arrival.Arrival` items on ``in`` and answers each receipt only
after the LMDB transaction holding the object committed with sync (a listener's thread
committing directly: once its ingest journal holds it). Every ``store.branch(lane)``
is a :class:`~.queue.LanePump`, the source node of that lane, that feeds
:class:`~nodes.delivery.Delivery` items from the lane's durable queue as its channel has room;
lanes settle deliveries and the Store commits each outcome.

The node ties three parts together on one LMDB environment and one group committer:
:class:`~.ingest.Ingest` (arrivals → one group commit), :class:`~.ledger.LaneLedger` (claim,
settle, retry schedule, dead-letter) and :class:`~.housekeeping.Housekeeping` (purge, sweep,
re-seal). What operators see and do is in :mod:`.admin`.

When the graph runs in several processes (:attr:`flow.Node.placement`), every process opens
its own Store on the same data dir: the lanes whose pumps run in a process are that
process's (a lock each, see :mod:`.rundir`), housekeeping runs in one process, and a
commit elsewhere wakes a lane's pump through its datagram socket.
"""

from __future__ import annotations

import os
import random
import re
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

from flow import Context, Metric, Node, get_logger, register_safe_fields

from ..arrival import Arrival, Envelope
from ..delivery import Delivery
from ..outcome import Outcome
from ..payload import Payload
from . import admin, lanes, layout, objects
from .commit import GroupCommitter
from .config import StoreConfig
from .db import MB, SPOOL_DIR, Env, uid_key
from .housekeeping import Housekeeping, sweep_spool
from .ingest import Applier, Ingest, Space, replay_journals
from .journal import Journal, JournalBusy, journal_name
from .keyring import Keyring, KeySource
from .ledger import LaneLedger
from .queue import Claim, LanePump
from .rundir import HOUSEKEEPING, LaneTaken, RunDir, lane_name
from .spool import remove_spools

log = get_logger("nodes.store")
register_safe_fields("refused", "requeued", "purged", "orphans", "key_id", "stored",
                     "data_dir_format", "resealed", "skipped", "pumps", "housekeeping",
                     "journal", "replayed")


_UID = re.compile(r"[0-9.]{1,64}")  # a DICOM UID (PS3.5 9.1): what trace() looks up


@dataclass
class _Parts:
    """What an open Store runs on."""

    env: Env
    keyring: Keyring
    committer: GroupCommitter
    ingest: Ingest
    ledger: LaneLedger
    housekeeping: Housekeeping
    run: RunDir
    journal: Journal | None


class Store(Node):
    """Durable node: commits arrivals, then feeds one durable queue per lane.

    Ports: ``in`` (Arrival items); no outputs: lanes are fed by :meth:`branch` sources.

    Guarantees:
        - An arrival's receipt is ``committed()`` only after the LMDB transaction holding
          it (and its fsynced spool file, for a large object) committed with sync; arrivals
          waiting together share one transaction and one sync (group commit). Through the
          direct way (:meth:`.ingest.Ingest.commit_now`, a listener's thread), with
          ``journal_mb`` > 0, once its record is durable in this process's ingest journal
          (:mod:`.journal`); LMDB takes it in right behind, and :meth:`open` takes in what
          any journal no running process holds has and LMDB lacks, before the listener
          can take anything (what a crash left).
        - Idempotent on SOPInstanceUID: identical bytes → ``committed(duplicate=True)``, not
          re-sent; changed bytes → replaced and queued again for every lane.
        - When the map is above ``high_water``, the disk below ``min_free_disk_mb`` or LMDB
          reports the map full, new arrivals fail with :class:`StoreFull`; nothing committed
          is touched and ingest resumes by itself once space returns.
        - At :meth:`open` the Store takes the lock of every lane whose pump runs in this
          process (every lane in one-process mode) and re-queues the in-flight items of
          those lanes only (at-least-once); a lane another live process pumps is refused
          with :class:`~.rundir.LaneTaken` (naming the lane and that process's pid) before
          anything changes. A process that dies releases its lanes by itself.
        - Purge, orphan sweep and re-seal run in one process: where the Store's own lane
          runs, replica 0 (:attr:`housekeeper`).
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
        self._parts: _Parts | None = None

    # -- graph --------------------------------------------------------------------------------

    def branch(self, lane: str) -> LanePump:
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
        """``commits``: sync commits so far in this process; ``operations``: writes in them;
        ``rounds_in_caller``: rounds a listener's thread led itself (no worker thread)."""
        c = self.committer
        return {"commits": c.commits if c else 0, "operations": c.operations if c else 0,
                "rounds_in_caller": c.rounds_in_caller if c else 0}

    @property
    def env(self) -> Env | None:
        """The LMDB environment while the Store is open in this process, else None."""
        return self._parts.env if self._parts is not None else None

    @property
    def committer(self) -> GroupCommitter | None:
        """This process's group committer while the Store is open here, else None."""
        return self._parts.committer if self._parts is not None else None

    @property
    def journal(self) -> Journal | None:
        """This process's ingest journal while the Store is open here with one, else None."""
        return self._parts.journal if self._parts is not None else None

    @property
    def ledger(self) -> LaneLedger:
        """The lanes' durable queues (the Store must be open)."""
        return self._require().ledger

    @property
    def pumped(self) -> list[str]:
        """The lanes whose pumps run in this process (all of them in one-process mode)."""
        return [lane for lane in self.pumps if self.placement.runs(lane)]

    @property
    def housekeeper(self) -> bool:
        """Purge, sweep and re-seal run in this process: the Store's own lane (ingest) runs
        here and this is its first replica."""
        placement = self.placement
        return placement.runs(placement.lane) and placement.replica == 0

    @property
    def key_source(self) -> KeySource:
        return KeySource(self.data_dir, self.config.key_file, self.config.key_env)

    # -- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        """Take the locks of the lanes pumped here, open LMDB, check the key and format
        against the data dir's record (see :func:`.layout.settle`), re-queue what those
        lanes had in flight; in the housekeeping process, remove orphan spool files. With
        other processes on the data dir, bind the wake-up sockets of what runs here."""
        if self._parts is not None:
            return
        env, keyring, run, journal = await trio.to_thread.run_sync(self._open_blocking)
        # Wake-ups cross processes only when there are other processes to wake.
        wakeup = run if self.placement.shared else None
        space = Space(env, self.data_dir, self.config)
        # Lanes only, ingest in other processes without a journal: their arrivals wait for
        # LMDB's writer to be acknowledged, and our lane writes would take it from them.
        # With the journal they are acknowledged before LMDB takes them in, so lingering
        # would only hold the lanes back (docs/decisions.md, session 21).
        lanes_only = self.placement.shared and not self.placement.runs(self.placement.lane)
        committer = GroupCommitter(env, space.refusal,
                                   always_linger=lanes_only and not self.config.journal_mb)
        housekeeping = Housekeeping(env, keyring, committer, self.spool_dir, self.config,
                                    self.name, wakeup=wakeup, here=self.housekeeper)
        ledger = LaneLedger(env, keyring, self.spool_dir, self.config, self.lanes,
                            committer=committer, rng=self.rng,
                            on_finished=housekeeping.finished, wakeup=wakeup)
        ingest = Ingest(env, keyring, committer, space, self.spool_dir, self.config,
                        self.lanes, self.name, on_committed=ledger.notify, journal=journal)
        self._parts = _Parts(env, keyring, committer, ingest, ledger, housekeeping, run,
                             journal)

    @property
    def ingests(self) -> bool:
        """Arrivals are committed in this process (the Store's own lane runs here)."""
        return self.placement.runs(self.placement.lane)

    def _open_blocking(self) -> tuple[Env, Keyring, RunDir, Journal | None]:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.spool_dir.mkdir(exist_ok=True, mode=0o700)
        run = RunDir(self.data_dir)
        try:
            # First of all: a lane another process pumps is refused before anything changes.
            for lane in self.pumped:
                holder = run.take(lane_name(lane))
                if holder is not None:
                    who = "this process" if holder == os.getpid() else "another process"
                    raise LaneTaken(
                        f"store {self.name!r}: lane {lane!r} of data dir "
                        f"{str(self.data_dir)!r} is pumped by {who} (pid {holder or '?'}, "
                        f"lock {str(run.lock_path(lane_name(lane)))!r}); nothing was "
                        f"changed. Stop that process, or run each lane in one process only")
            env = Env.open(self.data_dir, map_size_mb=self.config.map_size_mb,
                      max_readers=self.config.max_readers)
            try:
                keyring, journal, replayed = self._replay(env)
                try:
                    requeued, orphans = self._settle(env, run)
                except BaseException:
                    if journal is not None:
                        journal.close()
                    raise
            except BaseException:
                env.close()
                raise
        except BaseException:
            run.release()
            raise
        log.info("store.opened", node=self.name, lanes=",".join(self.lanes) or "-",
                 pumps=",".join(self.pumped) or "-", housekeeping=self.housekeeper,
                 requeued=requeued, orphans=orphans, key_id=keyring.current.key_id,
                 journal=journal.name if journal is not None else "-", replayed=replayed)
        return env, keyring, run, journal

    def _replay(self, env: Env) -> tuple[Keyring, Journal | None, int]:
        """Check the data dir (key, format), then, where arrivals are committed, take in
        what the ingest journals hold and LMDB lacks (:func:`.ingest.replay_journals`):
        before anything reads an item, and before the listener can take a newer version
        of an object a journal holds."""
        # Before anything reads or changes an item: a wrong key or a newer data dir is
        # refused here, with nothing dead-lettered (see layout.settle).
        keyring, settled = layout.settle(env, self.key_source, self.spool_dir,
                                         where=f"store {self.name!r}")
        if settled != "checked":
            log.info(f"store.data_dir_{settled}", node=self.name,
                     data_dir_format=layout.FORMAT, key_id=keyring.current.key_id)
        if not self.ingests:
            return keyring, None, 0
        own = journal_name(self.placement.replica) if self.config.journal_mb else None
        try:
            journal, replayed, obsolete = replay_journals(
                env, self.data_dir, self.lanes, own, self.config.journal_mb * MB)
        except JournalBusy as exc:
            raise LaneTaken(
                f"store {self.name!r}: the ingest journal {str(exc)!r} of data dir "
                f"{str(self.data_dir)!r} is held by another running process (the same "
                f"ingest replica twice?); nothing was changed") from None
        if obsolete:
            remove_spools(self.spool_dir, obsolete)
        return keyring, journal, replayed

    def _settle(self, env: Env, run: RunDir) -> tuple[int, int]:
        """Re-queue this process's in-flight items, sweep, bind."""
        with env.begin(write=True) as txn:  # only this process's lanes: it holds their locks
            requeued = lanes.requeue_in_flight(env, txn, self.pumped, time.time())
        orphans = sweep_spool(env, self.spool_dir) if self.housekeeper else 0
        if self.placement.shared:
            for lane in self.pumped:
                run.listen(lane_name(lane))
            # The lock keeps a second housekeeper (misplaced) from taking over the socket;
            # purging in two processes is merely redundant.
            if self.housekeeper and run.take(HOUSEKEEPING) is None:
                run.listen(HOUSEKEEPING)
        return requeued, orphans

    async def close(self) -> None:
        parts, self._parts = self._parts, None
        if parts is not None:
            try:
                await trio.to_thread.run_sync(parts.env.close)
            finally:
                if parts.journal is not None:
                    parts.journal.close()
                parts.run.release()  # in the Trio thread: unbinds the sockets it waits on

    def _require(self) -> _Parts:
        if self._parts is None:
            raise RuntimeError(f"store {self.name!r} is not open (the runner opens it)")
        return self._parts

    # -- ingest -------------------------------------------------------------------------------

    async def run(self, ctx: Context) -> None:
        """Drain every waiting arrival, commit them together, answer their receipts; while
        running, serve the input's direct way (:class:`flow.Direct`): an upstream listener's
        thread commits its arrival itself (:meth:`.ingest.Ingest.commit_now`)."""
        channel = ctx.inputs["in"]
        parts = self._require()
        async with trio.open_nursery() as nursery, ctx.serve_direct(parts.ingest.commit_now):
            if self.housekeeper:
                nursery.start_soon(parts.housekeeping.run)
            if parts.ingest.applier is not None:
                nursery.start_soon(self._apply_journal, parts.ingest.applier)
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

    @staticmethod
    async def _apply_journal(applier: Applier) -> None:
        """The applier's thread, for as long as the Store runs; told to stop when the Store
        stops (after the direct way closed), it returns once LMDB holds what the journal
        acknowledged. A failure ends the Store (what LMDB lacks is taken in at the next
        start)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(trio.to_thread.run_sync, applier.run))
            try:
                await trio.sleep_forever()
            finally:
                applier.stop()

    async def commit(self, arrivals: list[Arrival]) -> None:
        """Commit ``arrivals`` in one transaction and answer each receipt (see
        :meth:`.ingest.Ingest.commit`: nothing is acknowledged unless committed)."""
        try:
            parts = self._require()
        except BaseException:
            for arrival in arrivals:
                if not arrival.receipt.done:
                    arrival.abandon("StoreInterrupted")
            raise
        await parts.ingest.commit(arrivals)

    # -- lanes (the LaneQueue of the pumps) ---------------------------------------------------

    async def claim(self, lane: str, limit: int) -> Claim:
        """Claim up to ``limit`` due items of ``lane`` (marked in flight) as deliveries; also
        returns when the next waiting item is due (None: nothing waits)."""
        return await self._require().ledger.claim(lane, limit)

    async def unclaim(self, lane: str, deliveries: list[Delivery]) -> None:
        """Return claimed deliveries that never reached the lane to the head of its queue."""
        await self._require().ledger.unclaim(lane, deliveries)

    async def settle(self, delivery: Delivery, outcome: Outcome) -> None:
        """Commit what became of ``delivery`` (see :meth:`.ledger.LaneLedger.settle`)."""
        await self._require().ledger.settle(delivery, outcome)

    async def idle(self, lane: str, next_due: float | None) -> None:
        """Wait until work may be due on ``lane`` (see :meth:`.ledger.LaneLedger.idle`)."""
        await self._require().ledger.idle(lane, next_due)

    # -- housekeeping -------------------------------------------------------------------------

    async def purge_expired(self) -> int:
        """Purge objects finished more than ``retention_s`` ago; returns how many went.
        Runs by itself every ``purge_interval_s`` while the Store runs."""
        return await self._require().housekeeping.purge_expired()

    async def reseal(self) -> tuple[int, int]:
        """One re-seal pass after a key rotation: ``(resealed, skipped)`` (see
        :meth:`.housekeeping.Housekeeping.reseal`). Runs by itself after :meth:`open`."""
        return await self._require().housekeeping.reseal()

    # -- queries ------------------------------------------------------------------------------

    async def study_members(self, study_uid: str) -> list[tuple[Envelope, Payload]]:
        """Every stored instance of ``study_uid`` (envelope + decrypting payload)."""
        parts = self._require()
        env, keyring = parts.env, parts.keyring

        def read() -> list[tuple[Envelope, Payload]]:
            members = []
            with env.begin() as txn:
                for obj in objects.study(env, txn, study_uid):
                    uid = obj.envelope.sop_instance_uid
                    blob = None if obj.spool else txn.get(uid_key(uid), db=env.blobs)
                    members.append((obj, blob))
            return [(obj.envelope, objects.open_payload(
                        keyring, self.spool_dir, obj.envelope.sop_instance_uid, obj, blob))
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
