"""A real browser for page tests: Debian's headless ``chromium``, one process per call,
run to completion (``subprocess.run`` with a timeout), with a throw-away profile."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from .peers import need

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1280,900")


def _chromium(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    binary = need("chromium")["chromium"]
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        result = subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", *args],
                                capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"chromium exited {result.returncode}:\n{result.stderr[-2000:]}")
    return result


def dump_dom(url: str) -> str:
    """The page's DOM as Chromium serialises it after loading (and rendering) ``url``."""
    return _chromium("--dump-dom", url).stdout


def screenshot(url: str, path: Path) -> Path:
    """A PNG of ``url`` as Chromium renders it in a 1280x900 window."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _chromium(f"--screenshot={path}", url)
    if not path.is_file() or path.stat().st_size == 0:
        raise AssertionError(f"chromium wrote no screenshot to {path}")
    return path
