"""Instances/s into a real Orthanc through the STOW lane vs plain httpx, same run.

    .venv/bin/python bench/stow.py [--instances 400] [--repeat 3] [--tmpfs]

Lane: feed (in-memory deliveries) >> StowSender >> Orthanc, batch size 1, 10 and 50 (one
connection, like the baseline; plus 50 with 4 connections). Baseline: plain httpx posting
the same kind of files, the multipart bodies encoded before the clock starts, 50 per
request (and 1 per request for reference), measured before and after the lane runs. Each
run sends fresh SOP Instance UIDs (Orthanc answers a re-sent instance faster).

Where the time goes: for each lane run, ``request_share`` is the fraction of wall time spent
inside HTTP requests (from the sender's own ``stow.batch`` events); the rest is the lane's
overhead (batching, settling, the graph). ``cpu_us_per_instance`` is this process's CPU
time per instance (Orthanc runs in its own process), to compare with plain httpx.
``lane_batch_50_spool_files`` reads every payload from a file, as the Store's spool does.
There is no Store node on main yet, so the lane here starts at an in-memory feed: the
Store's read/decrypt and outcome commit are not measured. Prints ONE JSON line.
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
from nodes.payload import FilePayload  # noqa: E402
from nodes.stow import StowConfig, StowSender, encode_multipart  # noqa: E402
from nodes.stow.multipart import content_type, new_boundary  # noqa: E402
from support.orthanc import OrthancServer  # noqa: E402
from stow_harness import deliveries, envelope_of, run_sender  # noqa: E402
from support.synth import ct, to_part10  # noqa: E402


def make_files(n: int) -> list[bytes]:
    return [to_part10(ct(instance_number=i + 1)) for i in range(n)]


async def baseline(url: str, files: list[bytes], per_request: int) -> float:
    boundary = new_boundary()
    bodies = [encode_multipart(files[i:i + per_request], boundary)
              for i in range(0, len(files), per_request)]
    headers = {"Content-Type": content_type(boundary), "Accept": "application/dicom+json"}
    async with httpx.AsyncClient(timeout=60) as client:
        start, cpu = time.perf_counter(), time.process_time()
        for body in bodies:
            r = await client.post(url + "/studies", content=body, headers=headers)
            assert r.status_code == 200, r.status_code
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"per_s": len(files) / elapsed, "cpu_us_per_instance": cpu / len(files) * 1e6}


class _BatchTimes(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.ms = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "stow.batch":
            self.ms += record.fields.get("ms", 0)  # type: ignore[attr-defined]


async def lane(url: str, files: list[bytes], batch: int, connections: int,
               spool: Path | None = None) -> dict:
    cfg = StowConfig(url=url, timeout_ms=60_000, batch_max_instances=batch, linger_ms=20,
                     max_connections=connections)
    if spool is None:
        items = deliveries(Recorder(), files)
    else:  # payloads read from spool files, as the Store hands out large objects
        spool.mkdir(exist_ok=True)
        paths = []
        for i, f in enumerate(files):
            paths.append(spool / f"{i}.dcm")
            paths[-1].write_bytes(f)
        items = deliveries(Recorder(), [(envelope_of(f), FilePayload(p))
                                        for f, p in zip(files, paths)])
    handler = _BatchTimes()
    log = logging.getLogger("nodes.stow")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        sender = StowSender(cfg)
        await sender.open()  # the pool (and its TLS context, ~20 ms) is built outside the
        # clock, like the baseline's client
        start, cpu = time.perf_counter(), time.process_time()
        await run_sender(cfg, items, sender=sender)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        log.removeHandler(handler)
    assert all(i.outcome == Delivered() for i in items), {repr(i.outcome) for i in items}
    out = {"per_s": len(files) / elapsed, "cpu_us_per_instance": cpu / len(files) * 1e6}
    if connections == 1:
        out["request_share"] = round(handler.ms / 1000 / elapsed, 3)
    return out


async def main(n: int, repeat: int, tmpfs: bool) -> dict:
    where = "/dev/shm" if tmpfs else None
    with tempfile.TemporaryDirectory(prefix="bench-stow-", dir=where) as tmp, \
            OrthancServer(Path(tmp) / "orthanc") as orthanc:
        url = orthanc.dicomweb
        await baseline(url, make_files(20), 10)  # warm-up
        results: dict[str, list] = {}
        ratios: dict[str, list[float]] = {}
        spools = iter(range(1_000_000))

        def add(key, value):
            results.setdefault(key, []).append(value)
            return value["per_s"]

        # Orthanc slows down as its index grows, and runs are noisy: each lane figure is
        # compared with the baselines measured right before and after it.
        for _ in range(repeat):
            b50 = add("baseline_httpx_50", await baseline(url, make_files(n), 50))
            l50 = add("lane_batch_50", await lane(url, make_files(n), 50, 1))
            l10 = add("lane_batch_10", await lane(url, make_files(n), 10, 1))
            sp = add("lane_batch_50_spool_files",
                     await lane(url, make_files(n), 50, 1, spool=Path(tmp) / f"s{next(spools)}"))
            b50b = add("baseline_httpx_50", await baseline(url, make_files(n), 50))
            l1 = add("lane_batch_1", await lane(url, make_files(n), 1, 1))
            b1 = add("baseline_httpx_1", await baseline(url, make_files(n), 1))
            add("lane_batch_50_4conn", await lane(url, make_files(n), 50, 4))
            mean50 = (b50 + b50b) / 2
            for key, value in (("lane_batch_50", l50), ("lane_batch_10", l10),
                               ("lane_batch_50_spool_files", sp)):
                ratios.setdefault(f"{key}_vs_baseline_50", []).append(value / mean50)
            ratios.setdefault("lane_batch_1_vs_baseline_1", []).append(l1 / b1)
    size = len(make_files(1)[0])
    figures: dict = {"bench": "stow", "instances_per_run": n, "instance_bytes": size,
                     "repeat": repeat, "orthanc": "1.10.1 + DICOMweb 1.7, loopback",
                     "orthanc_storage": "tmpfs" if tmpfs else "disk",
                     "cpus": os.cpu_count()}
    for key, values in results.items():
        figures[key] = {name: round(statistics.median(v[name] for v in values), 3 if
                                    name == "request_share" else 1)
                        for name in values[0]}
    for key, values in ratios.items():
        figures[key] = round(statistics.median(values), 3)
    figures["target"] = "lane_batch_50_vs_baseline_50 >= 0.9"
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=400)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tmpfs", action="store_true",
                        help="keep Orthanc's storage in /dev/shm (less disk noise)")
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.WARNING)
    print(json.dumps(trio.run(main, args.instances, args.repeat, args.tmpfs)))
