"""MLLP: framing, ACK classification, and MllpSender against a real listener on 127.0.0.1."""

from __future__ import annotations

import logging
import os
import sys

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from flow import EgressConfig, EgressPolicy, Graph, Node, RestartPolicy, Runner
from flow._log import configure
from nodes.arrival import Envelope
from nodes.delivery import Recorder
from nodes.hl7 import (Ack, Deframer, MllpError, MllpSender, RisConfig, SRReportHandler,
                       classify_ack, frame, parse_ack, unframe)
from nodes.outcome import Delivered, Permanent, Transient
from nodes.payload import BytesPayload
from support.ris import RisListener, ack_for, make_tls
from support.synth import CANARY, CANARY_ID, CANARY_PARTS
from support.flownodes import Feed

sys.path.insert(0, os.path.dirname(__file__))  # the helpers next to this file
import hl7_samples as samples  # noqa: E402


# -- pure -----------------------------------------------------------------------------------


def test_frame_and_unframe():
    assert frame(b"MSH|x\r") == b"\x0bMSH|x\r\x1c\x0d"
    assert unframe(frame(b"MSH|x\r")) == b"MSH|x\r"
    with pytest.raises(ValueError):
        frame(b"bad \x1c inside")
    with pytest.raises(ValueError):
        unframe(b"MSH|x\r")


def test_deframer_is_incremental_and_tolerates_crlf_between_blocks():
    d = Deframer()
    stream = frame(b"one") + b"\n" + frame(b"two") + frame(b"thr")
    out = []
    for i in range(len(stream)):
        out += d.feed(stream[i:i + 1])
    assert out == [b"one", b"two", b"thr"] and not d.pending
    assert d.feed(b"\x0bpart") == [] and d.pending
    assert d.feed(b"ial\x1c\x0d") == [b"partial"]


@given(st.lists(st.binary(max_size=300).map(lambda b: b.replace(b"\x0b", b"").replace(
    b"\x1c", b"")), min_size=1, max_size=6), st.lists(st.integers(1, 64), min_size=1))
@settings(max_examples=200, deadline=None)
def test_deframer_gives_the_same_messages_however_the_stream_is_cut(bodies, cuts):
    stream = b"".join(frame(body) for body in bodies)
    deframer, out, i = Deframer(), [], 0
    for n in cuts * (len(stream) // sum(cuts) + 1):
        out += deframer.feed(stream[i:i + n])
        i += n
        if i >= len(stream):
            break
    assert out == bodies and not deframer.pending


def test_deframer_rejects_bytes_outside_a_block_and_oversized_blocks():
    with pytest.raises(MllpError):
        Deframer().feed(b"HTTP/1.1 400\r\n")
    with pytest.raises(MllpError):
        Deframer(max_frame=10).feed(b"\x0b" + b"x" * 20)


def test_parse_ack_keeps_codes_and_never_the_msa3_text():
    message = SRReportHandler(samples.RIS).handle(samples.basic_text()).encode()
    parsed = parse_ack(unframe(ack_for(message, "AE")))
    assert parsed.code == "AE" and parsed.error_code == "103"
    outcome = classify_ack(parsed, parsed.control_id)
    assert outcome == Permanent("ack AE err 103")
    assert not any(part in repr(outcome) for part in CANARY_PARTS)


@pytest.mark.parametrize("code, outcome", [
    ("AA", Delivered()), ("CA", Delivered()), ("AE", Permanent("ack AE")),
    ("AR", Permanent("ack AR")), ("CE", Permanent("ack CE")), ("CR", Permanent("ack CR")),
    ("ZZ", Transient("ack with unknown code ZZ")),
])
def test_classify_ack_codes(code, outcome):
    assert classify_ack(Ack(code, "C1"), "C1") == outcome


def test_ack_for_another_message_is_transient():
    assert classify_ack(Ack("AA", "OTHER"), "C1") == Transient("ack for another message")


def test_err_code_that_could_carry_text_is_dropped():
    data = (b"MSH|^~\\&|R||D||1||ACK|9|P|2.5.1\rMSA|AE|C1\rERR|||" + CANARY.encode()
            + b" not found^x|E\r")
    parsed = parse_ack(data)
    assert parsed.error_code == ""
    assert classify_ack(parsed, "C1") == Permanent("ack AE")


# -- against a real listener --------------------------------------------------------------------


def messages(recorder: Recorder, n: int, *, lane: str = "ris"):
    handler = SRReportHandler(samples.RIS)
    out = []
    for i in range(n):
        ds = samples.enhanced()
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.1234.77.{i}"
        env = Envelope(ds.SOPInstanceUID, ds.SOPClassUID, "1.2.840.10008.1.2.1")
        payload = BytesPayload(handler.handle(ds).encode())
        out.append(recorder.delivery(env, payload, lane).derive(
            payload, note="handler sr-report 1.1", media_type="x-application/hl7-v2+er7"))
    return out


async def send_through(listener: RisListener, n: int = 1,
                       **config) -> tuple[Recorder, MllpSender, list]:
    """Send ``n`` SR reports through an MllpSender to ``listener`` (started here)."""
    recorder = Recorder()
    items = messages(recorder, n)
    with listener:
        cfg = RisConfig(host="127.0.0.1", port=listener.port,
                        **{"ack_timeout_ms": 500, **config})
        sender = MllpSender(cfg)
        # the lane takes its first node's name: "ris", as in graphs/radiology.py
        graph = Graph(Feed(items, name="ris") >> sender,
                      egress=EgressPolicy(EgressConfig(
                          allowed_tcp=[f"127.0.0.1:{listener.port}"])))
        runner = Runner(graph, restart=RestartPolicy(backoff_initial_s=0.01, backoff_max_s=0.05,
                                                     max_failures=2))
        await runner.run()
    return recorder, sender, items


def outcomes(recorder: Recorder) -> list:
    return [recorder.outcomes[uid] for uid in sorted(recorder.outcomes,
                                                     key=lambda u: int(u.rsplit(".", 1)[1]))]


async def test_aa_delivers_every_message_in_order_over_one_connection():
    listener = RisListener(["AA"])
    recorder, sender, items = await send_through(listener, 5)
    assert outcomes(recorder) == [Delivered()] * 5
    assert listener.connections == 1
    assert listener.messages == [item.payload.data for item in items]  # in the order sent
    assert sender.report()["lanes"]["ris"]["delivered"] == 5
    assert all(n == ("handler sr-report 1.1",) for n in recorder.notes.values())


async def test_ae_and_ar_are_permanent_with_the_code_and_without_phi():
    listener = RisListener(["AE", "AR", "AA"])
    recorder, _, _ = await send_through(listener, 3)
    assert outcomes(recorder) == [Permanent("ack AE err 103"), Permanent("ack AR err 103"),
                                  Delivered()]
    assert CANARY_PARTS[0] not in repr(recorder.outcomes)


async def test_silence_is_transient_and_the_connection_is_replaced():
    listener = RisListener(["silent", "AA"])
    recorder, _, _ = await send_through(listener, 2, ack_timeout_ms=200)
    assert outcomes(recorder) == [Transient("no ack within 200 ms"), Delivered()]
    assert listener.connections == 2


async def test_dropped_connection_is_transient():
    listener = RisListener(["drop", "AA"])
    recorder, _, _ = await send_through(listener, 2)
    assert outcomes(recorder) == [Transient("connection closed before the ack"), Delivered()]


async def test_garbage_and_non_ack_answers_are_transient():
    listener = RisListener(["garbage", "no_msa", "AA"])
    recorder, _, _ = await send_through(listener, 3)
    assert outcomes(recorder) == [Transient("answer is not MLLP"),
                                  Transient("answer is not an HL7 ACK"), Delivered()]
    assert listener.connections == 3


async def test_ack_for_another_control_id_is_transient_and_reconnects():
    listener = RisListener(["wrong_id", "AA"])
    recorder, _, _ = await send_through(listener, 2)
    assert outcomes(recorder) == [Transient("ack for another message"), Delivered()]
    assert listener.connections == 2


async def test_connection_refused_is_transient():
    port = trio.socket.socket()
    await port.bind(("127.0.0.1", 0))
    number = port.getsockname()[1]
    port.close()  # nothing listens there now
    recorder = Recorder()
    sender = MllpSender(RisConfig(host="127.0.0.1", port=number, connect_timeout_ms=500))
    graph = Graph(Feed(messages(recorder, 1), name="feed") >> sender,
                  egress=EgressPolicy(EgressConfig(allowed_tcp=[f"127.0.0.1:{number}"])))
    await Runner(graph).run()
    assert outcomes(recorder) == [Transient("connection refused")]


async def test_idle_connection_closed_by_the_ris_is_reopened_once():
    """The RIS drops the kept-alive connection between two messages: the second message is
    sent again on a new connection, not failed."""
    recorder = Recorder()
    items = messages(recorder, 2)

    class Pausing(Node):
        inputs = ()

        async def run(self, ctx):
            await ctx.send(items[0])
            with trio.fail_after(10):
                while items[0].outcome is None:
                    await trio.sleep(0.01)
            listener.drop_connections()
            await ctx.send(items[1])

    with RisListener(["AA"]) as listener:
        sender = MllpSender(RisConfig(host="127.0.0.1", port=listener.port,
                                      ack_timeout_ms=5000))
        graph = Graph(Pausing(name="ris") >> sender, egress=EgressPolicy(EgressConfig(
            allowed_tcp=[f"127.0.0.1:{listener.port}"])))
        await Runner(graph).run()
    assert outcomes(recorder) == [Delivered(), Delivered()]
    assert listener.connections == 2
    assert sender.report()["lanes"]["ris"]["reconnects"] == 1


async def test_tls_to_a_ris_verified_against_the_configured_ca(tmp_path):
    server, ca = make_tls(tmp_path)
    listener = RisListener(["AA"], tls=server)
    recorder, _, _ = await send_through(listener, 2, tls_ca=ca)
    assert outcomes(recorder) == [Delivered(), Delivered()]
    assert listener.connections == 1 and len(listener.messages) == 2


async def test_tls_to_a_ris_the_ca_does_not_vouch_for_is_transient_and_sends_nothing(tmp_path):
    server, _ = make_tls(tmp_path)
    (tmp_path / "other").mkdir()
    _, other_ca = make_tls(tmp_path / "other")  # another CA altogether
    listener = RisListener(["AA"], tls=server)
    recorder, _, _ = await send_through(listener, 1, tls_ca=other_ca)
    assert outcomes(recorder) == [Transient("tls error SSLCertVerificationError")]
    assert listener.messages == []


async def test_cancelled_while_waiting_for_the_ack_the_delivery_stays_unsettled():
    """Shutdown mid-exchange: nothing is settled (the Store re-queues the object) and the
    connection is closed, so a late ACK can never be read as another message's."""
    recorder = Recorder()
    items = messages(recorder, 1)
    with RisListener(["silent"]) as listener:
        sender = MllpSender(RisConfig(host="127.0.0.1", port=listener.port,
                                      ack_timeout_ms=60_000))
        runner = Runner(Graph(Feed(items, name="ris") >> sender, egress=EgressPolicy(
            EgressConfig(allowed_tcp=[f"127.0.0.1:{listener.port}"]))))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner.run)
            with trio.fail_after(10):
                while not listener.messages:
                    await trio.sleep(0.01)
            runner.abort()
        with trio.fail_after(10):
            while listener.open_connections:
                await trio.sleep(0.01)
    assert not items[0].settled and recorder.outcomes == {}


async def test_egress_is_declared_and_checked():
    sender = MllpSender(RisConfig(host="ris.example", port=2575))
    assert [str(t) for t in sender.egress()] == ["tcp://ris.example:2575"]


async def test_probe_reports_reachability():
    class Ctx:
        def check_tcp(self, host, port):
            pass

    with RisListener(["AA"]) as listener:
        sender = MllpSender(RisConfig(host="127.0.0.1", port=listener.port))
        assert await sender.probe(Ctx()) == {"ok": True}
    closed = MllpSender(RisConfig(host="127.0.0.1", port=listener.port,
                                  connect_timeout_ms=500))
    assert await closed.probe(Ctx()) == {"ok": False, "reason": "connection refused"}


async def test_canary_never_in_logs(capsys):
    configure("INFO", stream=sys.stderr)
    try:
        listener = RisListener(["AE", "silent", "garbage", "AA"])
        recorder, _, _ = await send_through(listener, 4, ack_timeout_ms=200)
    finally:
        logging.getLogger().handlers.clear()
    captured = capsys.readouterr()
    text = captured.err + captured.out + repr(recorder.outcomes)
    assert "mllp.not_delivered" in text
    for secret in (*CANARY_PARTS, CANARY_ID):
        assert secret not in text


async def test_the_next_message_goes_out_while_the_store_commits_the_last_outcome():
    """Outcomes are committed beside the sending: a Store slow to commit (a sync, a linger
    window in a process that runs lanes only) does not hold the next message back, and
    every outcome still lands, in order."""
    committing = trio.Event()

    class SlowStore(Recorder):
        async def __call__(self, delivery, outcome) -> None:
            await committing.wait()
            await super().__call__(delivery, outcome)

    recorder = SlowStore()
    items = messages(recorder, 3)
    with RisListener(["AA"]) as listener:
        sender = MllpSender(RisConfig(host="127.0.0.1", port=listener.port, ack_timeout_ms=5000))
        runner = Runner(Graph(Feed(items, name="ris") >> sender, egress=EgressPolicy(
            EgressConfig(allowed_tcp=[f"127.0.0.1:{listener.port}"]))))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner.run)
            with trio.fail_after(10):
                while len(listener.messages) < 3:
                    await trio.sleep(0.01)
            assert recorder.outcomes == {}, "all three sent before any outcome committed"
            committing.set()
    assert outcomes(recorder) == [Delivered()] * 3
    assert listener.messages == [item.payload.data for item in items]
    assert sender.report()["lanes"]["ris"]["delivered"] == 3
