"""The demo behind ./scripts/demo (see that file). Synthetic data only."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from demo_study import write_study  # noqa: E402

FLOW = str(Path(sys.executable).with_name("flow"))
PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not port_free(port):
            return
        time.sleep(0.1)
    raise SystemExit(f"demo: nothing listens on 127.0.0.1:{port} after {timeout}s")


def start(args: list[str], log: Path, **kw) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, **kw)


def main() -> int:
    for port in (11112, 11113, 8042, 2575):
        if not port_free(port):
            raise SystemExit(f"demo: port {port} on 127.0.0.1 is in use; stop what uses it")
    work = Path(tempfile.mkdtemp(prefix="dicomflow-demo-"))
    print(f"demo: working in {work}")
    procs: list[subprocess.Popen] = []
    try:
        pacs_dir = work / "pacs"
        pacs_dir.mkdir()
        # --fork: one child per association, as a PACS serves several senders at once.
        procs.append(start(["storescp", "--fork", "--aetitle", "PACS", "+xa", "+B",
                            "--output-directory", str(pacs_dir), "11113"],
                           work / "storescp.log"))
        orthanc_cfg = work / "orthanc.json"
        orthanc_cfg.write_text(json.dumps({
            "Name": "demo-archive", "StorageDirectory": str(work / "orthanc"),
            "IndexDirectory": str(work / "orthanc"), "HttpPort": 8042, "DicomPort": 4243,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "Plugins": [PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}))
        procs.append(start(["/usr/sbin/Orthanc", str(orthanc_cfg)], work / "orthanc.log"))
        ris_log = work / "ris.hl7"
        procs.append(start([sys.executable, "-m", "support.ris", "2575", str(ris_log)],
                           work / "ris.log", env={**os.environ, "PYTHONPATH": str(ROOT / "tests")}))
        for port in (11113, 8042, 2575):
            wait_port(port)
        print("demo: peers up: PACS storescp :11113, archive Orthanc :8042, RIS MLLP :2575")

        config = work / "radiology.toml"
        text = (ROOT / "graphs" / "radiology.toml").read_text()
        config.write_text(text.replace('data_dir = "var/dicomflow"',
                                       f'data_dir = "{work / "data"}"'))
        graph_args = [str(ROOT / "graphs" / "radiology.py"), "--config", str(config)]
        flow = start([FLOW, *graph_args], work / "flow.log")
        procs.append(flow)
        wait_port(11112)
        print("demo: dicomflow listening on 127.0.0.1:11112")

        study = work / "study"
        files = write_study(study)
        print(f"demo: sending a synthetic study of {len(files)} objects with storescu")
        subprocess.run(["storescu", "-aet", "MODALITY", "-aec", "DICOMFLOW", "127.0.0.1",
                        "11112", *map(str, files)], check=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = json.loads(subprocess.run([FLOW, "status", *graph_args, "--json"],
                                               capture_output=True, text=True).stdout)
            lanes = status["lanes"]
            if all(not (lanes[lane].get("queued") or lanes[lane].get("in_flight")
                        or lanes[lane].get("retrying")) for lane in ("pacs", "archive", "ris")):
                break
            time.sleep(0.5)
        subprocess.run([FLOW, "status", *graph_args])
        stored = len(list(pacs_dir.iterdir()))
        with urllib.request.urlopen("http://127.0.0.1:8042/instances") as r:
            archived = len(json.load(r))
        messages = ris_log.read_text().count("MSH|") if ris_log.exists() else 0
        print(f"demo: PACS (storescp) holds {stored} objects, the archive (Orthanc) holds "
              f"{archived}, the RIS received {messages} ORU^R01 message(s)")
        return 0
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
        print(f"demo: peers and graph stopped; logs in {work}")


if __name__ == "__main__":
    sys.exit(main())
