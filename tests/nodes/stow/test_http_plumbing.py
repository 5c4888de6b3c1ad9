"""nodes.http: shared HTTP hardening, secrets and outcome classes (no peer needed)."""

from __future__ import annotations

import email.utils
import http.server
import threading

import httpx
import msgspec
import pytest
import trio

from flow import ConfigError
from nodes.http import (HttpClientConfig, build_client, classify_http, classify_transport_error,
                        load_secret, make_client, parse_retry_after)
from nodes.outcome import Delivered, Permanent, Transient

SECRET = "Bearer s3cr3t-t0ken-value"


# -- load_secret ----------------------------------------------------------------------------

def test_secret_from_file_is_stripped(tmp_path):
    f = tmp_path / "token"
    f.write_text(SECRET + "\n")
    assert load_secret(str(f), None) == SECRET


def test_secret_from_env(monkeypatch):
    monkeypatch.setenv("DF_TEST_TOKEN", SECRET)
    assert load_secret(None, "DF_TEST_TOKEN") == SECRET


def test_no_secret_configured_is_none():
    assert load_secret(None, None) is None


def test_missing_secret_file_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="auth_header_file") as info:
        load_secret(str(tmp_path / "absent"), None)
    assert "absent" in str(info.value)


def test_unset_env_names_the_key_and_variable(monkeypatch):
    monkeypatch.delenv("DF_TEST_NOPE", raising=False)
    with pytest.raises(ConfigError, match="auth_header_env.*DF_TEST_NOPE"):
        load_secret(None, "DF_TEST_NOPE")


@pytest.mark.parametrize("value", ["", "  \n", "Bearer a\r\nX-Evil: 1"])
def test_bad_secret_values_are_refused_without_quoting_them(monkeypatch, value):
    monkeypatch.setenv("DF_TEST_TOKEN", value)
    with pytest.raises(ConfigError) as info:
        load_secret(None, "DF_TEST_TOKEN")
    assert "Evil" not in str(info.value)


def test_both_sources_is_an_error(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="both"):
        load_secret(str(tmp_path / "x"), "Y")


# -- config -----------------------------------------------------------------------------------

def test_config_defaults_and_validation():
    cfg = msgspec.convert({"url": "https://pacs.example/dicom-web"}, HttpClientConfig)
    assert cfg.timeout_ms > 0 and cfg.max_connections >= 1 and cfg.tls_ca is None
    for bad in ({"url": "ftp://x/"}, {"url": "https://u:p@x/"}, {"url": "http://x/?a=1"},
                {"url": "http://x/", "timeout_ms": 0},
                {"url": "http://x/", "max_connections": 0},
                {"url": "http://x/", "auth_header_file": "a", "auth_header_env": "B"},
                {"url": "http://x/", "auth_header": "Bearer inline"}):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert(bad, HttpClientConfig)


def test_bad_ca_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="tls_ca"):
        make_client(timeout_ms=1000, max_connections=1, tls_ca=str(tmp_path / "none.pem"))


# -- Retry-After ------------------------------------------------------------------------------

def test_retry_after_delta_seconds():
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 0 ") == 0.0


def test_retry_after_http_date():
    now = 1_800_000_000.0
    header = email.utils.formatdate(now + 90, usegmt=True)
    assert parse_retry_after(header, now=now) == pytest.approx(90.0)
    past = email.utils.formatdate(now - 90, usegmt=True)
    assert parse_retry_after(past, now=now) == 0.0


@pytest.mark.parametrize("value", [None, "", "-5", "1.5", "soon", "²", "Wed, 99 Foo 2026"])
def test_retry_after_garbage_is_none(value):
    assert parse_retry_after(value) is None


# -- classification ---------------------------------------------------------------------------

@pytest.mark.parametrize("status,expected", [
    (200, Delivered()), (201, Delivered()), (204, Delivered()),
    (301, Permanent("HTTP 301: redirect not followed")),
    (302, Permanent("HTTP 302: redirect not followed")),
    (400, Permanent("HTTP 400")), (404, Permanent("HTTP 404")), (409, Permanent("HTTP 409")),
    (408, Transient("HTTP 408")), (429, Transient("HTTP 429")),
    (500, Transient("HTTP 500")), (503, Transient("HTTP 503")),
    (101, None), (600, None),
])
def test_classify_http(status, expected):
    assert classify_http(status) == expected


def test_classify_http_honours_retry_after():
    assert classify_http(429, "30") == Transient("HTTP 429", 30.0)
    assert classify_http(503, 5.0) == Transient("HTTP 503", 5.0)
    assert classify_http(408, "garbage") == Transient("HTTP 408", None)


def test_transport_errors_are_transient_and_name_only_the_class():
    out = classify_transport_error(httpx.ConnectError("secret http://u:pw@host/ detail"))
    assert out == Transient("transport error: ConnectError")
    assert classify_transport_error(httpx.ReadTimeout("x")).reason == "timeout: ReadTimeout"


# -- the client against a real local server ---------------------------------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    seen: list[dict[str, str]] = []

    def do_GET(self):  # noqa: N802 (http.server API)
        _Handler.seen.append(dict(self.headers))
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.1:1/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def local_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


async def test_client_runs_on_trio_sends_auth_and_does_not_follow_redirects(
        local_server, tmp_path, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # must be ignored (trust_env=False)
    monkeypatch.setenv("DF_TEST_TOKEN", SECRET)
    cfg = HttpClientConfig(url=local_server, timeout_ms=5000, max_connections=2,
                           auth_header_env="DF_TEST_TOKEN")
    _Handler.seen.clear()
    async with build_client(cfg) as client:
        assert trio.lowlevel.current_task() is not None
        ok = await client.get(local_server + "/x")
        redirect = await client.get(local_server + "/redirect")
    assert ok.status_code == 200 and ok.content == b"ok"
    assert redirect.status_code == 302
    assert classify_http(redirect.status_code) == Permanent("HTTP 302: redirect not followed")
    assert len(_Handler.seen) == 2  # the redirect target was never asked
    assert _Handler.seen[0]["Authorization"] == SECRET


async def test_refused_connection_is_transient():
    from support.peers import free_port

    async with make_client(timeout_ms=2000, max_connections=1) as client:
        with pytest.raises(httpx.TransportError) as info:
            await client.get(f"http://127.0.0.1:{free_port()}/")
    assert classify_transport_error(info.value) == Transient("transport error: ConnectError")
