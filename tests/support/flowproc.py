"""Run the real ``flow`` command as a child process, the way an operator does."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from .peers import Process

TESTS = Path(__file__).resolve().parent.parent
FLOW = str(Path(sys.executable).with_name("flow"))


def flow_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a child ``flow``: test nodes importable, output unbuffered."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_flow(args: Sequence[str], *, timeout: float = 60, cwd: Path | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``flow ARGS`` to completion; returns the completed process (text output)."""
    return subprocess.run([FLOW, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env=flow_env(env))


class FlowProcess(Process):
    """A running ``flow`` graph, stopped by its pid; its log lines can be awaited."""

    def __init__(self, args: Sequence[str], log: Path, *, cwd: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        super().__init__([FLOW, *args], cwd=cwd, env=flow_env(env), log=log)

    def wait_for_log(self, pattern: str, *, timeout: float = 30, count: int = 1) -> str:
        """Wait until ``pattern`` (a regex) has matched ``count`` log lines; return the log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.output()
            if len(re.findall(pattern, text)) >= count:
                return text
            if not self.alive():
                raise AssertionError(f"flow exited ({self.popen.returncode}) before "
                                     f"{pattern!r}:\n{text}")
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} within {timeout}s:\n{self.output()}")

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)
