"""The C-STORE command sets and PDVs, sans-IO: bytes in, values out.

A C-STORE command set is a handful of fixed elements (PS3.7 §9.3.1, implicit VR little
endian, group 0000). This module writes and reads them with ``struct``, byte for byte what
pynetdicom sends and reads (tests/nodes/dimse/test_dimse_cstore.py holds all of it to
pynetdicom with hypothesis), and cuts a data set into the PDVs pynetdicom would send. It
knows nothing of associations or pynetdicom's objects: the adapter
(:mod:`._pynetdicom.stores`) hooks these into pynetdicom's C-STORE.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import BinaryIO

from ..dicom.elements import IMPLICIT

HANDLER_FAILED = 0xC211  # pynetdicom's status when the EVT_C_STORE handler raises
_STORE_RQ = 0x0001       # Command Field of a C-STORE-RQ
_STORE_RSP = 0x8001      # Command Field of a C-STORE-RSP
_NO_DATA_SET = 0x0101    # Command Data Set Type: no data set follows
_DATA_SET = 0x0001       # Command Data Set Type: a data set follows (pynetdicom's value)
LAST_COMMAND_FRAGMENT = b"\x03"  # PDV message control headers (PS3.8 E.2)
_DATA_FRAGMENT, _LAST_DATA_FRAGMENT = b"\x00", b"\x02"
PDV_OVERHEAD = 6         # PDV item length (4) + context ID (1) + control header (1)
UNLIMITED_FRAGMENT = 1 << 20  # data set fragment sent to a peer with no PDU length limit

_US = struct.Struct("<HHLH").pack  # tag (group, element), length 2, value
_UI = struct.Struct("<HHL").pack   # tag, length (the value follows)
_GROUP_LENGTH = struct.Struct("<HHLL").pack


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


# -- reading ---------------------------------------------------------------------------------

_US_VALUE = struct.Struct("<H").unpack
_STORE_RQ_ELEMENTS = frozenset([0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000])


_UID_CHARS = "0123456789."  # PS3.5 9.1


def _elements(command: bytes, allowed: frozenset[int]) -> dict[int, bytes] | None:
    """{element: value} of a command set (group 0000, implicit VR little endian) whose
    elements are all in ``allowed``, each at most once, with a UL group length; None for
    anything else."""
    values: dict[int, bytes] = {}
    pos, end = 0, len(command)
    while pos < end:
        if end - pos < 8:
            return None
        group, element, length = IMPLICIT(command, pos)  # command sets: implicit VR LE
        pos += 8
        if group != 0 or element not in allowed or element in values or length > end - pos:
            return None
        values[element] = command[pos:pos + length]
        pos += length
    if len(values.get(0x0000, b"\0\0\0\0")) != 4:  # Command Group Length: UL
        return None
    return values


def parse_store_rq(command: bytes) -> tuple[int, str, str, int] | None:
    """(Message ID, Affected SOP Class UID, Affected SOP Instance UID, Priority) of a
    C-STORE-RQ command set (implicit VR little endian) announcing a data set, as
    pynetdicom would decode them; None for anything else (another command, a Move
    Originator, an element out of place, a value pynetdicom would refuse or convert)."""
    values = _elements(command, _STORE_RQ_ELEMENTS)
    if values is None:
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
    if sop_class.strip(_UID_CHARS) or sop_instance.strip(_UID_CHARS):
        return None  # not a UID's characters: pydicom may convert it (e.g. strips a tab)
    return message_id, sop_class, sop_instance, priority


_STORE_RSP_ELEMENTS = frozenset([0x0000, 0x0002, 0x0100, 0x0120, 0x0800, 0x0900, 0x1000])


def parse_store_rsp(command: bytes) -> tuple[int, int] | None:
    """(Message ID Being Responded To, Status) of a C-STORE-RSP command set (implicit VR
    little endian, no data set), as pynetdicom would decode them; None for anything else
    (another command, an Offending Element or Error Comment, an element out of place, a UID
    pynetdicom would refuse or convert): pynetdicom reads those."""
    values = _elements(command, _STORE_RSP_ELEMENTS)
    if values is None:
        return None
    try:
        field, message_id, data_set, status = (
            _US_VALUE(values[0x0100])[0], _US_VALUE(values[0x0120])[0],
            _US_VALUE(values[0x0800])[0], _US_VALUE(values[0x0900])[0])
        uids = [values[e].decode("ascii").rstrip("\0 ") for e in (0x0002, 0x1000)
                if e in values]
    except (KeyError, struct.error, UnicodeDecodeError):
        return None
    if field != _STORE_RSP or data_set != _NO_DATA_SET:
        return None
    if any(not 0 < len(uid) < 65 or uid.strip(_UID_CHARS) for uid in uids):
        return None  # pynetdicom refuses, splits or converts it
    return message_id, status


def store_rq_pdvs(command: bytes, f: BinaryIO, offset: int, limit: int) -> Iterator[bytes]:
    """The PDVs (control header + fragment) of a C-STORE-RQ whose command set is
    ``command`` and whose data set is ``f`` from ``offset`` on, for a peer whose maximum
    PDU length is ``limit`` (0: unlimited): the command in one, then the data set in
    pynetdicom's fragments (``DIMSEMessage.encode_msg``): all but the last of the largest
    size one PDU takes, the last one what is left. Reads ``f`` one fragment at a time.
    (For a peer without a limit pynetdicom sends the whole data set as one fragment; these
    are at most ``UNLIMITED_FRAGMENT`` long, so a large object is never read whole.)"""
    yield LAST_COMMAND_FRAGMENT + command
    length = f.seek(0, 2) - f.seek(offset)
    fragment = limit - PDV_OVERHEAD if limit else UNLIMITED_FRAGMENT
    remaining = length
    while remaining > fragment:
        yield _DATA_FRAGMENT + f.read(fragment)
        remaining -= fragment
    yield _LAST_DATA_FRAGMENT + f.read(fragment)


def whole_command(pdv: bytes) -> bytes | None:
    """The command set of a PDV (control header + fragment) holding a whole command set,
    or None (a data set fragment, or the first of several command fragments)."""
    if not pdv or pdv[0] & 3 != 3:
        return None
    return pdv[1:]


def data_fragment(pdv: bytes) -> tuple[bytes, bool]:
    """(The data set bytes of a PDV, whether it is the data set's last fragment). Raises
    ValueError for a command fragment: PS3.8 §9.3.1 allows no other message's fragment
    inside a data set."""
    control = pdv[0]
    if control & 1:
        raise ValueError("a command fragment inside a C-STORE data set")
    return pdv[1:], bool(control & 2)
