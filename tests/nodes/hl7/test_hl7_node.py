"""ToHL7 in the flagship lane: Filter(is_structured_report) → ToHL7 → MllpSender, with
deliveries settled into a Recorder (as the Store's pump would) and a real MLLP RIS listener
on 127.0.0.1."""

from __future__ import annotations

import logging
import os
import sys

import pytest

from flow import EgressConfig, EgressPolicy, Graph, Runner
from flow._log import configure
from nodes.arrival import Envelope
from nodes.delivery import Recorder
from nodes.hl7 import (Handler, MllpSender, RisConfig, SRReportHandler, StudyNoticeHandler,
                       ToHL7, parse)
from nodes.outcome import Delivered, Permanent, Skipped
from nodes.payload import BytesPayload
from nodes.route import Filter, is_structured_report
from support.ris import RisListener
from support.synth import CANARY_ID, CANARY_PARTS, ct, to_part10
from support.flownodes import Feed

sys.path.insert(0, os.path.dirname(__file__))  # the helpers next to this file
import hl7_samples as samples  # noqa: E402


def delivery(recorder: Recorder, ds=None, *, data: bytes | None = None, uid: str = "",
             sop_class: str = ""):
    uid = uid or ds.SOPInstanceUID
    env = Envelope(uid, sop_class or str(getattr(ds, "SOPClassUID", "")), "1.2.840.10008.1.2.1")
    return recorder.delivery(env, BytesPayload(data if data is not None else to_part10(ds)),
                             "ris")


def reports(n: int):
    out = []
    for i in range(n):
        ds = samples.enhanced()
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.1234.88.{i}"
        out.append(ds)
    return out


async def run_lane(items, handler: Handler, listener: RisListener) -> MllpSender:
    with listener:
        sender = MllpSender(RisConfig(host="127.0.0.1", port=listener.port,
                                      ack_timeout_ms=2000))
        lane = (Feed(items, name="ris") >> Filter(is_structured_report, name="only_reports")
                >> ToHL7(handler, name="sr_to_oru") >> sender)
        graph = Graph(lane, egress=EgressPolicy(EgressConfig(
            allowed_tcp=[f"127.0.0.1:{listener.port}"])))
        await Runner(graph).run()
    return sender


class Exploding(SRReportHandler):
    """The SR handler, except that it raises (quoting the patient) for one object."""

    name, version = "exploding", "3"

    def handle(self, ds):
        if ds.SOPInstanceUID.endswith(".1"):
            raise KeyError(f"no mapping for {ds.PatientName}")
        return super().handle(ds)


async def test_a_raising_handler_dead_letters_only_its_object_and_the_lane_goes_on():
    recorder = Recorder()
    items = [delivery(recorder, ds) for ds in reports(3)]
    listener = RisListener(["AA"])
    await run_lane(items, Exploding(samples.RIS), listener)
    assert recorder.outcomes == {
        items[0].uid: Delivered(),
        items[1].uid: Permanent("handler exploding 3: KeyError"),
        items[2].uid: Delivered(),
    }
    assert len(listener.messages) == 2
    assert not any(part in repr(recorder.outcomes) for part in CANARY_PARTS)
    # the dead-lettered object's audit names the handler version too
    assert recorder.notes[items[1].uid] == ("handler exploding 3",)


async def test_handler_name_and_version_reach_the_settlement_with_the_outcome():
    recorder = Recorder()
    items = [delivery(recorder, ds) for ds in reports(2)]
    await run_lane(items, SRReportHandler(samples.RIS), RisListener(["AA", "AE"]))
    assert recorder.outcomes[items[0].uid] == Delivered()
    assert recorder.outcomes[items[1].uid] == Permanent("ack AE err 103")
    # the audit keeps which handler version made the message, delivered or not
    assert recorder.notes == {item.uid: ("handler sr-report 1.1",) for item in items}


async def test_the_ris_receives_the_message_the_handler_built():
    recorder = Recorder()
    ds = samples.basic_text(name="Müller^Jörg", charset="ISO_IR 100")
    listener = RisListener(["AA"])
    await run_lane([delivery(recorder, ds)], SRReportHandler(samples.RIS), listener)
    received = parse(listener.messages[0])
    assert received.charset == "8859/1"
    assert received.segment("PID").get(5) == "Müller"
    assert b"M\xfcller" in listener.messages[0]
    assert [o.get(5) for o in received.all("OBX")][-4] == ds.StudyInstanceUID


async def test_skips_and_unreadable_objects_are_settled_by_the_mapper():
    class OnlyVerified(SRReportHandler):
        name, version = "only-verified", "1"

        def handle(self, ds):
            return super().handle(ds) if ds.VerificationFlag == "VERIFIED" else None

    recorder = Recorder()
    unverified, verified = reports(2)
    verified.VerificationFlag = "VERIFIED"
    image = ct()
    items = [delivery(recorder, unverified), delivery(recorder, verified),
             delivery(recorder, image),
             delivery(recorder, data=b"not DICOM at all", uid="1.2.826.0.1.3680043.10.1234.99",
                      sop_class=samples.ENHANCED_SR)]
    listener = RisListener(["AA"])
    await run_lane(items, OnlyVerified(samples.RIS), listener)
    assert recorder.outcomes[items[0].uid] == Skipped("handler only-verified 1: skipped")
    assert recorder.notes[items[0].uid] == ("handler only-verified 1",)
    assert recorder.outcomes[items[1].uid] == Delivered()
    assert recorder.outcomes[items[2].uid] == Skipped("filter only_reports")
    # the Filter routes by the envelope (an SR): the mapper finds it unreadable
    assert isinstance(recorder.outcomes[items[3].uid], Permanent)
    assert len(listener.messages) == 1


async def test_tohl7_dead_letters_an_unreadable_header_by_error_class():
    recorder = Recorder()
    bad = delivery(recorder, data=b"not DICOM at all", uid="1.2.826.0.1.3680043.10.1234.98")
    good = delivery(recorder, reports(1)[0])
    with RisListener(["AA"]) as listener:
        sender = MllpSender(RisConfig(host="127.0.0.1", port=listener.port))
        graph = Graph(Feed([bad, good], name="ris") >> ToHL7(SRReportHandler(samples.RIS))
                      >> sender, egress=EgressPolicy(EgressConfig(
                          allowed_tcp=[f"127.0.0.1:{listener.port}"])))
        await Runner(graph).run()
    reason = recorder.outcomes[bad.uid].reason
    assert reason.startswith("handler sr-report 1.1: unreadable header (")
    assert recorder.outcomes[good.uid] == Delivered()


async def test_a_dicom_delivery_reaching_the_sender_is_dead_lettered_unsent():
    recorder = Recorder()
    item = delivery(recorder, reports(1)[0])  # no ToHL7 in front: still application/dicom
    with RisListener(["AA"]) as listener:
        graph = Graph(Feed([item], name="ris") >> MllpSender(
            RisConfig(host="127.0.0.1", port=listener.port)),
            egress=EgressPolicy(EgressConfig(allowed_tcp=[f"127.0.0.1:{listener.port}"])))
        await Runner(graph).run()
    assert recorder.outcomes[item.uid] == Permanent("not an HL7 v2 message (application/dicom)")
    assert listener.messages == [] and listener.connections == 0


async def test_study_notice_lane_announces_each_study_once_even_across_a_restart(tmp_path):
    study_a = [ct(), None, None]
    study_a[1] = ct(study_uid=study_a[0].StudyInstanceUID)
    study_a[2] = ct(study_uid=study_a[0].StudyInstanceUID)
    study_b = ct()

    async def lane(datasets, listener):
        recorder = Recorder()
        items = [delivery(recorder, ds) for ds in datasets]
        with listener:
            graph = Graph(Feed(items, name="ris") >> ToHL7(StudyNoticeHandler(
                samples.RIS, state_dir=tmp_path), name="study_notice") >> MllpSender(
                RisConfig(host="127.0.0.1", port=listener.port)),
                egress=EgressPolicy(EgressConfig(allowed_tcp=[f"127.0.0.1:{listener.port}"])))
            await Runner(graph).run()
        return [recorder.outcomes[item.uid] for item in items]

    first_run = RisListener(["AA"])
    assert await lane([study_a[0], study_a[1], study_b], first_run) == [
        Delivered(), Skipped("handler study-notice 1.0: skipped"), Delivered()]
    assert [parse(m).all("OBX")[0].get(5) for m in first_run.messages] == [
        study_a[0].StudyInstanceUID, study_b.StudyInstanceUID]
    # the process restarts; more images of study A arrive: no second notice
    second_run = RisListener(["AA"])
    assert await lane([study_a[2]], second_run) == [Skipped("handler study-notice 1.0: skipped")]
    assert second_run.messages == []


async def test_a_custom_handler_that_declares_no_charset_still_sends_a_non_ascii_name():
    from test_hl7_readme_example import KEY_OBJECT_SELECTION, KeyImagesToRis

    recorder = Recorder()
    kos = reports(1)[0]
    kos.SOPClassUID, kos.PatientName = KEY_OBJECT_SELECTION, "Müller^Jörg"
    listener = RisListener(["AA"])
    with listener:
        graph = Graph(Feed([delivery(recorder, kos)], name="ris")
                      >> ToHL7(KeyImagesToRis(samples.RIS)) >> MllpSender(
                          RisConfig(host="127.0.0.1", port=listener.port)),
                      egress=EgressPolicy(EgressConfig(
                          allowed_tcp=[f"127.0.0.1:{listener.port}"])))
        await Runner(graph).run()
    assert recorder.outcomes == {kos.SOPInstanceUID: Delivered()}
    received = parse(listener.messages[0])
    assert received.charset == "UNICODE UTF-8" and "Müller".encode() in listener.messages[0]


def test_tohl7_wants_a_handler_instance():
    with pytest.raises(TypeError):
        ToHL7(SRReportHandler)
    with pytest.raises(TypeError):
        ToHL7(object())


async def test_phi_canary_never_reaches_logs_or_reasons(capsys):
    configure("DEBUG", stream=sys.stderr)  # DEBUG too: nothing here logs a dataset value
    try:
        recorder = Recorder()
        items = [delivery(recorder, ds) for ds in reports(4)]
        await run_lane(items, Exploding(samples.RIS), RisListener(["AE", "garbage", "AA"]))
    finally:
        logging.getLogger().handlers.clear()
    captured = capsys.readouterr()
    text = captured.err + captured.out + repr(recorder.outcomes) + repr(recorder.notes)
    assert "hl7.handler_failed" in text and "mllp.not_delivered" in text
    for secret in (*CANARY_PARTS, CANARY_ID, "ACC0001"):
        assert secret not in text
