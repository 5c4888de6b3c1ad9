"""README.md stays true: its graph example loads and validates with `flow check`, and its
set-up commands are the scripts CI runs."""

from __future__ import annotations

import re
from pathlib import Path

from support.flowproc import run_flow

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()

SITE = """
data_dir = "{data}"
[listen]
host = "127.0.0.1"
port = 11112
ae_title = "DICOMFLOW"
calling_ae_titles = []
[pacs]
host = "127.0.0.1"
port = 11113
ae_title = "DICOMFLOW"
called_ae_title = "PACS"
[archive]
url = "http://127.0.0.1:8042/dicom-web"
[ris]
host = "127.0.0.1"
port = 2575
[egress]
allowed_tcp = ["127.0.0.1:11113", "127.0.0.1:2575"]
allowed_http = ["http://127.0.0.1:8042/dicom-web"]
"""


def section(title: str) -> str:
    return README.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_readme_graph_passes_flow_check(tmp_path: Path) -> None:
    code = re.search(r"```python\n(.*?)```", section("A graph"), re.S).group(1)
    graph = tmp_path / "readme_graph.py"
    graph.write_text(code)
    config = tmp_path / "site.toml"
    config.write_text(SITE.format(data=tmp_path / "data"))
    result = run_flow(["check", str(graph), "--config", str(config)])
    assert result.returncode == 0, result.stderr
    for lane in ("pacs", "archive", "ris"):
        assert f"lane {lane}:" in result.stdout
    assert not (tmp_path / "data").exists(), "flow check must not open the Store"


def test_the_setup_commands_are_what_ci_runs() -> None:
    setup = section("Set up")
    assert "./scripts/run" in setup and "./scripts/test" in setup
    assert "./scripts/test" in (ROOT / ".ci" / "run").read_text()
    for script in ("run", "test", "demo"):
        assert (ROOT / "scripts" / script).stat().st_mode & 0o111, f"scripts/{script} not executable"
