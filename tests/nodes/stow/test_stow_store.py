"""The STOW lane behind the real Store, into a real Orthanc (issue 6):
``feeder >> Store >> {"archive": StowSender}``, arrivals committed in LMDB (encrypted), the
lane's pump feeding the sender, outcomes committed back."""

from __future__ import annotations

import os
import sys

import pytest
import trio

from nodes.payload import FilePayload
from nodes.store import StoreConfig
from nodes.stow import StowConfig, StowSender
from support.orthanc import OrthancServer
from support.synth import ct, dataset_bytes_after_meta, mixed_study_part10, to_part10

sys.path.insert(0, os.path.dirname(__file__))
from stow_harness import (arrivals, commit_stats, envelope_of, preload,  # noqa: E402
                          store_graph, wait_for_lane)

pytestmark = pytest.mark.peer("orthanc")

STUDY = "1.2.826.0.1.3680043.2.1143.6.2"


def mixed_study() -> list[bytes]:
    return mixed_study_part10(STUDY)


@pytest.fixture(scope="module")
def running_orthanc(tmp_path_factory):
    """One running Orthanc for the tests that only need it up (stopping one takes ~3 s);
    every test sends fresh SOP Instance UIDs and looks only at its own."""
    server = OrthancServer(tmp_path_factory.mktemp("orthanc"))
    try:
        yield server.start()
    finally:
        server.kill()  # nothing reads its storage afterwards


def sender(orthanc: OrthancServer, **kw) -> StowSender:
    return StowSender(StowConfig(**{"url": orthanc.dicomweb, "timeout_ms": 30_000,
                                    "batch_max_instances": 3, "linger_ms": 20,
                                    "max_connections": 2, **kw}))


def store_config(**kw) -> StoreConfig:
    return StoreConfig(**{"min_free_disk_mb": 0, "retry_initial_s": 0.1, "retry_max_s": 0.4,
                          **kw})


async def test_objects_committed_in_the_store_arrive_byte_identical(running_orthanc,
                                                                    tmp_path):
    orthanc = running_orthanc
    files = mixed_study()
    items = arrivals(files)
    async with store_graph(tmp_path / "data", {"archive": sender(orthanc)},
                           [orthanc.dicomweb], store_config()) as (feeder, store, _):
        await feeder.commit(items)
        lane = await wait_for_lane(store, "archive", lambda f: f["delivered"] == len(files))
    assert lane["queued"] == lane["in_flight"] == lane["retrying"] == 0
    assert lane["dead_lettered"] == 0 and lane["last_error_class"] is None
    stored = orthanc.stored_files_by_uid()
    assert {a.envelope.sop_instance_uid for a in items} <= set(stored)
    for item, original in zip(items, files):
        assert dataset_bytes_after_meta(stored[item.envelope.sop_instance_uid]) == \
            dataset_bytes_after_meta(original)


async def test_outcomes_are_committed_and_traced_per_instance(running_orthanc, tmp_path):
    from nodes.store import admin

    orthanc = running_orthanc
    items = arrivals(mixed_study()[:3])
    async with store_graph(tmp_path / "data", {"archive": sender(orthanc)},
                           [orthanc.dicomweb], store_config()) as (feeder, store, _):
        await feeder.commit(items)
        await wait_for_lane(store, "archive", lambda f: f["delivered"] == 3)
    # Read again after the graph stopped (from LMDB, not from the running process's memory).
    assert store.report()["lanes"]["archive"]["delivered"] == 3
    for item in items:
        trace = admin.trace(store, item.envelope.sop_instance_uid)
        assert trace["lanes"]["archive"]["state"] == "delivered"
        attempts = [e for e in trace["events"] if e["event"] == "attempt"]
        assert [(e["lane"], e["attempt"], e["outcome"]) for e in attempts] == [
            ("archive", 1, "delivered")]


async def test_a_batch_settles_in_shared_group_commits_not_one_sync_each(running_orthanc,
                                                                          tmp_path):
    # Each outcome commit is a sync (fsync) in LMDB: ~10 ms on this machine's disk. A batch
    # of 50 settled one after the other cost 50 syncs and capped the lane at half of plain
    # httpx (bench/stow.py); settled together they share the Store's group commit.
    orthanc = running_orthanc
    data, n = tmp_path / "data", 20
    files = [to_part10(ct(study_uid=STUDY, instance_number=i + 1)) for i in range(n)]
    await preload(data, ["archive"], arrivals(files), store_config())
    # Closes on count (linger far longer than the run), one request of 20.
    lane_sender = sender(orthanc, batch_max_instances=n, linger_ms=30_000, max_connections=1)
    async with store_graph(data, {"archive": lane_sender}, [orthanc.dicomweb],
                           store_config()) as (_, store, _):
        await wait_for_lane(store, "archive", lambda f: f["delivered"] == n)
        stats = await commit_stats(store, lambda s: s["operations"] >= n + 1)
    assert lane_sender.report()["lanes"]["archive"]["batches"] == 1
    # Claims (the pump hands at most its channel's room at a time) and outcomes: a handful
    # of commits, where one sync per outcome alone would be 20.
    assert stats["operations"] >= n + 1
    assert stats["commits"] <= 8, stats


async def test_the_pump_claims_a_whole_batch_in_one_commit(running_orthanc, tmp_path):
    # The pump claims what the sender's input edge has room for, one sync commit per claim:
    # the edge holds a whole batch, so a batch of 40 is one claim (the default edge of 16
    # made it three) and its outcomes one or two more.
    orthanc = running_orthanc
    data, n = tmp_path / "data", 40
    files = [to_part10(ct(study_uid=STUDY, instance_number=i + 1)) for i in range(n)]
    await preload(data, ["archive"], arrivals(files), store_config())
    lane_sender = sender(orthanc, batch_max_instances=n, linger_ms=30_000, max_connections=1)
    assert lane_sender.capacity >= n
    async with store_graph(data, {"archive": lane_sender}, [orthanc.dicomweb],
                           store_config()) as (_, store, _):
        await wait_for_lane(store, "archive", lambda f: f["delivered"] == n)
        stats = store.stats
    assert lane_sender.report()["lanes"]["archive"]["batches"] == 1
    assert stats["commits"] <= 3, stats


async def test_a_large_object_streams_from_the_encrypted_spool_byte_identical(
        running_orthanc, tmp_path):
    orthanc = running_orthanc
    path = tmp_path / "large.dcm"
    path.write_bytes(to_part10(ct(study_uid=STUDY, rows=1024, cols=1024)))  # ~2 MB > CHUNK
    small = mixed_study()[:2]
    items = arrivals([(envelope_of(path), FilePayload(path))] + small)
    config = store_config(spool_threshold_kb=256)
    data = tmp_path / "data"
    async with store_graph(data, {"archive": sender(orthanc, batch_max_bytes=1 << 20)},
                           [orthanc.dicomweb], config) as (feeder, store, _):
        await feeder.commit(items)
        spooled = list((data / "spool").iterdir())
        await wait_for_lane(store, "archive", lambda f: f["delivered"] == 3)
    # The large object sat in the Store's spool, encrypted (its plaintext is not on disk).
    assert len(spooled) == 1
    original = path.read_bytes()
    with open(spooled[0], "rb") as f:
        head = f.read(1 << 20)
    assert original[128:1024] not in head and original[-4096:] not in head
    stored = orthanc.stored_files_by_uid()
    big_uid = items[0].envelope.sop_instance_uid
    assert dataset_bytes_after_meta(stored[big_uid]) == dataset_bytes_after_meta(original)
    for item, f in zip(items[1:], small):
        assert dataset_bytes_after_meta(stored[item.envelope.sop_instance_uid]) == \
            dataset_bytes_after_meta(f)


async def test_orthanc_down_queues_and_retries_then_delivers_after_it_starts(orthanc,
                                                                            tmp_path):
    files = mixed_study()[:4]
    items = arrivals(files)
    async with store_graph(tmp_path / "data", {"archive": sender(orthanc)},
                           [orthanc.dicomweb], store_config()) as (feeder, store, _):
        await feeder.commit(items)  # committed (acked) although the archive is down
        down = await wait_for_lane(store, "archive", lambda f: f["retrying"] == len(files))
        assert down["delivered"] == 0 and down["dead_lettered"] == 0
        assert down["last_error_class"] == "transient"
        assert down["last_error_reason"] == "transport error: ConnectError"
        await trio.to_thread.run_sync(orthanc.start)
        up = await wait_for_lane(store, "archive", lambda f: f["delivered"] == len(files))
    assert up["retrying"] == up["queued"] == up["dead_lettered"] == 0
    stored = orthanc.stored_files_by_uid()
    assert set(stored) == {a.envelope.sop_instance_uid for a in items}
    for item, original in zip(items, files):
        assert dataset_bytes_after_meta(stored[item.envelope.sop_instance_uid]) == \
            dataset_bytes_after_meta(original)
