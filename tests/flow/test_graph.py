"""Graph declaration and load-time validation."""

import pytest

from flow import EgressConfig, EgressDenied, EgressPolicy, Graph, GraphError
from support.flownodes import Collect, Counter, Dialer, MemoryDurable, Pass


def test_pipeline_builds_edges_and_one_lane():
    graph = Graph(Counter(3) >> Pass() >> Collect())
    assert [str(e) for e in graph.edges] == ["counter.out -> pass.in", "pass.out -> collect.in"]
    assert [lane.name for lane in graph.lanes] == ["counter"]


def test_fan_out_after_durable_node_makes_one_lane_per_branch():
    store = MemoryDurable(name="store")
    graph = Graph(Counter(3) >> store >> {"fast": Collect(name="a"),
                                          "slow": Pass(name="p") >> Collect(name="b")})
    lanes = {lane.name: [n.name for n in lane.nodes] for lane in graph.lanes}
    assert lanes == {"counter": ["counter", "store"],
                     "fast": ["store.fast", "a"],
                     "slow": ["store.slow", "p", "b"]}


def test_duplicate_names_are_refused_naming_the_node():
    with pytest.raises(GraphError, match="two nodes are named 'x'"):
        Graph(Counter(1, name="x") >> Collect(name="x"))


def test_unconnected_input_port_is_named():
    with pytest.raises(GraphError, match="node 'pass' input port 'in' is not connected"):
        Graph(Pass() >> Collect())


def test_unconnected_output_port_is_named():
    with pytest.raises(GraphError, match="node 'pass' output port 'out' is not connected"):
        Graph(Counter(1) >> Pass())


def test_cycle_is_refused():
    a, b = Pass(name="a"), Pass(name="b")
    with pytest.raises(GraphError, match="cycle"):
        Graph(a >> b, b >> a)


def test_fan_out_after_non_durable_node_is_refused():
    with pytest.raises(GraphError, match="node 'pass' fans out but is not durable"):
        Counter(1) >> Pass() >> {"a": Collect(name="a"), "b": Collect(name="b")}


def test_nothing_may_follow_a_fan_out():
    with pytest.raises(GraphError, match="nothing can follow a fan-out"):
        Counter(1) >> MemoryDurable() >> {"a": Pass()} >> Collect()


def test_egress_target_outside_allowlist_is_refused_naming_it():
    policy = EgressPolicy(EgressConfig(allowed_tcp=["127.0.0.1:11113"]))
    with pytest.raises(EgressDenied, match=r"node 'pacs': egress to tcp://10.0.0.9:104 refused"):
        Graph(Counter(1) >> Dialer("10.0.0.9", 104, name="pacs"), egress=policy)


def test_empty_allowlist_permits_nothing():
    with pytest.raises(EgressDenied, match="allowlist is empty"):
        Graph(Counter(1) >> Dialer("127.0.0.1", 11113))


def test_allowed_egress_passes_and_describe_prints_it():
    policy = EgressPolicy(EgressConfig(allowed_tcp=["127.0.0.1:11113"]))
    graph = Graph(Counter(1) >> Dialer("127.0.0.1", 11113, name="pacs"), egress=policy)
    text = graph.describe()
    assert "pacs -> tcp://127.0.0.1:11113  allowed" in text
    assert "lane counter:" in text
