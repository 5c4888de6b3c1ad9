"""STOW-RS lane against a real Orthanc + DICOMweb plugin on 127.0.0.1 (issue 6)."""

from __future__ import annotations

import os
import sys

import pytest
from pydicom.uid import ExplicitVRLittleEndian

from nodes.delivery import Recorder
from nodes.outcome import Delivered, Transient
from nodes.stow import StowConfig
from support.synth import ct, dataset_bytes_after_meta, mixed_study_part10, to_part10

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "nodes", "stow"))
from support.orthanc import OrthancServer  # noqa: E402
from stow_harness import deliveries, run_sender  # noqa: E402

pytestmark = pytest.mark.peer("orthanc")

STUDY = "1.2.826.0.1.3680043.2.1143.6.1"


def mixed_study() -> list[bytes]:
    return mixed_study_part10(STUDY)


def config(orthanc: OrthancServer, **kw) -> StowConfig:
    return StowConfig(**{"url": orthanc.dicomweb, "timeout_ms": 30_000,
                         "batch_max_instances": 3, "linger_ms": 50, "max_connections": 2,
                         **kw})


async def test_mixed_study_arrives_byte_identical(orthanc):
    orthanc.start()
    files = mixed_study()
    rec = Recorder()
    items = deliveries(rec, files)
    await run_sender(config(orthanc), items)
    assert [i.outcome for i in items] == [Delivered()] * len(files)
    stored = orthanc.stored_files_by_uid()
    assert set(stored) == {i.uid for i in items}
    for item, original in zip(items, files):
        assert dataset_bytes_after_meta(stored[item.uid]) == dataset_bytes_after_meta(original)


async def test_orthanc_down_is_transient_then_delivered_after_start(orthanc):
    files = mixed_study()[:4]
    first = deliveries(Recorder(), files)
    await run_sender(config(orthanc), first)
    assert all(isinstance(i.outcome, Transient) for i in first)
    assert {i.outcome.reason for i in first} == {"transport error: ConnectError"}

    orthanc.start()
    again = deliveries(Recorder(), files)  # what the Store's retry hands the lane
    await run_sender(config(orthanc), again)
    assert [i.outcome for i in again] == [Delivered()] * len(files)
    assert set(orthanc.stored_files_by_uid()) == {i.uid for i in again}


async def test_resending_an_instance_orthanc_already_has_is_delivered(orthanc):
    orthanc.start()
    files = mixed_study()[:2]
    await run_sender(config(orthanc), deliveries(Recorder(), files))
    again = deliveries(Recorder(), files)
    await run_sender(config(orthanc), again)
    assert [i.outcome for i in again] == [Delivered()] * 2


async def test_an_unreadable_part_is_dead_lettered_alone(orthanc):
    # Orthanc answers 400 but stores the readable parts and lists them: only the bad one
    # is permanent.
    from nodes.arrival import Envelope
    from nodes.outcome import Permanent
    from nodes.payload import BytesPayload

    orthanc.start()
    good = mixed_study()[:2]
    bad = (Envelope(sop_instance_uid="1.2.826.0.1.3680043.2.1143.6.9.9",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    transfer_syntax_uid=ExplicitVRLittleEndian), BytesPayload(b"\0" * 300))
    items = deliveries(Recorder(), [good[0], bad, good[1]])
    await run_sender(config(orthanc), items)
    assert items[0].outcome == Delivered() and items[2].outcome == Delivered()
    assert isinstance(items[1].outcome, Permanent)
    assert items[1].outcome.reason.startswith("HTTP 4")


async def test_auth_header_from_a_file_is_accepted_and_a_wrong_one_is_permanent(tmp_path,
                                                                                caplog):
    import base64
    import logging

    from nodes.outcome import Permanent

    caplog.set_level(logging.INFO)
    password = "pw-7b3e-not-for-logs"
    server = OrthancServer(tmp_path / "orthanc-auth", extra={
        "AuthenticationEnabled": True, "RegisteredUsers": {"flow": password}})
    token = tmp_path / "token"
    token.write_text("Basic " + base64.b64encode(f"flow:{password}".encode()).decode() + "\n")
    wrong = tmp_path / "wrong"
    wrong.write_text("Basic " + base64.b64encode(b"flow:nope").decode())
    try:
        server.start()
        files = mixed_study()[:3]
        good = deliveries(Recorder(), files)
        await run_sender(config(server, auth_header_file=str(token)), good)
        assert [i.outcome for i in good] == [Delivered()] * 3
        refused = deliveries(Recorder(), files)
        await run_sender(config(server, auth_header_file=str(wrong)), refused)
        assert [i.outcome for i in refused] == [Permanent("HTTP 401")] * 3
    finally:
        server.kill()  # nothing reads its storage afterwards
    logged = "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records)
    assert password not in logged and token.read_text().strip() not in logged


async def test_a_large_instance_streams_into_orthanc_byte_identical(orthanc, tmp_path):
    from nodes.payload import FilePayload
    from stow_harness import envelope_of

    orthanc.start()
    path = tmp_path / "large.dcm"
    path.write_bytes(to_part10(ct(study_uid=STUDY, rows=2048, cols=2048)))  # ~8 MB
    items = deliveries(Recorder(), [(envelope_of(path), FilePayload(path))]
                       + mixed_study()[:2])
    await run_sender(config(orthanc, batch_max_bytes=4 << 20), items)
    assert [i.outcome for i in items] == [Delivered()] * 3
    stored = orthanc.stored_files_by_uid()
    assert dataset_bytes_after_meta(stored[items[0].uid]) == \
        dataset_bytes_after_meta(path.read_bytes())
