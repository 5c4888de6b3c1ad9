"""Run every bench script, show progress, and write one JSON file plus a markdown table.

    .venv/bin/python bench/run_all.py [--only NAME ...] [--out bench/results]

Each bench/<name>.py prints one JSON line: its figures and the baseline it measured in the
same run. This collects them into ``results.json`` and ``results.md`` (every figure, and
every ratio against its same-run baseline, flattened to one row each). Each bench's result
says when it ran (``measured_at``, UTC); with ``--only``, the other benches' last results
are kept as they were.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent


def flatten(value, prefix: str = "") -> list[tuple[str, object]]:
    if isinstance(value, dict):
        rows: list[tuple[str, object]] = []
        for key, inner in value.items():
            rows.extend(flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return rows
    return [(prefix, value)]


def run_one(script: Path, timeout: float) -> dict:
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                              timeout=timeout, cwd=HERE.parent)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    lines = [line for line in done.stdout.splitlines() if line.strip().startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {done.returncode}: " + " | ".join(tail)}
    result = json.loads(lines[-1])
    result.setdefault("elapsed_s", round(time.monotonic() - started, 1))
    return result


def table(results: dict[str, dict]) -> str:
    out = ["| bench | figure | value |", "| --- | --- | --- |"]
    for name, result in results.items():
        for key, value in flatten(result):
            if isinstance(value, float):
                value = f"{value:.3g}"
            out.append(f"| {name} | {key} | {value} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", help="bench names to run (default: all)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)
    scripts = sorted(p for p in HERE.glob("*.py") if p.name != Path(__file__).name
                     and not p.name.startswith("_"))
    if args.only:
        scripts = [p for p in scripts if p.stem in args.only]
    results: dict[str, dict] = {}
    previous = args.out / "results.json"
    if args.only and previous.exists():  # the benches not run now keep their last results
        results = json.loads(previous.read_text())
    for i, script in enumerate(scripts, 1):
        print(f"[{i}/{len(scripts)}] {script.stem} ...", end="", flush=True, file=sys.stderr)
        measured_at = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        result = run_one(script, args.timeout)
        result.setdefault("measured_at", measured_at)
        results[script.stem] = result
        print(" " + ("FAILED: " + result["error"] if "error" in result
                     else f"done in {result.get('elapsed_s')}s"), file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "results.md").write_text(table(results))
    print(table(results))
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
