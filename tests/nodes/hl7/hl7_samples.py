"""Synthetic SR reports for the HL7 tests, bench/hl7.py and the dsrdump interop test.

Every report carries the PHI canary as patient name (or a non-ASCII name built around it)
and fixed UIDs, so the expected ER7 can be written down (see test_hl7_handlers.py).
"""

from __future__ import annotations

from datetime import datetime, timezone

from pydicom.dataset import Dataset

from nodes.hl7 import RisConfig
from support.synth import CANARY, CANARY_ID, base_dataset

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"

RIS = RisConfig(host="127.0.0.1", sending_facility="SITE-A", receiving_facility="HOSP")
FIXED_NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
DELIMITERS_TEXT = "Pipe | caret ^ amp & tilde ~ backslash \\ end.\nSecond line."


def code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def content(value_type: str, concept: Dataset | None, relationship: str = "CONTAINS",
            **values) -> Dataset:
    item = Dataset()
    item.RelationshipType = relationship
    item.ValueType = value_type
    if concept is not None:
        item.ConceptNameCodeSequence = [concept]
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def text(meaning_code: Dataset, value: str, relationship: str = "CONTAINS") -> Dataset:
    return content("TEXT", meaning_code, relationship, TextValue=value)


def num(concept: Dataset, value: str, units: Dataset) -> Dataset:
    measured = Dataset()
    measured.NumericValue = value
    measured.MeasurementUnitsCodeSequence = [units]
    return content("NUM", concept, MeasuredValueSequence=[measured])


def container(concept: Dataset, *children: Dataset) -> Dataset:
    item = content("CONTAINER", concept, ContinuityOfContent="SEPARATE")
    item.ContentSequence = list(children)
    return item


def report(sop_class: str, children: list[Dataset], *, name: str = CANARY,
           charset: str | None = None, completion: str = "COMPLETE",
           verification: str = "UNVERIFIED", uid_seed: str = "1") -> Dataset:
    """An SR document (TID 2000 shape) with fixed UIDs and the SR Document modules."""
    ds = base_dataset(sop_class, modality="SR",
                      study_uid=f"1.2.826.0.1.3680043.10.1234.{uid_seed}.1",
                      series_uid=f"1.2.826.0.1.3680043.10.1234.{uid_seed}.2")
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.1234.{uid_seed}.3"
    if charset:
        ds.SpecificCharacterSet = charset
    ds.PatientName = name
    ds.IssuerOfPatientID = "HOSP-A"
    ds.Manufacturer = "dicomflow tests"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.ConceptNameCodeSequence = [code("18748-4", "LN", "Diagnostic Imaging Report")]
    ds.CompletionFlag = completion
    ds.VerificationFlag = verification
    ds.ContentDate, ds.ContentTime = "20260101", "103000"
    ds.InstanceCreationDate, ds.InstanceCreationTime = "20260101", "103000"
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.PerformedProcedureCodeSequence = []
    request = Dataset()
    request.StudyInstanceUID = ds.StudyInstanceUID
    request.AccessionNumber = "ACC0001"
    request.PlacerOrderNumberImagingServiceRequest = "PLACER-7"
    request.FillerOrderNumberImagingServiceRequest = "FILLER-9"
    request.RequestedProcedureID = "RP-55"
    request.RequestedProcedureDescription = "CT Chest"
    request.RequestedProcedureCodeSequence = [code("24627-2", "LN", "CT Chest")]
    ds.ReferencedRequestSequence = [request]
    if verification == "VERIFIED":
        verifier = Dataset()
        verifier.VerifyingObserverName = "Radiologist^Rita^M^Dr.^PhD"
        verifier.VerifyingOrganization = "Site A"
        verifier.VerificationDateTime = "20260101110000"
        verifier.VerifyingObserverIdentificationCodeSequence = [code("RAD42", "99SITE", "Rita")]
        ds.VerifyingObserverSequence = [verifier]
    ds.ContentTemplateSequence = []
    if sop_class != BASIC_TEXT_SR:
        template = Dataset()
        template.MappingResource = "DCMR"
        template.TemplateIdentifier = "2000"
        ds.ContentTemplateSequence = [template]
    ds.ContentSequence = children
    return ds


def observer() -> Dataset:
    return content("PNAME", code("121008", "DCM", "Person Observer Name"), "HAS OBS CONTEXT",
                   PersonName="Observer^Olga")


def basic_text(**kw) -> Dataset:
    """Basic Text SR: TEXT, CODE, DATE, PNAME and UIDREF items, one nested container."""
    return report(BASIC_TEXT_SR, [
        content("CODE", code("121049", "DCM", "Language of Content Item and Descendants"),
                "HAS CONCEPT MOD", ConceptCodeSequence=[code("en-US", "RFC5646",
                                                             "English (United States)")]),
        observer(),
        container(code("121070", "DCM", "Findings"),
                  text(code("121071", "DCM", "Finding"), DELIMITERS_TEXT),
                  content("DATE", code("111060", "DCM", "Study Date"), Date="20251231"),
                  content("UIDREF", code("110180", "DCM", "Study Instance UID"),
                          UID="1.2.826.0.1.3680043.10.1234.9")),
        container(code("121072", "DCM", "Impressions"),
                  text(code("121073", "DCM", "Impression"), "No acute disease.")),
    ], **kw)


def enhanced(**kw) -> Dataset:
    """Enhanced SR: adds NUM with units and TIME."""
    return report(ENHANCED_SR, [
        observer(),
        container(code("121070", "DCM", "Findings"),
                  num(code("410668003", "SCT", "Length"), "12.5",
                      code("mm", "UCUM", "millimeter")),
                  content("TIME", code("111061", "DCM", "Study Time"), Time="101500.123456"),
                  text(code("121071", "DCM", "Finding"), "Nodule in the right upper lobe.")),
    ], uid_seed="2", **kw)


def comprehensive(**kw) -> Dataset:
    """Comprehensive SR: nested containers, every value type the issue names."""
    return report(COMPREHENSIVE_SR, [
        content("CODE", code("121049", "DCM", "Language of Content Item and Descendants"),
                "HAS CONCEPT MOD", ConceptCodeSequence=[code("en-US", "RFC5646",
                                                             "English (United States)")]),
        observer(),
        container(code("121070", "DCM", "Findings"),
                  text(code("121071", "DCM", "Finding"), DELIMITERS_TEXT),
                  container(code("125007", "DCM", "Measurement Group"),
                            num(code("410668003", "SCT", "Length"), "12.5",
                                code("mm", "UCUM", "millimeter")),
                            num(code("118565006", "SCT", "Volume"), "1.5E3",
                                code("mm3", "UCUM", "cubic millimeter")),
                            content("CODE", code("121071", "DCM", "Finding"),
                                    ConceptCodeSequence=[code("RID3874", "RADLEX", "Nodule")])),
                  content("DATETIME", code("111526", "DCM", "DateTime Started"),
                          DateTime="20260101101500.5+0100"),
                  content("DATE", code("111060", "DCM", "Study Date"), Date="20251231"),
                  content("TIME", code("111061", "DCM", "Study Time"), Time="1015"),
                  content("PNAME", code("121008", "DCM", "Person Observer Name"),
                          PersonName="Second^Sam^^Dr.^Jr."),
                  content("UIDREF", code("110180", "DCM", "Study Instance UID"),
                          UID="1.2.826.0.1.3680043.10.1234.9")),
        container(code("121072", "DCM", "Impressions"),
                  text(code("121073", "DCM", "Impression"), "No acute disease.")),
    ], uid_seed="3", **kw)


def fifty_items(**kw) -> Dataset:
    """A 50-content-item Comprehensive SR (the bench's report size)."""
    groups = []
    for i in range(10):
        groups.append(container(
            code("125007", "DCM", "Measurement Group"),
            text(code("121071", "DCM", "Finding"), f"Finding {i}: lesion | segment ^{i}."),
            num(code("410668003", "SCT", "Length"), f"{i + 1}.5",
                code("mm", "UCUM", "millimeter")),
            content("CODE", code("121071", "DCM", "Finding"),
                    ConceptCodeSequence=[code("RID3874", "RADLEX", "Nodule")]),
            content("DATE", code("111060", "DCM", "Study Date"), Date="20251231")))
    return report(COMPREHENSIVE_SR, groups, uid_seed="50", **kw)


# Named report factories the dsrdump and raw-reader tests both run over.
REPORTS = {
    "basic_text": lambda: basic_text(),
    "enhanced": lambda: enhanced(),
    "comprehensive": lambda: comprehensive(verification="VERIFIED"),
    "fifty_items": lambda: fifty_items(),
    "latin1_name": lambda: basic_text(name="Müller^Jörg", charset="ISO_IR 100"),
    "utf8_name": lambda: basic_text(name="Yamada^Tarou=山田^太郎=やまだ^たろう",
                                    charset="ISO_IR 192"),
}


__all__ = ["CANARY", "CANARY_ID"]
