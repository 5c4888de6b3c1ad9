"""Group commit: every write that waits at the same time shares one LMDB transaction and
one sync.

Arrivals, claims of a lane's pump and outcomes all go through one :class:`GroupCommitter`.
The first caller that finds no commit running becomes the *leader*: it takes every waiting
operation and commits them together in a worker thread (``trio.to_thread.run_sync``); callers
that come meanwhile wait for the next round. Throughput therefore grows with concurrency
while a lone caller still commits at once.

A caller in a thread of its own (a listener's connection thread, through the Store's
:class:`flow.Direct`) commits with :meth:`GroupCommitter.commit_blocking` instead: the same
rounds, led in its own thread when none runs (no hop to a worker thread and back), shared
with whatever waits then, Trio-side operations included.

Each operation runs in a nested transaction, so one that raises is rolled back alone and
gets its exception; the others commit. When the map or the disk is full
(``lmdb.MapFullError``; ENOSPC, or EIO from a short write, while LMDB writes its pages), the
round is retried without the *ingest* operations, which are refused with
:class:`~nodes.arrival.StoreFull`: outcomes and purges still commit when they fit, so space
can return. Other operations that do not fit wait and are tried again (every
``FULL_RETRY_S`` to ``FULL_RETRY_MAX_S``) until they commit: a lane stalls while the disk is
full and goes on by itself once space returns, rather than crashing until it is marked failed.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import lmdb
import trio

from flow import Histogram, get_logger

from ..arrival import StoreFull
from .db import Env

log = get_logger("nodes.store")
ROUND_BOUNDS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

Refusal = Callable[[lmdb.Transaction], "str | None"]


def never_refuse(txn: lmdb.Transaction) -> None:
    """The refusal of a committer that commits no arrivals (e.g. a lane-only process)."""
    return None

FULL_RETRY_S, FULL_RETRY_MAX_S = 0.25, 5.0  # a write that did not fit is tried again
SHORT_WRITE_FREE = 1 << 20  # below this many bytes free, an EIO from LMDB is a full disk


def full_reason(exc: BaseException, directory: str | os.PathLike[str]) -> str | None:
    """"map full" / "disk full" when ``exc`` says LMDB found no room to write in its
    environment ``directory``; else None.

    LMDB reports a write that fails outright as ENOSPC (``lmdb.DiskError``) or EDQUOT, but
    a *short* write, which is what the last free blocks of a file system give, as EIO
    (mdb_page_flush: "short write, filesystem full?"): an EIO with next to nothing free is
    a full disk too."""
    if isinstance(exc, lmdb.MapFullError):
        return "map full"
    if not isinstance(exc, lmdb.Error):
        return None
    code = getattr(exc, "code", None)
    if isinstance(exc, lmdb.DiskError) or code == errno.EDQUOT:
        return "disk full"
    if code == errno.EIO:
        try:
            if shutil.disk_usage(directory).free < SHORT_WRITE_FREE:
                return "disk full"
        except OSError:
            return None
    return None


@dataclass(eq=False)
class Op:
    """One write: ``fn(txn)`` runs inside the round's transaction.

    ``ingest`` operations (new arrivals) are refused while the Store is full; others wait
    for space and are tried again, unless ``wait_for_space`` is False (then they fail with
    LMDB's error, see :func:`full_reason`).
    """

    fn: Callable[[lmdb.Transaction], Any]
    ingest: bool = False
    result: Any = None
    error: BaseException | None = None
    done: bool = False
    wait_for_space: bool = True
    withdrawn: bool = False  # taken back before a round took it (never committed)

    def value(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


@dataclass(eq=False)
class _Window:
    """A linger window: until ``deadline`` (Trio clock); ``kept``: a caller keeps its time."""

    deadline: float
    kept: bool = False


class GroupCommitter:
    """Commits :class:`Op` s in shared sync transactions: :meth:`run` from Trio,
    :meth:`commit_blocking` from other threads; one round at a time.

    ``refusal(txn)`` returns a routing-safe reason to refuse ingest now (map above its
    high-water mark, disk low) or None. ``commits`` counts sync commits (one LMDB sync each).
    """

    def __init__(self, env: Env, refusal: Refusal = never_refuse, *,
                 always_linger: bool = False) -> None:
        self.env = env
        self.refusal = refusal
        # A process that commits no arrivals (lanes only, beside ingest processes on the same
        # data dir that acknowledge after LMDB's commit, no journal): its writes linger
        # always, so that its lanes' claims and outcomes share one round per linger window
        # instead of each taking LMDB's single writer, and a sync, that another process's
        # arrivals wait behind.
        self.always_linger = always_linger
        self.commits = 0
        self.operations = 0
        self.rounds_in_caller = 0  # rounds led in a caller's thread (commit_blocking)
        # For /metrics: how long a round takes (thread hop included) and how many writes
        # share it; in this process's memory, like the round itself.
        self.round_seconds = Histogram(ROUND_BOUNDS_S)
        self.batch_sizes = Histogram(BATCH_BOUNDS)
        # What waits for a round, and whether one runs: shared with callers in other
        # threads (commit_blocking), so read and changed only under _mutex.
        self._mutex = threading.Condition()
        self._pending: list[Op] = []
        self._busy = False
        self._idle = trio.Event()  # Trio-side: set (in the Trio thread) after a round
        self._trio_waits = False  # a Trio task waits on _idle: wake it after the next round
        self._started = 0.0  # when the running round started (monotonic)
        self._window: _Window | None = None  # the linger window open now (see _linger)
        self._last_ingest = float("-inf")  # when a round with arrivals last started (monotonic)
        try:  # for callers in other threads to wake the Trio side
            self._token: trio.lowlevel.TrioToken | None = trio.lowlevel.current_trio_token()
        except RuntimeError:
            self._token = None  # built outside Trio: taken at the first run()

    async def run(self, ops: Sequence[Op], *, linger: float = 0.0) -> None:
        """Commit ``ops`` (results and errors land on each op). Cancellation while waiting
        withdraws ops not yet taken; ops already in a running round still commit.

        ``linger`` > 0: the ops do not start a round of their own for up to that many
        seconds; any round that starts meanwhile (another caller's) takes them along. Lane
        writes linger so that they ride in the arrivals' rounds instead of holding the
        single LMDB writer (and the disk's sync) while an arrival waits behind them. They
        linger only while arrivals are coming (a round with arrivals started within twice
        the linger time): with none, no round would come for them to ride in, and a lane
        working off its queue after a burst would wait out every linger for nothing."""
        self._token = self._token or trio.lowlevel.current_trio_token()
        with self._mutex:
            self._pending.extend(ops)
        try:
            if linger > 0 and (self.always_linger
                               or time.monotonic() - self._last_ingest <= 2 * linger):
                await self._linger(ops, linger)
            await self._until_done(ops)
            delay = FULL_RETRY_S
            while waiting := [op for op in ops if op.wait_for_space and not op.ingest
                              and op.error is not None and self.full_reason(op.error)]:
                if delay == FULL_RETRY_S:
                    log.warning("store.write_waits", reason=self.full_reason(waiting[0].error))
                await trio.sleep(delay)
                delay = min(delay * 2, FULL_RETRY_MAX_S)
                for op in waiting:
                    op.done, op.error = False, None
                with self._mutex:
                    self._pending.extend(waiting)
                await self._until_done(ops)
        except BaseException:
            self._withdraw(ops)
            raise

    async def _linger(self, ops: Sequence[Op], linger: float) -> None:
        """Until ``ops`` are done (a round took them) or the linger window ends. The first
        caller to linger opens a window of ``linger`` seconds; one caller in it at a time
        keeps its time, the others wait only for rounds and for its end (one timer per
        window, not one cancelled deadline per write: in a lanes-only process, where every
        lane write lingers, those cancellations were ~13 % of the process's CPU). A keeper
        whose ops are done early, or that is cancelled, hands the window on."""
        window = self._window
        if window is None:
            window = self._window = _Window(trio.current_time() + linger)
        while not all(op.done for op in ops) and self._window is window:
            if window.kept:
                await self._next_round()
                continue
            window.kept = True
            try:
                with trio.move_on_at(window.deadline):
                    while not all(op.done for op in ops):
                        await self._next_round()
            finally:
                window.kept = False
                if trio.current_time() >= window.deadline and self._window is window:
                    self._window = None  # over: everyone in it goes on
                self._wake_trio()  # the others go on, or one of them keeps the time

    def _withdraw(self, ops: Sequence[Op]) -> None:
        """``ops`` not taken by a round yet will not be."""
        withdrawn = {id(op) for op in ops}
        with self._mutex:
            kept = [op for op in self._pending if id(op) not in withdrawn]
            for op in self._pending:
                op.withdrawn = op.withdrawn or id(op) in withdrawn
            self._pending = kept

    def full_reason(self, exc: BaseException) -> str | None:
        """:func:`full_reason` for this committer's environment."""
        return full_reason(exc, self.env.path)

    async def _until_done(self, ops: Sequence[Op]) -> None:
        while not all(op.done for op in ops):
            batch = self._take(trio_waits=True)
            if batch is None:
                await self._idle.wait()
                continue
            try:
                await trio.to_thread.run_sync(self._commit, batch)
            finally:
                self._round_over(batch)
                self._wake_trio()

    async def _next_round(self) -> None:
        """Trio: until the next round ends (whoever leads it)."""
        with self._mutex:
            self._trio_waits = True
        await self._idle.wait()

    def _take(self, trio_waits: bool = False) -> list[Op] | None:
        """Start a round with every waiting op (this caller leads it), or None: one runs
        (``trio_waits``: the caller, a Trio task, waits for its end)."""
        with self._mutex:
            if self._busy:
                self._trio_waits = self._trio_waits or trio_waits
                return None
            batch, self._pending = self._pending, []
            self._busy = True
        self._started = time.monotonic()
        if any(op.ingest for op in batch):
            self._last_ingest = self._started
        return batch

    def _round_over(self, batch: list[Op]) -> bool:
        """The leader's round ended: figures, and the next round may start. True: a Trio
        task waits for this (the leader wakes it, :meth:`_wake_trio`)."""
        self.round_seconds.observe(time.monotonic() - self._started)
        self.batch_sizes.observe(len(batch))
        with self._mutex:
            self._busy = False
            self._mutex.notify_all()
            trio_waits, self._trio_waits = self._trio_waits, False
        return trio_waits

    def _wake_trio(self) -> None:
        """Trio thread: wake the Trio tasks waiting for a round to end."""
        self._idle.set()
        self._idle = trio.Event()

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """From any thread: ``fn(*args)`` in the Trio thread (dropped once Trio has ended)."""
        if self._token is None:
            raise RuntimeError("the committer has not run in Trio yet")
        try:
            self._token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            pass

    def commit_blocking(self, ops: Sequence[Op], timeout_s: float) -> bool:
        """Blocking, from a thread other than Trio's: commit ``ops`` (results and errors land
        on each op) in a round this thread leads when none runs, else in the next one.
        Operations that find the Store full are not tried again here (arrivals are refused
        with :class:`~nodes.arrival.StoreFull`). False: not done within ``timeout_s``
        (those not taken by a round yet are withdrawn, ``op.withdrawn``; one a round took
        still commits)."""
        if self._token is None:
            raise RuntimeError("the committer has not run in Trio yet")
        deadline = time.monotonic() + timeout_s
        with self._mutex:
            self._pending.extend(ops)
        while not all(op.done for op in ops):
            batch = self._take()
            if batch is None:
                with self._mutex:
                    left = deadline - time.monotonic()
                    if self._busy and left > 0:
                        self._mutex.wait(left)
                    elif self._busy:
                        break
                continue
            self.rounds_in_caller += 1
            try:
                self._commit(batch)
            finally:
                if self._round_over(batch):
                    self.call_soon(self._wake_trio)
        if all(op.done for op in ops):
            return True
        self._withdraw(ops)
        return False

    async def one(self, fn: Callable[[lmdb.Transaction], Any], *, ingest: bool = False,
                  linger: float = 0.0, wait_for_space: bool = True) -> Any:
        op = Op(fn, ingest, wait_for_space=wait_for_space)
        await self.run([op], linger=linger)
        return op.value()

    # -- the worker thread ------------------------------------------------------------------

    def _commit(self, batch: list[Op]) -> None:
        try:
            try:
                self._round(batch, full=None)
            except lmdb.Error as exc:
                full = self.full_reason(exc)
                if full is None:
                    raise
                try:
                    self._round(batch, full=full)
                except lmdb.Error as again:
                    if self.full_reason(again) is None:
                        raise
                    for op in batch:
                        op.result, op.error = None, (StoreFull(full) if op.ingest else again)
        except Exception as exc:
            for op in batch:
                op.result, op.error = None, exc
        for op in batch:
            op.done = True

    def _round(self, batch: list[Op], *, full: str | None) -> None:
        """One transaction, one sync. The operations run straight in it; only if one raises
        is the transaction thrown away and the round run again with each operation in a
        nested transaction of its own, so that one rolls back alone. (A nested transaction
        per operation always would cost two more LMDB calls each, and every LMDB call
        releases the GIL and has to win it back from pynetdicom's threads; for the same reason
        counters and audit events are kept in memory for the round, see
        ``Env.begin_round``.) Operations are functions of the transaction, so running one
        twice is harmless. ``full``: the map or disk was found full; ingest is refused with it.
        Raises what LMDB raises when it finds no room (see :func:`full_reason`)."""
        env = self.env
        txn = env.begin(write=True)
        env.begin_round(txn)
        try:
            refusal = None
            if any(op.ingest for op in batch):
                refusal = self.refusal(txn) if full is None else full
            failed = False
            for op in batch:
                op.result, op.error = None, None
                if op.ingest and refusal is not None:
                    op.error = StoreFull(refusal)
                    continue
                try:
                    op.result = op.fn(txn)
                except Exception as exc:
                    if self.full_reason(exc) is not None:
                        raise
                    failed = True
                    break
            if failed:
                env.drop_round()
                txn.abort()
                txn = env.begin(write=True)
                self._isolated(txn, batch, refusal)
            else:
                env.flush_round(txn)
            txn_id = txn.id()
            txn.commit()
            if not failed:
                env.round_committed(txn_id)
        except BaseException:
            env.drop_round()
            txn.abort()  # a no-op on a transaction that already ended
            raise
        self.commits += 1
        self.operations += len(batch)

    def _isolated(self, txn: lmdb.Transaction, batch: list[Op], refusal: str | None) -> None:
        env = self.env
        for op in batch:
            op.result, op.error = None, None
            if op.ingest and refusal is not None:
                op.error = StoreFull(refusal)
                continue
            child = env.begin(write=True, parent=txn)
            try:
                op.result = op.fn(child)
            except Exception as exc:
                child.abort()
                if self.full_reason(exc) is not None:
                    raise
                op.error = exc
            else:
                child.commit()
