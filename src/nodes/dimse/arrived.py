"""What arrived in one C-STORE: the received data set judged and made into an Arrival.

No pynetdicom here: the listener passes what the request said (SOP Class/Instance UID, the
accepted transfer syntax, the AE titles) and where the data set is (in memory, or at an
offset of a spool file). :func:`arrival` reads the routing-safe envelope (the byte layer,
:mod:`nodes.dicom`), checks the data set against the command and for completeness, and
raises :class:`Refused` with the status to answer for a data set that must not be
committed.
"""

from __future__ import annotations

import io
import mmap
import os
import time
from dataclasses import dataclass
from typing import Any

from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
                         ExplicitVRLittleEndian, ImplicitVRLittleEndian)

from ..arrival import Arrival, Envelope
from ..dicom import (CutShort, Unscannable, check_complete, encode_file_meta, read_envelope,
                     read_file_meta)
from ..payload import BytesPayload, FilePayload, Payload, SplicedPayload
from .contexts import ACCEPTED_TRANSFER_SYNTAXES
from .status import CANNOT_UNDERSTAND, DATASET_MISMATCH

INLINE_MAX = 2 << 20  # data sets up to this size go to the Store in memory

# Compressed syntaxes encode the data set as explicit VR little endian (PS3.5 A.4).
_ENCAPSULATED_LE = frozenset(ACCEPTED_TRANSFER_SYNTAXES) - {
    ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian}
_IMPLICIT = {ImplicitVRLittleEndian: True, ExplicitVRLittleEndian: False}


class Refused(Exception):
    """A data set we will not commit; ``status`` is the answer, ``why`` routing-safe."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status
        self.why = why


@dataclass(frozen=True)
class Received:
    """Where a C-STORE's data set is: ``data`` (in memory) or ``size`` bytes at ``offset``
    of the Part 10 file ``path``."""

    path: str
    data: bytes | None
    offset: int
    size: int


@dataclass(frozen=True)
class Request:
    """What the C-STORE request and its association said (routing-safe)."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    calling_ae: str
    called_ae: str
    peer: str


def implicit_vr(ts: str) -> bool | None:
    """Whether a data set in transfer syntax ``ts`` is implicit VR little endian; None when
    it is not little endian as received (deflate, big endian): the scanners leave it."""
    return _IMPLICIT.get(ts, False if ts in _ENCAPSULATED_LE else None)


def check_received(received: Received, ts: str) -> None:
    """Raise :class:`~nodes.dicom.CutShort` when the data set received ends inside an element
    (:func:`~nodes.dicom.check_complete`): from memory, or from the spool file through mmap.
    Says nothing of a data set it cannot walk (deflate, big endian, an unknown layout) or
    read."""
    implicit = implicit_vr(ts)
    if implicit is None or received.size <= 0:
        return
    try:
        if received.data is not None:
            check_complete(received.data, implicit)
        else:
            with open(received.path, "rb") as f, \
                    mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                check_complete(m, implicit, received.offset, received.offset + received.size)
    except CutShort:
        raise
    except (Unscannable, OSError, ValueError):  # not walkable, or the spool file unreadable:
        pass  # the Store reads the same file and answers for it


def read_header(received: Received, ts: str, meta: bytes) -> dict[str, str]:
    """The envelope's elements by keyword (:func:`~nodes.dicom.read_envelope`): the data set
    if in memory, else pydicom reads the spool file; ``meta`` names the accepted transfer
    syntax when pydicom reads the in-memory data set."""
    source: Any = received.path if received.data is None else io.BytesIO(meta + received.data)
    return read_envelope(received.data, implicit_vr(ts), source)


def read_part10(path: str) -> Received:
    """A received Part 10 file (pynetdicom's stock temp file): its data set in memory when
    at most ``INLINE_MAX``."""
    with open(path, "rb") as f:
        offset = read_file_meta(f).dataset_offset
        size = os.fstat(f.fileno()).st_size - offset
        f.seek(offset)
        return Received(path, f.read() if size <= INLINE_MAX else None, offset, size)


def arrival(request: Request, received: Received | str) -> tuple[Arrival, int]:
    """The Arrival of a received data set (``received``, or the Part 10 file at that path:
    :func:`read_part10`) and the data set's size: the payload is a file meta built from the request (our
    implementation UID, the calling AE title) followed by the data set bytes unchanged.
    Raises :class:`Refused`: CANNOT_UNDERSTAND for a data set that cannot be
    parsed, is empty, has no SOP Class/Instance UID or is cut short; DATASET_MISMATCH for
    one whose UIDs differ from the request's."""
    sop_class, sop_instance = request.sop_class_uid, request.sop_instance_uid
    ts = request.transfer_syntax_uid
    try:
        meta = encode_file_meta(sop_class, sop_instance, ts, source_ae_title=request.calling_ae)
        if isinstance(received, str):
            received = read_part10(received)
        header = read_header(received, ts, meta)
        found = (header.get("SOPClassUID", ""), header.get("SOPInstanceUID", ""))
    except Exception as exc:  # pydicom raises many kinds on a broken data set
        raise Refused(CANNOT_UNDERSTAND, f"data set cannot be parsed "
                                         f"({type(exc).__name__})") from None
    if received.size <= 0:
        raise Refused(CANNOT_UNDERSTAND, "empty data set")
    if not all(found):
        raise Refused(CANNOT_UNDERSTAND, "data set has no SOP Class/Instance UID")
    if found != (sop_class, sop_instance):
        raise Refused(DATASET_MISMATCH, "data set SOP Class/Instance UID differs from "
                                        "the C-STORE request")
    try:  # Success would say it can be delivered: an object cut short cannot
        check_received(received, ts)
    except CutShort as exc:
        raise Refused(CANNOT_UNDERSTAND, f"data set cut short ({exc})") from None
    payload: Payload
    if received.data is not None:
        payload = BytesPayload(meta + received.data)
    else:
        payload = SplicedPayload(meta, FilePayload(received.path), received.offset)
    envelope = Envelope(
        sop_instance_uid=sop_instance, sop_class_uid=sop_class, transfer_syntax_uid=ts,
        study_instance_uid=header.get("StudyInstanceUID", ""),
        series_instance_uid=header.get("SeriesInstanceUID", ""),
        modality=header.get("Modality", ""), calling_ae=request.calling_ae,
        called_ae=request.called_ae, peer=request.peer, received_at=time.time())
    return Arrival(envelope, payload), received.size
