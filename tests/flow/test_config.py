"""Site config: typed decoding, errors that name the file and the key."""

from pathlib import Path

import pytest

from flow import Config, ConfigError
from flow._config import check_schema, current_site, read_site_file, site_config


class Pacs(Config):
    host: str
    port: int
    called_ae_title: str = "PACS"


class Site(Config):
    data_dir: str
    pacs: Pacs


def decode(tmp_path: Path, text: str):
    path = tmp_path / "site.toml"
    path.write_text(text)
    site = read_site_file(path)
    token = current_site.set(site)
    try:
        return site_config(Site)
    finally:
        current_site.reset(token)


GOOD = 'data_dir = "var"\n[pacs]\nhost = "127.0.0.1"\nport = 11113\n'


def test_valid_file_decodes_into_typed_structs(tmp_path):
    site = decode(tmp_path, GOOD)
    assert site.pacs.port == 11113 and site.pacs.called_ae_title == "PACS"


def test_unknown_key_is_named_with_its_table(tmp_path):
    with pytest.raises(ConfigError) as info:
        decode(tmp_path, GOOD + 'caled_ae_title = "X"\n')
    assert str(info.value) == f"{tmp_path / 'site.toml'}: unknown key pacs.caled_ae_title"


def test_missing_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"site.toml: missing key pacs.port$"):
        decode(tmp_path, 'data_dir = "var"\n[pacs]\nhost = "h"\n')


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"site.toml: key pacs.port: expected int, got str"):
        decode(tmp_path, 'data_dir = "var"\n[pacs]\nhost = "h"\nport = "104"\n')


def test_egress_and_runtime_tables_are_the_runtimes_own(tmp_path):
    path = tmp_path / "site.toml"
    path.write_text(GOOD + '[egress]\nallowed_tcp = ["127.0.0.1:11113"]\n'
                    '[runtime]\nshutdown_deadline_s = 3\n')
    site = read_site_file(path)
    assert site.runtime.shutdown_deadline_s == 3
    assert not site.egress.empty
    with pytest.raises(ConfigError, match=r"unknown key egress.allowed_tpc"):
        path.write_text(GOOD + '[egress]\nallowed_tpc = []\n')
        read_site_file(path)


def test_lanes_nice_defaults_to_10_and_is_bounded(tmp_path):
    path = tmp_path / "site.toml"
    path.write_text(GOOD)
    assert read_site_file(path).runtime.lanes_nice == 10
    path.write_text(GOOD + "[runtime]\nlanes_nice = 0\n")
    assert read_site_file(path).runtime.lanes_nice == 0
    for bad in (-1, 20):
        path.write_text(GOOD + f"[runtime]\nlanes_nice = {bad}\n")
        with pytest.raises(ConfigError, match="lanes_nice must be from 0 to 19"):
            read_site_file(path)


@pytest.mark.parametrize("ingest,lanes_nice,expected", [
    (False, 5, 5), (True, 5, 0), (False, 0, 0)])
def test_only_a_lane_process_lowers_its_priority(ingest, lanes_nice, expected):
    """In a process of its own: os.nice cannot be undone without privileges."""
    import subprocess
    import sys

    code = ("import os, threading\n"
            "from flow._processes import ProcessSpec\n"
            "from flow._run import lower_priority\n"
            "before = os.nice(0)\n"
            f"lower_priority(ProcessSpec('p', ('a',), ingest={ingest}), {lanes_nice})\n"
            "seen = []\n"
            "t = threading.Thread(target=lambda: seen.append(os.nice(0))); t.start(); t.join()\n"
            "print(os.nice(0) - before, seen[0] - before)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert out == [str(expected), str(expected)]  # a thread started afterwards inherits it


def test_invalid_toml_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        decode(tmp_path, "data_dir = \n")


def test_schema_that_ignores_unknown_keys_is_refused():
    import msgspec

    class Loose(msgspec.Struct):
        x: int = 1

    with pytest.raises(TypeError, match="forbid_unknown_fields"):
        check_schema(Loose)
