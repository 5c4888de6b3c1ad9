"""The status document: what ``flow status --json`` prints and ``GET /status`` serves.

One function builds it for both, so the CLI (reading ``health.json`` from another process)
and the admin endpoint (reading the running supervisor) cannot drift apart. Every figure is
routing-safe: lane and node names, states, counts, error classes.
"""

from __future__ import annotations

import json
from typing import Any

from ._graph import Graph


def node_reports(graph: Graph, health: dict[str, Any] | None = None
                 ) -> dict[str, dict[str, Any]]:
    """Each node's :meth:`~flow.Node.report` (nodes that report nothing are left out).
    Blocking: a durable node reads its storage. When ``health`` is a several-process
    snapshot with the children's ``reports``, every other node's report comes from there
    (it lives in the memory of the process that runs the node)."""
    from_children = (health or {}).get("reports")
    reports = {}
    for node in graph.nodes:
        if from_children is not None and not node.durable:
            report = from_children.get(node.name)
        else:
            report = node.report()
        if report is not None:
            reports[node.name] = report
    return reports


def status_document(graph: Graph, health: dict[str, Any] | None) -> dict[str, Any]:
    """``graph``'s status: per-lane figures from the nodes' reports, lane states and node
    health from ``health`` (a :meth:`~flow.Runner.snapshot`, or a parent's snapshot across
    processes, with ``processes``; None: not running)."""
    lanes: dict[str, dict[str, Any]] = {lane.name: {} for lane in graph.lanes}
    reports = node_reports(graph, health)
    durable = {n.name for n in graph.nodes if n.durable}
    # A durable node's figures are the lasting ones (a lane's delivered total in storage); a
    # running node's in-memory counters of the same name (since its process started) come
    # first so that the durable ones win.
    ordered = [r for name, r in reports.items() if name not in durable] + \
        [r for name, r in reports.items() if name in durable]
    for report in ordered:
        for lane, figures in (report.get("lanes") or {}).items():
            lanes.setdefault(lane, {}).update(figures)
    if health:
        for lane, state in health.get("lanes", {}).items():
            lanes.setdefault(lane, {})["state"] = state
    doc = {
        "graph": graph.name,
        "running": health is not None,
        "pid": health.get("pid") if health else None,
        "lanes": lanes,
        "nodes": health.get("nodes", []) if health else [
            {"node": n.name, "lane": graph.lane_of[id(n)], "state": "not running"}
            for n in graph.nodes],
    }
    if health and "processes" in health:
        doc["processes"] = health["processes"]
    return doc


def status_json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=1, sort_keys=True)
