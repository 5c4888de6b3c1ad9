"""Start-up time of the ``flow`` command: how long before it does anything useful.

    .venv/bin/python bench/startup.py [--repeat 5] [--runs 3]

Wall and CPU time (medians of ``--repeat``; CPU time varies less on a busy machine) of
``flow --help`` and ``flow check graphs/radiology.py``,
and (median of ``--runs``) the time from starting ``flow run graphs/radiology.py`` until the
supervisor logs ``graph.ready`` (every child process has started its graph and the listener
is bound). Every ``flow`` process imports the runtime and the nodes first, so these figures
are mostly import time (``python -X importtime`` shows where). Prints ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests")]

from support.flowproc import FLOW, FlowProcess  # noqa: E402
from support.peers import free_port  # noqa: E402

GRAPH = ROOT / "graphs" / "radiology.py"


def timed(args: list[str]) -> tuple[float, float]:
    """Wall time and CPU time (user + system) of one ``flow ARGS`` to completion."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([FLOW, *args], cwd=ROOT, check=True, capture_output=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def medians(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return tuple(round(statistics.median(r[i] for r in runs), 3) for i in (0, 1))


def site_file(work: Path) -> Path:
    """graphs/radiology.toml with a free listen port and a data dir of its own."""
    text = (GRAPH.with_suffix(".toml")).read_text()
    text = re.sub(r"(?m)^port = 11112$", f"port = {free_port()}", text)
    text = re.sub(r'(?m)^data_dir = .*$', f'data_dir = "{work / "data"}"', text)
    path = work / "site.toml"
    path.write_text(text)
    return path


def ready(work: Path) -> float:
    started = time.perf_counter()
    with FlowProcess(["run", str(GRAPH), "--config", str(site_file(work))],
                     work / "flow.log", cwd=ROOT) as flow:
        flow.wait_for_log(r"graph\.ready .*process=supervisor", timeout=60)
        return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    help_s, help_cpu_s = medians([timed(["--help"]) for _ in range(args.repeat)])
    check_s, check_cpu_s = medians([timed(["check", str(GRAPH)]) for _ in range(args.repeat)])
    ready_s = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
            ready_s.append(ready(Path(tmp)))
    print(json.dumps({
        "bench": "startup", "repeat": args.repeat, "runs": args.runs,
        "help_s": help_s, "help_cpu_s": help_cpu_s,
        "check_s": check_s, "check_cpu_s": check_cpu_s,
        "run_ready_s": round(statistics.median(ready_s), 3),
        "run_ready_all_s": [round(s, 3) for s in ready_s],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
