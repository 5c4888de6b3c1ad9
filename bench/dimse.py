"""Objects/s and MB/s through the DIMSE lane vs DCMTK and bare pynetdicom, in one run.

    .venv/bin/python bench/dimse.py [--small 300] [--large 60] [--nagle-share 0.25] [--quick]

Scenarios (every sender is a DCMTK ``storescu`` process sending its share of the objects on
one association; 1 and 4 senders at once):

- **a** ``storescu → storescp`` direct (storescp writes bit-preserved files to disk);
- **b** ``storescu → bare pynetdicom SCP`` (a separate process; its C-STORE handler keeps
  each encoded data set in memory and answers 0x0000; TCP_NODELAY set like ours);
- **c** ``storescu → DicomListener → Store``: commit-before-ack (LMDB sync, group commit,
  AES-256-GCM at rest) — the Store has no lanes, so only ingest is measured;
- **d** ``storescu → DicomListener → Store → CStoreSender → storescp``: the clock stops when
  storescp has written every object (end to end).

Objects: small (64×64, ~8 KB) and CT-sized (512×512, ~512 KB), explicit VR little endian.
Every case runs with and without ``TCP_NODELAY=1`` in DCMTK's environment (Debian's DCMTK
leaves Nagle on unless that variable is set; dicomflow always sets TCP_NODELAY on its own
sockets). dicomflow runs in this process (its pynetdicom threads and the Trio loop); the
DCMTK peers and the bare SCP are child processes. Ratios: ``c/b`` (what durability costs
against pynetdicom's own ceiling) and ``d/a`` (the whole lane against DCMTK alone), per
size × senders × Nagle setting, plus the headline at 4 senders with TCP_NODELAY=1.
Prints ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests"), str(ROOT / "tests" / "nodes" / "dimse")]

import trio  # noqa: E402

from dimse_support import listen_config, pacs_config, running  # noqa: E402
from nodes.dimse import CStoreSender, DicomListener  # noqa: E402
from nodes.store import Store, StoreConfig  # noqa: E402
from support.peers import free_port, wait_for_port  # noqa: E402
from support.synth import ct, write  # noqa: E402

STORESCU = shutil.which("storescu") or "/usr/bin/storescu"
STORESCP = shutil.which("storescp") or "/usr/bin/storescp"

BARE_SCP = r"""
import socket, sys
from pynetdicom import AE, AllStoragePresentationContexts, evt, _config
_config.LOG_HANDLER_LEVEL = "none"
kept = []
def on_store(event):
    kept.append(event.encoded_dataset(include_meta=False))
    return 0x0000
def nodelay(event):
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
ae = AE("BARE")
ae.supported_contexts = AllStoragePresentationContexts
ae.maximum_pdu_size = 131072
ae.maximum_associations = 16
ae.start_server(("127.0.0.1", int(sys.argv[1])), block=True,
                evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_CONN_OPEN, nodelay)])
"""


def make_objects(directory: Path, count: int, rows: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    return [write(ct(rows=rows, cols=rows, instance_number=i + 1), directory / f"{i:05d}.dcm")
            for i in range(count)]


def split(files: list[Path], senders: int) -> list[list[Path]]:
    return [files[i::senders] for i in range(senders)]


def dcmtk_env(nodelay: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TCP_NODELAY", None)
    if nodelay:
        env["TCP_NODELAY"] = "1"
    return env


def start_senders(port: int, called: str, groups: list[list[Path]], env: dict[str, str]
                  ) -> list[subprocess.Popen]:
    # -xe: explicit VR LE first, which is what the files are in: nobody converts anything.
    return [subprocess.Popen([STORESCU, "-xe", "-aet", "MODALITY", "-aec", called,
                              "127.0.0.1", str(port), *map(str, group)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
            for group in groups]


def wait_senders(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-400:]}")


class Storescp:
    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        self.directory, self.port = directory, free_port()
        directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([STORESCP, "-aet", "PACS", "-od", str(directory), "+B",
                                      "--fork", "-pdu", "131072", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=env, start_new_session=True)
        wait_for_port(self.port)

    def count(self) -> int:
        return sum(1 for p in self.directory.iterdir() if not p.name.startswith("."))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def case_a(files, senders, nodelay, work: Path) -> float:
    scp = Storescp(work / "a", dcmtk_env(nodelay))
    try:
        start = time.perf_counter()
        wait_senders(start_senders(scp.port, "PACS", split(files, senders), dcmtk_env(nodelay)))
        while scp.count() < len(files):
            time.sleep(0.002)
        return time.perf_counter() - start
    finally:
        scp.stop()


def case_b(files, senders, nodelay, work: Path) -> float:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", BARE_SCP, str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_for_port(port)
        time.sleep(0.3)  # let the probe connection above time out of the way
        start = time.perf_counter()
        wait_senders(start_senders(port, "BARE", split(files, senders), dcmtk_env(nodelay)))
        return time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(10)


def case_cd(files, senders, nodelay, work: Path, *, end_to_end: bool) -> float:
    async def main() -> float:
        listener = DicomListener(listen_config(max_associations=16))
        store = Store(work / ("d" if end_to_end else "c") / "data",
                      StoreConfig(min_free_disk_mb=0, map_size_mb=8192))
        scp = Storescp(work / "d" / "pacs", dcmtk_env(nodelay)) if end_to_end else None
        try:
            if scp is not None:
                pipeline = listener >> store >> {"pacs": CStoreSender(pacs_config(
                    scp.port, max_associations=4, idle_release_ms=2000))}
                egress = [f"127.0.0.1:{scp.port}"]
            else:
                pipeline, egress = listener >> store, []
            async with running(pipeline, listener=listener, egress=egress, deadline=30):
                port = listener.address[1]
                start = time.perf_counter()
                procs = start_senders(port, "DICOMFLOW", split(files, senders),
                                      dcmtk_env(nodelay))
                await trio.to_thread.run_sync(wait_senders, procs)
                if scp is not None:
                    while scp.count() < len(files):
                        await trio.sleep(0.002)
                return time.perf_counter() - start
        finally:
            if scp is not None:
                scp.stop()

    return trio.run(main)


def run(args) -> dict:
    logging.disable(logging.WARNING)  # per-object log lines are the tests' business, not timed here
    results = []
    ratios = {}
    sizes = [("small", 64, args.small), ("ct512", 512, args.large)]
    with tempfile.TemporaryDirectory(prefix="bench-dimse-", dir=args.dir) as tmp:
        base = Path(tmp)
        for size_name, rows, count in sizes:
            all_files = make_objects(base / f"objects-{size_name}", count, rows)
            for senders in (1, 4):
                for nodelay in (False, True):
                    # With Nagle on, DCMTK alone crawls (~40 ms per object): fewer objects.
                    n = count if nodelay else max(senders * 5, int(count * args.nagle_share))
                    files, mb = all_files[:n], sum(p.stat().st_size for p in all_files[:n]) / 1e6
                    row = {"size": size_name, "senders": senders, "dcmtk_tcp_nodelay": nodelay,
                           "objects": n}
                    for name in "abcd":
                        work = base / f"{size_name}-{senders}-{nodelay}-{name}"
                        if name == "a":
                            seconds = case_a(files, senders, nodelay, work)
                        elif name == "b":
                            seconds = case_b(files, senders, nodelay, work)
                        else:
                            seconds = case_cd(files, senders, nodelay, work,
                                              end_to_end=name == "d")
                        shutil.rmtree(work, ignore_errors=True)
                        row[name] = {"objects_s": round(n / seconds, 1),
                                     "mb_s": round(mb / seconds, 1)}
                    row["c/b"] = round(row["c"]["objects_s"] / row["b"]["objects_s"], 2)
                    row["d/a"] = round(row["d"]["objects_s"] / row["a"]["objects_s"], 2)
                    ratios[f"{size_name}/{senders}/{'nodelay' if nodelay else 'nagle'}"] = {
                        "c/b": row["c/b"], "d/a": row["d/a"]}
                    results.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    headline = {k: v for k, v in ratios.items() if k.endswith("/4/nodelay")}
    return {"bench": "dimse", "cpus": os.cpu_count(), "results": results, "ratios": ratios,
            "headline_4_senders_nodelay": headline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=300, help="64×64 objects per case")
    parser.add_argument("--large", type=int, default=60, help="512×512 objects per case")
    parser.add_argument("--nagle-share", type=float, default=0.25,
                        help="share of the objects sent in the Nagle-on cases (default 0.25)")
    parser.add_argument("--quick", action="store_true", help="100 small, 20 large")
    parser.add_argument("--dir", default=None, help="where temp data goes (default: system)")
    args = parser.parse_args()
    if args.quick:
        args.small, args.large = 100, 20
    print(json.dumps(run(args)))


if __name__ == "__main__":
    main()
