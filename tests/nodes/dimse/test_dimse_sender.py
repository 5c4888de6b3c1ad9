"""CStoreSender against a real DCMTK storescp on 127.0.0.1."""

from __future__ import annotations

import os
import sys

import pytest

from nodes.delivery import Recorder
from nodes.dimse import CStoreSender
from nodes.outcome import Delivered, Permanent, Transient
from support.peers import free_port

sys.path.insert(0, os.path.dirname(__file__))
from dimse_support import (Feed, Storescp, after_meta, deliveries, pacs_config,  # noqa: E402
                           run_to_end, study)

pytestmark = pytest.mark.peer("dcmtk")


def _egress(cfg):
    return [f"{cfg.host}:{cfg.port}"]


@pytest.mark.parametrize("in_memory", [False, True], ids=["file", "stream"])
async def test_mixed_study_arrives_byte_identical_at_storescp(tmp_path, in_memory):
    files = study(tmp_path / "study")
    recorder = Recorder()
    with Storescp(tmp_path / "pacs") as scp:
        cfg = pacs_config(scp.port)
        sender = CStoreSender(cfg)
        items = deliveries(recorder, list(files.values()), in_memory=in_memory)
        await run_to_end(Feed(items, name="feed") >> sender, egress=_egress(cfg))
        got = scp.wait_files(len(files))
    assert recorder.outcomes == {uid: Delivered() for uid in files}
    assert set(got) == set(files)
    for uid, path in files.items():
        assert got[uid] == after_meta(path), uid
    assert sender.report()["lanes"]["feed"]["delivered"] == len(files)


async def test_storescp_down_is_transient_with_routing_safe_reason(tmp_path):
    files = study(tmp_path / "study")
    port = free_port()
    recorder = Recorder()
    cfg = pacs_config(port)
    items = deliveries(recorder, list(files.values())[:2])
    await run_to_end(Feed(items, name="feed") >> CStoreSender(cfg), egress=_egress(cfg))
    assert recorder.outcomes == {
        d.uid: Transient(f"connection refused 127.0.0.1:{port}") for d in items}
