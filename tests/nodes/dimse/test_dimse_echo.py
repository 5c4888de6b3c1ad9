"""``flow echo`` and ``flow check --probe`` against DCMTK storescp, run as an operator does."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest

from support.flowproc import run_flow
from support.peers import free_port

sys.path.insert(0, os.path.dirname(__file__))
from dimse_support import Storescp, make_pki, storescp_profile  # noqa: E402

pytestmark = pytest.mark.peer("dcmtk")


def test_flow_echo_succeeds_against_storescp(tmp_path):
    with Storescp(tmp_path / "pacs") as scp:
        result = run_flow(["echo", "127.0.0.1", str(scp.port), "--called-aet", "PACS"])
    assert result.returncode == 0, result.stderr
    assert f"C-ECHO 127.0.0.1:{scp.port} (PACS): success 0x0000" in result.stdout


def test_flow_echo_says_why_it_failed(tmp_path):
    port = free_port()
    down = run_flow(["echo", "127.0.0.1", str(port), "--called-aet", "PACS"])
    assert down.returncode == 1
    assert f"failed: connection refused 127.0.0.1:{port}" in down.stderr
    with Storescp(tmp_path / "pacs", extra=["--refuse"]) as scp:
        refused = run_flow(["echo", "127.0.0.1", str(scp.port), "--called-aet", "PACS"])
    assert refused.returncode == 1
    assert "association rejected (permanent) result=1 source=1 reason=1" in refused.stderr


def test_flow_echo_over_mtls(tmp_path):
    pki = make_pki(tmp_path / "pki")
    with Storescp(tmp_path / "pacs", extra=["+tls", str(pki["server_key"]),
                                            str(pki["server_cert"]), "+cf",
                                            str(pki["ca"])]) as scp:
        ok = run_flow(["echo", "127.0.0.1", str(scp.port), "--called-aet", "PACS",
                       "--tls-ca", str(pki["ca"]), "--tls-cert", str(pki["client_cert"]),
                       "--tls-key", str(pki["client_key"])])
        no_cert = run_flow(["echo", "127.0.0.1", str(scp.port), "--called-aet", "PACS",
                            "--tls-ca", str(pki["ca"])])
    assert ok.returncode == 0, ok.stderr
    assert "over TLS" in ok.stdout
    assert no_cert.returncode == 1 and "failed:" in no_cert.stderr


GRAPH = '''
import os, sys
sys.path.insert(0, {support!r})
from flow import Config, Graph
from nodes.dimse import CStoreSender, PacsConfig
from dimse_support import Feed

class Site(Config):
    pacs: PacsConfig

site = Graph.config(Site)
graph = Graph(Feed([], name="feed") >> CStoreSender(site.pacs), name="probe")
'''


def test_flow_check_probe_reports_accepted_classes(tmp_path):
    profile = storescp_profile(tmp_path / "scp.cfg", ["CTImageStorage", "MRImageStorage"])
    with Storescp(tmp_path / "pacs", accept_all=False,
                  extra=["-xf", str(profile), "Only"]) as scp:
        (tmp_path / "g.py").write_text(GRAPH.format(support=os.path.dirname(__file__)))
        (tmp_path / "g.toml").write_text(textwrap.dedent(f"""
            [pacs]
            host = "127.0.0.1"
            port = {scp.port}
            called_ae_title = "PACS"
            [egress]
            allowed_tcp = ["127.0.0.1:{scp.port}"]
        """))
        result = run_flow(["check", str(tmp_path / "g.py"), "--probe"])
    assert result.returncode == 0, result.stderr
    line = next(l for l in result.stdout.splitlines() if l.startswith("probe pacs_sender"))
    assert line.startswith("probe pacs_sender: ok")
    assert '"CT Image Storage": ["Implicit VR Little Endian", "Explicit VR Little Endian", ' \
           '"Deflated Explicit VR Little Endian", "JPEG Baseline (Process 1)", "JPEG Lossless, Non-Hierarchical, First-Order ' \
           'Prediction (Process 14 [Selection Value 1])", "RLE Lossless"]' in line
    assert '"Comprehensive SR Storage"' in line.split('"refuses"')[1]
