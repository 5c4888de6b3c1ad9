"""CStoreSender against a real DCMTK storescp on 127.0.0.1."""

from __future__ import annotations

import os
import sys
import threading

import pytest
import trio

from nodes.delivery import Recorder
from nodes.dimse import CStoreSender
from nodes.outcome import Delivered, Permanent, Transient
from support.peers import free_port

sys.path.insert(0, os.path.dirname(__file__))
from dimse_support import (Feed, Storescp, after_meta, deliveries, envelope_of,  # noqa: E402
                           pacs_config, run_to_end, running, send_all, storescp_profile,
                           study)

pytestmark = pytest.mark.peer("dcmtk")


def _egress(cfg):
    return [f"{cfg.host}:{cfg.port}"]


@pytest.mark.parametrize("in_memory", [False, True], ids=["file", "stream"])
async def test_mixed_study_arrives_byte_identical_at_storescp(tmp_path, in_memory):
    files = study(tmp_path / "study")
    with Storescp(tmp_path / "pacs") as scp:
        sender = CStoreSender(pacs_config(scp.port, max_associations=1))
        recorder, got = await send_all(files, scp, sender, in_memory=in_memory)
    assert recorder.outcomes == {uid: Delivered() for uid in files}
    assert set(got) == set(files)
    for uid, path in files.items():
        assert got[uid] == after_meta(path), uid
    lane = sender.report()["lanes"]["feed"]
    assert lane["delivered"] == len(files)
    assert lane["associations"] == 1  # every pair of the study was proposed up front


async def test_storescp_down_is_transient_with_routing_safe_reason(tmp_path):
    files = study(tmp_path / "study")
    port = free_port()
    recorder = Recorder()
    cfg = pacs_config(port)
    items = deliveries(recorder, list(files.values())[:2])
    await run_to_end(Feed(items, name="feed") >> CStoreSender(cfg), egress=_egress(cfg))
    assert recorder.outcomes == {
        d.uid: Transient(f"connection refused 127.0.0.1:{port}") for d in items}


async def test_storescp_back_up_delivers_the_retry(tmp_path):
    files = study(tmp_path / "study")
    port = free_port()
    recorder = Recorder()
    path = list(files.values())[0]
    cfg = pacs_config(port)
    first = deliveries(recorder, [path])
    await run_to_end(Feed(first, name="feed") >> CStoreSender(cfg), egress=_egress(cfg))
    assert isinstance(recorder.outcomes[first[0].uid], Transient)
    with Storescp(tmp_path / "pacs", port=port) as scp:
        retry = deliveries(recorder, [path])
        retry[0].attempt = 2
        await run_to_end(Feed(retry, name="feed") >> CStoreSender(cfg), egress=_egress(cfg))
        got = scp.wait_files(1)
    assert recorder.outcomes[first[0].uid] == Delivered()
    assert got[first[0].uid] == after_meta(path)


async def test_rejected_sop_class_is_permanent_and_later_objects_unaffected(tmp_path):
    files = study(tmp_path / "study")
    paths = list(files.values())
    sr = [p for p in paths if "88.33" in envelope_of(p).sop_class_uid]
    others = [p for p in paths if p not in sr]
    order = others[:2] + sr + others[2:]  # the refused class sits in the middle
    profile = storescp_profile(tmp_path / "scp.cfg", ["CTImageStorage", "MRImageStorage"])
    recorder = Recorder()
    with Storescp(tmp_path / "pacs", accept_all=False,
                  extra=["-xf", str(profile), "Only"]) as scp:
        cfg = pacs_config(scp.port)
        await run_to_end(Feed(deliveries(recorder, order), name="feed") >> CStoreSender(cfg),
                         egress=_egress(cfg))
        got = scp.wait_files(len(others))
    sr_uid = envelope_of(sr[0]).sop_instance_uid
    assert recorder.outcomes[sr_uid] == Permanent(
        "no accepted presentation context for 1.2.840.10008.5.1.4.1.1.88.33 "
        "in 1.2.840.10008.1.2.1")
    for path in others:
        uid = envelope_of(path).sop_instance_uid
        assert recorder.outcomes[uid] == Delivered()
        assert got[uid] == after_meta(path)


async def test_refused_association_is_permanent_with_rejection_codes(tmp_path):
    files = study(tmp_path / "study")
    recorder = Recorder()
    with Storescp(tmp_path / "pacs", extra=["--refuse"]) as scp:
        cfg = pacs_config(scp.port)
        items = deliveries(recorder, list(files.values())[:1])
        await run_to_end(Feed(items, name="feed") >> CStoreSender(cfg), egress=_egress(cfg))
    assert recorder.outcomes[items[0].uid] == Permanent(
        "association rejected (permanent) result=1 source=1 reason=1")


async def test_abort_after_the_request_is_transient(tmp_path):
    files = study(tmp_path / "study")
    recorder = Recorder()
    with Storescp(tmp_path / "pacs", extra=["--abort-after"]) as scp:
        cfg = pacs_config(scp.port)
        items = deliveries(recorder, list(files.values())[:2])
        await run_to_end(Feed(items, name="feed") >> CStoreSender(cfg), egress=_egress(cfg))
    for item in items:
        outcome = recorder.outcomes[item.uid]
        assert isinstance(outcome, Transient), outcome
        assert f"127.0.0.1:{cfg.port}" in outcome.reason


def _established_to(port: int) -> bool:
    """Whether a TCP connection *to* 127.0.0.1:port is still established (Linux /proc)."""
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return any(int(row[2].split(":")[1], 16) == port and row[3] == "01" for row in rows)


def _new_threads(before: set[threading.Thread]) -> list[str]:
    """Live threads started since ``before`` was taken, except idle Trio cache workers (they
    idle out on their own). Threads of earlier tests still winding down (an acceptor waiting
    out its ACSE timeout) may end meanwhile; they are not this test's."""
    return sorted(t.name for t in threading.enumerate()
                  if t not in before and not t.name.startswith("Trio thread"))


async def test_cancelling_mid_association_aborts_it_without_leaking_a_thread(tmp_path):
    files = study(tmp_path / "study")
    recorder = Recorder()
    before = set(threading.enumerate())
    with Storescp(tmp_path / "pacs", extra=["--sleep-during", "30"], fork=False) as scp:
        cfg = pacs_config(scp.port, timeout_ms=60_000)
        sender = CStoreSender(cfg)
        items = deliveries(recorder, list(files.values())[:1])
        hold = trio.Event()
        with trio.move_on_after(30) as guard:
            async with running(Feed(items, hold=hold, name="feed") >> sender,
                               egress=_egress(cfg)) as runner:
                while sender.report()["lanes"].get("feed", {}).get("associations", 0) < 1:
                    await trio.sleep(0.02)
                await trio.sleep(0.2)  # the C-STORE is on the wire; storescp sleeps in it
                runner.abort()
        assert not guard.cancelled_caught
        with trio.fail_after(10):
            while _new_threads(before) or _established_to(scp.port):
                await trio.sleep(0.05)
    assert recorder.outcomes == {}  # unsettled: the Store re-queues it


async def test_file_meta_wins_over_a_stale_envelope_and_non_dicom_is_permanent(tmp_path):
    import msgspec

    from nodes.payload import BytesPayload

    files = study(tmp_path / "study")
    path = list(files.values())[0]  # explicit VR little endian
    recorder = Recorder()
    stale = deliveries(recorder, [path])[0]
    stale.envelope = msgspec.structs.replace(stale.envelope,
                                             transfer_syntax_uid="1.2.840.10008.1.2")
    junk_env = msgspec.structs.replace(stale.envelope, sop_instance_uid="1.2.3.4")
    junk = recorder.delivery(junk_env, BytesPayload(b"not dicom at all" * 20), "pacs")
    with Storescp(tmp_path / "pacs") as scp:
        cfg = pacs_config(scp.port)
        await run_to_end(Feed([stale, junk], name="feed") >> CStoreSender(cfg),
                         egress=_egress(cfg))
        got = scp.wait_files(1)
    assert recorder.outcomes[stale.uid] == Delivered()
    assert got[stale.uid] == after_meta(path)
    assert recorder.outcomes["1.2.3.4"] == Permanent(
        "payload is not a DICOM Part 10 file (no DICM prefix at byte 128)")


async def test_egress_outside_the_allowlist_is_refused_before_connecting(tmp_path):
    from flow import EgressDenied

    files = study(tmp_path / "study")
    recorder = Recorder()
    cfg = pacs_config(free_port())
    with pytest.raises(EgressDenied, match=f"egress to tcp://127.0.0.1:{cfg.port} refused"):
        await run_to_end(Feed(deliveries(recorder, list(files.values())[:1]), name="feed")
                         >> CStoreSender(cfg), egress=["127.0.0.1:1"])
    assert recorder.outcomes == {}


async def test_association_is_reused_then_released_when_idle(tmp_path):
    from support.synth import ct, write

    paths = [write(ct(), tmp_path / f"ct{i}.dcm") for i in range(6)]
    recorder = Recorder()
    hold = trio.Event()
    with Storescp(tmp_path / "pacs") as scp:
        cfg = pacs_config(scp.port, max_associations=1, idle_release_ms=200)
        sender = CStoreSender(cfg)
        async with running(Feed(deliveries(recorder, paths), hold=hold, name="feed") >> sender,
                           egress=_egress(cfg)):
            with trio.fail_after(20):
                while len(recorder.outcomes) < len(paths):
                    await trio.sleep(0.02)
                lane = sender.report()["lanes"]["feed"]
                assert lane["associations"] == 1  # six objects, one association
                while sender.report()["lanes"]["feed"]["open_associations"]:
                    await trio.sleep(0.02)  # released after idle_release_ms without work
            hold.set()
        got = scp.wait_files(len(paths))
    assert set(recorder.outcomes.values()) == {Delivered()}
    assert len(got) == len(paths)


async def test_a_second_association_opens_while_the_first_is_busy(tmp_path):
    limit = 2
    from support.synth import ct, write

    paths = [write(ct(), tmp_path / f"ct{i}.dcm") for i in range(2)]
    recorder = Recorder()
    # storescp sleeps 1 s inside each C-STORE: the first association is busy meanwhile.
    with Storescp(tmp_path / "pacs", extra=["--sleep-during", "1"]) as scp:
        cfg = pacs_config(scp.port, max_associations=limit)
        sender = CStoreSender(cfg)
        await run_to_end(Feed(deliveries(recorder, paths), name="feed") >> sender,
                         egress=_egress(cfg))
    assert set(recorder.outcomes.values()) == {Delivered()}
    assert sender.report()["lanes"]["feed"]["associations"] == limit


async def test_large_streamed_payload_is_sent_without_holding_it_in_memory(tmp_path):
    import tracemalloc

    from nodes.payload import SplicedPayload
    from nodes.payload import FilePayload
    from support.synth import large_ct

    path = large_ct(tmp_path / "big.dcm", megabytes=40)
    recorder = Recorder()
    # A payload that is not a plain file (like the Store's decrypting spool payloads).
    payload = SplicedPayload(b"", FilePayload(path), 0)
    item = recorder.delivery(envelope_of(path), payload, "pacs")
    with Storescp(tmp_path / "pacs") as scp:
        os.makedirs(tmp_path / "stage")
        cfg = pacs_config(scp.port, spool_dir=str(tmp_path / "stage"))
        sender = CStoreSender(cfg)
        tracemalloc.start()
        try:
            await run_to_end(Feed([item], name="feed") >> sender, egress=_egress(cfg))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        got = scp.wait_files(1)
    assert recorder.outcomes[item.uid] == Delivered()
    assert got[item.uid] == after_meta(path)
    assert peak < 8_000_000, f"peak {peak} bytes of Python memory for a 40 MB object"
    assert os.listdir(sender.spool_dir) == []  # the staged copy is gone


async def test_outbound_socket_has_tcp_nodelay(tmp_path):
    import socket

    from support.synth import ct, write

    recorder = Recorder()
    hold = trio.Event()
    with Storescp(tmp_path / "pacs") as scp:
        cfg = pacs_config(scp.port, idle_release_ms=60_000)
        sender = CStoreSender(cfg)
        items = deliveries(recorder, [write(ct(), tmp_path / "ct.dcm")])
        async with running(Feed(items, hold=hold, name="feed") >> sender, egress=_egress(cfg)):
            with trio.fail_after(20):
                while not recorder.outcomes:
                    await trio.sleep(0.02)
            slot = sender._slots["feed"][0]
            sock = slot.assoc.dul.socket.socket
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            hold.set()


async def test_a_pacs_serving_one_association_at_a_time_never_holds_an_object(tmp_path, caplog):
    """Plain storescp (no --fork) answers a second A-ASSOCIATE-RQ only once the first
    association is released: no object may be handed to that second association, and once
    the PACS has shown it serves one at a time the lane keeps to one."""
    import logging

    from support.studies import assert_no_phi
    from support.synth import ct, write

    caplog.set_level(logging.INFO, logger="nodes.dimse.sender")

    def events(name):
        return [r.fields for r in caplog.records if r.getMessage() == name]

    first = [write(ct(), tmp_path / f"a{i}.dcm") for i in range(2)]
    later = [write(ct(), tmp_path / f"b{i}.dcm") for i in range(20)]
    recorder = Recorder()
    # storescp sleeps inside each C-STORE: the first association is busy once open, so the
    # sender opens a second one ahead while the PACS serves the first.
    with Storescp(tmp_path / "pacs", fork=False, extra=["--sleep-during", "1"]) as scp:
        cfg = pacs_config(scp.port, max_associations=2)
        sender = CStoreSender(cfg)
        await run_to_end(Feed(deliveries(recorder, first), name="feed") >> sender,
                         egress=_egress(cfg))
    # Accepted only once the first association was released (at the lane's end).
    assert [(e["association"], e["established"], e["others_open"])
            for e in events("dimse.association_ahead")] == [(1, True, 0)]
    assert len(events("dimse.one_association_at_a_time")) == 1
    assert [e["association"] for e in events("dimse.sent")] == [0, 0]

    # The same PACS without the sleep: the lane keeps to one association, none opened ahead.
    opened = sender.report()["lanes"]["feed"]["associations"]
    with Storescp(tmp_path / "pacs", port=scp.port, fork=False) as scp:
        await run_to_end(Feed(deliveries(recorder, later), name="feed") >> sender,
                         egress=_egress(cfg))
        got = scp.wait_files(len(first) + len(later))
    assert len(events("dimse.association_ahead")) == 1
    assert sender.report()["lanes"]["feed"]["associations"] == opened + 1
    assert {e["association"] for e in events("dimse.sent")} == {0}
    assert recorder.outcomes == {d: Delivered() for d in recorder.outcomes}
    assert len(recorder.outcomes) == len(got) == len(first) + len(later)
    # The synthetic objects carry the PHI canary.
    assert_no_phi(" ".join(f"{r.getMessage()} {getattr(r, 'fields', '')}"
                           for r in caplog.records), "the sender's log")
