"""The lane ledger on its own: what a process that runs lanes and no listener does with the
data dir's environment and keyring (no Store node, no ingest)."""

from __future__ import annotations

import hashlib

from nodes.outcome import Delivered, Transient
from nodes.store import LaneLedger, Store, StoreConfig, admin
from nodes.store.db import SPOOL_DIR, Env
from nodes.store.keyring import Keyring, KeySource
from support.storenodes import arrival, read_payload

CONFIG = StoreConfig(min_free_disk_mb=0, spool_threshold_kb=16, poll_s=0.1)
ITEMS = {"1.30.1": b"small" * 20, "1.30.2": b"spooled" * 4000, "1.30.3": b"also small" * 9}


async def ingest_only(data_dir) -> None:
    """Commit ITEMS for lane ``pacs`` through the Store's ingest and close it."""
    store = Store(data_dir, CONFIG)
    store.branch("pacs")
    await store.open()
    try:
        arrivals = [arrival(uid, data) for uid, data in ITEMS.items()]
        await store.commit(arrivals)
        assert all(a.receipt.done and a.receipt.error is None for a in arrivals)
    finally:
        await store.close()


async def test_a_ledger_without_a_store_claims_settles_and_returns_items(tmp_path):
    await ingest_only(tmp_path)
    env = Env.open(tmp_path, map_size_mb=CONFIG.map_size_mb)
    try:
        keyring = Keyring.load(KeySource(tmp_path), create=False)
        ledger = LaneLedger(env, keyring, tmp_path / SPOOL_DIR, CONFIG, ["pacs"])

        deliveries, next_due = await ledger.claim("pacs", 10)
        assert next_due is None
        assert {d.uid: read_payload(d.payload)[1] for d in deliveries} == {
            uid: hashlib.sha256(data).hexdigest() for uid, data in ITEMS.items()}
        assert (await ledger.claim("pacs", 10)).deliveries == []  # all in flight

        first, *rest = sorted(deliveries, key=lambda d: d.uid)
        await first.settle(Delivered())
        await ledger.unclaim("pacs", rest)
        again, _ = await ledger.claim("pacs", 10)
        assert sorted(d.uid for d in again) == [d.uid for d in rest]
        for d in again:
            await d.settle(Transient("peer busy", retry_after=600))
        assert (await ledger.claim("pacs", 10)).deliveries == []  # parked until due
    finally:
        env.close()

    store = Store(tmp_path, CONFIG)  # as `flow status` reads it, from another handle
    store.branch("pacs")
    lane = store.report()["lanes"]["pacs"]
    assert (lane["delivered"], lane["retrying"], lane["queued"], lane["in_flight"]) == (1, 2, 0, 0)
    assert admin.trace(store, "1.30.1")["lanes"]["pacs"]["state"] == "delivered"
