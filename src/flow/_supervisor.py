"""The supervisor: one place where restart policy, lane isolation and shutdown live.

Each lane runs in its own cancel scope and each node in its own task inside it. A node that
raises is logged with routing-safe fields and restarted after a capped exponential backoff
with jitter; a node that fails ``max_failures`` times within ``window_s`` is marked failed and
its lane is cancelled, while every other lane keeps running: a failure travels up to the
supervisor, never sideways into a sibling lane.

Graceful stop cancels the *source* nodes (those without inputs: listeners, the pumps of
durable lanes); their output edges close and end-of-stream flows down each lane, so in-flight
work finishes and everything else stays durably queued. Whatever is still running at the
deadline is cancelled.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trio

from ._config import RestartPolicy
from ._direct import Direct
from ._egress import EgressPolicy
from ._graph import Graph, Lane
from ._health import FAILED, FINISHED, RESTARTING, RUNNING, STARTING, STOPPED, NodeHealth
from ._log import get_logger
from ._node import Context, Node
from ._placement import Placement

log = get_logger("flow.supervisor")


@dataclass
class Ports:
    """One node's side of its edges, by port name: channels, and the edges' direct ways."""

    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    direct_in: dict[str, Direct] = field(default_factory=dict)
    direct_out: dict[str, Direct] = field(default_factory=dict)


def backoff_delay(policy: RestartPolicy, failures: int, rng: random.Random) -> float:
    """Capped exponential backoff with multiplicative jitter; ``failures`` ≥ 1."""
    base = min(policy.backoff_max_s, policy.backoff_initial_s * 2 ** min(failures - 1, 30))
    return base * rng.uniform(1 - policy.jitter, 1 + policy.jitter)


def error_class(exc: BaseException) -> str:
    """The class name to report; a one-exception group reports its member."""
    return type(sole_exception(exc)).__name__


def sole_exception(exc: BaseException) -> BaseException:
    """``exc``, or the one exception that (nested) one-exception groups wrap."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class Runner:
    """Runs one graph: ``await runner.run()``; ``runner.stop()`` begins a graceful stop.

    ``placement``: the lanes of the graph this process runs (:mod:`flow._placement`; by
    default all of them). Only their nodes run, and the durable nodes that feed them are
    opened too (their branch sources read them); the health file is then the parent's to
    write (:mod:`flow._processes`), not this runner's.
    """

    def __init__(self, graph: Graph, *, restart: RestartPolicy | None = None,
                 egress: EgressPolicy | None = None, rng: random.Random | None = None,
                 placement: Placement | None = None) -> None:
        self.graph = graph
        self.policy = restart or RestartPolicy()
        self.egress = egress or graph.egress_policy
        self.rng = rng or random.Random()
        self.placement = placement or Placement()
        self.lanes = [lane for lane in graph.lanes if self.placement.runs(lane.name)]
        here = {id(n) for lane in self.lanes for n in lane.nodes}
        feeders = {id(fan.durable) for fan in graph.fanouts
                   if any(self.placement.runs(name) for name in fan.branches)}
        # In graph order (upstream first): a durable node opens before its branch sources.
        self.opens = [n for n in graph.nodes if id(n) in here or id(n) in feeders]
        self.nodes = [n for n in graph.nodes if id(n) in here]
        self.health: dict[str, NodeHealth] = {
            n.name: NodeHealth(n.name, graph.lane_of[id(n)]) for n in self.nodes}
        self.started = trio.Event()
        # Set once every node with ``signals_ready`` has called ``ctx.ready()`` (at start when
        # there is none): what ``flow run`` reports to a service manager as READY.
        self.ready = trio.Event()
        self._not_ready = {n.name for n in self.nodes if n.signals_ready}
        self.stopping = False
        self._stop_requested = trio.Event()
        self._root: trio.CancelScope | None = None
        self._source_scopes: list[trio.CancelScope] = []
        self._lane_scopes: dict[str, trio.CancelScope] = {}
        self._failed_lanes: set[str] = set()

    # -- queries ----------------------------------------------------------------------------

    def lane_state(self, lane: str) -> str:
        if lane in self._failed_lanes:
            return FAILED
        states = {self.health[n.name].state for n in self.graph.lane(lane).nodes}
        for state in (RESTARTING, RUNNING, STARTING):
            if state in states:
                return state
        return FINISHED if states == {FINISHED} else STOPPED

    def snapshot(self) -> dict[str, Any]:
        """Health of every node and lane (what ``flow status`` shows)."""
        return {
            "graph": self.graph.name,
            "pid": os.getpid(),
            "time": time.time(),
            "stopping": self.stopping,
            "lanes": {lane.name: self.lane_state(lane.name) for lane in self.lanes},
            "nodes": [h.snapshot() for h in self.health.values()],
        }

    @property
    def failed_lanes(self) -> set[str]:
        return set(self._failed_lanes)

    # -- control ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Begin a graceful stop: sources stop, end-of-stream drains every lane."""
        if not self.stopping:
            self.stopping = True
            self._stop_requested.set()
            log.info("graph.stopping", graph=self.graph.name)
        for scope in self._source_scopes:
            scope.cancel()

    def abort(self) -> None:
        """Cancel everything now (deadline passed, or a second signal)."""
        self.stop()
        if self._root is not None:
            self._root.cancel()

    # -- running ----------------------------------------------------------------------------

    async def run(self, *, deadline: float | None = None) -> None:
        """Open the nodes, run every lane until all finish, close the nodes.

        ``deadline`` (seconds) bounds a graceful stop: counted from :meth:`stop`, after it
        everything still running is cancelled. Node ``open()`` errors propagate: the graph
        does not start half-open.
        """
        opened: list[Node] = []
        publish = self.graph.state_dir is not None and not self.placement.shared
        try:
            for node in self.opens:
                node.place(replace(self.placement, lane=self.graph.lane_of[id(node)]))
                opener = getattr(node, "open", None)
                if opener is not None:
                    await opener()
                opened.append(node)
            channels = self._channels()
            with trio.CancelScope() as root:
                self._root = root
                async with trio.open_nursery() as nursery:
                    if deadline is not None:
                        nursery.start_soon(self._deadline_watch, deadline)
                    if publish:
                        nursery.start_soon(self._publish_health, self.graph.state_dir)
                    async with trio.open_nursery() as lanes:
                        for lane in self.lanes:
                            lanes.start_soon(self._run_lane, lane, channels)
                        self.started.set()
                        log.info("graph.started", graph=self.graph.name,
                                 nodes=len(self.nodes), lanes=len(self.lanes))
                        self._node_ready()
                    nursery.cancel_scope.cancel()  # lanes done: stop the watchers
            if root.cancelled_caught:
                log.warning("graph.deadline", graph=self.graph.name, deadline_s=deadline)
        finally:
            with trio.CancelScope(shield=True):
                for node in reversed(opened):
                    closer = getattr(node, "close", None)
                    if closer is not None:
                        try:
                            await closer()
                        except Exception as exc:
                            log.error("node.close_failed", node=node.name,
                                      error_class=error_class(exc))
            if publish:
                try:
                    self._write_health(self.graph.state_dir)
                except OSError as exc:  # e.g. a full disk: the stop itself went fine
                    log.warning("health.write_failed", error_class=error_class(exc))
            log.info("graph.stopped", graph=self.graph.name)

    def _node_ready(self, name: str | None = None) -> None:
        """Node ``name`` (one with ``signals_ready``) serves now; None: the lanes started."""
        if name is not None:
            self._not_ready.discard(name)
        if not self._not_ready and self.started.is_set() and not self.ready.is_set():
            self.ready.set()
            log.info("graph.ready", graph=self.graph.name)

    def _channels(self) -> dict[int, Ports]:
        """Each node's ports: its channels and their :class:`~._direct.Direct` ways round."""
        io = {id(n): Ports() for n in self.nodes}
        for edge in self.graph.edges:
            if id(edge.src) not in io or id(edge.dst) not in io:
                continue  # an edge of a lane another process runs
            send, recv = trio.open_memory_channel[Any](edge.dst.capacity)
            direct = Direct()
            src, dst = io[id(edge.src)], io[id(edge.dst)]
            src.outputs[edge.src_port], src.direct_out[edge.src_port] = send, direct
            dst.inputs[edge.dst_port], dst.direct_in[edge.dst_port] = recv, direct
        return io

    async def _deadline_watch(self, deadline: float) -> None:
        await self._stop_requested.wait()
        await trio.sleep(deadline)
        if self._root is not None:
            self._root.cancel()

    async def _run_lane(self, lane: Lane, channels: dict[int, Any]) -> None:
        with trio.CancelScope() as scope:
            self._lane_scopes[lane.name] = scope
            async with trio.open_nursery() as nursery:
                for node in lane.nodes:
                    nursery.start_soon(self._supervise, node, lane, channels[id(node)], scope)
        if lane.name in self._failed_lanes:
            for node in lane.nodes:
                if self.health[node.name].state not in (FAILED, FINISHED):
                    self.health[node.name].state = STOPPED

    async def _supervise(self, node: Node, lane: Lane, ports: Ports,
                         lane_scope: trio.CancelScope) -> None:
        health = self.health[node.name]
        ctx = Context(node, lane.name, ports.inputs, ports.outputs,
                      get_logger(f"flow.node.{node.name}", node=node.name, lane=lane.name),
                      self.egress, health, on_ready=self._node_ready,
                      direct=(ports.direct_in, ports.direct_out))
        scope = trio.CancelScope()
        if not node.inputs:
            self._source_scopes.append(scope)
            if self.stopping:
                scope.cancel()
        try:
            with scope:
                while True:
                    health.state = RUNNING
                    try:
                        await node.run(ctx)
                    except Exception as exc:
                        if not await self._after_crash(node, lane, ctx, exc, lane_scope):
                            return
                        continue
                    health.state = FINISHED
                    return
        finally:
            if health.state == RUNNING or health.state == RESTARTING:
                health.state = STOPPED
            for channel in ports.outputs.values():
                channel.close()

    async def _after_crash(self, node: Node, lane: Lane, ctx: Context, exc: Exception,
                           lane_scope: trio.CancelScope) -> bool:
        """Record a crash; sleep the backoff and return True to restart, False if failed."""
        health = self.health[node.name]
        name = error_class(exc)
        health.last_error_class = name
        now = time.monotonic()
        health.failures.append(now)
        while health.failures and now - health.failures[0] > self.policy.window_s:
            health.failures.popleft()
        # Debug only: the traceback may quote values from an item (PHI).
        log.debug("node.traceback", node=node.name, lane=lane.name, error_class=name,
                  detail=repr(exc))
        with trio.CancelScope(shield=True):
            try:
                await ctx.abandon_held(name)
            except Exception as abandon_exc:
                log.error("node.abandon_failed", node=node.name, lane=lane.name,
                          error_class=error_class(abandon_exc))
        if len(health.failures) >= self.policy.max_failures:
            health.state = FAILED
            self._failed_lanes.add(lane.name)
            log.error("node.failed", node=node.name, lane=lane.name, error_class=name,
                      failures=len(health.failures), restarts=health.restarts)
            log.error("lane.stopped", lane=lane.name, node=node.name)
            lane_scope.cancel()
            return False
        # The exponent is the number of recent failures: a node that has run cleanly for a
        # whole window starts again from the initial delay.
        delay = backoff_delay(self.policy, len(health.failures), self.rng)
        health.state = RESTARTING
        log.warning("node.crashed", node=node.name, lane=lane.name, error_class=name,
                    restarts=health.restarts, delay_s=round(delay, 3))
        await trio.sleep(delay)
        health.restarts += 1
        return True

    # -- health file ------------------------------------------------------------------------

    def _write_health(self, state_dir: Path) -> None:
        write_health(state_dir, self.snapshot())

    async def _publish_health(self, state_dir: Path) -> None:
        await publish_health(state_dir, self.snapshot)


HEALTH_EVERY_S = 1.0


def write_health(state_dir: Path, snapshot: dict[str, Any]) -> None:
    """Replace ``state_dir/health.json`` (what ``flow status`` reads) with ``snapshot``."""
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / f".health.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(snapshot, indent=1))
        os.replace(tmp, state_dir / "health.json")
    except OSError:
        tmp.unlink(missing_ok=True)  # no half-written file left (a full disk)
        raise


async def publish_health(state_dir: Path, snapshot: Callable[[], dict[str, Any]]) -> None:
    """Write ``snapshot()`` every ``HEALTH_EVERY_S`` until cancelled; a failed write (a full
    disk) is logged and tried again next time."""
    while True:
        try:
            current = snapshot()
            await trio.to_thread.run_sync(write_health, state_dir, current)
        except OSError as exc:
            log.warning("health.write_failed", error_class=error_class(exc))
        await trio.sleep(HEALTH_EVERY_S)
