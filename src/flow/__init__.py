"""flow: declared dataflow graphs on Trio, with supervision and fail-closed egress.

The runtime knows nothing about DICOM. A graph file builds nodes, joins them with ``>>`` and
assigns ``graph = Graph(...)``; ``flow run GRAPH.py --config site.toml`` runs it. Site
settings come from ``Graph.config(Schema)``.
"""

from ._config import AdminConfig, Config, RestartPolicy, RuntimeConfig, is_loopback
from ._direct import NOT_SERVED, Direct
from ._egress import EgressConfig, EgressPolicy, HttpTarget, TcpTarget, Target
from ._errors import ConfigError, EgressDenied, FlowError, GraphError
from ._graph import Graph, Lane
from ._health import NodeHealth
from ._log import get_logger, register_foreign, register_safe_fields
from ._metrics import (COUNTER, GAUGE, HISTOGRAM, Histogram, HistogramValue, Metric,
                       histogram_value)
from ._node import Context, Node, Pipeline
from ._placement import Placement
from ._run import Loaded, load, serve
from ._supervisor import Runner


async def run(graph: Graph, *, restart: RestartPolicy | None = None,
              deadline: float | None = None) -> Runner:
    """Run ``graph`` in the current Trio task until every lane finishes; return its Runner.

    For tests and embedding; the ``flow`` command adds signals and reload on top.
    """
    runner = Runner(graph, restart=restart)
    await runner.run(deadline=deadline)
    return runner


__all__ = [
    "AdminConfig", "COUNTER", "GAUGE", "HISTOGRAM", "Histogram", "HistogramValue", "Metric",
    "histogram_value", "is_loopback",
    "Config", "ConfigError", "Context", "Direct", "EgressConfig", "EgressDenied", "EgressPolicy",
    "FlowError", "Graph", "GraphError", "HttpTarget", "Lane", "Loaded", "Node", "NodeHealth",
    "Pipeline", "Placement", "RestartPolicy", "Runner", "RuntimeConfig", "TcpTarget", "Target",
    "NOT_SERVED", "get_logger", "load", "register_foreign", "register_safe_fields", "run", "serve",
]
