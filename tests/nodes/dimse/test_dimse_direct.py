"""A listener followed by a Store in one process: each C-STORE handler's thread commits its
arrival itself (the Store serves the edge's flow.Direct), large objects through the spool
as well, and answers Success only once that commit is durable: in the Store's ingest
journal (LMDB takes it in right behind), or with ``journal_mb = 0`` in LMDB itself."""

from __future__ import annotations

import os
import sys

import pytest
import trio

from nodes.dimse import DicomListener
from nodes.store import Store, StoreConfig, admin
from support.synth import CANARY_ID, CANARY_PARTS, ct, write

sys.path.insert(0, os.path.dirname(__file__))
from dimse_support import listen_config, running, send_as_is, study  # noqa: E402

pytestmark = pytest.mark.peer("dcmtk")


@pytest.mark.parametrize("journal_mb", [64, 0])
async def test_handler_threads_commit_their_arrivals_themselves(tmp_path, journal_mb):
    files = study(tmp_path / "study")
    big = ct(rows=1100, cols=1100)  # 2.4 MB: spooled, sealed in the handler's thread too
    files[str(big.SOPInstanceUID)] = write(big, tmp_path / "study" / "big.dcm")
    listener = DicomListener(listen_config())
    store = Store(tmp_path / "data", StoreConfig(min_free_disk_mb=0, journal_mb=journal_mb))
    async with running(listener >> store, listener=listener):
        served = listener._handover.direct
        assert served is not None and served.served
        port = listener.address[1]
        results = await trio.to_thread.run_sync(lambda: send_as_is(port, list(files.values())))
        assert [r.returncode for r in results] == [0] * len(results), results
        journal = store._require().journal
        if journal_mb:
            # Every Success came after its record was durable in the journal; LMDB takes
            # them in behind, in rounds the journal's applier thread leads.
            assert journal is not None and journal.appended == len(files)
            with trio.fail_after(20):
                while admin.report(store)["store"]["objects"] < len(files):
                    await trio.sleep(0.01)
            assert journal.backlog == 0
        else:
            # Every Success came after a commit: the objects are in the Store now.
            assert journal is None
            assert admin.report(store)["store"]["objects"] == len(files)
            assert store.stats["operations"] == len(files)
        stats = store.stats
        # No arrival went through the Store's channel and a worker thread: every round was
        # led by a handler thread or the applier's (the Store's own writes, none here, would
        # be Trio's).
        assert stats["rounds_in_caller"] == stats["commits"] >= 1
    assert not served.served  # the Store stopped serving when its run ended
    data_dir = tmp_path / "data"
    stored = [p for p in data_dir.rglob("*") if p.is_file()]
    assert len(list((data_dir / "spool").iterdir())) == 1  # the big object's sealed spool file
    assert any(p.name == "data.mdb" for p in stored)
    assert any(p.suffix == ".journal" for p in stored) == bool(journal_mb)
    for path in stored:
        data = path.read_bytes()
        for part in (*CANARY_PARTS, CANARY_ID):
            assert part.encode() not in data, path.name
