"""Service-manager readiness: the sd_notify datagrams (real Unix datagram sockets) and the
runner's ready signal (in process)."""

import os
import socket

import trio
import trio.testing

from flow import Graph, Node, Runner
from flow._notify import Notifier
from support.flownodes import Collect, Counter


def bound_socket(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().split("\n"))


def test_ready_reloading_stopping_reach_a_path_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    with bound_socket(path) as sock:
        notifier = Notifier({"NOTIFY_SOCKET": path})
        assert notifier.ready("graph g running")
        assert fields(sock.recv(4096)) == {"READY": "1", "STATUS": "graph g running"}
        assert notifier.reloading()
        reloading = fields(sock.recv(4096))
        assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
        assert notifier.stopping()
        assert fields(sock.recv(4096))["STOPPING"] == "1"


def test_an_at_sign_names_the_abstract_namespace():
    name = f"dicomflow-test-{os.getpid()}-{os.urandom(4).hex()}"
    with bound_socket("\0" + name) as sock:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready("up")
        assert fields(sock.recv(4096))["READY"] == "1"


def test_without_notify_socket_nothing_is_sent():
    notifier = Notifier({})
    assert not notifier.enabled
    assert not notifier.ready("up")


def test_an_unreachable_socket_is_logged_once_and_never_raises(tmp_path, caplog):
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert not notifier.ready("up")
    assert not notifier.stopping()
    assert [r.getMessage() for r in caplog.records].count("notify.failed") <= 1
    assert any("notify.failed" in r.getMessage() for r in caplog.records)


class Listener(Node):
    """A source that serves only once ``open_for_business`` is set."""

    inputs = ()
    signals_ready = True

    def __init__(self, open_for_business: trio.Event) -> None:
        super().__init__()
        self.open_for_business = open_for_business

    async def run(self, ctx) -> None:
        await self.open_for_business.wait()
        ctx.ready()
        await trio.sleep_forever()


async def test_graph_is_ready_only_once_every_signalling_node_serves():
    open_for_business = trio.Event()
    runner = Runner(Graph(Listener(open_for_business) >> Collect()))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        await runner.started.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert not runner.ready.is_set()
        open_for_business.set()
        with trio.fail_after(5):
            await runner.ready.wait()
        nursery.cancel_scope.cancel()


async def test_graph_without_signalling_nodes_is_ready_once_started():
    runner = Runner(Graph(Counter(3) >> Collect()))
    await runner.run()
    assert runner.ready.is_set()
