"""ImagingStudyHandler: DICOM headers → FHIR R4 ImagingStudy (pure, no socket)."""

from __future__ import annotations

import io
import json
import os
import random
import sys
from pathlib import Path

import pytest
from fhir.resources.R4B.imagingstudy import ImagingStudy
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from nodes.fhir import ImagingStudyHandler, MappingError
from nodes.fhir.imagingstudy import (DCM_SYSTEM, NUMBER_OF_FRAMES_URL, SNOMED_SYSTEM,
                                     body_site, fhir_started, person_display)
from support.synth import CANARY, CANARY_ID, to_part10

sys.path.insert(0, os.path.dirname(__file__))
from fhir_studies import (STUDY, bare_instance, ct_instance, ct_sr_study,  # noqa: E402
                          sr_instance)

GOLDEN = Path(__file__).parent / "golden" / "imagingstudy_ct_sr.json"
SYSTEM = "urn:oid:2.16.840.1.113883.3.9999.1"


def handler(**kw) -> ImagingStudyHandler:
    return ImagingStudyHandler(SYSTEM, "Endpoint/pacs-wado", **kw)


def r4(resource: dict) -> ImagingStudy:
    """Validate with the R4B models (R4B's ImagingStudy is R4's; fhir.resources has no R4)."""
    return ImagingStudy.model_validate(resource)


def empties(node, path="$"):
    """Paths of empty strings, lists, dicts or nulls anywhere in a JSON value."""
    if node in ("", [], {}, None):
        return [path]
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in empties(v, f"{path}.{k}")]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in empties(v, f"{path}[{i}]")]
    return []


def test_ct_and_sr_study_maps_to_the_golden_resource():
    resource = handler().handle(ct_sr_study())
    assert resource == json.loads(GOLDEN.read_text())
    model = r4(resource)
    assert model.model_dump(mode="json", exclude_none=True) == resource  # nothing dropped


def test_mapping_is_deterministic_whatever_the_arrival_order():
    datasets = ct_sr_study()
    expected = json.dumps(handler().handle(datasets))
    for seed in range(5):
        random.Random(seed).shuffle(datasets)
        assert json.dumps(handler().handle(datasets)) == expected


def test_headers_read_without_pixel_data_map_the_same():
    datasets = [dcmread(io.BytesIO(to_part10(ds)), stop_before_pixels=True)
                for ds in ct_sr_study()]
    assert handler().handle(datasets) == json.loads(GOLDEN.read_text())


def test_duplicate_instances_count_once():
    datasets = ct_sr_study()
    resource = handler().handle(datasets + [datasets[1]])
    assert resource["numberOfInstances"] == 4
    assert resource["series"][0]["numberOfInstances"] == 3


def test_the_canary_is_in_the_body_only_as_the_patient_identifier():
    body = json.dumps(handler().handle(ct_sr_study()))
    assert CANARY_ID in body
    assert CANARY not in body  # the patient's name is not sent: the identifier suffices


def test_missing_optional_attributes_produce_no_empty_elements():
    resource = ImagingStudyHandler().handle([bare_instance()])
    assert empties(resource) == []
    assert set(resource) == {"resourceType", "identifier", "status", "modality", "subject",
                             "numberOfSeries", "numberOfInstances", "series"}
    assert resource["identifier"] == [{"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY}"}]
    assert resource["subject"] == {"type": "Patient", "identifier": {"value": "P1"}}
    assert resource["series"] == [{
        "uid": f"{STUDY}.77", "modality": {"system": DCM_SYSTEM, "code": "CT"},
        "numberOfInstances": 1,
        "instance": [{"uid": f"{STUDY}.77.1", "sopClass": {
            "system": "urn:ietf:rfc:3986", "code": "urn:oid:1.2.840.10008.5.1.4.1.1.2"}}]}]
    r4(resource)


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_malformed_optional_values_are_left_out():
    ds = bare_instance()
    ds.StudyDate = "20261341"
    ds.InstanceNumber = "-3"
    ds[0x00200011] = RawDataElement(Tag(0x00200011), "IS", 2, b"x1", 0, True, True)
    ds.NumberOfFrames = "0"
    resource = ImagingStudyHandler().handle([ds])
    assert "started" not in resource
    assert set(resource["series"][0]) == {"uid", "modality", "numberOfInstances", "instance"}
    assert set(resource["series"][0]["instance"][0]) == {"uid", "sopClass"}
    assert empties(resource) == []


def test_study_attributes_come_from_the_first_instance_that_has_them():
    first, second = ct_instance(1), ct_instance(2)
    del first.AccessionNumber
    first.StudyDescription = ""
    second.StudyDescription = "Second says"
    resource = handler().handle([second, first])
    assert resource["identifier"][1]["value"] == "ACC0001"
    assert resource["description"] == "Second says"


def test_unnumbered_series_and_instances_sort_after_numbered_ones_by_uid():
    a, b, c = ct_instance(1), ct_instance(2), sr_instance()
    del b.InstanceNumber
    del c.SeriesNumber
    resource = handler().handle([c, b, a])
    assert [s["uid"] for s in resource["series"]] == [a.SeriesInstanceUID, c.SeriesInstanceUID]
    assert [i["uid"] for i in resource["series"][0]["instance"]] == [a.SOPInstanceUID,
                                                                    b.SOPInstanceUID]


def test_number_of_frames_uses_the_mado_extension():
    ds = ct_instance(1)
    ds.NumberOfFrames = 40
    inst = handler().handle([ds])["series"][0]["instance"][0]
    assert inst["extension"] == [{"url": NUMBER_OF_FRAMES_URL, "valueInteger": 40}]


@pytest.mark.parametrize("da, tm, tz, zone, expected", [
    ("20260101", "101500", "+0100", None, "2026-01-01T10:15:00+01:00"),
    ("20260101", "101500.123456", "-0530", None, "2026-01-01T10:15:00.123456-05:30"),
    ("20260101", "1015", "+0000", None, "2026-01-01T10:15:00+00:00"),
    ("20260101", "10", "+0000", None, "2026-01-01T10:00:00+00:00"),
    ("2026.07.01", "10:15:30", "+0200", None, "2026-07-01T10:15:30+02:00"),
    ("20260101", "101500", None, None, "2026-01-01"),          # no zone: never guess one
    ("20260101", "101500", None, "Europe/Berlin", "2026-01-01T10:15:00+01:00"),
    ("20260701", "101500", None, "Europe/Berlin", "2026-07-01T10:15:00+02:00"),
    ("20260701", "101500", "-0400", "Europe/Berlin", "2026-07-01T10:15:00-04:00"),
    ("20260101", None, None, None, "2026-01-01"),
    ("20260101", "256000", "+0100", None, "2026-01-01"),       # bad time: date only
    ("20260101", "101500", "+1900", None, "2026-01-01"),       # bad offset, no zone
    (None, "101500", "+0100", None, None),                     # no date: no started at all
    ("2026", None, None, None, None),
])
def test_started_from_study_date_time_and_offset(da, tm, tz, zone, expected):
    import zoneinfo
    assert fhir_started(da, tm, tz, zoneinfo.ZoneInfo(zone) if zone else None) == expected


def test_started_uses_the_site_timezone_only_without_an_offset_in_the_object():
    ds = ct_instance(1)
    del ds.TimezoneOffsetFromUTC
    assert handler().handle([ds])["started"] == "2026-01-01"
    resource = handler(timezone="America/New_York").handle([ds])
    assert resource["started"] == "2026-01-01T10:15:00-05:00"
    r4(resource)


def test_unknown_timezone_is_refused():
    with pytest.raises(ValueError, match="time zone"):
        ImagingStudyHandler(timezone="Mars/Olympus")


@pytest.mark.parametrize("part, expected", [
    ("CHEST", {"system": SNOMED_SYSTEM, "code": "816094009", "display": "Chest"}),
    ("LSPINE", {"system": SNOMED_SYSTEM, "code": "122496007", "display": "Lumbar spine"}),
    ("HEADNECK", {"system": SNOMED_SYSTEM, "code": "774007", "display": "Head and Neck"}),
    ("KNEE", {"system": SNOMED_SYSTEM, "code": "72696002", "display": "Knee"}),
    ("PHANTOMX", {"display": "PHANTOMX"}),
])
def test_body_part_examined_maps_to_snomed_when_known(part, expected):
    ds = Dataset()
    ds.BodyPartExamined = part
    assert body_site(ds) == expected


def test_anatomic_region_sequence_wins_over_body_part():
    ds = Dataset()
    ds.BodyPartExamined = "CHEST"
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = \
        "69536005", "SCT", "Head"
    ds.AnatomicRegionSequence = [region]
    assert body_site(ds) == {"system": SNOMED_SYSTEM, "code": "69536005", "display": "Head"}


def test_referrer_display_in_reading_order():
    assert person_display("Ref^Doctor") == "Doctor Ref"
    assert person_display("Smith^John^Q^Dr^Jr") == "Dr John Q Smith Jr"
    assert person_display("=山田^太郎") == "山田 太郎"
    assert person_display("") is None


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
@pytest.mark.parametrize("mutate, message", [
    (lambda ds: ds.__delattr__("PatientID"), "no PatientID"),
    (lambda ds: ds.__delattr__("Modality"), "no Modality"),
    (lambda ds: ds.__delattr__("SeriesInstanceUID"), "SeriesInstanceUID"),
    (lambda ds: setattr(ds, "SOPClassUID", "not a uid!"), "SOPClassUID"),
])
def test_headers_that_cannot_make_a_valid_resource_raise_mapping_error(mutate, message):
    ds = ct_instance(1)
    mutate(ds)
    with pytest.raises(MappingError, match=message) as info:
        handler().handle([ds])
    assert CANARY_ID not in str(info.value) and CANARY not in str(info.value)


def test_conflicting_patient_ids_are_refused_without_naming_them():
    a, b = ct_instance(1), ct_instance(2)
    b.PatientID = "OTHER-77"
    with pytest.raises(MappingError, match="disagree on PatientID") as info:
        handler().handle([a, b])
    assert CANARY_ID not in str(info.value) and "OTHER-77" not in str(info.value)


def test_instances_of_several_studies_are_refused():
    with pytest.raises(MappingError, match="StudyInstanceUID"):
        handler().handle([ct_instance(1), ct_instance(2, study="1.2.3.4", series="1.2.3.4.1")])


def test_no_instances_is_a_mapping_error():
    with pytest.raises(MappingError):
        handler().handle([])


def test_handler_is_versioned():
    h = ImagingStudyHandler()
    assert (h.name, h.version) == ("imaging-study", "1.0")
