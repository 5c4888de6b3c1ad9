"""One graph, several OS processes: the plan, the parent that supervises, the child side.

With ``[runtime] processes`` above 1 (``"auto"``: one per core this process may use) and a
graph that fans out from a durable node, ``flow run`` becomes a parent that runs no node
itself. It plans the processes (:func:`plan`):

- *ingest* processes run the lanes that are not fed by a durable node (the listener and
  the Store's commit); a node's :attr:`~flow.Node.replicas` above 1 (a listener's
  ``workers``) runs that many of them side by side;
- *lane* processes run the durable node's branch lanes, spread over what is left of
  ``processes`` (at least one).

Each child is ``flow run`` of the same graph and site file with a hidden ``--child`` spec:
it loads the graph itself (nothing is inherited through ``fork``, so no LMDB environment is
ever forked) and runs its lanes with a :class:`~flow.Runner` placed there
(:mod:`flow._placement`). It reports to the parent over a socket pair (one JSON object per
line: ``ready``, ``health`` every second, its per-process figures when asked, and the
one-line error that kept it from starting); when the parent dies, the kernel kills the
child (``PR_SET_PDEATHSIG``), and a child that finds the socket closed leaves at once too,
so no child outlives its parent.

The parent (:class:`ProcessGroup`) is structured concurrency across processes: it starts
every child, watches it, restarts one that exits with the graph's restart policy (capped
exponential backoff; ``max_failures`` within ``window_s`` marks its lanes failed), and on a
graceful stop sends SIGTERM to every child at once (each stops its sources and drains within
the deadline, as one process does) and SIGKILL to any still there after the deadline. A
child that cannot start at all (a wrong key, say: exit status 1 before it was ever ready)
stops the whole graph with status 1, as one process would (at start or after a reload). Reload (SIGHUP) is
the caller's (:mod:`flow._run`): a new group replaces this one, or none does.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import trio

from ._config import RestartPolicy
from ._errors import GraphError
from ._graph import Graph
from ._health import FAILED, FINISHED, RESTARTING, RUNNING, STARTING, STOPPED
from ._log import get_logger, register_safe_fields
from ._metrics import GAUGE, COUNTER, Metric
from ._node import Node
from ._placement import Placement
from ._supervisor import HEALTH_EVERY_S, backoff_delay, publish_health, write_health

log = get_logger("flow.processes")
register_safe_fields("process", "processes", "exit_status", "replica", "child")

EXIT_ERROR, EXIT_ALL_LANES_FAILED = 1, 3

GATHER_TIMEOUT_S = 2.0  # how long a scrape waits for a child's figures
PR_SET_PDEATHSIG = 1
KILL_GRACE_S = 3.0  # after the deadline, before SIGKILL: a child's own backstop fires first


# -- the plan ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    """One child process of the plan."""

    name: str
    lanes: tuple[str, ...]
    replica: int = 0
    replicas: int = 1
    ingest: bool = False

    def placement(self) -> Placement:
        return Placement(process=self.name, lanes=frozenset(self.lanes),
                         replica=self.replica, replicas=self.replicas)

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "lanes": list(self.lanes), "replica": self.replica,
                           "replicas": self.replicas, "ingest": self.ingest})

    @classmethod
    def from_json(cls, text: str) -> "ProcessSpec":
        doc = json.loads(text)
        return cls(str(doc["name"]), tuple(doc["lanes"]), int(doc["replica"]),
                   int(doc["replicas"]), bool(doc["ingest"]))


def cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def resolve(processes: int | str) -> int:
    """``[runtime] processes`` as a number (``"auto"``: :func:`cores`)."""
    return cores() if processes == "auto" else int(processes)


def plan(graph: Graph, processes: int) -> list[ProcessSpec]:
    """The child processes that run ``graph`` in ``processes`` processes; ``[]``: one process
    (``processes`` is 1, or the graph has no durable fan-out to divide it at)."""
    branch_lanes = [name for fan in graph.fanouts for name in fan.branches]
    if processes <= 1 or not branch_lanes:
        return []
    head = [lane for lane in graph.lanes if lane.name not in branch_lanes]
    for lane in graph.lanes:
        if lane.name in branch_lanes and max(n.replicas for n in lane.nodes) > 1:
            raise GraphError(f"lane {lane.name!r} asks for several processes (replicas), but "
                             "only lanes that are not fed by a durable node can have them")
    replicas = max((n.replicas for lane in head for n in lane.nodes), default=1)
    specs = [ProcessSpec(f"ingest-{i}", tuple(lane.name for lane in head), i, replicas, True)
             for i in range(replicas)] if head else []
    groups = max(1, min(processes - len(specs), len(branch_lanes)))
    for g in range(groups):
        specs.append(ProcessSpec(f"lanes-{g}", tuple(branch_lanes[g::groups])))
    return specs


# -- the child --------------------------------------------------------------------------------


def die_with_parent(parent: int) -> None:
    """Ask the kernel for SIGKILL when the parent dies (Linux); exit now if it already did.

    Not a graceful stop: with no parent, nothing would supervise a drain, and a restarted
    ``flow`` must not find the old children still delivering beside its own. Dying at once
    is safe: nothing is acknowledged before its commit, and whatever was in flight is
    queued again by the next process that owns its lane."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - no prctl: the socket still tells
            pass
    if os.getppid() != parent:
        raise SystemExit(0)  # the parent went before the signal was armed


class ParentLink:
    """The child's end of the socket pair: messages up, and the news that the parent is
    gone (end of stream)."""

    def __init__(self, fd: int) -> None:
        sock = socket.socket(fileno=os.dup(fd))  # ``fd`` stays open for tell_parent
        sock.setblocking(False)
        self.sock = trio.socket.from_stdlib_socket(sock)
        self.gone = trio.Event()
        self._sending = trio.Lock()  # one message at a time: lines never interleave

    async def send(self, **message: Any) -> None:
        data = _line(message)
        async with self._sending:
            try:
                while data:
                    sent = await self.sock.send(data)
                    data = data[sent:]
            except OSError:
                self.gone.set()

    async def watch(self, answer: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        """Hand each request of the parent to ``answer``; returns once the parent's end
        closed (the parent is gone)."""
        async for message in read_lines(self.sock):
            await answer(message)
        self.gone.set()


def tell_parent(fd: int, **message: Any) -> None:
    """Send one message up the link ``fd`` from outside Trio (a child that cannot start)."""
    data = _line(message)
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:
        pass  # the parent is gone: nobody to tell


def _line(message: dict[str, Any]) -> bytes:
    """One message as the link carries it: a JSON object on a line."""
    return (json.dumps(message, separators=(",", ":")) + "\n").encode()


async def read_lines(sock: trio.socket.SocketType) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects arriving on ``sock``, one per line, until end of stream."""
    buffer = b""
    while True:
        try:
            data = await sock.recv(65536)
        except OSError:
            return
        if not data:
            return
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict):
                yield message


def local_reports(nodes: Iterable[Node]) -> dict[str, dict[str, Any]]:
    """The reports of ``nodes`` that only this process can give: a durable node's report
    reads storage every process shares (the parent reads it itself), any other node's
    comes from its memory."""
    reports = {}
    for node in nodes:
        if not node.durable:
            report = node.report()
            if report is not None:
                reports[node.name] = report
    return reports


def merge_reports(reports: Iterable[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """One report per node from several processes' (replicas of a node: numbers add up,
    anything else is the first process's)."""
    merged: dict[str, dict[str, Any]] = {}
    for one in reports:
        for node, report in one.items():
            merged[node] = _add(merged[node], report) if node in merged else report
    return merged


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: _add(a[k], b[k]) if k in a and k in b else a.get(k, b.get(k))
                for k in {**a, **b}}
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return a + b
    return a


# -- the parent -------------------------------------------------------------------------------


@dataclass(eq=False)
class Child:
    """The parent's record of one child process."""

    spec: ProcessSpec
    state: str = STARTING
    pid: int | None = None
    restarts: int = 0
    ever_ready: bool = False
    ready: bool = False
    last_exit: int | None = None
    error: str | None = None
    health: dict[str, Any] | None = None
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    metrics: list[Metric] = field(default_factory=list)
    answered: trio.Event = field(default_factory=trio.Event)
    link: trio.socket.SocketType | None = None
    failures: deque[float] = field(default_factory=deque)
    popen: subprocess.Popen[bytes] | None = None
    wake: trio.Event = field(default_factory=trio.Event)
    stopped: bool = False  # its last word: it stopped on a signal (not its lanes finishing)

    def snapshot(self) -> dict[str, Any]:
        return {"process": self.spec.name, "pid": self.pid, "state": self.state,
                "restarts": self.restarts, "lanes": list(self.spec.lanes),
                "last_exit_status": self.last_exit}


class ProcessGroup:
    """Runs one graph as the children of :func:`plan`; the parent's counterpart of
    :class:`~flow.Runner` (same ``graph``, ``ready``, ``stopping``, ``snapshot()``,
    ``stop()``, ``run()``, ``failed_lanes``).

    ``command``: the ``flow run`` command line of a child without its ``--child`` part.
    """

    def __init__(self, graph: Graph, specs: list[ProcessSpec], command: list[str], *,
                 restart: RestartPolicy | None = None,
                 rng: random.Random | None = None) -> None:
        self.graph = graph
        self.children = [Child(spec) for spec in specs]
        self.command = command
        self.policy = restart or RestartPolicy()
        self.rng = rng or random.Random()
        self.ready = trio.Event()
        self.stopping = False
        self.exit_status: int | None = None  # set when a child could not start at all
        self.error: str | None = None  # and the one-line error it sent
        self._stop = trio.Event()

    # -- queries ----------------------------------------------------------------------------

    @property
    def failed_lanes(self) -> set[str]:
        failed = set()
        for child in self.children:
            if child.state == FAILED:
                failed.update(child.spec.lanes)
            elif child.health:
                failed.update(lane for lane, state in child.health.get("lanes", {}).items()
                              if state == FAILED)
        return failed

    def snapshot(self) -> dict[str, Any]:
        """One health picture across the children (what ``flow status`` shows)."""
        lanes: dict[str, str] = {}
        nodes: list[dict[str, Any]] = []
        for child in self.children:
            reported = child.health if child.state == RUNNING else None
            for lane in child.spec.lanes:
                state = (reported or {}).get("lanes", {}).get(lane)
                if state is None or child.state != RUNNING:
                    state = child.state if child.state != RUNNING else STARTING
                if lane not in lanes or lanes[lane] == RUNNING:  # replicas: the worst shows
                    lanes[lane] = state
            for node in (child.health or {}).get("nodes", []):
                entry = {**node, "process": child.spec.name, "pid": child.pid}
                if child.state != RUNNING:
                    entry["state"] = child.state
                nodes.append(entry)
            if not child.health:
                nodes.extend({"node": n.name, "lane": lane, "state": child.state,
                              "restarts": 0, "last_error_class": None,
                              "process": child.spec.name, "pid": child.pid}
                             for lane in child.spec.lanes for n in self.graph.lane(lane).nodes)
        return {
            "graph": self.graph.name,
            "pid": os.getpid(),
            "time": time.time(),
            "stopping": self.stopping,
            "lanes": {lane.name: lanes.get(lane.name, STOPPED) for lane in self.graph.lanes},
            "nodes": nodes,
            "processes": [child.snapshot() for child in self.children],
            "reports": merge_reports(child.reports for child in self.children
                                     if child.state == RUNNING),
        }

    async def gather_metrics(self) -> list[Metric]:
        """Every running child's per-process figures (``process`` label added), and each
        child's CPU time and memory; a child that does not answer within
        ``GATHER_TIMEOUT_S`` is left out of this scrape."""
        asked = []
        for child in self.children:
            if child.state == RUNNING and child.link is not None:
                child.answered = trio.Event()
                try:
                    await child.link.send(b'{"t":"metrics?"}\n')
                except OSError:
                    continue
                asked.append(child)
        with trio.move_on_after(GATHER_TIMEOUT_S):
            for child in asked:
                await child.answered.wait()
        found = []
        for child in asked:
            if child.answered.is_set():
                found += [replace(m, labels={**m.labels, "process": child.spec.name})
                          for m in child.metrics]
        return found + process_metrics(self.children)

    # -- control ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Graceful stop: SIGTERM to every child (each drains within the deadline)."""
        if not self.stopping:
            self.stopping = True
            log.info("graph.stopping", graph=self.graph.name)
        self._stop.set()
        for child in self.children:
            child.wake.set()
            self._signal(child, signal.SIGTERM)

    @staticmethod
    def _signal(child: Child, signum: int) -> None:
        if child.popen is not None and child.popen.returncode is None:
            try:
                child.popen.send_signal(signum)
            except ProcessLookupError:
                pass

    # -- running ----------------------------------------------------------------------------

    async def run(self, *, deadline: float | None = None) -> None:
        """Run every child until each has exited for good (stopped, finished or failed)."""
        async with trio.open_nursery() as nursery:
            if deadline is not None:
                nursery.start_soon(self._kill_after_deadline, deadline)
            if self.graph.state_dir is not None:
                nursery.start_soon(self._publish_health, self.graph.state_dir)
            async with trio.open_nursery() as children:
                for child in self.children:
                    children.start_soon(self._supervise, child)
                log.info("graph.started", graph=self.graph.name, processes=len(self.children),
                         lanes=len(self.graph.lanes))
            nursery.cancel_scope.cancel()
        if self.graph.state_dir is not None:
            try:
                self._write_health(self.graph.state_dir)
            except OSError as exc:
                log.warning("health.write_failed", error_class=type(exc).__name__)
        log.info("graph.stopped", graph=self.graph.name)

    async def _kill_after_deadline(self, deadline: float) -> None:
        await self._stop.wait()
        await trio.sleep(deadline + KILL_GRACE_S)
        for child in self.children:
            if child.popen is not None and child.popen.returncode is None:
                log.error("process.killed", child=child.spec.name, pid=child.pid,
                          deadline_s=deadline)
                self._signal(child, signal.SIGKILL)

    async def _supervise(self, child: Child) -> None:
        while not self.stopping:
            status = await self._run_once(child)
            child.last_exit = status
            if self.stopping:
                child.state = STOPPED
                return
            if status == 0 and not child.stopped:
                child.state = FINISHED
                log.info("process.finished", child=child.spec.name)
                return
            if status == 0:
                # SIGTERM from someone else (an operator's kill): it drained and left, but
                # the graph still wants its lanes run. Restarted like a crash, and counted:
                # a loop of such stops ends with its lanes failed, not a restart storm.
                log.warning("process.stopped_outside", child=child.spec.name, pid=child.pid,
                            reason="stopped by a signal the graph did not send; restarting")
            if status == EXIT_ALL_LANES_FAILED:
                child.state = FAILED
                log.error("process.lanes_failed", child=child.spec.name,
                          lanes=",".join(child.spec.lanes))
                return
            if status == EXIT_ERROR and not child.ever_ready:
                # Could not start at all (its one-line error is in the log): as one process
                # would, the graph does not start half-way.
                log.error("process.start_failed", child=child.spec.name, exit_status=status)
                if self.exit_status is None:  # the first child's error is the graph's
                    self.error = child.error or (f"process {child.spec.name} could not start "
                                                 f"(exit status {status}; see the log)")
                self.exit_status = EXIT_ERROR
                self.stop()
                child.state = FAILED
                return
            now = time.monotonic()
            child.failures.append(now)
            while child.failures and now - child.failures[0] > self.policy.window_s:
                child.failures.popleft()
            if len(child.failures) >= self.policy.max_failures:
                child.state = FAILED
                log.error("process.failed", child=child.spec.name, exit_status=status,
                          failures=len(child.failures), lanes=",".join(child.spec.lanes))
                return
            delay = backoff_delay(self.policy, len(child.failures), self.rng)
            child.state = RESTARTING
            log.warning("process.crashed", child=child.spec.name, pid=child.pid,
                        exit_status=status, restarts=child.restarts, delay_s=round(delay, 3))
            with trio.move_on_after(delay):
                await child.wake.wait()
            child.wake = trio.Event()
            child.restarts += 1

    async def _run_once(self, child: Child) -> int:
        """Start ``child``, follow its messages until it exits; its exit status (a signal
        ``N`` counts as ``128 + N``)."""
        parent_end, child_end = socket.socketpair()
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)  # only the parent talks to a service manager
        command = [*self.command, "--child", child.spec.to_json(),
                   "--child-fd", str(child_end.fileno()), "--parent-pid", str(os.getpid())]
        try:
            # Its own process group: a terminal's Ctrl-C reaches the parent, which stops the
            # children in order, not every process at once.
            child.popen = subprocess.Popen(command, pass_fds=(child_end.fileno(),), env=env,
                                           stdin=subprocess.DEVNULL, process_group=0)
        finally:
            child_end.close()
        child.pid = child.popen.pid
        child.ready = False
        child.health = None
        child.error = None
        child.stopped = False
        child.state = STARTING
        log.info("process.started", child=child.spec.name, pid=child.pid,
                 lanes=",".join(child.spec.lanes))
        if self.stopping:  # a stop came while it started: it gets its SIGTERM too
            self._signal(child, signal.SIGTERM)
        parent_end.setblocking(False)
        link = trio.socket.from_stdlib_socket(parent_end)
        child.link = link
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read, child, link)
                status = await _wait_exit(child.popen)
                # What it wrote before it exited (its error) is still read: end of stream
                # follows at once, unless a process it started holds the socket open.
                nursery.cancel_scope.deadline = trio.current_time() + 1.0
        finally:
            child.link = None
            link.close()
        child.ready = False
        child.reports = {}
        return status

    async def _read(self, child: Child, link: trio.socket.SocketType) -> None:
        async for message in read_lines(link):
            self._on_message(child, message)

    def _on_message(self, child: Child, message: dict[str, Any]) -> None:
        kind = message.get("t")
        if kind == "health":
            child.health = message.get("snapshot")
            child.reports = message.get("reports") or {}
            if child.state == STARTING:
                child.state = RUNNING
        elif kind == "error":
            child.error = str(message.get("message") or "") or None
        elif kind == "exit":
            child.stopped = message.get("why") == "stopped"
        elif kind == "metrics":
            try:
                child.metrics = [Metric.from_json(m) for m in message.get("metrics", [])]
            except (KeyError, TypeError, ValueError):
                child.metrics = []
            child.answered.set()
        elif kind == "ready":
            child.state = RUNNING
            child.ready = child.ever_ready = True
            if all(c.ready for c in self.children) and not self.ready.is_set():
                self.ready.set()
                log.info("graph.ready", graph=self.graph.name, processes=len(self.children))

    # -- health file ------------------------------------------------------------------------

    def _write_health(self, state_dir: Path) -> None:
        write_health(state_dir, self.snapshot())

    async def _publish_health(self, state_dir: Path) -> None:
        await publish_health(state_dir, self.snapshot)


def proc_usage(pid: int) -> tuple[float, int] | None:
    """(CPU seconds used, user + system; resident bytes) of process ``pid`` from /proc, or
    None when it cannot be read (gone, not Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return cpu, int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def process_metrics(children: Iterable[Child]) -> list[Metric]:
    """Each child's state, restarts, CPU seconds and resident memory (read from /proc)."""
    out = []
    for child in children:
        labels = {"process": child.spec.name}
        out.append(Metric("child_up", GAUGE, "1 while the child process runs, else 0",
                          int(child.state == RUNNING), labels))
        out.append(Metric("child_restarts", COUNTER, "Times the parent restarted the child "
                          "process", child.restarts, labels))
        usage = proc_usage(child.pid) if child.pid is not None and \
            child.state in (RUNNING, STARTING) else None
        if usage is not None:
            out.append(Metric("child_cpu_seconds", COUNTER, "CPU time the child process "
                              "used (user + system)", usage[0], labels))
            out.append(Metric("child_resident_memory_bytes", GAUGE, "Resident memory of "
                              "the child process", usage[1], labels))
    return out


async def _wait_exit(popen: subprocess.Popen[bytes]) -> int:
    """Wait for ``popen`` to exit without a thread (a pidfd on Linux); its status, with a
    signal ``N`` as ``128 + N``."""
    try:
        pidfd = os.pidfd_open(popen.pid)
    except (AttributeError, OSError):  # pragma: no cover - no pidfd: poll
        while popen.poll() is None:
            await trio.sleep(0.05)
    else:
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        popen.wait()
    code = popen.returncode
    return 128 - code if code < 0 else code


def child_command(graph_path: Path, config_path: Path | None, *, log_level: str,
                  log_json: bool, deadline: float | None) -> list[str]:
    """The ``flow run`` command line of a child (see :meth:`ProcessGroup._run_once`)."""
    command = [sys.executable, "-m", "flow.cli", "run", str(graph_path)]
    if config_path is not None:
        command += ["--config", str(config_path)]
    command += ["--log-level", log_level]
    if log_json:
        command.append("--log-json")
    if deadline is not None:
        command += ["--shutdown-deadline", str(deadline)]
    return command
