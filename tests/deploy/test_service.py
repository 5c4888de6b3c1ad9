"""The systemd service shipped in deploy/: the unit passes systemd's own checks, its user and
config dir are what the install steps create, the example site file is valid, and a real
``flow`` process tells systemd (sd_notify) READY only once its DICOM port accepts,
RELOADING/READY around a SIGHUP and STOPPING on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from support.flowproc import FLOW, FlowProcess, run_flow
from support.peers import need
from support.site import GRAPH, ROOT, RadiologySite

DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "dicomflow.service"
PACS_ONLY = ROOT / "tests" / "faults" / "graphs" / "pacs_only.py"


def unit_settings(text: str) -> dict[str, list[str]]:
    """{key: [values]} of a unit file's assignments (every section; comments skipped)."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    exe = need("systemd-analyze")["systemd-analyze"]
    return subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60)


def rendered_unit(tmp_path: Path, text: str | None = None) -> Path:
    """The unit with ExecStart pointing at this checkout's ``flow`` (verify wants the
    binary to exist), under its own name."""
    text = (text or UNIT.read_text()).replace("/opt/dicomflow/.venv/bin/flow", FLOW)
    path = tmp_path / "dicomflow.service"
    path.write_text(text)
    return path


def test_unit_passes_systemd_analyze_verify(tmp_path):
    result = verify(rendered_unit(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""
    # The check can fail: a misspelt directive is reported (verify warns, exit status 0).
    typo = UNIT.read_text().replace("ProtectHome=yes", "ProtectHomes=yes")
    result = verify(rendered_unit(tmp_path, typo))
    assert "Unknown key 'ProtectHomes'" in result.stdout + result.stderr


def test_unit_runs_unprivileged_sandboxed_and_notifies():
    settings = unit_settings(UNIT.read_text())
    one = {key: values[-1] for key, values in settings.items()}
    assert one["Type"] == "notify"
    assert one["User"] == "dicomflow" and one["Group"] == "dicomflow"
    assert one["StateDirectory"] == "dicomflow" and one["StateDirectoryMode"] == "0700"
    assert one["AmbientCapabilities"] == one["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["Restart"] == "on-failure"
    assert one["UMask"] == "0077"
    for key, value in {"ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
                       "NoNewPrivileges": "yes", "ProtectKernelTunables": "yes",
                       "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes",
                       "SystemCallFilter": "@system-service"}.items():
        assert one[key] == value, key
    assert set(one["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert "ReadWritePaths" not in one  # the StateDirectory is the only writable path


def test_unit_stops_the_parent_which_stops_its_children():
    """With several processes ([runtime] processes) systemd's SIGTERM goes to the main process
    only (KillMode=mixed: the parent drains its children in order, tests/e2e/test_processes.py
    ::test_sigterm_drains_within_the_deadline_and_keeps_the_rest_queued); the default
    (control-group) would signal every child at the same moment. SIGKILL after the stop
    timeout still reaches them all; the final deadline outlasts flow's own (10 s + 5 s)."""
    one = {key: values[-1] for key, values in unit_settings(UNIT.read_text()).items()}
    assert one["KillMode"] == "mixed"
    assert one["NotifyAccess"] == "main"  # the children never talk to systemd
    assert int(one["TimeoutStopSec"].removesuffix("s")) > 15


def test_unit_exposure_is_low_by_systemds_own_measure(tmp_path):
    exe = need("systemd-analyze")["systemd-analyze"]
    result = subprocess.run([exe, "security", "--offline=true", "--no-pager",
                             str(rendered_unit(tmp_path))],
                            capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for dicomflow.service: ([0-9.]+)",
                      result.stdout + result.stderr)
    assert found, result.stdout + result.stderr
    assert float(found.group(1)) <= 2.0  # systemd calls < 4 "OK"; 10 is unsandboxed


def test_sysusers_and_tmpfiles_make_the_user_and_config_dir(tmp_path):
    tools = need("systemd-sysusers", "systemd-tmpfiles")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    subprocess.run([tools["systemd-sysusers"], f"--root={root}",
                    str(DEPLOY / "dicomflow.sysusers.conf")], check=True, capture_output=True)
    user = next(line.split(":") for line in (root / "etc/passwd").read_text().splitlines()
                if line.startswith("dicomflow:"))
    assert user[5:] == ["/var/lib/dicomflow", "/usr/sbin/nologin"]
    assert int(user[2]) < 1000  # a system user
    subprocess.run([tools["systemd-tmpfiles"], f"--root={root}", "--create",
                    str(DEPLOY / "dicomflow.tmpfiles.conf")], check=True, capture_output=True)
    config_dir = (root / "etc/dicomflow").stat()
    assert (config_dir.st_mode & 0o777, config_dir.st_uid, config_dir.st_gid) == (
        0o750, 0, int(user[3]))


def test_example_site_file_is_valid_for_the_shipped_graph():
    result = run_flow(["check", str(GRAPH), "--config", str(DEPLOY / "site.example.toml")],
                      cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout


# -- sd_notify from a real flow process --------------------------------------------------------


class NotifySocket:
    """The datagram socket systemd would listen on, bound by the test (abstract namespace)."""

    def __init__(self) -> None:
        self.name = f"@dicomflow-test-{os.getpid()}-{os.urandom(6).hex()}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])

    def next(self, timeout: float = 30) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.split("\n"))

    def pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096, socket.MSG_PEEK)
            return True
        except BlockingIOError:
            return False

    def close(self) -> None:
        self.sock.close()


def echo(port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([need("echoscu")["echoscu"], "-aec", "DICOMFLOW", "127.0.0.1",
                           str(port)], capture_output=True, text=True, timeout=30)


def test_flow_notifies_ready_once_the_dicom_port_accepts_then_reload_and_stop(tmp_path):
    site = RadiologySite(tmp_path, graph=PACS_ONLY, start_pacs=False)
    notify = NotifySocket()
    # The listener's port is taken at first: the listener crashes and is restarted (backoff)
    # while the rest of the graph runs. No READY may come before it serves.
    squatter = socket.create_server(("127.0.0.1", site.listen_port))
    flow = FlowProcess(["run", *site.graph_args], tmp_path / "flow.log", cwd=ROOT,
                       env={"NOTIFY_SOCKET": notify.name})
    try:
        flow.wait_for_log(r"node\.crashed.*dicom_listener")
        assert not notify.pending(), "READY before the DICOM port accepted"
        squatter.close()
        ready = notify.next()
        assert ready["READY"] == "1"
        assert ready["STATUS"] == "graph radiology-pacs-only running"
        result = echo(site.listen_port)  # right after READY: the port accepts and answers
        assert result.returncode == 0, result.stdout + result.stderr

        flow.signal(signal.SIGHUP)
        assert notify.next()["RELOADING"] == "1"
        assert notify.next()["READY"] == "1"
        assert echo(site.listen_port).returncode == 0

        # A reload that fails validation: the old graph goes on, and systemd hears so.
        good = site.config.read_text()
        site.config.write_text(good + "\n[listen\n")
        flow.signal(signal.SIGHUP)
        assert notify.next()["RELOADING"] == "1"
        rejected = notify.next()
        assert rejected["READY"] == "1" and "reload rejected" in rejected["STATUS"]
        assert echo(site.listen_port).returncode == 0
        site.config.write_text(good)

        flow.signal(signal.SIGTERM)
        assert notify.next()["STOPPING"] == "1"
        assert flow.wait(30) == 0
    finally:
        squatter.close()
        flow.stop()
        notify.close()
