"""The group committer: one transaction and one sync for every waiting write, each write
rolled back alone when it fails, ingest refused (and only ingest) when the map is full."""

from __future__ import annotations

import trio

from nodes.arrival import StoreFull
from nodes.store.commit import GroupCommitter, Op
from nodes.store.db import Env


def put(key: bytes, value: bytes, env: Env):
    def op(txn):
        txn.put(key, value, db=env.meta)
        return key
    return op


def fail(txn):
    txn.put(b"half-done", b"x")
    raise ValueError("bug in one operation")


async def test_waiting_writes_share_one_commit_and_fail_alone(tmp_path):
    env = Env(tmp_path, map_size_mb=16)
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
    env = Env(tmp_path, map_size_mb=1)
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


async def test_a_lingering_write_rides_in_the_next_round_someone_else_starts(tmp_path):
    """A lane's claim or outcome lingers (lane_linger_ms) instead of taking the single LMDB
    writer and a sync of its own; an arrival's round takes it along."""
    env = Env(tmp_path, map_size_mb=16)
    committer = GroupCommitter(env, lambda txn: None)
    lane_write = Op(put(b"outcome", b"delivered", env))
    arrival = Op(put(b"object", b"bytes", env), ingest=True)
    with trio.fail_after(20):  # far less than the linger: only the arrival's round can end it
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: committer.run([lane_write], linger=60))
            await trio.sleep(0.05)
            assert not lane_write.done and committer.commits == 0
            nursery.start_soon(committer.run, [arrival])
    assert lane_write.done and arrival.done and committer.commits == 1
    assert committer.operations == 2
    env.close()


async def test_a_lingering_write_commits_alone_when_nothing_else_comes(tmp_path):
    env = Env(tmp_path, map_size_mb=16)
    committer = GroupCommitter(env, lambda txn: None)
    with trio.fail_after(20):
        await committer.one(put(b"outcome", b"delivered", env), linger=0.05)
    assert committer.commits == 1
    with env.begin() as txn:
        assert txn.get(b"outcome", db=env.meta) == b"delivered"
    env.close()
