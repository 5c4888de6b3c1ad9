"""The group committer: one transaction and one sync for every waiting write, each write
rolled back alone when it fails, ingest refused (and only ingest) when the map is full."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import trio

from nodes.arrival import StoreFull
from nodes.store.commit import GroupCommitter, Op
from nodes.store.db import Env


SRC = str(Path(__file__).resolve().parents[3] / "src")


def put(key: bytes, value: bytes, env: Env):
    def op(txn):
        txn.put(key, value, db=env.meta)
        return key
    return op


def fail(txn):
    txn.put(b"half-done", b"x")
    raise ValueError("bug in one operation")


async def test_waiting_writes_share_one_commit_and_fail_alone(tmp_path):
    env = Env.open(tmp_path, map_size_mb=16)
    committer = GroupCommitter(env, lambda txn: None)
    ops = [Op(put(b"a", b"1", env)), Op(fail), Op(put(b"b", b"2", env), ingest=True)]
    others = [Op(put(b"k%d" % i, b"v", env)) for i in range(20)]
    async with trio.open_nursery() as nursery:  # 23 callers at once
        for op in [*ops, *others]:
            nursery.start_soon(committer.run, [op])
    # The first caller commits at once, alone; everyone who came meanwhile shares the next.
    assert committer.commits == 2 and committer.operations == 23
    assert [op.result for op in ops] == [b"a", None, b"b"]
    assert isinstance(ops[1].error, ValueError)
    with env.begin() as txn:
        assert txn.get(b"a", db=env.meta) == b"1" and txn.get(b"b", db=env.meta) == b"2"
        assert txn.get(b"half-done") is None
    env.close()


async def test_map_full_refuses_ingest_but_commits_the_rest(tmp_path):
    env = Env.open(tmp_path, map_size_mb=1)
    committer = GroupCommitter(env, lambda txn: None)
    big = Op(put(b"big", b"x" * (2 << 20), env), ingest=True)  # larger than the map
    small = Op(put(b"outcome", b"delivered", env))
    await committer.run([big, small])
    assert isinstance(big.error, StoreFull) and small.error is None
    refused = Op(put(b"c", b"3", env), ingest=True)
    committer.refusal = lambda txn: "map 90% used, above the high-water mark 85%"
    await committer.run([refused])
    assert isinstance(refused.error, StoreFull) and "high-water" in str(refused.error)
    with env.begin() as txn:
        assert txn.get(b"outcome", db=env.meta) == b"delivered" and txn.get(b"c") is None
    env.close()


async def test_a_lane_write_that_does_not_fit_waits_for_space_instead_of_failing(tmp_path):
    """An outcome (not an arrival) that finds the map full is not failed back to its lane,
    which would crash it until it is marked failed: it waits and commits once space
    returns. A write that must not wait (a claim under a shield) gets LMDB's error."""
    import lmdb

    env = Env.open(tmp_path, map_size_mb=1)
    committer = GroupCommitter(env, lambda txn: None)

    def values(prefix: bytes, count: int = 80):
        def op(txn):
            for i in range(count):
                txn.put(prefix + b"%d" % i, b"x" * 6000, db=env.meta)
        return op

    def purge(txn):
        for i in range(100):
            txn.delete(b"filler%d" % i, db=env.meta)

    await committer.one(values(b"filler", 100))
    outcome = Op(values(b"outcome"))
    claim = Op(values(b"claim"), wait_for_space=False)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(committer.run, [outcome])
            await committer.run([claim])
            assert isinstance(claim.error, lmdb.MapFullError)
            assert not outcome.done or outcome.error is not None  # still waiting
            await committer.one(purge)  # space returns
            # LMDB reuses pages freed by a transaction from the next-but-one on.
            await committer.one(put(b"another", b"write", env))
    assert outcome.done and outcome.error is None
    with env.begin() as txn:
        assert txn.get(b"outcome79", db=env.meta) == b"x" * 6000
    env.close()


async def test_a_lingering_write_rides_in_the_next_round_someone_else_starts(tmp_path):
    """A lane's claim or outcome lingers (lane_linger_ms) instead of taking the single LMDB
    writer and a sync of its own; an arrival's round takes it along."""
    env = Env.open(tmp_path, map_size_mb=16)
    committer = GroupCommitter(env, lambda txn: None)
    await committer.run([Op(put(b"first", b"bytes", env), ingest=True)])  # arrivals coming
    lane_write = Op(put(b"outcome", b"delivered", env))
    arrival = Op(put(b"object", b"bytes", env), ingest=True)
    with trio.fail_after(20):  # far less than the linger: only the arrival's round can end it
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: committer.run([lane_write], linger=60))
            await trio.sleep(0.05)
            assert not lane_write.done and committer.commits == 1
            nursery.start_soon(committer.run, [arrival])
    assert lane_write.done and arrival.done and committer.commits == 2
    assert committer.operations == 3
    env.close()


async def test_a_lane_write_does_not_linger_when_no_arrivals_are_coming(tmp_path):
    """After a burst, a lane works off its queue: no arrival round will come to ride in, so
    its writes commit at once instead of waiting out the linger each time."""
    env = Env.open(tmp_path, map_size_mb=16)
    committer = GroupCommitter(env, lambda txn: None)
    with trio.fail_after(20):  # never arrived: a 60 s linger would trip this
        await committer.one(put(b"outcome", b"delivered", env), linger=60)
    await committer.run([Op(put(b"object", b"bytes", env), ingest=True)])
    with trio.fail_after(20), trio.move_on_after(0.2) as waited:  # arrivals now coming
        await committer.one(put(b"claim", b"taken", env), linger=60)
    assert waited.cancelled_caught  # it lingers again
    env.close()


async def test_a_lingering_write_commits_alone_when_nothing_else_comes(tmp_path):
    env = Env.open(tmp_path, map_size_mb=16)
    committer = GroupCommitter(env, lambda txn: None)
    with trio.fail_after(20):
        await committer.one(put(b"outcome", b"delivered", env), linger=0.05)
    assert committer.commits == 1
    with env.begin() as txn:
        assert txn.get(b"outcome", db=env.meta) == b"delivered"
    env.close()


async def test_counters_of_a_round_commit_together_and_roll_back_with_their_op(tmp_path):
    """Counters are kept in memory during a round (one LMDB call for all of them at the
    end); a failing operation's counter changes still vanish with it."""
    env = Env.open(tmp_path, map_size_mb=16)
    committer = GroupCommitter(env, lambda txn: None)

    def bump(name: str, delta: int):
        return lambda txn: env.add(txn, name, delta)

    def bump_then_fail(txn):
        env.add(txn, "a", 100)
        raise ValueError("bug after counting")

    ops = [Op(bump("a", 1)), Op(bump("a", 2)), Op(bump("b", 5))]
    await committer.run(ops)
    assert [op.result for op in ops] == [1, 3, 5]
    with env.begin() as txn:
        assert (env.counter(txn, "a"), env.counter(txn, "b")) == (3, 5)
    ops = [Op(bump("a", 1)), Op(bump_then_fail), Op(bump("b", 1))]
    await committer.run(ops)
    assert ops[0].result == 4 and isinstance(ops[1].error, ValueError) and ops[2].result == 6
    with env.begin() as txn:
        assert (env.counter(txn, "a"), env.counter(txn, "b")) == (4, 6)
    assert committer.commits == 2
    env.close()


async def test_counters_kept_between_rounds_are_dropped_when_another_writer_committed(tmp_path):
    """The next round reuses the counters it committed only if no other write transaction
    (the CLI's replay in another process, say) committed in between."""
    env = Env.open(tmp_path, map_size_mb=16)
    committer = GroupCommitter(env, lambda txn: None)
    assert await committer.one(lambda txn: env.add(txn, "queued", 1)) == 1
    assert await committer.one(lambda txn: env.add(txn, "queued", 1)) == 2  # from memory
    another_process = ("import sys; from nodes.store.db import Env\n"
                       "env = Env.open(sys.argv[1], map_size_mb=16)\n"
                       "with env.begin(write=True) as txn: env.add(txn, 'queued', 10)\n")
    done = subprocess.run([sys.executable, "-c", another_process, str(tmp_path)],
                          env={**os.environ, "PYTHONPATH": SRC}, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert await committer.one(lambda txn: env.add(txn, "queued", 1)) == 13
    with env.begin(write=True) as txn:  # this process, outside the committer
        env.add(txn, "queued", 100)
    assert await committer.one(lambda txn: env.add(txn, "queued", 1)) == 114
    with env.begin() as txn:
        assert env.counter(txn, "queued") == 114
    env.close()


async def test_audit_events_of_a_round_are_written_with_it_and_not_for_a_failed_op(tmp_path):
    from nodes.store import audit

    env = Env.open(tmp_path, map_size_mb=16)
    committer = GroupCommitter(env, lambda txn: None)

    def event(uid: str, name: str):
        return lambda txn: audit.record(env, txn, uid, name)

    def event_then_fail(txn):
        audit.record(env, txn, "1.2.3", "never")
        raise ValueError("bug after auditing")

    ops = [Op(event("1.2.3", "arrival")), Op(event("1.2.4", "arrival")),
           Op(event("1.2.3", "attempt"))]
    await committer.run(ops)
    await committer.run([Op(event_then_fail), Op(event("1.2.3", "finished"))])
    with env.begin() as txn:
        assert [e.event for e in audit.trail(env, txn, "1.2.3")] == [
            "arrival", "attempt", "finished"]
        assert [e.event for e in audit.trail(env, txn, "1.2.4")] == ["arrival"]
    env.close()


def slow_put(key: bytes, env: Env, entered: threading.Event, release: threading.Event):
    def op(txn):
        entered.set()
        release.wait(20)
        txn.put(key, b"v", db=env.meta)
        return key
    return op


async def test_threads_commit_in_rounds_one_of_them_leads_shared_with_trio_callers(tmp_path):
    """commit_blocking (a listener's thread): the caller leads a round itself when none runs;
    callers that come meanwhile, in threads or in Trio, share the next round."""
    env = Env.open(tmp_path, map_size_mb=16)
    committer = GroupCommitter(env, lambda txn: None)
    entered, release = threading.Event(), threading.Event()
    first = Op(slow_put(b"first", env, entered, release), ingest=True)
    threaded = [Op(put(b"t%d" % i, b"v", env), ingest=True) for i in range(6)]
    trio_op = Op(put(b"outcome", b"delivered", env))
    def commit(ops) -> bool:
        return committer.commit_blocking(ops, 20)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, commit, [first])
            await trio.to_thread.run_sync(entered.wait, 20)  # the first round runs, held
            for op in threaded:
                nursery.start_soon(trio.to_thread.run_sync, commit, [op])
            nursery.start_soon(committer.run, [trio_op])
            while len(committer._pending) < 7:  # every caller waits for the next round
                await trio.sleep(0.01)
            release.set()
    assert all(op.done and op.error is None for op in [first, *threaded, trio_op])
    # One round for the first, one for all who waited (led by whichever waiter, thread or
    # Trio, took the round first; the others' writes rode in it).
    assert committer.commits == 2 and committer.rounds_in_caller in (1, 2)
    assert committer.operations == 8
    with env.begin() as txn:
        assert all(txn.get(k, db=env.meta) for k in [b"first", b"outcome"] +
                   [b"t%d" % i for i in range(6)])
    env.close()


async def test_a_thread_waits_for_a_trio_round_and_withdraws_when_its_time_is_up(tmp_path):
    env = Env.open(tmp_path, map_size_mb=16)
    committer = GroupCommitter(env, lambda txn: None)
    entered, release = threading.Event(), threading.Event()
    held = Op(slow_put(b"held", env, entered, release))
    late = Op(put(b"late", b"v", env), ingest=True)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(committer.run, [held])  # a Trio round, in a worker thread
            await trio.to_thread.run_sync(entered.wait, 20)
            # The round outlives the thread's commit timeout: it gives up, and its write is
            # withdrawn (never committed later: the listener answered "not now").
            assert await trio.to_thread.run_sync(committer.commit_blocking, [late], 0.2) is False
            release.set()
    assert held.done and not late.done and committer.commits == 1
    assert committer._pending == [] and committer.rounds_in_caller == 0
    await committer.run([Op(put(b"after", b"v", env))])
    with env.begin() as txn:
        assert txn.get(b"late", db=env.meta) is None and txn.get(b"after", db=env.meta)
    env.close()


async def test_a_full_store_refuses_a_threads_arrival_and_it_is_not_tried_again(tmp_path):
    env = Env.open(tmp_path, map_size_mb=1)
    committer = GroupCommitter(env, lambda txn: None)
    big = Op(put(b"big", b"x" * (2 << 20), env), ingest=True)  # larger than the map
    assert await trio.to_thread.run_sync(committer.commit_blocking, [big], 20)
    assert isinstance(big.error, StoreFull)
    env.close()


async def test_a_lingering_trio_write_rides_in_a_round_a_thread_leads_and_wakes(tmp_path):
    """A lane's lingering write (Trio) taken by a round a listener's thread leads: the
    thread's round ends it, long before its linger would have."""
    env = Env.open(tmp_path, map_size_mb=16)
    committer = GroupCommitter(env, lambda txn: None)
    arrival = Op(put(b"first", b"bytes", env), ingest=True)
    assert await trio.to_thread.run_sync(committer.commit_blocking, [arrival], 20)
    lane_write = Op(put(b"outcome", b"delivered", env))
    with trio.fail_after(20):  # far less than the linger
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: committer.run([lane_write], linger=60))
            await trio.sleep(0.05)  # it lingers: arrivals came a moment ago
            assert not lane_write.done and committer.commits == 1
            second = Op(put(b"second", b"bytes", env), ingest=True)
            assert await trio.to_thread.run_sync(committer.commit_blocking, [second], 20)
    assert lane_write.done and committer.commits == 2 == committer.rounds_in_caller
    env.close()


async def test_lingering_writes_share_one_window_which_outlives_its_keepers_cancellation(
        tmp_path):
    """In a lanes-only process every lane write lingers: writes that linger together share
    one window (one round at its end); the caller that keeps the window's time may be
    cancelled (its lane stopping) and the others still go on at the window's end."""
    env = Env.open(tmp_path, map_size_mb=16)
    committer = GroupCommitter(env, lambda txn: None, always_linger=True)
    keeper_op = Op(put(b"keeper", b"v", env))
    riders = [Op(put(b"r%d" % i, b"v", env)) for i in range(8)]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            keeper = trio.CancelScope()

            async def keep():
                with keeper:
                    await committer.run([keeper_op], linger=0.3)

            nursery.start_soon(keep)
            await trio.sleep(0.01)
            assert committer._window is not None and committer._window.kept
            for op in riders:
                nursery.start_soon(lambda op=op: committer.run([op], linger=0.3))
            await trio.sleep(0.05)
            keeper.cancel()  # a rider keeps the window's time from now on
    assert not keeper_op.done and all(op.done and op.error is None for op in riders)
    assert committer.commits == 1 and committer.operations == len(riders)
    env.close()
