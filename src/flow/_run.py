"""Loading a graph file with its site config, and running it as a process.

:func:`load` executes the graph file with the site file in context (``Graph.config()`` reads
it) and returns the validated graph: no socket is opened. :func:`serve` runs a loaded graph
under signal control:

- SIGINT/SIGTERM: graceful stop (sources first, lanes drain), exit within the deadline;
  a second SIGINT/SIGTERM exits at once.
- SIGHUP: reload. The graph file and site file are loaded and validated *while the old graph
  keeps running*; a reload that fails any check (config, graph, egress) is rejected whole and
  the old graph goes on with its old config. A valid one replaces the old graph after a
  graceful stop.

Under a service manager (``$NOTIFY_SOCKET`` set, systemd ``Type=notify``) it reports
``READY=1`` once the graph is ready (every node that signals readiness, such as a listener,
serves: :attr:`~flow.Runner.ready`), ``RELOADING=1`` on SIGHUP followed by ``READY=1`` when
the new graph is ready (or at once when the reload is rejected and the old graph goes on),
and ``STOPPING=1`` on SIGINT/SIGTERM (see :mod:`flow._notify`).
"""

from __future__ import annotations

import gc
import os
import runpy
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from ._admin import AdminSlot
from ._config import RuntimeConfig, SiteFile, current_site, read_site_file
from ._egress import EgressPolicy
from ._errors import FlowError, GraphError
from ._graph import Graph
from . import _log
from ._log import get_logger
from ._notify import Notifier
from ._processes import (EXIT_ALL_LANES_FAILED as _ALL_FAILED, HEALTH_EVERY_S, ParentLink,
                         ProcessGroup, ProcessSpec, child_command, die_with_parent,
                         local_reports, plan, resolve, tell_parent)
from ._supervisor import Runner
from ._supervisor import sole_exception

log = get_logger("flow.run")

EXIT_OK, EXIT_ERROR, EXIT_ALL_LANES_FAILED = 0, 1, 3


@dataclass(frozen=True)
class Loaded:
    graph: Graph
    site: SiteFile
    graph_path: Path
    config_path: Path | None


def default_config_path(graph_path: Path) -> Path | None:
    """``graphs/radiology.py`` → ``graphs/radiology.toml`` when that file exists."""
    candidate = graph_path.with_suffix(".toml")
    return candidate if candidate.exists() else None


def load(graph_path: str | Path, config_path: str | Path | None = None) -> Loaded:
    """Execute the graph file with its site config; return the validated graph.

    Raises :class:`~flow.FlowError` subclasses with a one-line message.
    """
    graph_path = Path(graph_path)
    if not graph_path.is_file():
        raise FlowError(f"{graph_path}: graph file not found")
    config = Path(config_path) if config_path is not None else default_config_path(graph_path)
    site = read_site_file(config) if config is not None else SiteFile(
        Path("(no --config)"), {}, EgressPolicy(source="(no --config)"), RuntimeConfig())
    token = current_site.set(site)
    try:
        namespace = runpy.run_path(str(graph_path), run_name="__flow_graph__")
    except FlowError:
        raise
    except SyntaxError as exc:  # in the graph file or in a module it imports: name that one
        where = exc.filename if exc.filename and exc.filename != "<string>" else graph_path
        raise FlowError(f"{where}:{exc.lineno}: syntax error: {exc.msg}") from exc
    except Exception as exc:
        raise FlowError(f"{graph_path}: {type(exc).__name__}: {exc}") from exc
    finally:
        current_site.reset(token)
    graph = namespace.get("graph")
    if not isinstance(graph, Graph):
        found = [k for k, v in namespace.items() if isinstance(v, Graph)]
        hint = f" (found {', '.join(found)}; name it `graph`)" if found else ""
        raise GraphError(f"{graph_path}: defines no Graph named `graph`{hint}")
    plan(graph, resolve(site.runtime.processes))  # a graph the processes cannot divide fails here
    return Loaded(graph, site, graph_path, config)


@dataclass(frozen=True)
class ChildOptions:
    """What a parent passes on to its children's command line (the parent's own flags)."""

    log_level: str = "INFO"
    log_json: bool = False
    deadline: float | None = None


def _runner_for(loaded: Loaded, children: ChildOptions | None) -> Runner | ProcessGroup:
    """The graph's runner in this process: a :class:`Runner` (one process), or the parent
    of several (:mod:`flow._processes`) when ``children`` may be started and the site's
    ``[runtime] processes`` and the graph divide it."""
    runtime = loaded.site.runtime
    specs = plan(loaded.graph, resolve(runtime.processes)) if children is not None else []
    if not specs:
        _log.set_process(None)
        return Runner(loaded.graph, restart=runtime.restart, egress=loaded.site.egress)
    _log.set_process("supervisor")
    assert children is not None
    command = child_command(loaded.graph_path, loaded.config_path, log_level=children.log_level,
                            log_json=children.log_json, deadline=children.deadline)
    return ProcessGroup(loaded.graph, specs, command, restart=runtime.restart)


def _hard_exit_after(seconds: float, code: int) -> threading.Timer:
    """Backstop: a thread stuck in a blocking call must not keep the process past its
    deadline. Everything acknowledged is already committed, so leaving is safe."""
    def fire() -> None:
        log.error("shutdown.forced", deadline_s=seconds)
        _log.flush()  # os._exit skips atexit: write the pending log.suppressed lines now
        os._exit(code)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    return timer


async def serve(loaded: Loaded, *, deadline: float | None = None,
                children: ChildOptions | None = None) -> int:
    """Run ``loaded`` until stopped; returns the process exit code.

    ``children``: this process may run the graph as several processes (the ``flow``
    command's case; ``[runtime] processes``); None: always in this process.

    With an ``[admin]`` table the admin endpoint (:mod:`flow._admin`) runs beside the
    graph, from the start of the first graph to the end of the last; a reload that changes
    ``[admin]`` restarts it with the new settings.
    """
    try:
        async with trio.open_nursery() as outer:
            admin = AdminSlot(outer)
            code = await _serve_graphs(loaded, admin, deadline, children)
            outer.cancel_scope.cancel()
    except BaseExceptionGroup as group:  # a FlowError (e.g. [admin] port in use) stays one line
        if len(group.exceptions) == 1 and isinstance(group.exceptions[0], FlowError):
            raise group.exceptions[0] from None
        raise
    return code


async def _serve_graphs(loaded: Loaded, admin: AdminSlot, deadline: float | None,
                        children: ChildOptions | None) -> int:
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    notifier = Notifier()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        current: Loaded | None = loaded
        reload = False
        while current is not None:
            limit = deadline if deadline is not None else current.site.runtime.shutdown_deadline_s
            # Checked at start as well as at load: nothing opens a socket before this passes.
            current.graph.check_egress(current.site.egress)
            runner = _runner_for(current, children)
            await admin.apply(current.site.admin, runner, reload=reload)
            following: list[Loaded] = []
            state = {"stops": 0}

            async def watch_signals(runner: Runner | ProcessGroup = runner,
                                    current: Loaded = current,
                                    following: list[Loaded] = following,
                                    limit: float = limit) -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if signum in stop_signals:
                        state["stops"] += 1
                        if state["stops"] > 1:
                            log.warning("shutdown.immediate", signal=name)
                            _log.flush()
                            os._exit(128 + signum)
                        log.info("shutdown.requested", signal=name, deadline_s=limit)
                        notifier.stopping()
                        following.clear()
                        _hard_exit_after(limit + 5.0, EXIT_OK)
                        runner.stop()
                    elif signum == signal.SIGHUP and not runner.stopping:
                        notifier.reloading()
                        try:
                            candidate = load(current.graph_path, current.config_path)
                            candidate.graph.check_egress(candidate.site.egress)
                        except FlowError as exc:
                            log.error("reload.rejected", reason=str(exc))
                            notifier.ready(f"graph {current.graph.name} running; "
                                           "reload rejected (see the log)")
                            continue
                        log.info("reload.accepted", graph=candidate.graph.name)
                        following.append(candidate)
                        runner.stop()

            async def announce_ready(runner: Runner | ProcessGroup = runner) -> None:
                await runner.ready.wait()
                freeze_startup_heap()
                if not runner.stopping:
                    notifier.ready(f"graph {runner.graph.name} running")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_signals)
                nursery.start_soon(announce_ready)
                await runner.run(deadline=limit)
                nursery.cancel_scope.cancel()
            if isinstance(runner, ProcessGroup) and runner.exit_status is not None:
                if runner.error:  # a child could not start: its one line, printed once
                    raise FlowError(runner.error)
                return runner.exit_status
            if runner.failed_lanes and len(runner.failed_lanes) == len(current.graph.lanes) \
                    and not runner.stopping:
                log.error("graph.all_lanes_failed", graph=current.graph.name)
                return EXIT_ALL_LANES_FAILED
            current = following[-1] if following else None
            reload = True
    return EXIT_OK


def freeze_startup_heap() -> None:
    """Once the graph is ready: what start-up built (modules, pydicom's dictionaries, the
    graph and its nodes) moves to the garbage collector's permanent generation, so that the
    collections that run every few hundred allocations while objects flow no longer walk it
    (``gc.freeze``; measured ~3–4 % more objects/s and ~5 % less CPU per object, see
    docs/decisions.md). Garbage is collected first; after a reload, again."""
    gc.collect()
    gc.freeze()


async def serve_child(loaded: Loaded, spec: ProcessSpec, *, link_fd: int, parent_pid: int,
                      deadline: float | None = None) -> int:
    """Run the part ``spec`` of ``loaded`` as a child of a ``flow`` parent
    (:mod:`flow._processes`): report readiness and health up the link, stop gracefully on
    SIGTERM or when the parent is gone. Returns the exit status (3: every lane here failed).
    """
    die_with_parent(parent_pid)
    _log.set_process(spec.name)
    for ignored in (signal.SIGINT, signal.SIGHUP):  # the parent's to handle
        signal.signal(ignored, signal.SIG_IGN)
    limit = deadline if deadline is not None else loaded.site.runtime.shutdown_deadline_s
    loaded.graph.check_egress(loaded.site.egress)
    runner = Runner(loaded.graph, restart=loaded.site.runtime.restart,
                    egress=loaded.site.egress, placement=spec.placement())
    link = ParentLink(link_fd)

    def stop(why: str) -> None:
        if not runner.stopping:
            log.info("shutdown.requested", signal=why, deadline_s=limit)
            _hard_exit_after(limit + 2.0, EXIT_OK)
        runner.stop()

    async def watch(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            task_status.started()
            async for _ in signals:
                stop("SIGTERM")

    async def parent_gone() -> None:
        await link.gone.wait()
        if not runner.stopping:  # the parent died without stopping us (see die_with_parent)
            log.error("process.parent_gone")
            _log.flush()
            os._exit(EXIT_ERROR)

    async def health() -> None:
        await link.send(t="health", snapshot=runner.snapshot(),
                        reports=local_reports(runner.nodes))

    async def report_ready() -> None:
        await runner.ready.wait()
        freeze_startup_heap()
        await link.send(t="ready")
        await health()

    async def report_health() -> None:
        while True:
            await health()
            await trio.sleep(HEALTH_EVERY_S)

    def per_process_metrics() -> list[dict[str, Any]]:
        return [m.to_json() for node in runner.opens for m in node.metrics() if m.per_process]

    async def answer(request: dict[str, Any]) -> None:
        if request.get("t") == "metrics?":
            found = await trio.to_thread.run_sync(per_process_metrics)
            await link.send(t="metrics", metrics=found)

    async with trio.open_nursery() as nursery:
        await nursery.start(watch)
        nursery.start_soon(link.watch, answer)
        nursery.start_soon(parent_gone)
        nursery.start_soon(report_health)
        nursery.start_soon(report_ready)
        await runner.run(deadline=limit)
        with trio.move_on_after(1.0):
            await health()
            # Why it ends: a parent that did not ask for a stop restarts a stopped child.
            await link.send(t="exit", why="stopped" if runner.stopping else "finished")
        nursery.cancel_scope.cancel()
    if runner.lanes and runner.failed_lanes >= {lane.name for lane in runner.lanes} \
            and not runner.stopping:
        log.error("graph.all_lanes_failed", graph=loaded.graph.name)
        return _ALL_FAILED
    return EXIT_OK


@dataclass(frozen=True)
class ChildRole:
    """This process is a child of a ``flow`` parent (the hidden ``--child`` options)."""

    spec: ProcessSpec
    link_fd: int
    parent_pid: int


def run_process(loaded: Loaded, *, deadline: float | None = None,
                children: ChildOptions | None = None, child: ChildRole | None = None) -> int:
    """Blocking entry point used by the CLI: the graph (``children``: possibly as several
    processes), or one child's part of it (``child``)."""
    if sys.platform == "win32":  # pragma: no cover - signals differ; we target Linux
        raise FlowError("flow runs graphs on POSIX systems only")
    if child is not None:
        role = child
        _log.set_process(role.spec.name)  # before lower_priority's line, if it has one
        lower_priority(role.spec, loaded.site.runtime.lanes_nice)
        try:
            return _trio_run(lambda: serve_child(loaded, role.spec, link_fd=role.link_fd,
                                                 parent_pid=role.parent_pid, deadline=deadline))
        except FlowError as exc:
            return child_failed(role, exc)
    return _trio_run(lambda: serve(loaded, deadline=deadline, children=children))


def lower_priority(spec: ProcessSpec, lanes_nice: int) -> None:
    """A lane process (not ingest) runs ``lanes_nice`` lower (``[runtime] lanes_nice``).
    Called before Trio or any node starts a thread: on Linux each thread has its own nice
    value and a new thread inherits its creator's."""
    if spec.ingest or lanes_nice <= 0:
        return
    try:
        os.nice(lanes_nice)
    except OSError as exc:  # e.g. a seccomp profile without setpriority: run at the same one
        log.warning("process.nice_failed", reason=type(exc).__name__, nice=lanes_nice)


def child_failed(role: ChildRole, error: FlowError) -> int:
    """A child that cannot start tells its parent why (the parent prints it, once for the
    graph) instead of printing it itself; returns the exit status."""
    tell_parent(role.link_fd, t="error", message=str(error))
    return EXIT_ERROR


def _trio_run(main: Any) -> int:
    try:
        return trio.run(main)
    except BaseExceptionGroup as group:
        # A node refusing to open (a wrong at-rest key, say) is one FlowError wrapped in
        # serve()'s nurseries: the CLI prints it as one line, not as a traceback.
        error = sole_exception(group)
        if not isinstance(error, FlowError):
            raise
        raise error from None
