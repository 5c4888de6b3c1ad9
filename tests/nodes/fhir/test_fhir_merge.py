"""merge_study: the server's current ImagingStudy + the fresh mapping (pure, no socket)."""

from __future__ import annotations

import copy
import json
import os
import sys

from fhir.resources.R4B.imagingstudy import ImagingStudy
from hypothesis import given, settings
from hypothesis import strategies as st

from nodes.fhir import ImagingStudyHandler, merge_study
from nodes.fhir.imagingstudy import ACSN_SYSTEM, DCM_SYSTEM

sys.path.insert(0, os.path.dirname(__file__))
from fhir_studies import (CT_SERIES, SR_SERIES, STUDY, ct_instance,  # noqa: E402
                          ct_sr_study, sr_instance)

SYSTEM = "urn:oid:2.16.840.1.113883.3.9999.1"
SERVER_MANAGED = {"id": "17", "meta": {"versionId": "3", "lastUpdated": "2026-11-25T10:00:00Z"},
                  "text": {"status": "generated", "div": "<div>old</div>"}}


def handle(datasets) -> dict:
    return ImagingStudyHandler(SYSTEM, "Endpoint/pacs-wado").handle(datasets)


def on_server(resource: dict) -> dict:
    """What a search returns for a resource we sent: with id, meta and a narrative."""
    return {**copy.deepcopy(resource), **copy.deepcopy(SERVER_MANAGED)}


def uids(resource: dict) -> dict[str, list[str]]:
    return {s["uid"]: [i["uid"] for i in s.get("instance", [])] for s in resource["series"]}


# -- examples -------------------------------------------------------------------------------------

def test_without_a_current_resource_the_fresh_mapping_is_sent_unchanged():
    fresh = handle(ct_sr_study())
    assert merge_study(None, fresh) == fresh
    assert json.dumps(merge_study(None, fresh)) == json.dumps(fresh)  # same element order


def test_our_own_resource_read_back_merges_to_itself_without_server_elements():
    fresh = handle(ct_sr_study())
    assert merge_study(on_server(fresh), fresh) == fresh


def test_a_late_sr_over_the_purged_ct_gives_the_full_study_mapping():
    everything = ct_sr_study()
    full = handle(everything)
    late_sr_only = handle([ds for ds in everything if ds.Modality == "SR"])
    assert "description" not in late_sr_only  # the SR has no StudyDescription: kept from CT
    merged = merge_study(on_server(full), late_sr_only)
    assert merged == full
    ImagingStudy.model_validate(merged)


def test_inputs_are_not_modified():
    current, fresh = on_server(handle([ct_instance(1)])), handle([sr_instance()])
    before = copy.deepcopy((current, fresh))
    merged = merge_study(current, fresh)
    merged["series"][0]["instance"][0]["uid"] = "changed"
    assert (current, fresh) == before


def test_ours_win_for_instances_we_hold_and_series_elements_only_the_server_has_stay():
    current = handle([ct_instance(1), ct_instance(2)])
    current["series"][0]["instance"][0]["title"] = "written by someone else"
    current["series"][0]["laterality"] = {"system": "http://snomed.info/sct", "code": "51440002"}
    current["series"][0]["description"] = "old description"
    fresh = handle([ct_instance(2), ct_instance(3)])
    merged = merge_study(current, fresh)
    (series,) = merged["series"]
    assert [i["uid"] for i in series["instance"]] == [f"{CT_SERIES}.{n}" for n in (1, 2, 3)]
    assert series["instance"][0]["title"] == "written by someone else"  # server-only instance
    assert series["instance"][1] == fresh["series"][0]["instance"][0]   # ours, whole
    assert series["description"] == "Thorax 1.0 mm"                     # ours wins
    assert series["laterality"]["code"] == "51440002"                    # only theirs: kept
    assert series["numberOfInstances"] == 3 and merged["numberOfInstances"] == 3


def test_study_elements_only_the_server_has_stay_ours_replace_the_rest():
    current = on_server(handle([ct_instance(1)]))
    current["note"] = [{"text": "added by the EHR"}]
    current["started"] = "2020-01-01"
    fresh = handle([sr_instance()])
    merged = merge_study(current, fresh)
    assert merged["note"] == [{"text": "added by the EHR"}]
    assert merged["started"] == fresh["started"]
    assert not {"id", "meta", "text"} & set(merged)


def test_identifiers_merge_per_kind():
    acsn = {"type": {"coding": [{"system": ACSN_SYSTEM, "code": "ACSN"}]}}
    current = {"resourceType": "ImagingStudy", "identifier": [
        {"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY}"}, {**acsn, "value": "OLD"},
        {"system": "urn:oid:1.2.3.4", "value": "order-77"}]}
    with_accession = handle([ct_instance(1)])
    no_accession = ct_instance(1)
    no_accession.AccessionNumber = ""
    without = handle([no_accession])
    assert len(without["identifier"]) == 1
    assert merge_study(current, with_accession)["identifier"] == [
        *with_accession["identifier"], {"system": "urn:oid:1.2.3.4", "value": "order-77"}]
    assert merge_study(current, without)["identifier"] == [
        without["identifier"][0], {**acsn, "value": "OLD"},
        {"system": "urn:oid:1.2.3.4", "value": "order-77"}]


def test_an_instance_we_place_in_another_series_moves_there():
    moved = ct_instance(1)
    current = handle([moved, sr_instance()])
    corrected = ct_instance(1, series=f"{STUDY}.5")  # the same SOP Instance, re-sent
    corrected.SOPInstanceUID, corrected.SeriesNumber = moved.SOPInstanceUID, 5
    merged = merge_study(current, handle([corrected]))
    assert uids(merged) == {SR_SERIES: [f"{SR_SERIES}.1"], f"{STUDY}.5": [f"{CT_SERIES}.1"]}
    assert [m["code"] for m in merged["modality"]] == ["SR", "CT"]  # in series order
    assert (merged["numberOfSeries"], merged["numberOfInstances"]) == (2, 2)


def test_series_and_instances_stay_ordered_by_number_then_uid():
    current = handle([ct_instance(3), sr_instance(2)])
    fresh = handle([ct_instance(1), sr_instance(1), ct_instance(2)])
    merged = merge_study(current, fresh)
    assert uids(merged) == {CT_SERIES: [f"{CT_SERIES}.{n}" for n in (1, 2, 3)],
                            SR_SERIES: [f"{SR_SERIES}.1", f"{SR_SERIES}.2"]}
    assert merged == handle([ct_instance(1), ct_instance(2), ct_instance(3), sr_instance(1),
                             sr_instance(2)])


def test_unusable_server_content_is_dropped():
    fresh = handle([ct_instance(1)])
    current = {"resourceType": "ImagingStudy", "series": [
        "junk", {"number": 4}, {"uid": 42}, {"uid": f"{STUDY}.9", "modality": {
            "system": DCM_SYSTEM, "code": "MR"}, "instance": [{"sop": "no uid"}, 7]}]}
    merged = merge_study(current, fresh)
    assert uids(merged) == {CT_SERIES: [f"{CT_SERIES}.1"], f"{STUDY}.9": []}
    assert [m["code"] for m in merged["modality"]] == ["CT", "MR"]
    assert "instance" not in merged["series"][1]  # no empty arrays
    assert merge_study({"resourceType": "Patient", "series": [{"uid": "1.2"}]}, fresh) == fresh


def test_malformed_server_identifiers_and_modalities_do_not_break_the_merge():
    fresh = handle([ct_instance(1)])
    odd_identifiers = [{"system": ["a"], "type": "ACSN", "value": "x"}, "junk",
                       {"type": {"coding": "ACSN"}, "value": "y"}]
    current = {"resourceType": "ImagingStudy", "identifier": odd_identifiers, "series": [
        {"uid": f"{STUDY}.9", "modality": {"code": ["MR"]},
         "instance": [{"uid": f"{STUDY}.9.1"}]}]}
    merged = merge_study(current, fresh)
    assert merged["identifier"] == [*fresh["identifier"], odd_identifiers[0], odd_identifiers[2]]
    assert [m["code"] for m in merged["modality"]] == ["CT"]
    assert uids(merged) == {CT_SERIES: [f"{CT_SERIES}.1"], f"{STUDY}.9": [f"{STUDY}.9.1"]}


# -- properties -----------------------------------------------------------------------------------

SERIES_UIDS = [f"{STUDY}.{n}" for n in range(1, 5)]
INSTANCE_UIDS = [f"{STUDY}.9.{n}" for n in range(1, 9)]
numbers = st.none() | st.integers(0, 3)
modalities = st.sampled_from(["CT", "SR", "MR"])


def _key(item):
    return (item.get("number") is None, item.get("number") or 0, item["uid"])


def _instance(uid: str, number: int | None, side: str) -> dict:
    out = {"uid": uid, "sopClass": {"system": "urn:ietf:rfc:3986", "code": "urn:oid:1.2.3"}}
    if number is not None:
        out["number"] = number
    out["title"] = side
    return out


def _series(uid: str, number: int | None, modality: str, instances: list[dict],
            side: str) -> dict:
    out = {"uid": uid}
    if number is not None:
        out["number"] = number
    out["modality"] = {"system": DCM_SYSTEM, "code": modality}
    out["description"] = side
    out["numberOfInstances"] = len(instances)
    if instances:
        out["instance"] = instances
    return out


def _study(series: list[dict], side: str) -> dict:
    codes = dict.fromkeys(s["modality"]["code"] for s in series)
    return {"resourceType": "ImagingStudy",
            "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY}"}],
            "status": "available",
            "modality": [{"system": DCM_SYSTEM, "code": c} for c in codes],
            "subject": {"type": "Patient", "identifier": {"value": side}},
            "numberOfSeries": len(series),
            "numberOfInstances": sum(len(s.get("instance", [])) for s in series),
            "series": series}


@st.composite
def fresh_studies(draw) -> dict:
    """What the handler makes: distinct UIDs, ordered, counts consistent, at least one."""
    series_uids = draw(st.lists(st.sampled_from(SERIES_UIDS), min_size=1, unique=True))
    instance_uids = draw(st.lists(st.sampled_from(INSTANCE_UIDS), min_size=len(series_uids),
                                  unique=True))
    series = []
    for n, uid in enumerate(series_uids):
        mine = instance_uids[n::len(series_uids)]
        instances = sorted((_instance(i, draw(numbers), "fresh") for i in mine), key=_key)
        series.append(_series(uid, draw(numbers), draw(modalities), instances, "fresh"))
    return _study(sorted(series, key=_key), "fresh")


@st.composite
def server_studies(draw) -> dict:
    """Anything a server might hold: repeated UIDs, empty series, in any order."""
    series = []
    for uid in draw(st.lists(st.sampled_from(SERIES_UIDS), max_size=5)):
        instances = [_instance(i, draw(numbers), "server")
                     for i in draw(st.lists(st.sampled_from(INSTANCE_UIDS), max_size=4))]
        series.append(_series(uid, draw(numbers), draw(modalities), instances, "server"))
    study = {**_study(series, "server"), **SERVER_MANAGED}
    if draw(st.booleans()):
        study["description"] = "server only"
    return study


def _all_instances(resource: dict) -> dict[str, list[tuple[str, dict]]]:
    found: dict[str, list[tuple[str, dict]]] = {}
    for s in resource.get("series", []):
        for i in s.get("instance", []):
            found.setdefault(i["uid"], []).append((s["uid"], i))
    return found


@settings(max_examples=300, deadline=None)
@given(current=st.none() | server_studies(), fresh=fresh_studies())
def test_merge_is_idempotent(current, fresh):
    once = merge_study(current, fresh)
    assert merge_study(once, fresh) == once
    assert merge_study(on_server(once), fresh) == once


@settings(max_examples=300, deadline=None)
@given(current=server_studies(), fresh=fresh_studies())
def test_merge_never_loses_a_uid_and_fresh_wins(current, fresh):
    merged = merge_study(current, fresh)
    found = _all_instances(merged)
    ours, theirs = _all_instances(fresh), _all_instances(current)
    assert set(found) == set(ours) | set(theirs)                        # no instance lost
    for uid, [(series_uid, instance)] in ours.items():                  # ours, whole, in our
        assert found[uid] == [(series_uid, instance)]                   # series only
    for uid, places in theirs.items():
        if uid not in ours:                                             # theirs, in place
            assert {s for s, _ in found[uid]} == {s for s, _ in places}
            assert all(i["title"] == "server" for _, i in found[uid])
    series = {s["uid"]: s for s in merged["series"]}
    assert len(series) == len(merged["series"])                         # each series once
    for s in fresh["series"]:                                           # every fresh series,
        for key, value in s.items():                                    # its elements ours
            if key not in ("instance", "numberOfInstances"):
                assert series[s["uid"]][key] == value
    listed: dict[str, set[str]] = {}                                    # every server series
    for s in current["series"]:                                         # (one per uid), but
        listed.setdefault(s["uid"], set()).update(i["uid"] for i in s.get("instance", []))
    for uid, instances in listed.items():                               # those we emptied
        emptied = instances and instances <= set(ours) and uid not in uids(fresh)
        assert (uid in series) != bool(emptied)
    assert merged["subject"] == fresh["subject"]
    assert merged.get("description") == current.get("description")
    assert not {"id", "meta", "text"} & set(merged)


@settings(max_examples=300, deadline=None)
@given(current=st.none() | server_studies(), fresh=fresh_studies())
def test_merged_counts_order_and_modalities_follow_the_merged_series(current, fresh):
    merged = merge_study(current, fresh)
    series = merged["series"]
    assert series == sorted(series, key=_key)
    for s in series:
        instances = s.get("instance", [])
        assert instances == sorted(instances, key=_key)
        assert len({i["uid"] for i in instances}) == len(instances) == s["numberOfInstances"]
    assert merged["numberOfSeries"] == len(series)
    assert merged["numberOfInstances"] == len(_all_instances(merged))
    assert [m["code"] for m in merged["modality"]] == list(
        dict.fromkeys(s["modality"]["code"] for s in series))
