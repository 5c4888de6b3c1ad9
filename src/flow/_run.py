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

import os
import runpy
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import trio

from ._admin import AdminSlot
from ._config import RuntimeConfig, SiteFile, current_site, read_site_file
from ._egress import EgressPolicy
from ._errors import FlowError, GraphError
from ._graph import Graph
from . import _log
from ._log import get_logger
from ._notify import Notifier
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
    return Loaded(graph, site, graph_path, config)


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


async def serve(loaded: Loaded, *, deadline: float | None = None) -> int:
    """Run ``loaded`` until stopped; returns the process exit code.

    With an ``[admin]`` table the admin endpoint (:mod:`flow._admin`) runs beside the
    graph, from the start of the first graph to the end of the last; a reload that changes
    ``[admin]`` restarts it with the new settings.
    """
    try:
        async with trio.open_nursery() as outer:
            admin = AdminSlot(outer)
            code = await _serve_graphs(loaded, admin, deadline)
            outer.cancel_scope.cancel()
    except BaseExceptionGroup as group:  # a FlowError (e.g. [admin] port in use) stays one line
        if len(group.exceptions) == 1 and isinstance(group.exceptions[0], FlowError):
            raise group.exceptions[0] from None
        raise
    return code


async def _serve_graphs(loaded: Loaded, admin: AdminSlot, deadline: float | None) -> int:
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    notifier = Notifier()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        current: Loaded | None = loaded
        reload = False
        while current is not None:
            limit = deadline if deadline is not None else current.site.runtime.shutdown_deadline_s
            # Checked at start as well as at load: nothing opens a socket before this passes.
            current.graph.check_egress(current.site.egress)
            runner = Runner(current.graph, restart=current.site.runtime.restart,
                            egress=current.site.egress)
            await admin.apply(current.site.admin, runner, reload=reload)
            following: list[Loaded] = []
            state = {"stops": 0}

            async def watch_signals(runner: Runner = runner, current: Loaded = current,
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

            async def announce_ready(runner: Runner = runner) -> None:
                await runner.ready.wait()
                if not runner.stopping:
                    notifier.ready(f"graph {runner.graph.name} running")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_signals)
                nursery.start_soon(announce_ready)
                await runner.run(deadline=limit)
                nursery.cancel_scope.cancel()
            if runner.failed_lanes and len(runner.failed_lanes) == len(current.graph.lanes) \
                    and not runner.stopping:
                log.error("graph.all_lanes_failed", graph=current.graph.name)
                return EXIT_ALL_LANES_FAILED
            current = following[-1] if following else None
            reload = True
    return EXIT_OK


def run_process(loaded: Loaded, *, deadline: float | None = None) -> int:
    """Blocking entry point used by the CLI."""
    if sys.platform == "win32":  # pragma: no cover - signals differ; we target Linux
        raise FlowError("flow runs graphs on POSIX systems only")
    try:
        return trio.run(lambda: serve(loaded, deadline=deadline))
    except BaseExceptionGroup as group:
        # A node refusing to open (a wrong at-rest key, say) is one FlowError wrapped in
        # serve()'s nurseries: the CLI prints it as one line, not as a traceback.
        error = sole_exception(group)
        if not isinstance(error, FlowError):
            raise
        raise error from None
