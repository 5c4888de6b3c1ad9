"""An association's two threads wait for work instead of polling (group ``reactor``).

pynetdicom's loops sleep 1 ms per look (``time.sleep`` in ``pynetdicom.dul`` and
``pynetdicom.association``); with the adapter's reactors installed, an idle association
makes no such call at all, and it still answers at once when work comes (C-ECHO, C-STORE,
release). The same test with pynetdicom's loops back in place shows the polling, so the
count is what tells them apart.
"""

from __future__ import annotations

import os
import sys
import time
import types

import pydicom
import pynetdicom.association
import pynetdicom.dul
import pytest
import trio
from pynetdicom import AE

from nodes.dimse import DicomListener, _pynetdicom
from nodes.dimse._pynetdicom import reactor
from support.synth import ct, write

sys.path.insert(0, os.path.dirname(__file__))
from dimse_support import Committer, listen_config, running  # noqa: E402
from test_dimse_foreign_log import GARBAGE, hit  # noqa: E402

IDLE_S = 0.5
CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


class Sleeps:
    """Counts ``time.sleep`` calls made from one pynetdicom module."""

    def __init__(self, module: types.ModuleType, monkeypatch) -> None:
        self.calls = 0
        real = module.time

        def sleep(seconds: float) -> None:
            self.calls += 1
            real.sleep(seconds)

        shim = types.SimpleNamespace(**{name: getattr(real, name) for name in dir(real)
                                        if not name.startswith("__")})
        shim.sleep = sleep
        monkeypatch.setattr(module, "time", shim)


def _exchange(port: int, dataset_path: str, sleeps: list[Sleeps]) -> dict:
    """Blocking: associate, stay idle IDLE_S, then echo, store and release."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.add_requested_context(CT, EXPLICIT_LE)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMFLOW")
    assert assoc.is_established
    time.sleep(0.1)  # both sides settled into their loops
    before = sum(s.calls for s in sleeps)
    time.sleep(IDLE_S)
    idle = sum(s.calls for s in sleeps) - before
    echo = assoc.send_c_echo()
    stored = assoc.send_c_store(dataset_path)
    assoc.release()
    return {"idle_sleeps": idle, "echo": echo.Status, "store": stored.Status,
            "released": assoc.is_released}


@pytest.mark.parametrize("loops", ["adapter", "pynetdicom"])
async def test_an_idle_association_sleeps_only_with_pynetdicoms_loops(tmp_path, monkeypatch,
                                                                      loops):
    _pynetdicom.configure()
    assert reactor.installed()
    if loops == "pynetdicom":
        monkeypatch.setattr(reactor, "install", lambda: None)  # configure() keeps it out
        reactor.uninstall()
    sleeps = [Sleeps(pynetdicom.dul, monkeypatch), Sleeps(pynetdicom.association, monkeypatch)]
    path = write(ct(), tmp_path / "ct.dcm")
    uid = str(pydicom.dcmread(path).SOPInstanceUID)
    listener = DicomListener(listen_config(calling_ae_titles=["MODALITY"]))
    sink = Committer()
    try:
        async with running(listener >> sink, listener=listener):
            port = listener.address[1]
            with trio.fail_after(30):
                result = await trio.to_thread.run_sync(_exchange, port, str(path), sleeps)
    finally:
        reactor.install()
    assert result["echo"] == result["store"] == 0x0000
    assert result["released"]
    assert [a.envelope.sop_instance_uid for a, _ in sink.arrivals] == [uid]
    if loops == "adapter":
        assert result["idle_sleeps"] == 0
    else:
        # Two associations × two loops, each ~1,000 sleeps a second: far above zero.
        assert result["idle_sleeps"] > 100, result


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", *GARBAGE])
async def test_a_connection_that_sends_garbage_frees_its_thread_at_once(tmp_path, data):
    """A connection whose first bytes are no valid A-ASSOCIATE-RQ: the DUL drops it, and the
    acceptor's thread, which waits for that request, ends with it instead of waiting out the
    ACSE timeout (30 s here)."""
    import threading

    cfg = listen_config(acse_timeout_ms=30_000)
    listener = DicomListener(cfg)
    async with running(listener >> Committer(name="sink"), listener=listener):
        before = set(threading.enumerate())
        await trio.to_thread.run_sync(lambda: [hit(cfg.port, data) for _ in range(3)])

        def left() -> list[str]:
            return [t.name for t in threading.enumerate()
                    if t not in before and not t.name.startswith("Trio thread")]

        with trio.move_on_after(10):  # a third of the ACSE timeout
            while left():
                await trio.sleep(0.05)
        assert left() == []
