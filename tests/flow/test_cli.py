"""The ``flow`` command as an operator uses it: a real child process, stopped by its pid."""

import signal
import textwrap
import time

import pytest

from support.flowproc import FlowProcess, run_flow

GRAPH = textwrap.dedent('''
    from flow import Config, Graph
    from support.flownodes import Dialer, Stuck, Ticker

    class Peer(Config):
        host: str
        port: int

    class Site(Config):
        ris: Peer
        stuck: bool = False

    site = Graph.config(Site)
    sink = Stuck() if site.stuck else Dialer(site.ris.host, site.ris.port, name="ris_sender")
    graph = Graph(Ticker(0.01, name="listener") >> sink, name="demo", state_dir=STATE)
''')

CONFIG = textwrap.dedent('''
    [ris]
    host = "127.0.0.1"
    port = {port}
    {extra}
    [egress]
    allowed_tcp = [{allowed}]
''')


@pytest.fixture
def site(tmp_path):
    graph = tmp_path / "demo.py"
    graph.write_text(f"STATE = {str(tmp_path / 'state')!r}\n" + GRAPH)
    config = tmp_path / "site.toml"

    def write(port=2575, allowed='"127.0.0.1:2575"', extra=""):
        config.write_text(CONFIG.format(port=port, allowed=allowed, extra=extra))
        return config

    write()
    return graph, config, write


def test_check_prints_the_graph_and_accepts_a_valid_config(site):
    graph, config, _ = site
    done = run_flow(["check", str(graph), "--config", str(config)])
    assert done.returncode == 0, done.stderr
    assert "listener" in done.stdout and "ris_sender" in done.stdout


def test_config_error_names_the_file_and_the_key(site):
    graph, config, write = site
    write(extra="caled_ae_title = 'PACS'")
    done = run_flow(["check", str(graph), "--config", str(config)])
    assert done.returncode == 1
    assert "site.toml: unknown key ris.caled_ae_title" in done.stderr
    assert "Traceback" not in done.stderr


def test_wrong_type_names_the_key(site):
    graph, config, _ = site
    config.write_text(config.read_text().replace("port = 2575", 'port = "2575"'))
    done = run_flow(["check", str(graph), "--config", str(config)])
    assert done.returncode == 1 and "ris.port" in done.stderr and "expected int" in done.stderr


@pytest.mark.parametrize("allowed", ['"127.0.0.1:2576"', ""])
def test_egress_outside_the_allowlist_is_refused_at_check_and_at_run(site, allowed, tmp_path):
    graph, config, write = site
    write(allowed=allowed)
    for command in (["check"], ["run"], []):
        done = run_flow([*command, str(graph), "--config", str(config)], timeout=30)
        assert done.returncode == 1, (command, done.stderr)
        assert "127.0.0.1:2575" in done.stderr and "ris_sender" in done.stderr
    assert not (tmp_path / "state" / "health.json").exists()  # never started


def test_sigterm_stops_within_the_deadline_and_exits_zero(site, tmp_path):
    graph, config, _ = site
    with FlowProcess([str(graph), "--config", str(config)], tmp_path / "flow.log") as proc:
        proc.wait_for_log(r"graph\.started")
        status = run_flow(["status", str(graph), "--config", str(config), "--json"])
        assert '"running": true' in status.stdout
        proc.signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        log = proc.output()
    assert "shutdown.requested" in log and "graph.stopped" in log


def test_stuck_work_is_cut_at_the_deadline_and_a_second_signal_exits_at_once(site, tmp_path):
    graph, config, write = site
    write(extra="", allowed='"127.0.0.1:2575"')
    config.write_text("stuck = true\n" + config.read_text())
    args = [str(graph), "--config", str(config), "--shutdown-deadline", "1"]
    with FlowProcess(args, tmp_path / "a.log") as proc:
        proc.wait_for_log(r"graph\.started")
        proc.signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert "graph.deadline" in proc.output()

    args[-1] = "60"
    with FlowProcess(args, tmp_path / "b.log") as proc:
        proc.wait_for_log(r"graph\.started")
        proc.signal(signal.SIGTERM)
        proc.wait_for_log(r"shutdown\.requested")
        started = time.monotonic()
        proc.signal(signal.SIGINT)
        assert proc.wait(15) == 128 + signal.SIGINT
        assert time.monotonic() - started < 10  # not the 60 s deadline


def test_reload_that_breaks_the_allowlist_is_rejected_whole_and_a_valid_one_applies(site, tmp_path):
    graph, config, write = site
    with FlowProcess([str(graph), "--config", str(config)], tmp_path / "flow.log") as proc:
        proc.wait_for_log(r"graph\.started")
        write(port=2576)  # target moved, allowlist not updated
        proc.signal(signal.SIGHUP)
        log = proc.wait_for_log(r"reload\.rejected")
        assert "127.0.0.1:2576" in log.split("reload.rejected", 1)[1]
        assert proc.alive() and "reload.accepted" not in log

        write(port=2575, allowed="")  # an empty allowlist permits nothing
        proc.signal(signal.SIGHUP)
        log = proc.wait_for_log(r"reload\.rejected", count=2)
        assert "allowlist is empty" in log.split("reload.rejected")[2]
        assert proc.alive() and "reload.accepted" not in log

        write(port=2576, allowed='"127.0.0.1:2576"')
        proc.signal(signal.SIGHUP)
        proc.wait_for_log(r"reload\.accepted")
        proc.wait_for_log(r"graph\.started", count=2)
        proc.signal(signal.SIGTERM)
        assert proc.wait(15) == 0


def test_a_syntax_error_names_the_file_it_is_in(tmp_path):
    (tmp_path / "site_handlers.py").write_text("def handle(ds):\n  return ds\n    x = 1\n")
    graph = tmp_path / "graph.py"
    graph.write_text("import sys\nsys.path.insert(0, %r)\nimport site_handlers\n"
                     % str(tmp_path))
    done = run_flow([str(graph)])
    assert done.returncode == 1
    assert f"{tmp_path / 'site_handlers.py'}:3: syntax error" in done.stderr, done.stderr
    graph.write_text("graph = (\n")
    done = run_flow([str(graph)])
    assert done.returncode == 1
    assert f"{graph}:1: syntax error" in done.stderr, done.stderr


def test_unknown_graph_file_is_a_one_line_error(tmp_path):
    done = run_flow([str(tmp_path / "nope.py")])
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "graph file not found" in done.stderr


FREEZE_GRAPH = textwrap.dedent('''
    import gc
    from pathlib import Path

    import trio

    from flow import Graph, Node
    from support.flownodes import Ticker


    class FreezeProbe(Node):
        """Writes how many objects the garbage collector holds frozen, every 50 ms."""

        outputs = ()

        async def run(self, ctx) -> None:
            async for _ in ctx.receive():
                Path(OUT).write_text(str(gc.get_freeze_count()))
                await trio.sleep(0.05)

    graph = Graph(Ticker(0.01, name="listener") >> FreezeProbe(name="probe"), name="probe",
                  state_dir=STATE)
''')


def test_the_start_up_heap_is_frozen_once_the_graph_is_ready(tmp_path):
    """What start-up built is moved out of the collector's way (gc.freeze) once ready, so
    the collections that run while objects flow do not walk it again and again."""
    out = tmp_path / "frozen"
    graph = tmp_path / "probe.py"
    graph.write_text(f"STATE = {str(tmp_path / 'state')!r}\nOUT = {str(out)!r}\n" + FREEZE_GRAPH)
    with FlowProcess([str(graph)], tmp_path / "flow.log") as proc:
        proc.wait_for_log(r"graph\.started")
        deadline = time.monotonic() + 15
        while not (out.exists() and out.read_text() not in ("", "0")):
            assert time.monotonic() < deadline, "nothing frozen"
            time.sleep(0.05)
        assert int(out.read_text()) > 10_000  # the modules, the graph: a large heap
        proc.signal(signal.SIGTERM)
        assert proc.wait(15) == 0
