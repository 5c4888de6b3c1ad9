"""DicomListener against real DCMTK peers (storescu, echoscu) on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import deque

import pytest
import trio

from nodes.dimse import DicomListener
from support.peers import need

sys.path.insert(0, os.path.dirname(__file__))
from dimse_support import (Committer, after_meta, listen_config, running, send_as_is,  # noqa: E402
                           storescu, study)

pytestmark = pytest.mark.peer("dcmtk")


async def test_mixed_study_arrives_byte_identical_with_envelope(tmp_path):
    files = study(tmp_path / "study")
    cfg = listen_config(calling_ae_titles=["MODALITY"])
    listener, sink = DicomListener(cfg), Committer(name="sink")
    async with running(listener >> sink, listener=listener):
        results = await trio.to_thread.run_sync(lambda: send_as_is(cfg.port, list(files.values())))
    assert [r.returncode for r in results] == [0] * len(results), [r.stderr for r in results]
    got = sink.by_uid()
    assert set(got) == set(files)
    for uid, path in files.items():
        assert after_meta(got[uid]) == after_meta(path), uid
    for arrival, data in sink.arrivals:
        env = arrival.envelope
        assert env.calling_ae == "MODALITY" and env.called_ae == "DICOMFLOW"
        assert env.peer.startswith("127.0.0.1:")
        assert env.modality in ("CT", "MR", "SR") and env.study_instance_uid
        assert env.transfer_syntax_uid == _ts(files[env.sop_instance_uid])


def _ts(path):
    from pydicom import dcmread
    return str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def _run(args):
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


async def test_echoscu_gets_success():
    exe = need("echoscu")["echoscu"]
    cfg = listen_config()
    listener = DicomListener(cfg)
    async with running(listener >> Committer(name="sink"), listener=listener):
        result = await trio.to_thread.run_sync(
            _run, [exe, "-aet", "MODALITY", "-aec", "DICOMFLOW", "127.0.0.1", str(cfg.port)])
    assert result.returncode == 0, result.stderr


async def test_calling_ae_outside_the_allowlist_is_rejected(tmp_path):
    files = study(tmp_path / "study")
    cfg = listen_config(calling_ae_titles=["CT01", "MR01"])
    listener, sink = DicomListener(cfg), Committer(name="sink")
    async with running(listener >> sink, listener=listener):
        bad = await trio.to_thread.run_sync(
            lambda: storescu(cfg.port, list(files.values())[:1], calling="INTRUDER"))
        good = await trio.to_thread.run_sync(
            lambda: storescu(cfg.port, list(files.values())[:1], calling="CT01"))
    assert bad.returncode != 0 and "Association Rejected" in bad.stderr
    assert "Calling AE Title Not Recognized" in bad.stderr
    assert good.returncode == 0, good.stderr
    assert [a.envelope.calling_ae for a, _ in sink.arrivals] == ["CT01"]
    assert listener.report()["listener"]["rejected"] == 1


async def test_wrong_called_ae_is_rejected(tmp_path):
    files = study(tmp_path / "study")
    cfg = listen_config()
    listener, sink = DicomListener(cfg), Committer(name="sink")
    async with running(listener >> sink, listener=listener):
        result = await trio.to_thread.run_sync(
            lambda: storescu(cfg.port, list(files.values())[:1], called="SOMEONEELSE"))
    assert result.returncode != 0 and "Called AE Title Not Recognized" in result.stderr
    assert sink.arrivals == []


async def test_scp_acks_only_after_commit(tmp_path):
    files = study(tmp_path / "study")
    gate = trio.Event()
    cfg = listen_config()
    listener, sink = DicomListener(cfg), Committer(gate=gate, name="sink")
    async with running(listener >> sink, listener=listener):
        async with trio.open_nursery() as nursery:
            done: list = []

            async def send():
                done.append(await trio.to_thread.run_sync(
                    lambda: storescu(cfg.port, list(files.values())[:1])))

            nursery.start_soon(send)
            with trio.fail_after(20):
                await sink.seen.wait()
            # The object reached the Store and is not committed: storescu cannot have an
            # answer yet, because the handler is still waiting for the receipt.
            assert done == []
            gate.set()
    assert done[0].returncode == 0, done[0].stderr


def _c_store(port: int, path, *, sop_class: str | None = None) -> int | None:
    """One C-STORE of the file at ``path`` sent as is (pynetdicom SCU); the response status."""
    from pynetdicom import AE

    from nodes.dimse import parse_file_meta
    from nodes.dimse._pynetdicom import configure

    configure()  # chunked send: the file's data set bytes go out unparsed
    meta = parse_file_meta(open(path, "rb").read())
    ae = AE("MODALITY")
    ae.add_requested_context(sop_class or meta.sop_class_uid, [meta.transfer_syntax_uid])
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMFLOW")
    if not assoc.is_established:
        return None  # no accepted presentation context: pynetdicom aborted
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()


@pytest.mark.parametrize("mode,status", [("full", 0xA700), ("fail", 0xA701), ("hang", 0xA702)])
async def test_store_refusals_are_answered_out_of_resources(tmp_path, mode, status):
    files = study(tmp_path / "study")
    cfg = listen_config(commit_timeout_ms=300)
    listener, sink = DicomListener(cfg), Committer(mode, name="sink")
    async with running(listener >> sink, listener=listener):
        got = await trio.to_thread.run_sync(_c_store, cfg.port, list(files.values())[0])
    assert got == status
    assert listener.report()["listener"]["stored"] == 0


async def test_objects_wait_in_order_while_the_store_is_behind_and_all_succeed(tmp_path):
    """More C-STOREs at once than the channel to the Store holds: the rest queue in the
    listener (no Trio task per object) and reach the Store in order as it makes room."""
    files = list(study(tmp_path / "study").values())[:4]
    gate = trio.Event()
    cfg = listen_config()
    listener = DicomListener(cfg)
    sink = Committer(gate=gate, name="sink", capacity=1)
    async with running(listener >> sink, listener=listener):
        async with trio.open_nursery() as nursery:
            statuses: dict = {}

            async def send(path):
                statuses[path] = await trio.to_thread.run_sync(_c_store, cfg.port, path)

            for path in files:
                nursery.start_soon(send, path)
            # one taken by the Store, one in the channel, one waiting in the listener's send,
            # one queued behind it
            with trio.fail_after(20):
                while len(listener._waiting) < 4 or len(listener._backlog) < 1:
                    await trio.sleep(0.01)
            order = [h.arrival.envelope.sop_instance_uid for h in listener._waiting]
            gate.set()
    assert list(statuses.values()) == [0x0000] * 4
    stored = [a.envelope.sop_instance_uid for a, _ in sink.arrivals]
    assert sorted(stored) == sorted(_uid(p) for p in files)
    assert stored == order  # in the order they were handed over
    assert listener._waiting == {}


async def test_an_object_queued_past_the_commit_timeout_never_reaches_the_store(tmp_path):
    files = list(study(tmp_path / "study").values())[:3]
    gate = trio.Event()
    cfg = listen_config(commit_timeout_ms=1000)
    listener = DicomListener(cfg)
    sink = Committer(gate=gate, name="sink", capacity=1)
    async with running(listener >> sink, listener=listener):
        async with trio.open_nursery() as nursery:
            statuses: list = []

            async def send(path):
                statuses.append(await trio.to_thread.run_sync(_c_store, cfg.port, path))

            for path in files:
                nursery.start_soon(send, path)
            with trio.fail_after(20):  # the third waits in the listener: the channel is full
                while len(listener._waiting) < 3:
                    await trio.sleep(0.01)
                queued = list(listener._waiting)[2].arrival.envelope.sop_instance_uid
                while len(statuses) < 3:  # every one answered when its commit timed out
                    await trio.sleep(0.01)
            gate.set()
            with trio.fail_after(20):
                while len(sink.arrivals) < 2:
                    await trio.sleep(0.01)
            assert listener._backlog == deque() and listener._waiting == {}
    assert statuses == [0xA702] * 3  # "not now": the sender keeps its copy
    stored = [a.envelope.sop_instance_uid for a, _ in sink.arrivals]
    assert len(stored) == 2 and queued not in stored


def _uid(path) -> str:
    from nodes.dimse import parse_file_meta

    return parse_file_meta(open(path, "rb").read()).sop_instance_uid


async def test_malformed_or_mismatched_dataset_is_refused_and_never_committed(tmp_path):
    from nodes.dimse import encode_file_meta
    from support.synth import ct, to_part10

    good = ct()
    meta = encode_file_meta(good.SOPClassUID, good.SOPInstanceUID, "1.2.840.10008.1.2.1")
    broken = tmp_path / "broken.dcm"  # a sequence whose item runs past the end
    broken.write_bytes(meta + b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100" + b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff"
                       + b"\xfe\xff\x00\xe0\x10\x00\x00\x00" + b"\x99" * 5)
    noise = tmp_path / "noise.dcm"  # parses, but names no SOP Class/Instance
    noise.write_bytes(meta + bytes(range(256)) * 2)
    other = tmp_path / "other.dcm"
    other.write_bytes(_with_meta_uid(to_part10(ct()), "1.2.3.999"))
    cfg = listen_config()
    listener, sink = DicomListener(cfg), Committer(name="sink")
    async with running(listener >> sink, listener=listener):
        statuses = [await trio.to_thread.run_sync(_c_store, cfg.port, path)
                    for path in (broken, noise, other)]
    assert statuses == [0xC000, 0xC000, 0xA900]
    assert sink.arrivals == []


async def test_a_data_set_cut_short_is_refused_from_memory_and_from_the_spool(tmp_path,
                                                                              caplog):
    """Success would tell the modality the object can be delivered: one whose last element
    runs past the end of its data set cannot, so it is refused with 0xC000 (the modality
    keeps it and can send it again) and never committed, small or spooled."""
    import logging

    from support.synth import ct, large_ct, to_part10

    small = tmp_path / "small.dcm"
    small.write_bytes(to_part10(ct())[:-100])  # cut inside Pixel Data
    big = large_ct(tmp_path / "big.dcm", megabytes=3)  # past INLINE_MAX: spooled
    whole_big = big.read_bytes()
    cut_big = tmp_path / "cut_big.dcm"
    cut_big.write_bytes(whole_big[:-1000])
    cfg = listen_config(spool_dir=str(tmp_path / "spool"))
    listener, sink = DicomListener(cfg), Committer(name="sink")
    caplog.set_level(logging.INFO)
    async with running(listener >> sink, listener=listener):
        statuses = [await trio.to_thread.run_sync(_c_store, cfg.port, path)
                    for path in (small, cut_big, big)]
    assert statuses == [0xC000, 0xC000, 0x0000]
    assert [a.envelope.sop_instance_uid for a, _ in sink.arrivals] == [_uid(big)]
    reasons = [r.fields.get("reason") for r in caplog.records
               if r.getMessage() == "dimse.refused"]
    assert reasons == ["data set cut short (element value runs past the end of the data "
                       "set)"] * 2
    assert list((tmp_path / "spool").iterdir()) == []


def _with_meta_uid(part10: bytes, uid: str) -> bytes:
    """The same data set behind a file meta naming another SOP Instance UID."""
    from nodes.dimse import encode_file_meta, parse_file_meta

    meta = parse_file_meta(part10)
    return encode_file_meta(meta.sop_class_uid, uid, meta.transfer_syntax_uid) + \
        part10[meta.dataset_offset:]


async def test_graceful_stop_refuses_new_associations_and_finishes_in_flight(tmp_path):
    exe = need("echoscu")["echoscu"]
    files = study(tmp_path / "study")
    gate = trio.Event()
    cfg = listen_config()
    listener, sink = DicomListener(cfg), Committer(gate=gate, name="sink")
    done: list = []
    async with running(listener >> sink, listener=listener) as runner:
        async with trio.open_nursery() as nursery:
            async def send():
                done.append(await trio.to_thread.run_sync(
                    lambda: storescu(cfg.port, list(files.values())[:1])))

            nursery.start_soon(send)
            with trio.fail_after(20):
                await sink.seen.wait()
            runner.stop()
            with trio.fail_after(10):
                while listener.listening.is_set():
                    await trio.sleep(0.01)
                echo = await trio.to_thread.run_sync(
                    _run, [exe, "-aec", "DICOMFLOW", "127.0.0.1", str(cfg.port)])
            assert echo.returncode != 0  # no new association once stopping
            gate.set()
    assert done[0].returncode == 0, done[0].stderr  # committed during the drain: Success
    assert len(sink.arrivals) == 1


async def test_logs_carry_no_phi(tmp_path, caplog):
    import logging

    from support.synth import CANARY_ID, CANARY_PARTS

    files = study(tmp_path / "study")
    cfg = listen_config()
    listener, sink = DicomListener(cfg), Committer(name="sink")
    with caplog.at_level(logging.INFO):
        async with running(listener >> sink, listener=listener):
            await trio.to_thread.run_sync(lambda: send_as_is(cfg.port, list(files.values())))
    from flow._log import SafeFieldsFilter

    lines = []
    for record in caplog.records:
        if record.levelno >= logging.INFO:
            SafeFieldsFilter().filter(record)
            lines.append(f"{record.getMessage()} {getattr(record, 'fields', {})}")
    text = "\n".join(lines)
    assert "dimse.stored" in text
    for part in (*CANARY_PARTS, CANARY_ID):
        assert part not in text


async def test_private_storage_class_is_accepted_only_when_configured(tmp_path):
    from support.synth import base_dataset, write

    private = "1.2.826.0.1.3680043.8.498.77.1"
    path = write(base_dataset(private, modality="OT"), tmp_path / "private.dcm")
    plain = listen_config()
    configured = listen_config(extra_sop_classes=[private])
    results = {}
    for name, cfg in (("plain", plain), ("configured", configured)):
        listener, sink = DicomListener(cfg), Committer(name="sink")
        async with running(listener >> sink, listener=listener):
            results[name] = await trio.to_thread.run_sync(_c_store, cfg.port, path)
        results[name + "_stored"] = len(sink.arrivals)
    assert results == {"plain": None, "plain_stored": 0, "configured": 0x0000,
                       "configured_stored": 1}


async def test_large_object_is_streamed_through_a_spool_file_not_memory(tmp_path):
    import hashlib
    import tracemalloc

    from nodes.dimse import encode_file_meta
    from support.synth import large_ct

    from pydicom import dcmread

    path = large_ct(tmp_path / "big.dcm", megabytes=40)
    ds = dcmread(path, stop_before_pixels=True)
    cfg = listen_config(spool_dir=str(tmp_path / "spool"))
    listener, sink = DicomListener(cfg), Committer(digest_only=True, name="sink")
    tracemalloc.start()
    try:
        async with running(listener >> sink, listener=listener):
            tracemalloc.reset_peak()
            result = await trio.to_thread.run_sync(lambda: storescu(cfg.port, [path]))
            _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.returncode == 0, result.stderr
    arrival, digest = sink.arrivals[0]
    expected = encode_file_meta(str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                                "1.2.840.10008.1.2.1", source_ae_title="MODALITY")
    assert digest == hashlib.sha256(expected + after_meta(path)).digest()
    assert peak < 8_000_000, f"peak {peak} bytes of Python memory for a 40 MB object"
    assert list((tmp_path / "spool").iterdir()) == []  # the spool file is gone after the ack


async def test_accepted_sockets_have_tcp_nodelay():
    import socket

    from pynetdicom import AE

    cfg = listen_config()
    listener = DicomListener(cfg)

    def associate():
        ae = AE("MODALITY")
        ae.add_requested_context("1.2.840.10008.1.1")
        return ae.associate("127.0.0.1", cfg.port, ae_title="DICOMFLOW")

    async with running(listener >> Committer(name="sink"), listener=listener):
        assoc = await trio.to_thread.run_sync(associate)
        try:
            assert assoc.is_established
            with trio.fail_after(5):
                while not listener._server.active_associations:
                    await trio.sleep(0.01)
            accepted = listener._server.active_associations[0].dul.socket.socket
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        finally:
            await trio.to_thread.run_sync(assoc.release)


async def test_object_cut_off_mid_transfer_leaves_no_spool_file(tmp_path):
    """storescu killed while a large object is arriving: the association aborts, nothing is
    committed, and the partial object (plaintext, on disk past 2 MiB) is deleted at once."""
    import signal

    from support.synth import large_ct

    path = large_ct(tmp_path / "big.dcm", megabytes=150)
    spool = tmp_path / "spool"
    cfg = listen_config(spool_dir=str(spool))
    listener, sink = DicomListener(cfg), Committer(digest_only=True, name="sink")
    async with running(listener >> sink, listener=listener):
        exe = need("storescu")["storescu"]
        proc = subprocess.Popen([exe, "-aet", "MODALITY", "-aec", "DICOMFLOW", "127.0.0.1",
                                 str(cfg.port), str(path)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            with trio.fail_after(30):
                while not list(spool.iterdir()):  # past 2 MiB: spilled to the spool dir
                    await trio.sleep(0.005)
            assert proc.poll() is None, "the object arrived before the test could cut it off"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        with trio.fail_after(30):
            while list(spool.iterdir()):
                await trio.sleep(0.02)
    assert sink.arrivals == []
    assert list(spool.iterdir()) == []


def test_spill_files_of_a_killed_process_are_swept_by_age_and_name(tmp_path):
    from nodes.dimse._pynetdicom import SpillFile, sweep_spill_files

    old, fresh = SpillFile(str(tmp_path)), SpillFile(str(tmp_path))
    for spill in (old, fresh):
        spill.begin_dataset(_meta())
        spill.threshold = 0
        spill.write(b"\x08\x00\x18\x00UI\x04\x001.2\x00")
        spill.close()
    other = tmp_path / "not-ours.dcm"
    other.write_bytes(b"x")
    hour_ago = os.stat(fresh.name).st_mtime - 7200
    os.utime(old.name, (hour_ago, hour_ago))
    os.utime(other, (hour_ago, hour_ago))
    assert sweep_spill_files(str(tmp_path)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [os.path.basename(fresh.name), "not-ours.dcm"])
    assert sweep_spill_files(str(tmp_path / "missing")) == 0


def _meta():
    from nodes.dimse._pynetdicom import _SpillMeta

    return _SpillMeta("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.1")
