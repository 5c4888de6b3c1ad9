"""pynetdicom's and pydicom's own log records on a hostile network (issue 17): one structured
line each, their text (which quotes what the peer sent) withheld at INFO+, tracebacks only
at DEBUG, and a flood of identical ones throttled to a bounded number of lines."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import textwrap
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from pynetdicom import AE
from pynetdicom.sop_class import Verification

import nodes  # noqa: F401  (registers pynetdicom/pydicom as foreign, the DICOM safe fields)
from flow._log import BURST, flush
from support.flowproc import FlowProcess
from support.logs import logging_to
from support.peers import free_port
from support.synth import CANARY, CANARY_ID, CANARY_PARTS

LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR) \S+")


def associate_rq_quoting(text: str) -> bytes:
    """An A-ASSOCIATE-RQ whose Application Context item holds ``text`` (pydicom and
    pynetdicom both quote that value in their warnings) followed by a broken item, so that
    pynetdicom's decoder fails: its error is logged with the exception."""
    value = (text * 3).encode()[:64]
    items = struct.pack(">BBH", 0x10, 0, len(value)) + value + b"\x20\x00\xff\xff"
    body = b"\x00\x01\x00\x00" + b"DICOMFLOW".ljust(16) + b"MODALITY".ljust(16) + bytes(32)
    return struct.pack(">BBL", 0x01, 0, len(body + items)) + body + items


GARBAGE = [
    associate_rq_quoting(CANARY),
    b"\x09\x00\x00\x00\x00\x04" + CANARY.encode(),                        # unknown PDU type
    b"\x01\x00\x00\x00\x10\x00" + b"\x00\x01" + CANARY.encode(),          # truncated RQ
    b"\x01\x00\xff\xff\xff\xff" + bytes(16),                              # a 4 GiB PDU length
]


def hit(port: int, data: bytes, timeout: float = 10.0) -> None:
    """Send ``data`` on a fresh connection, half-close, read until the peer closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        try:
            while sock.recv(4096):
                pass
        except OSError:  # a reset is an answer too
            pass


@contextmanager
def plain_scp() -> Iterator[int]:
    """pynetdicom's own Verification SCP in this process (its logs go to our handler)."""
    ae = AE(ae_title="PLAIN")
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    try:
        yield port
    finally:
        server.shutdown()


def no_phi(text: str) -> None:
    for part in (*CANARY_PARTS, CANARY_ID):
        assert part not in text


def test_a_pynetdicom_error_with_its_exception_is_one_line_without_text_at_info():
    with plain_scp() as port, logging_to("INFO") as stream:
        hit(port, associate_rq_quoting(CANARY))
        flush()
        text = stream.getvalue()
    lines = text.splitlines()
    assert lines and all(LINE.match(line) for line in lines), text  # no traceback lines
    (error,) = [line for line in lines if "error_class=" in line and "pynetdicom.dul" in line]
    assert " ERROR log.foreign logger=pynetdicom.dul source=dul._read_pdu_data:" in error
    assert "Traceback" not in text and "message=" not in text
    no_phi(text)  # pydicom and pynetdicom both quoted the canary in their warnings


def test_at_debug_the_pynetdicom_text_and_traceback_are_shown():
    with plain_scp() as port, logging_to("DEBUG") as stream:
        hit(port, associate_rq_quoting("Synthetic^Debug"))
        text = stream.getvalue()
    assert "Traceback (most recent call last):" in text and "pynetdicom/pdu.py" in text
    assert "Synthetic^Debug" in text  # DEBUG is for a developer's synthetic data only


def test_a_flood_of_bad_requests_is_bounded_and_summarised_with_its_count():
    connections = 40
    with plain_scp() as port, logging_to("INFO", json_lines=True, burst=3,
                                         window_s=3600) as stream:
        for _ in range(connections):
            hit(port, associate_rq_quoting(CANARY))
        flush()
        docs = [json.loads(line) for line in stream.getvalue().splitlines()]
    written = Counter(d["source"] for d in docs if d["event"] == "log.foreign")
    suppressed = {d["source"]: d["count"] for d in docs if d["event"] == "log.suppressed"}
    decode_error = next(s for s in written if s.startswith("dul._read_pdu_data"))
    assert written[decode_error] == 3 and suppressed[decode_error] == connections - 3
    assert all(n <= 3 for n in written.values()) and set(suppressed) <= set(written)
    no_phi(stream.getvalue())


GRAPH = textwrap.dedent('''
    from flow import Config, Graph
    from nodes.dimse import DicomListener, ListenConfig
    from nodes.store import Store, StoreConfig
    from support.storenodes import Sink

    class Site(Config, kw_only=True):
        data_dir: str
        listen: ListenConfig
        store: StoreConfig = StoreConfig()

    site = Graph.config(Site)
    store = Store(site.data_dir, site.store)
    graph = Graph(DicomListener(site.listen) >> store >> {"pacs": Sink(name="pacs_sink")},
                  name="garbage", state_dir=site.data_dir)
''')


def test_flow_receiving_garbage_on_its_dicom_port_writes_a_bounded_single_line_log(tmp_path):
    port = free_port()
    (tmp_path / "site.py").write_text(GRAPH)
    (tmp_path / "site.toml").write_text(textwrap.dedent(f'''
        data_dir = "{tmp_path / 'data'}"
        [listen]
        host = "127.0.0.1"
        port = {port}
        ae_title = "DICOMFLOW"
        calling_ae_titles = ["MODALITY"]
        acse_timeout_ms = 2000
        drain_ms = 500
        [store]
        min_free_disk_mb = 0
    '''))
    flow = FlowProcess(["run", str(tmp_path / "site.py"), "--config", str(tmp_path / "site.toml")],
                       tmp_path / "flow.log")
    try:
        flow.wait_for_log(r"dimse\.listening")
        for i in range(50):
            hit(port, GARBAGE[i % len(GARBAGE)] if i % 5 else os.urandom(200))
        flow.signal(signal.SIGTERM)
        assert flow.wait(30) == 0
    finally:
        flow.stop()
    text = flow.output()
    lines = text.splitlines()
    assert all(LINE.match(line) for line in lines), text  # one line per event, no tracebacks
    foreign = Counter(line.split(" source=")[1].split()[0] for line in lines
                      if " log.foreign " in line)
    summaries = Counter(line.split(" source=")[1].split()[0] for line in lines
                        if " log.suppressed " in line)
    assert all(n <= BURST for n in foreign.values()), foreign  # the window is 60 s
    assert all(n == 1 for n in summaries.values()) and set(summaries) <= set(foreign)
    assert len(lines) < 100, text
    no_phi(text)
