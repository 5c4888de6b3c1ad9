"""The lane ledger: each lane's durable queue in the Store's LMDB environment.

:class:`LaneLedger` is the :class:`~.queue.LaneQueue` of a Store's lanes: it claims due
items as deliveries (unsealing their bytes), takes back what never reached a lane, commits
each outcome (retry schedule, dead-letter, the object finished everywhere) and wakes the
pumps. It needs an open :class:`~.db.Env` and the keyring, nothing of ingest: a process
without a listener can run lanes against the same data dir (LMDB serialises the writers of
every process). Work committed by another process wakes a pump through the lane's datagram
socket (:mod:`.rundir`); ``poll_s`` is the safety net for a wake-up that got lost. The state
machine of an item is in :mod:`.lanes`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import NamedTuple

import lmdb
import trio

from flow import get_logger

from ..delivery import Delivery
from ..outcome import Outcome, Permanent, Transient
from . import lanes, objects
from .commit import GroupCommitter
from .config import StoreConfig
from .db import Env, LaneItem, ObjectRecord, uid_key
from .keyring import Keyring, KeyNotInKeyring
from .queue import Claim
from .retry import retry_delay
from .rundir import RunDir, lane_name, woken

log = get_logger("nodes.store")


class Unreadable(NamedTuple):
    """A claimed item that cannot become a delivery, and the outcome it settles with: its
    object is gone or its stored bytes cannot be read back (:class:`Permanent`: an operator
    must look), or they are sealed with a key this process has not loaded yet
    (:class:`Transient`: another process rotated the key; a wait, not a loss)."""

    uid: str
    content_hash: str
    outcome: Outcome


class Found(NamedTuple):
    """A claimed item with what its delivery is built from, read in the claim's
    transaction (``obj`` None: the object is gone; ``blob``: a small object's sealed
    bytes)."""

    uid: str
    item: LaneItem
    obj: ObjectRecord | None
    blob: bytes | None


class LaneLedger:
    """The durable queues of ``lanes`` in ``env``; one per process and environment.

    ``committer``: the process's group committer when ingest shares it (one LMDB writer,
    shared sync rounds); a ledger of its own otherwise. ``on_finished``: called when an
    outcome left an object finished on every lane (the Store purges it when
    ``retention_s`` is 0). ``wakeup``: with other processes on the data dir, the run dir
    whose sockets wake the pumps: a commit here that queued work rings every lane whose
    pump does not listen in this process, and :meth:`idle` wakes on a ring for a lane
    that does. Trio-side, like the committer.
    """

    def __init__(self, env: Env, keyring: Keyring, spool_dir: Path, config: StoreConfig,
                 lanes: Iterable[str], *, committer: GroupCommitter | None = None,
                 rng: random.Random | None = None,
                 on_finished: Callable[[], None] | None = None,
                 wakeup: RunDir | None = None) -> None:
        self.env = env
        self.keyring = keyring
        self.spool_dir = spool_dir
        self.config = config
        self.lanes = list(lanes)
        self.committer = committer or GroupCommitter(env)
        self.rng = rng or random.Random()
        self.on_finished = on_finished
        self.wakeup = wakeup
        self._names = {lane: lane_name(lane) for lane in self.lanes}
        self._wake = {lane: trio.Event() for lane in self.lanes}
        self._due_now = dict.fromkeys(self.lanes, False)  # this process queued work for it
        self._handed: dict[tuple[str, str, str], float] = {}

    def notify(self, queued: bool) -> None:
        """Wake every lane's pump: something committed in this process may concern it;
        ``queued``: new work is due on every lane now (its next claim skips the read)."""
        for lane in self.lanes:
            if queued:
                self._due_now[lane] = True
            self._wake[lane].set()
        if queued and self.wakeup is not None:
            for name in self._names.values():
                if not self.wakeup.listening(name):
                    self.wakeup.ring(name)

    # -- LaneQueue ----------------------------------------------------------------------------

    async def claim(self, lane: str, limit: int) -> Claim:
        """Claim up to ``limit`` due items of ``lane`` (marked in flight) as deliveries."""
        env, committer = self.env, self.committer
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
                return Claim([], first)

        def claim(txn: lmdb.Transaction
                  ) -> tuple[list[Delivery], list[Unreadable], float | None]:
            """Claim and build the deliveries in the commit thread (unsealing a small
            object takes microseconds; another thread hop per claim costs more)."""
            found = []
            claimed, upcoming = lanes.claim(env, txn, lane, limit, now)
            for uid, item in claimed:
                obj = objects.get(env, txn, uid)
                blob = txn.get(uid_key(uid), db=env.blobs) if obj and not obj.spool else None
                found.append(Found(uid, item, obj, blob))
            return *self._build(self.keyring, lane, found), upcoming

        # Shielded: items claimed in LMDB must reach the caller, which hands them over or
        # returns them (LanePump.run); a cancellation lands at its next checkpoint.
        with trio.CancelScope(shield=True):
            try:  # not waiting for space in here: the shield would hold up a graceful stop
                built, unreadable, upcoming = await committer.one(
                    claim, linger=self.config.lane_linger_ms / 1000, wait_for_space=False)
            except Exception as exc:
                if committer.full_reason(exc) is None:
                    raise
                return Claim([], None)  # map or disk full: nothing claimed; next idle tries
            handed = time.monotonic()
            for d in built:
                self._handed[(lane, d.uid, d.content_hash)] = handed
            for broken in unreadable:
                await self._commit_outcome(lane, broken.uid, broken.content_hash,
                                           broken.outcome, 1, (), 0.0)
        return Claim(built, upcoming)

    def _build(self, keyring: Keyring, lane: str, found: list[Found]
               ) -> tuple[list[Delivery], list[Unreadable]]:
        delivered: list[Delivery] = []
        unreadable: list[Unreadable] = []
        for uid, item, obj, blob in found:
            if obj is None:
                unreadable.append(Unreadable(uid, item.content_hash,
                                             Permanent("object missing from the store")))
                continue
            try:
                payload = objects.open_payload(keyring, self.spool_dir, uid, obj, blob)
            except KeyNotInKeyring as exc:
                unreadable.append(Unreadable(uid, item.content_hash, Transient(str(exc))))
                continue
            except Exception as exc:
                unreadable.append(Unreadable(
                    uid, item.content_hash,
                    Permanent(f"stored bytes unreadable: {type(exc).__name__}")))
                continue
            delivered.append(Delivery(obj.envelope, payload, lane, self.settle,
                                      attempt=item.attempts + 1,
                                      content_hash=item.content_hash))
        return delivered, unreadable

    async def unclaim(self, lane: str, deliveries: list[Delivery]) -> None:
        """Return claimed deliveries that never reached the lane to the head of its queue."""
        for d in deliveries:
            self._handed.pop((lane, d.uid, d.content_hash), None)
        await self.committer.one(partial(lanes.unclaim, self.env, lane=lane,
                                         uids=[(d.uid, d.content_hash) for d in deliveries],
                                         now=time.time()))
        self._due_now[lane] = True
        self._wake[lane].set()

    async def idle(self, lane: str, next_due: float | None) -> None:
        """Wait until work may be due: a local commit woke the lane, another process rang
        it, the next retry is due, or ``poll_s`` passed (a wake-up that never came, or work
        committed by a process that does not ring)."""
        timeout = self.config.poll_s
        if next_due is not None:
            timeout = min(timeout, max(0.0, next_due - time.time()))
        with trio.move_on_after(timeout):
            await woken(self.wakeup, self._names[lane], self._wake[lane])

    # -- outcomes -----------------------------------------------------------------------------

    async def settle(self, delivery: Delivery, outcome: Outcome) -> None:
        """Commit what became of ``delivery`` (its :class:`Delivery` settles through here)."""
        started = self._handed.pop((delivery.lane, delivery.uid, delivery.content_hash), None)
        duration_ms = (time.monotonic() - started) * 1000 if started is not None else 0.0
        await self._commit_outcome(delivery.lane, delivery.uid, delivery.content_hash, outcome,
                                   delivery.attempt, delivery.notes, duration_ms)

    async def _commit_outcome(self, lane: str, uid: str, content_hash: str, outcome: Outcome,
                              attempt: int, notes: tuple[str, ...], duration_ms: float) -> None:
        env = self.env
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

        done = await self.committer.one(commit, linger=cfg.lane_linger_ms / 1000)
        if isinstance(outcome, Permanent):
            log.warning("store.dead_letter", sop_instance_uid=uid, lane=lane,
                        reason=outcome.reason, attempt=attempt)
        elif isinstance(outcome, Transient):
            log.info("store.retry", sop_instance_uid=uid, lane=lane, reason=outcome.reason,
                     attempt=attempt)
        self._wake[lane].set()
        if done and self.on_finished is not None:
            self.on_finished()
