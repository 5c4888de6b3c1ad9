"""What a ``flow`` process imports: a command loads only what it uses (every ``flow run``
child and every operator command pays for each import at start)."""

import json
import subprocess
import sys
import textwrap

from support.flowproc import flow_env

# The admin endpoint's HTTP server and metrics exposition: only where [admin] is served.
ADMIN_ONLY = ("hypercorn", "prometheus_client", "h11", "h2", "wsproto")

GRAPH = textwrap.dedent('''
    from flow import Graph
    from support.flownodes import Collect, Ticker

    graph = Graph(Ticker(0.01, name="source") >> Collect(name="sink"), name="plain")
''')


def imported_after(code: str) -> list[str]:
    """The top-level packages a fresh interpreter has imported after running ``code``."""
    done = subprocess.run(
        [sys.executable, "-c", code + "\nimport json, sys\n"
         "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"],
        capture_output=True, text=True, timeout=60, env=flow_env())
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_importing_the_cli_and_building_its_parser_imports_no_admin_server():
    found = imported_after("import flow.cli; flow.cli.build_parser()")
    assert [m for m in found if m in ADMIN_ONLY] == []


def test_check_without_an_admin_table_imports_no_admin_server(tmp_path):
    graph = tmp_path / "plain.py"
    graph.write_text(GRAPH)
    found = imported_after(f"import flow.cli\nassert flow.cli.main(['check', {str(graph)!r}]) "
                           f"== 0")
    assert "trio" in found  # the check ran the runtime
    assert [m for m in found if m in ADMIN_ONLY] == []


# The node library's commands (`flow trace`, `flow deadletters`, `flow keys`, `flow echo`)
# are registered in every process; they import what they use when they run.
NODE_LIBRARIES = ("pydicom", "pynetdicom", "lmdb", "cryptography", "httpx", "hl7apy")


def test_registering_the_node_commands_imports_no_node_library():
    found = imported_after("import flow.cli; parser = flow.cli.build_parser()\n"
                           "assert {'trace', 'echo'} <= flow.cli._commands(parser)")
    assert [m for m in found if m in NODE_LIBRARIES] == []


def test_check_of_a_graph_without_dicom_nodes_imports_no_node_library(tmp_path):
    graph = tmp_path / "plain.py"
    graph.write_text(GRAPH)
    found = imported_after(f"import flow.cli\nassert flow.cli.main(['check', {str(graph)!r}]) "
                           f"== 0")
    assert [m for m in found if m in NODE_LIBRARIES] == []
