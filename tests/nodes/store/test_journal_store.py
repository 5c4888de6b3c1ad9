"""The Store with its ingest journal: a listener's arrival is acknowledged once journaled, LMDB
takes it in behind, and what LMDB lacks after a crash is taken in at the next open.

The crash is real: a child Python process acknowledges arrivals while its own commit round
holds LMDB's writer, then ends with ``os._exit`` (no cleanup, no drain)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import trio

from nodes.store import StoreConfig, admin
from nodes.store import journal as jf
from nodes.store.commit import Op
from nodes.store.db import Env
from nodes.store.housekeeping import sweep_spool
from nodes.store.journal import Journal, Record
from support.storenodes import Sink, arrival, envelope, running
from support.synth import CANARY, CANARY_ID, CANARY_PARTS, ct, to_part10

TESTS = Path(__file__).resolve().parents[2]
CONFIG = StoreConfig(min_free_disk_mb=0, spool_threshold_kb=16)
NEEDLES = [p.encode() for p in (*CANARY_PARTS, CANARY_ID)] + [CANARY.encode()]

CRASH = """
import json, os, sys, threading
import trio
from nodes.store import StoreConfig
from nodes.store.commit import Op
from support.storenodes import Sink, arrival, running

data_dir, items_file = sys.argv[1], sys.argv[2]
items = json.loads(open(items_file).read())

async def main():
    config = StoreConfig(min_free_disk_mb=0, spool_threshold_kb=16)
    async with running(data_dir, {"pacs": Sink()}, config) as (feed, store, _):
        parts = store._require()
        entered = threading.Event()

        def held(txn):  # LMDB's single writer, held until the process dies
            entered.set()
            threading.Event().wait(120)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(parts.committer.run, [Op(held)])
            await trio.to_thread.run_sync(entered.wait, 20)
            for uid, hexdata in items.items():
                error = await trio.to_thread.run_sync(
                    parts.ingest.commit_now, arrival(uid, bytes.fromhex(hexdata)), 10.0)
                assert error is None, error
            print("acknowledged", parts.journal.appended, parts.journal.backlog, flush=True)
            os._exit(0)

trio.run(main)
"""


def objects_in_lmdb(data_dir: Path) -> int:
    env = Env.open(data_dir, map_size_mb=CONFIG.map_size_mb, readonly=True)
    try:
        with env.begin() as txn:
            return txn.stat(env.objects)["entries"]
    finally:
        env.close()


def crash_after_acknowledging(tmp_path: Path, data_dir: Path, items: dict[str, bytes]) -> str:
    """Acknowledge ``items`` through the journal in a child process that dies before LMDB
    takes any in; returns its output line."""
    items_file = tmp_path / "items.json"
    items_file.write_text(json.dumps({uid: data.hex() for uid, data in items.items()}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get(
        "PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", CRASH, str(data_dir), str(items_file)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def study() -> dict[str, bytes]:
    objects = [ct(), ct(), ct(rows=128, cols=128), ct()]  # the third (32 KB) is spooled
    return {str(ds.SOPInstanceUID): to_part10(ds) for ds in objects}


async def test_acknowledged_before_lmdb_takes_it_in_and_delivered_after(tmp_path):
    sink = Sink()
    async with running(tmp_path, {"pacs": sink}, CONFIG) as (feed, store, _):
        parts = store._require()
        entered, release = threading.Event(), threading.Event()

        def held(txn):
            entered.set()
            release.wait(30)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(parts.committer.run, [Op(held)])
                await trio.to_thread.run_sync(entered.wait, 20)
                error = await trio.to_thread.run_sync(
                    parts.ingest.commit_now, arrival("1.2.7.1", b"DICM" * 100), 10.0)
                assert error is None  # acknowledged while LMDB's writer is held
                assert parts.journal.backlog == 1
                assert admin.report(store)["store"]["objects"] == 0
                release.set()
            await sink.wait_for(lambda: sink.delivered == ["1.2.7.1"])
        assert parts.journal.backlog == 0
        assert admin.report(store)["store"]["objects"] == 1


async def test_what_lmdb_lacks_after_a_crash_is_taken_in_at_the_next_open(tmp_path):
    data_dir = tmp_path / "data"
    items = study()
    out = crash_after_acknowledging(tmp_path, data_dir, items)
    assert out == f"acknowledged {len(items)} {len(items)}"
    assert objects_in_lmdb(data_dir) == 0  # every one acknowledged, none in LMDB
    journal_file = data_dir / "journal" / "ingest-0.journal"
    assert [s for s, _ in jf.pending(journal_file, 0)] == [1, 2, 3, 4]
    (spooled,) = (data_dir / "spool").iterdir()
    # The journal holds nothing in plaintext that LMDB would not (the blobs are sealed).
    for path in (p for p in data_dir.rglob("*") if p.is_file()):
        raw = path.read_bytes()
        for needle in NEEDLES:
            assert needle not in raw, f"{needle!r} in plaintext in {path.name}"

    sink = Sink()
    async with running(data_dir, {"pacs": sink}, CONFIG) as (feed, store, _):
        await sink.wait_for(lambda: len(sink.delivered) == len(items))
        traces = {uid: admin.trace(store, uid) for uid in items}
    assert sorted(sink.delivered) == sorted(items)
    import hashlib
    assert {uid: digest for uid, digest, _ in sink.seen} == {
        uid: hashlib.sha256(data).hexdigest() for uid, data in items.items()}
    for uid, doc in traces.items():
        assert [e["event"] for e in doc["events"]].count("arrival") == 1, uid
    assert [p.name for p in (data_dir / "spool").iterdir()] in ([spooled.name], [])
    # Taken in once: the journal starts over, a third open takes in nothing again.
    assert jf.pending(journal_file, 0) == []
    sink = Sink()
    async with running(data_dir, {"pacs": sink}, CONFIG) as (feed, store, _):
        await trio.sleep(0.3)
        assert all(admin.trace(store, uid)["events"][0]["event"] == "arrival" for uid in items)
    assert sink.seen == []


async def test_a_journal_no_process_holds_is_taken_in_one_that_is_held_is_left(tmp_path):
    data_dir = tmp_path / "data"
    items = study()
    crash_after_acknowledging(tmp_path, data_dir, items)
    directory = data_dir / "journal"
    # As if written by replica 1 of an earlier configuration (workers = 2).
    (directory / "ingest-0.journal").rename(directory / "ingest-1.journal")
    held = Journal(directory / "ingest-2.journal", 64 << 20)  # a live process's
    held.resume(0)
    held.reset(0)
    held.append(Record(envelope("1.2.8.1"), "ab" * 32, 4, b"seal", "", "k", 1.0), 1.0)
    sink = Sink()
    async with running(data_dir, {"pacs": sink}, CONFIG) as (feed, store, _):
        await sink.wait_for(lambda: len(sink.delivered) == len(items))
    assert jf.pending(directory / "ingest-1.journal", 0) == []
    assert [s for s, _ in jf.pending(directory / "ingest-2.journal", 0)] == [1]
    held.close()


async def test_with_no_journal_configured_orphans_are_still_taken_in(tmp_path):
    data_dir = tmp_path / "data"
    items = study()
    crash_after_acknowledging(tmp_path, data_dir, items)
    sink = Sink()
    config = StoreConfig(min_free_disk_mb=0, spool_threshold_kb=16, journal_mb=0)
    async with running(data_dir, {"pacs": sink}, config) as (feed, store, _):
        assert store._require().journal is None
        await sink.wait_for(lambda: len(sink.delivered) == len(items))
        # Without a journal the listener's thread commits in LMDB before it answers.
        assert await trio.to_thread.run_sync(
            store._require().ingest.commit_now, arrival("1.2.7.2", b"DICM"), 10.0) is None
        assert admin.report(store)["store"]["objects"] == len(items) + 1


async def test_stopping_takes_every_acknowledged_arrival_into_lmdb(tmp_path):
    data_dir = tmp_path / "data"
    async with running(data_dir, {}, CONFIG) as (feed, store, _):
        parts = store._require()
        for i in range(50):
            assert await trio.to_thread.run_sync(
                parts.ingest.commit_now, arrival(f"1.2.6.{i}", b"DICM" * (i + 1)), 10.0) is None
    assert objects_in_lmdb(data_dir) == 50
    env = Env.open(data_dir, map_size_mb=CONFIG.map_size_mb, readonly=True)
    with env.begin() as txn:
        assert jf.applied(env, txn, "ingest-0.journal") == 50
    env.close()


async def test_a_full_store_refuses_before_the_journal_and_leaves_no_spool_file(tmp_path):
    config = StoreConfig(min_free_disk_mb=10**9, spool_threshold_kb=1)  # the disk is "full"
    async with running(tmp_path, {}, config) as (feed, store, _):
        parts = store._require()
        for data in (b"DICM" * 10, b"DICM" * 1000):  # small, and spooled
            error = await trio.to_thread.run_sync(
                parts.ingest.commit_now, arrival("1.2.5.1", data), 10.0)
            assert type(error).__name__ == "StoreFull", error
        assert parts.journal.appended == 0
    assert list((tmp_path / "spool").iterdir()) == []


def test_the_orphan_sweep_keeps_spool_files_a_journal_still_needs(tmp_path):
    data_dir = tmp_path / "data"
    spool = data_dir / "spool"
    spool.mkdir(parents=True)
    env = Env.open(data_dir, map_size_mb=64)
    journal = Journal(data_dir / "journal" / "ingest-0.journal", 64 << 20)
    journal.resume(0)
    journal.reset(0)
    journal.append(Record(envelope("1.2.4.1"), "cd" * 32, 9, None, "needed.spool", "k", 1.0),
                   1.0)
    for name in ("needed.spool", "orphan.spool"):
        (spool / name).write_bytes(b"x")
        os.utime(spool / name, (1_000_000, 1_000_000))
    try:
        assert sweep_spool(env, spool) == 1
        assert [p.name for p in spool.iterdir()] == ["needed.spool"]
    finally:
        journal.close()
        env.close()
