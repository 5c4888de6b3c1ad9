"""The ``flow`` command.

    flow GRAPH.py [--config FILE]          run a graph (same as ``flow run``)
    flow run GRAPH.py [--config FILE]
    flow check GRAPH.py [--config FILE] [--probe]
    flow status GRAPH.py [--config FILE] [--json]
    flow --version

Node libraries add operator commands (``flow trace``, ``flow deadletters``, ``flow echo``)
through the ``flow.commands`` entry-point group: each entry point is a function
``register(subparsers, common)`` that adds argparse sub-commands (calling ``common(p)`` on each
for the shared logging flags) whose ``func(args) -> int`` runs it; a
:class:`~flow.FlowError` it raises becomes the one-line error.
The runtime itself knows nothing about DICOM.

Errors are one clear line on stderr and a non-zero exit, unless ``--debug`` asks for the
traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib.metadata import PackageNotFoundError, entry_points, version
from pathlib import Path
from typing import Any

import trio

from . import _log
from ._errors import FlowError
from ._health import NodeHealth
from ._node import Context
from ._processes import ProcessSpec, plan, resolve
from ._run import ChildOptions, ChildRole, Loaded, child_failed, load, run_process
from ._status import status_document, status_json

COMMANDS = ("run", "check", "status")


def _version() -> str:
    try:
        return version("dicomflow")
    except PackageNotFoundError:  # running from a source tree without installation
        return "0+unknown"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default=os.environ.get("FLOW_LOG_LEVEL", "INFO"),
                   help="DEBUG, INFO, WARNING or ERROR (default INFO; DEBUG may show PHI)")
    p.add_argument("--log-json", action="store_true", help="one JSON object per log line")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")


def _graph_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("graph", type=Path, help="the graph file, e.g. graphs/radiology.py")
    p.add_argument("--config", type=Path, default=None,
                   help="site TOML file (default: the graph file with .toml)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flow", description="Run and operate dicomflow graphs.")
    parser.add_argument("--version", action="version", version=f"dicomflow {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run a graph until SIGINT/SIGTERM (SIGHUP reloads)")
    _graph_args(run)
    run.add_argument("--shutdown-deadline", type=float, default=None, metavar="SECONDS",
                     help="graceful-stop deadline (default: [runtime] shutdown_deadline_s, 10)")
    # A child of a `flow run` parent (flow._processes): never typed by hand.
    run.add_argument("--child", default=None, help=argparse.SUPPRESS)
    run.add_argument("--child-fd", type=int, default=None, help=argparse.SUPPRESS)
    run.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    _common(run)
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="validate config, graph and egress; print the graph")
    _graph_args(check)
    check.add_argument("--probe", "--echo", dest="probe", action="store_true",
                       help="also probe every destination live (each node's own check)")
    _common(check)
    check.set_defaults(func=cmd_check)

    status = sub.add_parser("status", help="per-lane and per-node status of a graph")
    _graph_args(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    _common(status)
    status.set_defaults(func=cmd_status)

    for ep in entry_points(group="flow.commands"):
        register = ep.load()
        register(sub, _common)
    return parser


def _commands(parser: argparse.ArgumentParser) -> set[str]:
    for action in parser._actions:  # argparse has no public accessor for sub-commands
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set(COMMANDS)


def _argv_with_default_command(argv: list[str], known: set[str]) -> list[str]:
    """``flow GRAPH.py ...`` means ``flow run GRAPH.py ...``."""
    for i, arg in enumerate(argv):
        if arg.startswith("-"):
            if arg in ("--version", "-h", "--help"):
                return argv
            continue
        return argv if arg in known else argv[:i] + ["run"] + argv[i:]
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(_argv_with_default_command(argv, _commands(parser)))
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        _log.configure(args.log_level, args.log_json)
    except ValueError as exc:
        print(f"flow: {exc}", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except FlowError as exc:
        if args.debug:
            raise
        print(f"flow: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def cmd_run(args: argparse.Namespace) -> int:
    if args.child is not None:
        if args.child_fd is None or args.parent_pid is None:
            raise FlowError("--child needs --child-fd and --parent-pid (set by the parent)")
        role = ChildRole(ProcessSpec.from_json(args.child), args.child_fd, args.parent_pid)
        try:
            loaded = load(args.graph, args.config)
        except FlowError as exc:
            return child_failed(role, exc)
        return run_process(loaded, deadline=args.shutdown_deadline, child=role)
    loaded = load(args.graph, args.config)
    return run_process(loaded, deadline=args.shutdown_deadline, children=ChildOptions(
        args.log_level, args.log_json, args.shutdown_deadline))


def _probe_context(loaded: Loaded, node: Any) -> Context:
    lane = loaded.graph.lane_of[id(node)]
    return Context(node, lane, {}, {}, _log.get_logger(f"flow.node.{node.name}"),
                   loaded.site.egress, NodeHealth(node.name, lane))


def describe_processes(loaded: Loaded) -> str:
    """How ``flow run`` would divide the graph (``[runtime] processes``)."""
    setting = loaded.site.runtime.processes
    specs = plan(loaded.graph, resolve(setting))
    if not specs:
        return f"  processes: 1 ([runtime] processes = {setting}): every lane in one process"
    lines = [f"  processes: {len(specs)} + the supervising parent ([runtime] processes = "
             f"{setting})"]
    nice = loaded.site.runtime.lanes_nice
    lines += [f"    {spec.name}: {', '.join(spec.lanes)}"
              + (f" (nice +{nice}, [runtime] lanes_nice)" if nice and not spec.ingest else "")
              for spec in specs]
    return "\n".join(lines)


def cmd_check(args: argparse.Namespace) -> int:
    loaded = load(args.graph, args.config)
    print(loaded.graph.describe())
    print(describe_processes(loaded))
    print(f"config {loaded.site.name}: valid")
    if not args.probe:
        return 0

    async def probe_all() -> int:
        failures = 0
        for node in loaded.graph.nodes:
            try:
                result = await node.probe(_probe_context(loaded, node))
            except FlowError as exc:
                print(f"probe {node.name}: FAILED: {exc}")
                failures += 1
                continue
            if result is None:
                continue
            ok = bool(result.get("ok", True))
            failures += not ok
            print(f"probe {node.name}: {'ok' if ok else 'FAILED'} " + json.dumps(
                {k: v for k, v in result.items() if k not in ('ok', 'warnings')}, sort_keys=True))
            for warning in result.get("warnings", ()):  # one line each, where the eye falls
                print(f"probe {node.name}: warning: {warning}")
        return failures

    return 1 if trio.run(probe_all) else 0


def read_health(state_dir: Path | None) -> dict[str, Any] | None:
    """The running process's health snapshot, or None when it is not running."""
    if state_dir is None:
        return None
    try:
        health = json.loads((state_dir / "health.json").read_text())
    except (OSError, ValueError):
        return None
    pid = health.get("pid")
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return None
    except PermissionError:
        pass  # alive, owned by another user
    return health


def cmd_status(args: argparse.Namespace) -> int:
    loaded = load(args.graph, args.config)
    graph = loaded.graph
    health = read_health(graph.state_dir)
    doc = status_document(graph, health)
    lanes = doc["lanes"]
    if args.json:
        print(status_json(doc))
        return 0
    print(f"graph {graph.name}: " + (f"running (pid {doc['pid']})" if health else "not running"))
    for lane, figures in lanes.items():
        shown = " ".join(f"{k}={v}" for k, v in sorted(figures.items()) if v is not None)
        print(f"  lane {lane}: {shown}")
    # A graph run as several processes (flow._processes): one line per child process.
    for child in (health or {}).get("processes", []):
        print(f"  process {child['process']}: pid {child['pid']} {child['state']}"
              f" restarts={child['restarts']} lanes={','.join(child['lanes'])}")
    for node in doc["nodes"]:
        extra = (f" restarts={node.get('restarts', 0)}"
                 f" last_error={node.get('last_error_class') or '-'}") if health else ""
        where = f" [{node['process']}]" if node.get("process") else ""
        print(f"  node {node['node']} ({node['lane']}){where}: {node['state']}{extra}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
