"""The at-rest key: sealing contract and how the key is found, generated and refused."""

from __future__ import annotations

import base64
import os
import pickle
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flow import ConfigError
from nodes.store.crypto import (KEY_FILE_NAME, SEAL_OVERHEAD, AtRestKey, KeyFileError,
                                Tampered)

MASTER = bytes(range(32))
KEY = AtRestKey(MASTER)
OTHER = AtRestKey(bytes(range(1, 33)))


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _assert_no_key_material(message: str, key: bytes) -> None:
    for form in (key.hex(), base64.b64encode(key).decode(), repr(key), repr(key)[2:-1]):
        assert form not in message


# sealing ---------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(plaintext=st.binary(max_size=4096), aad=st.binary(max_size=64))
def test_seal_unseal_round_trip(plaintext, aad):
    sealed = KEY.seal(plaintext, aad)
    assert len(sealed) == len(plaintext) + SEAL_OVERHEAD
    assert KEY.unseal(sealed, aad) == plaintext


def test_seal_uses_a_fresh_nonce_each_time():
    assert KEY.seal(b"same", b"aad") != KEY.seal(b"same", b"aad")


def test_unseal_with_wrong_aad_raises_tampered():
    sealed = KEY.seal(b"dataset bytes", b"1.2.3.4")
    with pytest.raises(Tampered):
        KEY.unseal(sealed, b"1.2.3.5")
    with pytest.raises(Tampered):
        KEY.unseal(sealed)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_unseal_flipped_bit_raises_tampered(data):
    sealed = bytearray(KEY.seal(b"x" * 40, b"aad"))
    bit = data.draw(st.integers(0, len(sealed) * 8 - 1))
    sealed[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(Tampered):
        KEY.unseal(bytes(sealed), b"aad")


def test_unseal_truncated_raises_tampered():
    sealed = KEY.seal(b"y" * 50, b"aad")
    for cut in range(len(sealed)):
        with pytest.raises(Tampered):
            KEY.unseal(sealed[:cut], b"aad")


def test_unseal_with_another_key_raises_tampered():
    with pytest.raises(Tampered):
        OTHER.unseal(KEY.seal(b"secret", b"aad"), b"aad")


def test_tampered_does_not_leak_invalid_tag():
    with pytest.raises(Tampered) as info:
        KEY.unseal(KEY.seal(b"z", b"a"), b"b")
    assert info.value.__cause__ is None
    assert info.value.__context__ is None
    assert KEY.key_id in str(info.value)


def test_key_is_not_printed_or_pickled():
    assert repr(KEY) == f"AtRestKey(key_id={KEY.key_id!r})"
    _assert_no_key_material(repr(KEY), MASTER)
    with pytest.raises(TypeError):
        pickle.dumps(KEY)


def test_key_id_is_a_short_stable_fingerprint():
    assert len(KEY.key_id) == 8
    int(KEY.key_id, 16)
    assert AtRestKey(MASTER).key_id == KEY.key_id
    assert OTHER.key_id != KEY.key_id
    assert KEY.key_id not in MASTER.hex()


# loading ---------------------------------------------------------------------------------------

def test_key_generated_0600_on_first_load_and_reread_on_second(tmp_path):
    data_dir = tmp_path / "data"
    first = AtRestKey.load(data_dir)
    key_file = data_dir / KEY_FILE_NAME
    assert _mode(data_dir) == 0o700
    assert _mode(key_file) == 0o600
    assert len(key_file.read_bytes()) == 32
    assert [p.name for p in data_dir.iterdir()] == [KEY_FILE_NAME]  # no temporary left
    second = AtRestKey.load(data_dir)
    assert second.key_id == first.key_id
    assert second.unseal(first.seal(b"survives a restart", b"a"), b"a") == b"survives a restart"


def test_generated_key_is_0600_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        AtRestKey.load(tmp_path)
    finally:
        os.umask(old)
    assert _mode(tmp_path / KEY_FILE_NAME) == 0o600


def test_key_file_in_a_configured_location(tmp_path):
    key_file = tmp_path / "secrets" / "site.key"
    generated = AtRestKey.load(tmp_path / "data", key_file=str(key_file))
    assert _mode(key_file) == 0o600
    assert not (tmp_path / "data" / KEY_FILE_NAME).exists()
    assert AtRestKey.load(tmp_path / "elsewhere", key_file=str(key_file)).key_id == generated.key_id


def test_two_processes_generating_at_once_agree_on_one_key(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parents[3] / "src")!r})
        from nodes.store.crypto import AtRestKey
        print(AtRestKey.load({str(tmp_path / "data")!r}).key_id)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    ids = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert ids == {AtRestKey.load(tmp_path / "data").key_id}


def test_raw_and_base64_key_files_are_the_same_key(tmp_path):
    raw = tmp_path / "raw.key"
    b64 = tmp_path / "b64.key"
    for path, content in ((raw, MASTER), (b64, base64.b64encode(MASTER) + b"\n")):
        path.write_bytes(content)
        path.chmod(0o600)
    assert AtRestKey.load(tmp_path, key_file=str(raw)).key_id == KEY.key_id
    assert AtRestKey.load(tmp_path, key_file=str(b64)).key_id == KEY.key_id


def test_env_var_key(tmp_path, monkeypatch):
    monkeypatch.setenv("DICOMFLOW_TEST_KEY", base64.b64encode(MASTER).decode())
    key = AtRestKey.load(tmp_path / "data", key_env="DICOMFLOW_TEST_KEY")
    assert key.key_id == KEY.key_id
    assert KEY.unseal(key.seal(b"p", b"a"), b"a") == b"p"
    assert not (tmp_path / "data").exists()  # nothing generated, nothing written


def test_env_var_wins_over_key_file(tmp_path, monkeypatch):
    AtRestKey.load(tmp_path)  # generates <data_dir>/at-rest.key with another key
    monkeypatch.setenv("DICOMFLOW_TEST_KEY", base64.b64encode(MASTER).decode())
    assert AtRestKey.load(tmp_path, key_file=str(tmp_path / KEY_FILE_NAME),
                          key_env="DICOMFLOW_TEST_KEY").key_id == KEY.key_id


def test_missing_env_var_raises_key_file_error(tmp_path, monkeypatch):
    monkeypatch.delenv("DICOMFLOW_TEST_KEY", raising=False)
    with pytest.raises(KeyFileError, match="DICOMFLOW_TEST_KEY") as info:
        AtRestKey.load(tmp_path, key_env="DICOMFLOW_TEST_KEY")
    assert "not set" in str(info.value)
    assert not (tmp_path / KEY_FILE_NAME).exists()  # no silent fallback to a generated key


@pytest.mark.parametrize("value", [
    base64.b64encode(MASTER[:31]).decode(),     # 31 bytes
    base64.b64encode(MASTER + b"!").decode(),   # 33 bytes
    MASTER.hex(),                               # hex is not base64 of 32 bytes
    "not base64 at all!",
])
def test_bad_env_var_raises_key_file_error_without_the_value(tmp_path, monkeypatch, value):
    monkeypatch.setenv("DICOMFLOW_TEST_KEY", value)
    with pytest.raises(KeyFileError, match="DICOMFLOW_TEST_KEY") as info:
        AtRestKey.load(tmp_path, key_env="DICOMFLOW_TEST_KEY")
    assert value not in str(info.value)
    _assert_no_key_material(str(info.value), MASTER)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o601])
def test_group_or_other_accessible_key_file_is_refused_with_chmod_hint(tmp_path, mode):
    key_file = tmp_path / KEY_FILE_NAME
    key_file.write_bytes(MASTER)
    key_file.chmod(mode)
    with pytest.raises(KeyFileError) as info:
        AtRestKey.load(tmp_path)
    message = str(info.value)
    assert str(key_file) in message
    assert "chmod 600" in message
    assert f"{mode:04o}" in message
    _assert_no_key_material(message, MASTER)
    assert key_file.read_bytes() == MASTER  # never "repaired" or regenerated behind the back


@pytest.mark.parametrize("content", [
    b"",
    MASTER[:31],
    MASTER + b"\n",                       # 33 raw bytes: neither raw 32 nor base64
    base64.b64encode(MASTER[:16]),        # base64 of 16 bytes
    b"\xff" * 5000,                       # a large wrong file
])
def test_bad_length_key_file_is_refused_naming_the_file_only(tmp_path, content):
    key_file = tmp_path / "bad.key"
    key_file.write_bytes(content)
    key_file.chmod(0o600)
    with pytest.raises(KeyFileError) as info:
        AtRestKey.load(tmp_path, key_file=str(key_file))
    message = str(info.value)
    assert str(key_file) in message
    assert "32" in message
    _assert_no_key_material(message, MASTER)
    if content:
        assert content.hex()[:16] not in message and repr(content)[2:18] not in message


def test_key_file_that_is_a_directory_is_refused(tmp_path):
    (tmp_path / KEY_FILE_NAME).mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match="not a regular file"):
        AtRestKey.load(tmp_path)


def test_unusable_data_dir_raises_key_file_error_naming_the_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(KeyFileError) as info:
        AtRestKey.load(blocker / "data")  # a data dir below a regular file
    assert str(blocker / "data" / KEY_FILE_NAME) in str(info.value)


def test_dangling_key_symlink_is_refused_not_replaced(tmp_path):
    (tmp_path / KEY_FILE_NAME).symlink_to(tmp_path / "mounted-secret-missing")
    with pytest.raises(KeyFileError, match="symlink") as info:
        AtRestKey.load(tmp_path)
    assert str(tmp_path / KEY_FILE_NAME) in str(info.value)
    assert (tmp_path / KEY_FILE_NAME).is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == [KEY_FILE_NAME]


def test_key_file_that_is_a_fifo_is_refused_without_hanging(tmp_path):
    os.mkfifo(tmp_path / KEY_FILE_NAME, 0o600)
    with pytest.raises(KeyFileError, match="not a regular file"):
        AtRestKey.load(tmp_path)


def test_key_file_reached_through_a_symlink_is_read(tmp_path):
    target = tmp_path / "secrets" / "key"
    target.parent.mkdir()
    target.write_bytes(MASTER)
    target.chmod(0o600)
    (tmp_path / KEY_FILE_NAME).symlink_to(target)  # e.g. a mounted secret
    assert AtRestKey.load(tmp_path).key_id == KEY.key_id


def test_key_file_error_is_a_one_line_config_error():
    # flow's CLI prints a ConfigError as one line without a traceback.
    assert issubclass(KeyFileError, ConfigError)


def test_seal_parts_is_seal_split_after_the_nonce():
    nonce, body = KEY.seal_parts(b"chunk", b"aad")
    assert len(nonce) == 12
    assert KEY.unseal(nonce + body, b"aad") == b"chunk"
