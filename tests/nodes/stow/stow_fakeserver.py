"""A scriptable STOW-RS server on 127.0.0.1 (http.server in a thread) for sender tests.

``script(request) -> (status, headers, body)`` decides each answer; every request is
recorded with its headers and parts. ``discard=True`` reads bodies in small blocks and keeps
only their length and SHA-256, so a test can measure the *sender's* memory.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from nodes.stow import decode_multipart
from nodes.stow.multipart import boundary_of


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    parts: list[bytes] = field(default_factory=list)
    length: int = 0
    sha256: str = ""

    def part_uids(self) -> list[str]:
        """SOP Instance UIDs of the parts (parsed with pydicom, from the bytes as sent)."""
        import io

        from pydicom import dcmread
        return [str(dcmread(io.BytesIO(p), stop_before_pixels=True).SOPInstanceUID)
                for p in self.parts]


Answer = tuple[int, dict[str, str], bytes]


def ok(request: Request) -> Answer:
    return 200, {"Content-Type": "application/dicom+json"}, stow_json(
        referenced=request.part_uids())


def stow_json(failed: dict[str, int] | None = None, referenced=()) -> bytes:
    def item(uid, tag=None, code=None):
        d = {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
             "00081155": {"vr": "UI", "Value": [uid]}}
        if tag:
            d[tag] = {"vr": "US", "Value": [code]}
        return d
    doc = {"00081198": {"vr": "SQ", "Value": [item(u, "00081197", c)
                                              for u, c in (failed or {}).items()]},
           "00081199": {"vr": "SQ", "Value": [item(u) for u in referenced]}}
    return json.dumps(doc).encode()


def stow_xml(failed: dict[str, int] | None = None, referenced: dict[str, int | None] | None = None
             ) -> bytes:
    """A Native DICOM Model (PS3.19) Store Instances Response."""
    def item(n, uid, tag=None, code=None):
        extra = (f'<DicomAttribute tag="{tag}" vr="US"><Value number="1">{code}</Value>'
                 f'</DicomAttribute>') if tag and code is not None else ""
        return (f'<Item number="{n}"><DicomAttribute tag="00081155" vr="UI">'
                f'<Value number="1">{uid}</Value></DicomAttribute>{extra}</Item>')
    f = "".join(item(i + 1, u, "00081197", c) for i, (u, c) in enumerate((failed or {}).items()))
    r = "".join(item(i + 1, u, "00081196", c)
                for i, (u, c) in enumerate((referenced or {}).items()))
    return ('<?xml version="1.0" encoding="utf-8"?><NativeDicomModel '
            'xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM">'
            f'<DicomAttribute tag="00081198" vr="SQ">{f}</DicomAttribute>'
            f'<DicomAttribute tag="00081199" vr="SQ">{r}</DicomAttribute>'
            '</NativeDicomModel>').encode()


class FakeStow:
    def __init__(self, script: Callable[[Request], Answer] = ok, *, discard: bool = False,
                 barrier: threading.Barrier | None = None) -> None:
        self.script = script
        self.discard = discard
        self.barrier = barrier
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802
                fake._handle(self)

            def do_GET(self):  # noqa: N802
                self._reply(200, {"Content-Type": "application/dicom+json"}, b"[]")

            def _reply(self, status, headers, body):
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def _handle(self, h) -> None:
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            headers = {k.lower(): v for k, v in h.headers.items()}
            req = Request(h.path, headers)
            if "content-length" not in headers:
                h._reply(411, {}, b"length required")  # the sender must never chunk
                return
            remaining = int(headers["content-length"])
            req.length = remaining
            if self.discard:
                digest = hashlib.sha256()
                while remaining:
                    block = h.rfile.read(min(remaining, 65536))
                    if not block:
                        break
                    digest.update(block)
                    remaining -= len(block)
                req.sha256 = digest.hexdigest()
            else:
                body = h.rfile.read(remaining)
                boundary = boundary_of(headers.get("content-type", "")) or ""
                req.parts = [c for _, c in decode_multipart(body, boundary)]
            with self.lock:
                self.requests.append(req)
            if self.barrier is not None:
                self.barrier.wait()
            status, out_headers, out_body = self.script(req)
            h._reply(status, out_headers, out_body)
        finally:
            with self.lock:
                self.active -= 1

    def __enter__(self) -> "FakeStow":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.barrier is not None:
            self.barrier.abort()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
