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
