"""A FHIR server on 127.0.0.1 (http.server in a thread) that stores ImagingStudy resources
by conditional update, for sender tests.

``PUT /fhir/ImagingStudy?identifier=<system>|<value>`` creates (201) or replaces (200) the
resource whose identifier matches, after checking the body's own identifier agrees (else
400); like a real server it gives the resource an ``id`` and ``meta`` (versionId,
lastUpdated), keeps the id across updates and refuses a body whose ``id`` differs (400).
``GET /fhir/ImagingStudy?identifier=<system>|<value>`` answers a searchset Bundle with the
stored resource (0 or 1 entry); ``GET /fhir/metadata`` a CapabilityStatement; other paths 404.
``script(request)`` may answer any request instead (status, headers, body) or return None.
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
    status: int | None = None  # what the server answered

    @property
    def resource(self) -> dict:
        return json.loads(self.body)


def searchset(*resources: dict, total: int | None = None) -> bytes:
    """A search answer: a searchset Bundle with ``resources`` as matches."""
    return json.dumps({"resourceType": "Bundle", "type": "searchset",
                       "total": len(resources) if total is None else total,
                       "entry": [{"fullUrl": f"ImagingStudy/{r.get('id', 'x')}",
                                  "resource": r, "search": {"mode": "match"}}
                                 for r in resources]}).encode()


def operation_outcome(*codes: str, diagnostics: str = "") -> bytes:
    return json.dumps({"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": c, "diagnostics": diagnostics} for c in codes]}).encode()


class FakeFhir:
    def __init__(self, script: Callable[[Request], Answer | None] | None = None) -> None:
        self.script = script
        self.requests: list[Request] = []
        self.resources: dict[str, dict] = {}   # "system|value" → stored resource
        self.statuses: list[int] = []
        self.created = 0
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
                parts = urlsplit(self.path)
                request = Request("GET", parts.path, parse_qs(parts.query),
                                  {k.lower(): v for k, v in self.headers.items()}, b"")
                status, headers, answer = fake._handle(request)
                self._reply(status, headers, answer)

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

    @property
    def puts(self) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.method == "PUT"]

    @property
    def searches(self) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.method == "GET" and r.query]

    def hold(self, resource: dict) -> None:
        """Store ``resource`` as an earlier conditional update would have (id, meta)."""
        ident = resource["identifier"][0]
        key = f"{ident['system']}|{ident['value']}"
        with self.lock:
            self.created += 1
            self.resources[key] = {**resource, "id": str(self.created), "meta": {
                "versionId": "1", "lastUpdated": "2026-11-24T12:00:00Z"}}

    def _handle(self, request: Request) -> Answer:
        with self.lock:
            self.requests.append(request)
        answer = self.script(request) if self.script else None
        if answer is None:
            answer = (self._conditional_update(request) if request.method == "PUT"
                      else self._read(request))
        with self.lock:
            request.status = answer[0]
            self.statuses.append(answer[0])
        return answer

    def _read(self, request: Request) -> Answer:
        json_type = {"Content-Type": "application/fhir+json"}
        if request.path == "/fhir/metadata":
            return 200, json_type, b'{"resourceType":"CapabilityStatement","status":"active"}'
        if request.path != "/fhir/ImagingStudy":
            return 404, json_type, operation_outcome("not-found")
        if len(request.query.get("identifier", [])) != 1:
            return 400, json_type, operation_outcome("invalid")
        with self.lock:
            found = self.resources.get(request.query["identifier"][0])
            return 200, json_type, searchset(*([found] if found else []))

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
            old = self.resources.get(key)
            if old is None:
                self.created += 1
                rid, version = str(self.created), 1
            else:
                rid, version = old["id"], int(old["meta"]["versionId"]) + 1
            if resource.get("id", rid) != rid:
                return 400, json_type, operation_outcome("invalid")
            self.resources[key] = {**resource, "id": rid, "meta": {
                "versionId": str(version), "lastUpdated": "2026-11-25T12:00:00Z"}}
        return (201 if old is None else 200), {}, b""

    def __enter__(self) -> "FakeFhir":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
