"""The Store's ingest contract: commit-before-ack, group commit, idempotency, study index."""

from __future__ import annotations

import trio

from nodes.outcome import Delivered
from nodes.store import Store, StoreConfig
from support.storenodes import Sink, arrival, running


async def test_round_trip_delivers_the_stored_bytes(tmp_path):
    sink = Sink()
    async with running(tmp_path, {"pacs": sink}) as (feed, store, _):
        a = arrival("1.2.1", b"DICM" * 100)
        await feed.put(a)
        await a.receipt.wait()
        await sink.wait_for(lambda: sink.delivered == ["1.2.1"])
    import hashlib
    assert sink.seen == [("1.2.1", hashlib.sha256(b"DICM" * 100).hexdigest(), 1)]
