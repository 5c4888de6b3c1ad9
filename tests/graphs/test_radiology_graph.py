"""graphs/radiology.py as `flow check` sees it: the shipped site file, the optional FHIR lane
and the egress allowlist (no socket is opened)."""

from __future__ import annotations

from pathlib import Path

from support.flowproc import run_flow

ROOT = Path(__file__).resolve().parents[2]
GRAPH = ROOT / "graphs" / "radiology.py"
SHIPPED = (ROOT / "graphs" / "radiology.toml").read_text()


def check(tmp_path: Path, text: str):
    config = tmp_path / "site.toml"
    config.write_text(text.replace('data_dir = "var/dicomflow"',
                                   f'data_dir = "{tmp_path / "data"}"'))
    return run_flow(["check", str(GRAPH), "--config", str(config)])


def test_shipped_site_file_gives_the_three_named_lanes(tmp_path: Path) -> None:
    result = check(tmp_path, SHIPPED)
    assert result.returncode == 0, result.stderr
    for lane in ("pacs", "archive", "ris"):
        assert f"lane {lane}:" in result.stdout
    assert "lane fhir:" not in result.stdout
    assert "archive_coercion  [Transform]" in result.stdout


def test_a_fhir_table_adds_the_fhir_lane_when_its_url_is_allowed(tmp_path: Path) -> None:
    text = SHIPPED.replace("[egress]", '[fhir]\nurl = "http://127.0.0.1:8080/fhir"\n\n[egress]')
    refused = check(tmp_path, text)
    assert refused.returncode != 0
    assert "http://127.0.0.1:8080/fhir" in refused.stderr
    allowed = text.replace('allowed_http = [\n',
                           'allowed_http = [\n    "http://127.0.0.1:8080/fhir",\n')
    result = check(tmp_path, allowed)
    assert result.returncode == 0, result.stderr
    assert "lane fhir:" in result.stdout
    assert "-> http://127.0.0.1:8080/fhir  allowed" in result.stdout


def test_a_misspelled_key_is_named_with_its_file(tmp_path: Path) -> None:
    result = check(tmp_path, SHIPPED.replace("called_ae_title", "caled_ae_title"))
    assert result.returncode == 1
    assert "site.toml" in result.stderr and "pacs.caled_ae_title" in result.stderr
