"""The pynetdicom adapter checks its internals at start and falls back loudly.

With one internal of a group gone (or no longer called the way the adapter calls it), the
listener and the sender take pynetdicom's public path for that group, log ONE WARNING
naming what is missing, and objects still go storescu → listener → Store → sender →
storescp byte for byte.

pynetdicom itself calls most of these internals, so deleting one would break pynetdicom
before the adapter: such an internal is replaced by a wrapper that still works for
pynetdicom but no longer has the signature (or source) the adapter checks for. What
pynetdicom does not call on this path (``ACSE.send_reject``) is deleted outright.
"""

from __future__ import annotations

import logging
import os
import sys

import pytest
import trio
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.presentation import PresentationContext

from nodes.dimse import CStoreSender, DicomListener, _pynetdicom
from nodes.dimse._pynetdicom import internals, reactor, stores
from nodes.store import Store, StoreConfig, admin
from support.synth import CANARY_ID, CANARY_PARTS, ct, write

sys.path.insert(0, os.path.dirname(__file__))
from dimse_support import (Storescp, after_meta, listen_config, pacs_config,  # noqa: E402
                           running, send_as_is, study)

FAST = StoreConfig(min_free_disk_mb=0, retry_initial_s=0.2, retry_max_s=0.5,
                   retry_jitter=0.0, poll_s=0.1)


def test_the_pinned_pynetdicom_has_every_internal_the_adapter_relies_on():
    assert internals.verify() == {}
    assert {i.group for i in internals.INTERNALS} == set(internals.GROUPS)


def _changed(original):
    """``original`` behind another signature (and source): pynetdicom still works."""
    def changed(self, *args, **kwargs):
        return original(self, *args, **kwargs)
    return changed


def _remove(monkeypatch, group: str) -> str:
    """Take one internal of ``group`` away; returns how the warning names it."""
    if group == "receive":
        monkeypatch.setattr(DIMSEServiceProvider, "receive_primitive",
                            _changed(DIMSEServiceProvider.receive_primitive))
        return "DIMSEServiceProvider.receive_primitive"
    if group == "answer":
        monkeypatch.setattr(Association, "_serve_request", _changed(Association._serve_request))
        return "Association._serve_request"
    if group == "send":
        monkeypatch.setattr(Association, "send_c_store", _changed(Association.send_c_store))
        return "Association.send_c_store"
    if group == "contexts":
        monkeypatch.setattr(PresentationContext, "__init__",
                            _changed(PresentationContext.__init__))
        return "PresentationContext._abstract_syntax"
    if group == "spill":
        import pynetdicom.dimse_messages as messages

        def write_file_meta_info(*args, _original=messages.write_file_meta_info, **kwargs):
            return _original(*args, **kwargs)
        monkeypatch.setattr(messages, "write_file_meta_info", write_file_meta_info)
        return "write_file_meta_info"
    if group == "reactor":
        monkeypatch.setattr(DULServiceProvider, "stop_dul", _changed(DULServiceProvider.stop_dul))
        return "DULServiceProvider.stop_dul/kill_dul"
    assert group == "budget"
    monkeypatch.delattr(ACSE, "send_reject")
    return "ACSE.send_reject"


@pytest.mark.peer("dcmtk")
@pytest.mark.parametrize("group", ["none", "receive", "answer", "send", "spill", "contexts",
                                   "budget", "reactor"])
async def test_without_an_internal_objects_still_flow_byte_identical_and_one_warning_says_why(
        tmp_path, monkeypatch, caplog, group):
    _pynetdicom.configure()  # everything in place: the warning state starts clean
    fast = {"receive": 0, "answer": 0, "send": 0}
    for name, key in (("_request", "receive"), ("serve_store", "answer"),
                      ("_write_store_rq", "send")):
        def counting(*args, _original=getattr(stores, name), _key=key):
            result = _original(*args)
            fast[_key] += result is not False
            return result
        monkeypatch.setattr(stores, name, counting)
    named = _remove(monkeypatch, group) if group != "none" else ""

    files = study(tmp_path / "study")
    big = ct(rows=1100, cols=1100)  # 2.4 MB: spooled by the listener, streamed by the sender
    files[str(big.SOPInstanceUID)] = write(big, tmp_path / "study" / "big.dcm")
    caplog.set_level(logging.INFO)
    with Storescp(tmp_path / "pacs") as scp:
        listener = DicomListener(listen_config(calling_ae_titles=["MODALITY"]))
        store = Store(tmp_path / "data", FAST)
        sender = CStoreSender(pacs_config(scp.port, idle_release_ms=300))
        async with running(listener >> store >> {"pacs": sender}, listener=listener,
                           egress=[f"127.0.0.1:{scp.port}"]):
            budgeted = isinstance(listener._server, _pynetdicom.BudgetedServer)
            event_driven = reactor.installed()
            port = listener.address[1]
            results = await trio.to_thread.run_sync(lambda: send_as_is(port, list(files.values())))
            assert [r.returncode for r in results] == [0] * len(results)
            with trio.fail_after(60):
                while admin.report(store)["lanes"]["pacs"]["delivered"] < len(files):
                    await trio.sleep(0.05)
        got = scp.wait_files(len(files))
    assert set(got) == set(files)
    for uid, path in files.items():
        assert got[uid] == after_meta(path), uid

    warned = [r for r in caplog.records if r.getMessage() in (
        "dimse.adapter_fallback", "dimse.connection_budget_unavailable")]
    if group == "none":
        assert warned == []
        assert all(fast.values()) and budgeted and event_driven, fast
        return
    assert event_driven == (group != "reactor")
    assert [(r.getMessage(), r.levelno) for r in warned] == [
        ("dimse.connection_budget_unavailable" if group == "budget" else
         "dimse.adapter_fallback", logging.WARNING)]
    text = warned[0].fields["reason" if group == "budget" else "missing"]
    assert named in text
    assert budgeted == (group != "budget")
    for key, used in fast.items():
        assert bool(used) == (key != group), (key, fast)
    if group == "contexts":
        assert _pynetdicom._direct == [False]
    for part in (*CANARY_PARTS, CANARY_ID):
        assert part not in str(warned[0].fields)


def test_a_peer_checks_the_internals_only_when_this_process_never_did(monkeypatch):
    """Checking the internals reads pynetdicom's source (~0.1 s): done by configure() when
    a listener or sender starts, not again for the AE of every association a Peer opens."""
    calls = []
    real = internals.verify
    monkeypatch.setattr(internals, "verify", lambda: calls.append(1) or real())
    _pynetdicom.configure()
    assert len(calls) == 1
    _pynetdicom.Peer("127.0.0.1", 104, "PACS").ae()
    assert len(calls) == 1
    monkeypatch.setattr(_pynetdicom, "_done", [False])  # a process that never configured
    _pynetdicom.Peer("127.0.0.1", 104, "PACS").ae()
    assert len(calls) == 2
