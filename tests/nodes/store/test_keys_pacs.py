"""Key rotation and a format-1 data dir, delivered to a real PACS (DCMTK storescp).

- A study is queued while the PACS is down; the key is rotated beside the running graph,
  the graph reloads (SIGHUP), re-seals, and every object reaches storescp byte-identical.
  The canary patient name is nowhere in plaintext in the data dir or keyring afterwards.
- The checked-in data dir written by the format-1 release (tests/fixtures/format1, made by
  tests/fixtures/make_format1_datadir.py) is upgraded in place: its queued, retrying and
  dead-lettered items keep their states and the queued objects are delivered.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import trio

from nodes.dimse import CStoreSender
from nodes.store import Store, StoreConfig, admin, layout
from nodes.store.crypto import KEY_FILE_NAME, AtRestKey, KeyFileError
from nodes.store.db import Env
from support.flowproc import FlowProcess, run_flow
from support.peers import free_port
from support.storenodes import Feed
from support.synth import CANARY, CANARY_ID, CANARY_PARTS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dimse"))
from dimse_support import (Storescp, after_meta, pacs_config, running,  # noqa: E402
                           send_as_is, study, write_site)

pytestmark = pytest.mark.peer("dcmtk")

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "format1"
NEEDLES = [p.encode() for p in (*CANARY_PARTS, CANARY_ID)] + [CANARY.encode()]


STORE_SETTINGS = "spool_threshold_kb = 8\nretry_initial_s = 0.5\nretry_max_s = 2.0\npoll_s = 0.2\n"


def keys_status(args: list[str]) -> dict:
    result = run_flow(["keys", *args, "--json", "status"])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["store"]


def test_rotation_while_a_study_is_queued_delivers_every_object_byte_identical(tmp_path):
    data = tmp_path / "data"  # write_site's data dir
    pacs_port = free_port()
    listen_port, args = write_site(tmp_path, pacs_port)
    site = tmp_path / "site.toml"  # some objects spooled, some sealed in LMDB; quick retries
    site.write_text(site.read_text().replace("[store]\n", "[store]\n" + STORE_SETTINGS))
    files = study(tmp_path / "study")
    flow = FlowProcess(["run", *args, "--log-level", "INFO"], tmp_path / "flow.log")
    pacs = Storescp(tmp_path / "pacs", port=pacs_port)
    try:
        flow.wait_for_log(r"dimse\.listening")
        sent = send_as_is(listen_port, list(files.values()))
        assert all(r.returncode == 0 for r in sent), [r.stderr for r in sent]
        before = keys_status(args)
        old = before["current"]
        assert before["keys"][old]["objects"] == len(files)  # all committed, PACS down
        assert any(p.suffix == ".spool" for p in (data / "spool").iterdir())  # some spooled

        rotated = run_flow(["keys", *args, "rotate"])  # beside the running graph
        assert rotated.returncode == 0, rotated.stderr
        new = keys_status(args)["current"]
        assert new != old
        os.kill(flow.popen.pid, signal.SIGHUP)  # reload: the Store reopens with the new key
        flow.wait_for_log(r"store\.resealed .*resealed=8", timeout=60)
        after = keys_status(args)
        assert (after["keys"][old]["objects"], after["keys"][new]["objects"]) == (0, len(files))
        assert after["keys"][old]["readable"] and after["keys"][old]["role"] == "retired"

        pacs.start()
        got = pacs.wait_files(len(files), timeout=60)
        assert flow.stop(timeout=20) == 0
    finally:
        pacs.stop()
        if flow.alive():
            flow.stop(timeout=20)
    assert set(got) == set(files)
    for uid, path in files.items():
        assert got[uid] == after_meta(path), uid
    on_disk = [p for p in data.rglob("*") if p.is_file()]
    assert data / "at-rest.keyring" / f"{old}.key" in on_disk
    for path in on_disk:
        raw = path.read_bytes()
        for needle in NEEDLES:
            assert needle not in raw, f"{needle!r} in plaintext in {path}"
    log = flow.output() + rotated.stdout + rotated.stderr
    for needle in NEEDLES:
        assert needle.decode() not in log


# -- the format-1 data dir written by the release before format 2 --------------------------

def fixture_copy(tmp_path: Path, *, key: bool = True) -> tuple[Path, dict]:
    data = tmp_path / "data"
    shutil.copytree(FIXTURE / "data", data)
    for path in (data, *data.rglob("*")):
        path.chmod(0o700 if path.is_dir() else 0o600)
    if key:
        shutil.copy(FIXTURE / "at-rest.key", data / KEY_FILE_NAME)
        (data / KEY_FILE_NAME).chmod(0o600)
    return data, json.loads((FIXTURE / "manifest.json").read_text())


def lane_states(data: Path) -> tuple[int, dict[str, str]]:
    env = Env.open(data, map_size_mb=StoreConfig().map_size_mb, readonly=True)
    try:
        with env.begin() as txn:
            from nodes.store import lanes

            states = {uid: lanes.get(env, txn, "pacs", uid).state
                      for uid in json.loads((FIXTURE / "manifest.json").read_text())}
            return layout.read_format(env, txn), states
    finally:
        env.close()


def expected_states(manifest: dict) -> dict[str, str]:
    # Items the fixture's lane held in flight when it stopped are re-queued at open.
    return {uid: entry["state"] for uid, entry in manifest.items()}


async def test_a_format1_data_dir_is_upgraded_keeps_its_states_and_delivers_the_queued(
        tmp_path):
    data, manifest = fixture_copy(tmp_path)
    fmt, states = lane_states(data)
    assert fmt == 1 and set(states.values()) >= {"retrying", "dead_lettered"}
    config = StoreConfig(min_free_disk_mb=0, spool_threshold_kb=16, poll_s=0.2)

    store = Store(data, config)
    store.branch("pacs")
    status = admin.key_status(store)  # what `flow keys status` shows before the upgrade
    assert (status["format"], status["current"], status["objects"]) == (1, None, len(manifest))
    assert status["keys"][status["configured"]]["role"] == "not recorded yet"
    await store.open()  # upgrade only: no lane runs yet
    await store.close()
    fmt, states = lane_states(data)
    assert fmt == layout.FORMAT == 3 and states == expected_states(manifest)
    env = Env.open(data, map_size_mb=config.map_size_mb, readonly=True)
    with env.begin() as txn:
        ledger = layout.read_ledger(env, txn)
    env.close()
    key_id = AtRestKey((data / KEY_FILE_NAME).read_bytes()).key_id
    assert (ledger.current, ledger.original) == (key_id, key_id)

    queued = {uid for uid, e in manifest.items() if e["state"] == "queued"}
    with Storescp(tmp_path / "pacs") as scp:
        store = Store(data, config)
        cfg = pacs_config(scp.port, max_associations=1)
        async with running(Feed() >> store >> {"pacs": CStoreSender(cfg)},
                           egress=[f"127.0.0.1:{scp.port}"]):
            got = await trio.to_thread.run_sync(scp.wait_files, len(queued), 60)
    assert queued <= set(got)
    assert "dead_lettered" not in {manifest[uid]["state"] for uid in got}
    for uid, dataset in got.items():
        assert hashlib.sha256(dataset).hexdigest() == manifest[uid]["sha256_after_meta"], uid
    _, states = lane_states(data)
    assert {uid: s for uid, s in states.items() if uid in queued} == dict.fromkeys(
        queued, "delivered")
    assert list(states.values()).count("dead_lettered") == 1


async def test_a_format1_data_dir_with_another_key_is_refused_and_left_as_it_was(tmp_path):
    data, manifest = fixture_copy(tmp_path, key=False)
    (data / KEY_FILE_NAME).write_bytes(os.urandom(32))
    (data / KEY_FILE_NAME).chmod(0o600)
    before = lane_states(data)
    store = Store(data, StoreConfig(min_free_disk_mb=0))
    store.branch("pacs")
    with pytest.raises(layout.DataDirError, match="format 1, no key fingerprint recorded"):
        await store.open()
    assert lane_states(data) == before and before[0] == 1


async def test_a_format1_data_dir_without_its_key_file_is_an_error_not_a_fresh_key(tmp_path):
    data, _ = fixture_copy(tmp_path, key=False)
    before = lane_states(data)
    store = Store(data, StoreConfig(min_free_disk_mb=0))
    store.branch("pacs")
    with pytest.raises(KeyFileError, match="is missing"):
        await store.open()
    assert not (data / KEY_FILE_NAME).exists() and lane_states(data) == before
