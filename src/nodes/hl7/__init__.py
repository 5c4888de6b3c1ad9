"""HL7 v2: versioned Handlers (DICOM header → message), the ToHL7 lane node, MLLP sender.

    lane = Filter(is_structured_report) >> ToHL7(SRReportHandler(site.ris)) >> MllpSender(site.ris)

Modules: ``model`` (message model, escaping, ER7), ``fields`` (DICOM values → HL7 types),
``sr`` (SR content tree; its items read from the object's bytes by ``nodes.dicom.items``),
``handlers`` (Handler and the built-in ones), ``node`` (ToHL7),
``mllp`` (framing, ACKs: pure), ``sender`` (MllpSender), ``config`` (RisConfig).
See docs/hl7.md.
"""

from .config import RisConfig
from .fields import Code, xpn
from .handlers import Handler, SRReportHandler, StudyNoticeHandler, msh, new_control_id
from .mllp import Ack, Deframer, MllpError, classify_ack, frame, parse_ack, unframe
from .model import Message, Rep, Segment, Sub, escape, parse, text_lines, unescape
from .node import ToHL7
from .sender import MllpSender

__all__ = [
    "Ack", "Code", "Deframer", "Handler", "Message", "MllpError", "MllpSender", "Rep",
    "RisConfig", "SRReportHandler", "Segment", "StudyNoticeHandler", "Sub", "ToHL7",
    "classify_ack", "escape", "frame", "msh", "new_control_id", "parse", "parse_ack",
    "text_lines", "unescape", "unframe", "xpn",
]
