"""What nodes report for ``/metrics``: plain figures, rendered by the admin endpoint.

A node's :meth:`~flow.Node.metrics` returns :class:`Metric` values read from its current
state at the moment of the call (a scrape); the runtime groups them by name and renders the
Prometheus text format (:mod:`flow._admin`). Nodes never import the exposition library and
never keep a second copy of a figure they can read.

Label values must be routing-safe (lane, node, AE title, outcome class, reason, status
code): never a UID of a patient-level entity, never a name.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"


@dataclass(frozen=True)
class HistogramValue:
    """Cumulative buckets ``((upper bound, count ≤ bound), ...)`` ending with +Inf, and the
    sum of every observation."""

    buckets: tuple[tuple[float, int], ...]
    sum: float

    @property
    def count(self) -> int:
        return self.buckets[-1][1] if self.buckets else 0


def histogram_value(bounds: Sequence[float], counts: Sequence[int], total: float
                    ) -> HistogramValue:
    """``counts[i]``: observations in bucket ``i`` alone (``len(bounds) + 1`` of them, the
    last above every bound) → the cumulative :class:`HistogramValue`."""
    if len(counts) != len(bounds) + 1:
        raise ValueError("one count per bound, plus one above the last bound")
    running, buckets = 0, []
    for bound, n in zip([*bounds, float("inf")], counts):
        running += n
        buckets.append((float(bound), running))
    return HistogramValue(tuple(buckets), float(total))


@dataclass(frozen=True)
class Metric:
    """One sample: ``dicomflow_<name>{labels} value``.

    ``kind`` is ``counter`` (a running total; ``name`` without ``_total``), ``gauge`` or
    ``histogram`` (``value`` a :class:`HistogramValue`). Samples of one name must share
    their kind, help text and label names.

    ``per_process``: a figure of this process's memory (a listener's counters, one commit
    round's duration), not one read from storage that every process shares. When a graph
    runs in several processes, each process reports its own, with a ``process`` label; the
    shared ones are read once, by the parent.
    """

    name: str
    kind: str
    help: str
    value: float | HistogramValue
    labels: dict[str, str] = field(default_factory=dict)
    per_process: bool = False

    def to_json(self) -> dict[str, Any]:
        """As plain JSON types (what a child process sends its parent)."""
        value: Any = self.value
        if isinstance(value, HistogramValue):
            value = {"buckets": [list(b) for b in value.buckets], "sum": value.sum}
        return {"name": self.name, "kind": self.kind, "help": self.help, "value": value,
                "labels": self.labels, "per_process": self.per_process}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "Metric":
        value = doc["value"]
        if isinstance(value, dict):
            value = HistogramValue(tuple((float(le), int(n)) for le, n in value["buckets"]),
                                   float(value["sum"]))
        return cls(str(doc["name"]), str(doc["kind"]), str(doc["help"]), value,
                   {str(k): str(v) for k, v in doc["labels"].items()},
                   bool(doc.get("per_process")))


class Histogram:
    """Observations in fixed buckets, kept in memory by the node that makes them (one
    Trio thread: no locking). :meth:`value` is what :class:`Metric` takes."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def value(self) -> HistogramValue:
        return histogram_value(self.bounds, list(self.counts), self.sum)
