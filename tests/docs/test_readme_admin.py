"""README.md's admin endpoint section stays true: its `[admin]` table is a valid site table
and its Prometheus scrape config points at the address that table serves."""

from __future__ import annotations

import re
from pathlib import Path

from flow._config import read_site_file

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_readme_admin_table_and_scrape_target_agree(tmp_path: Path) -> None:
    section = README.split("## Metrics, status page and health check\n", 1)[1].split("\n## ")[0]
    toml = re.search(r"```toml\n(.*?)```", section, re.S)
    yaml = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert toml and yaml
    site = tmp_path / "site.toml"
    site.write_text(toml.group(1))
    admin = read_site_file(site).admin
    assert admin is not None
    assert f'"{admin.host}:{admin.port}"' in yaml.group(1)
    assert "/metrics" in section and "/healthz" in section
