"""A real Orthanc with its DICOMweb plugin on 127.0.0.1, for tests and bench/stow.py.

Started with a config written into a temp dir (storage and index there too), no remote
access, no authentication, stopped by its PID. Shared by the STOW interop tests, the end-to-end tests and the benches.

    with OrthancServer(tmp_path) as orthanc:
        orthanc.dicomweb          # "http://127.0.0.1:PORT/dicom-web"
        orthanc.get_json("/instances")
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

from .peers import Process, free_port, need

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def need_orthanc() -> str:
    """Path of the Orthanc binary; skips (fails under DICOMFLOW_REQUIRE_PEERS=1) without it
    or without the DICOMweb plugin."""
    binary = need("Orthanc")["Orthanc"]
    if not Path(PLUGIN).exists():
        need("libOrthancDicomWeb.so-plugin")  # skips/fails with a clear name
    return binary


class PortTaken(RuntimeError):
    """Orthanc exited at start: one of its ports was in use."""


class OrthancServer:
    """One Orthanc process. :meth:`start` / :meth:`stop` may be called repeatedly (the
    storage persists in ``workdir``, the ports stay the same)."""

    def __init__(self, workdir: Path, *, http_port: int | None = None,
                 dicom_port: int | None = None, aet: str = "ORTHANC",
                 extra: dict | None = None) -> None:
        self.binary = need_orthanc()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.http_port = http_port or free_port()
        self.dicom_port = dicom_port or free_port()
        # Ports we chose may be taken by another process before the first start binds them.
        self._may_choose_ports = http_port is None and dicom_port is None
        self.aet = aet
        self.extra = extra or {}
        self.process: Process | None = None
        self.config_path = self.workdir / "orthanc.json"
        self.config_path.write_text(json.dumps(self.config(), indent=2))

    def config(self) -> dict:
        return {
            "Name": "dicomflow-test",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "StorageCompression": False,
            "Plugins": [PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True,
                         "StowMaxInstances": 0, "StowMaxSize": 0},
            "HttpCompressionEnabled": False,
            "KeepAlive": True,
            "HttpThreadsCount": 16,
            "ConcurrentJobs": 2,
            "LimitFindResults": 0,
            "SaveJobs": False,
            "StableAge": 3600,
            "OverwriteInstances": False,
            **self.extra,
        }

    @property
    def headers(self) -> dict[str, str]:
        """Basic auth for the REST calls of this helper when the config enables it."""
        users = self.extra.get("RegisteredUsers") or {}
        if not self.extra.get("AuthenticationEnabled") or not users:
            return {}
        import base64
        user, password = next(iter(users.items()))
        return {"Authorization": "Basic " + base64.b64encode(
            f"{user}:{password}".encode()).decode()}

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.base}/dicom-web"

    def start(self, timeout: float = 30.0) -> "OrthancServer":
        """Start and wait until DICOMweb answers. At the first start, ports that
        :func:`free_port` chose and another process took meanwhile are chosen again (read
        :attr:`dicomweb` after this)."""
        for attempt in range(3):
            try:
                return self._start(timeout)
            except PortTaken:
                if not self._may_choose_ports or attempt == 2:
                    raise
                self.http_port, self.dicom_port = free_port(), free_port()
                self.config_path.write_text(json.dumps(self.config(), indent=2))
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> "OrthancServer":
        assert self.process is None or not self.process.alive(), "already running"
        self.process = Process([self.binary, str(self.config_path)], cwd=self.workdir,
                               log=self.workdir / "orthanc.log")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.process.alive():
                output = self.process.output()[-2000:]
                self.process = None
                error = PortTaken if "already in use" in output else RuntimeError
                raise error(f"Orthanc exited: {output}")
            try:
                if self.get_json("/system").get("PluginsEnabled") is not None:
                    plugins = self.get_json("/plugins")
                    if "dicom-web" in plugins:
                        self._may_choose_ports = False  # from now on they stay
                        return self
                    raise RuntimeError(f"DICOMweb plugin not loaded: {plugins}")
            except urllib.error.HTTPError:
                raise
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError("Orthanc did not answer on its HTTP port")

    def stop(self) -> None:
        """SIGTERM: Orthanc shuts down cleanly (~3 s) and a later :meth:`start` finds its
        storage as it was."""
        if self.process is not None:
            self.process.stop()
            self.process = None

    def kill(self) -> None:
        """SIGKILL, at once: for an Orthanc whose storage nobody reads again (the end of a
        test), which need not wait for :meth:`stop`'s clean shutdown."""
        if self.process is not None:
            self.process.kill()
            self.process = None

    def get(self, path: str) -> bytes:
        request = urllib.request.Request(self.base + path, headers=self.headers)
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.read()

    def get_json(self, path: str):
        return json.loads(self.get(path))

    def instance_ids(self) -> list[str]:
        return self.get_json("/instances")

    def stored_files_by_uid(self) -> dict[str, bytes]:
        """{SOPInstanceUID: the Part 10 file Orthanc stored} for every instance."""
        out: dict[str, bytes] = {}
        for oid in self.instance_ids():
            uid = self.get_json(f"/instances/{oid}/tags?simplify")["SOPInstanceUID"]
            out[uid] = self.get(f"/instances/{oid}/file")
        return out

    def wipe(self) -> None:
        """Delete the storage (only while stopped)."""
        assert self.process is None
        shutil.rmtree(self.workdir / "storage", ignore_errors=True)
        shutil.rmtree(self.workdir / "index", ignore_errors=True)

    def __enter__(self) -> "OrthancServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
