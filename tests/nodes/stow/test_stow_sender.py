"""StowSender against a scripted STOW-RS server on 127.0.0.1 (real HTTP, real flow graph)."""

from __future__ import annotations

import email.utils
import hashlib
import io
import logging
import os
import sys
import threading
import time
import tracemalloc

import pytest

from flow import EgressConfig, EgressPolicy
from flow._log import configure
from nodes.delivery import Recorder
from nodes.outcome import Delivered, Permanent, Transient
from nodes.payload import FilePayload
from nodes.stow import StowConfig
from support.peers import free_port
from support.synth import CANARY, CANARY_ID, CANARY_PARTS, ct, mr, to_part10

sys.path.insert(0, os.path.dirname(__file__))  # the helpers next to this file
from stow_fakeserver import FakeStow, stow_json, stow_xml  # noqa: E402
from stow_harness import deliveries, envelope_of, run_sender  # noqa: E402

SECRET = "Bearer sekrit-4f1c-token"


def files(n: int, **kw) -> list[bytes]:
    study = "1.2.826.0.1.3680043.2.1143.77.1"
    return [to_part10((ct if i % 2 else mr)(study_uid=study, instance_number=i + 1, **kw))
            for i in range(n)]


def cfg(url: str, **kw) -> StowConfig:
    base = dict(url=url, timeout_ms=5000, batch_max_instances=10, linger_ms=200,
                max_connections=1)
    return StowConfig(**{**base, **kw})


async def test_batches_close_on_count_and_bytes_are_sent_as_stored():
    data = files(7)
    rec = Recorder()
    with FakeStow() as server:
        await run_sender(cfg(server.url, batch_max_instances=3), deliveries(rec, data))
    assert [len(r.parts) for r in server.requests] == [3, 3, 1]
    assert [p for r in server.requests for p in r.parts] == data  # byte-identical, in order
    r = server.requests[0]
    assert r.path == "/dicom-web/studies"
    assert r.headers["content-type"].startswith('multipart/related; type="application/dicom"')
    assert r.headers["accept"] == "application/dicom+json"
    assert "transfer-encoding" not in r.headers
    assert all(o == Delivered() for o in rec.outcomes.values()) and len(rec.outcomes) == 7


async def test_batches_close_on_bytes_and_an_oversized_instance_travels_alone():
    small, big = files(4), to_part10(ct(rows=256, cols=256))
    limit = 3 * len(small[0]) + 10
    rec = Recorder()
    with FakeStow() as server:
        await run_sender(cfg(server.url, batch_max_bytes=limit),
                         deliveries(rec, small[:2] + [big] + small[2:]))
    assert [len(r.parts) for r in server.requests] == [2, 1, 2]
    assert len(rec.outcomes) == 5 and all(o == Delivered() for o in rec.outcomes.values())


async def test_linger_closes_a_partial_batch():
    # The real clock: an autojump clock skips ahead while the sender waits for the HTTP
    # server's thread, and its request timeout then expires at once (a CI run caught it:
    # three transient outcomes, no request).
    rec = Recorder()
    with FakeStow() as server:
        await run_sender(cfg(server.url, batch_max_instances=50, linger_ms=10),
                         deliveries(rec, files(3)))
    assert sum(len(r.parts) for r in server.requests) == 3


async def test_the_same_uid_twice_never_shares_a_batch():
    one = files(1)[0]
    env = envelope_of(one)
    rec = Recorder()
    ds_bytes = [one, one]  # e.g. a re-sent object with the same SOP Instance UID
    items = deliveries(rec, ds_bytes)
    with FakeStow() as server:
        await run_sender(cfg(server.url), items)
    assert [len(r.parts) for r in server.requests] == [1, 1]
    assert all(i.outcome == Delivered() for i in items) and items[0].uid == env.sop_instance_uid


async def test_concurrent_batches_up_to_max_connections():
    barrier = threading.Barrier(2, timeout=10)  # proves two requests were in flight together
    rec = Recorder()
    with FakeStow(barrier=barrier) as server:
        await run_sender(cfg(server.url, batch_max_instances=2, max_connections=2),
                         deliveries(rec, files(8)))
    assert server.max_active == 2
    assert len(rec.outcomes) == 8 and all(o == Delivered() for o in rec.outcomes.values())


# -- outcome classes, end to end ------------------------------------------------------------

def _retry_after_date() -> str:
    return email.utils.formatdate(time.time() + 120, usegmt=True)


@pytest.mark.parametrize("answer,expected", [
    ((409, {"Content-Type": "text/plain"}, b"conflict"), Permanent("HTTP 409")),
    ((429, {"Retry-After": "17"}, b""), Transient("HTTP 429", 17.0)),
    ((503, {"Content-Type": "text/html"}, b"<html>down</html>"), Transient("HTTP 503")),
    ((302, {"Location": "http://127.0.0.1:1/elsewhere"}, b""),
     Permanent("HTTP 302: redirect not followed")),
    ((408, {}, b""), Transient("HTTP 408")),
    ((401, {}, b""), Permanent("HTTP 401")),
])
async def test_whole_batch_statuses_are_classified(answer, expected):
    rec = Recorder()
    items = deliveries(rec, files(3))
    with FakeStow(lambda req: answer) as server:
        await run_sender(cfg(server.url), items)
    assert len(server.requests) == 1  # no retry, no redirect followed
    assert [i.outcome for i in items] == [expected] * 3


async def test_429_with_http_date_retry_after():
    rec = Recorder()
    items = deliveries(rec, files(1))
    with FakeStow(lambda req: (429, {"Retry-After": _retry_after_date()}, b"")) as server:
        await run_sender(cfg(server.url), items)
    out = items[0].outcome
    assert isinstance(out, Transient) and 100 < out.retry_after <= 120


async def test_202_dead_letters_only_the_failed_instance():
    rec = Recorder()
    items = deliveries(rec, files(4))
    bad = items[2].uid

    def partial(req):
        uids = req.part_uids()
        return 202, {"Content-Type": "application/dicom+json"}, stow_json(
            failed={bad: 0xA900}, referenced=[u for u in uids if u != bad])

    with FakeStow(partial) as server:
        await run_sender(cfg(server.url), items)
    assert [i.outcome for i in items] == [Delivered(), Delivered(),
                                          Permanent("STOW failure reason 0xA900"), Delivered()]


async def test_202_with_xml_body():
    rec = Recorder()
    items = deliveries(rec, files(2))
    body = stow_xml(failed={items[0].uid: 0x0110}, referenced={items[1].uid: 0xB000})
    with FakeStow(lambda req: (202, {"Content-Type": "application/dicom+xml"}, body)) as s:
        await run_sender(cfg(s.url), items)
    assert [i.outcome for i in items] == [Permanent("STOW failure reason 0x0110"),
                                          Delivered("STOW warning reason 0xB000")]


async def test_unreachable_server_is_transient():
    rec = Recorder()
    items = deliveries(rec, files(2))
    await run_sender(cfg(f"http://127.0.0.1:{free_port()}/dicom-web"), items)
    assert [i.outcome for i in items] == [Transient("transport error: ConnectError")] * 2


async def test_connect_time_egress_check_refuses_and_nothing_is_sent():
    rec = Recorder()
    items = deliveries(rec, files(2))
    with FakeStow() as server:
        narrowed = EgressPolicy(EgressConfig(allowed_http=["http://127.0.0.1:1/other"]))
        _, runner = await run_sender(cfg(server.url), items, running=narrowed)
    assert server.requests == []
    assert runner.health["archive_sender"].last_error_class == "EgressDenied"
    assert all(isinstance(i.outcome, Transient) for i in items)  # handed back, not lost


# -- secrets and PHI ------------------------------------------------------------------------

@pytest.fixture
def info_log():
    stream = io.StringIO()
    root = logging.getLogger()
    before = list(root.handlers), root.level
    configure("INFO", stream=stream)
    try:
        yield stream
    finally:
        root.handlers[:] = before[0]
        root.setLevel(before[1])


async def test_auth_secret_and_phi_never_reach_logs_or_outcomes(info_log, monkeypatch, caplog,
                                                               tmp_path):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("DF_STOW_TOKEN", SECRET)
    rec = Recorder()
    items = deliveries(rec, files(4))

    def echo_phi(req):  # a hostile server quoting the dataset back in every answer kind
        return 202, {"Content-Type": "application/dicom+json",
                     "X-Debug": CANARY_ID}, stow_json(failed={items[0].uid: 0xC000},
                                                      referenced=[items[1].uid]) + b" " + \
            CANARY.encode()

    with FakeStow(echo_phi) as server:
        await run_sender(cfg(server.url, auth_header_env="DF_STOW_TOKEN", batch_max_instances=2),
                         items)
    assert all(r.headers["authorization"] == SECRET for r in server.requests)
    text = info_log.getvalue() + "\n".join(repr(i.outcome) for i in items)
    text += "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records
                      if r.name.startswith("nodes"))
    assert "stow.batch" in text
    for needle in (SECRET, "sekrit", CANARY, CANARY_ID, *CANARY_PARTS):
        assert needle not in text


async def test_missing_secret_fails_the_start_naming_the_key(monkeypatch):
    from flow import ConfigError

    monkeypatch.delenv("DF_STOW_ABSENT", raising=False)
    with pytest.raises(ConfigError, match="auth_header_env"):
        await run_sender(cfg("http://127.0.0.1:1/dicom-web", auth_header_env="DF_STOW_ABSENT"),
                         [])


# -- streaming ------------------------------------------------------------------------------

async def test_a_50_mb_instance_streams_without_being_loaded_whole(tmp_path):
    ds = ct(rows=5000, cols=5000)  # 50 MB of pixel data
    path = tmp_path / "big.dcm"
    path.write_bytes(to_part10(ds))
    del ds
    size = path.stat().st_size
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    env = envelope_of(path)
    rec = Recorder()
    items = deliveries(rec, [(env, FilePayload(path))])
    with FakeStow(lambda req: (200, {}, b""), discard=True) as server:
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            await run_sender(cfg(server.url, timeout_ms=60_000), items)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert size > 50_000_000 and items[0].outcome == Delivered()
    req = server.requests[0]
    assert req.length > size
    print(f"peak {peak / 2**20:.1f} MiB")
    assert peak < 12 * 2**20, f"peak {peak / 2**20:.1f} MiB"
    # the framed body contains the file byte for byte
    from nodes.stow.multipart import closing, part_head
    boundary = req.headers["content-type"].rsplit("boundary=", 1)[1]
    digest = hashlib.sha256(part_head(boundary, first=True))
    digest.update(path.read_bytes())
    digest.update(closing(boundary))
    assert req.sha256 == digest.hexdigest()
    assert expected != req.sha256  # (the framing is around the file, not instead of it)


# -- status and probe -----------------------------------------------------------------------

async def test_report_counts_per_lane():
    rec = Recorder()
    items = deliveries(rec, files(5))
    bad = items[0].uid

    def partial(req):
        return 202, {"Content-Type": "application/dicom+json"}, stow_json(
            failed={bad: 0xC000} if bad in req.part_uids() else {},
            referenced=[u for u in req.part_uids() if u != bad])

    with FakeStow(partial) as server:
        sender, _ = await run_sender(cfg(server.url, batch_max_instances=2), items)
    (lane, figures), = sender.report()["lanes"].items()  # the lane is named by the graph
    assert figures["batches"] == 3 and figures["delivered"] == 4 and figures["permanent"] == 1
    assert figures["in_flight"] == 0 and figures["bytes"] > sum(len(f) for f in files(5)) // 2


class _ProbeCtx:
    def __init__(self, allowed: str) -> None:
        self.policy = EgressPolicy(EgressConfig(allowed_http=[allowed]))

    def check_http(self, url: str) -> None:
        self.policy.check_http(url, node="archive_sender")


async def test_probe_reports_reachability():
    from nodes.stow import StowSender

    with FakeStow() as server:
        sender = StowSender(cfg(server.url))
        assert (await sender.probe(_ProbeCtx(server.url)))["ok"] is True
    down = f"http://127.0.0.1:{free_port()}/dicom-web"
    result = await StowSender(cfg(down)).probe(_ProbeCtx(down))
    assert result == {"ok": False, "reason": "transport error: ConnectError"}
