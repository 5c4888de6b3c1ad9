"""The flagship site, run for real: ``flow graphs/radiology.py`` as a child process with its
peers on 127.0.0.1 (DCMTK ``storescp`` as the PACS, Orthanc + DICOMweb as the archive, an
MLLP listener as the RIS). Used by the end-to-end tests and by bench/route.py and
bench/isolation.py. Every process is started and stopped by its own pid.

    with RadiologySite(tmp_path) as site:      # peers up, graph running
        site.send(files)                       # storescu → the listener
        site.wait_delivered(len(files))
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .flowproc import FlowProcess, run_flow
from .orthanc import OrthancServer
from .peers import Process, free_port, need, wait_for_port
from .ris import RisListener
from .synth import dataset_bytes_after_meta

ROOT = Path(__file__).resolve().parents[2]
GRAPH = ROOT / "graphs" / "radiology.py"
LANES = ("pacs", "archive", "ris")


def toml_value(value: object) -> str:
    return json.dumps(value)  # TOML strings, numbers, booleans and arrays read like JSON


class Sent:
    """What ``storescu -v`` reported: ``acknowledged`` counts C-STORE responses with status
    Success (0x0000), i.e. objects the modality may now delete."""

    def __init__(self, result: subprocess.CompletedProcess[str]) -> None:
        self.returncode = result.returncode
        self.output = result.stdout + result.stderr
        self.acknowledged = self.output.count("Received Store Response (Success)")

    def __repr__(self) -> str:  # what a failed assertion shows
        return f"<storescu exit {self.returncode}: ...{self.output[-1500:]}>"


class RadiologySite:
    """The shipped graph with ports, data dir and allowlist of this test run.

    ``pacs_delay_s``: storescp sleeps this long inside each C-STORE (a slow PACS; DCMTK
    sleeps in several of its callbacks: ~3 s an object with 1). To keep work queued on the
    pacs lane for a while, :meth:`pause_pacs` and :meth:`resume_pacs` instead.
    ``pacs_fork``: storescp forks a child per association (serves associations side by side),
    and the pacs lane keeps the product's default ``max_associations`` (else 1: a plain
    storescp serves one association at a time).
    ``sections``: extra TOML tables, e.g. ``{"archive_coercion": {"station_name_prefix": "A-"}}``;
    a value of a known table (``{"store": {...}}``) is merged into it.
    ``graph``: another graph file reading the same schema (fault-injection tests).
    """

    def __init__(self, workdir: Path, *, pacs_delay_s: int = 0, graph: Path = GRAPH,
                 sections: dict[str, dict[str, object]] | None = None,
                 start_pacs: bool = True, pacs_fork: bool = False) -> None:
        need("storescp", "storescu")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.graph = graph
        self.pacs_delay_s = pacs_delay_s
        self.pacs_fork = pacs_fork
        self.start_pacs_at_start = start_pacs
        self.listen_port = free_port()
        self.pacs_port = free_port()
        self.pacs_dir = self.workdir / "pacs"
        self.pacs_dir.mkdir(exist_ok=True)
        self.data_dir = self.workdir / "data"
        self.orthanc = OrthancServer(self.workdir / "orthanc")
        self.ris = RisListener(port=free_port())
        self.sections = sections or {}
        self.config = self.workdir / "site.toml"
        self.config.write_text(self.site_toml())
        self.pacs: Process | None = None
        self.pacs_paused = False
        self.flow: FlowProcess | None = None
        self._runs = 0

    # -- configuration ----------------------------------------------------------------------

    def tables(self) -> dict[str, dict[str, object]]:
        tables: dict[str, dict[str, object]] = {
            "listen": {"host": "127.0.0.1", "port": self.listen_port, "ae_title": "DICOMFLOW",
                       "calling_ae_titles": []},
            "store": {"retry_initial_s": 0.5, "retry_max_s": 2.0, "poll_s": 0.2},
            "pacs": {"host": "127.0.0.1", "port": self.pacs_port, "ae_title": "DICOMFLOW",
                     "called_ae_title": "PACS"},
            "archive": {"url": self.orthanc.dicomweb},
            "ris": {"host": "127.0.0.1", "port": self.ris.port},
        }
        if not self.pacs_fork:  # a plain storescp serves one association at a time
            tables["pacs"]["max_associations"] = 1
        for name, values in self.sections.items():
            tables.setdefault(name, {}).update(values)
        tables["egress"] = {
            "allowed_tcp": [f"127.0.0.1:{self.pacs_port}", f"127.0.0.1:{self.ris.port}"],
            "allowed_http": [self.orthanc.dicomweb],
        }
        return tables

    def site_toml(self) -> str:
        lines = [f"data_dir = {toml_value(str(self.data_dir))}"]
        for name, values in self.tables().items():
            lines.append(f"\n[{name}]")
            lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
        return "\n".join(lines) + "\n"

    @property
    def graph_args(self) -> list[str]:
        return [str(self.graph), "--config", str(self.config)]

    # -- peers ------------------------------------------------------------------------------

    def start_pacs(self) -> None:
        args = [need("storescp")["storescp"], "--aetitle", "PACS", "+xa", "+B",
                "--output-directory", str(self.pacs_dir), "--socket-timeout", "10"]
        if self.pacs_delay_s:
            args += ["--sleep-during", str(self.pacs_delay_s)]
        if self.pacs_fork:
            args.append("--fork")
        for attempt in range(3):
            self.pacs = Process([*args, str(self.pacs_port)], log=self.workdir / "storescp.log")
            wait_for_port(self.pacs_port)
            time.sleep(0.1)  # storescp exits at once when its port was taken meanwhile
            if self.pacs.alive():
                return
            # free_port's port went to another process between the choice and the bind (an
            # ephemeral port of some connection): before the graph runs, choose again.
            if self.flow is not None or attempt == 2:
                raise AssertionError(f"storescp could not listen on {self.pacs_port}:\n"
                                     + self.pacs.output())
            self.pacs_port = free_port()
            self.config.write_text(self.site_toml())

    def stop_pacs(self) -> None:
        if self.pacs is not None:
            self.pacs.stop()  # a paused one too
            self.pacs = None
        self.pacs_paused = False

    def pause_pacs(self) -> None:
        """Freeze the PACS (SIGSTOP): its port still accepts connections (the kernel's
        backlog) but it answers nothing, so the pacs lane's next association or C-STORE
        waits (up to the sender's ``timeout_ms``, 30 s, then it is retried) and nothing is
        delivered until :meth:`resume_pacs`, after which the lane goes on at full speed.
        Not with ``pacs_fork`` (a forked child would go on serving). :meth:`close` resumes
        a paused PACS before it stops the graph."""
        assert self.pacs is not None and self.pacs.alive() and not self.pacs_fork
        self.pacs.pause()
        self.pacs_paused = True

    def resume_pacs(self) -> None:
        assert self.pacs is not None
        self.pacs.resume()
        self.pacs_paused = False

    # -- the graph --------------------------------------------------------------------------

    def start_flow(self) -> FlowProcess:
        self._runs += 1
        self.flow = FlowProcess(["run", *self.graph_args, "--log-level", "INFO"],
                                self.workdir / f"flow-{self._runs}.log", cwd=ROOT)
        deadline = time.monotonic() + 30
        while True:
            try:
                wait_for_port(self.listen_port, timeout=0.5)
                return self.flow
            except TimeoutError:
                if not self.flow.alive() or time.monotonic() > deadline:
                    raise AssertionError("flow did not start listening:\n"
                                         + self.flow.output()) from None

    def kill_flow(self) -> None:
        assert self.flow is not None
        self.flow.kill()

    def stop_flow(self) -> int:
        assert self.flow is not None
        return self.flow.stop(timeout=20)

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace")
                       for p in sorted(self.workdir.glob("flow-*.log")))

    # -- operating it -----------------------------------------------------------------------

    def send(self, files: Sequence[Path], *, calling_ae: str = "MODALITY") -> "Sent":
        """``storescu`` every file to the listener in one association."""
        result = subprocess.run(
            [need("storescu")["storescu"], "-v", "-aet", calling_ae, "-aec", "DICOMFLOW",
             "127.0.0.1", str(self.listen_port), *map(str, files)],
            capture_output=True, text=True, timeout=120)
        return Sent(result)

    def status(self) -> dict:
        result = run_flow(["status", *self.graph_args, "--json"], cwd=ROOT)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def wait_status(self, done: Callable[[dict], bool], what: str,
                    timeout: float = 60) -> dict:
        """Poll ``flow status`` until ``done(status)``; fail naming ``what`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if done(status):
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not reached after {timeout}s: {status['lanes']}")
            time.sleep(0.2)

    def wait_lanes_idle(self, lanes: Sequence[str] = LANES, timeout: float = 60) -> dict:
        """Poll ``flow status`` until no lane has anything queued, in flight or retrying."""
        def idle(status: dict) -> bool:
            figures = status["lanes"]
            return all(not (figures[lane].get("queued") or figures[lane].get("in_flight")
                            or figures[lane].get("retrying")) for lane in lanes)
        return self.wait_status(idle, f"lanes {', '.join(lanes)} idle", timeout)

    def pacs_files(self) -> dict[str, bytes]:
        """{SOPInstanceUID: dataset bytes after the file meta} of what storescp stored."""
        from pydicom import dcmread

        out: dict[str, bytes] = {}
        for path in self.pacs_dir.iterdir():
            data = path.read_bytes()
            uid = dcmread(path, stop_before_pixels=True).SOPInstanceUID
            out[str(uid)] = dataset_bytes_after_meta(data)
        return out

    def wait_pacs(self, count: int, timeout: float = 60) -> dict[str, bytes]:
        deadline = time.monotonic() + timeout
        while len(list(self.pacs_dir.iterdir())) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"PACS holds {len(list(self.pacs_dir.iterdir()))} of "
                                     f"{count} objects after {timeout}s")
            time.sleep(0.1)
        time.sleep(0.2)  # storescp writes the last file after answering
        return self.pacs_files()

    def wait_archive(self, count: int, timeout: float = 60) -> dict[str, bytes]:
        deadline = time.monotonic() + timeout
        while len(self.orthanc.instance_ids()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"archive holds {len(self.orthanc.instance_ids())} of "
                                     f"{count} objects after {timeout}s")
            time.sleep(0.1)
        return {uid: dataset_bytes_after_meta(data)
                for uid, data in self.orthanc.stored_files_by_uid().items()}

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> "RadiologySite":
        try:
            self.orthanc.start()
            self.config.write_text(self.site_toml())  # Orthanc may have chosen other ports
            self.ris.start()
            if self.start_pacs_at_start:
                self.start_pacs()
            self.start_flow()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self.pacs_paused:  # so that the graph's lanes stop without waiting for it
            self.resume_pacs()
        if self.flow is not None and self.flow.alive():
            self.flow.stop(timeout=20)
        self.stop_pacs()
        self.ris.stop()
        self.orthanc.kill()  # its storage goes with the test

    def __exit__(self, *exc: object) -> None:
        self.close()
