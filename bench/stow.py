"""Instances/s into a real Orthanc through the STOW lane vs plain httpx, same run.

    .venv/bin/python bench/stow.py [--instances 400] [--repeat 2]

Lane: feed (in-memory deliveries) >> StowSender >> Orthanc, batch size 1, 10 and 50 (one
connection, like the baseline; plus 50 with 4 connections). Baseline: plain httpx posting
the same kind of files, the multipart bodies encoded before the clock starts, 50 per
request (and 1 per request for reference), measured before and after the lane runs. Each
run sends fresh SOP Instance UIDs (Orthanc answers a re-sent instance faster).

Where the time goes: for each lane run, ``request_share`` is the fraction of wall time spent
inside HTTP requests (from the sender's own ``stow.batch`` events); the rest is the lane's
overhead (batching, settling, the graph). Prints ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests"), str(ROOT / "tests" / "nodes" / "stow")]

import httpx  # noqa: E402
import trio  # noqa: E402

from nodes.delivery import Recorder  # noqa: E402
from nodes.outcome import Delivered  # noqa: E402
from nodes.stow import StowConfig, encode_multipart  # noqa: E402
from nodes.stow.multipart import content_type, new_boundary  # noqa: E402
from orthanc import OrthancServer  # noqa: E402
from stow_harness import deliveries, run_sender  # noqa: E402
from support.synth import ct, to_part10  # noqa: E402


def make_files(n: int) -> list[bytes]:
    return [to_part10(ct(instance_number=i + 1)) for i in range(n)]


async def baseline(url: str, files: list[bytes], per_request: int) -> float:
    boundary = new_boundary()
    bodies = [encode_multipart(files[i:i + per_request], boundary)
              for i in range(0, len(files), per_request)]
    headers = {"Content-Type": content_type(boundary), "Accept": "application/dicom+json"}
    async with httpx.AsyncClient(timeout=60) as client:
        start = time.perf_counter()
        for body in bodies:
            r = await client.post(url + "/studies", content=body, headers=headers)
            assert r.status_code == 200, r.status_code
        elapsed = time.perf_counter() - start
    return len(files) / elapsed


class _BatchTimes(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.ms = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "stow.batch":
            self.ms += record.fields.get("ms", 0)  # type: ignore[attr-defined]


async def lane(url: str, files: list[bytes], batch: int, connections: int) -> dict:
    cfg = StowConfig(url=url, timeout_ms=60_000, batch_max_instances=batch, linger_ms=20,
                     max_connections=connections)
    items = deliveries(Recorder(), files)
    handler = _BatchTimes()
    log = logging.getLogger("nodes.stow")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        start = time.perf_counter()
        await run_sender(cfg, items)
        elapsed = time.perf_counter() - start
    finally:
        log.removeHandler(handler)
    assert all(i.outcome == Delivered() for i in items), {repr(i.outcome) for i in items}
    out = {"per_s": len(files) / elapsed}
    if connections == 1:
        out["request_share"] = round(handler.ms / 1000 / elapsed, 3)
    return out


async def main(n: int, repeat: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-stow-") as tmp, \
            OrthancServer(Path(tmp) / "orthanc") as orthanc:
        url = orthanc.dicomweb
        await baseline(url, make_files(20), 10)  # warm-up
        results: dict[str, list] = {}

        def add(key, value):
            results.setdefault(key, []).append(value)

        for _ in range(repeat):
            add("baseline_httpx_50", await baseline(url, make_files(n), 50))
            add("baseline_httpx_1", await baseline(url, make_files(n), 1))
            for batch in (1, 10, 50):
                add(f"lane_batch_{batch}", await lane(url, make_files(n), batch, 1))
            add("lane_batch_50_4conn", await lane(url, make_files(n), 50, 4))
            add("baseline_httpx_50", await baseline(url, make_files(n), 50))
    size = len(make_files(1)[0])
    figures: dict = {"bench": "stow", "instances_per_run": n, "instance_bytes": size,
                     "repeat": repeat, "orthanc": "1.10.1 + DICOMweb 1.7, loopback"}
    for key, values in results.items():
        if isinstance(values[0], dict):
            figures[key] = {"per_s": round(statistics.median(v["per_s"] for v in values), 1)}
            shares = [v["request_share"] for v in values if "request_share" in v]
            if shares:
                figures[key]["request_share"] = round(statistics.median(shares), 3)
        else:
            figures[key] = {"per_s": round(statistics.median(values), 1)}
    base = figures["baseline_httpx_50"]["per_s"]
    figures["lane_batch_50_vs_baseline_50"] = round(figures["lane_batch_50"]["per_s"] / base, 3)
    figures["target"] = ">= 0.9x baseline_httpx_50"
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=400)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.WARNING)
    print(json.dumps(trio.run(main, args.instances, args.repeat)))
