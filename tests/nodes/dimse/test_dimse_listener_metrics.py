"""The listener's figures for /metrics (issue 18) against DCMTK storescu: objects, bytes and
C-STORE answers by status (0x0000, 0xA700, 0xA701, 0xA702), associations rejected by reason
(calling AE, called AE, limit, TLS)."""

from __future__ import annotations

import os
import sys

import pytest
import trio

from nodes.dimse import DicomListener

sys.path.insert(0, os.path.dirname(__file__))
from dimse_support import (Committer, listen_config, make_pki, running,  # noqa: E402
                           storescu, study)

pytestmark = pytest.mark.peer("dcmtk")


def figures(listener: DicomListener) -> dict[tuple[str, tuple], float]:
    return {(m.name, tuple(sorted(m.labels.items()))): m.value for m in listener.metrics()}


async def test_rejections_are_counted_by_reason_and_answers_by_status(tmp_path):
    files = list(study(tmp_path / "study").values())[:4]  # the uncompressed ones
    cfg = listen_config(calling_ae_titles=["MODALITY"], strict_called_ae=True)
    listener, sink = DicomListener(cfg), Committer(name="sink")
    async with running(listener >> sink, listener=listener):
        ok = await trio.to_thread.run_sync(lambda: storescu(cfg.port, files))
        intruder = await trio.to_thread.run_sync(lambda: storescu(cfg.port, files[:1],
                                                                  calling="INTRUDER"))
        misdialled = await trio.to_thread.run_sync(lambda: storescu(cfg.port, files[:1],
                                                                    called="SOMEONE"))
        seen = figures(listener)
    assert ok.returncode == 0, ok.stderr[-1500:]
    assert intruder.returncode != 0 and misdialled.returncode != 0
    node = (("node", "dicom_listener"),)
    assert seen[("associations_rejected", (*node, ("reason", "calling_ae")))] == 1
    assert seen[("associations_rejected", (*node, ("reason", "called_ae")))] == 1
    assert seen[("cstore_answers", (*node, ("status", "0x0000")))] == len(files)
    assert seen[("ingest_objects", (("ae_title", "DICOMFLOW"), *node))] == len(files)
    assert seen[("ingest_bytes", (("ae_title", "DICOMFLOW"), *node))] > 0
    assert seen[("associations", node)] == 1
    assert seen[("associations_open", node)] == 0


@pytest.mark.parametrize("server", ["budgeted", "pynetdicom"])
async def test_a_failed_tls_handshake_counts_as_rejected_for_tls(tmp_path, monkeypatch, server):
    if server == "pynetdicom":  # a pynetdicom without the budget's hooks: its own server
        from nodes.dimse import _pynetdicom
        monkeypatch.setattr(_pynetdicom, "budget_hooks_missing", lambda: "ACSE.send_reject")
    pki = make_pki(tmp_path / "pki")
    files = list(study(tmp_path / "study").values())[:1]
    cfg = listen_config(tls_cert=str(pki["server_cert"]), tls_key=str(pki["server_key"]),
                        tls_ca=str(pki["ca"]), require_client_cert=True,
                        acse_timeout_ms=500, drain_ms=1000)
    listener, sink = DicomListener(cfg), Committer(name="sink")
    async with running(listener >> sink, listener=listener):
        cleartext = await trio.to_thread.run_sync(lambda: storescu(cfg.port, files))
        with trio.fail_after(20):
            while figures(listener).get(("associations_rejected",
                                         (("node", "dicom_listener"), ("reason", "tls")))) != 1:
                await trio.sleep(0.1)
    assert cleartext.returncode != 0
    assert sink.arrivals == []


@pytest.mark.parametrize("mode, status", [("full", "0xA700"), ("fail", "0xA701"),
                                          ("hang", "0xA702")])
async def test_out_of_resources_answers_are_counted_by_status(tmp_path, mode, status):
    path = list(study(tmp_path / "study").values())[0]
    cfg = listen_config(commit_timeout_ms=300)
    listener, sink = DicomListener(cfg), Committer(mode, name="sink")
    async with running(listener >> sink, listener=listener):
        await trio.to_thread.run_sync(lambda: storescu(cfg.port, [path]))
        seen = figures(listener)
    node = (("node", "dicom_listener"),)
    assert seen[("cstore_answers", (*node, ("status", status)))] == 1
    assert ("cstore_answers", (*node, ("status", "0x0000"))) not in seen
    assert seen[("ingest_objects", (("ae_title", "DICOMFLOW"), *node))] == 0


async def test_an_association_over_the_limit_is_rejected_for_limit(tmp_path):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    path = list(study(tmp_path / "study").values())[0]
    cfg = listen_config(max_associations=1)
    listener, sink = DicomListener(cfg), Committer(name="sink")
    async with running(listener >> sink, listener=listener):
        ae = AE("HOLDER")
        ae.add_requested_context(Verification)
        held = await trio.to_thread.run_sync(
            lambda: ae.associate("127.0.0.1", cfg.port, ae_title="DICOMFLOW"))
        try:
            assert held.is_established
            over = await trio.to_thread.run_sync(lambda: storescu(cfg.port, [path]))
            seen = figures(listener)
        finally:
            await trio.to_thread.run_sync(held.release)
    assert over.returncode != 0
    node = (("node", "dicom_listener"),)
    assert seen[("associations_rejected", (*node, ("reason", "limit")))] == 1
    assert seen[("associations_open", node)] == 1
