"""C-STORE with directly encoded command sets says on the wire what pynetdicom says.

``encode_store_rsp`` / ``encode_store_rq`` must produce pynetdicom's command sets byte for
byte and ``store_rq_pdvs`` its fragments; an association with ``answer_stores_directly``
must answer every case pynetdicom's StorageServiceClass answers (handler status, handler
exception, status Dataset, an EVT_DIMSE_SENT subscriber) the same way, seen from a real SCU
across a socket; the sender's associations (``send_stores_directly``) deliver byte-identical
objects to DCMTK's storescp whatever its PDU size (tests/nodes/dimse/test_dimse_sender.py
and below).
"""

from __future__ import annotations

import os
import sys
import threading

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import CTImageStorage

from nodes.dimse._pynetdicom import stores as cstore  # the codec, as the adapter uses it
from nodes.dimse._pynetdicom import configure
from support.peers import free_port
from support.synth import ct

sys.path.insert(0, os.path.dirname(__file__))
from dimse_support import (Committer, Storescp, after_meta, listen_config,  # noqa: E402
                           pacs_config, running, send_all, send_as_is, study)

uids = st.from_regex(r"[12](\.(0|[1-9][0-9]{0,8})){1,7}", fullmatch=True).filter(
    lambda uid: len(uid) <= 64)


def pynetdicom_rsp(message_id: int, sop_class: str, sop_instance: str, status: int) -> bytes:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = sop_class
    rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    (pdata,) = message.encode_msg(1, 0)
    ((context_id, pdv),) = pdata.presentation_data_value_list
    assert pdv[:1] == b"\x03"  # command, last fragment
    return pdv[1:]


@settings(max_examples=300, deadline=None)
@given(message_id=st.integers(0, 0xFFFF), sop_class=uids, sop_instance=uids,
       status=st.integers(0, 0xFFFF))
def test_store_rsp_is_pynetdicoms_command_set_byte_for_byte(message_id, sop_class,
                                                             sop_instance, status):
    assert cstore.encode_store_rsp(message_id, sop_class, sop_instance, status) == \
        pynetdicom_rsp(message_id, sop_class, sop_instance, status)


def pynetdicom_rq_pdvs(message_id, sop_class, sop_instance, priority, path, offset,
                      limit) -> list[bytes]:
    req = C_STORE()
    req.MessageID = message_id
    req.Priority = priority
    req.AffectedSOPClassUID = sop_class
    req.AffectedSOPInstanceUID = sop_instance
    req._dataset_path = (path, offset)
    message = C_STORE_RQ()
    message.primitive_to_message(req)
    return [pdata.presentation_data_value_list[0][1]
            for pdata in message.encode_msg(1, limit)]


@settings(max_examples=200, deadline=None)
@given(message_id=st.integers(0, 0xFFFF), sop_class=uids, sop_instance=uids,
       priority=st.sampled_from([0, 1, 2]), offset=st.integers(0, 300),
       length=st.integers(0, 5000), limit=st.sampled_from([250, 257, 1000, 4096, 16384]))
def test_store_rq_is_pynetdicoms_command_set_and_fragments(tmp_path_factory, message_id,
                                                           sop_class, sop_instance, priority,
                                                           offset, length, limit):
    path = tmp_path_factory.mktemp("rq") / "object.dcm"
    path.write_bytes(bytes(range(256)) * ((offset + length) // 256 + 1))
    with open(path, "r+b") as f:
        f.truncate(offset + length)
    command = cstore.encode_store_rq(message_id, sop_class, sop_instance, priority)
    expected = pynetdicom_rq_pdvs(message_id, sop_class, sop_instance, priority, path, offset,
                                  limit)
    if len(command) + 6 > limit:
        return  # pynetdicom splits the command: the sender leaves such a peer to it
    with open(path, "rb") as f:
        assert list(cstore.store_rq_pdvs(command, f, offset, limit)) == expected


def test_a_peer_without_a_pdu_limit_gets_the_data_set_in_bounded_fragments(tmp_path):
    path = tmp_path / "object.dcm"
    data = bytes(range(256)) * (3 * cstore.UNLIMITED_FRAGMENT // 256 + 7)
    path.write_bytes(b"META" + data)
    with open(path, "rb") as f:
        pdvs = list(cstore.store_rq_pdvs(b"CMD", f, 4, 0))
    assert pdvs[0] == b"\x03CMD"
    assert [p[:1] for p in pdvs[1:]] == [b"\x00"] * 3 + [b"\x02"]
    assert max(len(p) for p in pdvs) == cstore.UNLIMITED_FRAGMENT + 1
    assert b"".join(p[1:] for p in pdvs[1:]) == data


class _Scp:
    """A pynetdicom SCP on 127.0.0.1 whose associations answer with ``answer_stores_directly``,
    its EVT_C_STORE handler ``handler``; ``by_pynetdicom`` counts the responses left to
    pynetdicom's own message building."""

    def __init__(self, handler, monkeypatch, extra_handlers=()) -> None:
        configure()
        self.by_pynetdicom = 0
        self.installed: list[bool] = []
        fallback = cstore._pynetdicom_response

        def counting(*args):
            self.by_pynetdicom += 1
            return fallback(*args)

        monkeypatch.setattr(cstore, "_pynetdicom_response", counting)
        self.ae = AE("SCP")
        self.ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
        self.port = free_port()
        handlers = [(evt.EVT_C_STORE, handler),
                    (evt.EVT_ESTABLISHED,
                     lambda event: self.installed.append(cstore.answer_stores_directly(event.assoc))),
                    *extra_handlers]
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=handlers)

    def stop(self) -> None:
        self.server.shutdown()


def _send(port: int, datasets: list[Dataset]) -> list[Dataset | None]:
    """C-STORE each data set on one association (pynetdicom SCU); the response statuses."""
    ae = AE("MODALITY")
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", port, ae_title="SCP")
    assert assoc.is_established
    try:
        return [assoc.send_c_store(ds) for ds in datasets]
    finally:
        assoc.release()


def _ct() -> Dataset:
    ds = ct()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    return ds


def test_success_and_failure_statuses_come_from_the_direct_encoder(monkeypatch):
    statuses = iter([0x0000, 0xA700, 0xB000, 0xC000])
    server = _Scp(lambda event: next(statuses), monkeypatch)
    try:
        answers = _send(server.port, [_ct() for _ in range(4)])
    finally:
        server.stop()
    assert [int(a.Status) for a in answers] == [0x0000, 0xA700, 0xB000, 0xC000]
    assert server.installed == [True]
    assert server.by_pynetdicom == 0


def test_a_handler_that_raises_is_answered_c211_and_the_association_goes_on(monkeypatch):
    calls = []

    def handler(event):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return 0x0000

    server = _Scp(handler, monkeypatch)
    try:
        answers = _send(server.port, [_ct(), _ct()])
    finally:
        server.stop()
    assert [int(a.Status) for a in answers] == [0xC211, 0x0000]
    assert server.by_pynetdicom == 0


def test_a_status_dataset_is_answered_by_pynetdicom(monkeypatch):
    def handler(event):
        status = Dataset()
        status.Status = 0xB007
        status.ErrorComment = "coerced"
        return status

    server = _Scp(handler, monkeypatch)
    try:
        (answer,) = _send(server.port, [_ct()])
    finally:
        server.stop()
    assert int(answer.Status) == 0xB007
    assert answer.ErrorComment == "coerced"  # only pynetdicom's message carries it
    assert server.by_pynetdicom == 1


def test_an_evt_dimse_sent_subscriber_still_gets_pynetdicoms_message(monkeypatch):
    sent = []
    lock = threading.Lock()

    def on_sent(event):
        with lock:
            sent.append(type(event.message).__name__)

    server = _Scp(lambda event: 0x0000, monkeypatch,
                  extra_handlers=[(evt.EVT_DIMSE_SENT, on_sent)])
    try:
        (answer,) = _send(server.port, [_ct()])
    finally:
        server.stop()
    assert int(answer.Status) == 0x0000
    assert sent == ["C_STORE_RSP"]  # served by pynetdicom's _serve_request altogether
    assert server.by_pynetdicom == 0


@pytest.mark.parametrize("limit,direct", [(0, True), (16384, True), (100, False)])
def test_a_response_larger_than_the_peers_pdu_goes_through_pynetdicom(monkeypatch, limit,
                                                                      direct):
    server = _Scp(lambda event: 0x0000, monkeypatch)
    ae = AE("MODALITY")
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
    try:
        assoc = ae.associate("127.0.0.1", server.port, ae_title="SCP", max_pdu=limit)
        assert assoc.is_established
        try:
            answer = assoc.send_c_store(_ct())
        finally:
            assoc.release()
    finally:
        server.stop()
    assert int(answer.Status) == 0x0000
    assert server.by_pynetdicom == (0 if direct else 1)


@pytest.mark.peer("dcmtk")
@pytest.mark.parametrize("pdu", ["4096", "131072"])
async def test_the_sender_delivers_byte_identical_objects_in_any_pdu_size(tmp_path,
                                                                         monkeypatch, pdu):
    from nodes.dimse import CStoreSender
    from nodes.outcome import Delivered

    sent_directly = []
    send = cstore._write_store_rq

    def counting(*args):
        sent = send(*args)
        sent_directly.append(sent)
        return sent

    monkeypatch.setattr(cstore, "_write_store_rq", counting)
    read_directly = []
    read = cstore._store_response

    def reading(*args):
        response = read(*args)
        read_directly.append(response is not None)
        return response

    monkeypatch.setattr(cstore, "_store_response", reading)
    files = study(tmp_path / "study")
    with Storescp(tmp_path / "pacs", extra=["-pdu", pdu]) as peer:
        recorder, got = await send_all(
            files, peer, CStoreSender(pacs_config(peer.port, max_associations=1)))
    assert recorder.outcomes == {uid: Delivered() for uid in files}
    for uid, path in files.items():
        assert got[uid] == after_meta(path), uid
    assert sent_directly == [True] * len(files)
    assert read_directly == [True] * len(files)  # each C-STORE-RSP read by the codec


# -- receiving C-STORE requests directly ------------------------------------------------------


def pynetdicom_decoded_rq(command: bytes):
    """What pynetdicom makes of a command set received in one PDV: the request primitive's
    (Message ID, SOP Class UID, SOP Instance UID, Priority), or None when it is no C-STORE-RQ
    with a data set or pynetdicom refuses it."""
    from pynetdicom import _config
    from pynetdicom.dimse_messages import DIMSEMessage
    from pynetdicom.pdu_primitives import P_DATA

    pdata = P_DATA()
    pdata.presentation_data_value_list.append((1, b"\x03" + command))
    message = DIMSEMessage()
    chunked = _config.STORE_RECV_CHUNKED_DATASET
    _config.STORE_RECV_CHUNKED_DATASET = False  # the command set only: no file to open
    try:
        message.decode_msg(pdata)
        if message.command_set.CommandField != 0x0001 or \
                message.command_set.CommandDataSetType == 0x0101:
            return None
        req = message.message_to_primitive()
    except Exception:
        return None
    finally:
        _config.STORE_RECV_CHUNKED_DATASET = chunked
    return (req.MessageID, str(req.AffectedSOPClassUID), str(req.AffectedSOPInstanceUID),
            req.Priority)


@settings(max_examples=300, deadline=None)
@given(message_id=st.integers(0, 0xFFFF), sop_class=uids, sop_instance=uids,
       priority=st.sampled_from([0, 1, 2]))
def test_a_store_rq_is_read_as_pynetdicom_reads_it(message_id, sop_class, sop_instance,
                                                  priority):
    command = cstore.encode_store_rq(message_id, sop_class, sop_instance, priority)
    expected = (message_id, sop_class, sop_instance, priority)
    assert pynetdicom_decoded_rq(command) == expected
    assert cstore.parse_store_rq(command) == expected


EDITS = st.lists(st.tuples(st.integers(0, 200), st.binary(min_size=0, max_size=4)),
                max_size=3)  # bytes overwritten in a command set


def edited(command: bytes, edits) -> bytes:
    changed = bytearray(command)
    for at, data in edits:
        changed[at:at + len(data)] = data
    return bytes(changed)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # pydicom on the edited UIDs
@settings(max_examples=500, deadline=None)
@example(base=(0, "1.0", "1.0.0.\t", 0), edits=[])  # pydicom strips the tab: step aside
@given(base=st.tuples(st.integers(0, 0xFFFF), uids, uids, st.sampled_from([0, 1, 2])),
       edits=EDITS)
def test_any_other_command_set_is_left_to_pynetdicom_or_read_the_same(base, edits):
    """Whatever the bytes, the direct reader gives pynetdicom's values or steps aside."""
    read_the_same_or_left(edited(cstore.encode_store_rq(*base), edits),
                          cstore.parse_store_rq, pynetdicom_decoded_rq)


def read_the_same_or_left(command: bytes, ours, pynetdicoms) -> None:
    got = ours(command)
    if got is not None:
        assert got == pynetdicoms(command)


def pynetdicom_decoded_rsp(command: bytes):
    """What pynetdicom makes of a C-STORE-RSP command set received in one PDV: the response
    primitive's (Message ID Being Responded To, Status), or None when it is no plain
    C-STORE-RSP or pynetdicom refuses it."""
    from pynetdicom.dimse_messages import DIMSEMessage
    from pynetdicom.pdu_primitives import P_DATA

    pdata = P_DATA()
    pdata.presentation_data_value_list.append((1, b"\x03" + command))
    message = DIMSEMessage()
    try:
        if not message.decode_msg(pdata):
            return None
        if message.command_set.CommandField != 0x8001:
            return None
        rsp = message.message_to_primitive()
    except Exception:
        return None
    if not rsp.is_valid_response:
        return None
    return rsp.MessageIDBeingRespondedTo, rsp.Status


@settings(max_examples=300, deadline=None)
@given(message_id=st.integers(0, 0xFFFF), sop_class=uids, sop_instance=uids,
       status=st.integers(0, 0xFFFF))
def test_a_store_rsp_is_read_as_pynetdicom_reads_it(message_id, sop_class, sop_instance,
                                                   status):
    command = cstore.encode_store_rsp(message_id, sop_class, sop_instance, status)
    assert pynetdicom_decoded_rsp(command) == (message_id, status)
    assert cstore.parse_store_rsp(command) == (message_id, status)
    assert cstore.parse_store_rsp(pynetdicom_rsp(message_id, sop_class, sop_instance,
                                                 status)) == (message_id, status)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # pydicom on the edited UIDs
@settings(max_examples=500, deadline=None)
@given(base=st.tuples(st.integers(0, 0xFFFF), uids, uids, st.integers(0, 0xFFFF)),
       edits=EDITS)
def test_any_other_response_is_left_to_pynetdicom_or_read_the_same(base, edits):
    """Whatever the bytes, the direct reader gives pynetdicom's values or steps aside."""
    read_the_same_or_left(edited(cstore.encode_store_rsp(*base), edits),
                          cstore.parse_store_rsp, pynetdicom_decoded_rsp)


def test_a_response_with_an_error_comment_is_left_to_pynetdicom():
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = CTImageStorage
    rsp.AffectedSOPInstanceUID = "1.2.3"
    rsp.Status = 0xA700
    rsp.ErrorComment = "no room"
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    (pdata,) = message.encode_msg(1, 0)
    ((_, pdv),) = pdata.presentation_data_value_list
    assert pynetdicom_decoded_rsp(pdv[1:]) == (7, 0xA700)
    assert cstore.parse_store_rsp(pdv[1:]) is None


def test_a_command_fragment_inside_a_data_set_is_refused():
    received = []

    class Sink:
        name = "/nonexistent"

        def write(self, data):
            received.append(data)

        def flush(self):
            pass

    message = cstore._Receiving(1, (1, "1.2", "1.2.3", 2), Sink())
    assert not cstore._receive(message, [(1, b"\x00abc")])
    with pytest.raises(ValueError, match="command fragment"):
        cstore._receive(message, [(1, b"\x01xyz")])
    assert cstore._receive(message, [(1, b"\x02def"), (1, b"\x02ignored")])
    assert received == [b"abc", b"def"]


@pytest.mark.peer("dcmtk")
async def test_the_listener_receives_plain_stores_directly_and_the_rest_through_pynetdicom(
        tmp_path, monkeypatch):
    """storescu's requests are received directly; a request with a Move Originator (what a
    C-MOVE SCP sends) goes through pynetdicom; both are committed byte for byte."""
    import trio

    from nodes.dimse import DicomListener, parse_file_meta

    direct = []
    request = cstore._request
    monkeypatch.setattr(cstore, "_request", lambda message: direct.append(1) or request(message))
    files = list(study(tmp_path / "study").values())
    cfg = listen_config()
    listener, sink = DicomListener(cfg), Committer(name="sink")

    def moved(path) -> int:
        configure()
        meta = parse_file_meta(open(path, "rb").read())
        ae = AE("MOVESCP")
        ae.add_requested_context(meta.sop_class_uid, [meta.transfer_syntax_uid])
        assoc = ae.associate("127.0.0.1", cfg.port, ae_title="DICOMFLOW")
        try:
            return int(assoc.send_c_store(path, originator_aet="WORKSTATION",
                                          originator_id=7).Status)
        finally:
            assoc.release()

    async with running(listener >> sink, listener=listener):
        for done in await trio.to_thread.run_sync(lambda: send_as_is(cfg.port, files[:-1])):
            assert done.returncode == 0, done.stderr
        assert await trio.to_thread.run_sync(moved, files[-1]) == 0x0000
    assert len(direct) == len(files) - 1
    got = sink.by_uid()
    assert len(got) == len(files)
    for path in files:
        assert after_meta(got[parse_file_meta(open(path, "rb").read()).sop_instance_uid]) \
            == after_meta(path)


async def test_the_direct_receive_is_in_place_before_the_association_is_accepted(
        tmp_path, monkeypatch):
    """Once the A-ASSOCIATE-AC is out, the requestor may send its first C-STORE and the DUL
    thread hand it on before EVT_ESTABLISHED fires: the codec's receive is hooked in before
    the accept is sent (a CI run saw one request of seven go to pynetdicom's decoder)."""
    import trio
    from pynetdicom.acse import ACSE

    from nodes.dimse import DicomListener

    hooked = []
    send_accept = ACSE.send_accept

    def sending_accept(self):
        hooked.append("receive_primitive" in self.assoc.dimse.__dict__)
        return send_accept(self)

    monkeypatch.setattr(ACSE, "send_accept", sending_accept)
    files = list(study(tmp_path / "study").values())[:1]
    cfg = listen_config()
    listener, sink = DicomListener(cfg), Committer(name="sink")
    async with running(listener >> sink, listener=listener):
        results = await trio.to_thread.run_sync(lambda: send_as_is(cfg.port, files))
    assert [r.returncode for r in results] == [0]
    assert hooked == [True]
