"""pynetdicom's C-STORE, with the command sets encoded and decoded directly.

pynetdicom turns every DIMSE message into a command set held as a pydicom Dataset (every
command element created, converted and validated; UIDs checked on assignment to the
primitive) and encodes or decodes that Dataset, twice when sending a request (once for the
group length). For a small object this was most of pynetdicom's CPU per object: ~60% of a
bare pynetdicom SCP's answering each C-STORE, most of the rest decoding the request
(py-spy, bench/dimse.py case b), and ~80% of our sender's time in ``send_c_store``. It runs
under the one GIL that the listener, the Store, the lanes and their senders share.

A C-STORE command set is a handful of fixed elements (PS3.7 §9.3.1), so this module reads
and writes them with ``struct``, byte for byte what pynetdicom sends and reads
(tests/nodes/dimse/test_dimse_cstore.py holds all of it to pynetdicom with hypothesis):

- :func:`receive_stores_directly` makes an acceptor association (the listener's) receive
  plain C-STORE requests (:func:`parse_store_rq`; the data set into pynetdicom's chunked
  receive file, the listener's SpillFile) and queue the request primitive pynetdicom would
  have built; pynetdicom's reactor then serves it as usual.
- :func:`answer_stores_directly` makes it answer them. Kept from pynetdicom: the EVT_C_STORE
  handler is triggered with the same event; while it runs, ``assoc.abort`` does not block
  (pynetdicom's ``attempt``); a handler that raises is answered 0xC211; the received data
  set's file is closed and deleted after the handler; no response once the association is
  no longer established; a status that is not an int (a status Dataset) is answered by
  pynetdicom.
- :func:`send_stores_directly` makes a requestor association (the sender's) send
  ``send_c_store(path)`` requests (pynetdicom's chunked send from a file); the data set is
  streamed from the file in pynetdicom's fragments, and ``send_c_store`` itself (context
  choice, waiting for and checking the response) is pynetdicom's.

Anything else (a message pynetdicom has started, a command set split over PDVs, a release
under way, an invalid request, an unknown context, a SOP class served by another service
class, a Move Originator, EVT_DIMSE_RECV/EVT_DIMSE_SENT subscribers wanting pynetdicom's
message object, strict UID conformance, a command over the peer's PDU size, a data set in
memory, a pynetdicom without the internals this relies on) stays pynetdicom's own path,
unchanged. A command fragment inside a data set being received (PS3.8 forbids interleaving
messages) raises, and pynetdicom aborts the association.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

from pynetdicom import _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from flow import get_logger

from ..dicom.elements import IMPLICIT

log = get_logger("nodes.dimse.cstore")

HANDLER_FAILED = 0xC211  # pynetdicom's status when the EVT_C_STORE handler raises
_STORE_RQ = 0x0001       # Command Field of a C-STORE-RQ
_STORE_RSP = 0x8001      # Command Field of a C-STORE-RSP
_NO_DATA_SET = 0x0101    # Command Data Set Type: no data set follows
_DATA_SET = 0x0001       # Command Data Set Type: a data set follows (pynetdicom's value)
_LAST_COMMAND_FRAGMENT = b"\x03"  # PDV message control headers (PS3.8 E.2)
_DATA_FRAGMENT, _LAST_DATA_FRAGMENT = b"\x00", b"\x02"
_PDV_OVERHEAD = 6        # PDV item length (4) + context ID (1) + control header (1)
UNLIMITED_FRAGMENT = 1 << 20  # data set fragment sent to a peer with no PDU length limit

_US = struct.Struct("<HHLH").pack  # tag (group, element), length 2, value
_UI = struct.Struct("<HHL").pack   # tag, length (the value follows)
_GROUP_LENGTH = struct.Struct("<HHLL").pack

_SCP = StorageServiceClass.SCP  # the service this replaces; a subclass overriding it is not


def encode_store_rsp(message_id: int, sop_class_uid: str, sop_instance_uid: str,
                     status: int) -> bytes:
    """A C-STORE-RSP command set, implicit VR little endian, elements in tag order."""
    return _command(_ui(0x0002, sop_class_uid),       # Affected SOP Class UID
                    _US(0, 0x0100, 2, _STORE_RSP),     # Command Field
                    _US(0, 0x0120, 2, message_id),     # Message ID Being Responded To
                    _US(0, 0x0800, 2, _NO_DATA_SET),   # Command Data Set Type
                    _US(0, 0x0900, 2, status),         # Status
                    _ui(0x1000, sop_instance_uid))     # Affected SOP Instance UID


def encode_store_rq(message_id: int, sop_class_uid: str, sop_instance_uid: str,
                    priority: int) -> bytes:
    """A C-STORE-RQ command set (a data set follows), implicit VR little endian, without
    the optional Move Originator elements."""
    return _command(_ui(0x0002, sop_class_uid),       # Affected SOP Class UID
                    _US(0, 0x0100, 2, _STORE_RQ),      # Command Field
                    _US(0, 0x0110, 2, message_id),     # Message ID
                    _US(0, 0x0700, 2, priority),       # Priority
                    _US(0, 0x0800, 2, _DATA_SET),      # Command Data Set Type
                    _ui(0x1000, sop_instance_uid))     # Affected SOP Instance UID


def _command(*elements: bytes) -> bytes:
    """Command set elements (group 0000) behind their Command Group Length."""
    body = b"".join(elements)
    return _GROUP_LENGTH(0, 0, 4, len(body)) + body


def _ui(element: int, uid: str) -> bytes:
    """A UI element of the command group, padded with NUL to even length (PS3.5 §6.2)."""
    raw = uid.encode("ascii")
    if len(raw) % 2:
        raw += b"\0"
    return _UI(0, element, len(raw)) + raw


_SERVED_BY_SCP: dict[str, bool] = {}


def _storage_served(sop_class_uid: str) -> bool:
    """Whether pynetdicom would serve this SOP class with StorageServiceClass.SCP."""
    served = _SERVED_BY_SCP.get(sop_class_uid)
    if served is None:
        served = getattr(uid_to_service_class(sop_class_uid), "SCP", None) is _SCP
        if len(_SERVED_BY_SCP) < 4096:  # the UID comes off the network: bounded
            _SERVED_BY_SCP[sop_class_uid] = served
    return served


_NEEDED_SCP = ("_serve_request", "_accepted_cx", "_sent_release", "_abort_nonblocking",
               "_abort_blocking", "get_handlers", "acceptor", "dimse", "dul")


def answer_stores_directly(assoc: Any) -> bool:
    """Make ``assoc`` (an acceptor association, before its reactor runs) serve plain C-STORE
    requests with :func:`serve_store`; everything else stays pynetdicom's. Returns False,
    changing nothing, on a pynetdicom release without the internals this relies on."""
    if not all(hasattr(assoc, name) for name in _NEEDED_SCP):
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
    if command is None or (limit and len(command) + _PDV_OVERHEAD > limit):
        _pynetdicom_response(assoc, req, context_id, status)
        return
    assoc.dul.send_pdu(_pdata(context_id, _LAST_COMMAND_FRAGMENT + command))


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
    :func:`encode_store_rq`; everything else stays pynetdicom's. Returns False, changing
    nothing, on a pynetdicom release without the internals this relies on."""
    dimse = getattr(assoc, "dimse", None)
    if dimse is None or not hasattr(dimse, "send_msg") or not hasattr(assoc, "get_handlers"):
        return False
    original = dimse.send_msg

    def send_msg(primitive: Any, context_id: int) -> None:
        if not _send_request(assoc, primitive, context_id):
            original(primitive, context_id)

    dimse.send_msg = send_msg
    return True


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
    if limit and (len(command) + _PDV_OVERHEAD > limit or limit <= _PDV_OVERHEAD):
        return False
    path, offset = source
    send_pdu = assoc.dul.send_pdu
    with open(path, "rb") as f:  # opened before anything is sent: a missing file sends nothing
        for pdv in store_rq_pdvs(command, f, offset, limit):
            send_pdu(_pdata(context_id, pdv))
    return True


def store_rq_pdvs(command: bytes, f: BinaryIO, offset: int, limit: int) -> Iterator[bytes]:
    """The PDVs (control header + fragment) of a C-STORE-RQ whose command set is
    ``command`` and whose data set is ``f`` from ``offset`` on, for a peer whose maximum
    PDU length is ``limit`` (0: unlimited): the command in one, then the data set in
    pynetdicom's fragments (``DIMSEMessage.encode_msg``): all but the last of the largest
    size one PDU takes, the last one what is left. Reads ``f`` one fragment at a time.
    (For a peer without a limit pynetdicom sends the whole data set as one fragment; these
    are at most ``UNLIMITED_FRAGMENT`` long, so a large object is never read whole.)"""
    yield _LAST_COMMAND_FRAGMENT + command
    length = f.seek(0, 2) - f.seek(offset)
    fragment = limit - _PDV_OVERHEAD if limit else UNLIMITED_FRAGMENT
    remaining = length
    while remaining > fragment:
        yield _DATA_FRAGMENT + f.read(fragment)
        remaining -= fragment
    yield _LAST_DATA_FRAGMENT + f.read(fragment)


def _pdata(context_id: int, pdv: bytes) -> P_DATA:
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((context_id, pdv))
    return pdata


# -- the acceptor side, receiving -------------------------------------------------------------

_US_VALUE = struct.Struct("<H").unpack
_STORE_RQ_ELEMENTS = frozenset([0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000])


def parse_store_rq(command: bytes) -> tuple[int, str, str, int] | None:
    """(Message ID, Affected SOP Class UID, Affected SOP Instance UID, Priority) of a
    C-STORE-RQ command set (implicit VR little endian) announcing a data set, as
    pynetdicom would decode them; None for anything else (another command, a Move
    Originator, an element out of place, a value pynetdicom would refuse or convert)."""
    values: dict[int, bytes] = {}
    pos, end = 0, len(command)
    while pos < end:
        if end - pos < 8:
            return None
        group, element, length = IMPLICIT(command, pos)  # command sets: implicit VR LE
        pos += 8
        if group != 0 or element not in _STORE_RQ_ELEMENTS or element in values \
                or length > end - pos:
            return None
        values[element] = command[pos:pos + length]
        pos += length
    if len(values.get(0x0000, b"\0\0\0\0")) != 4:  # Command Group Length: UL
        return None
    try:
        field, message_id, priority, data_set = (
            _US_VALUE(values[0x0100])[0], _US_VALUE(values[0x0110])[0],
            _US_VALUE(values[0x0700])[0], _US_VALUE(values[0x0800])[0])
        sop_class = values[0x0002].decode("ascii").rstrip("\0 ")
        sop_instance = values[0x1000].decode("ascii").rstrip("\0 ")
    except (KeyError, struct.error, UnicodeDecodeError):
        return None
    if field != _STORE_RQ or data_set == _NO_DATA_SET or priority > 2:
        return None
    if not (0 < len(sop_class) < 65 and 0 < len(sop_instance) < 65) \
            or "\\" in sop_class or "\\" in sop_instance:
        return None  # pynetdicom refuses (empty, too long) or splits (multi-valued)
    return message_id, sop_class, sop_instance, priority


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
    stays pynetdicom's. Returns False, changing nothing, on a pynetdicom release without
    the internals this relies on."""
    dimse = getattr(assoc, "dimse", None)
    if dimse is None or not all(hasattr(dimse, n) for n in ("receive_primitive", "message",
                                                             "msg_queue")) \
            or not hasattr(assoc, "_accepted_cx") or not hasattr(assoc, "get_handlers"):
        return False
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
    if not data or data[0] & 3 != 3:  # not a whole command set in this PDV
        return None
    fields = parse_store_rq(data[1:])
    context = assoc._accepted_cx.get(context_id)
    if fields is None or context is None or assoc.get_handlers(evt.EVT_DIMSE_RECV):
        return None
    transfer_syntax = str(context.transfer_syntax[0])
    return _Receiving(context_id, fields, new_file(fields[1], fields[2], transfer_syntax))


def _receive(message: _Receiving, pdvs: Any) -> bool:
    """Write data set fragments; True once the last one is in (later PDVs in the same
    P-DATA are ignored, as pynetdicom does)."""
    f = message._data_set_file
    for _, data in pdvs:
        control = data[0]
        if control & 1:  # PS3.8 §9.3.1: no other message's fragment inside this one
            raise ValueError("a command fragment inside a C-STORE data set")
        f.write(data[1:])
        f.flush()
        if control & 2:
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
