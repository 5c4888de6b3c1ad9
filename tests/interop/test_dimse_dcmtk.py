"""The DIMSE lane end to end with the real Store, proven against DCMTK:

    storescu ──▶ DicomListener ──▶ Store ──▶ pacs: CStoreSender ──▶ storescp
"""

from __future__ import annotations

import logging
import os
import sys

import pytest
import trio

from flow._log import SafeFieldsFilter
from nodes.dimse import CStoreSender, DicomListener
from nodes.store import Store, StoreConfig
from nodes.store import admin
from support.peers import free_port
from support.synth import CANARY_ID, CANARY_PARTS, ct, write

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "nodes", "dimse"))
from dimse_support import (Storescp, after_meta, envelope_of, listen_config,  # noqa: E402
                           pacs_config, running, send_as_is, storescp_profile, study,
                           write_site)

pytestmark = pytest.mark.peer("dcmtk")

FAST_RETRY = StoreConfig(min_free_disk_mb=0, retry_initial_s=0.2, retry_max_s=0.5,
                         retry_jitter=0.0, poll_s=0.1)


def _graph(tmp_path, pacs_port, *, calling=("MODALITY",), store_config=FAST_RETRY):
    listener = DicomListener(listen_config(calling_ae_titles=list(calling)))
    store = Store(tmp_path / "data", store_config)
    sender = CStoreSender(pacs_config(pacs_port, idle_release_ms=300))
    return listener, store, listener >> store >> {"pacs": sender}


async def _until(predicate, timeout=30.0):
    with trio.fail_after(timeout):
        while not await trio.to_thread.run_sync(predicate):
            await trio.sleep(0.05)


def _info_text(records) -> str:
    lines = []
    for record in records:
        if record.levelno >= logging.INFO:
            SafeFieldsFilter().filter(record)
            lines.append(f"{record.name} {record.getMessage()} {getattr(record, 'fields', {})}")
    return "\n".join(lines)


async def test_study_arrives_at_storescp_byte_identical_through_the_store(tmp_path, caplog):
    files = study(tmp_path / "study")
    big = ct(rows=1100, cols=1100)  # 2.4 MB: received to the spool, streamed, never inline
    files[str(big.SOPInstanceUID)] = write(big, tmp_path / "study" / "big.dcm")
    with Storescp(tmp_path / "pacs") as scp:
        listener, store, pipeline = _graph(tmp_path, scp.port)
        with caplog.at_level(logging.INFO):
            async with running(pipeline, listener=listener,
                               egress=[f"127.0.0.1:{scp.port}"]):
                port = listener.address[1]
                results = await trio.to_thread.run_sync(
                    lambda: send_as_is(port, list(files.values())))
                assert [r.returncode for r in results] == [0] * len(results)
                await _until(lambda: admin.report(store)["lanes"]["pacs"]["delivered"]
                             == len(files))
        got = scp.wait_files(len(files))
    assert set(got) == set(files)
    for uid, path in files.items():
        assert got[uid] == after_meta(path), uid
    text = _info_text(caplog.records)
    assert "dimse.stored" in text and "dimse.sent" in text
    for part in (*CANARY_PARTS, CANARY_ID):
        assert part not in text


async def test_storescp_down_is_retried_and_delivered_when_it_comes_back(tmp_path):
    files = study(tmp_path / "study")
    paths = list(files.values())[:2]
    pacs_port = free_port()
    listener, store, pipeline = _graph(tmp_path, pacs_port)
    async with running(pipeline, listener=listener, egress=[f"127.0.0.1:{pacs_port}"]):
        port = listener.address[1]
        results = await trio.to_thread.run_sync(lambda: send_as_is(port, paths))
        assert [r.returncode for r in results] == [0] * len(results)  # committed = acked
        uid = envelope_of(paths[0]).sop_instance_uid
        await _until(lambda: admin.trace(store, uid)["lanes"]["pacs"]["attempts"] >= 1)
        reasons = [e.get("reason", "") for e in admin.trace(store, uid)["events"]]
        assert f"connection refused 127.0.0.1:{pacs_port}" in reasons
        with Storescp(tmp_path / "pacs", port=pacs_port) as scp:
            await _until(lambda: admin.report(store)["lanes"]["pacs"]["delivered"] == 2)
            got = scp.wait_files(2)
    for path in paths:
        assert got[envelope_of(path).sop_instance_uid] == after_meta(path)


async def test_refused_sop_class_is_dead_lettered_and_later_objects_delivered(tmp_path):
    files = study(tmp_path / "study")
    paths = list(files.values())
    sr = [p for p in paths if envelope_of(p).modality == "SR"]
    profile = storescp_profile(tmp_path / "scp.cfg", ["CTImageStorage", "MRImageStorage"])
    with Storescp(tmp_path / "pacs", accept_all=False,
                  extra=["-xf", str(profile), "Only"]) as scp:
        listener, store, pipeline = _graph(tmp_path, scp.port)
        async with running(pipeline, listener=listener, egress=[f"127.0.0.1:{scp.port}"]):
            port = listener.address[1]
            await trio.to_thread.run_sync(lambda: send_as_is(port, sr + paths))
            await _until(lambda: admin.report(store)["lanes"]["pacs"]["delivered"]
                         == len(paths) - len(sr))
            await _until(lambda: len(admin.dead_letters(store)) == len(sr))
        got = scp.wait_files(len(paths) - len(sr))
    dead = admin.dead_letters(store)
    assert [row["uid"] for row in dead] == [envelope_of(sr[0]).sop_instance_uid]
    assert dead[0]["reason"] == ("no accepted presentation context for "
                                 "1.2.840.10008.5.1.4.1.1.88.33 in 1.2.840.10008.1.2.1")
    assert set(got) == {envelope_of(p).sop_instance_uid for p in paths if p not in sr}


def test_flow_run_forwards_a_study_and_stops_cleanly_on_sigterm(tmp_path):
    """The operator's view: `flow run` with a site file, storescu in, storescp out, SIGTERM."""
    import signal

    from support.flowproc import FlowProcess

    files = study(tmp_path / "study")
    with Storescp(tmp_path / "pacs") as scp:
        listen_port, graph = write_site(tmp_path, scp.port)
        flow = FlowProcess(["run", *graph], tmp_path / "flow.log")
        try:
            flow.wait_for_log(r"dimse\.listening")
            results = send_as_is(listen_port, list(files.values()))
            assert [r.returncode for r in results] == [0] * len(results)
            got = scp.wait_files(len(files))
            flow.wait_for_log(r"dimse\.sent", count=len(files))
            flow.signal(signal.SIGTERM)
            assert flow.wait(30) == 0
        finally:
            flow.stop()
        log = flow.output()
    for uid, path in files.items():
        assert got[uid] == after_meta(path)
    assert "dimse.stopped" in log
    for part in (*CANARY_PARTS, CANARY_ID):
        assert part not in log
