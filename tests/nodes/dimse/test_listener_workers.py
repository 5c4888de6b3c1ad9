"""``[listen] workers``: several ingest processes on one port (SO_REUSEPORT), issue 16.

Real processes (tests/nodes/dimse/ingest_worker.py: the listener's lane of one graph,
placed as a replica), real storescu, one Store data dir and one spool dir shared by the
processes, as the multi-process runtime runs them.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trio
from pydicom.uid import generate_uid
from pynetdicom.acse import ACSE

from flow import ConfigError, Graph, Placement, Runner
from flow._config import convert
from nodes.dimse import DicomListener, ListenConfig, _pynetdicom
from nodes.dimse._pynetdicom import SpillFile, sweep_spill_files
from nodes.store import Store, StoreConfig
from support.flowproc import FlowProcess
from support.peers import Process, free_port, need
from support.synth import CANARY_ID, CANARY_PARTS, ct, large_ct, write

sys.path.insert(0, os.path.dirname(__file__))
from dimse_support import Committer, listen_config, storescu, write_site  # noqa: E402

WORKER = Path(__file__).with_name("ingest_worker.py")
NODELAY = {"TCP_NODELAY": "1"}  # DCMTK: no ~40 ms delayed-ACK wait per C-STORE
STORED = re.compile(r"dimse\.stored .*sop_instance_uid=([0-9.]+)")


class Worker(Process):
    """One ingest process (replica ``replica`` of ``replicas``), stopped by its pid."""

    def __init__(self, directory: Path, port: int, replica: int, replicas: int = 2, *,
                 generation: int = 0) -> None:
        self.replica = replica
        super().__init__([sys.executable, str(WORKER), str(port), str(directory / "data"),
                          str(directory / "spool"), str(replica), str(replicas)],
                         env={**os.environ, "PYTHONUNBUFFERED": "1"},
                         log=directory / f"ingest-{replica}.{generation}.log")

    def wait_for(self, pattern: str, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if re.search(pattern, self.output()):
                return
            assert self.alive(), f"worker {self.replica} exited:\n{self.output()}"
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} from worker {self.replica}:\n{self.output()}")

    def stored(self) -> list[str]:
        return STORED.findall(self.output())

    def associations(self) -> int:
        return len(re.findall(r"dimse\.association ", self.output()))


def _start(directory: Path, port: int, replicas: int = 2) -> list[Worker]:
    workers = []
    for replica in range(replicas):  # one after the other: the first creates the data dir
        workers.append(Worker(directory, port, replica, replicas))
        workers[-1].wait_for("dimse.listening")
    return workers


def _objects(directory: Path, count: int) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    out = {}
    for i in range(count):
        ds = ct(study_uid=study_uid, series_uid=series_uid, instance_number=i + 1)
        out[str(ds.SOPInstanceUID)] = write(ds, directory / f"ct{i:02d}.dcm")
    return out


def _committed(data_dir: Path, uids) -> set[str]:
    """The UIDs of ``uids`` that the Store in ``data_dir`` holds (read once the workers
    stopped)."""
    store = Store(data_dir, StoreConfig(min_free_disk_mb=0))

    async def read() -> set[str]:
        await store.open()
        try:
            return {uid for uid in uids if (store.trace(uid) or {}).get("stored")}
        finally:
            await store.close()

    return trio.run(read)


def _no_phi(*workers: Worker) -> None:
    for worker in workers:
        text = worker.output()
        for part in (*CANARY_PARTS, CANARY_ID):
            assert part not in text, f"PHI in worker {worker.replica}'s log"


@pytest.mark.peer("dcmtk")
def test_two_workers_share_the_port_and_commit_every_object_once(tmp_path):
    """16 storescu runs (16 associations, each from a new source port) to one port served by
    two processes: every object is answered Success and committed exactly once, into the
    one data dir, and both processes served associations. The kernel picks the process by a
    hash of each connection's addresses and ports, so all 16 land on the same one with
    probability 2 x (1/2)^16, about 3 in 100,000."""
    port = free_port()
    files = _objects(tmp_path / "study", 16)
    workers = _start(tmp_path, port)
    try:
        for path in files.values():
            result = storescu(port, [path], env=NODELAY)
            assert result.returncode == 0, result.stderr
    finally:
        for worker in workers:
            worker.stop()
    stored = [uid for worker in workers for uid in worker.stored()]
    assert sorted(stored) == sorted(files)  # each acknowledged once, by one process
    assert all(worker.associations() > 0 for worker in workers), \
        [worker.associations() for worker in workers]
    assert _committed(tmp_path / "data", files) == set(files)
    _no_phi(*workers)


class HeldRelay:
    """A TCP relay for one connection to 127.0.0.1:``port`` that forwards what the client
    sends up to ``hold_after`` bytes, then holds the rest until :meth:`release`: an object
    stays mid-transfer (its spill file partial) for as long as a test needs. (DCMTK does not
    survive being paused with SIGSTOP: its interrupted write fails the association.)"""

    def __init__(self, port: int, hold_after: int) -> None:
        self.target, self.hold_after = port, hold_after
        self.released = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        client, _ = self.server.accept()
        upstream = socket.create_connection(("127.0.0.1", self.target))
        threading.Thread(target=self._pump, args=(upstream, client, None), daemon=True).start()
        self._pump(client, upstream, self.hold_after)

    def _pump(self, source: socket.socket, sink: socket.socket, hold_after: int | None) -> None:
        sent = 0
        try:
            while data := source.recv(65536):
                if hold_after is not None and sent + len(data) > hold_after:
                    self.released.wait(120)
                    hold_after = None
                sink.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.released.set()
        self.server.close()


@pytest.mark.peer("dcmtk")
def test_a_killed_worker_leaves_its_sibling_serving_and_its_transfer_intact(tmp_path):
    """A large object is mid-transfer to one worker (held by a relay once 8 MB passed: its
    spill file exists); the other worker is killed with SIGKILL and started again, which
    sweeps the spool dir: the transfer's spill file survives, the surviving worker serves
    every association meanwhile, and the held object completes and is committed."""
    port = free_port()
    big = large_ct(tmp_path / "big.dcm", megabytes=20)
    big_uid = _uid(big)
    files = _objects(tmp_path / "study", 6)
    spool = tmp_path / "spool"
    workers = _start(tmp_path, port)
    relay = HeldRelay(port, hold_after=8_000_000)
    sender = subprocess.Popen([need("storescu")["storescu"], "-aet", "MODALITY", "-aec",
                               "DICOMFLOW", "127.0.0.1", str(relay.port), str(big)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, **NODELAY})
    try:
        spill = _wait_for_spill(spool)
        holder = next(w for w in workers if w.pid == int(spill.name.split("-")[0]))
        other = next(w for w in workers if w is not holder)
        other.kill()
        for path in list(files.values())[:3]:  # only the holder listens now
            result = storescu(port, [path], env=NODELAY)
            assert result.returncode == 0, result.stderr
        restarted = Worker(tmp_path, port, other.replica, generation=1)
        workers.append(restarted)
        restarted.wait_for("dimse.listening")  # its open() swept the spool dir before this
        assert spill.exists(), "a live sibling's transfer was swept"
        for path in list(files.values())[3:]:
            result = storescu(port, [path], env=NODELAY)
            assert result.returncode == 0, result.stderr
        assert sender.poll() is None  # still held
        relay.release()
        assert sender.wait(120) == 0
    finally:
        relay.close()
        if sender.poll() is None:
            sender.kill()
            sender.wait(10)
        for worker in workers:
            worker.stop()
    assert big_uid in holder.stored()
    assert not spill.exists()  # deleted once the C-STORE was answered
    stored = [uid for worker in workers for uid in worker.stored()]
    assert sorted(stored) == sorted([*files, big_uid])
    assert _committed(tmp_path / "data", [*files, big_uid]) == {*files, big_uid}
    _no_phi(*workers)


def _uid(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _wait_for_spill(spool: Path) -> Path:
    end = time.monotonic() + 60
    while time.monotonic() < end:
        found = list(spool.glob("*.dcm")) if spool.exists() else []
        if found:
            return found[0]
        time.sleep(0.01)
    raise AssertionError("no spill file appeared")


def test_a_restart_sweeps_a_dead_process_spill_files_and_keeps_a_live_ones(tmp_path):
    """Spill files carry their owner's pid: a dead process's go at the next sweep, however
    fresh; a live process's (a sibling worker's, this one's) only by age."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(10)  # reaped: its pid names no process now
    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {}
        for owner, pid in (("dead", dead.pid), ("sibling", sibling.pid), ("self", os.getpid())):
            spill = SpillFile(str(tmp_path))
            name = Path(spill.name).name
            assert name.startswith(f"{os.getpid()}-")  # what a real spill is called
            path = tmp_path / f"{pid}-{name.split('-', 1)[1]}"
            path.write_bytes(b"partial object")
            names[owner] = path
        assert sweep_spill_files(str(tmp_path)) == 1
        assert not names["dead"].exists()
        assert names["sibling"].exists() and names["self"].exists()
    finally:
        sibling.kill()
        sibling.wait(10)


@pytest.mark.parametrize("raw,message", [
    ({"workers": 2, "port": 0}, "workers = 2 needs a fixed port"),
    ({"workers": 0}, "workers must be at least 1"),
])
def test_workers_mistakes_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        convert({"port": 11112, "ae_title": "DICOMFLOW", **raw}, ListenConfig,
                source="site.toml", prefix="listen")


def test_replicas_is_the_workers_setting():
    assert DicomListener(listen_config()).replicas == 1
    assert DicomListener(listen_config(workers=3)).replicas == 3


@pytest.mark.parametrize("server", ["budgeted", "pynetdicom"])
@pytest.mark.parametrize("replicas", [1, 2])
async def test_the_port_is_shared_only_by_replicas(monkeypatch, server, replicas):
    """SO_REUSEPORT on the listening socket exactly when the listener is placed as one of
    several replicas (``workers`` alone, in one process, changes nothing), on the budgeted
    server and on pynetdicom's own (the fallback); a plain socket can never bind the port
    while the listener holds it, a SO_REUSEPORT one only beside replicas."""
    if server == "pynetdicom":
        monkeypatch.delattr(ACSE, "send_reject")  # group "budget" missing: the fallback
    _pynetdicom.configure()
    listener = DicomListener(listen_config(workers=2))
    graph = Graph(listener >> Committer(name="sink"))
    runner = Runner(graph, placement=Placement(
        process="ingest-0", lanes=frozenset({graph.lane_of[id(listener)]}), replicas=replicas))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        with trio.fail_after(10):
            await listener.listening.wait()
        try:
            assert isinstance(listener._server, _pynetdicom.BudgetedServer) == (
                server == "budgeted")
            sock = listener._server.socket
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == (replicas > 1)
            assert _binds(listener.address, reuse_port=False) == errno.EADDRINUSE
            assert _binds(listener.address, reuse_port=True) == (
                0 if replicas > 1 else errno.EADDRINUSE)
        finally:
            runner.stop()
    _pynetdicom.configure()


def _binds(address: tuple[str, int], *, reuse_port: bool) -> int:
    """0 if a socket can bind ``address`` (with SO_REUSEPORT or not), else the errno."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            return exc.errno or -1
        return 0


@pytest.mark.peer("dcmtk")
def test_a_second_flow_run_on_the_port_still_fails_with_port_in_use(tmp_path):
    """One-process mode keeps the port to itself: a second ``flow run`` on it (its own data
    dir) logs dimse.address_in_use and never listens; the first keeps every object."""
    first, second = tmp_path / "first", tmp_path / "second"
    for directory in (first, second):
        directory.mkdir()
    port, args = write_site(first, free_port())
    (second / "site.py").write_text((first / "site.py").read_text())
    (second / "site.toml").write_text(
        (first / "site.toml").read_text().replace(str(first / "data"), str(second / "data")))
    args2 = [str(second / "site.py"), "--config", str(second / "site.toml")]
    files = _objects(tmp_path / "study", 2)
    with FlowProcess(["run", *args], first / "flow.log") as one:
        one.wait_for_log("dimse.listening")
        with FlowProcess(["run", *args2], second / "flow.log") as two:
            text = two.wait_for_log(r"ERROR dimse\.address_in_use")
            assert f"port={port}" in text
            result = storescu(port, list(files.values()), env=NODELAY)
            assert result.returncode == 0, result.stderr
            one.wait_for_log(r"dimse\.stored ", count=len(files))
            assert "dimse.listening" not in two.output()
    assert "dimse.stored" not in two.output()
