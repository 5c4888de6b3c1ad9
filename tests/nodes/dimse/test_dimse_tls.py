"""DIMSE over TLS against DCMTK: storescu +tls → listener, sender → storescp +tls, mTLS."""

from __future__ import annotations

import os
import sys

import pytest
import trio

from nodes.delivery import Recorder
from nodes.dimse import CStoreSender, DicomListener
from nodes.outcome import Delivered, Transient

sys.path.insert(0, os.path.dirname(__file__))
from dimse_support import (Committer, Feed, Storescp, after_meta, deliveries,  # noqa: E402
                           listen_config, make_pki, pacs_config, run_to_end, running, send_all,
                           storescu, study)

pytestmark = pytest.mark.peer("dcmtk")


@pytest.fixture
def pki(tmp_path):
    return make_pki(tmp_path / "pki")


def _tls_listener(pki, **kw):
    return listen_config(tls_cert=str(pki["server_cert"]), tls_key=str(pki["server_key"]),
                         tls_ca=str(pki["ca"]), **kw)


async def test_storescu_over_mtls_reaches_the_listener(tmp_path, pki):
    files = study(tmp_path / "study")
    cfg = _tls_listener(pki, require_client_cert=True)
    listener, sink = DicomListener(cfg), Committer(name="sink")
    path = list(files.values())[0]
    async with running(listener >> sink, listener=listener):
        result = await trio.to_thread.run_sync(lambda: storescu(
            cfg.port, [path], extra=["+tls", str(pki["client_key"]), str(pki["client_cert"]),
                                     "+cf", str(pki["ca"])]))
    assert result.returncode == 0, result.stderr
    assert after_meta(sink.arrivals[0][1]) == after_meta(path)


async def test_require_client_cert_refuses_a_client_without_one(tmp_path, pki):
    files = study(tmp_path / "study")
    # Refused handshakes leave pynetdicom waiting for an A-ASSOCIATE-RQ until the ACSE
    # timeout; keep it short so the stop does not wait for them.
    cfg = _tls_listener(pki, require_client_cert=True, acse_timeout_ms=500, drain_ms=1000)
    listener, sink = DicomListener(cfg), Committer(name="sink")
    async with running(listener >> sink, listener=listener):
        anonymous = await trio.to_thread.run_sync(lambda: storescu(
            cfg.port, list(files.values())[:1], extra=["+tla", "+cf", str(pki["ca"])]))
        cleartext = await trio.to_thread.run_sync(lambda: storescu(
            cfg.port, list(files.values())[:1]))
    assert anonymous.returncode != 0
    assert cleartext.returncode != 0
    assert sink.arrivals == []


async def test_sender_over_mtls_delivers_byte_identical(tmp_path, pki):
    files = study(tmp_path / "study")
    with Storescp(tmp_path / "pacs", extra=["+tls", str(pki["server_key"]),
                                            str(pki["server_cert"]), "+cf",
                                            str(pki["ca"])]) as scp:
        cfg = pacs_config(scp.port, tls=True, tls_ca=str(pki["ca"]),
                          tls_cert=str(pki["client_cert"]), tls_key=str(pki["client_key"]))
        recorder, got = await send_all(files, scp, CStoreSender(cfg))
    assert recorder.outcomes == {uid: Delivered() for uid in files}
    for uid, path in files.items():
        assert got[uid] == after_meta(path)


async def test_sender_refuses_a_pacs_its_ca_does_not_vouch_for(tmp_path, pki):
    other = make_pki(tmp_path / "other")
    files = study(tmp_path / "study")
    recorder = Recorder()
    with Storescp(tmp_path / "pacs", extra=["+tls", str(other["server_key"]),
                                            str(other["server_cert"]), "-ic"]) as scp:
        cfg = pacs_config(scp.port, tls=True, tls_ca=str(pki["ca"]))
        items = deliveries(recorder, list(files.values())[:1])
        await run_to_end(Feed(items, name="feed") >> CStoreSender(cfg),
                         egress=[f"127.0.0.1:{cfg.port}"])
    assert recorder.outcomes[items[0].uid] == Transient(
        f"TLS handshake failed 127.0.0.1:{cfg.port}")


async def test_a_silent_client_does_not_stall_the_tls_listener(tmp_path, pki):
    """pynetdicom handshakes in its one accept thread; ours happens per association."""
    import socket

    files = study(tmp_path / "study")
    cfg = _tls_listener(pki, acse_timeout_ms=1000, drain_ms=1000)
    listener, sink = DicomListener(cfg), Committer(name="sink")
    async with running(listener >> sink, listener=listener):
        with socket.create_connection(("127.0.0.1", cfg.port)):  # connects, says nothing
            result = await trio.to_thread.run_sync(lambda: storescu(
                cfg.port, list(files.values())[:1], timeout=20,
                extra=["+tls", str(pki["client_key"]), str(pki["client_cert"]),
                       "+cf", str(pki["ca"])]))
    assert result.returncode == 0, result.stderr
    assert len(sink.arrivals) == 1


async def test_tls_connections_that_never_request_an_association_are_closed_at_the_deadline(
        tmp_path, pki):
    """The negotiation deadline covers the TLS handshake and what follows it: a client that
    says nothing, and one that completes the handshake and then says nothing, are both
    closed by it (acse_timeout_ms is far beyond the test's bounds)."""
    import socket
    import ssl

    cfg = _tls_listener(pki, acse_timeout_ms=600_000, negotiation_timeout_ms=500)
    listener = DicomListener(cfg)
    client = ssl.create_default_context(cafile=str(pki["ca"]))
    client.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))

    def silent_after(handshake: bool) -> bytes:
        raw = socket.create_connection(("127.0.0.1", cfg.port), timeout=30)
        sock = client.wrap_socket(raw, server_hostname="127.0.0.1") if handshake else raw
        with sock:
            try:
                return sock.recv(1)
            except (ConnectionResetError, ssl.SSLError):
                return b""

    async with running(listener >> Committer(name="sink"), listener=listener):
        plain = await trio.to_thread.run_sync(silent_after, False)
        handshaken = await trio.to_thread.run_sync(silent_after, True)
    assert (plain, handshaken) == (b"", b"")
