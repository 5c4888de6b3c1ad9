"""End-to-end routing through the flagship graph vs DCMTK direct, same run.

    .venv/bin/python bench/route.py [--objects 200]

Baseline: ``storescu`` → ``storescp`` direct (one association, small 64×64 CT objects).
Figure: ``storescu`` → ``flow graphs/radiology.py`` (listener, Store with commit-before-ack,
lanes pacs → storescp, archive → Orthanc, ris → MLLP) measured three ways: ingest (until
storescu has every Success), pacs (until storescp holds every object) and all lanes (until
``flow status`` shows nothing queued). DCMTK runs with TCP_NODELAY=1 on both sides of both
runs. ``ceiling_bare_pynetdicom_objects_per_s``: the same storescu into a bare pynetdicom SCP
that only keeps each data set in memory, the most any listener built on pynetdicom can
ingest from one association (``ratio_ceiling_vs_direct`` against DCMTK direct). ``ingest_ms_per_object`` against ``handler_ms_median`` (the listener's C-STORE handler:
hand-over to the Store and its sync commit round, from the flow process's log) says where the
time of one object goes; the rest is pynetdicom's DIMSE exchange and storescu. Prints ONE
JSON line.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
os.environ["TCP_NODELAY"] = "1"  # DCMTK: Nagle off, as dicomflow does on its own sockets

from support.peers import Process, free_port, need, wait_for_port  # noqa: E402
from support.site import RadiologySite  # noqa: E402
from support.synth import ct, write  # noqa: E402


def make_files(directory: Path, n: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    study = "1.2.826.0.1.3680043.8.498.77.9"
    return [write(ct(study_uid=study, instance_number=i + 1), directory / f"{i:05}.dcm")
            for i in range(n)]


def storescu(port: int, files: list[Path]) -> float:
    started = time.perf_counter()
    subprocess.run([need("storescu")["storescu"], "-aet", "MODALITY", "-aec", "DICOMFLOW",
                    "127.0.0.1", str(port), *map(str, files)], check=True,
                   capture_output=True, timeout=600)
    return time.perf_counter() - started


def direct(work: Path, files: list[Path]) -> float:
    port, out = free_port(), work / "direct"
    out.mkdir()
    with Process([need("storescp")["storescp"], "--aetitle", "DICOMFLOW", "+B",
                  "--output-directory", str(out), str(port)], log=work / "direct.log"):
        wait_for_port(port)
        seconds = storescu(port, files)
        while len(list(out.iterdir())) < len(files):
            time.sleep(0.01)
    return len(files) / seconds


def bare_pynetdicom(work: Path, files: list[Path]) -> float:
    """The ceiling of any pynetdicom listener: storescu → a bare pynetdicom SCP in its own
    process that keeps each data set in memory (bench/dimse.py's case b), same objects."""
    from dimse import BARE_SCP  # bench/dimse.py

    port = free_port()
    with Process([sys.executable, "-c", BARE_SCP, str(port)], log=work / "bare.log"):
        wait_for_port(port)
        time.sleep(0.3)  # let the probe connection above time out of the way
        seconds = storescu(port, files)
    return len(files) / seconds


def routed(work: Path, files: list[Path]) -> dict[str, float]:
    n = len(files)
    with RadiologySite(work / "site") as site:
        started = time.perf_counter()
        site.send(files)
        ingest = time.perf_counter() - started
        while len(list(site.pacs_dir.iterdir())) < n:
            time.sleep(0.01)
        pacs = time.perf_counter() - started
        site.wait_lanes_idle(timeout=600)
        everything = time.perf_counter() - started
        assert site.flow is not None
        logs = site.flow.output()
    # Where an object's time goes at ingest: the listener's C-STORE handler (the arrival's
    # hand-over and the Store's sync commit round, i.e. commit-before-ack) against the whole
    # per-object cycle that storescu sees (the rest is pynetdicom's DIMSE exchange).
    handler_ms = [float(m) for m in re.findall(r"dimse\.stored .*?ms=([\d.]+)", logs)]
    return {"ingest_objects_per_s": n / ingest, "pacs_objects_per_s": n / pacs,
            "all_lanes_objects_per_s": n / everything,
            "ingest_ms_per_object": ingest * 1000 / n,
            "handler_ms_median": statistics.median(handler_ms) if handler_ms else float("nan")}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--objects", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-route-") as tmp:
        work = Path(tmp)
        files = make_files(work / "study", args.objects)
        baseline = direct(work, files)
        ceiling = bare_pynetdicom(work, files)
        figures = routed(work, files)
    print(json.dumps({
        "bench": "route", "objects": args.objects, "object": "CT 64x64 explicit LE",
        "baseline_dcmtk_direct_objects_per_s": round(baseline, 1),
        "ceiling_bare_pynetdicom_objects_per_s": round(ceiling, 1),
        "ratio_ceiling_vs_direct": round(ceiling / baseline, 3),
        **{k: round(v, 1) for k, v in figures.items()},
        "ratio_pacs_vs_direct": round(figures["pacs_objects_per_s"] / baseline, 3),
        "ratio_ingest_vs_direct": round(figures["ingest_objects_per_s"] / baseline, 3),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
