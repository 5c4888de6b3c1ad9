"""The runtime's admin endpoint without DICOM: ``[admin]`` validation, a real ``flow``
process serving /healthz, /status, /metrics and pages, escaping of what nodes report, and a
reload (SIGHUP) that moves the endpoint to another port."""

import json
import signal
import ssl
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from flow import ConfigError
from flow._config import read_site_file
from support.flowproc import FlowProcess, run_flow
from support.peers import free_port, wait_for_port

GRAPH = textwrap.dedent('''
    from flow import Graph, Node
    from support.flownodes import Ticker

    class Sink(Node):
        """Drops what it gets; reports one dead letter whose text tries to be HTML."""

        outputs = ()

        async def run(self, ctx):
            async for _ in ctx.receive():
                pass

        def dead_letters(self, limit):
            return [{"lane": "ticks", "item": "1.2.3", "since": 1700000000.0,
                     "reason": "<script>alert(1)</script> & <b>bold</b>"}]

        def trace(self, item):
            if item != "1.2.3":
                return None
            return {"item": item, "events": [{"t": 1700000000.0, "event": "<i>hop</i>"}]}

    graph = Graph(Ticker(0.05, name="ticks") >> Sink(name="sink"), name="demo",
                  state_dir=STATE)
''')


def write_config(path, port, extra=""):
    path.write_text(f"[admin]\nport = {port}\nsample_interval_s = 0.2\n{extra}")
    return path


@pytest.fixture
def graph(tmp_path):
    path = tmp_path / "demo.py"
    path.write_text(f"STATE = {str(tmp_path / 'state')!r}\n" + GRAPH)
    return path


@pytest.mark.parametrize("table, error", [
    ('host = "0.0.0.0"', "admin: serving the admin endpoint on 0.0.0.0 without TLS is refused"),
    ('host = "10.1.2.3"\ntls_cert = "c.pem"', "admin: tls_cert and tls_key go together"),
    ("prot = 9000", "unknown key admin.prot"),
    ('port = "x"', "key admin.port"),
])
def test_admin_table_is_validated(tmp_path, table, error):
    path = tmp_path / "site.toml"
    path.write_text(f"[admin]\n{table}\n")
    with pytest.raises(ConfigError) as raised:
        read_site_file(path)
    assert error in str(raised.value)


def test_admin_is_off_without_its_table_and_loopback_by_default(tmp_path):
    path = tmp_path / "site.toml"
    path.write_text("")
    assert read_site_file(path).admin is None
    path.write_text("[admin]\n")
    assert read_site_file(path).admin.host == "127.0.0.1"
    path.write_text('[admin]\nhost = "0.0.0.0"\nallow_cleartext = true\n')
    assert read_site_file(path).admin.host == "0.0.0.0"
    path.write_text('[admin]\nhost = "0.0.0.0"\ntls_cert = "c.pem"\ntls_key = "k.pem"\n')
    assert read_site_file(path).admin.tls


def test_endpoint_serves_and_follows_a_reload(graph, tmp_path):
    port, moved = free_port(), free_port()
    config = write_config(tmp_path / "site.toml", port)
    with FlowProcess([str(graph), "--config", str(config)], tmp_path / "flow.log") as proc:
        proc.wait_for_log(r"admin\.listening")
        url = f"http://127.0.0.1:{port}"
        proc.wait_for_log(r"graph\.started")

        healthz = httpx.get(url + "/healthz")
        assert healthz.status_code == 200
        assert healthz.json()["healthy"] is True and healthz.json()["unhealthy_lanes"] == {}
        assert healthz.json()["graph"] == "demo" and list(healthz.json()["lanes"]) == ["ticks"]
        for _ in range(100):  # until health.json shows the graph running (written each second)
            cli = json.loads(run_flow(["status", str(graph), "--config", str(config),
                                       "--json"]).stdout)
            if cli["running"] and all(n["state"] == "running" for n in cli["nodes"]):
                break
            time.sleep(0.1)
        assert httpx.get(url + "/status").json() == cli

        families = {f.name: f for f in text_string_to_metric_families(
            httpx.get(url + "/metrics").text)}
        states = {(s.labels["node"], s.labels["state"]): s.value
                  for s in families["dicomflow_node_state"].samples}
        assert states[("sink", "running")] == 1 and states[("sink", "failed")] == 0
        assert families["dicomflow_reloads"].samples[0].value == 0

        page = httpx.get(url + "/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "<script>" not in page.text and "<b>bold" not in page.text
        assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in page.text
        assert 'href="/trace/1.2.3"' in page.text and 'http-equiv="refresh"' in page.text
        trace = httpx.get(url + "/trace/1.2.3")
        assert trace.status_code == 200 and "&lt;i&gt;hop&lt;/i&gt;" in trace.text
        assert "<i>" not in trace.text
        assert httpx.post(url + "/status").status_code == 405
        assert httpx.head(url + "/status").status_code == 200

        write_config(config, moved)
        proc.signal(signal.SIGHUP)
        proc.wait_for_log(r"admin\.listening", count=2)
        wait_for_port(moved)
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/healthz")
        url = f"http://127.0.0.1:{moved}"
        proc.wait_for_log(r"graph\.started", count=2)
        assert httpx.get(url + "/healthz").status_code == 200
        reloads = [f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)
                   if f.name == "dicomflow_reloads"]
        assert reloads[0].samples[0].value == 1

        write_config(config, moved, extra="refresh_s = 3\n")  # same port, new settings
        proc.signal(signal.SIGHUP)
        proc.wait_for_log(r"admin\.listening", count=3)
        assert 'content="3"' in httpx.get(url + "/").text
        proc.signal(signal.SIGTERM)
        assert proc.wait(15) == 0


def test_an_admin_port_in_use_is_a_one_line_error(graph, tmp_path):
    port = free_port()
    with FlowProcess([str(graph), "--config", str(write_config(tmp_path / "a.toml", port))],
                     tmp_path / "first.log") as first:
        first.wait_for_log(r"admin\.listening")
        second = run_flow([str(graph), "--config", str(write_config(tmp_path / "b.toml", port))],
                          timeout=30)
        assert second.returncode == 1
        assert f"flow: error: [admin]: cannot serve on 127.0.0.1:{port}" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.alive()


def test_endpoint_serves_https_with_tls_files(graph, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nodes" / "dimse"))
    from dimse_support import make_pki  # a CA and a server certificate for 127.0.0.1

    pki = make_pki(tmp_path / "pki")
    port = free_port()
    config = write_config(tmp_path / "site.toml", port, extra=(
        f'host = "127.0.0.1"\ntls_cert = "{pki["server_cert"]}"\n'
        f'tls_key = "{pki["server_key"]}"\n'))
    with FlowProcess([str(graph), "--config", str(config)], tmp_path / "flow.log") as proc:
        proc.wait_for_log(r"admin\.listening url=https://")
        verified = httpx.get(f"https://127.0.0.1:{port}/healthz", verify=ssl.create_default_context(cafile=pki["ca"]))
        assert verified.status_code == 200
        with pytest.raises(httpx.ConnectError):  # an unknown CA is not trusted
            httpx.get(f"https://127.0.0.1:{port}/healthz")
        with pytest.raises(httpx.RemoteProtocolError):  # no cleartext beside it
            httpx.get(f"http://127.0.0.1:{port}/healthz")
