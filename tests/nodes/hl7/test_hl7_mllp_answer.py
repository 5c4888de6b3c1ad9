"""What the blocks read after sending one message mean (sans-IO: no socket, no thread)."""

from __future__ import annotations

import os
import sys

import nodes.hl7.mllp as mllp
from nodes.hl7 import SRReportHandler, unframe
from nodes.hl7.mllp import answer_outcome, control_id_of
from nodes.outcome import Delivered, Permanent, Transient
from support.ris import ack_for
from support.synth import CANARY_PARTS

sys.path.insert(0, os.path.dirname(__file__))  # the helpers next to this file
import hl7_samples as samples  # noqa: E402


def _message() -> bytes:
    return SRReportHandler(samples.RIS).handle(samples.basic_text()).encode()


def test_one_ack_of_this_message_keeps_the_connection_whatever_it_says():
    message = _message()
    cid = control_id_of(message)
    assert answer_outcome([unframe(ack_for(message, "AA"))], cid) == (Delivered(), True)
    outcome, keep = answer_outcome([unframe(ack_for(message, "AE"))], cid)
    assert outcome == Permanent("ack AE err 103") and keep
    assert not any(part in repr(outcome) for part in CANARY_PARTS)


def test_an_answer_the_next_message_could_be_confused_with_closes_the_connection():
    message = _message()
    cid = control_id_of(message)
    other = unframe(ack_for(message, "AA", for_id=b"OTHER"))
    assert answer_outcome([other], cid) == (Transient("ack for another message"), False)
    mine = unframe(ack_for(message, "AA"))
    assert answer_outcome([mine, mine], cid) == (Transient("more than one ack"), False)
    assert answer_outcome([b"MSH|^~\\&|RIS\r"], cid) == \
        (Transient("answer is not an HL7 ACK"), False)


def test_the_protocol_module_does_no_io():
    assert not {"trio", "socket", "ssl", "MllpSender"} & set(vars(mllp))
