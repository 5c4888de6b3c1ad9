"""The Store's ingest contract: commit-before-ack, group commit, idempotency, study index,
re-queue on start."""

from __future__ import annotations

import hashlib
import os

import pytest
import trio

from flow import ConfigError
from flow._config import convert
from nodes.arrival import StoreFailed
from nodes.payload import FilePayload
from nodes.store import StoreConfig, admin
from support.storenodes import Sink, arrival, read_payload, running


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_round_trip_delivers_the_stored_bytes(tmp_path):
    sink = Sink()
    async with running(tmp_path, {"pacs": sink}) as (feed, store, _):
        a = arrival("1.2.1", b"DICM" * 100)
        await feed.put(a)
        await a.receipt.wait()
        await sink.wait_for(lambda: sink.delivered == ["1.2.1"])
    assert sink.seen == [("1.2.1", sha(b"DICM" * 100), 1)]


async def test_producer_is_released_only_after_the_commit(tmp_path):
    """While another writer holds LMDB's write lock, the Store cannot commit: the receipt
    stays unanswered; once the lock is released, the receipt is answered and the object is
    in the database."""
    async with running(tmp_path, {}) as (feed, store, _):
        env = store.env.env
        locked, release = trio.Event(), trio.Event()
        token = trio.lowlevel.current_trio_token()

        def hold_write_lock():
            txn = env.begin(write=True)  # the same lock another process would take
            trio.from_thread.run_sync(locked.set, trio_token=token)
            trio.from_thread.run(release.wait, trio_token=token)
            txn.abort()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, hold_write_lock)
            await locked.wait()
            a = arrival("1.2.2", b"x" * 1000)
            await feed.put(a)
            await trio.sleep(0.3)
            assert not a.receipt.done
            commits = store.stats["commits"]
            release.set()
            await a.receipt.wait()
        assert store.stats["commits"] == commits + 1
        with env.begin(db=store.env.objects) as txn:
            assert txn.get(b"1.2.2") is not None


async def test_concurrent_arrivals_share_commits(tmp_path):
    n = 64
    async with running(tmp_path, {}) as (feed, store, _):
        items = [arrival(f"1.2.3.{i}", bytes([i]) * 2000) for i in range(n)]

        async def produce(a):
            await feed.put(a)
            await a.receipt.wait()

        async with trio.open_nursery() as nursery:
            for a in items:
                nursery.start_soon(produce, a)
        commits = store.stats["commits"]
    assert all(a.receipt.done and a.receipt.error is None for a in items)
    assert 1 <= commits <= n // 8, f"{commits} sync commits for {n} arrivals"


async def test_identical_restore_is_acknowledged_and_not_resent(tmp_path):
    sink = Sink()
    async with running(tmp_path, {"pacs": sink}) as (feed, store, _):
        first, again = arrival("1.2.4", b"same" * 50), arrival("1.2.4", b"same" * 50)
        await feed.put(first)
        await first.receipt.wait()
        await sink.wait_for(lambda: sink.delivered == ["1.2.4"])
        await feed.put(again)
        await again.receipt.wait()
        assert again.receipt.duplicate and not first.receipt.duplicate
        # A later object goes through the same lane: had the duplicate been queued, it
        # would have arrived first.
        after = arrival("1.2.5", b"next")
        await feed.put(after)
        await sink.wait_for(lambda: "1.2.5" in sink.delivered)
    assert sink.delivered == ["1.2.4", "1.2.5"]


async def test_changed_restore_replaces_and_is_sent_again_to_every_lane(tmp_path):
    pacs, archive = Sink(), Sink()
    async with running(tmp_path, {"pacs": pacs, "archive": archive}) as (feed, store, _):
        v1, v2 = arrival("1.2.6", b"version one"), arrival("1.2.6", b"version two")
        await feed.put(v1)
        await pacs.wait_for(lambda: len(pacs.delivered) == 1)
        await archive.wait_for(lambda: len(archive.delivered) == 1)
        await feed.put(v2)
        await v2.receipt.wait()
        assert not v2.receipt.duplicate
        await pacs.wait_for(lambda: len(pacs.delivered) == 2)
        await archive.wait_for(lambda: len(archive.delivered) == 2)
        members = await store.study_members("1.2.3.4")
    for sink in (pacs, archive):
        assert [h for _, h, _ in sink.seen] == [sha(b"version one"), sha(b"version two")]
    assert [(e.sop_instance_uid, read_payload(p)[1]) for e, p in members] == [
        ("1.2.6", sha(b"version two"))]


async def test_study_members_lists_small_and_spooled_instances(tmp_path):
    big = tmp_path / "big.dcm"
    big.write_bytes(b"B" * 300_000)
    config = StoreConfig(min_free_disk_mb=0, spool_threshold_kb=64)
    async with running(tmp_path / "data", {}, config) as (feed, store, _):
        items = [arrival("1.2.7.1", b"small", study="9.9"), arrival("1.2.7.2", FilePayload(big),
                                                                  study="9.9"),
                 arrival("1.2.7.3", b"other study", study="9.8")]
        for a in items:
            await feed.put(a)
        for a in items:
            await a.receipt.wait()
        members = await store.study_members("9.9")
    got = sorted((e.sop_instance_uid, p.size, read_payload(p)[1]) for e, p in members)
    assert got == [("1.2.7.1", 5, sha(b"small")), ("1.2.7.2", 300_000, sha(b"B" * 300_000))]
    assert len(list((tmp_path / "data" / "spool").iterdir())) == 1


async def test_in_flight_items_are_requeued_when_the_store_opens_again(tmp_path):
    stuck = Sink(gate=trio.Event())  # takes deliveries and never settles them
    async with running(tmp_path, {"pacs": stuck}) as (feed, store, runner):
        for i in range(3):
            a = arrival(f"1.2.8.{i}", b"y" * 10)
            await feed.put(a)
            await a.receipt.wait()
        with trio.fail_after(10):
            while store.report()["lanes"]["pacs"]["in_flight"] < 3:
                await trio.sleep(0.02)
        runner.abort()
    sink = Sink()
    async with running(tmp_path, {"pacs": sink}) as (feed, store, _):
        await sink.wait_for(lambda: len(sink.delivered) == 3)
        report = store.report()["lanes"]["pacs"]
    assert sorted(sink.delivered) == ["1.2.8.0", "1.2.8.1", "1.2.8.2"]
    assert report["queued"] == report["in_flight"] == 0 and report["delivered"] == 3


def test_config_rejects_nonsense_and_names_the_key():
    with pytest.raises(ConfigError, match="store.high_water"):
        convert({"high_water": 1.5}, StoreConfig, source="site.toml", prefix="store")
    with pytest.raises(ConfigError, match="unknown key store.map_size"):
        convert({"map_size": 1}, StoreConfig, source="site.toml", prefix="store")
    with pytest.raises(ConfigError, match="store.lane_linger_ms"):
        convert({"lane_linger_ms": -1}, StoreConfig, source="site.toml", prefix="store")
    assert convert({"lane_linger_ms": 0}, StoreConfig, source="site.toml",
                   prefix="store").lane_linger_ms == 0
    assert StoreConfig().spool_threshold_kb > 0 and StoreConfig().retention_s > 0
    with pytest.raises(ConfigError, match="store.journal_mb"):
        convert({"journal_mb": -1}, StoreConfig, source="site.toml", prefix="store")
    assert StoreConfig().journal_mb == 64
    assert convert({"journal_mb": 0}, StoreConfig, source="site.toml",
                   prefix="store").journal_mb == 0


async def test_open_removes_old_orphan_spool_files_only(tmp_path):
    big = tmp_path / "big.dcm"
    big.write_bytes(b"S" * 100_000)
    config = StoreConfig(min_free_disk_mb=0, spool_threshold_kb=10)
    data = tmp_path / "data"
    async with running(data, {}, config) as (feed, store, _):
        a = arrival("1.2.9.1", FilePayload(big))
        await feed.put(a)
        await a.receipt.wait()
    spool = data / "spool"
    (kept,) = spool.iterdir()
    old_orphan, young_orphan = spool / "dead.spool", spool / ".tmp-being-written.spool.tmp"
    old_orphan.write_bytes(b"x")
    young_orphan.write_bytes(b"y")
    os.utime(old_orphan, (1_000_000, 1_000_000))
    os.utime(kept, (1_000_000, 1_000_000))  # old, but an object refers to it
    async with running(data, {}, config) as (feed, store, _):
        members = await store.study_members("1.2.3.4")
    assert sorted(p.name for p in spool.iterdir()) == sorted([kept.name, young_orphan.name])
    assert read_payload(members[0][1]) == (100_000, sha(b"S" * 100_000))


class Unreadable:
    size = 10

    def open(self):
        raise ValueError("cannot decode this payload")


async def test_an_unreadable_payload_fails_its_own_arrival_only(tmp_path):
    async with running(tmp_path, {}) as (feed, store, runner):
        bad, good = arrival("1.2.10.1", Unreadable()), arrival("1.2.10.2", b"fine")
        await feed.put(bad)
        await feed.put(good)
        await good.receipt.wait()
        with pytest.raises(StoreFailed, match="ValueError"):
            await bad.receipt.wait()
        assert runner.health["store"].restarts == 0


async def test_a_large_arrival_past_its_commit_timeout_leaves_no_spool_file(tmp_path):
    """A listener's thread committing itself (Ingest.commit_now) gives up after its commit
    timeout while another write holds the round: its arrival is withdrawn, answered "not
    now", and the spool file it had written is removed at once (nothing refers to it)."""
    import threading

    from nodes.store.commit import Op

    # Without the journal (journal_mb 0): the arrival waits for its LMDB round.
    config = StoreConfig(min_free_disk_mb=0, spool_threshold_kb=1, journal_mb=0)
    async with running(tmp_path, {}, config) as (feed, store, _):
        parts = store._require()
        entered, release = threading.Event(), threading.Event()

        def held(txn):
            entered.set()
            release.wait(20)

        big = arrival("1.2.9", b"DICM" * 1024)  # 4 KiB: spooled
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(parts.committer.run, [Op(held)])
                await trio.to_thread.run_sync(entered.wait, 20)
                error = await trio.to_thread.run_sync(parts.ingest.commit_now, big, 0.2)
                release.set()
        assert isinstance(error, trio.TooSlowError)
        assert list(store.spool_dir.iterdir()) == []
        assert admin.report(store)["store"]["objects"] == 0
        # Once the round is free, the same arrival commits in the caller's thread.
        assert await trio.to_thread.run_sync(parts.ingest.commit_now, big, 20) is None
        assert len(list(store.spool_dir.iterdir())) == 1
