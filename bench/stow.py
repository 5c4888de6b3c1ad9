"""Instances/s into a real Orthanc through the STOW lane behind the Store vs plain httpx.

    .venv/bin/python bench/stow.py [--instances 400] [--repeat 3] [--tmpfs]

Lane: the instances are first committed into a real Store (LMDB in a temp data dir on disk,
AES-256-GCM at rest, one group commit: ``store_commit`` below), then the clock starts and the
graph ``feeder >> Store >> {"archive": StowSender}`` runs: the lane's pump claims queued items
(a sync commit), decrypts them, the sender batches them into multipart requests, and every
outcome is committed back (sync, group commit) before the run counts as done. Batch size 1,
10 and 50 on one connection (like the baseline), plus 50 on 4 connections, plus 50 with every
object in an encrypted spool file (``spool_threshold_kb = 0``: streamed and decrypted in 1 MiB
chunks, as large objects are). Baseline: plain httpx posting the same kind of files, the
multipart bodies encoded before the clock starts, 50 per request (and 1 per request), measured
right before and after the lane runs it is compared with (Orthanc slows as its index grows).
Each run sends fresh SOP Instance UIDs (Orthanc answers a re-sent instance faster).

Where the time goes (``where`` of each lane run, seconds of wall time unless noted):
``requests`` — inside HTTP requests (the sender's ``stow.batch`` events: body streaming incl.
multipart framing, Orthanc's work, reading the response); ``request_share`` — that over the
wall time (one connection; the rest is the lane's own: Store, batching, settling);
``before_first_request`` / ``after_last_request`` — pipeline fill and drain; ``claim`` — the
pump's claims: due lookup, claim commit, reading and decrypting the claimed objects;
``decrypt_thread`` — of which reading + decrypting in the worker thread; ``settle`` — outcome
commits awaited by the sender (they overlap the next request: the connection is free before
the batch settles); ``commits`` / ``commit_thread`` — sync LMDB commits in the run and their
worker-thread time (overlapping calls count once). ``cpu_us_per_instance`` is this process's
CPU (all threads) per instance and ``cpu_main_thread_us_per_instance`` the Trio thread's
share; Orthanc runs in its own process, on the same 2 cores. Prints ONE JSON line.
"""

from __future__ import annotations

import argparse
import functools
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

from nodes.store import Store, StoreConfig  # noqa: E402
from nodes.stow import StowConfig, StowSender, encode_multipart  # noqa: E402
from nodes.stow.multipart import content_type, new_boundary  # noqa: E402
from stow_harness import arrivals, preload, store_graph  # noqa: E402
from support.orthanc import OrthancServer  # noqa: E402
from support.synth import ct, to_part10  # noqa: E402

LANE = "archive"


def make_files(n: int) -> list[bytes]:
    return [to_part10(ct(instance_number=i + 1)) for i in range(n)]


async def baseline(url: str, files: list[bytes], per_request: int) -> dict:
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


class _Batches(logging.Handler):
    """Counts delivered instances and request time from the sender's ``stow.batch`` events;
    ``done`` is set once ``expected`` instances were settled (outcomes committed)."""

    def __init__(self, expected: int) -> None:
        super().__init__(logging.INFO)
        self.expected = expected
        self.delivered = 0
        self.ms = 0.0
        self.done = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "stow.batch":
            fields = record.fields  # type: ignore[attr-defined]
            self.ms += fields.get("ms", 0)
            self.delivered += fields.get("delivered", 0)
            if self.delivered >= self.expected:
                self.done.set()


class _Timer:
    """Wall time during which at least one call of a wrapped callable was running, per
    name (overlapping calls, e.g. a batch's outcomes settling together, count once)."""

    def __init__(self) -> None:
        self.s: dict[str, float] = {}
        self._active: dict[str, int] = {}
        self._since: dict[str, float] = {}

    def _enter(self, name: str) -> None:
        if not self._active.get(name):
            self._since[name] = time.perf_counter()
        self._active[name] = self._active.get(name, 0) + 1

    def _exit(self, name: str) -> None:
        self._active[name] -= 1
        if not self._active[name]:
            self.s[name] = self.s.get(name, 0.0) + time.perf_counter() - self._since[name]

    def wrap_async(self, name: str, fn):
        @functools.wraps(fn)
        async def timed(*a, **kw):
            self._enter(name)
            try:
                return await fn(*a, **kw)
            finally:
                self._exit(name)
        return timed

    def wrap_sync(self, name: str, fn):
        # Used for worker-thread work that runs one call at a time (the Store's commit
        # rounds, the pump's reads), so the counters need no lock.
        @functools.wraps(fn)
        def timed(*a, **kw):
            self._enter(name)
            try:
                return fn(*a, **kw)
            finally:
                self._exit(name)
        return timed


class TimedStore(Store):
    """The real Store, with its claim and outcome paths timed (bench only)."""

    def __init__(self, *a, timer: _Timer, **kw) -> None:
        super().__init__(*a, **kw)
        self.timer = timer

    async def claim(self, lane, limit):
        return await self.timer.wrap_async("claim", super().claim)(lane, limit)

    async def open(self) -> None:
        await super().open()
        ledger, committer = self.ledger, self.committer
        ledger.settle = self.timer.wrap_async("settle", ledger.settle)
        ledger._build = self.timer.wrap_sync("decrypt_thread", ledger._build)
        committer._commit = self.timer.wrap_sync("commit_thread", committer._commit)


class TimedSender(StowSender):
    """The real sender, noting when its first request started and its last one ended."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.first_start: float | None = None
        self.last_end = 0.0

    async def _post(self, ctx, client, batch):
        if self.first_start is None:
            self.first_start = time.perf_counter()
        try:
            return await super()._post(ctx, client, batch)
        finally:
            self.last_end = max(self.last_end, time.perf_counter())


async def lane(url: str, files: list[bytes], batch: int, connections: int, data_dir: Path,
               *, spooled: bool = False) -> dict:
    config = StoreConfig(min_free_disk_mb=0, spool_threshold_kb=0 if spooled else 256)
    items = arrivals(files)
    ingest_s = await preload(data_dir, [LANE], items, config)
    cfg = StowConfig(url=url, timeout_ms=60_000, batch_max_instances=batch, linger_ms=20,
                     max_connections=connections)
    timer = _Timer()
    store = TimedStore(data_dir, config, timer=timer)
    sender = TimedSender(cfg)
    batches = _Batches(len(files))
    log = logging.getLogger("nodes.stow")
    log.addHandler(batches)
    log.setLevel(logging.INFO)
    try:
        # LMDB, the key and the connection pool (its TLS context, ~20 ms) are opened outside
        # the clock, like the baseline's client; the runner's open() finds them open.
        await store.open()
        await sender.open()
        commits0 = store.stats["commits"]
        start, cpu, main_cpu = time.perf_counter(), time.process_time(), time.thread_time()
        async with store_graph(store, {LANE: sender}, [url]) as _:
            with trio.fail_after(600):
                await batches.done.wait()
            end = time.perf_counter()
            elapsed, cpu = end - start, time.process_time() - cpu
            main_cpu = time.thread_time() - main_cpu
            commits = store.stats["commits"] - commits0
    finally:
        log.removeHandler(batches)
    figures = store.report()["lanes"][LANE]  # from LMDB, after the graph stopped
    assert figures["delivered"] == len(files), figures
    out = {"per_s": len(files) / elapsed, "cpu_us_per_instance": cpu / len(files) * 1e6,
           "cpu_main_thread_us_per_instance": main_cpu / len(files) * 1e6,
           "store_commit_per_s": len(files) / ingest_s}
    if connections == 1:  # the rest of the wall time is the lane's own (Store, batching)
        out["request_share"] = batches.ms / 1000 / elapsed
    return {**out,
            "where": {"wall": elapsed, "requests": batches.ms / 1000,
                      "before_first_request": sender.first_start - start,
                      "after_last_request": end - sender.last_end, **timer.s,
                      "commits": commits}}


def _median(values: list[dict]) -> dict:
    out = {}
    for name in values[0]:
        if isinstance(values[0][name], dict):
            out[name] = _median([v[name] for v in values])
        else:
            digits = 1 if name in ("per_s", "cpu_us_per_instance", "store_commit_per_s",
                                   "cpu_main_thread_us_per_instance", "commits") else 3
            out[name] = round(statistics.median(v[name] for v in values), digits)
    return out


async def main(n: int, repeat: int, tmpfs: bool) -> dict:
    where = "/dev/shm" if tmpfs else None
    with tempfile.TemporaryDirectory(prefix="bench-stow-orthanc-", dir=where) as otmp, \
            tempfile.TemporaryDirectory(prefix="bench-stow-store-") as stmp, \
            OrthancServer(Path(otmp) / "orthanc") as orthanc:
        url = orthanc.dicomweb
        await baseline(url, make_files(20), 10)  # warm-up
        results: dict[str, list] = {}
        ratios: dict[str, list[float]] = {}
        dirs = (Path(stmp) / f"data{i}" for i in range(1_000_000))

        def add(key, value):
            results.setdefault(key, []).append(value)
            return value["per_s"]

        for _ in range(repeat):
            b50 = add("baseline_httpx_50", await baseline(url, make_files(n), 50))
            l50 = add("lane_batch_50", await lane(url, make_files(n), 50, 1, next(dirs)))
            l10 = add("lane_batch_10", await lane(url, make_files(n), 10, 1, next(dirs)))
            sp = add("lane_batch_50_spooled",
                     await lane(url, make_files(n), 50, 1, next(dirs), spooled=True))
            b50b = add("baseline_httpx_50", await baseline(url, make_files(n), 50))
            l1 = add("lane_batch_1", await lane(url, make_files(n), 1, 1, next(dirs)))
            b1 = add("baseline_httpx_1", await baseline(url, make_files(n), 1))
            add("lane_batch_50_4conn", await lane(url, make_files(n), 50, 4, next(dirs)))
            mean50 = (b50 + b50b) / 2
            for key, value in (("lane_batch_50", l50), ("lane_batch_10", l10),
                               ("lane_batch_50_spooled", sp)):
                ratios.setdefault(f"{key}_vs_baseline_50", []).append(value / mean50)
            ratios.setdefault("lane_batch_1_vs_baseline_1", []).append(l1 / b1)
    size = len(make_files(1)[0])
    figures: dict = {"bench": "stow", "instances_per_run": n, "instance_bytes": size,
                     "repeat": repeat, "orthanc": "1.10.1 + DICOMweb 1.7, loopback",
                     "orthanc_storage": "tmpfs" if tmpfs else "disk",
                     "store": "LMDB sync + AES-256-GCM, data dir on disk",
                     "cpus": os.cpu_count()}
    for key, values in results.items():
        figures[key] = _median(values)
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
