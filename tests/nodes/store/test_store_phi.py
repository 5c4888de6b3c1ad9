"""The PHI canary never reaches the data dir in plaintext, nor the logs at INFO and above."""

from __future__ import annotations

import io
import logging

from flow._log import configure
from nodes.outcome import Delivered, Permanent, Transient
from nodes.store import StoreConfig
from support.storenodes import Sink, arrival, read_payload, running
from support.synth import CANARY, CANARY_ID, CANARY_PARTS, ct, sr_report, to_part10

NEEDLES = [p.encode() for p in (*CANARY_PARTS, CANARY_ID)] + [CANARY.encode()]


async def test_canary_is_nowhere_in_plaintext_in_the_data_dir_or_logs(tmp_path):
    log = io.StringIO()
    configure("INFO", stream=log)
    objects = [ct(), ct(rows=256, cols=256), sr_report(), ct()]  # small, spooled, SR, retried
    encoded = {ds.SOPInstanceUID: to_part10(ds) for ds in objects}
    for data in encoded.values():
        assert CANARY.encode() in data  # the test data carries the canary in clear
    refused, retried = objects[2].SOPInstanceUID, objects[3].SOPInstanceUID

    async def behaviour(delivery):
        if delivery.uid == refused:
            return Permanent("0xA900 dataset does not match SOP class")
        if delivery.uid == retried and delivery.attempt == 1:
            return Transient("0xA700 out of resources", retry_after=0.01)
        return Delivered(detail="0xB000 coercion of data elements")

    sink = Sink(behaviour)
    config = StoreConfig(min_free_disk_mb=0, spool_threshold_kb=64, retry_initial_s=0.01)
    data_dir = tmp_path / "data"
    try:
        async with running(data_dir, {"pacs": sink}, config) as (feed, store, _):
            for uid, data in encoded.items():
                await feed.put(arrival(uid, data, study="5.5"))
            await sink.wait_for(lambda: len(sink.delivered) == 3)
            members = await store.study_members("5.5")
    finally:
        configure("WARNING")
        logging.getLogger().setLevel(logging.WARNING)
    assert sorted(read_payload(p)[0] for _, p in members) == sorted(map(len, encoded.values()))
    assert len(list((data_dir / "spool").iterdir())) == 1  # the large CT is spooled
    files = [p for p in data_dir.rglob("*") if p.is_file()]
    assert {"data.mdb", "lock.mdb"} <= {p.name for p in files}
    for path in files:
        raw = path.read_bytes()
        for needle in NEEDLES:
            assert needle not in raw, f"{needle!r} in plaintext in {path.name}"
    text = log.getvalue()
    assert "store.dead_letter" in text and "store.retry" in text  # the log was captured
    for needle in NEEDLES:
        assert needle.decode() not in text
