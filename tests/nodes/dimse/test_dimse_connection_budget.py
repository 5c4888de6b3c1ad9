"""Connections that never finish negotiating cannot lock modalities out (issue 17).

The listener against raw sockets playing broken or hostile peers, and DCMTK playing the
modality that must get through meanwhile. Verdicts are outcomes (a storescu that succeeds,
a connection that is closed, bytes the listener refused to swallow), never durations:
where a deadline matters it is set far beyond the test's own bounds, so only the rule
under test can produce the outcome.
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import time

import pytest
import trio

from nodes.dimse import DicomListener
from nodes.dimse.budget import (MAX_ASSOCIATE_RQ, PDU_SLACK, ConnectionBudget, first_pdu_problem,
                                pdu_too_long)
from support.peers import need

sys.path.insert(0, os.path.dirname(__file__))
from dimse_support import (Committer, Storescp, answer, associate_rq, connect_from,  # noqa: E402
                           listen_config, read_pdu, running, send_as_is, still_open, storescu,
                           study, write_site)

pytestmark = pytest.mark.peer("dcmtk")

LONG_MS = 600_000  # a deadline no test waits for: only the rule under test can close


# -- the rules, without sockets ----------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_budget_bounds_pending_connections_overall_and_per_peer():
    budget = ConnectionBudget(total=3, per_peer=2, timeout_s=5, clock=Clock())
    assert budget.admit("a1", "10.0.0.1")[0] is not None
    assert budget.admit("a2", "10.0.0.1")[0] is not None
    record, why = budget.admit("a3", "10.0.0.1")
    assert record is None and why == ("2 connections from this address still negotiating "
                                      "(max_pending_per_peer)")
    assert budget.admit("b1", "10.0.0.2")[0] is not None
    record, why = budget.admit("c1", "10.0.0.3")
    assert record is None and why == "3 connections still negotiating (max_pending_connections)"
    assert budget.release("a1") is not None and budget.release("a1") is None  # once only
    assert budget.admit("a3", "10.0.0.1")[0] is not None  # its place is free again
    assert budget.pending == 3


def test_budget_expires_connections_at_their_deadline_only():
    clock = Clock()
    budget = ConnectionBudget(total=8, per_peer=8, timeout_s=5, clock=clock)
    assert budget.seconds_to_next_deadline() is None  # nothing pending: no wake-up at all
    budget.admit("a", "10.0.0.1")
    clock.now += 3
    budget.admit("b", "10.0.0.1")
    assert budget.seconds_to_next_deadline() == 2
    assert budget.expired() == []
    clock.now += 2
    assert [key for key, _ in budget.expired()] == ["a"]
    assert budget.get("a") is None and budget.release("a") is None
    assert [key for key, _ in budget.drain()] == ["b"] and budget.pending == 0


@pytest.mark.parametrize("header,problem", [
    (struct.pack(">BBL", 0x01, 0, 200), None),
    (struct.pack(">BBL", 0x01, 0, MAX_ASSOCIATE_RQ), None),
    (struct.pack(">BBL", 0x01, 0, 0xFFFFFFFF), "A-ASSOCIATE-RQ of 4294967295 bytes is over 524288"),
    (struct.pack(">BBL", 0x01, 0, 10), "A-ASSOCIATE-RQ of 10 bytes is shorter than its fixed fields"),
    (struct.pack(">BBL", 0x04, 0, 100), "first PDU is type 0x04, not an A-ASSOCIATE-RQ"),
    (b"GET / HTTP/1.1", "first PDU is type 0x47, not an A-ASSOCIATE-RQ"),
    (b"\x01\x00", "connection closed before a whole PDU header"),
])
def test_first_pdu_must_be_a_plausible_associate_request(header, problem):
    assert first_pdu_problem(header) == problem


# -- against the listener ------------------------------------------------------------------------

def _idle_sockets(port: int, count: int, per_address: int):
    """``count`` connections that say nothing, from 127.0.0.2, 127.0.0.3, ... with at most
    ``per_address`` from each."""
    return [connect_from(f"127.0.0.{2 + i // per_address}", port) for i in range(count)]


async def _until(predicate, timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


async def test_fifty_idle_sockets_do_not_take_association_slots(tmp_path):
    """50 connections that never negotiate are all admitted (so they are all open while
    storescu runs), with one association slot and a deadline no test waits for: storescu's
    study gets Success only because pending connections take no association slot."""
    files = study(tmp_path / "study")
    cfg = listen_config(max_associations=1, negotiation_timeout_ms=LONG_MS)
    listener, sink = DicomListener(cfg), Committer(name="sink")
    async with running(listener >> sink, listener=listener):
        idle = _idle_sockets(cfg.port, 50, per_address=cfg.max_pending_per_peer)
        try:
            await _until(lambda: listener._server.budget.pending == 50)
            results = await trio.to_thread.run_sync(
                lambda: send_as_is(cfg.port, list(files.values())))
            assert [r.returncode for r in results] == [0] * len(results), \
                [r.stderr for r in results]
            assert all(still_open(sock) for sock in idle)
        finally:
            for sock in idle:
                sock.close()
        await _until(lambda: listener._server.budget.pending == 0)
    assert set(sink.by_uid()) == set(files)


async def test_past_the_per_peer_and_total_bounds_a_connection_is_closed_at_accept():
    cfg = listen_config(negotiation_timeout_ms=LONG_MS, max_pending_connections=3,
                        max_pending_per_peer=2)
    listener = DicomListener(cfg)
    async with running(listener >> Committer(name="sink"), listener=listener):
        first = _idle_sockets(cfg.port, 2, per_address=2)  # 127.0.0.2 twice
        await _until(lambda: listener._server.budget.pending == 2)
        third = connect_from("127.0.0.2", cfg.port)
        assert await trio.to_thread.run_sync(answer, third) == "closed"  # per peer
        other = connect_from("127.0.0.3", cfg.port)
        await _until(lambda: listener._server.budget.pending == 3)
        fourth = connect_from("127.0.0.4", cfg.port)
        assert await trio.to_thread.run_sync(answer, fourth) == "closed"  # overall
        first[0].close()  # a connection that goes away frees its place at once
        await _until(lambda: listener._server.budget.pending == 2)
        exe = need("echoscu")["echoscu"]
        echo = await trio.to_thread.run_sync(lambda: subprocess.run(
            [exe, "-aec", "DICOMFLOW", "127.0.0.1", str(cfg.port)], capture_output=True,
            text=True, timeout=60))
        assert echo.returncode == 0, echo.stderr
        for sock in (*first, third, other, fourth):
            sock.close()
    assert listener.report()["listener"]["connections_closed"] == 2


def _stream(sock, limit: int) -> int:
    """Send zeros until the peer stops taking them or ``limit`` bytes went; bytes sent."""
    sent, chunk = 0, b"\0" * 65536
    try:
        while sent < limit:
            sent += sock.send(chunk)
    except OSError:
        pass
    return sent


@pytest.mark.parametrize("first", [
    struct.pack(">BBL", 0x01, 0, 0xFFFFFFFF),  # an A-ASSOCIATE-RQ of 4 GiB
    struct.pack(">BBL", 0x04, 0, 0x7FFFFFFF),  # P-DATA before any association
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello to a cleartext port
    b"GET / HTTP/1.1\r\nHost: pacs\r\n\r\n",
])
async def test_a_first_pdu_that_is_no_plausible_request_is_closed_unread(first):
    """Closed on its header, long before the deadline: the listener never reads (never
    holds) what the header promises. 256 MiB offered; it stops taking them at once."""
    cfg = listen_config(negotiation_timeout_ms=LONG_MS)
    listener = DicomListener(cfg)
    async with running(listener >> Committer(name="sink"), listener=listener):
        sock = connect_from("127.0.0.2", cfg.port)
        sock.sendall(first)
        sent = await trio.to_thread.run_sync(_stream, sock, 256 << 20)
        assert sent < 32 << 20, f"the listener took {sent} bytes of a refused PDU"
        assert await trio.to_thread.run_sync(answer, sock) == "closed"
        sock.close()
        await _until(lambda: listener._server.budget.pending == 0)


async def test_silent_truncated_and_trickling_connections_are_closed_at_the_deadline():
    """Each gets its negotiation deadline from the accept, however it behaves: two dozen
    silent ones, one that stops inside its request, one that sends a header only, one
    that trickles its request a byte at a time."""
    cfg = listen_config(negotiation_timeout_ms=500)
    listener = DicomListener(cfg)
    request = associate_rq()
    async with running(listener >> Committer(name="sink"), listener=listener):
        silent = _idle_sockets(cfg.port, 24, per_address=6)
        truncated = connect_from("127.0.0.3", cfg.port)
        truncated.sendall(request[:len(request) // 2])  # the DUL blocks inside this PDU
        header_only = connect_from("127.0.0.4", cfg.port)
        header_only.sendall(request[:6])
        trickle = connect_from("127.0.0.5", cfg.port)

        def trickling() -> str:  # one byte every 100 ms: each read is fresh, the deadline not
            for byte in request[:-1]:
                if not still_open(trickle):
                    break
                try:
                    trickle.send(bytes([byte]))
                except OSError:
                    break
                time.sleep(0.1)
            return answer(trickle)

        async with trio.open_nursery() as nursery:
            outcomes = {}

            async def watch(name, fn):
                outcomes[name] = await trio.to_thread.run_sync(fn)

            nursery.start_soon(watch, "silent", lambda: {answer(sock) for sock in silent})
            for name, sock in (("truncated", truncated), ("header_only", header_only)):
                nursery.start_soon(watch, name, lambda sock=sock: answer(sock))
            nursery.start_soon(watch, "trickle", trickling)
        assert outcomes == {"silent": {"closed"}, "truncated": "closed",
                            "header_only": "closed", "trickle": "closed"}
        await _until(lambda: listener._server.budget.pending == 0)
        for sock in (*silent, truncated, header_only, trickle):
            sock.close()


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on broken UIDs
async def test_flipped_bytes_in_a_valid_request_get_an_answer_or_a_close(tmp_path):
    """Whatever a flipped byte makes of a request, the listener answers (accept, reject,
    abort) or closes, and an association it accepted ends when the peer goes."""
    files = study(tmp_path / "study")
    cfg = listen_config(negotiation_timeout_ms=2_000)
    listener, sink = DicomListener(cfg), Committer(name="sink")
    request = associate_rq()
    rng = random.Random(17)
    seen = set()
    async with running(listener >> sink, listener=listener):
        for _ in range(24):
            broken = bytearray(request)
            position = rng.randrange(len(broken))
            broken[position] ^= 1 << rng.randrange(8)
            sock = connect_from("127.0.0.2", cfg.port)
            sock.sendall(bytes(broken))
            outcome = await trio.to_thread.run_sync(answer, sock)
            assert outcome in ("A-ASSOCIATE-AC", "A-ASSOCIATE-RJ", "A-ABORT", "closed"), outcome
            seen.add(outcome)
            sock.close()
        await _until(lambda: listener._server.budget.pending == 0)
        result = await trio.to_thread.run_sync(lambda: storescu(cfg.port, list(files.values())[:1]))
    assert result.returncode == 0, result.stderr
    assert len(seen) >= 2, seen  # the flips were not all alike
    assert len(sink.arrivals) == 1


async def test_max_associations_still_limits_negotiated_associations():
    """A second negotiated association past max_associations = 1 gets the answer it always
    got: A-ASSOCIATE-RJ, transient, local limit exceeded; once the first ends, it is let in."""
    exe = need("echoscu")["echoscu"]
    cfg = listen_config(max_associations=1)
    listener = DicomListener(cfg)
    echo = [exe, "-aec", "DICOMFLOW", "127.0.0.1", str(cfg.port)]
    async with running(listener >> Committer(name="sink"), listener=listener):
        held = connect_from("127.0.0.2", cfg.port)
        held.sendall(associate_rq())
        assert await trio.to_thread.run_sync(answer, held) == "A-ASSOCIATE-AC"
        second = await trio.to_thread.run_sync(lambda: subprocess.run(
            echo, capture_output=True, text=True, timeout=60))
        held.close()
        await _until(lambda: not listener._server.active_associations)
        third = await trio.to_thread.run_sync(lambda: subprocess.run(
            echo, capture_output=True, text=True, timeout=60))
    assert second.returncode != 0 and "Local Limit Exceeded" in second.stderr, second.stderr
    assert third.returncode == 0, third.stderr


def _generated_pdus():
    from hypothesis import strategies as st

    request = associate_rq()

    def flipped(at_bit: tuple[int, int]) -> bytes:
        broken = bytearray(request)
        broken[at_bit[0]] ^= 1 << at_bit[1]
        return bytes(broken)

    headed = st.builds(lambda pdu_type, length, body: struct.pack(">BBL", pdu_type, 0, length)
                       + body, st.integers(0, 255), st.integers(0, 0xFFFFFFFF),
                       st.binary(max_size=200))
    return st.one_of(
        st.binary(max_size=300),                                             # random bytes
        st.tuples(st.integers(0, len(request) - 1), st.integers(0, 7)).map(flipped),
        st.integers(0, len(request) - 1).map(lambda n: request[:n]),         # truncated
        headed,                                                              # any header
        st.builds(lambda extra: request + extra, st.binary(min_size=1, max_size=100)),
    )


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on broken UIDs
async def test_generated_pdus_each_get_an_answer_or_a_close_and_leave_nothing_behind(tmp_path):
    """Property: whatever bytes a connection opens with, the listener answers (accept,
    reject, abort) or closes it by the deadline; afterwards nothing is pending, nothing
    negotiated, and a modality's C-STORE still succeeds."""
    from hypothesis import HealthCheck, given, settings

    from nodes.dimse import _pynetdicom

    files = study(tmp_path / "study")
    cfg = listen_config(negotiation_timeout_ms=300)
    listener, sink = DicomListener(cfg), Committer(name="sink")
    outcomes: list[str] = []

    @settings(max_examples=40, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(_generated_pdus())
    def opened_with(data: bytes) -> None:
        sock = connect_from("127.0.0.2", cfg.port)
        try:
            sock.sendall(data)
        except OSError:
            pass  # closed while we were still sending: that is an outcome too
        outcome = answer(sock)
        assert outcome in ("A-ASSOCIATE-AC", "A-ASSOCIATE-RJ", "A-ABORT", "closed"), outcome
        outcomes.append(outcome)
        sock.close()

    async with running(listener >> sink, listener=listener):
        await trio.to_thread.run_sync(opened_with)
        await _until(lambda: listener._server.budget.pending == 0
                     and not _pynetdicom.negotiated(listener._server))
        result = await trio.to_thread.run_sync(lambda: storescu(cfg.port, list(files.values())[:1]))
    assert result.returncode == 0, result.stderr
    assert len(sink.arrivals) == 1
    assert {"closed", "A-ASSOCIATE-AC"} <= set(outcomes), outcomes


async def test_stopping_closes_connections_still_negotiating_instead_of_draining_them(caplog):
    """The accept loop waits for nothing but a connection or the stop (no polling interval:
    with nothing pending its wait has no timeout at all), and a stop closes connections
    that never negotiated at once: drain_ms and the deadline are set beyond the test's
    bounds, so the old drain of every connection could not finish it."""
    import logging

    cfg = listen_config(negotiation_timeout_ms=LONG_MS, drain_ms=LONG_MS)
    listener = DicomListener(cfg)
    caplog.set_level(logging.INFO)
    with trio.fail_after(60):
        async with running(listener >> Committer(name="sink"), listener=listener) as runner:
            server = listener._server
            assert server.budget.seconds_to_next_deadline() is None  # select() without timeout
            silent = _idle_sockets(cfg.port, 2, per_address=8)
            half = connect_from("127.0.0.3", cfg.port)
            half.sendall(associate_rq()[:20])  # handed to pynetdicom, its DUL blocked mid-PDU
            await _until(lambda: server.budget.pending == 3 and server.active_associations)
            runner.stop()
            await _until(lambda: not listener.listening.is_set())
            outcomes = [await trio.to_thread.run_sync(answer, sock) for sock in (*silent, half)]
    assert outcomes == ["closed"] * 3
    stopped = [r for r in caplog.records if r.getMessage() == "dimse.stopped"]
    assert [(r.fields["associations"], r.fields["pending"]) for r in stopped] == [(0, 3)]


@pytest.mark.parametrize("kind,length", [
    (0x04, 0xFFFFFFFF),  # a P-DATA-TF claiming 4 GiB
    (0x04, 131_072 + 1024 + 1),  # just past what the listener advertised (and the slack)
    (0x01, 0x00100000),  # a second A-ASSOCIATE-RQ of 1 MiB inside the association
])
async def test_after_negotiation_a_pdu_past_the_advertised_length_aborts_unread(
        caplog, kind, length):
    """The budget guards a connection until its request is decoded; after that pynetdicom
    reads each PDU in full, whatever its header claims. The header is checked against the
    Maximum Length we advertised: past it (and a little slack), the association is aborted
    on the header and the body is never buffered."""
    import logging

    from nodes.dimse.config import DEFAULT_PDU

    assert 131_072 == DEFAULT_PDU and PDU_SLACK == 1024  # the parameters above
    cfg = listen_config(negotiation_timeout_ms=LONG_MS)
    listener = DicomListener(cfg)
    caplog.set_level(logging.INFO)
    async with running(listener >> Committer(name="sink"), listener=listener):
        sock = connect_from("127.0.0.2", cfg.port)
        try:  # closed on every way out: a DUL reading the body would otherwise wait for it
            sock.sendall(associate_rq())
            accepted = await trio.to_thread.run_sync(read_pdu, sock)
            assert accepted is not None and accepted[0] == 0x02  # A-ASSOCIATE-AC
            sock.sendall(struct.pack(">BBL", kind, 0, length))
            sent = await trio.to_thread.run_sync(_stream, sock, 256 << 20)
            assert sent < 32 << 20, f"the listener took {sent} bytes of an oversized PDU"
            abort = await trio.to_thread.run_sync(read_pdu, sock)
            assert abort == (0x07, bytes([0, 0, 2, 6])), abort  # A-ABORT: provider, invalid
            assert await trio.to_thread.run_sync(answer, sock) == "closed"
        finally:
            sock.close()
        await _until(lambda: not listener._server.active_associations)
        assert listener.report()["listener"]["connections_closed"] == 1
    lines = [r for r in caplog.records if r.getMessage() == "dimse.pdu_too_long"]
    assert len(lines) == 1 and lines[0].levelname == "WARNING"
    assert lines[0].fields["reason"].endswith(
        f"of {length} bytes, past the maximum length of 131072 this listener negotiated")
    assert lines[0].fields["peer"] == "127.0.0.2"


def test_a_pdu_header_within_the_advertised_length_passes():
    assert pdu_too_long(struct.pack(">BBL", 0x04, 0, 131_072), 131_072) is None
    assert pdu_too_long(struct.pack(">BBL", 0x04, 0, 132_096), 131_072) is None  # the slack
    assert pdu_too_long(struct.pack(">BBL", 0x04, 0, 132_097), 131_072)
    assert pdu_too_long(struct.pack(">BBL", 0x04, 0, 0xFFFFFFFF), 0) is None  # 0: no limit
    assert pdu_too_long(struct.pack(">BBL", 0x05, 0, 4), 16_384) is None


def _status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def test_flow_ingests_a_study_through_fifty_idle_sockets_and_a_flood_then_stops_at_once(
        tmp_path):
    """`flow run` as an operator runs it, with max_associations = 2: 50 idle sockets held
    open (admitted: they are all still open afterwards) and a flood of connections opening
    with garbage or 4 GiB length claims, while storescu sends a study: storescu gets
    Success, every flood connection is closed with its bytes not taken, and the process's
    peak RSS stays within bounds. Then SIGTERM: exit 0 with the 50 closed, not drained
    (drain_ms and the deadline are 10 minutes)."""
    import signal
    import threading

    from support.flowproc import FlowProcess
    from support.synth import CANARY_ID, CANARY_PARTS

    files = study(tmp_path / "study")
    scp = Storescp(tmp_path / "pacs").start()
    port, graph_args = write_site(tmp_path, scp.port, listen=f"""
max_associations = 2
negotiation_timeout_ms = {LONG_MS}
drain_ms = {LONG_MS}
spool_dir = "{tmp_path / 'data' / 'incoming'}"
""")
    flow = FlowProcess(["run", *graph_args], tmp_path / "flow.log")
    openers = [struct.pack(">BBL", 0x01, 0, 0xFFFFFFFF), struct.pack(">BBL", 0x04, 0, 0xFFFFFFFF),
               b"GET / HTTP/1.1\r\n\r\n", bytes(range(255, 0, -1))]
    flooded: list[tuple[str, int]] = []
    storescu_done = threading.Event()

    def flood() -> None:
        while len(flooded) < 500 and not (storescu_done.is_set() and len(flooded) >= 8):
            sock = connect_from(f"127.0.0.{100 + len(flooded) % 4}", port)
            try:
                sock.sendall(openers[len(flooded) % 4])
            except OSError:
                pass
            taken = _stream(sock, 64 << 20)
            flooded.append((answer(sock), taken))
            sock.close()

    idle = []
    try:
        flow.wait_for_log(r"dimse\.listening")
        idle = _idle_sockets(port, 50, per_address=8)
        with open(f"/proc/{flow.pid}/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS now (Linux >= 4.0)
        before = _status_kib(flow.pid, "VmHWM")
        flooder = threading.Thread(target=flood)
        flooder.start()
        try:
            results = send_as_is(port, list(files.values()))
        finally:
            storescu_done.set()
            flooder.join(120)
        assert [r.returncode for r in results] == [0] * len(results), [r.stderr for r in results]
        assert {outcome for outcome, _ in flooded} == {"closed"}
        assert max(taken for _, taken in flooded) < 32 << 20
        grown_mib = (_status_kib(flow.pid, "VmHWM") - before) / 1024
        assert grown_mib < 64, f"peak RSS grew {grown_mib:.0f} MiB during the flood"
        assert all(still_open(sock) for sock in idle)
        assert set(scp.wait_files(len(files))) == set(files)  # committed and forwarded
        flow.signal(signal.SIGTERM)
        assert flow.wait(120) == 0
    finally:
        for sock in idle:
            sock.close()
        flow.stop()
        scp.stop()
    log = flow.output()
    assert "dimse.stopped node=dicom_listener associations=0 pending=50" in log, log[-2000:]
    assert "dimse.connection_closed" in log  # the flood, logged (at most once per 10 s)
    assert len(os.listdir(tmp_path / "data" / "incoming")) == 0
    for part in (*CANARY_PARTS, CANARY_ID):
        assert part not in log


async def test_without_its_pynetdicom_hooks_the_listener_runs_pynetdicoms_server_loudly(
        monkeypatch, caplog):
    """A pynetdicom release without what the budget relies on: the listener still serves,
    on pynetdicom's own server, and says at WARNING what is missing and what that means."""
    import logging

    from nodes.dimse import _pynetdicom

    assert _pynetdicom.budget_hooks_missing() == ""  # the pinned pynetdicom has them all
    monkeypatch.setattr(_pynetdicom, "budget_hooks_missing", lambda: "ACSE.send_reject")
    exe = need("echoscu")["echoscu"]
    cfg = listen_config()
    listener = DicomListener(cfg)
    caplog.set_level(logging.INFO)
    async with running(listener >> Committer(name="sink"), listener=listener):
        assert not isinstance(listener._server, _pynetdicom.BudgetedServer)
        echo = await trio.to_thread.run_sync(lambda: subprocess.run(
            [exe, "-aec", "DICOMFLOW", "127.0.0.1", str(cfg.port)], capture_output=True,
            text=True, timeout=60))
    assert echo.returncode == 0, echo.stderr
    warned = [r for r in caplog.records
              if r.getMessage() == "dimse.connection_budget_unavailable"]
    assert [r.levelno for r in warned] == [logging.WARNING]
    assert "ACSE.send_reject" in warned[0].fields["reason"]
