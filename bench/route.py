"""End-to-end routing through the flagship graph vs DCMTK, pynetdicom and Orthanc, same run.

    .venv/bin/python bench/route.py [--objects 300] [--quick]

Objects: small 64×64 CT, explicit VR little endian (300 by default, 40 with ``--quick``).
Every sender is a DCMTK ``storescu`` sending its share on one association; "4 assoc" means
four of them at once. DCMTK runs with TCP_NODELAY=1 everywhere. The PACS of every routed
run is ``storescp --fork`` (a child per association: associations served side by side).

Baselines, same run:

- ``baseline_dcmtk_direct``: ``storescu → storescp`` (1 association);
- ``ceiling_bare_pynetdicom`` (1 association) and ``…_4_assoc``: ``storescu`` into a bare
  pynetdicom SCP that only keeps each data set in memory, the most any listener built on
  pynetdicom can ingest;
- ``baseline_orthanc_ingest_4_assoc``: ``storescu → Orthanc`` (until every Success);
- ``baseline_orthanc_lua_router``: ``storescu → Orthanc`` whose Lua ``OnStoredInstance``
  calls ``SendToModality`` to the same kind of PACS; clock stops when the PACS holds every
  object (1 association in).

Figures: ``storescu → flow graphs/radiology.py`` (listener, Store with commit-before-ack,
lanes pacs → storescp, archive → Orthanc DICOMweb, ris → MLLP), with 1 and 4 associations:
ingest (until storescu has every Success), pacs (until the PACS holds every object),
routed (until the PACS *and* the archive hold every object); with 1 association also
all lanes (until ``flow status`` shows nothing queued), ``cpu_ms_per_object`` (CPU time per
object of each process of the graph, from /proc), ``ingest_ms_per_object`` against
``handler_ms_median`` (the listener's C-STORE handler: hand-over to the Store and its sync
commit round, from the flow log; the rest is pynetdicom's DIMSE exchange and storescu).

``one_process_*``: the same with ``[runtime] processes = 1`` (everything in one process),
in the same run. The main figures use ``--processes`` (default ``auto``: one per core) and,
with 4 associations, ``--workers`` ingest processes.

Ratios against the targets of issue 16: ``ratio_routed_vs_bare`` (routed, 1 assoc / bare
pynetdicom, 1 assoc; target ≥ 0.6), ``ratio_routed_vs_orthanc_router`` (≥ 1.0),
``ratio_ingest_4_assoc_vs_orthanc_ingest`` (dicomflow's committed ingest from 4 modalities
while the lanes route / Orthanc's ingest from 4; ≥ 0.5). Prints ONE JSON line, with the
commit measured and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
os.environ["TCP_NODELAY"] = "1"  # DCMTK: Nagle off, as dicomflow does on its own sockets

from dimse import BARE_SCP, split, start_senders, wait_senders  # noqa: E402  bench/dimse.py
from support.orthanc import OrthancServer  # noqa: E402
from support.peers import Process, free_port, need, wait_for_port  # noqa: E402
from support.site import RadiologySite  # noqa: E402
from support.synth import ct, write  # noqa: E402
from flow._processes import cores, proc_usage  # noqa: E402

TIMEOUT_S = 600  # every wait below gives up after this long
ROUTER_LUA = """
function OnStoredInstance(instanceId, tags, metadata, origin)
   SendToModality(instanceId, 'pacs')
end
"""


def make_files(directory: Path, n: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    study = "1.2.826.0.1.3680043.8.498.77.9"
    return [write(ct(study_uid=study, instance_number=i + 1), directory / f"{i:05}.dcm")
            for i in range(n)]


def send(port: int, called: str, files: list[Path], associations: int = 1) -> float:
    """Seconds until every ``storescu`` (one per association) has every Success."""
    started = time.perf_counter()
    wait_senders(start_senders(port, called, split(files, associations), dict(os.environ)))
    return time.perf_counter() - started


def wait_until(done: Callable[[], bool], what: str, interval: float = 0.01) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached after {TIMEOUT_S}s")
        time.sleep(interval)


def count(directory: Path) -> int:
    return sum(1 for p in directory.iterdir() if not p.name.startswith("."))


def storescp(directory: Path, port: int, log: Path, *, fork: bool) -> Process:
    directory.mkdir(parents=True, exist_ok=True)
    args = [need("storescp")["storescp"], "--aetitle", "PACS", "+B",
            "--output-directory", str(directory), *(["--fork"] if fork else []), str(port)]
    process = Process(args, log=log)
    wait_for_port(port)
    return process


def direct(work: Path, files: list[Path]) -> float:
    port, out = free_port(), work / "direct"
    with storescp(out, port, work / "direct.log", fork=False):
        seconds = send(port, "PACS", files)
        wait_until(lambda: count(out) >= len(files), "storescp holds every object")
    return len(files) / seconds


def bare_pynetdicom(work: Path, files: list[Path], associations: int) -> float:
    """storescu → a bare pynetdicom SCP in its own process that keeps each data set in
    memory (bench/dimse.py's case b), same objects."""
    port = free_port()
    with Process([sys.executable, "-c", BARE_SCP, str(port)],
                 log=work / f"bare-{associations}.log"):
        wait_for_port(port)
        time.sleep(0.3)  # let the probe connection above time out of the way
        seconds = send(port, "BARE", files, associations)
    return len(files) / seconds


def orthanc_ingest(work: Path, files: list[Path], associations: int) -> float:
    with OrthancServer(work / "orthanc-ingest") as orthanc:
        return len(files) / send(orthanc.dicom_port, orthanc.aet, files, associations)


def orthanc_router(work: Path, files: list[Path]) -> float:
    """Orthanc as the router: every stored instance is sent on to the PACS by its Lua
    ``OnStoredInstance`` hook; seconds until the PACS holds every object."""
    port, out = free_port(), work / "router-pacs"
    script = work / "router.lua"
    script.write_text(ROUTER_LUA)
    extra = {"DicomModalities": {"pacs": ["PACS", "127.0.0.1", port]},
             "LuaScripts": [str(script)]}
    with storescp(out, port, work / "router-pacs.log", fork=True), \
            OrthancServer(work / "orthanc-router", extra=extra) as orthanc:
        started = time.perf_counter()
        send(orthanc.dicom_port, orthanc.aet, files)
        wait_until(lambda: count(out) >= len(files), "the PACS holds every routed object")
        return len(files) / (time.perf_counter() - started)


def routed(work: Path, files: list[Path], associations: int, *, processes: int | str = "auto",
           workers: int = 1, prefix: str = "") -> dict[str, float]:
    """The flagship graph's figures (keys prefixed with ``prefix``) with ``[runtime]
    processes`` and ``[listen] workers`` as given."""
    n = len(files)
    suffix = "" if associations == 1 else f"_{associations}_assoc"
    sections: dict[str, dict[str, object]] = {"runtime": {"processes": processes}}
    if workers > 1:
        sections["listen"] = {"workers": workers}
    with RadiologySite(work / f"site-{prefix}{associations}", pacs_fork=True,
                       sections=sections) as site:
        archived = lambda: site.orthanc.get_json("/statistics")["CountInstances"] >= n  # noqa: E731
        pids = graph_processes(site)
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        started = time.perf_counter()
        ingest = send(site.listen_port, "DICOMFLOW", files, associations)
        wait_until(lambda: count(site.pacs_dir) >= n, "the PACS holds every object")
        pacs = time.perf_counter() - started
        # Polled as often as the PACS (each poll is one small GET to Orthanc): at 50 ms the
        # poll alone added ~25 ms on average to the routed time of a ~2 s run.
        wait_until(archived, "the archive holds every object")
        both = time.perf_counter() - started
        figures = {f"{prefix}ingest{suffix}_objects_per_s": n / ingest,
                   f"{prefix}pacs{suffix}_objects_per_s": n / pacs,
                   f"{prefix}routed{suffix}_objects_per_s": n / both}
        if associations > 1:
            return figures
        site.wait_lanes_idle(timeout=TIMEOUT_S)
        everything = time.perf_counter() - started
        # Where the CPU goes, per process: CPU milliseconds per routed object, from the
        # first C-STORE until every lane is idle (status polling included: about 5 runs of
        # `flow status` per second, each a process of its own, not counted here).
        figures[f"{prefix}cpu_ms_per_object"] = {
            name: round((cpu_seconds(pid) - cpu_before[name]) * 1000 / n, 2)
            for name, pid in pids.items()}
        assert site.flow is not None
        logs = site.flow.output()
    # Where an object's time goes at ingest: the listener's C-STORE handler (the arrival's
    # hand-over and the Store's sync commit round, i.e. commit-before-ack) against the whole
    # per-object cycle that storescu sees (the rest is pynetdicom's DIMSE exchange).
    handler_ms = [float(m) for m in re.findall(r"dimse\.stored .*?ms=([\d.]+)", logs)]
    return {**figures, f"{prefix}all_lanes_objects_per_s": n / everything,
            f"{prefix}ingest_ms_per_object": ingest * 1000 / n,
            f"{prefix}handler_ms_median":
                statistics.median(handler_ms) if handler_ms else float("nan")}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (from /proc)."""
    usage = proc_usage(pid)
    assert usage is not None, f"cannot read /proc/{pid}/stat"
    return usage[0]


def graph_processes(site: RadiologySite) -> dict[str, int]:
    """{process name: pid} of the running graph: the parent (``supervisor``) and its
    children from health.json, or ``main`` when it runs in one process."""
    assert site.flow is not None
    parent = site.flow.popen.pid
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            health = json.loads((site.data_dir / "health.json").read_text())
        except (OSError, ValueError):
            health = {}
        if health.get("pid") == parent:
            children = {p["process"]: p["pid"] for p in health.get("processes", [])}
            if not health.get("processes"):
                return {"main": parent}
            if all(children.values()):
                return {"supervisor": parent, **children}
        time.sleep(0.1)
    raise AssertionError("no health.json from the graph's parent")


def commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                          capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return done.stdout.strip() + ("+dirty" if dirty else "")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--objects", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="40 objects: a smoke run")
    parser.add_argument("--processes", default="auto",
                        help="[runtime] processes of the main dicomflow runs (default auto)")
    parser.add_argument("--workers", type=int, default=1,
                        help="[listen] workers of the 4-association run (default 1)")
    args = parser.parse_args()
    processes = args.processes if args.processes == "auto" else int(args.processes)
    n = 40 if args.quick else args.objects
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-route-") as tmp:
        work = Path(tmp)
        files = make_files(work / "study", n)
        baseline = direct(work, files)
        ceiling = bare_pynetdicom(work, files, 1)
        ceiling_4 = bare_pynetdicom(work, files, 4)
        orthanc_4 = orthanc_ingest(work, files, 4)
        router = orthanc_router(work, files)
        figures = {**routed(work, files, 1, processes=processes),
                   **routed(work, files, 4, processes=processes, workers=args.workers),
                   **routed(work, files, 1, processes=1, prefix="one_process_"),
                   **routed(work, files, 4, processes=1, prefix="one_process_")}
    r = lambda value: round(value, 3)  # noqa: E731
    print(json.dumps({
        "bench": "route", "objects": n, "object": "CT 64x64 explicit LE",
        "pacs": "storescp --fork", "commit": commit(), "cores": cores(),
        "processes": args.processes, "workers": args.workers,
        "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "baseline_dcmtk_direct_objects_per_s": round(baseline, 1),
        "ceiling_bare_pynetdicom_objects_per_s": round(ceiling, 1),
        "ceiling_bare_pynetdicom_4_assoc_objects_per_s": round(ceiling_4, 1),
        "baseline_orthanc_ingest_4_assoc_objects_per_s": round(orthanc_4, 1),
        "baseline_orthanc_lua_router_objects_per_s": round(router, 1),
        "ratio_ceiling_vs_direct": r(ceiling / baseline),
        **{k: round(v, 1) if isinstance(v, float) else v for k, v in figures.items()},
        "ratio_pacs_vs_direct": r(figures["pacs_objects_per_s"] / baseline),
        "ratio_ingest_vs_direct": r(figures["ingest_objects_per_s"] / baseline),
        "ratio_routed_vs_bare": r(figures["routed_objects_per_s"] / ceiling),
        "ratio_routed_vs_orthanc_router": r(figures["routed_objects_per_s"] / router),
        "ratio_ingest_4_assoc_vs_orthanc_ingest":
            r(figures["ingest_4_assoc_objects_per_s"] / orthanc_4),
        "ratio_routed_vs_one_process":
            r(figures["routed_objects_per_s"] / figures["one_process_routed_objects_per_s"]),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
