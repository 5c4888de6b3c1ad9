"""The FHIR lane behind the real Store (issue 9): ``feeder >> Store >> {"fhir":
FhirStudySender(config, store.study_members)}`` against a FHIR server on 127.0.0.1 that
stores ImagingStudy resources by conditional update. The Store commits the arrivals,
aggregates by study (``study_members``), commits every outcome and owns the retries."""

from __future__ import annotations

import itertools
import logging
import os
import sys
import threading

import trio
from fhir.resources.R4B.imagingstudy import ImagingStudy

from flow._log import configure
from nodes.fhir import FhirConfig, FhirStudySender
from nodes.store import StoreConfig, admin
from support.synth import CANARY, CANARY_ID, CANARY_PARTS

sys.path.insert(0, os.path.dirname(__file__))
from fhir_fakeserver import FakeFhir, operation_outcome  # noqa: E402
from fhir_harness import (arrivals_of, commit_stats, preload, store_graph,  # noqa: E402
                          uids_in, wait_for_lane)
from fhir_studies import STUDY, ct_instance, sr_instance  # noqa: E402

KEY = f"urn:dicom:uid|urn:oid:{STUDY}"
OTHER = "1.2.826.0.1.3680043.2.1143.9.2"
OTHER_SERIES = "1.2.826.0.1.3680043.2.1143.9.2.1"
JSON = {"Content-Type": "application/fhir+json"}


def cfg(url: str, **kw) -> FhirConfig:
    base = dict(url=url, timeout_ms=5000, quiet_time_s=0.1, max_connections=2,
                patient_identifier_system="urn:oid:2.16.840.1.113883.3.9999.1")
    return FhirConfig(**{**base, **kw})


def store_config(**kw) -> StoreConfig:
    return StoreConfig(**{"min_free_disk_mb": 0, "retry_initial_s": 0.1, "retry_max_s": 0.4,
                          **kw})


def fhir_lane(config: FhirConfig):
    return lambda store: {"fhir": FhirStudySender(config, store.study_members)}


def attempts(store, uid: str) -> list[tuple[int, str, str]]:
    events = admin.trace(store, uid)["events"]
    return [(e["attempt"], e["outcome"], e.get("reason", e.get("detail", "")))
            for e in events if e["event"] == "attempt"]


async def test_two_bursts_of_a_study_make_one_imaging_study_holding_all(tmp_path):
    first = [ct_instance(1), ct_instance(2)]
    later = [ct_instance(3), sr_instance()]
    with FakeFhir() as server:
        async with store_graph(tmp_path / "data", fhir_lane(cfg(server.url)), [server.url],
                               store_config()) as (feeder, store, _):
            await feeder.commit(arrivals_of(first))
            await wait_for_lane(store, "fhir", lambda f: f["delivered"] == 2)
            await feeder.commit(arrivals_of(later))
            lane = await wait_for_lane(store, "fhir", lambda f: f["delivered"] == 4)
    assert lane["dead_lettered"] == lane["retrying"] == lane["queued"] == 0
    assert list(server.resources) == [KEY]  # one resource for the study, kept current
    resource = server.resources[KEY]
    ImagingStudy.model_validate(resource)
    every = sorted(str(ds.SOPInstanceUID) for ds in first + later)
    assert sorted(uids_in(resource)) == every
    assert [s["modality"]["code"] for s in resource["series"]] == ["CT", "SR"]
    assert [len(s["instance"]) for s in resource["series"]] == [3, 1]
    assert (resource["numberOfSeries"], resource["numberOfInstances"]) == (2, 4)
    # The second burst's update names the first burst too: the Store's study_members.
    puts = [r.resource for r in server.puts]
    assert [sorted(uids_in(p)) for p in puts] == [
        sorted(str(ds.SOPInstanceUID) for ds in first), every]
    assert [r.status for r in server.puts] == [201, 200]
    assert [r.status for r in server.searches] == [200, 200]  # each update read the current
    # The handler version is recorded with each instance's outcome in the audit trail.
    assert attempts(store, str(later[0].SOPInstanceUID)) == [
        (1, "delivered", "handler imaging-study 1.0; HTTP 200")]


async def test_a_burst_after_the_first_was_purged_still_updates_with_every_instance(tmp_path):
    # The Store purges a delivered study's objects (and their study-index entries)
    # retention_s after every lane finished, so study_members of a later burst lists only the
    # instances still stored; the sender merges them over the server's current resource.
    first = [ct_instance(1), ct_instance(2)]
    later = [sr_instance()]
    config = store_config(retention_s=0.0)  # 3600 s by default: a late SR hits it too
    with FakeFhir() as server:
        async with store_graph(tmp_path / "data", fhir_lane(cfg(server.url)), [server.url],
                               config) as (feeder, store, _):
            await feeder.commit(arrivals_of(first))
            await wait_for_lane(store, "fhir", lambda f: f["delivered"] == 2)
            with trio.fail_after(10):
                while store.report()["store"]["objects"]:  # purged after retention
                    await trio.sleep(0.02)
            await feeder.commit(arrivals_of(later))
            await wait_for_lane(store, "fhir", lambda f: f["delivered"] == 3)
    assert [r.status for r in server.puts] == [201, 200]
    assert sorted(uids_in(server.puts[1].resource)) == sorted(
        str(ds.SOPInstanceUID) for ds in first + later)
    resource = server.resources[KEY]
    ImagingStudy.model_validate(resource)
    assert sorted(uids_in(resource)) == sorted(str(ds.SOPInstanceUID) for ds in first + later)
    assert (resource["numberOfSeries"], resource["numberOfInstances"]) == (2, 3)
    assert [m["code"] for m in resource["modality"]] == ["CT", "SR"]


async def test_a_study_settles_in_shared_group_commits_not_one_sync_each(tmp_path):
    # Every outcome is a sync commit in the Store (~10 ms on this machine's disk); a study's
    # held instances settled one after the other cost one sync each (a 1000-instance CT:
    # ~10 s). Settled together they share the Store's group commit.
    n = 20
    study = [ct_instance(i + 1) for i in range(n)]
    data = tmp_path / "data"
    await preload(data, ["fhir"], arrivals_of(study), store_config())
    with FakeFhir() as server:
        async with store_graph(data, fhir_lane(cfg(server.url)), [server.url],
                               store_config()) as (_, store, _):
            await wait_for_lane(store, "fhir", lambda f: f["delivered"] == n)
            stats = await commit_stats(store, lambda s: s["operations"] >= n + 1)
    assert [r.status for r in server.puts] == [201]
    assert len(uids_in(server.resources[KEY])) == n
    # Claims (the pump hands at most the sender's edge's room, 16, per claim) and outcomes.
    assert stats["operations"] >= n + 1
    assert stats["commits"] <= 6, stats


async def test_412_and_422_dead_letter_with_issue_codes_only(tmp_path):
    conflicted = [ct_instance(1), ct_instance(2)]
    unprocessable = [ct_instance(1, study=OTHER, series=OTHER_SERIES)]
    body = operation_outcome("conflict", diagnostics=f"{CANARY} matched twice")

    def script(request):
        if request.method != "PUT":
            return None
        if STUDY in request.query["identifier"][0]:
            return 412, JSON, body
        return 422, JSON, operation_outcome("processing", "invariant")

    with FakeFhir(script) as server:
        async with store_graph(tmp_path / "data", fhir_lane(cfg(server.url)), [server.url],
                               store_config()) as (feeder, store, _):
            await feeder.commit(arrivals_of(conflicted + unprocessable))
            lane = await wait_for_lane(store, "fhir", lambda f: f["dead_lettered"] == 3)
            dead = {row["uid"]: row["reason"] for row in admin.dead_letters(store)}
    assert lane["delivered"] == lane["retrying"] == 0
    assert lane["last_error_class"] == "permanent"
    assert sorted(r.status for r in server.puts) == [412, 422]  # one per study, not retried
    assert dead == {
        **{str(ds.SOPInstanceUID): "HTTP 412; OperationOutcome: conflict" for ds in conflicted},
        str(unprocessable[0].SOPInstanceUID): "HTTP 422; OperationOutcome: processing,invariant",
    }


async def test_503_and_429_are_retried_by_the_store_then_delivered(tmp_path):
    answers = iter([(503, JSON, operation_outcome("transient")),
                    (429, {**JSON, "Retry-After": "1"}, operation_outcome("throttled"))])
    lock = threading.Lock()

    def script(request):
        if request.method != "PUT":
            return None
        with lock:
            return next(answers, None)  # then: the conditional update

    study = [ct_instance(1), sr_instance()]
    # One PUT per attempt needs both instances' retries in one quiet window: no jitter
    # between their due times, and a window that a loaded 2-core machine cannot overrun.
    with FakeFhir(script) as server:
        async with store_graph(tmp_path / "data", fhir_lane(cfg(server.url, quiet_time_s=0.5)),
                               [server.url], store_config(retry_jitter=0.0)) as (feeder, store, _):
            await feeder.commit(arrivals_of(study))
            lane = await wait_for_lane(store, "fhir", lambda f: f["delivered"] == 2)
            trail = attempts(store, str(study[0].SOPInstanceUID))
    assert lane["dead_lettered"] == lane["retrying"] == 0
    assert [r.status for r in server.puts] == [503, 429, 201]
    assert sorted(uids_in(server.resources[KEY])) == sorted(str(d.SOPInstanceUID) for d in study)
    assert trail == [(1, "transient", "HTTP 503; OperationOutcome: transient"),
                     (2, "transient", "HTTP 429; OperationOutcome: throttled"),
                     (3, "delivered", "handler imaging-study 1.0; HTTP 201")]


async def test_phi_canary_never_reaches_logs_or_outcome_reasons(tmp_path, caplog, capsys):
    configure(level="INFO")
    caplog.set_level(logging.DEBUG, logger="nodes")
    caplog.set_level(logging.INFO)
    delivered = [ct_instance(1), sr_instance()]
    refused = [ct_instance(1, study=OTHER, series=OTHER_SERIES)]
    echo = operation_outcome("processing", diagnostics=f"Patient {CANARY} / {CANARY_ID}")
    calls = itertools.count()

    def script(request):
        if request.method != "PUT":
            return None
        if OTHER in request.query["identifier"][0]:
            return 422, JSON, echo  # a server that quotes the resource back
        if next(calls) == 0:
            return 503, {**JSON, "Retry-After": "0"}, echo
        return None

    with FakeFhir(script) as server:
        async with store_graph(tmp_path / "data", fhir_lane(cfg(server.url)), [server.url],
                               store_config()) as (feeder, store, _):
            await feeder.commit(arrivals_of(delivered + refused))
            lane = await wait_for_lane(
                store, "fhir", lambda f: f["delivered"] == 2 and f["dead_lettered"] == 1)
            traces = [admin.trace(store, str(ds.SOPInstanceUID))
                      for ds in delivered + refused]
            dead = admin.dead_letters(store)
    # The canary is in the data (the resource body), so its absence below means something.
    assert CANARY_ID in server.puts[-1].body.decode()
    assert "fhir.study" in caplog.text and "store.retry" in caplog.text
    texts = [caplog.text, capsys.readouterr().err, repr(lane), repr(traces), repr(dead)]
    texts += [r.getMessage() + repr(getattr(r, "fields", "")) for r in caplog.records
              if r.levelno >= logging.INFO]
    for text in texts:
        for needle in (CANARY, CANARY_ID, *CANARY_PARTS):
            assert needle not in text
