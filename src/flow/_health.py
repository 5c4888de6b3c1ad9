"""Node health: the states a node moves through and the record the supervisor keeps of it.

The supervisor (:mod:`flow._supervisor`) writes a :class:`NodeHealth` per node, the node's
:class:`~flow.Context` carries it, and ``flow status``, ``/healthz`` and ``/metrics`` read
its :meth:`~NodeHealth.snapshot`. Every field is routing-safe by construction: names,
states, counts and an exception's class name.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

STARTING, RUNNING, RESTARTING, FAILED, STOPPED, FINISHED = (
    "starting", "running", "restarting", "failed", "stopped", "finished")

NODE_STATES = (STARTING, RUNNING, RESTARTING, FAILED, STOPPED, FINISHED)
# A lane in one of these states counts as up (``/healthz``, ``lane_up``).
UP_STATES = (STARTING, RUNNING, RESTARTING)


@dataclass
class NodeHealth:
    """Live health of one node; routing-safe by construction."""

    node: str
    lane: str
    state: str = STARTING
    restarts: int = 0
    last_error_class: str | None = None
    failures: deque[float] = field(default_factory=deque, repr=False)

    def snapshot(self) -> dict[str, Any]:
        return {"node": self.node, "lane": self.lane, "state": self.state,
                "restarts": self.restarts, "last_error_class": self.last_error_class}
