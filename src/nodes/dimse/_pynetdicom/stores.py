"""pynetdicom's C-STORE with the command sets of :mod:`..cstore` (the pure codec).

pynetdicom turns every DIMSE message into a command set held as a pydicom Dataset (every
command element created, converted and validated; UIDs checked on assignment to the
primitive) and encodes or decodes that Dataset, twice when sending a request. For a small
object that was most of pynetdicom's CPU per object, under the one GIL that the listener,
the Store, the lanes and their senders share. These hooks put the codec in its place, per
association:

- :func:`receive_stores_directly` (group ``receive``) makes an acceptor association (the
  listener's) receive plain C-STORE requests (:func:`~..cstore.parse_store_rq`; the data
  set into a file from ``new_file``, the listener's SpillFile) and queue the request
  primitive pynetdicom would have built; pynetdicom's reactor then serves it as usual.
- :func:`answer_stores_directly` (group ``answer``) makes it answer them. Kept from
  pynetdicom: the EVT_C_STORE handler is triggered with the same event; while it runs,
  ``assoc.abort`` does not block (pynetdicom's ``attempt``); a handler that raises is
  answered 0xC211; the received data set's file is closed and deleted after the handler;
  no response once the association is no longer established; a status that is not an int
  (a status Dataset) is answered by pynetdicom.
- :func:`send_stores_directly` (group ``send``) makes a requestor association (the
  sender's) send ``send_c_store(path)`` requests (pynetdicom's chunked send from a file);
  the data set is streamed from the file in pynetdicom's fragments, and ``send_c_store``
  itself (context choice, waiting for and checking the response) is pynetdicom's. It also
  makes the association read plain C-STORE responses (:func:`~..cstore.parse_store_rsp`)
  into the response primitive pynetdicom would queue (Message ID Being Responded To and
  Status, all ``send_c_store`` reads of a plain response).
- :func:`store` (group ``send``) is ``send_c_store(path)`` for an object whose file meta
  the caller has read already, without ``send_c_store``'s own work per object (pydicom
  reading the file meta again, the UIDs validated on assignment, the accepted contexts
  searched, a status Dataset built): pynetdicom's steps in the same order (pause the
  association's loop, send, wait up to the DIMSE timeout, resume; no response → pynetdicom's
  ``_handle_no_response``; an invalid one → abort).

Anything else (a message pynetdicom has started, a command set split over PDVs, a release
under way, an invalid request, an unknown context, a SOP class served by another service
class, a Move Originator, EVT_DIMSE_RECV/EVT_DIMSE_SENT subscribers wanting pynetdicom's
message object, strict UID conformance, a command over the peer's PDU size, a data set in
memory) stays pynetdicom's own path, unchanged; so does everything when
:mod:`.internals` found the group's internals missing (each function then returns False
and changes nothing). A command fragment inside a data set being received raises, and
pynetdicom aborts the association.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

from pynetdicom import _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from flow import get_logger

from ..cstore import (HANDLER_FAILED, LAST_COMMAND_FRAGMENT, PDV_OVERHEAD, UNLIMITED_FRAGMENT,
                      data_fragment, encode_store_rq, encode_store_rsp, parse_store_rq,
                      parse_store_rsp, store_rq_pdvs, whole_command)
from .internals import usable

__all__ = ["answer_stores_directly", "receive_stores_directly", "send_stores_directly", "store",
           "HANDLER_FAILED", "UNLIMITED_FRAGMENT", "encode_store_rq", "encode_store_rsp",
           "parse_store_rq", "parse_store_rsp", "store_rq_pdvs"]

log = get_logger("nodes.dimse.cstore")

_SCP = StorageServiceClass.SCP  # the service this replaces; a subclass overriding it is not


_SERVED_BY_SCP: dict[str, bool] = {}


def _storage_served(sop_class_uid: str) -> bool:
    """Whether pynetdicom would serve this SOP class with StorageServiceClass.SCP."""
    served = _SERVED_BY_SCP.get(sop_class_uid)
    if served is None:
        served = getattr(uid_to_service_class(sop_class_uid), "SCP", None) is _SCP
        if len(_SERVED_BY_SCP) < 4096:  # the UID comes off the network: bounded
            _SERVED_BY_SCP[sop_class_uid] = served
    return served


def answer_stores_directly(assoc: Any) -> bool:
    """Make ``assoc`` (an acceptor association, before its reactor runs) serve plain C-STORE
    requests with :func:`serve_store`; everything else stays pynetdicom's. Returns False,
    changing nothing, when group ``answer``'s internals are missing."""
    if not usable("answer"):
        return False
    original = assoc._serve_request

    def serve_request(msg: Any, context_id: int) -> None:
        context = _plain_store(assoc, msg, context_id)
        if context is None:
            original(msg, context_id)
            return
        assoc.dimse.cancel_req = {}
        assoc._is_paused = True
        try:
            serve_store(assoc, msg, context)
        except Exception as exc:  # what pynetdicom does when a service class raises
            log.error("dimse.scp_error", error_class=type(exc).__name__)
            assoc.abort()
            return
        assoc._is_paused = False
        assoc.dimse.cancel_req = {}

    assoc._serve_request = serve_request
    return True


def _plain_store(assoc: Any, msg: Any, context_id: int) -> Any:
    """The accepted presentation context of a C-STORE request this module serves, or None
    (pynetdicom's ``_serve_request`` serves it)."""
    if msg.__class__ is not C_STORE or assoc._sent_release or not msg.is_valid_request:
        return None
    context = assoc._accepted_cx.get(context_id)
    if context is None or assoc.get_handlers(evt.EVT_DIMSE_SENT):
        return None
    sop_class = str(msg.AffectedSOPClassUID)
    common = assoc.acceptor.accepted_common_extended.get(sop_class)
    if common:
        sop_class = str(common[0])
    if not _config.UNRESTRICTED_STORAGE_SERVICE and not _storage_served(sop_class):
        return None
    return context


def serve_store(assoc: Any, req: Any, context: Any) -> None:
    """StorageServiceClass.SCP for one request, answered with :func:`encode_store_rsp`."""
    context_id = context.context_id
    assoc.abort = assoc._abort_nonblocking  # as pynetdicom's attempt(): no blocking abort
    try:
        status = evt.trigger(assoc, evt.EVT_C_STORE,
                             {"request": req, "context": context.as_tuple})
    except Exception as exc:
        log.error("dimse.store_handler_error", error_class=type(exc).__name__)
        status = HANDLER_FAILED
    else:
        if not assoc.is_established:
            return
    finally:
        assoc.abort = assoc._abort_blocking
        _remove_received_file(req)
    command = _encoded(req, status)
    limit = assoc.dimse.maximum_pdu_size  # the peer's maximum PDU length, 0: unlimited
    if command is None or (limit and len(command) + PDV_OVERHEAD > limit):
        _pynetdicom_response(assoc, req, context_id, status)
        return
    assoc.dul.send_pdu(_pdata(context_id, LAST_COMMAND_FRAGMENT + command))


def _encoded(req: Any, status: Any) -> bytes | None:
    """The response's command set, or None when pynetdicom should build it (a status that
    is not a plain 16-bit int, such as a status Dataset; UIDs that are not ASCII)."""
    if status.__class__ is not int or not 0 <= status <= 0xFFFF:
        return None
    try:
        return encode_store_rsp(req.MessageID, str(req.AffectedSOPClassUID),
                                str(req.AffectedSOPInstanceUID), status)
    except (UnicodeEncodeError, struct.error):
        return None


def _remove_received_file(req: Any) -> None:
    """What pynetdicom does with the data set's file once the handler returned."""
    received = getattr(req, "_dataset_file", None)
    if received:
        received.close()
        try:
            os.unlink(received.name)
        except OSError:
            pass  # best effort, as pynetdicom (a SpillFile that never spilled has no file)


def _pynetdicom_response(assoc: Any, req: Any, context_id: int, status: Any) -> None:
    rsp = C_STORE()
    rsp.MessageID = req.MessageID
    rsp.MessageIDBeingRespondedTo = req.MessageID
    rsp.AffectedSOPInstanceUID = req.AffectedSOPInstanceUID
    rsp.AffectedSOPClassUID = req.AffectedSOPClassUID
    service = StorageServiceClass(assoc)
    assoc.dimse.send_msg(service.validate_status(status, rsp), context_id)


# -- the requestor side -----------------------------------------------------------------------


def send_stores_directly(assoc: Any) -> bool:
    """Make ``assoc`` (a requestor association) send ``send_c_store(path)`` requests with
    :func:`encode_store_rq`, read plain C-STORE responses with :func:`parse_store_rsp`, and
    take :func:`store`'s direct path; everything else stays pynetdicom's. Returns False,
    changing nothing, when group ``send``'s internals are missing (responses are read
    directly only while group ``receive``'s are there too)."""
    if not usable("send"):
        return False
    dimse = assoc.dimse
    original = dimse.send_msg
    original_receive = dimse.receive_primitive

    def send_msg(primitive: Any, context_id: int) -> None:
        if not _send_request(assoc, primitive, context_id):
            original(primitive, context_id)

    def receive_primitive(primitive: Any) -> None:
        response = _store_response(assoc, primitive) if dimse.message is None else None
        if response is None:
            original_receive(primitive)
        else:
            dimse.msg_queue.put(response)

    dimse.send_msg = send_msg
    if usable("receive"):  # reading a response relies on what the listener's reader does
        dimse.receive_primitive = receive_primitive
    assoc._dicomflow_store = {"message_id": 0, "contexts": None}
    return True


def _store_response(assoc: Any, primitive: Any) -> tuple[int, C_STORE] | None:
    """(context ID, response primitive) of a P-DATA holding one whole plain C-STORE-RSP
    command set, or None (pynetdicom reads it)."""
    pdvs = primitive.presentation_data_value_list
    if len(pdvs) != 1 or assoc.get_handlers(evt.EVT_DIMSE_RECV):
        return None
    context_id, pdv = pdvs[0]
    command = whole_command(pdv)
    fields = parse_store_rsp(command) if command is not None else None
    if fields is None:
        return None
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo, rsp.Status = fields
    return context_id, rsp


PRIORITY_LOW = 2  # send_c_store's default priority


def store(assoc: Any, path: str, sop_class_uid: str, sop_instance_uid: str,
          transfer_syntax_uid: str, dataset_offset: int) -> int | None:
    """Blocking: C-STORE the data set of the Part 10 file ``path`` (at ``dataset_offset``,
    of the SOP class, instance and transfer syntax its file meta names) on ``assoc``. The
    response's Status, or None when no valid response came (DIMSE timeout, abort: the
    association is then aborted unless the peer did, as by ``send_c_store``). Raises what
    ``send_c_store`` raises for an association that is not established (RuntimeError) and
    for a file it cannot read (OSError)."""
    state = assoc.__dict__.get("_dicomflow_store")
    if state is None or assoc.get_handlers(evt.EVT_DIMSE_SENT):
        return _status(assoc.send_c_store(path))
    if not assoc.is_established:
        raise RuntimeError("the association is not established")
    context_id = _scu_context(assoc, state, sop_class_uid, transfer_syntax_uid)
    message_id = state["message_id"] = state["message_id"] % 0xFFFF + 1
    try:
        command = encode_store_rq(message_id, sop_class_uid, sop_instance_uid, PRIORITY_LOW)
    except (UnicodeEncodeError, struct.error):
        command = b""
    limit = assoc.dimse.maximum_pdu_size  # the peer's maximum PDU length, 0: unlimited
    if context_id is None or not command or (
            limit and (len(command) + PDV_OVERHEAD > limit or limit <= PDV_OVERHEAD)):
        return _status(assoc.send_c_store(path))
    with open(path, "rb") as f:  # opened before anything is sent: a missing file sends nothing
        assoc._reactor_checkpoint.clear()  # the association's loop must not take the answer
        try:
            while not assoc._is_paused:
                time.sleep(0.0001)
            _write_store_rq(assoc, context_id, command, f, dataset_offset, limit)
            _, rsp = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
    if rsp is None:
        assoc._handle_no_response()
        return None
    if rsp.__class__ is not C_STORE or not rsp.is_valid_response:
        assoc.abort()  # what send_c_store does with an invalid response
        return None
    return int(rsp.Status)


def _status(rsp: Any) -> int | None:
    """The Status of what ``send_c_store`` returned (an empty Dataset: none)."""
    return int(rsp.Status) if "Status" in rsp else None


def _scu_context(assoc: Any, state: dict[str, Any], sop_class_uid: str,
                 transfer_syntax_uid: str) -> int | None:
    """The ID of the context ``send_c_store`` would choose for an object in exactly this
    transfer syntax (the first accepted one, in context ID order, for the SCU role)."""
    contexts = state["contexts"]
    if contexts is None:
        contexts = state["contexts"] = {}
        for cx in sorted(assoc._accepted_cx.values(), key=lambda cx: cx.context_id):
            if cx.as_scu is True:
                contexts.setdefault((str(cx.abstract_syntax), str(cx.transfer_syntax[0])),
                                    cx.context_id)
    return contexts.get((sop_class_uid, transfer_syntax_uid))


def _send_request(assoc: Any, req: Any, context_id: int) -> bool:
    """Send ``req`` if it is a plain C-STORE-RQ of a data set in a file; False otherwise
    (then nothing was sent)."""
    if req.__class__ is not C_STORE or req.MessageIDBeingRespondedTo is not None:
        return False
    source = getattr(req, "_dataset_path", None)
    if (source is None or req.MoveOriginatorApplicationEntityTitle is not None
            or req.MoveOriginatorMessageID is not None
            or assoc.get_handlers(evt.EVT_DIMSE_SENT)):
        return False
    try:
        command = encode_store_rq(req.MessageID, str(req.AffectedSOPClassUID),
                                  str(req.AffectedSOPInstanceUID), req.Priority)
    except (UnicodeEncodeError, struct.error, TypeError):
        return False
    limit = assoc.dimse.maximum_pdu_size  # the peer's maximum PDU length, 0: unlimited
    if limit and (len(command) + PDV_OVERHEAD > limit or limit <= PDV_OVERHEAD):
        return False
    path, offset = source
    with open(path, "rb") as f:  # opened before anything is sent: a missing file sends nothing
        return _write_store_rq(assoc, context_id, command, f, offset, limit)


def _write_store_rq(assoc: Any, context_id: int, command: bytes, f: Any, offset: int,
                    limit: int) -> bool:
    """Queue a C-STORE-RQ for the DUL: ``command``, then the data set of ``f`` from
    ``offset`` in pynetdicom's fragments for a peer PDU size ``limit``. True."""
    send_pdu = assoc.dul.send_pdu
    for pdv in store_rq_pdvs(command, f, offset, limit):
        send_pdu(_pdata(context_id, pdv))
    return True


def _pdata(context_id: int, pdv: bytes) -> P_DATA:
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((context_id, pdv))
    return pdata


# -- the acceptor side, receiving -------------------------------------------------------------


class _Receiving:
    """A C-STORE-RQ being received directly: what pynetdicom's DIMSEMessage would hold
    (``_data_set_file`` under the same name, for whoever discards a partial data set)."""

    __slots__ = ("context_id", "fields", "_data_set_file")

    def __init__(self, context_id: int, fields: tuple[int, str, str, int], file: Any) -> None:
        self.context_id = context_id
        self.fields = fields
        self._data_set_file = file


NewFile = Callable[[str, str, str], Any]


def receive_stores_directly(assoc: Any, new_file: NewFile) -> bool:
    """Make ``assoc`` (an acceptor association) receive plain C-STORE requests without
    pynetdicom's DIMSE message: the command set read by :func:`parse_store_rq`, the data
    set written to ``new_file(sop_class, sop_instance, transfer_syntax)`` (pynetdicom's
    chunked receive: the listener's SpillFile), the request primitive put on the DIMSE
    queue as pynetdicom would. Anything else, and any message pynetdicom has started,
    stays pynetdicom's. Returns False, changing nothing, when group ``receive``'s
    internals are missing."""
    if not usable("receive"):
        return False
    dimse = assoc.dimse
    original = dimse.receive_primitive

    def receive_primitive(primitive: Any) -> None:
        message = dimse.message
        if message is None:
            message = _start(assoc, primitive, new_file)
            if message is None:
                original(primitive)
                return
            dimse.message = message
            pdvs = primitive.presentation_data_value_list[1:]
        elif message.__class__ is _Receiving:
            pdvs = primitive.presentation_data_value_list
        else:
            original(primitive)  # a message pynetdicom is decoding
            return
        if _receive(message, pdvs):
            dimse.message = None
            dimse.msg_queue.put((message.context_id, _request(message)))

    dimse.receive_primitive = receive_primitive
    return True


def _start(assoc: Any, primitive: Any, new_file: NewFile) -> _Receiving | None:
    """A new message, if it is one this module receives: its whole command set in the first
    PDV, a plain C-STORE-RQ on an accepted context, nothing that wants pynetdicom's
    message (EVT_DIMSE_RECV subscribers, strict UID checks, no chunked receive)."""
    pdvs = primitive.presentation_data_value_list
    if not pdvs or not _config.STORE_RECV_CHUNKED_DATASET or _config.ENFORCE_UID_CONFORMANCE:
        return None
    context_id, data = pdvs[0]
    command = whole_command(data)
    if command is None:
        return None
    fields = parse_store_rq(command)
    context = assoc._accepted_cx.get(context_id)
    if fields is None or context is None or assoc.get_handlers(evt.EVT_DIMSE_RECV):
        return None
    transfer_syntax = str(context.transfer_syntax[0])
    return _Receiving(context_id, fields, new_file(fields[1], fields[2], transfer_syntax))


def _receive(message: _Receiving, pdvs: Any) -> bool:
    """Write data set fragments; True once the last one is in (later PDVs in the same
    P-DATA are ignored, as pynetdicom does)."""
    f = message._data_set_file
    for _, pdv in pdvs:
        data, last = data_fragment(pdv)
        f.write(data)
        f.flush()
        if last:
            return True
    return False


def _request(message: _Receiving) -> C_STORE:
    """The C-STORE request primitive pynetdicom's message_to_primitive would build."""
    message_id, sop_class, sop_instance, priority = message.fields
    req = C_STORE()
    req.MessageID = message_id
    req.AffectedSOPClassUID = sop_class
    req.AffectedSOPInstanceUID = sop_instance
    req.Priority = priority
    req.DataSet = BytesIO()
    f = message._data_set_file
    req._context_id = message.context_id
    req._dataset_path = Path(f.name)
    req._dataset_file = f
    return req
