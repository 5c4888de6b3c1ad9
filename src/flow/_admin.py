"""The admin endpoint: ``/metrics``, ``/status``, ``/healthz``, the status page and traces.

Served by hypercorn's Trio worker (a small ASGI app, no hand-written HTTP) as a task of the
running graph's process (:func:`flow.serve`), when the site file has an ``[admin]`` table.
It survives a reload: :class:`AdminState` points at whichever graph runs now.

What it serves is read on each request from the state that holds it: the supervisor's live
health, each node's :meth:`~flow.Node.report`, :meth:`~flow.Node.metrics`,
:meth:`~flow.Node.dead_letters` and :meth:`~flow.Node.trace` (the durable node reads its
storage, in a worker thread). The runtime adds only what it owns itself: node and lane
health, restarts, reloads, and the ring buffer of throughput samples behind the chart.

``GET /healthz`` answers 200 while every lane runs (running, restarting or starting) and 503
naming each lane that does not (failed, stopped, finished).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from collections.abc import Iterable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from . import _page
from ._config import AdminConfig
from ._errors import FlowError
from ._log import get_logger, register_safe_fields
from ._metrics import COUNTER, GAUGE, HISTOGRAM, HistogramValue, Metric
from ._health import NODE_STATES, UP_STATES
from ._status import status_document, status_json
from ._processes import ProcessGroup
from ._supervisor import Runner, error_class

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric as PromMetric

# hypercorn and prometheus_client are imported where the endpoint starts or serves, not at
# the top: every `flow` process imports this module, and most never serve [admin].

log = get_logger("flow.admin")
register_safe_fields("metric")

PREFIX = "dicomflow_"
DEAD_LETTERS_SHOWN = 20


def unhealthy_lanes(snapshot: dict[str, Any]) -> dict[str, str]:
    """``{lane: state}`` of every lane that does not run (what ``/healthz`` names)."""
    return {lane: state for lane, state in snapshot["lanes"].items() if state not in UP_STATES}


class AdminState:
    """What the endpoint serves from: the current runner (replaced on reload) and the
    throughput samples (kept across reloads: the Store's totals carry on)."""

    def __init__(self, runner: Runner | ProcessGroup) -> None:
        self.runner = runner
        self.reloads = 0
        self.samples: deque[tuple[float, dict[str, int]]] = deque(maxlen=2)
        self.gathered: list[Metric] = []  # the children's figures for the current scrape

    async def gather(self) -> None:
        """Before a scrape: collect the children's per-process figures (several processes)."""
        if isinstance(self.runner, ProcessGroup):
            self.gathered = await self.runner.gather_metrics()

    # -- reading --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The ``flow status --json`` document of the running graph. Blocking."""
        return status_document(self.runner.graph, self.runner.snapshot())

    def dead_letters(self) -> list[dict[str, Any]]:
        """The newest dead letters of every node, newest first. Blocking."""
        rows = [row for node in self.runner.graph.nodes
                for row in node.dead_letters(DEAD_LETTERS_SHOWN)]
        rows.sort(key=lambda row: row.get("since") or 0, reverse=True)
        return rows[:DEAD_LETTERS_SHOWN]

    def traces(self, item: str) -> dict[str, dict[str, Any]]:
        """``{node: trace}`` from every node with a record of ``item``. Blocking."""
        found = {}
        for node in self.runner.graph.nodes:
            doc = node.trace(item)
            if doc is not None:
                found[node.name] = doc
        return found

    def metrics(self) -> list[Metric]:
        """The runtime's own figures plus every node's. Blocking.

        Across several processes the nodes' shared figures are read here and the
        per-process ones are those the children sent for this scrape
        (:meth:`gather`)."""
        snapshot = self.runner.snapshot()
        found = list(runtime_metrics(snapshot, self.reloads))
        several = isinstance(self.runner, ProcessGroup)
        if several:
            found.extend(self.gathered)
        for node in self.runner.graph.nodes:
            try:
                found.extend(m for m in node.metrics() if not (several and m.per_process))
            except Exception as exc:  # one node's broken figures must not hide the rest
                log.warning("admin.metrics_failed", node=node.name, error_class=error_class(exc))
                found.append(Metric("metrics_unreadable", GAUGE, "1: the node's figures "
                                    "could not be read in this scrape", 1, {"node": node.name}))
        return found

    # -- the chart's samples --------------------------------------------------------------

    async def sample_forever(self, config: AdminConfig) -> None:
        size = math.ceil(config.chart_window_s / config.sample_interval_s) + 2
        if self.samples.maxlen != size:
            self.samples = deque(self.samples, maxlen=size)
        while True:
            try:
                doc = await trio.to_thread.run_sync(self.status)
            except Exception as exc:
                log.warning("admin.sample_failed", error_class=error_class(exc))
            else:
                self.samples.append((time.time(), {
                    lane: int(figures.get("delivered") or 0)
                    for lane, figures in doc["lanes"].items()}))
            await trio.sleep(config.sample_interval_s)


def runtime_metrics(snapshot: dict[str, Any], reloads: int) -> Iterator[Metric]:
    """Node and lane health from a :meth:`Runner.snapshot` (labels: node, lane, state)."""
    yield Metric("graph_info", GAUGE, "The running graph (value 1)", 1,
                 {"graph": snapshot["graph"]})
    yield Metric("reloads", COUNTER, "Reloads (SIGHUP) accepted since the process started",
                 reloads)
    for lane, state in snapshot["lanes"].items():
        yield Metric("lane_up", GAUGE, "1 while the lane runs (running, restarting or "
                     "starting), else 0", int(state in UP_STATES), {"lane": lane})
    for node in snapshot["nodes"]:
        labels = {"node": node["node"], "lane": node["lane"]}
        if "processes" in snapshot:  # several processes: replicas of a node stay apart
            labels["process"] = str(node.get("process"))
        for state in NODE_STATES:
            yield Metric("node_state", GAUGE, "1 for the node's current state, else 0",
                         int(node["state"] == state), {**labels, "state": state})
        yield Metric("node_restarts", COUNTER, "Times the supervisor restarted the node",
                     node["restarts"], labels)


def families(metrics: Iterable[Metric]) -> Iterator[PromMetric]:
    """Group samples by name into Prometheus metric families (``dicomflow_`` + name).
    A sample whose kind or label names disagree with its name's first is left out."""
    from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                        HistogramMetricFamily)
    from prometheus_client.utils import floatToGoString

    groups: dict[str, list[Metric]] = {}
    for metric in metrics:
        groups.setdefault(metric.name, []).append(metric)
    for name, group in groups.items():
        first = group[0]
        labelnames = sorted(first.labels)
        full = PREFIX + name
        family: Any
        if first.kind == COUNTER:
            family = CounterMetricFamily(full, first.help, labels=labelnames)
        elif first.kind == HISTOGRAM:
            family = HistogramMetricFamily(full, first.help, labels=labelnames)
        else:
            family = GaugeMetricFamily(full, first.help, labels=labelnames)
        for metric in group:
            if metric.kind != first.kind or sorted(metric.labels) != labelnames:
                log.warning("admin.metric_mismatch", metric=full)
                continue
            values = [str(metric.labels[k]) for k in labelnames]
            if isinstance(metric.value, HistogramValue):
                family.add_metric(values, [(floatToGoString(le), count)
                                           for le, count in metric.value.buckets],
                                  metric.value.sum)
            else:
                family.add_metric(values, float(metric.value))
        yield family


class _Collector:
    """prometheus_client collector that reads the current state on every scrape."""

    def __init__(self, state: AdminState) -> None:
        self.state = state

    def collect(self) -> Iterator[PromMetric]:
        yield from families(self.state.metrics())


def registry_for(state: AdminState) -> CollectorRegistry:
    from prometheus_client import CollectorRegistry, ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(state))
    ProcessCollector(registry=registry)  # process_cpu_seconds_total, memory, open fds, start
    return registry


class AdminApp:
    """The ASGI application (GET and HEAD only)."""

    def __init__(self, state: AdminState, config: AdminConfig) -> None:
        self.state = state
        self.config = config
        self.registry = registry_for(state)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        method = scope["method"]
        if method not in ("GET", "HEAD"):
            status, ctype, body = 405, "text/plain; charset=utf-8", b"GET or HEAD only\n"
        else:
            try:
                status, ctype, body = await self.route(scope["path"])
            except Exception as exc:
                log.error("admin.request_failed", error_class=error_class(exc))
                status, ctype, body = 500, "text/plain; charset=utf-8", b"internal error\n"
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", ctype.encode()), (b"cache-control", b"no-store"),
            (b"x-content-type-options", b"nosniff"),
            (b"content-security-policy",
             b"default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:")]})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})

    async def route(self, path: str) -> tuple[int, str, bytes]:
        state, html = self.state, "text/html; charset=utf-8"
        if path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            await state.gather()
            body = await trio.to_thread.run_sync(generate_latest, self.registry)
            return 200, CONTENT_TYPE_LATEST, body
        if path == "/status":
            doc = await trio.to_thread.run_sync(state.status)
            return 200, "application/json", (status_json(doc) + "\n").encode()
        if path == "/healthz":
            snapshot = state.runner.snapshot()
            bad = unhealthy_lanes(snapshot)
            body = json.dumps({"healthy": not bad, "graph": snapshot["graph"],
                               "unhealthy_lanes": bad, "lanes": snapshot["lanes"]},
                              sort_keys=True) + "\n"
            return (503 if bad else 200), "application/json", body.encode()
        if path in ("/", "/index.html"):
            doc, dead = await trio.to_thread.run_sync(
                lambda: (state.status(), state.dead_letters()))
            page = _page.status_page(
                doc, dead, list(state.samples),
                unhealthy=unhealthy_lanes(state.runner.snapshot()), now=time.time(),
                window_s=self.config.chart_window_s, refresh_s=self.config.refresh_s)
            return 200, html, page.encode()
        if path.startswith("/trace/") and len(path) > len("/trace/"):
            item = path[len("/trace/"):]
            traces = await trio.to_thread.run_sync(state.traces, item)
            return (200 if traces else 404), html, _page.trace_page(item, traces).encode()
        return 404, "text/plain; charset=utf-8", b"not found\n"


def _bind(config: AdminConfig) -> str:
    host = f"[{config.host}]" if ":" in config.host and not config.host.startswith("[") \
        else config.host
    return f"{host}:{config.port}"


class _Server:
    """One running server: ``stop()`` cancels it and returns once its socket is closed."""

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.closed = trio.Event()

    async def stop(self) -> None:
        self.scope.cancel()
        await self.closed.wait()


async def run_admin(state: AdminState, config: AdminConfig, *,
                    task_status: trio.TaskStatus[_Server] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until stopped; ``task_status.started`` with the :class:`_Server`, once the
    socket is bound (an address in use or a bad TLS file raises before that)."""
    from hypercorn.config import Config as HypercornConfig
    from hypercorn.trio import serve as hypercorn_serve

    hyper = HypercornConfig()
    hyper.bind = [_bind(config)]
    hyper.accesslog = None
    # Through the root logger, so that flow's PHI filter sees hypercorn's messages too (its
    # default is a handler of its own on stderr); its "Running on ..." is admin.listening.
    hyper.errorlog = logging.getLogger("hypercorn.error")
    hyper.errorlog.setLevel(logging.WARNING)
    hyper.graceful_timeout = 1.0
    if config.tls:
        hyper.certfile, hyper.keyfile = config.tls_cert, config.tls_key
    server = _Server()
    try:
        with server.scope:
            async with trio.open_nursery() as nursery:
                binds = await nursery.start(partial(hypercorn_serve, AdminApp(state, config),
                                                    hyper))
                log.info("admin.listening", url=",".join(binds), tls=config.tls)
                nursery.start_soon(state.sample_forever, config)
                task_status.started(server)
    finally:
        server.closed.set()


class AdminSlot:
    """The endpoint across the reloads of one ``flow run``: started, restarted when a reload
    changes ``[admin]``, stopped when a reload removes it."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.state: AdminState | None = None
        self.config: AdminConfig | None = None
        self.server: _Server | None = None

    async def apply(self, config: AdminConfig | None, runner: Runner | ProcessGroup, *,
                    reload: bool) -> None:
        if self.state is None:
            self.state = AdminState(runner)
        self.state.runner = runner
        self.state.reloads += int(reload)
        if config == self.config:
            return
        old, self.config = self.config, config
        if self.server is not None:
            await self.server.stop()  # its port may be the new one's
            self.server = None
        if config is None:
            return
        try:
            self.server = await self.nursery.start(run_admin, self.state, config)
        except Exception as exc:
            cause = _bind_error(exc)
            if cause is None:
                raise
            if not reload or old is None:
                raise FlowError(f"[admin]: cannot serve on {_bind(config)}: {cause}") from None
            log.error("admin.restart_failed", error_class=error_class(exc),
                      reason=f"{cause}; keeping the previous [admin] settings")
            self.config = old
            self.server = await self.nursery.start(run_admin, self.state, old)


def _bind_error(exc: BaseException) -> str | None:
    """Why the endpoint could not start (address in use, unreadable TLS file), or None for
    an error that is not about its settings."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return None
