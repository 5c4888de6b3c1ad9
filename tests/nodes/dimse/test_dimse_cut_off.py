"""An association that dies mid-object leaves nothing (issue 17): no partial object
committed, forwarded, or left in a spool, for an object received in memory and for one
spilled to the listener's spool file.

    peer ──▶ DicomListener ──▶ Store ──▶ pacs: CStoreSender ──▶ storescp

The peer is a raw socket that negotiates, sends the C-STORE request and part of the data
set, then resets the connection; or DCMTK's storescu killed with SIGKILL mid-transfer.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import struct
import subprocess
import sys
import termios

import pytest
import trio
from pydicom.uid import ExplicitVRLittleEndian

from nodes.dimse import CStoreSender, DicomListener, parse_file_meta
from nodes.dimse._pynetdicom import INLINE_MAX
from nodes.dimse.cstore import encode_store_rq
from nodes.store import Store, StoreConfig, admin
from support.peers import need
from support.synth import large_ct

sys.path.insert(0, os.path.dirname(__file__))
from dimse_support import (Storescp, answer, associate_rq, connect_from, listen_config,  # noqa: E402
                           p_data, pacs_config, running, storescu)

pytestmark = pytest.mark.peer("dcmtk")

CT = "1.2.840.10008.5.1.4.1.1.2"


def _unread(sock: socket.socket) -> int:
    """Bytes the kernel holds for ``sock`` that its reader has not taken yet."""
    buf = fcntl.ioctl(sock.fileno(), termios.FIONREAD, struct.pack("i", 0))
    return struct.unpack("i", buf)[0]


async def _until(predicate, timeout: float = 30.0) -> None:
    with trio.fail_after(timeout):
        while not await trio.to_thread.run_sync(predicate):
            await trio.sleep(0.02)


def _site(tmp_path, pacs_port: int):
    data = tmp_path / "data"
    listener = DicomListener(listen_config(spool_dir=str(data / "incoming")))
    store = Store(data, StoreConfig(min_free_disk_mb=0, poll_s=0.1))
    sender = CStoreSender(pacs_config(pacs_port, idle_release_ms=300))
    return listener, store, listener >> store >> {"pacs": sender}


def _left_nothing(tmp_path, store, scp, uid: str) -> None:
    data = tmp_path / "data"
    assert os.listdir(data / "incoming") == []  # the listener's spool
    assert os.listdir(data / "spool") == []  # the Store's encrypted spool
    trace = admin.trace(store, uid)
    assert (trace["stored"], trace["lanes"]) == (None, {}), trace
    assert admin.report(store)["store"]["objects"] == 0
    assert list(scp.directory.iterdir()) == []  # nothing forwarded


@pytest.mark.parametrize("megabytes", [1, 6], ids=["in_memory", "spooled"])
async def test_a_connection_reset_mid_object_leaves_nothing(tmp_path, megabytes):
    path = large_ct(tmp_path / "ct.dcm", megabytes=megabytes)
    part10 = path.read_bytes()
    meta = parse_file_meta(part10)
    dataset = part10[meta.dataset_offset:]
    assert (len(dataset) > INLINE_MAX) == (megabytes > 2)
    with Storescp(tmp_path / "pacs") as scp:
        listener, store, pipeline = _site(tmp_path, scp.port)
        async with running(pipeline, listener=listener, egress=[f"127.0.0.1:{scp.port}"]):
            port = listener.address[1]
            sock = connect_from("127.0.0.1", port)
            sock.sendall(associate_rq(contexts=[(CT, ExplicitVRLittleEndian)]))
            assert await trio.to_thread.run_sync(answer, sock) == "A-ASSOCIATE-AC"
            sock.sendall(p_data(1, 0x03, encode_store_rq(1, CT, meta.sop_instance_uid, 0)))
            half = dataset[:len(dataset) // 2]
            for at in range(0, len(half), 16_000):
                sock.sendall(p_data(1, 0x00, half[at:at + 16_000]))
            server_side = listener._server.active_associations[0].dul.socket.socket
            await _until(lambda: _unread(server_side) == 0)  # the listener has it all
            if megabytes > 2:
                assert len(os.listdir(tmp_path / "data" / "incoming")) == 1  # spilled
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # RST
            await _until(lambda: not listener._server.active_associations)
            _left_nothing(tmp_path, store, scp, meta.sop_instance_uid)
            # The modality sends it again, whole: it is stored and forwarded as usual.
            again = await trio.to_thread.run_sync(lambda: storescu(port, [path]))
            assert again.returncode == 0, again.stderr
            await _until(lambda: admin.report(store)["lanes"]["pacs"]["delivered"] == 1)
    assert list(scp.wait_files(1)) == [meta.sop_instance_uid]


async def test_storescu_killed_mid_object_leaves_nothing(tmp_path):
    path = large_ct(tmp_path / "big.dcm", megabytes=150)
    uid = parse_file_meta(path.read_bytes()[:4096]).sop_instance_uid
    with Storescp(tmp_path / "pacs") as scp:
        listener, store, pipeline = _site(tmp_path, scp.port)
        async with running(pipeline, listener=listener, egress=[f"127.0.0.1:{scp.port}"]):
            exe = need("storescu")["storescu"]
            proc = subprocess.Popen([exe, "-aet", "MODALITY", "-aec", "DICOMFLOW", "127.0.0.1",
                                     str(listener.address[1]), str(path)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            incoming = tmp_path / "data" / "incoming"
            try:
                await _until(lambda: bool(os.listdir(incoming)))  # past 2 MiB: spilled
                assert proc.poll() is None, "the object arrived before the test could cut it"
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
            await _until(lambda: not listener._server.active_associations)
            _left_nothing(tmp_path, store, scp, uid)
