"""Placement: which process of a graph runs which lanes, as a node learns it before it opens.

With ``[runtime] processes = 1`` the whole graph runs in one process and every node gets
the default :class:`Placement` (``lanes`` None: every lane runs here). With several
processes (:mod:`flow._processes`) each child runs some lanes of the same graph file; every
node of those lanes, and every durable node that feeds one of them, is told through
:meth:`flow.Node.place` where it is before its ``open()``. A durable node uses it to run
only what belongs in this process (e.g. the Store: ingest where its own lane runs, the
queues of the lanes whose pumps run here).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Placement:
    """Where one node runs.

    process: the process's name in logs and status (``main`` in one-process mode,
        e.g. ``ingest-0`` or ``lanes-1`` otherwise).
    lane: the node's own lane.
    lanes: the lanes that run in this process; None: every lane (one process).
    replica / replicas: this process's index among the processes that run the same lanes
        side by side (several ingest processes on one port), and how many there are.
    """

    process: str = "main"
    lane: str = ""
    lanes: frozenset[str] | None = None
    replica: int = 0
    replicas: int = 1

    @property
    def shared(self) -> bool:
        """Other processes run other parts of this graph (or the same part beside it)."""
        return self.lanes is not None

    def runs(self, lane: str) -> bool:
        """``lane`` runs in this process."""
        return self.lanes is None or lane in self.lanes
