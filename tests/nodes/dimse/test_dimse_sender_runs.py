"""CStoreSender: objects already waiting go out back to back on one association, in one call
of its worker thread, and every object of such a run gets its own outcome.

The PACS is a pynetdicom SCP on 127.0.0.1 (a real association over TCP) whose C-STORE
handler answers each object with the status the test chose for it.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import trio
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage

from nodes.delivery import Recorder
from nodes.dimse import CStoreSender
from nodes.dimse import sender as sender_module
from nodes.outcome import Delivered, Permanent, Transient
from support.peers import free_port
from support.studies import assert_no_phi
from support.synth import ct, write

sys.path.insert(0, os.path.dirname(__file__))
from dimse_support import Feed, deliveries, pacs_config, run_to_end  # noqa: E402


class Pacs:
    """A pynetdicom SCP (``sop_classes`` in explicit VR little endian) that stores nothing:
    it records each SOP Instance UID it was sent and answers with ``answer(n)`` for the n-th C-STORE (0-based): a status, or a number of
    seconds to sleep before answering Success (longer than the sender waits)."""

    def __init__(self, answer, sop_classes=(CTImageStorage,)) -> None:
        self.answer = answer
        self.received: list[str] = []
        self._lock = threading.Lock()
        self.ae = AE("PACS")
        for sop_class in sop_classes:
            self.ae.add_supported_context(sop_class, ["1.2.840.10008.1.2.1"])
        self.port = free_port()

    def _store(self, event) -> int:
        with self._lock:
            n = len(self.received)
            self.received.append(str(event.request.AffectedSOPInstanceUID))
        answer = self.answer(n)
        if isinstance(answer, float):
            time.sleep(answer)
            return 0x0000
        return answer

    def __enter__(self) -> Pacs:
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._store)])
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()


def _count_worker_calls(monkeypatch) -> list[str]:
    """Names of the functions CStoreSender runs in its worker thread, in order."""
    calls: list[str] = []
    original = CStoreSender._blocking

    async def counting(self, fn, *args, **kw):
        calls.append(fn.__name__)
        return await original(self, fn, *args, **kw)

    monkeypatch.setattr(CStoreSender, "_blocking", counting)
    return calls


async def test_waiting_objects_go_out_back_to_back_in_one_worker_call(tmp_path, monkeypatch):
    calls = _count_worker_calls(monkeypatch)
    paths = [write(ct(), tmp_path / f"ct{i}.dcm") for i in range(12)]
    recorder = Recorder()
    with Pacs(lambda n: 0x0000) as pacs:
        cfg = pacs_config(pacs.port, called_ae_title="PACS", max_associations=1)
        sender = CStoreSender(cfg)
        items = deliveries(recorder, paths)
        await run_to_end(Feed(items, name="feed") >> sender, egress=[f"127.0.0.1:{pacs.port}"])
    assert recorder.outcomes == {d.uid: Delivered() for d in items}
    assert pacs.received == [d.uid for d in items]  # in order, each once
    # The first object opens the association and goes alone; the other eleven were waiting
    # meanwhile: runs of at most RUN_MAX, not one worker call each.
    sends = [name for name in calls if name != "associate"]
    assert calls[0] == "associate" and calls.count("associate") == 1
    assert sends == ["_stage_and_send", "_store_run", "_store_run"], calls
    assert sender_module.RUN_MAX == 8
    assert sender.report()["lanes"]["feed"]["delivered"] == 12


async def test_each_object_of_a_run_gets_its_own_status_and_is_sent_once(tmp_path, monkeypatch,
                                                                         caplog):
    import logging

    caplog.set_level(logging.INFO, logger="nodes.dimse.sender")
    calls = _count_worker_calls(monkeypatch)
    statuses = [0x0000, 0x0000, 0xA700, 0xB000, 0xC000, 0x0000, 0xA900, 0x0000]
    paths = [write(ct(), tmp_path / f"ct{i}.dcm") for i in range(len(statuses))]
    recorder = Recorder()
    with Pacs(lambda n: statuses[n]) as pacs:
        cfg = pacs_config(pacs.port, max_associations=1)
        items = deliveries(recorder, paths)
        await run_to_end(Feed(items, name="feed") >> CStoreSender(cfg),
                         egress=[f"127.0.0.1:{pacs.port}"])
    assert [recorder.outcomes[d.uid] for d in items] == [
        Delivered(), Delivered(), Transient("C-STORE status 0xA700"),
        Delivered("C-STORE warning 0xB000"), Permanent("C-STORE status 0xC000"), Delivered(),
        Permanent("C-STORE status 0xA900"), Delivered()]
    # A failure status ends no run: the association is fine, the next object goes on it.
    assert pacs.received == [d.uid for d in items]
    assert calls == ["associate", "_stage_and_send", "_store_run"]
    sent = [(r.getMessage(), r.fields["status"]) for r in caplog.records
            if r.getMessage().startswith("dimse.")]
    assert sent == [("dimse.sent", "0x0000"), ("dimse.sent", "0x0000"),
                    ("dimse.not_sent", "0xA700"), ("dimse.sent", "0xB000"),
                    ("dimse.not_sent", "0xC000"), ("dimse.sent", "0x0000"),
                    ("dimse.not_sent", "0xA900"), ("dimse.sent", "0x0000")]
    assert_no_phi(" ".join(f"{r.getMessage()} {getattr(r, 'fields', '')}"
                           for r in caplog.records), "the sender's log")


async def test_a_run_cut_short_by_a_lost_response_sends_the_rest_one_at_a_time(
        tmp_path, monkeypatch):
    """The PACS answers the third object too late: that object is Transient (the association
    is let go), and the objects after it are not lost with the run: each goes out on a new
    association."""
    calls = _count_worker_calls(monkeypatch)
    paths = [write(ct(), tmp_path / f"ct{i}.dcm") for i in range(6)]
    recorder = Recorder()
    with Pacs(lambda n: 3.0 if n == 2 else 0x0000) as pacs:
        cfg = pacs_config(pacs.port, max_associations=1, timeout_ms=1000)
        items = deliveries(recorder, paths)
        with trio.fail_after(60):
            await run_to_end(Feed(items, name="feed") >> CStoreSender(cfg),
                             egress=[f"127.0.0.1:{pacs.port}"])
    late = recorder.outcomes[items[2].uid]
    assert isinstance(late, Transient) and f"127.0.0.1:{pacs.port}" in late.reason, late
    assert {d.uid: recorder.outcomes[d.uid] for d in items if d is not items[2]} == {
        d.uid: Delivered() for d in items if d is not items[2]}
    assert pacs.received == [d.uid for d in items]  # each sent once, in order
    # One run (objects 2 to 6) stopped at the lost response; the rest went one at a time,
    # the first of them on a new association.
    assert calls[:3] == ["associate", "_stage_and_send", "_store_run"], calls
    assert calls[3:] == ["associate", "_stage_and_send", "_stage_and_send",
                         "_stage_and_send"], calls


async def test_an_unreadable_payload_or_a_stale_envelope_in_a_run_loses_no_other_object(
        tmp_path, monkeypatch):
    """A run stops at a payload that is not DICOM (Permanent, as alone) and the rest go one
    at a time, among them an object whose envelope names the wrong SOP class: its own file
    meta decides its context, as for an object sent alone."""
    import msgspec

    from nodes.payload import BytesPayload
    from pynetdicom.sop_class import MRImageStorage
    from support.synth import mr

    calls = _count_worker_calls(monkeypatch)
    cts = [write(ct(), tmp_path / f"ct{i}.dcm") for i in range(4)]
    recorder = Recorder()
    ct_items = deliveries(recorder, cts)
    stale = deliveries(recorder, [write(mr(), tmp_path / "mr.dcm")])[0]
    stale.envelope = msgspec.structs.replace(stale.envelope,
                                             sop_class_uid=ct_items[0].envelope.sop_class_uid)
    junk_env = msgspec.structs.replace(ct_items[0].envelope, sop_instance_uid="1.2.3.4")
    junk = recorder.delivery(junk_env, BytesPayload(b"not dicom at all" * 20), "pacs")
    items = [ct_items[0], ct_items[1], junk, ct_items[2], stale, ct_items[3]]
    with Pacs(lambda n: 0x0000, (CTImageStorage, MRImageStorage)) as pacs:
        cfg = pacs_config(pacs.port, max_associations=1)
        await run_to_end(Feed(items, name="feed") >> CStoreSender(cfg),
                         egress=[f"127.0.0.1:{pacs.port}"])
    assert recorder.outcomes == {
        **{d.uid: Delivered() for d in [*ct_items, stale]},
        "1.2.3.4": Permanent("payload is not a DICOM Part 10 file (no DICM prefix at byte 128)")}
    assert pacs.received == [d.uid for d in items if d is not junk]  # each once, in order
    assert calls[:3] == ["associate", "_stage_and_send", "_store_run"], calls
    assert calls.count("associate") == 1  # the MR's context was proposed up front
