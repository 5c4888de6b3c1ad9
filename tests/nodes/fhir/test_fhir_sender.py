"""FhirStudySender against a FHIR server on 127.0.0.1 that stores by conditional update
(real HTTP, real flow graph)."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading

import msgspec
import pytest
import trio
from fhir.resources.R4B.imagingstudy import ImagingStudy

from flow._log import configure
from nodes.delivery import Recorder
from nodes.fhir import FhirConfig, FhirStudySender, ImagingStudyHandler
from nodes.fhir import sender as sender_module
from nodes.outcome import Delivered, Permanent, Transient
from nodes.payload import BytesPayload
from support.peers import free_port
from support.synth import CANARY, CANARY_ID, CANARY_PARTS, to_part10

sys.path.insert(0, os.path.dirname(__file__))
from fhir_fakeserver import FakeFhir, operation_outcome, searchset  # noqa: E402
from fhir_harness import FakeStore, envelope_of, run_sender, stored, uids_in  # noqa: E402
from fhir_studies import STUDY, ct_instance, ct_sr_study, sr_instance  # noqa: E402

KEY = f"urn:dicom:uid|urn:oid:{STUDY}"
DETAIL = "handler imaging-study 1.0"


def cfg(url: str, **kw) -> FhirConfig:
    base = dict(url=url, timeout_ms=5000, quiet_time_s=0.05, max_connections=2,
                patient_identifier_system="urn:oid:2.16.840.1.113883.3.9999.1")
    return FhirConfig(**{**base, **kw})


async def test_final_resource_holds_every_series_and_instance():
    store, rec = FakeStore(), Recorder()
    datasets = ct_sr_study()
    with FakeFhir() as server:
        await run_sender(cfg(server.url), stored(store, rec, datasets), store)
    assert list(server.resources) == [KEY]
    resource = server.resources[KEY]
    ImagingStudy.model_validate(resource)
    assert sorted(uids_in(resource)) == sorted(str(ds.SOPInstanceUID) for ds in datasets)
    assert [s["modality"]["code"] for s in resource["series"]] == ["CT", "SR"]
    assert resource["subject"]["identifier"]["value"] == CANARY_ID  # PHI belongs in the body
    search, request = server.requests  # first the current resource is read, then the PUT
    assert (search.method, search.path) == ("GET", "/fhir/ImagingStudy")
    assert search.query == {"identifier": [KEY]}
    assert search.headers["accept"] == "application/fhir+json"
    assert request.method == "PUT"
    assert request.path == "/fhir/ImagingStudy" and request.query == {"identifier": [KEY]}
    assert request.headers["content-type"] == "application/fhir+json"
    assert request.headers["accept"] == "application/fhir+json"
    assert rec.outcomes == {str(ds.SOPInstanceUID): Delivered(f"{DETAIL}; HTTP 201")
                            for ds in datasets}


async def test_second_burst_updates_the_same_resource_with_all_instances():
    store, rec = FakeStore(), Recorder()
    first = stored(store, rec, [ct_instance(1), ct_instance(2)])
    later = [ct_instance(3), sr_instance()]
    server = FakeFhir()

    async def first_put_done():
        for _ in range(500):  # bounded: at most 5 s
            if any(r.status for r in server.puts):
                return
            await trio.sleep(0.01)
        raise AssertionError("the first burst was never sent")

    def second_burst_committed():
        return stored(store, rec, later)

    steps = [*first, first_put_done, second_burst_committed]
    with server:
        await run_sender(cfg(server.url), steps, store)
    assert [r.status for r in server.puts] == [201, 200]
    assert len(uids_in(server.puts[0].resource)) == 2
    assert sorted(uids_in(server.resources[KEY])) == sorted(
        [f"{STUDY}.1.1", f"{STUDY}.1.2", f"{STUDY}.1.3", f"{STUDY}.2.1"])
    assert len(rec.outcomes) == 4 and all(isinstance(o, Delivered) for o in rec.outcomes.values())


async def test_instances_the_store_holds_but_this_run_did_not_receive_are_included():
    store, rec = FakeStore(), Recorder()
    stored(store, rec, [ct_instance(1), ct_instance(2)])      # delivered in an earlier run
    steps = stored(store, rec, [sr_instance()])
    with FakeFhir() as server:
        await run_sender(cfg(server.url), steps, store)
    assert len(uids_in(server.resources[KEY])) == 3
    assert list(rec.outcomes) == [f"{STUDY}.2.1"]


async def test_two_studies_make_two_resources_sent_concurrently():
    store, rec = FakeStore(), Recorder()
    other = "1.2.826.0.1.3680043.2.1143.9.2"
    steps = stored(store, rec, [ct_instance(1), ct_instance(1, study=other, series=other + ".1")])
    both_in_flight = threading.Barrier(2, timeout=10)

    def script(request):
        if request.method != "PUT":
            return None
        try:
            both_in_flight.wait()  # passes only if the two PUTs are in progress together
        except threading.BrokenBarrierError:
            return 500, {}, b""
        return None

    with FakeFhir(script) as server:
        await run_sender(cfg(server.url, max_connections=2), steps, store)
    assert sorted(server.resources) == sorted([KEY, f"urn:dicom:uid|urn:oid:{other}"])
    assert all(isinstance(o, Delivered) for o in rec.outcomes.values())


@pytest.mark.parametrize("status, code", [(412, "multiple-matches"), (422, "processing"),
                                          (400, "invalid"), (409, "conflict"),
                                          (404, "not-found")])
async def test_rejections_dead_letter_with_issue_codes_only(status, code):
    store, rec = FakeStore(), Recorder()
    steps = stored(store, rec, ct_sr_study())
    body = operation_outcome(code, diagnostics=f"Patient {CANARY} / {CANARY_ID} is wrong")
    answer = (status, {"Content-Type": "application/fhir+json"}, body)
    with FakeFhir(lambda r: answer if r.method == "PUT" else None) as server:
        await run_sender(cfg(server.url), steps, store)
    assert set(rec.outcomes.values()) == {
        Permanent(f"HTTP {status}; OperationOutcome: {code}")}


@pytest.mark.parametrize("status, headers, retry_after", [
    (503, {"Retry-After": "120"}, 120.0), (429, {"Retry-After": "7"}, 7.0), (408, {}, None),
    (500, {}, None)])
async def test_overload_and_server_errors_are_retried_by_the_store(status, headers, retry_after):
    store, rec = FakeStore(), Recorder()
    steps = stored(store, rec, ct_sr_study())
    with FakeFhir(lambda r: (status, headers, b"") if r.method == "PUT" else None) as server:
        await run_sender(cfg(server.url), steps, store)
    assert set(rec.outcomes.values()) == {Transient(f"HTTP {status}", retry_after)}
    assert len(server.puts) == 1  # no retrying inside the sender


async def test_unreachable_server_is_transient():
    store, rec = FakeStore(), Recorder()
    steps = stored(store, rec, [ct_instance(1)])
    url = f"http://127.0.0.1:{free_port()}/fhir"
    await run_sender(cfg(url), steps, store)
    assert list(rec.outcomes.values()) == [Transient("search: transport error: ConnectError")]


async def test_unreadable_instance_is_dead_lettered_alone():
    store, rec = FakeStore(), Recorder()
    steps = stored(store, rec, [ct_instance(1)])
    junk = ct_instance(2)
    env = envelope_of(junk)
    store.put(env, BytesPayload(b"not dicom at all" * 20))
    steps.append(rec.delivery(env, store.held[STUDY][env.sop_instance_uid][1], "fhir"))
    with FakeFhir() as server:
        await run_sender(cfg(server.url), steps, store)
    assert rec.outcomes[f"{STUDY}.1.1"] == Delivered(f"{DETAIL}; HTTP 201")
    assert rec.outcomes[f"{STUDY}.1.2"] == Permanent("unreadable DICOM header: InvalidDicomError")
    assert uids_in(server.resources[KEY]) == [f"{STUDY}.1.1"]


async def test_study_that_cannot_be_mapped_is_dead_lettered_without_a_request():
    store, rec = FakeStore(), Recorder()
    ds = ct_instance(1)
    del ds.PatientID
    steps = stored(store, rec, [ds])
    with FakeFhir() as server:
        await run_sender(cfg(server.url), steps, store)
    assert server.requests == []
    (outcome,) = rec.outcomes.values()
    assert isinstance(outcome, Permanent) and outcome.reason.startswith("mapping: ")


async def test_store_lookup_failure_is_transient():
    store, rec = FakeStore(), Recorder()
    steps = stored(store, rec, [ct_instance(1)])

    async def broken(study_uid):
        raise RuntimeError(f"lmdb said {CANARY}")

    with FakeFhir() as server:
        sender = FhirStudySender(cfg(server.url), broken)
        from flow import EgressConfig, EgressPolicy, Graph, Runner
        from fhir_harness import ScriptedFeed
        graph = Graph(ScriptedFeed(steps, name="feed") >> sender, egress=EgressPolicy(
            EgressConfig(allowed_http=[server.url])))
        await Runner(graph).run()
    assert list(rec.outcomes.values()) == [Transient("store members lookup failed: RuntimeError")]


async def test_delivery_without_study_uid_is_permanent():
    store, rec = FakeStore(), Recorder()
    ds = ct_instance(1)
    env = envelope_of(ds).__class__(sop_instance_uid="1.2.3", sop_class_uid="1.2",
                                    transfer_syntax_uid="1.2.840.10008.1.2.1")
    with FakeFhir() as server:
        await run_sender(cfg(server.url), [rec.delivery(env, BytesPayload(b""), "fhir")], store)
    assert rec.outcomes == {"1.2.3": Permanent("no StudyInstanceUID in the envelope")}


async def test_phi_canary_never_reaches_logs_or_outcomes(caplog, capsys):
    configure(level="INFO")
    caplog.set_level(logging.DEBUG, logger="nodes")
    caplog.set_level(logging.INFO)
    store, rec = FakeStore(), Recorder()
    bad = ct_instance(9, study="1.2.826.0.1.3680043.2.1143.9.3", series="1.2.826.0.1.3680043.2.9")
    bad.PatientID = "OTHER-1"
    worse = ct_instance(8, study="1.2.826.0.1.3680043.2.1143.9.3",
                        series="1.2.826.0.1.3680043.2.9")
    steps = stored(store, rec, ct_sr_study() + [bad, worse])
    body = operation_outcome("processing", diagnostics=f"{CANARY} {CANARY_ID}")

    def script(request):
        if request.method == "PUT" and STUDY in request.query["identifier"][0]:
            return 422, {"Content-Type": "application/fhir+json"}, body
        return None

    with FakeFhir(script) as server:
        await run_sender(cfg(server.url), steps, store)
    assert len(server.puts) == 1
    assert CANARY_ID in server.puts[0].body.decode()  # it *is* in the resource body
    assert "fhir.study" in caplog.text  # the events were captured, and are clean:
    texts = [caplog.text, capsys.readouterr().err, repr(rec.outcomes)]
    texts += [r.getMessage() + repr(getattr(r, "fields", "")) for r in caplog.records
              if r.levelno >= logging.INFO]
    for text in texts:
        for needle in (CANARY, CANARY_ID, "OTHER-1", *CANARY_PARTS):
            assert needle not in text
    reasons = {o.reason for o in rec.outcomes.values()}
    assert reasons == {"HTTP 422; OperationOutcome: processing",
                       "mapping: instances of study 1.2.826.0.1.3680043.2.1143.9.3 "
                       "disagree on PatientID"}


async def test_egress_is_declared_and_checked():
    server_url = "http://127.0.0.1:9/fhir"
    sender = FhirStudySender(cfg(server_url), FakeStore().members)
    assert [t.url for t in sender.egress()] == [server_url]


async def test_probe_reads_the_capability_statement():
    from flow import EgressConfig, EgressPolicy
    from flow._node import Context

    with FakeFhir() as server:
        sender = FhirStudySender(cfg(server.url), FakeStore().members)
        policy = EgressPolicy(EgressConfig(allowed_http=[server.url]))
        ctx = Context(sender, "fhir", {}, {}, None, policy, None)
        assert await sender.probe(ctx) == {"ok": True, "http_status": 200}


async def test_instance_whose_header_names_another_study_is_dead_lettered():
    store, rec = FakeStore(), Recorder()
    steps = stored(store, rec, [ct_instance(1)])
    stray = ct_instance(2, study="1.2.826.0.1.3680043.2.1143.9.4", series=f"{STUDY}.1")
    env = envelope_of(stray).__class__(**{**msgspec.structs.asdict(envelope_of(stray)),
                                          "study_instance_uid": STUDY})
    store.put(env, BytesPayload(to_part10(stray)))
    steps.append(rec.delivery(env, store.held[STUDY][env.sop_instance_uid][1], "fhir"))
    with FakeFhir() as server:
        await run_sender(cfg(server.url), steps, store)
    assert rec.outcomes[env.sop_instance_uid] == Permanent(
        "header StudyInstanceUID differs from the envelope's")
    assert uids_in(server.resources[KEY]) == [f"{STUDY}.1.1"]


async def test_egress_refused_at_run_time_hands_deliveries_back():
    from flow import EgressConfig, EgressPolicy, Graph, RestartPolicy, Runner
    from fhir_harness import ScriptedFeed

    store, rec = FakeStore(), Recorder()
    steps = stored(store, rec, [ct_instance(1)])
    with FakeFhir() as server:
        sender = FhirStudySender(cfg(server.url), store.members)
        graph = Graph(ScriptedFeed(steps, name="feed") >> sender, egress=EgressPolicy(
            EgressConfig(allowed_http=[server.url])))
        runner = Runner(graph, egress=EgressPolicy(EgressConfig(
            allowed_http=["http://127.0.0.1:1/other"])), restart=RestartPolicy(
            backoff_initial_s=0.01, backoff_max_s=0.05, max_failures=3))
        await runner.run()
    assert server.requests == []
    assert list(rec.outcomes.values()) == [Transient("node crashed: EgressDenied")]


async def test_report_has_routing_safe_figures_per_lane():
    store, rec = FakeStore(), Recorder()
    with FakeFhir() as server:
        sender, _ = await run_sender(cfg(server.url), stored(store, rec, ct_sr_study()), store)
    (figures,) = sender.report()["lanes"].values()
    assert figures["studies_sent"] == 1 and figures["delivered"] == 4
    assert figures["held"] == 0 and figures["pending_studies"] == 0


# -- the current resource is read and merged before every update ------------------------------

def handler_mapping(datasets) -> dict:
    return ImagingStudyHandler("urn:oid:2.16.840.1.113883.3.9999.1").handle(datasets)


async def test_instances_only_the_server_lists_are_kept_in_the_update(caplog):
    caplog.set_level(logging.INFO, logger="nodes")
    everything = ct_sr_study()
    store, rec = FakeStore(), Recorder()
    steps = stored(store, rec, [sr_instance()])  # the CT series was purged from the Store
    with FakeFhir() as server:
        server.hold(handler_mapping(everything))  # ... after an earlier update listed it
        await run_sender(cfg(server.url), steps, store)
    (put,) = server.puts
    assert put.resource == handler_mapping(everything)  # every instance; no id, meta
    assert sorted(uids_in(server.resources[KEY])) == sorted(
        str(ds.SOPInstanceUID) for ds in everything)
    assert server.resources[KEY]["id"] == "1"  # the same resource, updated
    assert rec.outcomes == {f"{STUDY}.2.1": Delivered(f"{DETAIL}; HTTP 200")}
    (event,) = [r.fields for r in caplog.records if r.getMessage() == "fhir.study"]
    assert (event["search_status"], event["http_status"]) == (200, 200)
    assert (event["series"], event["instances"], event["server_only"]) == (2, 4, 3)


def _gone(status, headers=None, body=b""):
    return status, {"Content-Type": "application/fhir+json", **(headers or {})}, body


@pytest.mark.parametrize("answer, outcome", [
    (_gone(503, {"Retry-After": "30"}), Transient("search: HTTP 503", 30.0)),
    (_gone(429, {"Retry-After": "7"}, operation_outcome("throttled")),
     Transient("search: HTTP 429; OperationOutcome: throttled", 7.0)),
    (_gone(408), Transient("search: HTTP 408")),
    (_gone(500), Transient("search: HTTP 500")),
    (_gone(401), Permanent("search: HTTP 401")),
    (_gone(403, body=operation_outcome("forbidden", diagnostics=f"{CANARY} {CANARY_ID}")),
     Permanent("search: HTTP 403; OperationOutcome: forbidden")),
    (_gone(404, body=operation_outcome("not-found", diagnostics=CANARY)),
     Permanent("search: HTTP 404; OperationOutcome: not-found")),
    (_gone(301, {"Location": "http://127.0.0.1:9/elsewhere"}),
     Permanent("search: HTTP 301: redirect not followed")),
    (_gone(200, body=b"<html>a proxy's page</html>"),
     Permanent("search: answer is not a FHIR Bundle")),
    (_gone(200, body=searchset({"resourceType": "ImagingStudy", "id": "a"},
                               {"resourceType": "ImagingStudy", "id": "b"})),
     Permanent("ambiguous: 2 ImagingStudy resources match")),
])
async def test_a_failed_search_settles_the_study_without_a_put(answer, outcome):
    store, rec = FakeStore(), Recorder()
    steps = stored(store, rec, ct_sr_study())
    with FakeFhir(lambda r: answer if r.method == "GET" else None) as server:
        await run_sender(cfg(server.url), steps, store)
    assert server.puts == [] and len(server.searches) == 1  # no retrying inside the sender
    assert set(rec.outcomes.values()) == {outcome}


async def test_a_search_answer_beyond_the_cap_is_permanent(monkeypatch):
    monkeypatch.setattr(sender_module, "MAX_SEARCH_BYTES", 4096)  # 32 MiB in production
    store, rec = FakeStore(), Recorder()
    steps = stored(store, rec, [sr_instance()])
    with FakeFhir() as server:
        big = handler_mapping([ct_instance(n) for n in range(1, 40)])
        assert len(json.dumps(big)) > 4096
        server.hold(big)
        await run_sender(cfg(server.url), steps, store)
    assert server.puts == []
    assert list(rec.outcomes.values()) == [
        Permanent("search: HTTP 200: answer larger than 4096 bytes")]
