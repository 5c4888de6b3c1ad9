"""Graphs declared in Python: ``Graph(a >> b >> {"x": c, "y": d >> e})``.

``>>`` joins the free output of the left side to the free input of the right side and
returns a :class:`~flow.Pipeline` (both live beside :class:`~flow.Node`, in ``_node.py``). A
mapping (or list) on the right is a fan-out: each value becomes a *lane* of its own, fed by
the left node's :meth:`~flow.Node.branch` source. Only a durable node may fan out: a plain
memory edge shared by two lanes would let the slower one block the other.

:class:`Graph` validates at construction: unique names, every port connected exactly once,
no cycles, fan-out only after a durable node, and every egress target inside the allowlist.
Errors are :class:`~flow.GraphError` / :class:`~flow.EgressDenied` naming node and port.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ._config import current_site, site_config
from ._egress import EgressPolicy, Target
from ._errors import GraphError
from ._node import Edge, FanOut, Node, Pipeline, free_port, merge_nodes

T = TypeVar("T")


@dataclass(slots=True)
class Lane:
    """Nodes that live and die together: a failed node stops its own lane only."""

    name: str
    nodes: list[Node]


class Graph:
    """A validated, runnable graph.

    ``Graph(listener >> store >> {"pacs": pacs, "archive": archive})``. Validation happens
    here (see the module docstring); the egress policy is the one of the site file being
    loaded, or ``egress=`` when the graph is built outside ``flow`` (tests). An absent policy
    permits nothing.

    ``state_dir``: where the running process publishes node health (``health.json``) for
    ``flow status``. ``name``: shown in logs and ``flow check``.
    """

    def __init__(self, *parts: Any, name: str = "graph", egress: EgressPolicy | None = None,
                 state_dir: str | Path | None = None) -> None:
        if not parts:
            raise GraphError("Graph() needs at least one node or pipeline")
        self.name = name
        self.state_dir = Path(state_dir) if state_dir is not None else None
        pipelines = [Pipeline.of(p) if not isinstance(p, Mapping) else None for p in parts]
        if any(p is None for p in pipelines):
            raise GraphError("a fan-out mapping needs a durable node on its left: store >> {...}")
        nodes: list[Node] = []
        edges: list[Edge] = []
        fanouts: list[FanOut] = []
        for p in pipelines:
            assert p is not None
            nodes = merge_nodes(nodes, p.nodes)
            edges.extend(p.edges)
            fanouts.extend(p.fanouts)
        self.fanouts = fanouts
        self._check_names(nodes)
        # Each branch is fed by the durable node's branch source, a node of the lane itself.
        branch_lanes: dict[int, str] = {}
        for fan in fanouts:
            for lane_name, branch in fan.branches.items():
                assert branch.head is not None
                source = fan.durable.branch(lane_name)
                branch_lanes[id(source)] = lane_name
                nodes.append(source)
                port = free_port(branch.head, branch.head.inputs, edges, output=False)
                edges.append(Edge(source, source.outputs[0], branch.head, port))
        self._check_names(nodes)
        self.nodes = nodes
        self.edges = edges
        self._check_ports()
        self._check_acyclic()
        self.nodes = self._upstream_first()
        self.lanes = self._find_lanes(branch_lanes)
        self.lane_of = {id(n): lane.name for lane in self.lanes for n in lane.nodes}
        site = current_site.get()
        self.egress_policy = egress if egress is not None else (
            site.egress if site is not None else EgressPolicy())
        self.check_egress(self.egress_policy)

    # -- config -----------------------------------------------------------------------------

    @staticmethod
    def config(schema: type[T]) -> T:
        """The site settings, decoded from the file given to ``flow --config FILE``.

        ``schema`` is a :class:`flow.Config` (msgspec Struct) describing the site file; the
        ``[egress]`` and ``[runtime]`` tables belong to the runtime and are not part of it.
        Raises :class:`~flow.ConfigError` naming the file and the key.
        """
        return site_config(schema)

    # -- validation -------------------------------------------------------------------------

    @staticmethod
    def _check_names(nodes: Iterable[Node]) -> None:
        seen: dict[str, Node] = {}
        for node in nodes:
            other = seen.get(node.name)
            if other is not None and other is not node:
                raise GraphError(f"two nodes are named {node.name!r}: give each a unique "
                                 "name=...")
            seen[node.name] = node

    def _check_ports(self) -> None:
        for node in self.nodes:
            for port in node.inputs:
                n = sum(1 for e in self.edges if e.dst is node and e.dst_port == port)
                if n != 1:
                    raise GraphError(f"node {node.name!r} input port {port!r} is "
                                     f"{'not connected' if n == 0 else f'connected {n} times'}")
            for port in node.outputs:
                n = sum(1 for e in self.edges if e.src is node and e.src_port == port)
                if n != 1:
                    raise GraphError(f"node {node.name!r} output port {port!r} is "
                                     f"{'not connected' if n == 0 else f'connected {n} times'}")

    def _check_acyclic(self) -> None:
        after: dict[int, list[Node]] = {id(n): [] for n in self.nodes}
        for e in self.edges:
            after[id(e.src)].append(e.dst)
        state: dict[int, int] = {}  # 1 = on the current path, 2 = done

        def visit(node: Node) -> None:
            state[id(node)] = 1
            for nxt in after[id(node)]:
                if state.get(id(nxt)) == 1:
                    raise GraphError(f"cycle: node {nxt.name!r} is reachable from itself "
                                     f"(via {node.name!r})")
                if id(nxt) not in state:
                    visit(nxt)
            state[id(node)] = 2

        for node in self.nodes:
            if id(node) not in state:
                visit(node)

    def _upstream_first(self) -> list[Node]:
        """The nodes in an order where every node comes after those that feed it; ties keep
        declaration order, so a durable node comes before its branch sources (and is opened
        before them)."""
        index = {id(n): i for i, n in enumerate(self.nodes)}
        indegree = {id(n): 0 for n in self.nodes}
        after: dict[int, list[Node]] = {id(n): [] for n in self.nodes}
        for e in self.edges:
            indegree[id(e.dst)] += 1
            after[id(e.src)].append(e.dst)
        ready = [(index[id(n)], n) for n in self.nodes if indegree[id(n)] == 0]
        heapq.heapify(ready)
        ordered: list[Node] = []
        while ready:
            _, node = heapq.heappop(ready)
            ordered.append(node)
            for nxt in after[id(node)]:
                indegree[id(nxt)] -= 1
                if indegree[id(nxt)] == 0:
                    heapq.heappush(ready, (index[id(nxt)], nxt))
        return ordered

    def _find_lanes(self, branch_names: dict[int, str]) -> list[Lane]:
        """Connected components once the fan-outs are cut; a branch names its lane.

        A durable node's branch sources have no edge back to it, so each branch is a
        component of its own; everything upstream of the durable node is another.
        """
        neighbours: dict[int, list[Node]] = {id(n): [] for n in self.nodes}
        for e in self.edges:
            neighbours[id(e.src)].append(e.dst)
            neighbours[id(e.dst)].append(e.src)
        lanes: list[Lane] = []
        assigned: set[int] = set()
        for node in self.nodes:
            if id(node) in assigned:
                continue
            members: list[Node] = []
            stack = [node]
            assigned.add(id(node))
            while stack:
                cur = stack.pop()
                members.append(cur)
                for nxt in neighbours[id(cur)]:
                    if id(nxt) not in assigned:
                        assigned.add(id(nxt))
                        stack.append(nxt)
            order = {id(n): i for i, n in enumerate(self.nodes)}
            members.sort(key=lambda n: order[id(n)])
            name = next((branch_names[id(n)] for n in members if id(n) in branch_names),
                        members[0].name)
            lanes.append(Lane(name, members))
        names = [lane.name for lane in lanes]
        for name in names:
            if names.count(name) > 1:
                raise GraphError(f"two lanes are named {name!r}")
        return lanes

    def egress_targets(self) -> list[tuple[Node, Target]]:
        return [(node, target) for node in self.nodes for target in node.egress()]

    def check_egress(self, policy: EgressPolicy) -> None:
        """Raise :class:`~flow.EgressDenied` naming the first target ``policy`` refuses."""
        for node, target in self.egress_targets():
            policy.check(target, node=node.name)

    # -- inspection -------------------------------------------------------------------------

    def lane(self, name: str) -> Lane:
        for lane in self.lanes:
            if lane.name == name:
                return lane
        raise KeyError(name)

    def describe(self) -> str:
        """The graph as text: nodes by lane, edges, egress targets (``flow check``)."""
        lines = [f"graph {self.name}: {len(self.nodes)} nodes, {len(self.edges)} edges, "
                 f"{len(self.lanes)} lanes"]
        for lane in self.lanes:
            lines.append(f"  lane {lane.name}:")
            for node in lane.nodes:
                kind = type(node).__name__ + (" (durable)" if node.durable else "")
                lines.append(f"    {node.name}  [{kind}]")
        lines.append("  edges:")
        for e in self.edges:
            lines.append(f"    {e}  (capacity {e.dst.capacity})")
        targets = self.egress_targets()
        lines.append("  egress:" if targets else "  egress: none")
        for node, target in targets:
            lines.append(f"    {node.name} -> {target}  allowed")
        return "\n".join(lines)

