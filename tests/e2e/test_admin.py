"""The admin endpoint (issue 18) of a real ``flow`` process: ``/metrics`` scraped and parsed
with prometheus_client's parser while a study flows from ``storescu`` to a ``storescp``
PACS, ``/status`` against ``flow status --json``, ``/healthz`` with a failed lane, and the
status and trace pages loaded in headless Chromium. No PHI canary anywhere it serves.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread

from support.browser import dump_dom, screenshot
from support.flowproc import run_flow
from support.peers import free_port
from support.site import RadiologySite
from support.studies import assert_no_phi, malformed_report, mixed_study, sent

pytestmark = [pytest.mark.peer("dcmtk"), pytest.mark.peer("orthanc")]

HERE = Path(__file__).resolve().parent

# Screenshots are also copied here (printed by the test) so they outlive pytest's tmp_path.
SHOTS = Path(os.environ.get("DICOMFLOW_TEST_OUTPUT", "/tmp/dicomflow-test-output"))


class Admin:
    """HTTP client of a site's admin endpoint."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of ``/metrics`` as {(sample name, sorted labels): value}."""
        response = self.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        assert_no_phi(response.text, "/metrics")
        samples = {}
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples


def admin_site(workdir: Path, **kw: object) -> tuple[RadiologySite, Admin]:
    port = free_port()
    sections = {"admin": {"port": port, "sample_interval_s": 0.5, "chart_window_s": 120,
                          "refresh_s": 5}, **kw.pop("sections", {})}  # type: ignore[dict-item]
    return RadiologySite(workdir, sections=sections, **kw), Admin(port)  # type: ignore[arg-type]


def value(samples: dict, name: str, **labels: str) -> float:
    """The sample ``name{labels}``; when the graph runs in several processes, the sum of
    its per-process samples (each has a ``process`` label besides ``labels``)."""
    exact = samples.get((name, tuple(sorted(labels.items()))))
    if exact is not None:
        return exact
    found = [v for (n, lbls), v in samples.items() if n == name and "process" in dict(lbls)
             and {k: x for k, x in lbls if k != "process"} == labels]
    if not found:
        raise KeyError((name, labels))
    return sum(found)


def keep(shot: Path, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    kept = SHOTS / name
    shutil.copyfile(shot, kept)
    print(f"screenshot: {kept}")
    return kept


def test_metrics_status_and_pages_while_a_study_flows(tmp_path: Path) -> None:
    files = mixed_study(tmp_path / "study", images=4, reports=2)
    bad = malformed_report(tmp_path / "study")  # dead-lettered on the ris lane only
    bad_uid = str(dcmread(bad).SOPInstanceUID)
    everything = [*files, bad]
    expected = sent(everything)
    total = len(everything)
    site, admin = admin_site(tmp_path / "site")
    with site:
        site.pause_pacs()  # the pacs lane holds the whole study until the PACS answers
        assert site.send(everything).acknowledged == total

        # While the pacs lane still has all of it (LMDB takes acknowledged arrivals in from
        # the ingest journal within milliseconds: the lane's figures may lag that much).
        deadline = time.monotonic() + 20
        while True:
            flowing = admin.metrics()
            if value(flowing, "dicomflow_store_journal_backlog", node="store") == 0 \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert value(flowing, "dicomflow_store_journal_appends_total", node="store") == total
        assert value(flowing, "dicomflow_ingest_objects_total", node="dicom_listener",
                     ae_title="DICOMFLOW") == total
        assert value(flowing, "dicomflow_cstore_answers_total", node="dicom_listener",
                     status="0x0000") == total
        assert value(flowing, "dicomflow_associations_total", node="dicom_listener") >= 1
        assert value(flowing, "dicomflow_ingest_bytes_total", node="dicom_listener",
                     ae_title="DICOMFLOW") > 0
        pacs = {state: value(flowing, f"dicomflow_lane_{state}", lane="pacs")
                for state in ("queued", "in_flight", "retrying", "dead_lettered")}
        delivered = value(flowing, "dicomflow_lane_delivered_total", lane="pacs")
        assert delivered == 0 and sum(pacs.values()) == total, (pacs, delivered)
        assert value(flowing, "dicomflow_store_commit_round_seconds_count", node="store") > 0
        assert value(flowing, "dicomflow_store_commit_batch_size_count", node="store") > 0
        assert value(flowing, "dicomflow_lane_up", lane="pacs") == 1
        shot = screenshot(admin.url + "/", tmp_path / "status-page-flowing.png")
        keep(shot, "admin-status-page-flowing.png")

        site.resume_pacs()
        status = site.wait_lanes_idle(timeout=90)  # first: storescp answers after writing
        assert site.wait_pacs(total) == expected
        site.wait_archive(total)

        done = admin.metrics()
        for lane, count in (("pacs", total), ("archive", total), ("ris", 2)):
            assert value(done, "dicomflow_lane_delivered_total", lane=lane) == count
            assert value(done, "dicomflow_lane_attempts_total", lane=lane,
                         outcome="delivered") == count
            assert value(done, "dicomflow_lane_send_seconds_count", lane=lane) >= count
            assert value(done, "dicomflow_lane_queued", lane=lane) == 0
        assert value(done, "dicomflow_lane_dead_lettered", lane="ris") == 1
        assert value(done, "dicomflow_lane_attempts_total", lane="ris", outcome="permanent") == 1
        assert value(done, "dicomflow_lane_oldest_age_seconds", lane="pacs") == 0
        assert value(done, "dicomflow_node_state", node="pacs_sender", lane="pacs",
                     state="running") == 1
        assert value(done, "dicomflow_node_restarts_total", node="pacs_sender",
                     lane="pacs") == 0
        assert value(done, "dicomflow_associations_open", node="dicom_listener") == 0
        assert ("process_cpu_seconds_total", ()) in done
        if any("process" in dict(labels) for _, labels in done):  # several processes
            assert value(done, "dicomflow_child_up", process="ingest-0") == 1
            assert value(done, "dicomflow_child_cpu_seconds_total", process="lanes-0") > 0
            assert value(done, "dicomflow_child_resident_memory_bytes", process="lanes-0") > 0
        for (name, labels), _ in done.items():  # label values are routing-safe only
            for key, label in labels:
                assert key in ("lane", "node", "ae_title", "outcome", "reason", "status",
                               "state", "graph", "le", "process"), (name, key)
                assert not re.fullmatch(r"[0-9.]{10,}", label), (name, key, label)

        # /status is the `flow status --json` document. The CLI runs in another process:
        # it sees every figure the Store keeps in LMDB, not the running nodes' in-memory
        # counters (listener, senders), which /status adds. Those come from the children's
        # reports (every second): the two are compared once both have the same report.
        def lanes_agree() -> tuple[dict, dict]:
            served = admin.get("/status")
            assert served.status_code == 200
            http = served.json()
            cli = json.loads(run_flow(["status", *site.graph_args, "--json"]).stdout)
            return http, cli

        deadline = time.monotonic() + 10
        from_http, from_cli = lanes_agree()
        while time.monotonic() < deadline and any(
                {k: from_http["lanes"][lane].get(k) for k in from_cli["lanes"][lane]}
                != from_cli["lanes"][lane] for lane in ("pacs", "archive", "ris")):
            time.sleep(0.5)
            from_http, from_cli = lanes_agree()
        assert from_http.keys() == from_cli.keys() == status.keys()
        assert from_http["running"] is True and from_http["pid"] == from_cli["pid"]
        for lane in ("pacs", "archive", "ris"):
            cli = from_cli["lanes"][lane]
            assert {k: from_http["lanes"][lane].get(k) for k in cli} == cli
        assert [(n["node"], n["state"]) for n in from_http["nodes"]] \
            == [(n["node"], n["state"]) for n in from_cli["nodes"]]
        assert from_http["lanes"]["dicom_listener"]["stored"] == total

        healthz = admin.get("/healthz")
        assert healthz.status_code == 200 and healthz.json()["healthy"] is True

        # The page as a browser shows it.
        dom = dump_dom(admin.url + "/")
        shot = screenshot(admin.url + "/", tmp_path / "status-page.png")
        keep(shot, "admin-status-page.png")
        for lane in ("pacs", "archive", "ris"):
            assert f"<td>{lane}</td>" in dom
        assert "healthy: every lane runs" in dom
        assert f'<td class="n">{total}</td>' in dom  # the delivered count
        assert "MissingPatientID" in dom  # the dead letter's routing-safe reason
        assert "<svg" in dom and "<polyline" in dom  # the throughput chart has a line
        link = f'href="/trace/{bad_uid}"'
        assert link in dom
        trace_dom = dump_dom(admin.url + f"/trace/{bad_uid}")
        assert f"Trace of <code>{bad_uid}</code>" in trace_dom
        assert "dead_letter" in trace_dom and "ris" in trace_dom
        keep(screenshot(admin.url + f"/trace/{bad_uid}", tmp_path / "trace-page.png"),
             "admin-trace-page.png")
        assert admin.get("/trace/1.2.3.404").status_code == 404
        assert admin.get("/nothing-here").status_code == 404

        for path in ("/", f"/trace/{bad_uid}", "/status", "/healthz"):
            assert_no_phi(admin.get(path).text, f"GET {path}")
        assert_no_phi(dom, "the status page in the browser")
        assert_no_phi(trace_dom, "the trace page in the browser")
    assert_no_phi(site.logs(), "the flow log")


def test_healthz_names_a_failed_lane(tmp_path: Path) -> None:
    """The ris lane's mapper crashes on every report until its lane is marked failed:
    /healthz answers 503 naming it, while the other lanes keep delivering."""
    files = mixed_study(tmp_path / "study", images=1, reports=1)
    restart = {"backoff_initial_s": 0.1, "backoff_max_s": 0.5, "max_failures": 3}
    site, admin = admin_site(tmp_path / "site", graph=HERE / "graphs" / "crashing_ris.py",
                             sections={"runtime.restart": restart})
    with site:
        assert admin.get("/healthz").status_code == 200
        site.send(files)
        site.wait_status(lambda s: s["lanes"]["ris"]["state"] == "failed", "ris lane failed")
        healthz = admin.get("/healthz")
        assert healthz.status_code == 503
        assert healthz.json()["unhealthy_lanes"] == {"ris": "failed"}
        samples = admin.metrics()
        assert value(samples, "dicomflow_lane_up", lane="ris") == 0
        assert value(samples, "dicomflow_lane_up", lane="pacs") == 1
        assert value(samples, "dicomflow_node_state", node="crashing_mapper", lane="ris",
                     state="failed") == 1
        assert value(samples, "dicomflow_node_restarts_total", node="crashing_mapper",
                     lane="ris") >= 1
        dom = dump_dom(admin.url + "/")
        assert "unhealthy: lane ris failed" in dom
        assert_no_phi(dom, "the status page")
        assert_no_phi(healthz.text, "/healthz")
