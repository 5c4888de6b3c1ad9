"""Handlers: versioned, pure functions from a DICOM header to an HL7 v2 message.

A :class:`Handler` is user code. Subclass it, set ``name`` and ``version``, and implement
``handle(ds)``: it gets the object's header (with the SR content tree, never pixel data) and
returns a :class:`~nodes.hl7.model.Message`, or None to skip the object. It should not touch
the network or the disk, so it is unit-tested in a few lines. ``ToHL7`` records ``handler
NAME VERSION`` with every message it produced: bump ``version`` whenever the mapping changes.

Built in: :class:`SRReportHandler` (SR report → ORU^R01) and :class:`StudyNoticeHandler`
(first instance of a study → ORU^R01 "study available"; the one that keeps a small state
file, to stay once-per-study across restarts). Both take the MSH identity from any object
with the attribute names of :class:`~nodes.hl7.config.RisConfig`. Mapping tables:
docs/hl7.md.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from pydicom.dataset import Dataset

from . import fields as f
from .fields import Code, code_of, first
from .model import FieldValue, Message, Segment
from .obx import Observer, content_obxs
from .sr import result_status

HL7_VERSION = "2.5.1"
ORU_R01 = ("ORU", "R01", "ORU_R01")
SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."

# OBX-3 of the OBXs that carry the object's identity (table in docs/hl7.md).
STUDY_UID = Code("113014", "DCM", "DICOM Study")            # IHE's code for the study UID
SERIES_UID = Code("112002", "DCM", "Series Instance UID")
SOP_CLASS_UID = Code("110181", "DCM", "SOP Class UID")
SOP_INSTANCE_UID = Code("SOPInstanceUID", "99DCMFLOW", "SOP Instance UID")  # no DCM code
MODALITY = Code("121139", "DCM", "Modality")
STUDY_DATE = Code("111060", "DCM", "Study Date")
STUDY_TIME = Code("111061", "DCM", "Study Time")
GENERIC_STUDY = Code("113014", "DCM", "Study")


class Identity(Protocol):
    """Who sends and who receives (MSH-3..6): RisConfig has these attributes."""

    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str


class Handler:
    """Base class of handlers (see the module docstring).

    Contract: ``handle`` is called in a worker thread, one object at a time per ToHL7 node;
    what it raises dead-letters that object only (the reason is the exception's class name,
    never its text); returning None settles the object as Skipped.
    """

    name: str = ""
    version: str = "0"

    def handle(self, ds: Dataset) -> Message | None:
        raise NotImplementedError

    @property
    def label(self) -> str:
        """``NAME VERSION``, as recorded in the audit trail."""
        return f"{self.name or type(self).__name__} {self.version}"


# -- message heads ---------------------------------------------------------------------------


# MSH-10's counter: from a random start in each process, drawn again in a forked child.
# next() on itertools.count is one C call, atomic under the GIL (handlers run in threads).
_control_counter = itertools.count(secrets.randbits(32))


def _new_control_counter() -> None:
    global _control_counter
    _control_counter = itertools.count(secrets.randbits(32))


os.register_at_fork(after_in_child=_new_control_counter)


def new_control_id() -> str:
    """A unique MSH-10 (≤ 20 characters, the 2.5.1 limit): the time in milliseconds (11 hex
    digits until the year 2527), then the process's 32-bit counter (8). Never the same twice
    in a process (the counter would have to go round in one millisecond); across processes
    as unlikely as 32 random bits, and only within the same millisecond. No system call per
    message (it was a random draw each)."""
    return f"{time.time_ns() // 1_000_000:X}{next(_control_counter) & 0xFFFFFFFF:08X}"


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def hl7_time(moment: datetime) -> str:
    """A datetime as HL7 DTM with its UTC offset, to the second."""
    return moment.strftime("%Y%m%d%H%M%S%z")


def msh(identity: Identity, message_type: tuple[str, ...], *, control_id: str | None = None,
        now: datetime | None = None, charset: str = "") -> Segment:
    """MSH for a v2.5.1 message: MSH-3..6 from ``identity`` (a RisConfig), MSH-7 ``now``
    (default: the current UTC time), MSH-9 ``message_type``, MSH-10 ``control_id``
    (default: a new unique one), MSH-11 P, MSH-12 2.5.1, MSH-18 ``charset`` (table 0211;
    "" is ASCII)."""
    control_id = control_id or new_control_id()
    now = now or utc_now()
    return Segment("MSH", {
        3: identity.sending_application or None,
        4: identity.sending_facility or None,
        5: identity.receiving_application or None,
        6: identity.receiving_facility or None,
        7: hl7_time(now),
        9: message_type,
        10: control_id,
        11: "P",
        12: HL7_VERSION,
        18: charset or None,
    })


def fit_charset(message: Message, fallback: str = f.UTF8) -> Message:
    """Let MSH-18 fall back to ``fallback`` (UTF-8) if the text does not fit the declared
    set: a name that does not fit must never reach the RIS garbled. Settled when the message
    is encoded (see :class:`~nodes.hl7.model.Message`), so it costs no extra rendering."""
    message.charset_fallback = fallback
    return message


# -- shared segments ---------------------------------------------------------------------------


class MissingPatientID(ValueError):
    """The object has no Patient ID: PID-3 is required in HL7 v2.5.1, and a result the RIS
    cannot attach to a patient must not be sent. The object is dead-lettered in its lane."""


def pid(ds: Dataset) -> Segment:
    """PID-3 identifiers (with issuer), PID-5 name, PID-7 birth date, PID-8 sex.

    Raises :class:`MissingPatientID` when the object carries no patient identifier."""
    identifiers = f.patient_identifiers(ds)
    if not identifiers:
        raise MissingPatientID("no Patient ID for PID-3")
    return Segment("PID", {
        1: "1",
        3: identifiers,
        5: f.xpn(f.get(ds, "PatientName")) or ("",),
        7: f.da(f.get(ds, "PatientBirthDate")) or None,
        8: f.sex(f.get(ds, "PatientSex")),
    })


class Order:
    """The request facts of an object: accession, placer/filler numbers, procedure."""

    __slots__ = ("accession", "placer", "filler", "requested_procedure_id", "sps_id",
                 "procedure")

    def __init__(self, ds: Dataset) -> None:
        request = first(ds, "ReferencedRequestSequence")
        attrs = first(ds, "RequestAttributesSequence")

        def pick(keyword: str) -> str:
            for source in (request, attrs, ds):
                if source is not None:
                    value = str(f.get(source, keyword, "") or "").strip()
                    if value:
                        return value
            return ""

        self.accession = str(f.get(ds, "AccessionNumber", "") or "").strip() or pick(
            "AccessionNumber")
        self.placer = pick("PlacerOrderNumberImagingServiceRequest")
        self.filler = pick("FillerOrderNumberImagingServiceRequest")
        self.requested_procedure_id = pick("RequestedProcedureID")
        self.sps_id = pick("ScheduledProcedureStepID")
        code = None
        for source, keyword in ((request, "RequestedProcedureCodeSequence"),
                                (attrs, "RequestedProcedureCodeSequence"),
                                (ds, "ProcedureCodeSequence")):
            code = code_of(first(source, keyword))
            if code is not None and code.value:
                break
        self.procedure: FieldValue = code.ce() if code is not None and code.value else None
        if self.procedure is None:
            text = pick("RequestedProcedureDescription") or str(
                f.get(ds, "StudyDescription", "") or "").strip()
            if text:
                self.procedure = (None, text)

    def orc(self, status: str) -> Segment:
        return Segment("ORC", {1: "SC", 2: self.placer or None,
                               3: self.filler or self.accession or None, 5: status})

    def obr(self, procedure_fallback: FieldValue, observed: str, status: str,
            extra: dict[int, FieldValue] | None = None) -> Segment:
        seg = Segment("OBR", {
            1: "1",
            2: self.placer or None,
            3: self.filler or self.accession or None,
            4: self.procedure or procedure_fallback,
            7: observed or None,
            18: self.accession or None,
            19: self.requested_procedure_id or None,
            20: self.sps_id or None,
            25: status,
        })
        for position, value in (extra or {}).items():
            seg[position] = value
        return seg


def obx(set_id: int, value_type: str | None, concept: Code, value: FieldValue, status: str, *,
        sub_id: str = "", units: FieldValue = None, observed: str = "") -> Segment:
    """OBX-1 set ID, -2 value type (only with a value), -3 concept, -4 sub-ID, -5 value,
    -6 units, -11 result status, -14 observation time. (A report's content items are
    rendered by :mod:`nodes.hl7.obx`, with the same fields.)"""
    fields = [str(set_id), value_type if value is not None else None, concept.ce(),
              sub_id or None, value, units, None, None, None, None, status]
    if observed:
        fields += (None, None, observed)
    return Segment.from_fields("OBX", fields)


def study_time(ds: Dataset) -> str:
    return f.dtm(f.get(ds, "StudyDate"), f.get(ds, "StudyTime"), f.get(ds, "TimezoneOffsetFromUTC"))


# -- SR report → ORU^R01 -------------------------------------------------------------------------


def _interpreter(ds: Dataset, observer: Observer) -> FieldValue:
    """OBR-32: the verifying observer, else the author observer, else the root's
    Person Observer Name (TID 1002 observer context, found by the content walk)."""
    verifier = first(ds, "VerifyingObserverSequence")
    if verifier is not None and f.get(verifier, "VerifyingObserverName"):
        ident = code_of(first(verifier, "VerifyingObserverIdentificationCodeSequence"))
        return f.ndl(f.get(verifier, "VerifyingObserverName"), ident.value if ident else "")
    author = first(ds, "AuthorObserverSequence")
    if author is not None and f.get(author, "PersonName"):
        ident = code_of(first(author, "PersonIdentificationCodeSequence"))
        return f.ndl(f.get(author, "PersonName"), ident.value if ident else "")
    if observer.found:
        return f.ndl(observer.name)
    return None


class SRReportHandler(Handler):
    """Basic Text / Enhanced / Comprehensive SR report → ORU^R01 (HL7 v2.5.1).

    Mapping tables: docs/hl7.md. Objects that are not SR documents are skipped (None).
    ``clock`` and ``control_ids`` exist for golden tests (fixed MSH-7 and MSH-10).
    """

    name = "sr-report"
    version = "1.1"

    def __init__(self, identity: Identity, *, clock: Callable[[], datetime] = utc_now,
                 control_ids: Callable[[], str] = new_control_id) -> None:
        self.identity = identity
        self.clock = clock
        self.control_ids = control_ids

    def handle(self, ds: Dataset) -> Message | None:
        if not str(f.get(ds, "SOPClassUID", "")).startswith(SR_CLASS_PREFIX):
            return None
        status = result_status(ds)
        order = Order(ds)
        title = code_of(first(ds, "ConceptNameCodeSequence"))
        message = Message([
            msh(self.identity, ORU_R01, control_id=self.control_ids(), now=self.clock(),
                charset=f.charset_for(f.get(ds, "SpecificCharacterSet"))),
            pid(ds),
            order.orc("CM"),
        ])
        contents, observer = content_obxs(ds, status)  # one OBX per content item
        message.add(order.obr(
            title.ce() if title else GENERIC_STUDY.ce(),
            study_time(ds) or f.dtm(f.get(ds, "ContentDate"), f.get(ds, "ContentTime")),
            status, {22: f.dtm(f.get(ds, "ContentDate"), f.get(ds, "ContentTime"),
                               f.get(ds, "TimezoneOffsetFromUTC")) or None,
                     32: _interpreter(ds, observer)}))
        message.segments += contents
        n = len(contents)
        for concept, value in ((STUDY_UID, f.get(ds, "StudyInstanceUID")),
                               (SERIES_UID, f.get(ds, "SeriesInstanceUID")),
                               (SOP_INSTANCE_UID, f.get(ds, "SOPInstanceUID")),
                               (SOP_CLASS_UID, f.get(ds, "SOPClassUID"))):
            if value:
                n += 1
                message.add(obx(n, "ST", concept, str(value), status))
        return fit_charset(message)


# -- header → study notice -----------------------------------------------------------------------


_UID = re.compile(r"^[0-9][0-9.]{0,63}$")  # PS3.5 §9.1: digits and dots, at most 64


class InvalidUID(ValueError):
    """An object whose Study or SOP Instance UID is not a UID cannot be announced."""


class AnnouncedStudies:
    """Which object announced each study: in memory, and in an append-only file when given.

    One line per study, ``STUDY_UID SOP_INSTANCE_UID`` (UIDs only, no PHI), fsynced before
    the notice leaves the handler, so a restart knows every study it announced. The file is
    rewritten (temporary file, fsync, rename) to the newest ``remember`` studies when it has
    grown to twice that. Thread-safe: handlers run in worker threads.
    """

    def __init__(self, path: str | os.PathLike[str] | None, remember: int = 100_000) -> None:
        if remember < 1:
            raise ValueError("remember must be at least 1")
        self.path = Path(path) if path is not None else None
        self.remember = remember
        self._studies: OrderedDict[str, str] = OrderedDict()
        self._lines = 0
        self._loaded = self.path is None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            self._load()
            return len(self._studies)

    def announcer(self, study: str) -> str | None:
        """The SOP Instance UID that announced ``study``, or None."""
        with self._lock:
            self._load()
            return self._studies.get(study)

    def claim(self, study: str, sop: str) -> bool:
        """True when ``sop`` announces ``study``: it is the first object seen of it (and is
        now recorded, durably when there is a file) or it announced it before."""
        if not _UID.match(study) or not _UID.match(sop):
            raise InvalidUID("a study or SOP instance UID is not a DICOM UID")
        with self._lock:
            self._load()
            announcer = self._studies.get(study)
            if announcer is not None:
                return announcer == sop
            self._studies[study] = sop
            while len(self._studies) > self.remember:
                self._studies.popitem(last=False)
            if self.path is not None:
                self._append(study, sop)
            return True

    def _append(self, study: str, sop: str) -> None:
        assert self.path is not None
        if self._lines + 1 >= 2 * self.remember:
            self._rewrite()
            return
        with open(self.path, "a", encoding="ascii") as out:
            out.write(f"{study} {sop}\n")
            out.flush()
            os.fsync(out.fileno())
        self._lines += 1

    def _load(self) -> None:
        if self._loaded:
            return
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            text = self.path.read_text(encoding="ascii", errors="replace")
        except FileNotFoundError:
            text = ""
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 2:  # a torn last line (crash mid-write) is just not there
                self._studies[parts[0]] = parts[1]
                self._studies.move_to_end(parts[0])
                self._lines += 1
        while len(self._studies) > self.remember:
            self._studies.popitem(last=False)
        self._loaded = True

    def _rewrite(self) -> None:
        assert self.path is not None
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="ascii") as out:
            out.writelines(f"{study} {sop}\n" for study, sop in self._studies.items())
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._lines = len(self._studies)


class StudyNoticeHandler(Handler):
    """First object of a study → ORU^R01 "study available" (OBR-25 I: images in, no result).

    Once per study, across restarts: the first object seen of a study becomes its
    *announcer* and is recorded in ``{state_dir}/study-notices.txt`` (see
    :class:`AnnouncedStudies`) before its notice is returned; every other object of that
    study is skipped. The announcer itself is announced again when it comes back (a retry
    after a failed send, or a re-queue after a crash between recording and sending, must not
    be lost): the receiver may see a notice twice, never zero times. ``state_dir=None`` keeps
    the memory in this process only (tests, or a site that accepts a repeat after restart).
    The newest ``remember`` studies are kept. SR documents are skipped (they are reports,
    not images: see SRReportHandler).

    This built-in handler touches the disk, by design; a user Handler should stay pure.
    """

    name = "study-notice"
    version = "1.0"
    STATE_FILE = "study-notices.txt"

    def __init__(self, identity: Identity, *, state_dir: str | os.PathLike[str] | None,
                 remember: int = 100_000, clock: Callable[[], datetime] = utc_now,
                 control_ids: Callable[[], str] = new_control_id) -> None:
        self.identity = identity
        self.clock = clock
        self.control_ids = control_ids
        path = Path(state_dir) / self.STATE_FILE if state_dir is not None else None
        self.announced = AnnouncedStudies(path, remember)

    def handle(self, ds: Dataset) -> Message | None:
        if str(f.get(ds, "SOPClassUID", "")).startswith(SR_CLASS_PREFIX):
            return None
        study = str(f.get(ds, "StudyInstanceUID", "") or "").strip()
        sop = str(f.get(ds, "SOPInstanceUID", "") or "").strip()
        if not study or not sop:
            return None
        if not self.announced.claim(study, sop):
            return None
        return self._notice(ds, study)

    def _notice(self, ds: Dataset, study: str) -> Message:
        order = Order(ds)
        status = "I"
        fallback: Any = (None, str(f.get(ds, "StudyDescription", "") or "").strip() or None)
        if fallback[1] is None:
            fallback = GENERIC_STUDY.ce()
        message = Message([
            msh(self.identity, ORU_R01, control_id=self.control_ids(), now=self.clock(),
                charset=f.charset_for(f.get(ds, "SpecificCharacterSet"))),
            pid(ds),
            order.orc("IP"),
            order.obr(fallback, study_time(ds), status),
        ])
        n = 0
        modality = str(f.get(ds, "Modality", "") or "").strip()
        for hl7_type, concept, value in (
                ("ST", STUDY_UID, study),
                ("CE", MODALITY, (modality, modality, "DCM") if modality else None),
                ("DT", STUDY_DATE, f.da(f.get(ds, "StudyDate")) or None),
                ("TM", STUDY_TIME, f.tm(f.get(ds, "StudyTime")) or None)):
            if value:
                n += 1
                message.add(obx(n, hl7_type, concept, value, status))
        return fit_charset(message)
