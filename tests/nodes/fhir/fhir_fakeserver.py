"""A FHIR server on 127.0.0.1 (http.server in a thread) that stores ImagingStudy resources
by conditional update, for sender tests.

``PUT /fhir/ImagingStudy?identifier=<system>|<value>`` creates (201) or replaces (200) the
resource whose identifier matches, after checking the body's own identifier agrees (else
400). ``script(request)`` may answer instead (status, headers, body) or return None.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

Answer = tuple[int, dict[str, str], bytes]


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    @property
    def resource(self) -> dict:
        return json.loads(self.body)


def operation_outcome(*codes: str, diagnostics: str = "") -> bytes:
    return json.dumps({"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": c, "diagnostics": diagnostics} for c in codes]}).encode()


class FakeFhir:
    def __init__(self, script: Callable[[Request], Answer | None] | None = None) -> None:
        self.script = script
        self.requests: list[Request] = []
        self.resources: dict[str, dict] = {}   # "system|value" → stored resource
        self.statuses: list[int] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_PUT(self):  # noqa: N802
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                parts = urlsplit(self.path)
                request = Request("PUT", parts.path, parse_qs(parts.query),
                                  {k.lower(): v for k, v in self.headers.items()}, body)
                status, headers, answer = fake._handle(request)
                self._reply(status, headers, answer)

            def do_GET(self):  # noqa: N802
                self._reply(200, {"Content-Type": "application/fhir+json"},
                            b'{"resourceType":"CapabilityStatement","status":"active"}')

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
        return f"http://127.0.0.1:{self.server.server_address[1]}/fhir"

    def _handle(self, request: Request) -> Answer:
        with self.lock:
            self.requests.append(request)
        answer = self.script(request) if self.script else None
        if answer is None:
            answer = self._conditional_update(request)
        with self.lock:
            self.statuses.append(answer[0])
        return answer

    def _conditional_update(self, request: Request) -> Answer:
        json_type = {"Content-Type": "application/fhir+json"}
        if request.path != "/fhir/ImagingStudy" or len(request.query.get("identifier", [])) != 1:
            return 400, json_type, operation_outcome("invalid")
        if request.headers.get("content-type", "").split(";")[0] != "application/fhir+json":
            return 415, json_type, operation_outcome("not-supported")
        key = request.query["identifier"][0]
        try:
            resource = request.resource
        except ValueError:
            return 400, json_type, operation_outcome("structure")
        system, _, value = key.partition("|")
        if {"system": system, "value": value} not in resource.get("identifier", []):
            return 400, json_type, operation_outcome("invalid")
        with self.lock:
            created = key not in self.resources
            self.resources[key] = resource
        return (201 if created else 200), {}, b""

    def __enter__(self) -> "FakeFhir":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
