"""Encrypted spool files: round trips, stream semantics, tamper detection, durability, memory."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodes.payload import CHUNK, Payload, read_all
from nodes.store.crypto import SEAL_OVERHEAD, AtRestKey, Tampered
from nodes.store.spool import (HEADER_SIZE, TEMP_SUFFIX, SpoolInfo, SpoolPayload, hash_stream,
                               remove_spool, remove_stale_temps, write_spool)
from support.synth import CANARY, CANARY_ID, CANARY_PARTS, ct, to_part10

KEY = AtRestKey(bytes(range(32)))
AAD = b"1.2.826.0.1.3680043.8.498.1"
SMALL = 16  # a small chunk size makes every chunk-boundary case cheap


def _spool(tmp_path: Path, data: bytes, *, aad: bytes = AAD, chunk_size: int = SMALL,
           name: str = "obj.spool") -> tuple[Path, SpoolInfo]:
    path = tmp_path / name
    return path, write_spool(KEY, io.BytesIO(data), path, aad, chunk_size=chunk_size)


def _read_back(path: Path, size: int, *, aad: bytes = AAD, key: AtRestKey = KEY) -> bytes:
    return read_all(SpoolPayload(key, path, aad, size))


def _record(index: int, chunk_size: int = SMALL) -> slice:
    start = HEADER_SIZE + index * (chunk_size + SEAL_OVERHEAD)
    return slice(start, start + chunk_size + SEAL_OVERHEAD)


class ShortReads(io.RawIOBase):
    """A source whose reads return at most ``step`` bytes, like a socket or a pipe."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._step = step

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self._step, len(self._data) - self._pos)
        buffer[:n] = self._data[self._pos:self._pos + n]
        self._pos += n
        return n


class FailsAfter(io.RawIOBase):
    """A source that breaks mid-stream, like a dropped association."""

    def __init__(self, good: int) -> None:
        self._left = good

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._left <= 0:
            raise ConnectionResetError("peer went away")
        n = min(len(buffer), self._left)
        buffer[:n] = b"\x5a" * n
        self._left -= n
        return n


# round trips -------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 12345])
def test_spool_round_trip_at_chunk_boundaries(tmp_path, size):
    data = os.urandom(size)
    path, info = _spool(tmp_path, data, chunk_size=CHUNK)
    assert info == SpoolInfo(size, hashlib.sha256(data).hexdigest())
    records = max(1, -(-size // CHUNK))
    assert path.stat().st_size == HEADER_SIZE + size + records * SEAL_OVERHEAD
    assert _read_back(path, size) == data


@settings(max_examples=80, deadline=None)
@given(data=st.binary(max_size=300), chunk_size=st.integers(1, 40), step=st.integers(1, 50))
def test_spool_round_trip_property(tmp_path_factory, data, chunk_size, step):
    path = tmp_path_factory.mktemp("spool") / "obj.spool"
    info = write_spool(KEY, ShortReads(data, step), path, AAD, chunk_size=chunk_size)
    assert info == SpoolInfo(len(data), hashlib.sha256(data).hexdigest())
    assert _read_back(path, len(data)) == data


def test_spool_file_is_private_and_nothing_else_is_left(tmp_path):
    path, _ = _spool(tmp_path, b"x" * 100)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["obj.spool"]


def test_write_spool_replaces_an_existing_file(tmp_path):
    path, _ = _spool(tmp_path, b"old" * 50)
    path2, info = _spool(tmp_path, b"new" * 7)
    assert path2 == path
    assert _read_back(path, info.size) == b"new" * 7
    assert [p.name for p in tmp_path.iterdir()] == ["obj.spool"]


@pytest.mark.parametrize("good", [0, 5, SMALL, 3 * SMALL + 1])
def test_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path, good):
    path, info = _spool(tmp_path, b"kept" * 20)
    with pytest.raises(ConnectionResetError):
        write_spool(KEY, FailsAfter(good), path, AAD, chunk_size=SMALL)
    assert [p.name for p in tmp_path.iterdir()] == ["obj.spool"]
    assert _read_back(path, info.size) == b"kept" * 20
    with pytest.raises(ConnectionResetError):
        write_spool(KEY, FailsAfter(good), tmp_path / "new.spool", AAD, chunk_size=SMALL)
    assert [p.name for p in tmp_path.iterdir()] == ["obj.spool"]


class NonBlocking(io.RawIOBase):
    def readable(self) -> bool:
        return True

    def readinto(self, buffer):
        return None  # "nothing ready yet", which must not be taken for the end


def test_non_blocking_source_is_refused_not_truncated(tmp_path):
    with pytest.raises(ValueError, match="blocking"):
        write_spool(KEY, NonBlocking(), tmp_path / "a", AAD)
    assert list(tmp_path.iterdir()) == []


def test_stale_temps_from_a_crash_are_removed_and_fresh_ones_kept(tmp_path):
    path, info = _spool(tmp_path, b"keep me")
    stale = tmp_path / f".obj2.spool.abc123{TEMP_SUFFIX}"
    fresh = tmp_path / f".obj3.spool.def456{TEMP_SUFFIX}"
    other = tmp_path / ".at-rest.key.1.ab.tmp"  # not a spool temp: never touched
    for p in (stale, fresh, other):
        p.write_bytes(b"partial")
    os.utime(stale, (1, 1))
    os.utime(other, (1, 1))
    assert remove_stale_temps(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [path.name, fresh.name, other.name])
    assert remove_stale_temps(tmp_path, min_age=0) == 1
    assert not fresh.exists() and other.exists()
    assert _read_back(path, info.size) == b"keep me"


def test_write_spool_rejects_silly_chunk_sizes(tmp_path):
    for chunk_size in (0, -1, (64 << 20) + 1):
        with pytest.raises(ValueError):
            write_spool(KEY, io.BytesIO(b"x"), tmp_path / "a", AAD, chunk_size=chunk_size)


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=3000), chunk=st.integers(1, 700))
def test_hash_stream_is_size_and_sha256(data, chunk):
    assert hash_stream(ShortReads(data, 97), chunk_size=chunk) == (
        len(data), hashlib.sha256(data).hexdigest())
    assert hash_stream(io.BytesIO(data)) == (len(data), hashlib.sha256(data).hexdigest())


# the stream a sender reads ----------------------------------------------------------------------

def test_spool_payload_is_a_payload_and_reopens_fresh(tmp_path):
    data = bytes(range(256)) * 3
    path, info = _spool(tmp_path, data)
    payload = SpoolPayload(KEY, path, AAD, info.size)
    assert isinstance(payload, Payload)
    assert payload.size == len(data)
    with payload.open() as a, payload.open() as b:
        assert a.read(10) == data[:10]
        assert b.read(5) == data[:5]
        assert a.read(10) == data[10:20]
    assert a.closed and b.closed


_OPS = st.lists(st.one_of(
    st.tuples(st.just("read"), st.integers(-1, 60)),
    st.tuples(st.just("read1"), st.integers(-1, 60)),
    st.tuples(st.just("readinto"), st.integers(0, 60)),
    st.tuples(st.just("readinto1"), st.integers(0, 60)),
    st.tuples(st.just("seek"), st.integers(0, 260)),
    st.tuples(st.just("seek_cur"), st.integers(-30, 30)),
    st.tuples(st.just("seek_end"), st.integers(-260, 5)),
    st.tuples(st.just("peek"), st.just(0)),
), max_size=25)


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=220), chunk_size=st.integers(1, 33), ops=_OPS)
def test_reader_behaves_like_bytesio(tmp_path_factory, data, chunk_size, ops):
    path = tmp_path_factory.mktemp("spool") / "obj.spool"
    write_spool(KEY, io.BytesIO(data), path, AAD, chunk_size=chunk_size)
    model = io.BytesIO(data)
    with SpoolPayload(KEY, path, AAD, len(data)).open() as f:
        assert f.readable() and f.seekable() and not f.writable()
        for op, arg in ops:
            if op == "read":
                assert f.read(arg) == model.read(arg)
            elif op in ("read1", "peek"):
                got = f.read1(arg) if op == "read1" else f.peek()
                expect = model.read(len(data))
                assert expect.startswith(got)
                assert got or not expect or arg == 0  # progress unless at the end
                model.seek(-len(expect) + (len(got) if op == "read1" else 0), io.SEEK_CUR)
            elif op in ("readinto", "readinto1"):
                buf = bytearray(arg)
                n = getattr(f, op)(buf)
                expect = model.read(arg)
                if op == "readinto":
                    assert bytes(buf[:n]) == expect
                else:
                    assert expect.startswith(bytes(buf[:n])) and (n or not expect or arg == 0)
                    model.seek(n - len(expect), io.SEEK_CUR)
            else:
                whence = {"seek": io.SEEK_SET, "seek_cur": io.SEEK_CUR, "seek_end": io.SEEK_END}[op]
                target = {io.SEEK_SET: arg, io.SEEK_CUR: model.tell() + arg,
                          io.SEEK_END: len(data) + arg}[whence]
                if target < 0:
                    with pytest.raises(ValueError):
                        f.seek(arg, whence)
                    continue
                assert f.seek(arg, whence) == model.seek(arg, whence)
            assert f.tell() == model.tell()


def test_read_returns_exactly_n_until_the_end(tmp_path):
    data = os.urandom(10 * SMALL + 3)
    path, info = _spool(tmp_path, data)
    with SpoolPayload(KEY, path, AAD, info.size).open() as f:
        sizes = [len(f.read(SMALL + 5)) for _ in range(8)]
    assert sizes == [SMALL + 5] * 7 + [len(data) - 7 * (SMALL + 5)]


def test_reader_works_with_readline_and_buffered_consumers(tmp_path):
    data = b"".join(b"line %d\n" % i for i in range(50))
    path, info = _spool(tmp_path, data)
    with SpoolPayload(KEY, path, AAD, info.size).open() as f:
        assert f.readlines() == data.splitlines(keepends=True)
    with io.BufferedReader(SpoolPayload(KEY, path, AAD, info.size).open(), 7) as f:
        assert f.read() == data


def test_closed_reader_refuses_reads(tmp_path):
    path, info = _spool(tmp_path, b"abc")
    f = SpoolPayload(KEY, path, AAD, info.size).open()
    f.close()
    f.close()
    with pytest.raises(ValueError):
        f.read(1)
    with pytest.raises(io.UnsupportedOperation):
        SpoolPayload(KEY, path, AAD, info.size).open().fileno()


# tampering --------------------------------------------------------------------------------------

DATA = bytes(range(7 * SMALL + 4))  # 8 records: 7 full, the last with 4 bytes


def _assert_tampered(path: Path, size: int, *, aad: bytes = AAD, key: AtRestKey = KEY) -> str:
    with pytest.raises(Tampered) as info:
        _read_back(path, size, aad=aad, key=key)
    assert info.value.__cause__ is None
    return str(info.value)


@pytest.mark.parametrize("records_kept", [0, 1, 7])
def test_truncated_at_a_chunk_boundary_is_tampered(tmp_path, records_kept):
    path, info = _spool(tmp_path, DATA)
    cut = _record(records_kept).start
    path.write_bytes(path.read_bytes()[:cut])
    _assert_tampered(path, info.size)  # against the size the Store recorded
    if records_kept:
        # even with a matching size on record, the new last chunk was not sealed as last
        message = _assert_tampered(path, records_kept * SMALL)
        assert f"chunk {records_kept - 1}" in message


@pytest.mark.parametrize("cut", [1, HEADER_SIZE - 1, HEADER_SIZE + 5, HEADER_SIZE + 40, -1, -17])
def test_truncated_mid_file_is_tampered(tmp_path, cut):
    path, info = _spool(tmp_path, DATA)
    raw = path.read_bytes()
    path.write_bytes(raw[:cut])
    kept = len(raw[:cut]) - HEADER_SIZE
    _assert_tampered(path, info.size)
    for size in range(max(0, kept - 2 * SEAL_OVERHEAD), max(0, kept) + 1):
        _assert_tampered(path, size)


def test_trailing_data_is_tampered(tmp_path):
    path, info = _spool(tmp_path, DATA)
    with open(path, "ab") as f:
        f.write(KEY.seal(b"more", b""))
    _assert_tampered(path, info.size)
    _assert_tampered(path, info.size + 4)


def test_swapped_chunks_are_tampered(tmp_path):
    path, info = _spool(tmp_path, DATA)
    raw = bytearray(path.read_bytes())
    raw[_record(1)], raw[_record(2)] = raw[_record(2)], raw[_record(1)]
    path.write_bytes(raw)
    with SpoolPayload(KEY, path, AAD, info.size).open() as f:
        assert f.read(SMALL) == DATA[:SMALL]  # chunks before the damage still read
        with pytest.raises(Tampered, match="chunk 1"):
            f.read(SMALL)


def test_chunk_spliced_from_another_file_of_the_same_object_is_tampered(tmp_path):
    # Two versions of the same object (same aad, same chunk positions): a chunk of one
    # must not verify inside the other.
    path, info = _spool(tmp_path, DATA, name="v1.spool")
    other, _ = _spool(tmp_path, bytes(reversed(DATA)), name="v2.spool")
    raw = bytearray(path.read_bytes())
    raw[_record(3)] = other.read_bytes()[_record(3)]
    path.write_bytes(raw)
    with pytest.raises(Tampered, match="chunk 3"):
        _read_back(path, info.size)


def test_wrong_aad_is_tampered_and_not_echoed(tmp_path):
    path, info = _spool(tmp_path, DATA)
    message = _assert_tampered(path, info.size, aad=AAD + b"9")
    assert AAD.decode() not in message


def test_wrong_key_is_reported_as_such(tmp_path):
    path, info = _spool(tmp_path, DATA)
    other = AtRestKey(bytes(32))
    message = _assert_tampered(path, info.size, key=other)
    assert other.key_id in message and "wrong key" in message


def test_not_a_spool_file_is_tampered(tmp_path):
    path = tmp_path / "plain.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 100)
    assert "magic" in _assert_tampered(path, 232)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_flipped_bit_is_tampered(tmp_path_factory, data):
    payload = data.draw(st.binary(max_size=80), label="payload")
    path = tmp_path_factory.mktemp("spool") / "obj.spool"
    write_spool(KEY, io.BytesIO(payload), path, AAD, chunk_size=SMALL)
    raw = bytearray(path.read_bytes())
    bit = data.draw(st.integers(0, len(raw) * 8 - 1), label="bit")
    raw[bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(raw)
    _assert_tampered(path, len(payload))


def test_tampered_last_chunk_is_caught_even_when_seeking_to_the_end(tmp_path):
    for data in (b"", DATA):
        path, info = _spool(tmp_path, data)
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 0x01
        path.write_bytes(raw)
        with SpoolPayload(KEY, path, AAD, info.size).open() as f:
            f.seek(0, io.SEEK_END)
            with pytest.raises(Tampered):
                f.read()


# PHI and removal --------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_size", [SMALL, CHUNK])
def test_phi_canary_is_not_in_the_spool_file(tmp_path, chunk_size):
    part10 = to_part10(ct(rows=256, cols=256))
    assert CANARY.encode() in part10
    path, info = _spool(tmp_path, part10, chunk_size=chunk_size)
    raw = path.read_bytes()
    for needle in (CANARY, CANARY_ID, *CANARY_PARTS):
        assert needle.encode() not in raw
        assert needle.encode("utf-16-le") not in raw
    assert b"DICM" not in raw
    assert _read_back(path, info.size) == part10


def test_missing_spool_file_is_not_reported_as_tampering(tmp_path):
    with pytest.raises(FileNotFoundError):
        SpoolPayload(KEY, tmp_path / "gone.spool", AAD, 10).open()


def test_remove_spool_is_idempotent(tmp_path):
    path, _ = _spool(tmp_path, b"bye")
    remove_spool(path)
    assert not path.exists()
    remove_spool(path)
    remove_spool(tmp_path / "no-such-dir" / "obj.spool")
    assert list(tmp_path.iterdir()) == []


# memory -----------------------------------------------------------------------------------------

_BIG = textwrap.dedent("""
    import hashlib, io, json, os, sys, time
    sys.path.insert(0, sys.argv[1])
    from nodes.store.crypto import AtRestKey
    from nodes.store.spool import SpoolPayload, write_spool

    TOTAL = int(sys.argv[3])
    MiB = 1 << 20

    class Lazy(io.RawIOBase):
        # Generates TOTAL bytes on demand, in reads of odd sizes, hashing what it hands out.
        def __init__(self):
            self.block = os.urandom(MiB + 4093)
            self.left = TOTAL
            self.digest = hashlib.sha256()
        def readable(self):
            return True
        def readinto(self, buffer):
            n = min(len(buffer), self.left, 300_007)
            start = self.left % 4093
            buffer[:n] = self.block[start:start + n]
            self.digest.update(memoryview(buffer)[:n])
            self.left -= n
            return n

    def peak_mb():
        # VmHWM, this image's own peak RSS: ru_maxrss also carries the peak of the image exec
        # replaced, which for a vfork()ed child is the parent's (pytest, large mid-suite).
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024

    def reset_peak():
        # VmHWM is a high-water mark that the imports set; Linux (>= 4.0) resets it to
        # the current RSS on "5" > /proc/self/clear_refs, so the stream's own peak is measured.
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    key = AtRestKey(os.urandom(32))
    path = sys.argv[2]
    source = Lazy()
    reset = reset_peak()
    base = peak_mb()
    t0 = time.perf_counter()
    info = write_spool(key, source, path, b"1.2.3.4")
    t1 = time.perf_counter()
    after_write = peak_mb()
    digest = hashlib.sha256()
    got = 0
    with SpoolPayload(key, path, b"1.2.3.4", info.size).open() as f:
        while True:
            data = f.read(MiB)
            if not data:
                break
            got += len(data)
            digest.update(data)
    t2 = time.perf_counter()
    os.unlink(path)
    print(json.dumps({
        "size": info.size, "read": got, "ok": digest.hexdigest() == info.sha256 ==
        source.digest.hexdigest(), "base_mb": base, "growth_write_mb": after_write - base,
        "growth_mb": peak_mb() - base, "peak_reset": reset, "write_mb_s": TOTAL / MiB / (t1 - t0),
        "read_mb_s": TOTAL / MiB / (t2 - t1)}))
""")


def test_300_mb_stream_through_spool_in_bounded_memory(tmp_path):
    total = 300 * (1 << 20) + 12345
    src = Path(__file__).parents[3] / "src"
    path = tmp_path / "big.spool"
    try:
        proc = subprocess.run([sys.executable, "-c", _BIG, str(src), str(path), str(total)],
                              capture_output=True, text=True, timeout=300)
    finally:
        path.unlink(missing_ok=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    print("spool 300 MB:", result)  # MB/s are reported, never asserted
    assert result["size"] == result["read"] == total
    assert result["ok"]
    assert result["growth_mb"] < 50, result
