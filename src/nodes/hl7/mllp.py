"""MLLP (HL7 v2 Minimal Lower Layer Protocol) and HL7 ACKs, sans-IO: bytes in, values out.

- :func:`frame` / :func:`unframe`: one block, ``0x0B message 0x1C 0x0D``.
- :class:`Deframer`: an incremental reader; feed it bytes as they arrive, get the complete
  messages out (:class:`MllpError` when the bytes are not MLLP).
- :func:`parse_ack` (an ACK's routing-safe facts), :func:`classify_ack` (what it means for
  the message sent) and :func:`answer_outcome` (what the blocks read after sending one
  message mean, and whether the connection may carry the next one).
- :func:`control_id_of`: MSH-10 of a message, from its raw bytes.

Nothing here opens a socket or waits; :class:`~nodes.hl7.sender.MllpSender` does the I/O.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..outcome import Delivered, Outcome, Permanent, Transient
from .model import parse

MEDIA_TYPE = "x-application/hl7-v2+er7"  # what ToHL7 passes on
START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
MAX_FRAME = 16 << 20          # a frame larger than this is not an ACK we will read
# What may travel from an ACK into a reason: MSA-1 is two letters (table 0008); an error
# code is digits (table 0357 and the v2.3 table 0357 codes alike). A RIS's local
# alphanumeric "code" could be a name, so it is dropped rather than judged.
_ACK_CODE = re.compile(r"^[A-Z]{2}$")
_ERROR_CODE = re.compile(r"^[0-9]{1,6}$")


def frame(message: bytes) -> bytes:
    """One MLLP block: 0x0B message 0x1C 0x0D."""
    if START_BLOCK in message or b"\x1c" in message:
        raise ValueError("an HL7 message must not contain the MLLP block characters")
    return START_BLOCK + message + END_BLOCK


def unframe(block: bytes) -> bytes:
    """The message inside one complete MLLP block (ValueError if ``block`` is not one)."""
    if not block.startswith(START_BLOCK) or not block.endswith(END_BLOCK):
        raise ValueError("not an MLLP block")
    return block[1:-2]


class MllpError(Exception):
    """Bytes that are not MLLP framing (the peer is not an MLLP endpoint)."""


class Deframer:
    """Incremental MLLP reader: feed bytes as they come, get complete messages out.

    CR/LF between blocks is tolerated (some peers end a block with 1C 0D 0A); any other byte
    outside a block raises :class:`MllpError`, as does a block larger than ``max_frame``.
    """

    __slots__ = ("_buffer", "_in_block", "max_frame")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buffer = bytearray()
        self._in_block = False
        self.max_frame = max_frame

    @property
    def pending(self) -> bool:
        """True while a block has started and not ended."""
        return self._in_block

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        buf = self._buffer
        buf += data
        while buf:
            if not self._in_block:
                stripped = buf.lstrip(b"\r\n")
                if not stripped:
                    buf.clear()
                    break
                if stripped[:1] != START_BLOCK:
                    buf.clear()
                    raise MllpError("bytes outside an MLLP block")
                del buf[:len(buf) - len(stripped) + 1]
                self._in_block = True
            end = buf.find(END_BLOCK)
            if end < 0:
                if len(buf) > self.max_frame:
                    buf.clear()
                    raise MllpError("MLLP block too large")
                break
            out.append(bytes(buf[:end]))
            del buf[:end + 2]
            self._in_block = False
        return out


# -- ACKs ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ack:
    """The routing-safe facts of an ACK: MSA-1, MSA-2, the first ERR-3 code (if safe)."""

    code: str
    control_id: str
    error_code: str = ""


def parse_ack(data: bytes) -> Ack:
    """An ACK message's facts (ValueError when it has no MSA segment)."""
    message = parse(data)
    msa = message.segment("MSA")
    if msa is None:
        raise ValueError("no MSA segment")
    error = ""
    err = message.segment("ERR")
    if err is not None:
        # v2.5 ERR-3 (HL7 error code, table 0357); v2.3/2.4 ERR-1's fourth component
        error = err.get(3) or err.get(1, 4)
    error = error.strip()
    return Ack(msa.get(1).strip().upper(), msa.get(2).strip(),
               error if _ERROR_CODE.match(error) else "")


def classify_ack(ack: Ack, control_id: str) -> Outcome:
    """What an ACK means for the message with MSH-10 ``control_id``."""
    if ack.control_id != control_id:
        return Transient("ack for another message")
    if ack.code in ("AA", "CA"):
        return Delivered()
    if ack.code in ("AE", "AR", "CE", "CR"):
        return Permanent(f"ack {ack.code}" + (f" err {ack.error_code}" if ack.error_code else ""))
    return Transient("ack with unknown code" if _ACK_CODE.match(ack.code) is None
                     else f"ack with unknown code {ack.code}")


def control_id_of(message: bytes) -> str:
    """MSH-10 of an ER7 message, read from the raw bytes (no full parse)."""
    first = message.split(b"\r", 1)[0]
    if not first.startswith(b"MSH") or len(first) < 4:
        raise ValueError("not an HL7 v2 message")
    fields = first.split(first[3:4])
    return fields[9].decode("ascii", "replace") if len(fields) > 9 else ""


def answer_outcome(blocks: Sequence[bytes], control_id: str) -> tuple[Outcome, bool]:
    """What the first complete blocks read after sending the message ``control_id`` mean:
    (outcome, whether the connection may carry the next message).

    The connection is kept only for exactly one ACK of this very message; an ACK for
    another message, more than one block (a late ACK must not be taken for the next
    message's) or an answer that is not an ACK gives a Transient outcome and a closed
    connection. ``blocks`` is not empty.
    """
    try:
        ack = parse_ack(blocks[0])
    except ValueError:
        return Transient("answer is not an HL7 ACK"), False
    if len(blocks) > 1:
        return Transient("more than one ack"), False
    return classify_ack(ack, control_id), ack.control_id == control_id
