"""One data dir, several OS processes: each runs part of the same graph file with a
:class:`flow.Placement` (ingest, or the ``pacs`` lane), the way issue 16's runtime starts them.

The graph is ``TcpReceiver >> Store >> {"pacs": FileSink}`` (a ``Sink`` that never settles
when the site file says ``block``, that dead-letters everything with ``refuse``): the receiver answers each object only after the Store's
commit, the file sink appends each delivered uid with fsync. ``poll_s`` and
``purge_interval_s`` are an hour, so anything that happens within the tests' bounded waits
happened because a process was woken, not because it polled.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import textwrap
import time
from pathlib import Path

import pytest
import trio

from flow import Placement
from nodes.store import LaneTaken, Store, StoreConfig, admin
from nodes.store.rundir import RunDir, lane_name
from support.flowproc import FlowProcess, flow_env
from support.peers import Process, free_port, wait_for_port
from support.storenodes import encode_frame
from support.synth import CANARY, CANARY_ID, CANARY_PARTS, ct, to_part10

HOUR = 3600.0
BOUND_S = 30.0  # a bounded wait, far below HOUR

GRAPH = textwrap.dedent('''
    import trio
    from flow import Config, Graph
    from nodes.outcome import Permanent
    from nodes.store import Store, StoreConfig
    from support.storenodes import FileSink, ReceiverConfig, Sink, SinkConfig, TcpReceiver

    class Site(Config):
        data_dir: str
        receiver: ReceiverConfig
        sink: SinkConfig
        block: bool = False
        refuse: bool = False
        store: StoreConfig = StoreConfig()

    async def refuse(delivery):
        return Permanent("0xA900 refused by the test")

    site = Graph.config(Site)
    store = Store(site.data_dir, site.store)
    pacs = (Sink(gate=trio.Event(), name="pacs_sink") if site.block
            else Sink(refuse, name="pacs_sink") if site.refuse
            else FileSink(site.sink, name="pacs_sink"))
    graph = Graph(TcpReceiver(site.receiver) >> store >> {"pacs": pacs}, name="split")
''')

# Runs the lanes a Placement names, as one child of issue 16's runtime would; SIGTERM
# stops it gracefully; a refusal at open is one line on stderr and exit 1.
PLACED = textwrap.dedent('''
    import signal
    import sys

    import trio

    from flow import FlowError, Placement, Runner, load
    from flow._log import configure
    from nodes.store import Store

    graph_path, config_path, role, replica, replicas = sys.argv[1:6]


    async def main() -> None:
        graph = load(graph_path, config_path).graph
        store = next(n for n in graph.nodes if isinstance(n, Store))
        lanes = {graph.lane_of[id(store)]} if role == "ingest" else set(role.split(","))
        placement = Placement(process=f"{role}-{replica}", lanes=frozenset(lanes),
                              replica=int(replica), replicas=int(replicas))
        runner = Runner(graph, placement=placement)
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                async def stop_on_signal() -> None:
                    async for _ in signals:
                        runner.stop()
                        return

                nursery.start_soon(stop_on_signal)
                await runner.run(deadline=2)
                nursery.cancel_scope.cancel()


    configure("INFO")
    try:
        trio.run(main)
    except* FlowError as group:
        print(f"error: {group.exceptions[0]}", file=sys.stderr)
        sys.exit(1)
''')

NEEDLES = [*CANARY_PARTS, CANARY_ID, CANARY]


class Placed(FlowProcess):
    """A child process running ``role`` (``ingest`` or lanes, comma-separated) of the graph."""

    def __init__(self, site: "Site", role: str, log: Path, *, config: Path | None = None,
                 replica: int = 0, replicas: int = 1) -> None:
        Process.__init__(self, [sys.executable, str(site.script), str(site.graph),
                                str(config or site.config), role, str(replica), str(replicas)],
                         env=flow_env(), log=log)


class Site:
    """The graph file, the runner script and site files (one per ingest port) in ``root``."""

    def __init__(self, root: Path, **store: object) -> None:
        self.root = root
        self.data = root / "data"
        self.out = root / "delivered.txt"
        self.graph = root / "split.py"
        self.graph.write_text(GRAPH)
        self.script = root / "placed.py"
        self.script.write_text(PLACED)
        self.store = {"min_free_disk_mb": 0, "poll_s": HOUR, "purge_interval_s": HOUR, **store}
        self.port = free_port()
        self.config = self.site_file("site.toml", self.port)

    def site_file(self, name: str, port: int, *, block: bool = False,
                  refuse: bool = False) -> Path:
        path = self.root / name
        path.write_text(
            f"data_dir = {json.dumps(str(self.data))}\nblock = {str(block).lower()}\n"
            f"refuse = {str(refuse).lower()}\n"
            f"[receiver]\nport = {port}\n[sink]\npath = {json.dumps(str(self.out))}\n"
            "[store]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in self.store.items()))
        return path

    def report(self) -> dict:
        """What ``flow status`` reads of the Store (read-only, from this test process)."""
        store = Store(self.data, StoreConfig(**self.store))
        store.branch("pacs")
        return store.report()

    def delivered(self) -> list[str]:
        return self.out.read_text().split() if self.out.exists() else []


def objects(count: int) -> dict[str, bytes]:
    """Synthetic CTs whose bytes carry the PHI canary."""
    out = {}
    for _ in range(count):
        ds = ct()
        out[str(ds.SOPInstanceUID)] = to_part10(ds)
    return out


def send(port: int, items: dict[str, bytes]) -> None:
    """Send each object; each must be answered ``A`` (committed) by the ingest process."""
    with socket.create_connection(("127.0.0.1", port), timeout=BOUND_S) as sock:
        for uid, data in items.items():
            sock.sendall(encode_frame(uid, data))
            assert sock.recv(1) == b"A", uid


def wait_until(predicate, what: str, *procs: Placed) -> None:
    deadline = time.monotonic() + BOUND_S
    while not predicate():
        if time.monotonic() > deadline:
            logs = "\n".join(p.output() for p in procs)
            raise AssertionError(f"not within {BOUND_S}s: {what}\n{logs}")
        time.sleep(0.05)


def assert_no_phi(*procs: Placed) -> None:
    for proc in procs:
        text = proc.output()
        assert "store.opened" in text  # the log was captured
        for needle in NEEDLES:
            assert needle not in text, f"{needle!r} in the log of {proc.args[4:]}"


def stop_all(*procs: Placed) -> None:
    for proc in procs:
        proc.stop()


def test_a_commit_in_the_ingest_process_wakes_the_lane_process_at_once(tmp_path):
    site = Site(tmp_path)
    lane = Placed(site, "pacs", tmp_path / "lane.log")
    ingest = None
    try:
        lane.wait_for_log(r"graph\.started")  # its pump claimed nothing and waits (an hour)
        ingest = Placed(site, "ingest", tmp_path / "ingest.log")
        wait_for_port(site.port)
        for round_ in range(2):  # the second after the pump went idle again
            batch = objects(3)
            send(site.port, batch)
            wait_until(lambda: set(batch) <= set(site.delivered()),
                       f"round {round_} delivered", lane, ingest)
        assert len(site.delivered()) == 6

        def settled() -> bool:  # an outcome commits a moment after the sink wrote its file
            lanes = site.report()["lanes"]["pacs"]
            return (lanes["delivered"], lanes["queued"], lanes["in_flight"]) == (6, 0, 0)
        wait_until(settled, "every outcome committed", lane, ingest)
    finally:
        stop_all(*filter(None, (ingest, lane)))
    assert "pumps=pacs" in lane.output() and "pumps=-" in ingest.output()
    assert_no_phi(lane, ingest)


def test_a_killed_lane_process_leaves_its_items_to_the_next_one_not_to_ingest(tmp_path):
    site = Site(tmp_path)
    blocked = site.site_file("blocked.toml", site.port, block=True)
    ingest = Placed(site, "ingest", tmp_path / "ingest.log")
    first = Placed(site, "pacs", tmp_path / "first.log", config=blocked)
    procs = [ingest, first]
    try:
        wait_for_port(site.port)
        first.wait_for_log(r"graph\.started")
        batch = objects(3)
        send(site.port, batch)
        wait_until(lambda: site.report()["lanes"]["pacs"]["in_flight"] == 3,
                   "3 in flight in the blocked lane", *procs)
        first.kill()  # SIGKILL: the kernel drops its lane lock

        # An ingest process opened now does not take the lane's items: they stay in flight.
        other_port = free_port()
        replica = Placed(site, "ingest", tmp_path / "replica.log", replica=1, replicas=2,
                         config=site.site_file("replica.toml", other_port))
        procs.append(replica)
        replica.wait_for_log(r"graph\.started")
        assert "requeued=0" in replica.output()
        assert site.report()["lanes"]["pacs"]["in_flight"] == 3

        second = Placed(site, "pacs", tmp_path / "second.log")
        procs.append(second)
        wait_until(lambda: set(batch) <= set(site.delivered()), "re-queued and delivered",
                   *procs)
        assert "requeued=3" in second.output()

        def settled() -> bool:  # outcomes commit a moment after the sink wrote (linger)
            lanes = site.report()["lanes"]["pacs"]
            return (lanes["delivered"], lanes["in_flight"]) == (3, 0)
        wait_until(settled, "every outcome committed", *procs)
    finally:
        stop_all(*reversed(procs))
    assert sorted(site.delivered()) == sorted(batch)  # each once: the killed one sent none
    assert_no_phi(*procs)


def test_a_second_process_pumping_the_same_lane_is_refused_in_one_line(tmp_path):
    site = Site(tmp_path)
    lane = Placed(site, "pacs", tmp_path / "lane.log")
    ingest = Placed(site, "ingest", tmp_path / "ingest.log")
    try:
        lane.wait_for_log(r"graph\.started")
        wait_for_port(site.port)
        intruder = Placed(site, "pacs", tmp_path / "intruder.log")
        assert intruder.wait(BOUND_S) == 1
        text = intruder.output()
        errors = [line for line in text.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in text, text
        assert errors[0].startswith("error: store 'store': lane 'pacs' of data dir")
        assert f"(pid {lane.pid}," in errors[0] and "nothing was changed" in errors[0]
        assert "store.opened" not in text
        # The refused process took nothing: the first still holds the lane and is woken.
        assert (site.data / "run" / "lane-pacs.lock").read_text().strip() == str(lane.pid)
        batch = objects(2)
        send(site.port, batch)
        wait_until(lambda: set(batch) <= set(site.delivered()), "delivered", lane, ingest)
    finally:
        stop_all(ingest, lane)
    assert_no_phi(lane, ingest)
    assert not any(needle in intruder.output() for needle in NEEDLES)


def test_housekeeping_runs_in_ingest_replica_0_only_and_is_woken_by_the_lane(tmp_path):
    site = Site(tmp_path, retention_s=0)
    other_port = free_port()
    first = Placed(site, "ingest", tmp_path / "ingest0.log", replicas=2)
    second = Placed(site, "ingest", tmp_path / "ingest1.log", replica=1, replicas=2,
                    config=site.site_file("replica.toml", other_port))
    lane = Placed(site, "pacs", tmp_path / "lane.log")
    procs = [first, second, lane]
    try:
        wait_for_port(site.port)
        wait_for_port(other_port)
        lane.wait_for_log(r"graph\.started")
        batch = objects(3)
        send(other_port, batch)  # committed by replica 1, delivered by the lane process
        wait_until(lambda: set(batch) <= set(site.delivered()), "delivered", *procs)
        wait_until(lambda: site.report()["store"]["objects"] == 0, "purged", *procs)
        first.wait_for_log(r"store\.purged")
    finally:
        stop_all(*procs)
    assert "housekeeping=True" in first.output()
    for other in (second, lane):
        assert "housekeeping=False" in other.output()
        assert "store.purged" not in other.output()
    assert_no_phi(*procs)


def test_a_replay_from_the_cli_wakes_the_lane_process(tmp_path):
    site = Site(tmp_path)
    refusing = Placed(site, "pacs", tmp_path / "refusing.log",
                      config=site.site_file("refusing.toml", site.port, refuse=True))
    ingest = Placed(site, "ingest", tmp_path / "ingest.log")
    procs = [refusing, ingest]
    try:
        wait_for_port(site.port)
        batch = objects(2)
        send(site.port, batch)
        wait_until(lambda: site.report()["lanes"]["pacs"]["dead_lettered"] == 2,
                   "dead-lettered", *procs)
        refusing.stop()
        lane = Placed(site, "pacs", tmp_path / "lane.log")
        procs.append(lane)
        lane.wait_for_log(r"graph\.started")  # nothing queued: its pump waits (an hour)
        store = Store(site.data, StoreConfig(**site.store))
        store.branch("pacs")
        assert sorted(uid for _, uid in admin.replay(store, None)) == sorted(batch)
        wait_until(lambda: set(batch) <= set(site.delivered()), "replayed and delivered",
                   *procs)
    finally:
        stop_all(*procs)
    assert_no_phi(*procs)


# -- the same rules inside one process, and the run dir on its own ------------------------

async def test_two_stores_of_one_process_cannot_pump_the_same_lane(tmp_path):
    config = StoreConfig(min_free_disk_mb=0)
    first, second = Store(tmp_path, config), Store(tmp_path, config)
    first.branch("pacs")
    second.branch("pacs")
    await first.open()
    try:
        with pytest.raises(LaneTaken, match=rf"lane 'pacs' .* this process \(pid {os.getpid()},"):
            await second.open()
    finally:
        await first.close()
    await second.open()  # closing gave the lane back
    await second.close()


@pytest.mark.parametrize("journal_mb", [64, 0])
async def test_a_lanes_only_process_lingers_its_writes_only_when_ingest_has_no_journal(
        tmp_path, journal_mb):
    """Beside ingest processes without a journal, whose arrivals wait for LMDB's writer to
    be acknowledged, a lanes-only process's lane writes linger (lane_linger_ms) even though
    no arrival of its own comes; with the journal, arrivals are acknowledged before LMDB
    takes them in, so its lane writes commit at once (docs/decisions.md, session 21)."""
    config = StoreConfig(min_free_disk_mb=0, lane_linger_ms=1000, journal_mb=journal_mb)
    store = Store(tmp_path, config)
    store.branch("pacs")
    store.place(Placement(process="lanes-0", lane="ingest", lanes=frozenset({"pacs"})))
    await store.open()
    try:
        assert store.pumped == ["pacs"] and not store.ingests
        committer, env = store.committer, store.env
        assert committer is not None and env is not None

        def lane_write(txn):
            txn.put(b"outcome", b"delivered", db=env.meta)

        linger = config.lane_linger_ms / 1000
        started = trio.current_time()
        with trio.fail_after(BOUND_S):
            await committer.one(lane_write, linger=linger)
        took = trio.current_time() - started
        if journal_mb:
            assert took < linger / 2 and committer.commits == 1
        else:  # nothing else commits here: the write waited out its linger window
            assert took >= linger * 0.9 and committer.commits == 1
    finally:
        await store.close()


async def test_a_doorbell_rings_across_run_dirs_even_where_the_path_is_too_long(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)  # a Store creates its data dir before anything else
    for data_dir, abstract in ((tmp_path, False), (deep, True)):
        listener, ringer = RunDir(data_dir), RunDir(data_dir)
        name = lane_name("pacs")
        try:
            assert listener.take(name) is None and ringer.take(name) == os.getpid()
            listener.listen(name)
            assert listener.address(name).startswith("\0") == abstract
            with trio.fail_after(BOUND_S):
                ringer.ring(name)
                await listener.wait(name, trio.Event())
            with trio.move_on_after(0.05) as idle:  # consumed: nothing rings any more
                await listener.wait(name, trio.Event())
            assert idle.cancelled_caught
        finally:
            listener.release()
            ringer.release()
        ringer.ring(name)  # nobody listens: nothing happens, nothing raises
        assert not (data_dir / "run" / f"{name}.sock").exists()


def test_lane_names_become_file_names_that_cannot_collide_or_escape():
    assert lane_name("pacs") == "lane-pacs"
    odd = [lane_name(n) for n in ("../x", "a/b", "a_b", "a b", "é" * 80)]
    assert len(set(odd)) == len(odd) and all("/" not in n and len(n) < 64 for n in odd)


def test_processes_opening_a_fresh_data_dir_at_once_agree_on_one_key(tmp_path):
    site = Site(tmp_path)
    opener = tmp_path / "open.py"
    opener.write_text(textwrap.dedent(f'''
        import trio
        from flow._log import configure
        from nodes.store import Store, StoreConfig

        async def main():
            store = Store({str(site.data)!r}, StoreConfig(min_free_disk_mb=0))
            await store.open()
            await store.close()

        configure("INFO")
        trio.run(main)
    '''))
    procs = [Process([sys.executable, str(opener)], env=flow_env(), log=tmp_path / f"{i}.log")
             for i in range(3)]
    try:
        assert [p.popen.wait(BOUND_S) for p in procs] == [0, 0, 0]
    finally:
        stop_all(*procs)
    logs = [p.output() for p in procs]
    assert sum("store.data_dir_created" in text for text in logs) == 1, logs
    key_ids = {re.search(r"store\.opened .*key_id=(\w+)", text).group(1) for text in logs}
    assert len(key_ids) == 1


def test_a_doorbell_name_taken_by_someone_else_leaves_the_lane_on_its_poll(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)  # too long for a file: an abstract name
    deep.mkdir(parents=True)
    run, name = RunDir(deep), lane_name("pacs")
    squatter = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        squatter.bind(run.address(name))
        assert run.take(name) is None
        assert run.listen(name) is False and not run.listening(name)
    finally:
        run.release()
        squatter.close()
