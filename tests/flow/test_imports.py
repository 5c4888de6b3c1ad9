"""What a ``flow`` process imports: a command loads only what it uses (every ``flow run``
child and every operator command pays for each import at start)."""

import json
import subprocess
import sys
import textwrap

from support.flowproc import flow_env

# The admin endpoint's HTTP server and metrics exposition: only where [admin] is served.
ADMIN_ONLY = ("hypercorn", "prometheus_client", "h11", "h2", "wsproto")
# The node library's commands (`flow trace`, `flow deadletters`, `flow keys`, `flow echo`)
# are registered in every process; they import what they use when they run, and the nodes
# are imported by the graphs that use them.
NODE_LIBRARIES = ("pydicom", "pynetdicom", "lmdb", "cryptography", "httpx", "hl7apy")

GRAPH = textwrap.dedent('''
    from flow import Graph
    from support.flownodes import Collect, Ticker

    graph = Graph(Ticker(0.01, name="source") >> Collect(name="sink"), name="plain")
''')


def unneeded_imports(code: str) -> list[str]:
    """The admin server and node libraries a fresh interpreter has imported after ``code``."""
    done = subprocess.run(
        [sys.executable, "-c", code + "\nimport json, sys\n"
         "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"],
        capture_output=True, text=True, timeout=60, env=flow_env())
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.splitlines()[-1])
    assert "flow" in found
    return [m for m in found if m in ADMIN_ONLY + NODE_LIBRARIES]


def test_building_the_cli_with_the_node_commands_imports_no_admin_server_nor_node_library():
    assert unneeded_imports("import flow.cli; parser = flow.cli.build_parser()\n"
                            "assert {'trace', 'echo'} <= flow.cli._commands(parser)") == []


def test_check_of_a_graph_without_admin_or_dicom_nodes_imports_neither(tmp_path):
    graph = tmp_path / "plain.py"
    graph.write_text(GRAPH)
    assert unneeded_imports(f"import flow.cli\n"
                            f"assert flow.cli.main(['check', {str(graph)!r}]) == 0") == []
