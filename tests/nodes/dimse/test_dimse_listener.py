"""DicomListener against real DCMTK peers (storescu, echoscu) on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import trio

from nodes.dimse import DicomListener
from support.peers import need

sys.path.insert(0, os.path.dirname(__file__))
from dimse_support import Committer, after_meta, listen_config, running, send_as_is, study  # noqa: E402

pytestmark = pytest.mark.peer("dcmtk")


async def test_mixed_study_arrives_byte_identical_with_envelope(tmp_path):
    files = study(tmp_path / "study")
    cfg = listen_config(calling_ae_titles=["MODALITY"])
    listener, sink = DicomListener(cfg), Committer(name="sink")
    async with running(listener >> sink, listener=listener):
        results = await trio.to_thread.run_sync(lambda: send_as_is(cfg.port, list(files.values())))
    assert [r.returncode for r in results] == [0] * len(results), [r.stderr for r in results]
    got = sink.by_uid()
    assert set(got) == set(files)
    for uid, path in files.items():
        assert after_meta(got[uid]) == after_meta(path), uid
    for arrival, data in sink.arrivals:
        env = arrival.envelope
        assert env.calling_ae == "MODALITY" and env.called_ae == "DICOMFLOW"
        assert env.peer.startswith("127.0.0.1:")
        assert env.modality in ("CT", "MR", "SR") and env.study_instance_uid
        assert env.transfer_syntax_uid == _ts(files[env.sop_instance_uid])


def _ts(path):
    from pydicom import dcmread
    return str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
