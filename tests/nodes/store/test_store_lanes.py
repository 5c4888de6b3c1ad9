"""Durable lanes: retries without head-of-line blocking, dead letters and their replay from
the operator CLI, map full → StoreFull and recovery, status read from another process."""

from __future__ import annotations

import json

import trio

from nodes.arrival import StoreFull
from nodes.outcome import Delivered, Permanent, Skipped, Transient
from nodes.store import StoreConfig, admin
from nodes.store.db import Env
from support.flowproc import run_flow
from support.storenodes import Sink, arrival, running, sink_graph_files
from support.synth import CANARY_ID, CANARY_PARTS, ct, to_part10


async def test_transient_failure_does_not_delay_later_items(tmp_path):
    async def behaviour(delivery):
        if delivery.uid == "1.3.0":
            return Transient("0xA700 out of resources", retry_after=None)
        return Delivered()

    sink = Sink(behaviour)
    config = StoreConfig(min_free_disk_mb=0, retry_initial_s=60.0)
    async with running(tmp_path, {"pacs": sink}, config) as (feed, store, _):
        for i in range(6):
            await feed.put(arrival(f"1.3.{i}", b"z" * 100))
        await sink.wait_for(lambda: len(sink.delivered) == 5)
        report = store.report()["lanes"]["pacs"]
    assert sink.delivered == [f"1.3.{i}" for i in range(1, 6)]
    assert [s for s in sink.seen if s[0] == "1.3.0"] == [("1.3.0", sink.seen[0][1], 1)]
    assert report["retrying"] == 1 and report["delivered"] == 5
    assert report["last_error_class"] == "transient"


async def test_retries_follow_the_schedule_until_delivered(tmp_path):
    async def behaviour(delivery):
        return Delivered() if delivery.attempt >= 3 else Transient("connection refused")

    sink = Sink(behaviour)
    config = StoreConfig(min_free_disk_mb=0, retry_initial_s=0.05, retry_max_s=0.1)
    async with running(tmp_path, {"pacs": sink}, config) as (feed, store, _):
        await feed.put(arrival("1.4.1", b"r"))
        await sink.wait_for(lambda: sink.delivered == ["1.4.1"])
        trace = store.report()
        events = admin.trace(store, "1.4.1")["events"]
    assert [attempt for _, _, attempt in sink.seen] == [1, 2, 3]
    attempts = [e for e in events if e["event"] == "attempt"]
    assert [(e["attempt"], e["outcome"]) for e in attempts] == [
        (1, "transient"), (2, "transient"), (3, "delivered")]
    assert trace["lanes"]["pacs"]["retrying"] == 0


def graph_files(tmp_path, data_dir):
    graph, config = sink_graph_files(tmp_path, data_dir)
    return ["--config", str(config)], str(graph)


def no_phi(text: str) -> None:
    for part in (*CANARY_PARTS, CANARY_ID):
        assert part not in text


async def test_permanent_failure_is_dead_lettered_and_replayed_from_the_cli(tmp_path):
    data = tmp_path / "data"
    config_args, graph = graph_files(tmp_path, data)
    ds = ct()
    uid = ds.SOPInstanceUID

    refused = []

    async def behaviour(delivery):  # the PACS refuses the object once, then takes it
        if delivery.uid == uid and not refused:
            refused.append(uid)
            return Permanent("0xA900 dataset does not match SOP class")
        return Delivered()

    sink = Sink(behaviour, name="pacs_sink")
    config = StoreConfig(min_free_disk_mb=0, poll_s=0.2)
    outputs = []

    async def flow(*args):
        result = await trio.to_thread.run_sync(
            lambda: run_flow([args[0], graph, *config_args, *args[1:]], timeout=60))
        outputs.append(result.stdout + result.stderr)
        return result

    async with running(data, {"pacs": sink}, config) as (feed, store, _):
        a = arrival(uid, to_part10(ds))
        await feed.put(a)
        await feed.put(arrival("1.5.2", b"fine"))
        await sink.wait_for(lambda: sink.delivered == ["1.5.2"])
        with trio.fail_after(10):
            while store.report()["lanes"]["pacs"]["dead_lettered"] != 1:
                await trio.sleep(0.02)

        listed = await flow("deadletters", "list")
        assert listed.returncode == 0 and uid in listed.stdout and "0xA900" in listed.stdout
        status = await flow("status", "--json")
        lane = json.loads(status.stdout)["lanes"]["pacs"]
        assert lane["dead_lettered"] == 1 and lane["delivered"] == 1
        assert lane["last_error_class"] == "permanent"

        replayed = await flow("deadletters", "replay", uid)
        assert replayed.returncode == 0 and "re-queued" in replayed.stdout
        await sink.wait_for(lambda: uid in sink.delivered)  # the pump polled and found it
        assert (await flow("deadletters", "list")).stdout.strip() == "no dead letters"
        trace = await flow("trace", uid)
    assert trace.returncode == 0
    events = [line.split()[1] for line in trace.stdout.splitlines() if line.startswith("  2")]
    assert events[0] == "arrival" and "dead_letter" in events and "replay" in events
    assert events[-1] == "finished"
    # Not running any more: status still reads the store.
    stopped = await flow("status", "--json")
    assert json.loads(stopped.stdout)["lanes"]["pacs"]["delivered"] == 2
    for text in outputs:
        no_phi(text)


def lane_and_attempt_events(trace_stdout: str, lane: str) -> tuple[int, int]:
    """From ``flow trace`` text: the lane's ``attempts=`` figure and its attempt events."""
    (summary,) = [line for line in trace_stdout.splitlines()
                  if line.startswith(f"  lane {lane}: ")]
    shown = int(summary.split("attempts=")[1].split()[0])
    events = [line for line in trace_stdout.splitlines() if line.startswith("  2")
              and line.split()[1] == "attempt" and f"lane={lane}" in line.split()]
    return shown, len(events)


async def test_trace_counts_attempts_as_its_event_list_shows_them(tmp_path):
    data = tmp_path / "data"
    config_args, graph = graph_files(tmp_path, data)

    async def behaviour(delivery):  # 1.20.2 meets a busy PACS once, then gets through
        if delivery.uid == "1.20.2" and delivery.attempt == 1:
            return Transient("0xA700 out of resources", retry_after=0.05)
        return Delivered()

    sink = Sink(behaviour, name="pacs_sink")
    config = StoreConfig(min_free_disk_mb=0, retry_initial_s=0.05, retry_max_s=0.1)
    async with running(data, {"pacs": sink}, config) as (feed, store, _):
        await feed.put(arrival("1.20.1", b"first time"))
        await feed.put(arrival("1.20.2", b"second time"))
        await sink.wait_for(lambda: sorted(sink.delivered) == ["1.20.1", "1.20.2"])
        traces = {uid: await trio.to_thread.run_sync(
            lambda uid=uid: run_flow(["trace", graph, *config_args, uid], timeout=60))
            for uid in ("1.20.1", "1.20.2")}
        as_json = admin.trace(store, "1.20.2")["lanes"]["pacs"]
    for trace in traces.values():
        assert trace.returncode == 0, trace.stdout + trace.stderr
        assert "lane pacs: delivered" in trace.stdout
    assert lane_and_attempt_events(traces["1.20.1"].stdout, "pacs") == (1, 1)
    assert lane_and_attempt_events(traces["1.20.2"].stdout, "pacs") == (2, 2)
    # The ledger's count of failures, which the retry schedule goes by, is kept apart.
    assert as_json["attempts"] == 2 and as_json["failures"] == 1


async def test_map_full_refuses_then_recovers_and_loses_nothing(tmp_path):
    gate = trio.Event()
    sink = Sink(gate=gate)
    config = StoreConfig(map_size_mb=1, high_water=0.7, min_free_disk_mb=0,
                         spool_threshold_kb=1024, retention_s=0, purge_interval_s=0.1)
    acked: list[str] = []
    async with running(tmp_path, {"pacs": sink}, config) as (feed, store, _):
        refused = None
        for i in range(200):
            a = arrival(f"1.6.{i}", bytes([i % 251]) * 16_000)
            await feed.put(a)
            try:
                await a.receipt.wait()
            except StoreFull as exc:
                refused = exc
                break
            acked.append(a.envelope.sop_instance_uid)
        assert refused is not None and "high-water" in str(refused)
        assert 5 < len(acked) < 200
        gate.set()  # the destination comes back: deliveries, then purge, free the map
        await sink.wait_for(lambda: len(sink.delivered) == len(acked))
        with trio.fail_after(10):
            while store.report()["store"]["objects"] > 0:
                await trio.sleep(0.05)
        late = arrival("1.6.late", b"after the purge" * 1000)
        await feed.put(late)
        await late.receipt.wait()
        await sink.wait_for(lambda: "1.6.late" in sink.delivered)
    assert sorted(sink.delivered) == sorted([*acked, "1.6.late"])


async def test_low_disk_refuses_new_arrivals_with_store_full(tmp_path):
    config = StoreConfig(min_free_disk_mb=10 ** 9)  # more than any disk has free
    async with running(tmp_path, {}, config) as (feed, store, _):
        a = arrival("1.7.1", b"x")
        await feed.put(a)
        try:
            await a.receipt.wait()
        except StoreFull as exc:
            assert "disk free" in str(exc)
        else:
            raise AssertionError("a low disk must refuse the arrival")
        assert store.report()["store"]["objects"] == 0


async def test_tampered_stored_bytes_are_dead_lettered_not_sent(tmp_path):
    async with running(tmp_path, {"pacs": Sink(gate=trio.Event())}) as (feed, store, runner):
        a = arrival("1.8.1", b"original bytes")
        await feed.put(a)
        await a.receipt.wait()
        runner.abort()
    env = Env.open(tmp_path, map_size_mb=StoreConfig().map_size_mb)  # the store is closed now
    with env.begin(write=True) as txn:
        sealed = bytearray(txn.get(b"1.8.1", db=env.blobs))
        sealed[20] ^= 1
        txn.put(b"1.8.1", bytes(sealed), db=env.blobs)
    env.close()
    sink = Sink()
    async with running(tmp_path, {"pacs": sink}) as (feed, store, _):
        with trio.fail_after(10):
            while store.report()["lanes"]["pacs"]["dead_lettered"] != 1:
                await trio.sleep(0.02)
        trace = admin.trace(store, "1.8.1")
    assert sink.seen == []
    assert trace["lanes"]["pacs"]["reason"] == "stored bytes unreadable: Tampered"


async def test_cli_replays_all_and_purges_dead_letters_of_a_stopped_graph(tmp_path):
    data = tmp_path / "data"
    config_args, graph = graph_files(tmp_path, data)

    async def refuse(delivery):
        return Permanent("0x0122 SOP class not supported")

    config = StoreConfig(min_free_disk_mb=0)
    async with running(data, {"pacs": Sink(refuse, name="pacs_sink")}, config) as (
            feed, store, _):
        for i in range(3):
            await feed.put(arrival(f"1.10.{i}", b"q"))
        with trio.fail_after(10):
            while store.report()["lanes"]["pacs"]["dead_lettered"] != 3:
                await trio.sleep(0.02)

    def flow(*args):
        return run_flow([args[0], graph, *config_args, *args[1:]], timeout=60)

    purged = await trio.to_thread.run_sync(flow, "deadletters", "purge", "1.10.0")
    assert purged.returncode == 0 and "1.10.0 purged" in purged.stdout
    again = await trio.to_thread.run_sync(flow, "deadletters", "purge", "1.10.0")
    assert again.returncode == 1 and "no matching dead letter" in again.stdout
    replayed = await trio.to_thread.run_sync(flow, "deadletters", "replay", "--all")
    assert replayed.returncode == 0
    assert sorted(replayed.stdout.split()[3::5]) == ["1.10.1", "1.10.2"]
    status = json.loads((await trio.to_thread.run_sync(flow, "status", "--json")).stdout)
    lane = status["lanes"]["pacs"]
    assert (lane["queued"], lane["dead_lettered"], status["running"]) == (2, 0, False)

    sink = Sink(name="pacs_sink")  # the graph runs again: the replayed items go out
    async with running(data, {"pacs": sink}, config) as (feed, store, _):
        await sink.wait_for(lambda: sorted(sink.delivered) == ["1.10.1", "1.10.2"])


async def test_retry_after_from_the_peer_sets_the_retry_time(tmp_path):
    async def busy(delivery):
        return Transient("http 503", retry_after=120.0)

    config = StoreConfig(min_free_disk_mb=0, retry_initial_s=0.05)
    sink = Sink(busy)
    async with running(tmp_path, {"pacs": sink}, config) as (feed, store, _):
        await feed.put(arrival("1.11.1", b"w"))
        await sink.wait_for(lambda: len(sink.seen) == 1)
        with trio.fail_after(10):
            while store.report()["lanes"]["pacs"]["retrying"] != 1:
                await trio.sleep(0.02)
        events = admin.trace(store, "1.11.1")["events"]
    scheduled = [e for e in events if e["event"] == "retry_scheduled"]
    assert [e["detail"] for e in scheduled] == ["due in 120.0s"]
    attempt = next(e for e in events if e["event"] == "attempt")
    assert attempt["detail"] == "retry_after=120s" and attempt["reason"] == "http 503"


async def test_object_is_purged_once_every_lane_delivered_or_skipped(tmp_path):
    async def not_a_report(delivery):
        return Skipped("not a structured report")

    pacs, ris = Sink(), Sink(not_a_report)
    config = StoreConfig(min_free_disk_mb=0, retention_s=0, purge_interval_s=0.05)
    async with running(tmp_path, {"pacs": pacs, "ris": ris}, config) as (feed, store, _):
        a = arrival("1.12.1", b"image")
        await feed.put(a)
        await a.receipt.wait()
        with trio.fail_after(10):
            while store.report()["store"]["objects"]:
                await trio.sleep(0.02)
        report = store.report()["lanes"]
        events = [e["event"] for e in admin.trace(store, "1.12.1")["events"]]
    assert report["ris"]["skipped"] == 1 and report["pacs"]["delivered"] == 1  # totals
    assert events[0] == "arrival" and events[-2:] == ["finished", "purge"]
    assert events.count("attempt") == 2


async def test_audit_trail_expires_after_its_retention_but_not_a_new_arrivals(tmp_path):
    config = StoreConfig(min_free_disk_mb=0, retention_s=0, audit_retention_s=0,
                         purge_interval_s=0.05)
    sink = Sink()
    async with running(tmp_path, {"pacs": sink}, config) as (feed, store, _):
        first = arrival("1.13.1", b"v1")
        await feed.put(first)
        await first.receipt.wait()
        with trio.fail_after(10):
            while admin.trace(store, "1.13.1")["events"]:
                await trio.sleep(0.02)
        sink.gate = trio.Event()  # hold the new copy in its lane: not finished, not purged
        again = arrival("1.13.1", b"v1")  # purged: stored anew, not a duplicate
        await feed.put(again)
        await again.receipt.wait()
        events = [e["event"] for e in admin.trace(store, "1.13.1")["events"]]
        sink.gate.set()
    assert not again.receipt.duplicate
    assert events == ["arrival"]
