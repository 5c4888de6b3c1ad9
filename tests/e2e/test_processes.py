"""One graph, several OS processes (issue 16), end to end: ``flow graphs/radiology.py`` with
``[runtime] processes = 2`` runs as a parent (``supervisor``) and its children ``ingest-0``
(listener + the Store's commit) and ``lanes-0`` (pacs, archive, ris), with real peers on
127.0.0.1 (DCMTK storescu/storescp, Orthanc DICOMweb, an MLLP RIS). Every promise is checked
on real processes, found by the pids the parent publishes in ``health.json``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import pytest
import trio
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from flow._processes import KILL_GRACE_S
from nodes.store import Store, StoreConfig
from nodes.store.db import Env
from support.flowproc import run_flow
from support.site import LANES, RadiologySite
from support.studies import assert_no_phi, assert_no_plaintext_phi, mixed_study, sent

pytestmark = [pytest.mark.peer("dcmtk"), pytest.mark.peer("orthanc")]

TWO = {"runtime": {"processes": 2, "shutdown_deadline_s": 3.0},
       "runtime.restart": {"backoff_initial_s": 0.2, "backoff_max_s": 1.0}}


def sections(**extra: dict[str, object]) -> dict[str, dict[str, object]]:
    """The two-process site tables (fresh dicts: a test may change them), plus ``extra``."""
    return {name: dict(values) for name, values in {**TWO, **extra}.items()}


# -- the processes, as the parent publishes them ------------------------------------------

def health(site: RadiologySite) -> dict:
    return json.loads((site.data_dir / "health.json").read_text())


def wait_for(check: Callable[[], object], what: str, timeout: float = 30) -> object:
    """Poll ``check()`` until it returns something true; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = check()
        except (OSError, ValueError, KeyError):  # a file being replaced or written
            found = None
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached after {timeout}s")
        time.sleep(0.1)


def running_pids(site: RadiologySite, *, not_in: set[int] = frozenset(),
                 timeout: float = 30) -> dict[str, int]:
    """{process: pid} once every child is running (with a pid not in ``not_in``)."""
    def check() -> dict[str, int] | None:
        processes = health(site)["processes"]
        if all(p["state"] == "running" and p["pid"] not in not_in for p in processes):
            return {p["process"]: p["pid"] for p in processes}
        return None
    return wait_for(check, "every child process running", timeout)  # type: ignore[return-value]


def thread_nices(pid: int) -> set[int]:
    """The nice values of every thread of ``pid`` (Linux keeps one per thread)."""
    nices = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        nices.add(int(stat.rpartition(")")[2].split()[16]))  # field 19 of proc(5)
    return nices


def gone(pid: int) -> bool:
    """``pid`` no longer runs (it exited; a zombie waiting for its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


def line_pattern(event: str, **fields: object) -> str:
    """A regex for a log line of ``event`` with every ``key=value`` of ``fields`` in any order
    (the runtime adds this process's own ``process=`` field to every line, wherever)."""
    ahead = "".join(rf"(?=[^\n]* {re.escape(k)}={re.escape(str(v))}(?: |$))"
                    for k, v in fields.items())
    return rf"(?m)^\S+ \S+ {re.escape(event)}{ahead}"


def started_pids(log: str) -> set[int]:
    """Every child pid the parent logged (``process.started ... pid=N``)."""
    return {int(pid) for pid in re.findall(r"process\.started .*?pid=(\d+)", log)}


def pacs_holds(site: RadiologySite, expected: dict[str, bytes], timeout: float = 60) -> None:
    """Every expected object is at the PACS, byte-identical (duplicates allowed)."""
    def check() -> bool:
        try:
            return expected.items() <= site.pacs_files().items()
        except InvalidDicomError:  # storescp is still writing a file
            return False
    wait_for(check, f"{len(expected)} objects at the PACS", timeout)


def archive_holds(site: RadiologySite, expected: dict[str, bytes], timeout: float = 60) -> None:
    assert site.wait_archive(len(expected), timeout) == expected


def pacs_figures(site: RadiologySite) -> dict:
    return site.status()["lanes"]["pacs"]


def in_flight(status: dict) -> dict[str, int]:
    return {lane: figures.get("in_flight", 0) for lane, figures in status["lanes"].items()
            if figures.get("in_flight")}


# -- the tests ----------------------------------------------------------------------------

def test_routed_across_two_processes_with_one_status_and_named_log_lines(tmp_path: Path) -> None:
    files = mixed_study(tmp_path / "study")
    expected = sent(files)
    with RadiologySite(tmp_path / "site", sections=sections()) as site:
        assert site.send(files).acknowledged == len(files)
        pacs_holds(site, expected)
        archive_holds(site, expected)
        messages = site.ris.wait_for(2)
        status = site.wait_lanes_idle()
        pids = running_pids(site)
        text = run_flow(["status", *site.graph_args])
        plan = run_flow(["check", *site.graph_args])
        # [runtime] lanes_nice (default 10): every thread of the lane process (its senders'
        # worker threads included) runs lower than the parent and the ingest process.
        assert site.flow is not None
        base = thread_nices(site.flow.pid)
        assert len(base) == 1 and thread_nices(pids["ingest-0"]) == base
        assert thread_nices(pids["lanes-0"]) == {min(19, base.pop() + 10)}
    assert plan.returncode == 0, plan.stderr
    assert "    ingest-0: dicom_listener\n" in plan.stdout
    assert "    lanes-0: pacs, archive, ris (nice +10, [runtime] lanes_nice)\n" in plan.stdout
    assert len(messages) == 2 and all(b"ORU^R01" in m for m in messages)
    assert set(pids) == {"ingest-0", "lanes-0"} and len(set(pids.values())) == 2
    assert site.flow is not None and site.flow.pid not in pids.values()
    assert status["running"] is True
    for lane in LANES:
        assert status["lanes"][lane]["state"] == "running"
    assert status["lanes"]["pacs"]["delivered"] == len(files)
    assert status["lanes"]["ris"]["delivered"] == 2
    assert {node["lane"] for node in status["nodes"]} == {"dicom_listener", *LANES}
    for node in status["nodes"]:
        process = "ingest-0" if node["lane"] == "dicom_listener" else "lanes-0"
        assert (node["process"], node["pid"]) == (process, pids[process]), node
    assert text.returncode == 0, text.stderr
    for name, pid in pids.items():
        assert re.search(rf"^  process {name}: pid {pid} running restarts=0 lanes=",
                         text.stdout, re.M), text.stdout
    assert re.search(r"^  node dicom_listener \(dicom_listener\) \[ingest-0\]: running",
                     text.stdout, re.M), text.stdout
    log = site.logs()
    assert "process=supervisor" in log and "process.started" in log
    assert re.search(line_pattern("dimse.stored", process="ingest-0"), log)
    assert re.search(line_pattern("dimse.sent", process="lanes-0"), log)
    for line in log.splitlines():
        if " INFO " in line or " WARNING " in line or " ERROR " in line:
            assert " process=" in line, line
    assert_no_phi(log + text.stdout, "the flow log and flow status")
    assert_no_plaintext_phi(site.data_dir)


def test_sigkill_of_the_lane_process_restarts_it_and_loses_nothing(tmp_path: Path) -> None:
    """Three processes: lanes-0 runs pacs and ris, lanes-1 the archive lane. Then an
    operator's SIGTERM to lanes-1: it drains and exits 0, and the graph, which did not ask
    for that stop, starts it again."""
    first = mixed_study(tmp_path / "first", images=2, reports=0)
    second = mixed_study(tmp_path / "second", images=0, reports=1)
    expected = {**sent(first), **sent(second)}
    three = sections(runtime={**TWO["runtime"], "processes": 3})
    with RadiologySite(tmp_path / "site", sections=three) as site:
        pids = running_pids(site)
        lanes = {p["process"]: p["lanes"] for p in health(site)["processes"]}
        assert lanes == {"ingest-0": ["dicom_listener"], "lanes-0": ["pacs", "ris"],
                         "lanes-1": ["archive"]}
        site.pause_pacs()  # the pacs lane's send waits for an answer until resumed
        assert site.send(first).acknowledged == len(first)
        wait_for(lambda: pacs_figures(site).get("in_flight"), "an object in flight to the PACS")
        os.kill(pids["lanes-0"], signal.SIGKILL)
        # Ingest goes on while its sibling is dead or restarting.
        assert site.send(second).acknowledged == len(second)
        site.flow.wait_for_log(line_pattern("process.crashed", child="lanes-0",
                                            pid=pids["lanes-0"]))
        after = running_pids(site, not_in={pids["lanes-0"]})
        assert after["ingest-0"] == pids["ingest-0"], "ingest never notices"
        assert after["lanes-1"] == pids["lanes-1"], "nor does the other lane process"
        assert gone(pids["lanes-0"])
        site.resume_pacs()
        pacs_holds(site, expected)
        archive_holds(site, expected)
        assert len(site.ris.wait_for(1)) >= 1
        status = site.wait_lanes_idle()
        os.kill(after["lanes-1"], signal.SIGTERM)  # not the parent's: an operator's kill
        site.flow.wait_for_log(line_pattern("process.stopped_outside", child="lanes-1",
                                            pid=after["lanes-1"]))
        again = running_pids(site, not_in={after["lanes-1"]})
        assert again["lanes-0"] == after["lanes-0"] and again["ingest-0"] == pids["ingest-0"]
        third = mixed_study(tmp_path / "third", images=1, reports=0)
        assert site.send(third).acknowledged == 1
        archive_holds(site, {**expected, **sent(third)})  # the archive lane runs again
        restarts = {p["process"]: p["restarts"] for p in health(site)["processes"]}
    assert restarts == {"ingest-0": 0, "lanes-0": 1, "lanes-1": 1}
    assert status["lanes"]["pacs"]["dead_lettered"] == 0
    assert status["lanes"]["archive"]["delivered"] >= len(expected)
    assert_no_phi(site.logs(), "the flow log")


def test_sigkill_of_ingest_right_after_its_acknowledgements_loses_nothing(
        tmp_path: Path) -> None:
    """An arrival is acknowledged once its record is durable in the ingest journal; LMDB
    takes it in behind. Here the test holds LMDB's single writer, so ingest-0 acknowledges a
    whole study that LMDB does not hold, and is SIGKILLed then: the parent restarts it, it
    takes its journal in before it listens again, and everything is delivered, once."""
    files = mixed_study(tmp_path / "study", images=3, reports=1)
    expected = sent(files)
    with RadiologySite(tmp_path / "site", sections=sections()) as site:
        pids = running_pids(site)
        env = Env.open(site.data_dir, map_size_mb=StoreConfig().map_size_mb)
        try:
            txn = env.begin(write=True)  # every process's commits wait behind this
            try:
                assert site.send(files).acknowledged == len(files)
                assert txn.stat(env.objects)["entries"] == 0, "acknowledged, not in LMDB"
                os.kill(pids["ingest-0"], signal.SIGKILL)
                site.flow.wait_for_log(line_pattern("process.crashed", child="ingest-0",
                                                    pid=pids["ingest-0"]))
            finally:
                txn.abort()
        finally:
            env.close()
        site.flow.wait_for_log(line_pattern("store.opened", replayed=len(files),
                                            process="ingest-0"))
        pacs_holds(site, expected)
        archive_holds(site, expected)
        assert len(site.ris.wait_for(1)) >= 1
        status = site.wait_lanes_idle()
        after = running_pids(site)
    assert after["lanes-0"] == pids["lanes-0"] and after["ingest-0"] != pids["ingest-0"]
    assert status["lanes"]["pacs"]["delivered"] == len(files)
    assert status["lanes"]["archive"]["delivered"] == len(files)
    assert_no_phi(site.logs(), "the flow log")
    assert_no_plaintext_phi(site.data_dir)


def test_parent_sigkill_leaves_no_child_and_a_restart_delivers_the_rest(tmp_path: Path) -> None:
    files = mixed_study(tmp_path / "study", images=3, reports=1)
    expected = sent(files)
    site = RadiologySite(tmp_path / "site", start_pacs=False, sections=sections())
    with site:
        pids = running_pids(site)
        assert site.send(files).acknowledged == len(files)  # committed although the PACS is down
        archive_holds(site, expected)
        site.kill_flow()
        # Each child learns it (PR_SET_PDEATHSIG, the closed socket) and leaves by itself.
        wait_for(lambda: all(gone(pid) for pid in pids.values()), "every child gone", 15)
        after = site.status()
        assert after["running"] is False
        queued = after["lanes"]["pacs"]
        assert queued.get("delivered", 0) == 0
        assert queued["queued"] + queued.get("retrying", 0) + queued.get("in_flight", 0) \
            == len(files), queued
        site.start_pacs()
        site.start_flow()
        pacs_holds(site, expected)
        status = site.wait_lanes_idle()
        assert in_flight(status) == {}
        assert status["lanes"]["pacs"]["delivered"] == len(files)
        assert status["lanes"]["archive"].get("dead_lettered", 0) == 0
    assert_no_phi(site.logs(), "the flow logs")


def test_sigterm_drains_within_the_deadline_and_keeps_the_rest_queued(tmp_path: Path) -> None:
    files = mixed_study(tmp_path / "study", images=5, reports=0)
    expected = sent(files)
    deadline = TWO["runtime"]["shutdown_deadline_s"]
    site = RadiologySite(tmp_path / "site", sections=sections())
    with site:
        pids = running_pids(site)
        site.pause_pacs()  # a PACS that answers nothing: the in-flight send is cut at the deadline
        assert site.send(files).acknowledged == len(files)
        archive_holds(site, expected)
        wait_for(lambda: pacs_figures(site).get("in_flight"), "an object in flight to the PACS")
        assert site.flow is not None
        began = time.monotonic()
        site.flow.signal(signal.SIGTERM)
        status = site.flow.wait(timeout=60)
        took = time.monotonic() - began
        assert status == 0, site.flow.output()
        # The deadline, then the parent's grace before it would SIGKILL a child.
        assert took < deadline + KILL_GRACE_S + 2.0, took
        assert all(gone(pid) for pid in pids.values())
        after = site.status()
        left = after["lanes"]["pacs"]
        assert after["running"] is False
        assert left.get("delivered", 0) == 0, "the PACS answered nothing"
        assert left["queued"] + left.get("retrying", 0) + left.get("in_flight", 0) \
            == len(files), left
        assert after["lanes"]["archive"]["delivered"] == len(files)
        site.resume_pacs()
        site.start_flow()
        pacs_holds(site, expected)
        assert in_flight(site.wait_lanes_idle()) == {}
    log = site.logs()
    assert "process.killed" not in log, "each child stopped by itself within the deadline"
    assert_no_phi(log, "the flow logs")


def test_sighup_replaces_every_child_or_none(tmp_path: Path) -> None:
    first = mixed_study(tmp_path / "first", images=1, reports=0)
    second = mixed_study(tmp_path / "second", images=1, reports=0)
    third = mixed_study(tmp_path / "third", images=1, reports=0)
    tables = sections()
    with RadiologySite(tmp_path / "site", sections=tables) as site:
        assert site.flow is not None
        pids = running_pids(site)
        assert site.send(first).acknowledged == 1
        pacs_holds(site, sent(first))
        # A valid change: every child is replaced and routes with the new config.
        tables["archive_coercion"] = {"station_name_prefix": "HUP-"}
        site.config.write_text(site.site_toml())
        site.flow.signal(signal.SIGHUP)
        site.flow.wait_for_log(r"reload\.accepted")
        renewed = running_pids(site, not_in=set(pids.values()))
        assert all(gone(pid) for pid in pids.values())
        site.wait_status(lambda s: s["running"], "the new graph running")
        assert site.send(second).acknowledged == 1, "the new ingest process listens"
        pacs_holds(site, {**sent(first), **sent(second)})
        uid = next(iter(sent(second)))
        site.wait_archive(2)
        coerced = site.orthanc.stored_files_by_uid()[uid]
        # A broken site file: rejected whole, every child keeps running with its pid.
        tables["runtime"]["no_such_setting"] = 1
        site.config.write_text(site.site_toml())
        site.flow.signal(signal.SIGHUP)
        site.flow.wait_for_log(r"reload\.rejected")
        time.sleep(1.5)  # the parent's health file is rewritten every second
        assert running_pids(site) == renewed
        assert site.send(third).acknowledged == 1
        pacs_holds(site, {**sent(first), **sent(second), **sent(third)})
    assert str(dcmread(BytesIO(coerced)).StationName).startswith("HUP-")
    log = site.logs()
    assert len(re.findall(r"process\.started", log)) == 4, "two children, then two new ones"
    assert re.search(line_pattern("reload.rejected", process="supervisor")
                     + r"[^\n]*no_such_setting", log)
    assert_no_phi(log, "the flow log")


def test_a_child_that_cannot_start_stops_flow_run_with_one_line(tmp_path: Path) -> None:
    site = RadiologySite(tmp_path / "site", sections=sections())
    store = Store(str(site.data_dir), StoreConfig(min_free_disk_mb=0))
    store.branch("pacs")

    async def open_and_close() -> None:  # records the data dir's own key fingerprint
        await store.open()
        await store.close()

    trio.run(open_and_close)
    other = tmp_path / "other.key"
    other.write_bytes(os.urandom(32))
    other.chmod(0o600)
    site.sections["store"] = {"key_file": str(other)}
    site.config.write_text(site.site_toml())
    result = run_flow(["run", *site.graph_args], timeout=60)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("flow: error:")]
    assert len(errors) == 1, result.stderr
    assert str(other) in errors[0]
    assert "process.start_failed" in result.stderr
    children = started_pids(result.stderr)
    assert children, result.stderr
    assert all(gone(pid) for pid in children)
    assert_no_phi(result.stderr, "flow run's output")


def test_one_process_runs_everything_in_one_process(tmp_path: Path) -> None:
    files = mixed_study(tmp_path / "study", images=1, reports=1)
    expected = sent(files)
    with RadiologySite(tmp_path / "site", sections={"runtime": {"processes": 1}}) as site:
        assert site.send(files).acknowledged == len(files)
        pacs_holds(site, expected)
        archive_holds(site, expected)
        site.ris.wait_for(1)
        status = site.wait_lanes_idle()
        written = wait_for(lambda: health(site), "health.json")
        assert site.flow is not None
        children = [p for p in Path("/proc").iterdir() if p.name.isdigit()
                    and _parent_of(p) == site.flow.pid]
        text = run_flow(["status", *site.graph_args])
    assert children == [], "no child process"
    assert "processes" not in written and written["pid"] == site.flow.pid
    assert all("process" not in node for node in status["nodes"])
    assert "process=" not in site.logs()
    assert text.returncode == 0 and "running (pid" in text.stdout, text.stderr
    assert "  process " not in text.stdout and "[" not in text.stdout


def _parent_of(proc: Path) -> int | None:
    try:
        stat = (proc / "stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])
