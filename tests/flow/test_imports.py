"""What a ``flow`` process imports: a command loads only what it uses (every ``flow run``
child and every operator command pays for each import at start)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from support.flowproc import flow_env

ROOT = Path(__file__).resolve().parents[2]

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


def imported_after(code: str) -> set[str]:
    """The modules a fresh interpreter has imported after running ``code``."""
    done = subprocess.run(
        [sys.executable, "-c",
         code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
        capture_output=True, text=True, timeout=60, env=flow_env(), cwd=ROOT)
    assert done.returncode == 0, done.stderr
    found = set(json.loads(done.stdout.splitlines()[-1]))
    assert "flow" in found
    return found


def unneeded_imports(code: str) -> list[str]:
    """The admin server and node libraries a fresh interpreter has imported after ``code``."""
    found = {m.split(".")[0] for m in imported_after(code)}
    return sorted(m for m in found if m in ADMIN_ONLY + NODE_LIBRARIES)


def test_building_the_cli_with_the_node_commands_imports_no_admin_server_nor_node_library():
    assert unneeded_imports("import flow.cli; parser = flow.cli.build_parser()\n"
                            "assert {'trace', 'echo'} <= flow.cli._commands(parser)") == []


def test_check_of_a_graph_without_admin_or_dicom_nodes_imports_neither(tmp_path):
    graph = tmp_path / "plain.py"
    graph.write_text(GRAPH)
    assert unneeded_imports(f"import flow.cli\n"
                            f"assert flow.cli.main(['check', {str(graph)!r}]) == 0") == []


def test_loading_the_radiology_graph_imports_no_admin_server_http_client_or_code_tables():
    # What the supervisor of `flow run`, its ingest child and `flow check` do: none of them
    # serves [admin] here, sends over HTTP or maps a FHIR body site.
    found = imported_after("from flow import load; load('graphs/radiology.py')")
    assert "nodes.dimse.listener" in found
    unneeded = {"hypercorn", "prometheus_client", "httpx", "pydicom.sr.codedict"}
    assert sorted(found & unneeded) == []
