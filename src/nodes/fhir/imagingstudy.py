"""DICOM headers of one study → a FHIR R4 ImagingStudy (a pure, versioned Handler).

:class:`ImagingStudyHandler` takes the header datasets (pixel data not needed) of every
instance of one study and returns the resource as a JSON-ready ``dict``. It never does I/O and
never looks at the clock: the same headers always give the same resource, element for element
and in the same order (series by Series Number then UID, instances by Instance Number then
UID), so repeated updates of a study only differ where the study did.

Absent or malformed optional attributes leave their element out (FHIR forbids empty
elements); a study-level attribute is taken from the first instance, in that order, that has
it. The mapping table is in docs/fhir.md. Errors are :class:`MappingError`, whose messages
are routing-safe (UIDs and attribute keywords, never values).
"""

from __future__ import annotations

import datetime as _dt
import functools
import re
import zoneinfo
from collections.abc import Iterable, Sequence
from typing import Any

from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName

__all__ = ["ImagingStudyHandler", "MappingError", "ACSN_SYSTEM", "DCM_SYSTEM",
           "NUMBER_OF_FRAMES_URL", "SNOMED_SYSTEM", "DICOM_UID_SYSTEM"]

DICOM_UID_SYSTEM = "urn:dicom:uid"
ACSN_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0203"
DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
SNOMED_SYSTEM = "http://snomed.info/sct"
RFC3986_SYSTEM = "urn:ietf:rfc:3986"
# R4 dropped instance.numberOfFrames; IHE MADO (built on FHIR 4.0.1) defines this extension.
NUMBER_OF_FRAMES_URL = "https://profiles.ihe.net/RAD/MADO/StructureDefinition/MadoNumberOfFrames"

_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_DA = re.compile(r"(\d{4})\.?(\d{2})\.?(\d{2})")
_TM = re.compile(r"(\d{2})(?::?(\d{2})(?::?(\d{2})(\.\d{1,6})?)?)?")
_TZ = re.compile(r"([+-])(\d{2})(\d{2})")


class MappingError(ValueError):
    """The headers cannot make a valid ImagingStudy (message is routing-safe)."""


# -- reading attributes -------------------------------------------------------------------------

def _text(ds: Dataset, keyword: str) -> str | None:
    """The attribute's value as stripped text (first value if multi-valued), or None."""
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - a malformed optional value counts as absent
        return None
    if value is None:
        return None
    if not isinstance(value, (str, PersonName)) and isinstance(value, Sequence):
        value = value[0] if len(value) else None
        if value is None:
            return None
    text = str(value).strip(" \0")
    return text or None


def _uint(ds: Dataset, keyword: str) -> int | None:
    """An IS/US attribute as a non-negative int, or None when absent or malformed."""
    text = _text(ds, keyword)
    if text is None:
        return None
    try:
        number = int(text)
    except ValueError:
        try:
            as_float = float(text)
        except ValueError:
            return None
        if not as_float.is_integer():
            return None
        number = int(as_float)
    return number if 0 <= number < 2**31 else None


def _uid(ds: Dataset, keyword: str) -> str | None:
    text = _text(ds, keyword)
    return text if text is not None and _FHIR_ID.fullmatch(text) else None


def _ordered(pairs: Iterable[tuple[int | None, str, Any]]) -> list[Any]:
    """Items sorted by their (number, uid): numbered ones first, then by UID."""
    keyed = sorted(pairs, key=lambda p: (p[0] is None, p[0] or 0, p[1]))
    return [item for _, _, item in keyed]


# -- value conversions ----------------------------------------------------------------------------

def fhir_date(da: str | None) -> str | None:
    """DICOM DA (``YYYYMMDD`` or the old ``YYYY.MM.DD``) → FHIR ``YYYY-MM-DD``, or None."""
    match = _DA.fullmatch(da or "")
    if not match:
        return None
    y, m, d = (int(g) for g in match.groups())
    try:
        _dt.date(y, m, d)
    except ValueError:
        return None
    return f"{y:04d}-{m:02d}-{d:02d}"


def fhir_time(tm: str | None) -> str | None:
    """DICOM TM (``HH[MM[SS[.F{1,6}]]]``, old colon form too) → ``hh:mm:ss[.f]``, or None."""
    match = _TM.fullmatch(tm or "")
    if not match:
        return None
    hh, mm, ss, frac = match.groups()
    h, m, s = int(hh), int(mm or 0), int(ss or 0)
    if h > 23 or m > 59 or s > 59:
        return None
    return f"{h:02d}:{m:02d}:{s:02d}{frac or ''}"


def fhir_offset(tz: str | None) -> str | None:
    """DICOM TimezoneOffsetFromUTC ``±HHMM`` → FHIR ``±hh:mm``, or None when malformed."""
    match = _TZ.fullmatch(tz or "")
    if not match:
        return None
    sign, hh, mm = match.groups()
    h, m = int(hh), int(mm)
    if m > 59 or h > 14 or (h == 14 and m):
        return None
    return f"{sign}{h:02d}:{m:02d}"


def _zone_offset(zone: zoneinfo.ZoneInfo, date: str, time: str) -> str:
    local = _dt.datetime.fromisoformat(f"{date}T{time[:8]}").replace(tzinfo=zone)
    minutes = round(local.utcoffset().total_seconds() / 60)  # type: ignore[union-attr]
    sign = "-" if minutes < 0 else "+"
    return f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def fhir_started(da: str | None, tm: str | None, tz: str | None,
                 zone: zoneinfo.ZoneInfo | None = None) -> str | None:
    """FHIR dateTime from StudyDate/StudyTime/TimezoneOffsetFromUTC, or None without a date.

    FHIR requires a time zone whenever a time is given: the object's own offset is used, else
    the site's ``zone``; with neither, only the date is given (a time is never guessed).
    """
    date = fhir_date(da)
    if date is None:
        return None
    time = fhir_time(tm)
    if time is None:
        return date
    offset = fhir_offset(tz)
    if offset is None and zone is not None:
        offset = _zone_offset(zone, date, time)
    return f"{date}T{time}{offset}" if offset else date


def person_display(pn: PersonName | str | None) -> str | None:
    """A DICOM PN as a readable name: ``prefix given middle family suffix``."""
    if pn is None:
        return None
    if not isinstance(pn, PersonName):
        pn = PersonName(str(pn))
    parts = [pn.name_prefix, pn.given_name, pn.middle_name, pn.family_name, pn.name_suffix]
    text = " ".join(p.strip() for p in parts if p and p.strip())
    if not text:  # only ideographic/phonetic groups
        text = " ".join(str(pn).replace("=", " ").replace("^", " ").split())
    return text or None


# -- body site ------------------------------------------------------------------------------------

def _squash(text: str) -> str:
    return re.sub(r"[^A-Z0-9]", "", text.upper())


# Body Part Examined defined terms (PS3.16 Annex L) whose spelling differs from the squashed
# Code Meaning of their CID 4031 concept.
_BODY_PART_ALIASES = {
    "CSPINE": "CERVICALSPINE", "TSPINE": "THORACICSPINE", "LSPINE": "LUMBARSPINE",
    "SSPINE": "SACRUM", "CTSPINE": "CERVICOTHORACICSPINE", "TLSPINE": "THORACOLUMBARSPINE",
    "LSSPINE": "LUMBOSACRALSPINE", "HEADNECK": "HEADANDNECK", "WHOLEBODY": "ENTIREBODY",
    "ABDOMENPELVIS": "ABDOMENANDPELVIS", "CHESTABDOMEN": "CHESTANDABDOMEN",
    "CHESTABDPELVIS": "CHESTABDOMENANDPELVIS", "CHESTABDOMENPELVIS": "CHESTABDOMENANDPELVIS",
    "ANKLE": "ANKLEJOINT", "ELBOW": "ELBOWJOINT", "HIP": "HIPJOINT", "SHOULDER": "SHOULDERJOINT",
    "WRIST": "WRISTJOINT", "KNEE": "KNEE", "TMJ": "TEMPOROMANDIBULARJOINT",
}


# Built on the first lookup: pydicom.sr.codedict takes ~0.1 s to import, which every
# process that imports the nodes would pay, FHIR lane or not.
@functools.cache
def _anatomic_regions() -> dict[str, tuple[str, str]]:
    """Squashed Code Meaning → (SNOMED code, meaning) from CID 4031 as pydicom ships it."""
    try:
        from pydicom.sr.codedict import codes
        collection = codes.CID4031
        table = {}
        for keyword in collection.dir():
            code = getattr(collection, keyword)
            if code.scheme_designator == "SCT":
                table[_squash(code.meaning)] = (code.value, code.meaning)
        return table
    except Exception:  # noqa: BLE001 - an older pydicom without CIDs: codes by name only
        return {}


def body_site(ds: Dataset) -> dict[str, str] | None:
    """Series bodySite Coding: Anatomic Region Sequence if coded, else Body Part Examined."""
    try:
        regions = ds.get("AnatomicRegionSequence")
    except Exception:  # noqa: BLE001
        regions = None
    if regions:
        item = regions[0]
        value, scheme = _text(item, "CodeValue"), _text(item, "CodingSchemeDesignator")
        meaning = _text(item, "CodeMeaning")
        system = {"SCT": SNOMED_SYSTEM, "DCM": DCM_SYSTEM}.get(scheme or "")
        if system and value:
            return _coding(system, value, meaning)
        if meaning:
            return {"display": meaning}
    part = _text(ds, "BodyPartExamined")
    if part is None:
        return None
    squashed = _squash(part)
    found = _anatomic_regions().get(_BODY_PART_ALIASES.get(squashed, squashed))
    if found:
        return _coding(SNOMED_SYSTEM, found[0], found[1])
    return {"display": part}


def _coding(system: str, code: str, display: str | None = None) -> dict[str, str]:
    coding = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return coding


# -- the handler ----------------------------------------------------------------------------------

class ImagingStudyHandler:
    """Maps the headers of every instance of one study to an R4 ImagingStudy ``dict``.

    Args:
        patient_identifier_system: the site's system URI for Patient ID (``subject`` is a
            logical reference by identifier; without a system only the value is sent).
        endpoint: a Reference string (e.g. ``Endpoint/dicomweb``) put in ``endpoint``.
        timezone: IANA zone of the modalities' clocks, used for ``started`` when an object has
            no TimezoneOffsetFromUTC (without it such a ``started`` is the date only).
    """

    name = "imaging-study"
    version = "1.0"

    def __init__(self, patient_identifier_system: str | None = None,
                 endpoint: str | None = None, *, timezone: str | None = None) -> None:
        self.patient_identifier_system = patient_identifier_system or None
        self.endpoint = endpoint or None
        try:
            self.zone = zoneinfo.ZoneInfo(timezone) if timezone else None
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {timezone!r}") from exc

    def __repr__(self) -> str:
        return f"<ImagingStudyHandler {self.name} {self.version}>"

    def handle(self, datasets: list[Dataset]) -> dict[str, Any]:
        """The ImagingStudy for ``datasets`` (all of one study; duplicates count once).

        Raises :class:`MappingError` when there are no datasets, they belong to several
        studies, an instance lacks a SOP/Series Instance UID or a series its Modality,
        or instances disagree on the Patient ID or there is none.
        """
        if not datasets:
            raise MappingError("no instances to map")
        study_uids = {_uid(ds, "StudyInstanceUID") for ds in datasets}
        if len(study_uids) != 1 or None in study_uids:
            raise MappingError("instances do not share one valid StudyInstanceUID")
        study_uid = next(iter(study_uids))
        series = self._group(datasets, study_uid)
        ordered = [ds for _, instances in series for ds in instances]

        resource: dict[str, Any] = {"resourceType": "ImagingStudy"}
        identifiers = [{"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{study_uid}"}]
        accession = _first(ordered, "AccessionNumber")
        if accession:
            identifiers.append({"type": {"coding": [{"system": ACSN_SYSTEM, "code": "ACSN"}]},
                                "value": accession})
        resource["identifier"] = identifiers
        resource["status"] = "available"
        series_out = [self._series(uid, instances) for uid, instances in series]
        modalities = dict.fromkeys(s["modality"]["code"] for s in series_out)
        resource["modality"] = [_coding(DCM_SYSTEM, m) for m in modalities]
        resource["subject"] = self._subject(ordered, study_uid)
        started = self._started(ordered)
        if started:
            resource["started"] = started
        referrer = next((person_display(ds.get("ReferringPhysicianName")) for ds in ordered
                         if _text(ds, "ReferringPhysicianName")), None)
        if referrer:
            resource["referrer"] = {"display": referrer}
        if self.endpoint:
            resource["endpoint"] = [{"reference": self.endpoint}]
        resource["numberOfSeries"] = len(series)
        resource["numberOfInstances"] = len(ordered)
        description = _first(ordered, "StudyDescription")
        if description:
            resource["description"] = description
        resource["series"] = series_out
        return resource

    # -- parts ------------------------------------------------------------------------------------

    def _group(self, datasets: Sequence[Dataset], study_uid: str
               ) -> list[tuple[str, list[Dataset]]]:
        """Series (ordered) with their instances (ordered, one per SOP Instance UID)."""
        by_series: dict[str, dict[str, Dataset]] = {}
        for ds in datasets:
            sop_uid, series_uid = _uid(ds, "SOPInstanceUID"), _uid(ds, "SeriesInstanceUID")
            if sop_uid is None or series_uid is None:
                raise MappingError(f"an instance of study {study_uid} lacks a valid "
                                   "SOPInstanceUID or SeriesInstanceUID")
            by_series.setdefault(series_uid, {}).setdefault(sop_uid, ds)
        series = []
        for series_uid, instances in by_series.items():
            ordered = _ordered((_uint(ds, "InstanceNumber"), uid, ds)
                               for uid, ds in instances.items())
            series.append((_first_uint(ordered, "SeriesNumber"), series_uid,
                           (series_uid, ordered)))
        return _ordered(series)

    def _subject(self, ordered: Sequence[Dataset], study_uid: str) -> dict[str, Any]:
        ids = {_text(ds, "PatientID") for ds in ordered} - {None}
        if not ids:
            raise MappingError(f"study {study_uid} has no PatientID (ImagingStudy.subject "
                               "is required)")
        if len(ids) > 1:
            raise MappingError(f"instances of study {study_uid} disagree on PatientID")
        identifier = {"value": ids.pop()}
        if self.patient_identifier_system:
            identifier = {"system": self.patient_identifier_system, **identifier}
        return {"type": "Patient", "identifier": identifier}

    def _started(self, ordered: Sequence[Dataset]) -> str | None:
        for ds in ordered:
            started = fhir_started(_text(ds, "StudyDate"), _text(ds, "StudyTime"),
                                   _text(ds, "TimezoneOffsetFromUTC"), self.zone)
            if started:
                return started
        return None

    def _series(self, series_uid: str, instances: list[Dataset]) -> dict[str, Any]:
        modality = _first(instances, "Modality")
        if not modality:
            raise MappingError(f"series {series_uid} has no Modality")
        out: dict[str, Any] = {"uid": series_uid}
        number = _first_uint(instances, "SeriesNumber")
        if number is not None:
            out["number"] = number
        out["modality"] = _coding(DCM_SYSTEM, modality)
        description = _first(instances, "SeriesDescription")
        if description:
            out["description"] = description
        out["numberOfInstances"] = len(instances)
        site = next((s for s in map(body_site, instances) if s), None)
        if site:
            out["bodySite"] = site
        out["instance"] = [self._instance(ds) for ds in instances]
        return out

    def _instance(self, ds: Dataset) -> dict[str, Any]:
        sop_uid = _uid(ds, "SOPInstanceUID")
        sop_class = _uid(ds, "SOPClassUID")
        if sop_class is None:
            raise MappingError(f"instance {sop_uid} has no valid SOPClassUID")
        out: dict[str, Any] = {"uid": sop_uid,
                               "sopClass": _coding(RFC3986_SYSTEM, f"urn:oid:{sop_class}")}
        number = _uint(ds, "InstanceNumber")
        if number is not None:
            out["number"] = number
        title = _document_title(ds)
        if title:
            out["title"] = title
        frames = _uint(ds, "NumberOfFrames")
        if frames:
            out["extension"] = [{"url": NUMBER_OF_FRAMES_URL, "valueInteger": frames}]
        return out


def _document_title(ds: Dataset) -> str | None:
    """An SR/KOS document's title: the root container's concept name (e.g. a report type)."""
    if _text(ds, "ValueType") != "CONTAINER":
        return None
    try:
        names = ds.get("ConceptNameCodeSequence")
    except Exception:  # noqa: BLE001
        return None
    return _text(names[0], "CodeMeaning") if names else None


def _first(datasets: Iterable[Dataset], keyword: str) -> str | None:
    return next((t for t in (_text(ds, keyword) for ds in datasets) if t), None)


def _first_uint(datasets: Iterable[Dataset], keyword: str) -> int | None:
    return next((n for n in (_uint(ds, keyword) for ds in datasets) if n is not None), None)
