"""Key safety: the data dir records its key's fingerprint and format; a wrong or missing key
is refused before anything changes; rotation keeps older objects readable and re-seals them.
(Delivery to a real PACS across a rotation and a format-1 upgrade: test_keys_pacs.py.)"""

from __future__ import annotations

import base64
import hashlib
import os

import pytest
import trio

from nodes.outcome import Permanent, Transient
from nodes.store import Store, StoreConfig, admin, lanes, layout, objects
from nodes.store.crypto import KEY_FILE_NAME, AtRestKey, KeyFileError
from nodes.store.db import Env
from nodes.store.keyring import Keyring, KeySource, publish_staged, rotate_files
from support.flowproc import run_flow
from support.storenodes import Sink, arrival, read_payload, running, sink_graph_files
from support.synth import CANARY_ID, CANARY_PARTS, ct, to_part10

CONFIG = StoreConfig(min_free_disk_mb=0, spool_threshold_kb=16, poll_s=0.1)


def ledger_of(data_dir):
    env = Env.open(data_dir, map_size_mb=CONFIG.map_size_mb, readonly=True)
    try:
        with env.begin() as txn:
            return layout.read_format(env, txn), layout.read_ledger(env, txn)
    finally:
        env.close()


def lane_figures(data_dir) -> dict:
    """Lane ``pacs``'s state counts and last error, read from LMDB."""
    store = Store(data_dir, CONFIG)
    store.branch("pacs")
    figures = store.report()["lanes"]["pacs"]
    figures.pop("oldest_age_s")  # grows with the clock, not with a change
    return figures


async def queue(data_dir, items: dict[str, bytes], config=CONFIG) -> None:
    """Commit ``items`` for lane ``pacs`` while its sink takes nothing; stop abruptly so
    they stay queued (or in flight: re-queued at the next open)."""
    async with running(data_dir, {"pacs": Sink(gate=trio.Event())}, config) as (feed, _, runner):
        for uid, data in items.items():
            a = arrival(uid, data)
            await feed.put(a)
            await a.receipt.wait()
        runner.abort()


async def deliver_all(data_dir, count: int, config=CONFIG) -> dict[str, str]:
    """Run the lane until ``count`` objects are delivered: {uid: sha256 of the bytes read}."""
    sink = Sink()
    async with running(data_dir, {"pacs": sink}, config):
        await sink.wait_for(lambda: len(sink.delivered) >= count)
    return {uid: digest for uid, digest, _ in sink.seen}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def two_objects() -> dict[str, bytes]:
    small, large = ct(), ct(rows=128, cols=128)  # the large one is spooled
    return {str(ds.SOPInstanceUID): to_part10(ds) for ds in (small, large)}


async def open_store(data_dir, config=CONFIG):
    """Open and close the Store of lane ``pacs`` (what the runner does first)."""
    store = Store(data_dir, config)
    store.branch("pacs")
    await store.open()
    await store.close()


# -- the fingerprint and format record ----------------------------------------------------

async def test_new_data_dir_records_format_3_and_its_key_fingerprint_only(tmp_path):
    await open_store(tmp_path)
    fmt, ledger = ledger_of(tmp_path)
    key_bytes = (tmp_path / KEY_FILE_NAME).read_bytes()
    assert fmt == layout.FORMAT == 3
    assert ledger.current == AtRestKey(key_bytes).key_id
    raw = (tmp_path / "lmdb" / "data.mdb").read_bytes()
    assert key_bytes not in raw and base64.b64encode(key_bytes) not in raw


async def test_a_wrong_key_is_refused_naming_both_fingerprints_and_nothing_changes(tmp_path):
    items = two_objects()
    await queue(tmp_path, items)
    before = lane_figures(tmp_path)
    right = (tmp_path / KEY_FILE_NAME).read_bytes()
    other = tmp_path / "other.key"
    other.write_bytes(os.urandom(32))
    other.chmod(0o600)
    wrong = StoreConfig(min_free_disk_mb=0, key_file=str(other))
    with pytest.raises(layout.DataDirError) as caught:
        await open_store(tmp_path, wrong)
    message = str(caught.value)
    assert AtRestKey(other.read_bytes()).key_id in message
    assert AtRestKey(right).key_id in message
    assert str(other) in message and "nothing was changed" in message
    assert lane_figures(tmp_path) == before  # nothing dead-lettered, no state changed
    assert before["dead_lettered"] == 0 and before["queued"] + before["in_flight"] == 2
    digests = await deliver_all(tmp_path, 2)  # the right key delivers everything
    assert digests == {uid: sha(data) for uid, data in items.items()}


async def test_a_wrong_key_from_an_env_var_names_the_variable(tmp_path, monkeypatch):
    await queue(tmp_path, two_objects())
    monkeypatch.setenv("DICOMFLOW_TEST_WRONG_KEY", base64.b64encode(os.urandom(32)).decode())
    with pytest.raises(layout.DataDirError, match="environment variable 'DICOMFLOW_TEST_WRONG_KEY'"):
        await open_store(tmp_path, StoreConfig(min_free_disk_mb=0,
                                               key_env="DICOMFLOW_TEST_WRONG_KEY"))


async def test_a_missing_key_file_for_a_data_dir_with_data_is_an_error_never_a_fresh_key(
        tmp_path):
    await queue(tmp_path, two_objects())
    before = lane_figures(tmp_path)
    (tmp_path / KEY_FILE_NAME).unlink()
    with pytest.raises(KeyFileError, match="is missing, but data dir .* already holds data"):
        await open_store(tmp_path)
    assert not (tmp_path / KEY_FILE_NAME).exists()
    assert lane_figures(tmp_path) == before


async def test_a_data_dir_newer_than_this_release_is_refused_naming_both_versions(tmp_path):
    await open_store(tmp_path)
    env = Env.open(tmp_path, map_size_mb=CONFIG.map_size_mb)
    with env.begin(write=True) as txn:
        txn.put(b"format", b"4", db=env.meta)
    env.close()
    with pytest.raises(layout.DataDirError, match="has format 4, newer than format 3"):
        await open_store(tmp_path)


async def test_a_format_2_data_dir_becomes_format_3_with_its_items_unchanged(tmp_path):
    """Format 3 only adds the ingest journals: an older release must not open a data dir
    whose journal may hold acknowledged arrivals, and a format-2 one is taken as it is."""
    items = two_objects()
    await queue(tmp_path, items)
    env = Env.open(tmp_path, map_size_mb=CONFIG.map_size_mb)
    with env.begin(write=True) as txn:
        txn.put(b"format", b"2", db=env.meta)
    env.close()
    await open_store(tmp_path)
    fmt, ledger = ledger_of(tmp_path)
    assert fmt == 3 and ledger.current == AtRestKey(
        (tmp_path / KEY_FILE_NAME).read_bytes()).key_id
    after = lane_figures(tmp_path)  # opening re-queues what was in flight, as always
    assert after["queued"] == 2 and after["dead_lettered"] == 0
    digests = await deliver_all(tmp_path, 2)
    assert digests == {uid: sha(data) for uid, data in items.items()}


def test_flow_run_with_a_wrong_key_exits_1_with_one_clear_line(tmp_path):
    data = tmp_path / "data"
    graph, config = graph_files(tmp_path, data)
    trio.run(queue, data, two_objects())
    before = lane_figures(data)
    other = tmp_path / "other.key"
    other.write_bytes(os.urandom(32))
    other.chmod(0o600)
    config.write_text(config.read_text() + f'key_file = "{other}"\n')
    result = run_flow(["run", str(graph), "--config", str(config)], timeout=60)
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("flow: error:")]
    assert len(lines) == 1 and AtRestKey(other.read_bytes()).key_id in lines[0]
    assert str(other) in lines[0]
    assert lane_figures(data) == before  # nothing dead-lettered, re-queued or retried
    assert before["dead_lettered"] == 0 and before["queued"] + before["in_flight"] == 2


# -- rotation -----------------------------------------------------------------------------

def graph_files(tmp_path, data_dir):
    return sink_graph_files(tmp_path, data_dir, {"spool_threshold_kb": 16})


async def test_rotation_keeps_queued_objects_readable_reseals_them_and_delivers_them(tmp_path):
    data = tmp_path / "data"
    graph, config = graph_files(tmp_path, data)
    items = two_objects()
    await queue(data, items)
    old_key = (data / KEY_FILE_NAME).read_bytes()

    rotated = await trio.to_thread.run_sync(
        run_flow, ["keys", str(graph), "--config", str(config), "rotate"])
    assert rotated.returncode == 0, rotated.stderr
    new_key = (data / KEY_FILE_NAME).read_bytes()
    old_id, new_id = AtRestKey(old_key).key_id, AtRestKey(new_key).key_id
    assert new_key != old_key and (data / "at-rest.keyring" / f"{old_id}.key").read_bytes() == old_key
    assert f"key {new_id} is current; {old_id} retired" in rotated.stdout
    _, ledger = ledger_of(data)
    assert (ledger.current, ledger.retired, ledger.pending) == (new_id, [old_id], "")

    status = await trio.to_thread.run_sync(
        run_flow, ["keys", str(graph), "--config", str(config), "status"])
    assert f"key {old_id}: retired, 2 objects" in status.stdout, status.stdout
    assert f"key {new_id}: current (configured), 0 objects" in status.stdout
    for secret in (old_key, new_key):  # fingerprints only, never key material
        for form in (secret.hex(), base64.b64encode(secret).decode()):
            assert form not in status.stdout + rotated.stdout

    sink = Sink()
    async with running(data, {"pacs": sink}, CONFIG) as (_, store, _):
        await sink.wait_for(lambda: len(sink.delivered) == 2)
        with trio.fail_after(20):
            while admin.key_status(store)["keys"][old_id]["objects"]:
                await trio.sleep(0.05)
        members = admin.key_status(store)["keys"]
    assert {uid: digest for uid, digest, _ in sink.seen} == {u: sha(d) for u, d in items.items()}
    assert members[new_id]["objects"] == 2
    assert len(list((data / "spool").iterdir())) == 1  # the old spool file went


async def test_objects_sealed_with_the_old_key_stay_readable_before_resealing(tmp_path):
    items = two_objects()
    await queue(tmp_path, items)
    source = KeySource(tmp_path)
    env = Env.open(tmp_path, map_size_mb=CONFIG.map_size_mb)
    try:
        layout.rotate(env, source, tmp_path / "spool", where="store 'store'")
    finally:
        env.close()
    store = Store(tmp_path, CONFIG)
    store.branch("pacs")
    await store.open()  # open, but no background re-sealing: read through the keyring
    try:
        members = await store.study_members("1.2.3.4")
    finally:
        await store.close()
    assert {e.sop_instance_uid: read_payload(p)[1] for e, p in members} == {
        u: sha(d) for u, d in items.items()}


async def test_a_rotation_that_crashed_after_swapping_the_key_file_completes_at_start(tmp_path):
    await queue(tmp_path, two_objects())
    source = KeySource(tmp_path)
    old, staged, new = rotate_files(source)
    env = Env.open(tmp_path, map_size_mb=CONFIG.map_size_mb)
    with env.begin(write=True) as txn:  # what layout.rotate commits before the swap
        ledger = layout.read_ledger(env, txn)
        ledger.pending = new.key_id
        layout._write(env, txn, ledger)
    env.close()
    publish_staged(source, staged)  # ... and the crash comes before the promotion
    digests = await deliver_all(tmp_path, 2)
    _, ledger = ledger_of(tmp_path)
    assert (ledger.current, ledger.retired, ledger.pending) == (new.key_id, [old.key_id], "")
    assert len(digests) == 2


async def test_a_rotation_that_crashed_before_swapping_keeps_the_old_key(tmp_path):
    await queue(tmp_path, two_objects())
    source = KeySource(tmp_path)
    old, _, new = rotate_files(source)
    env = Env.open(tmp_path, map_size_mb=CONFIG.map_size_mb)
    with env.begin(write=True) as txn:
        ledger = layout.read_ledger(env, txn)
        ledger.pending = new.key_id
        layout._write(env, txn, ledger)
    env.close()
    assert len(await deliver_all(tmp_path, 2)) == 2
    _, ledger = ledger_of(tmp_path)
    assert (ledger.current, ledger.pending) == (old.key_id, "")


async def test_a_retired_key_missing_from_the_keyring_is_refused_while_objects_need_it(
        tmp_path):
    await queue(tmp_path, two_objects())
    env = Env.open(tmp_path, map_size_mb=CONFIG.map_size_mb)
    try:
        old, _ = layout.rotate(env, KeySource(tmp_path), tmp_path / "spool", where="store")
    finally:
        env.close()
    kept = tmp_path / "kept.key"
    (tmp_path / "at-rest.keyring" / f"{old}.key").rename(kept)
    before = lane_figures(tmp_path)
    with pytest.raises(layout.DataDirError, match=f"retired keys {old} \\(2 objects\\) are "
                                                  f"missing from the keyring"):
        await open_store(tmp_path)
    assert lane_figures(tmp_path) == before
    kept.rename(tmp_path / "at-rest.keyring" / f"{old}.key")
    assert len(await deliver_all(tmp_path, 2)) == 2


async def test_key_errors_and_status_carry_no_phi(tmp_path):
    objects = {str(ds.SOPInstanceUID): to_part10(ds) for ds in (ct(), ct(rows=128, cols=128))}
    await queue(tmp_path, objects)
    other = tmp_path / "other.key"
    other.write_bytes(os.urandom(32))
    other.chmod(0o600)
    with pytest.raises(layout.DataDirError) as caught:
        await open_store(tmp_path, StoreConfig(min_free_disk_mb=0, key_file=str(other)))
    store = Store(tmp_path, CONFIG)
    store.branch("pacs")
    text = str(caught.value) + repr(admin.key_status(store))
    for needle in (*CANARY_PARTS, CANARY_ID):
        assert needle not in text


async def test_two_rotations_before_a_restart_keep_every_object_readable(tmp_path):
    items = two_objects()
    await queue(tmp_path, items)
    env = Env.open(tmp_path, map_size_mb=CONFIG.map_size_mb)
    try:
        first = layout.rotate(env, KeySource(tmp_path), tmp_path / "spool", where="store")
        second = layout.rotate(env, KeySource(tmp_path), tmp_path / "spool", where="store")
    finally:
        env.close()
    assert first[1] == second[0]
    _, ledger = ledger_of(tmp_path)
    assert ledger.retired == [first[0], second[0]] and ledger.current == second[1]
    assert await deliver_all(tmp_path, 2) == {uid: sha(data) for uid, data in items.items()}


async def test_an_object_sealed_with_a_key_this_process_lacks_is_retried_not_dead_lettered(
        tmp_path):
    """Another process that already reloaded sealed it with the new key: this one waits."""

    await queue(tmp_path, {"1.9.1": b"sealed with the data dir's key"})
    store = Store(tmp_path, CONFIG)
    store.branch("pacs")
    await store.open()
    try:
        env, keyring = store.env, store.ledger.keyring
        with env.begin() as txn:
            obj = objects.get(env, txn, "1.9.1")
            item = lanes.get(env, txn, "pacs", "1.9.1")
            blob = txn.get(b"1.9.1", db=env.blobs)
        stranger = Keyring(AtRestKey(os.urandom(32)), keyring.source, original="")
        _, [(uid, _, outcome)] = store.ledger._build(stranger, "pacs",
                                                     [("1.9.1", item, obj, blob)])
        [ok], _ = store.ledger._build(keyring, "pacs", [("1.9.1", item, obj, blob)])
    finally:
        await store.close()
    assert uid == "1.9.1" and isinstance(outcome, Transient) and not isinstance(outcome, Permanent)
    assert f"sealed with key {keyring.current.key_id}" in outcome.reason
    assert read_payload(ok.payload)[1] == sha(b"sealed with the data dir's key")


async def test_a_configured_key_file_keeps_its_keyring_beside_it(tmp_path):
    keys = tmp_path / "etc"
    keys.mkdir(mode=0o700)
    data = tmp_path / "data"
    config = StoreConfig(min_free_disk_mb=0, spool_threshold_kb=16,
                         key_file=str(keys / "site.key"))
    items = two_objects()
    await queue(data, items, config)
    store = Store(data, config)
    store.branch("pacs")
    old, new = admin.rotate_key(store)
    assert (keys / "site.keyring" / f"{old}.key").exists()
    assert not (data / "at-rest.keyring").exists() and not (data / KEY_FILE_NAME).exists()
    status = admin.key_status(store)
    assert status["current"] == status["configured"] == new
    assert status["keys"][old] == {"objects": 2, "role": "retired", "readable": True}
    assert await deliver_all(data, 2, config) == {u: sha(d) for u, d in items.items()}
