"""Group commit: every write that waits at the same time shares one LMDB transaction and
one sync.

Arrivals, claims of a lane's pump and outcomes all go through one :class:`GroupCommitter`.
The first caller that finds no commit running becomes the *leader*: it takes every waiting
operation and commits them together in a worker thread (``trio.to_thread.run_sync``); callers
that come meanwhile wait for the next round. Throughput therefore grows with concurrency
while a lone caller still commits at once.

Each operation runs in a nested transaction, so one that raises is rolled back alone and
gets its exception; the others commit. When the map is full (``lmdb.MapFullError``), the
round is retried without the *ingest* operations, which are refused with
:class:`~nodes.arrival.StoreFull`: outcomes and purges still commit, so space can return.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import lmdb
import trio

from flow import Histogram

from ..arrival import StoreFull
from .db import Env

ROUND_BOUNDS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

Refusal = Callable[[lmdb.Transaction], "str | None"]


@dataclass(eq=False)
class Op:
    """One write: ``fn(txn)`` runs inside the round's transaction.

    ``ingest`` operations (new arrivals) are refused while the Store is full.
    """

    fn: Callable[[lmdb.Transaction], Any]
    ingest: bool = False
    result: Any = None
    error: BaseException | None = None
    done: bool = False

    def value(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


class GroupCommitter:
    """Commits :class:`Op` s in shared sync transactions. Trio-side; not thread-safe.

    ``refusal(txn)`` returns a routing-safe reason to refuse ingest now (map above its
    high-water mark, disk low) or None. ``commits`` counts sync commits (one LMDB sync each).
    """

    def __init__(self, env: Env, refusal: Refusal) -> None:
        self.env = env
        self.refusal = refusal
        self.commits = 0
        self.operations = 0
        # For /metrics: how long a round takes (thread hop included) and how many writes
        # share it; in this process's memory, like the round itself.
        self.round_seconds = Histogram(ROUND_BOUNDS_S)
        self.batch_sizes = Histogram(BATCH_BOUNDS)
        self._pending: list[Op] = []
        self._busy = False
        self._idle = trio.Event()
        self._last_ingest = float("-inf")  # when a round with arrivals last started (Trio clock)

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
        self._pending.extend(ops)
        try:
            if linger > 0 and trio.current_time() - self._last_ingest <= 2 * linger:
                with trio.move_on_after(linger):
                    while not all(op.done for op in ops):
                        await self._idle.wait()
            while not all(op.done for op in ops):
                if self._busy:
                    await self._idle.wait()
                    continue
                batch, self._pending = self._pending, []
                self._busy = True
                if any(op.ingest for op in batch):
                    self._last_ingest = trio.current_time()
                started = trio.current_time()
                try:
                    await trio.to_thread.run_sync(self._commit, batch)
                finally:
                    self.round_seconds.observe(trio.current_time() - started)
                    self.batch_sizes.observe(len(batch))
                    self._busy = False
                    self._idle.set()
                    self._idle = trio.Event()
        except BaseException:
            withdrawn = {id(op) for op in ops}
            self._pending = [op for op in self._pending if id(op) not in withdrawn]
            raise

    async def one(self, fn: Callable[[lmdb.Transaction], Any], *, ingest: bool = False,
                  linger: float = 0.0) -> Any:
        op = Op(fn, ingest)
        await self.run([op], linger=linger)
        return op.value()

    # -- the worker thread ------------------------------------------------------------------

    def _commit(self, batch: list[Op]) -> None:
        try:
            self._round(batch, allow_ingest=True)
        except lmdb.MapFullError:
            try:
                self._round(batch, allow_ingest=False)
            except lmdb.MapFullError as exc:
                for op in batch:
                    op.result, op.error = None, (StoreFull("map full") if op.ingest else exc)
        except Exception as exc:
            for op in batch:
                op.result, op.error = None, exc
        for op in batch:
            op.done = True

    def _round(self, batch: list[Op], *, allow_ingest: bool) -> None:
        """One transaction, one sync. The operations run straight in it; only if one raises
        is the transaction thrown away and the round run again with each operation in a
        nested transaction of its own, so that one rolls back alone. (A nested transaction
        per operation always would cost two more LMDB calls each, and every LMDB call
        releases the GIL and has to win it back from pynetdicom's threads; for the same reason
        counters and audit events are kept in memory for the round, see
        ``Env.begin_round``.) Operations are functions of the transaction, so running one
        twice is harmless."""
        env = self.env
        txn = env.begin(write=True)
        env.begin_round(txn)
        try:
            refusal = None
            if any(op.ingest for op in batch):
                refusal = self.refusal(txn) if allow_ingest else "map full"
            failed = False
            for op in batch:
                op.result, op.error = None, None
                if op.ingest and refusal is not None:
                    op.error = StoreFull(refusal)
                    continue
                try:
                    op.result = op.fn(txn)
                except lmdb.MapFullError:
                    raise
                except Exception:
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
            except lmdb.MapFullError:
                child.abort()
                raise
            except Exception as exc:
                child.abort()
                op.error = exc
            else:
                child.commit()
