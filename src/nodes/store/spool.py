"""Encrypted spool files: large objects on disk, written and read one chunk at a time.

An object above the Store's size threshold is never held whole in memory. It is streamed
into a spool file with :func:`write_spool` (sealed chunk by chunk, fsynced, renamed into
place, directory fsynced) *before* the LMDB commit that references it, and it is streamed
back to lanes through :class:`SpoolPayload`, which decrypts one chunk at a time. Both sides
block: call them in ``trio.to_thread.run_sync``.

Guarantees
----------
- A spool file path either does not exist or holds a complete file: the writer fills a
  temporary file ``.<name>.<random>.spool-tmp`` in the same directory (mode 0600), fsyncs it,
  renames it over ``path`` and fsyncs the directory. An error mid-stream removes the
  temporary file; a crash can leave one behind, which :func:`remove_stale_temps` clears.
- Memory: the writer holds at most three chunks (the one being sealed, one read ahead to know
  which chunk is last, and the sealed output); a reader holds one sealed and one plain chunk.
- Integrity: every chunk is authenticated with AES-256-GCM. Modified bytes, a truncated file
  (at a chunk boundary or not), trailing data, chunks swapped within the file, a chunk spliced
  in from another spool file (even one written for the same object with the same ``aad``),
  a header edit, the wrong ``aad`` or the wrong key all raise :class:`~.crypto.Tampered` — at
  :meth:`SpoolPayload.open` when the file's length is inconsistent, otherwise on the read that
  reaches the bad chunk. Plaintext of a chunk is returned only after its tag verified.
- Not detected here: replacing the whole file with another complete spool file sealed under
  the same key and ``aad`` (an older version of the same object, say). Put what identifies
  the content (e.g. the SHA-256 from :func:`hash_stream`) into ``aad`` or compare
  :class:`SpoolInfo` with the Store's record to rule that out.

File format (version 1)
-----------------------
All integers are big-endian. A file is a 32-byte header followed by one or more records::

    header   0   7  magic b"DFSPOOL"
             7   1  version, 1
             8   4  chunk size C: plaintext bytes in every record but the last (1..64 MiB;
                    1 MiB in production)
            12   4  key fingerprint: bytes.fromhex(AtRestKey.key_id)[:4], so a wrong key
                    is reported as such instead of as tampering
            16  16  file id: random, unique to this file
    record i        nonce (12, random per chunk) || ciphertext (C bytes, or 0..C for the last
                    record) || GCM tag (16)

Every record but the last is exactly ``C + 28`` bytes, so a record's place follows from the
file length alone (which is also what allows seeking). An empty object is one record with an
empty ciphertext. The associated data of record ``i`` is::

    header (32 bytes) || i (u64) || is_last (u8: 1 for the final record, else 0) || aad

where ``aad`` is the caller's (for example the SOPInstanceUID); it comes last and everything
before it has a fixed length, so the layout is unambiguous. The header is thereby
authenticated by every record, the index detects reordering, ``is_last`` detects truncation
at a chunk boundary, and the file id detects splicing between files.

Key handling and what a lost key means: see :mod:`nodes.store.crypto`.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, NamedTuple

from ..payload import CHUNK
from .crypto import SEAL_OVERHEAD, AtRestKey, Tampered, fsync_dir

__all__ = ["SpoolInfo", "SpoolPayload", "SpoolReader", "write_spool", "hash_stream",
           "remove_spool", "remove_stale_temps", "CHUNK", "MAX_CHUNK", "MAGIC", "VERSION",
           "HEADER_SIZE", "TEMP_SUFFIX"]

MAGIC = b"DFSPOOL"
VERSION = 1
MAX_CHUNK = 64 << 20  # bounds what a (tampered) header can make a reader allocate
TEMP_SUFFIX = ".spool-tmp"  # ".<name>.<random>.spool-tmp" while write_spool is writing
_HEADER = struct.Struct(">7sBI4s16s")
HEADER_SIZE = _HEADER.size  # 32
_CHUNK_POS = struct.Struct(">QB")


class SpoolInfo(NamedTuple):
    """What :func:`write_spool` wrote: the plaintext's size and SHA-256 (hex)."""

    size: int
    sha256: str


def _fingerprint(key: AtRestKey) -> bytes:
    return bytes.fromhex(key.key_id)[:4]


def _chunk_aad(header: bytes, index: int, last: bool, aad: bytes) -> bytes:
    return header + _CHUNK_POS.pack(index, 1 if last else 0) + aad


def _read_full(source: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes, fewer only at end of stream (raw streams may return short reads)."""
    parts: list[bytes] = []
    got = 0
    while got < n:
        data = source.read(n - got)
        if data is None:  # a non-blocking stream with nothing ready: not the end of it
            raise ValueError("write_spool needs a blocking source; read() returned None")
        if not data:
            break
        parts.append(data)
        got += len(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _write_all(fd: int, *parts: bytes) -> None:
    views = [memoryview(p) for p in parts if p]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views:
            views[0] = views[0][written:]


def write_spool(key: AtRestKey, source: BinaryIO, path: str | os.PathLike[str], aad: bytes,
                *, chunk_size: int = CHUNK) -> SpoolInfo:
    """Encrypt ``source`` (read to its end) into the spool file ``path``, durably.

    ``path``'s directory must exist. On return the file and its directory entry are on
    stable storage; an existing file at ``path`` is replaced atomically. On any error
    (including from ``source``) nothing is left behind and ``path`` is untouched. Blocking.
    ``chunk_size`` is for tests; readers take it from the file's header.
    """
    if not 1 <= chunk_size <= MAX_CHUNK:
        raise ValueError(f"chunk_size must be 1..{MAX_CHUNK}, got {chunk_size}")
    path = Path(path)
    directory = path.parent
    header = _HEADER.pack(MAGIC, VERSION, chunk_size, _fingerprint(key), os.urandom(16))
    digest = hashlib.sha256()
    size = 0
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    done = False
    try:
        try:
            _write_all(fd, header)
            chunk = _read_full(source, chunk_size)
            index = 0
            while True:
                # Read one chunk ahead: the last chunk must be sealed as last, also when the
                # object's size is an exact multiple of the chunk size.
                ahead = _read_full(source, chunk_size) if len(chunk) == chunk_size else b""
                last = not ahead
                digest.update(chunk)
                size += len(chunk)
                _write_all(fd, *key.seal_parts(chunk, _chunk_aad(header, index, last, aad)))
                if last:
                    break
                chunk, index = ahead, index + 1
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        done = True
    finally:
        if not done:
            _unlink_quietly(tmp)
    fsync_dir(directory)
    return SpoolInfo(size, digest.hexdigest())


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def remove_stale_temps(directory: str | os.PathLike[str], *,
                       min_age: float = 3600.0) -> int:
    """Remove temporary files that a crash in the middle of :func:`write_spool` left in
    ``directory`` and that are older than ``min_age`` seconds; return how many. The age
    guard keeps it safe while another process sharing the data dir is writing. Blocking."""
    now = time.time()
    removed = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            if not (entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX)
                    and entry.is_file(follow_symlinks=False)):
                continue
            try:
                if now - entry.stat(follow_symlinks=False).st_mtime < min_age:
                    continue
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            removed += 1
    if removed:
        fsync_dir(directory)
    return removed


def hash_stream(source: BinaryIO, *, chunk_size: int = CHUNK) -> tuple[int, str]:
    """``(size, sha256 hex)`` of ``source`` read to its end in chunks. Blocking."""
    digest = hashlib.sha256()
    size = 0
    while True:
        data = source.read(chunk_size)
        if not data:
            return size, digest.hexdigest()
        digest.update(data)
        size += len(data)


def remove_spool(path: str | os.PathLike[str]) -> None:
    """Unlink the spool file if present and fsync its directory (so the removal is durable
    also when an earlier attempt unlinked it and crashed before the fsync). Blocking."""
    path = Path(path)
    _unlink_quietly(os.fspath(path))
    try:
        fsync_dir(path.parent)
    except FileNotFoundError:
        pass


def remove_spools(spool_dir: Path, names: list[str]) -> None:
    """:func:`remove_spool` for each of ``names`` in ``spool_dir``. Blocking."""
    for name in names:
        remove_spool(spool_dir / name)


class SpoolPayload:
    """A spool file as a :class:`nodes.payload.Payload`: re-openable, decrypted on the fly.

    ``size`` is the plaintext size the Store recorded (:attr:`SpoolInfo.size`); a file whose
    length does not match it raises :class:`~.crypto.Tampered` at :meth:`open`.
    """

    __slots__ = ("key", "path", "aad", "_size")

    def __init__(self, key: AtRestKey, path: str | os.PathLike[str], aad: bytes,
                 size: int) -> None:
        self.key = key
        self.path = os.fspath(path)
        self.aad = bytes(aad)
        self._size = size

    def __repr__(self) -> str:
        return f"SpoolPayload({os.path.basename(self.path)!r}, size={self._size})"

    @property
    def size(self) -> int:
        return self._size

    def open(self) -> SpoolReader:
        """A fresh stream positioned at byte 0. The caller closes it. Blocking.

        Raises :class:`~.crypto.Tampered` when the file is not a spool file of this key or
        its length does not match :attr:`size`, and ``FileNotFoundError`` when it is gone.
        """
        return SpoolReader(self.key, self.path, self.aad, self._size)


class SpoolReader(io.BufferedIOBase):
    """A read-only, seekable binary stream over a spool file's plaintext.

    ``read(n)`` returns exactly ``n`` bytes unless the end is reached (like a
    ``BufferedReader``); ``read1``/``peek`` serve from the current chunk only. Seeking is
    random access (one chunk is decrypted on the next read). Reading up to the end always
    authenticates the final chunk, so a truncated file cannot read as a shorter complete one.
    ``read()`` without a size returns the whole rest: only for small objects.
    """

    def __init__(self, key: AtRestKey, path: str, aad: bytes, size: int) -> None:
        super().__init__()
        self._key = key
        self._aad = aad
        self._name = os.path.basename(path)
        self._fd = -1
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            self._layout(size)
        except BaseException:
            self.close()
            raise
        self._pos = 0
        self._index = -1  # the chunk held in self._plain
        self._plain = b""
        self._last_verified = False

    @property
    def name(self) -> str:
        return self._name

    def _fail(self, what: str) -> Tampered:
        return Tampered(f"spool file {self._name!r}: {what}")

    def _layout(self, size: int) -> None:
        file_size = os.fstat(self._fd).st_size
        header = os.pread(self._fd, HEADER_SIZE, 0)
        if len(header) < HEADER_SIZE:
            raise self._fail("shorter than its header (truncated or not a spool file)")
        magic, version, chunk_size, fingerprint, _file_id = _HEADER.unpack(header)
        if magic != MAGIC:
            raise self._fail("not a dicomflow spool file (bad magic)")
        if version != VERSION:
            raise self._fail(f"format version {version} is not supported (this build reads "
                             f"{VERSION})")
        if fingerprint != _fingerprint(self._key):
            raise self._fail(f"sealed with key {fingerprint.hex()}…, not the loaded key "
                             f"{self._key.key_id} (wrong key configured, or header modified)")
        if not 1 <= chunk_size <= MAX_CHUNK:
            raise self._fail(f"header chunk size {chunk_size} is out of range")
        record = chunk_size + SEAL_OVERHEAD
        full, rest = divmod(file_size - HEADER_SIZE, record)
        if rest == 0:
            if full == 0:
                raise self._fail("holds no chunk (truncated)")
            count, last_len = full, chunk_size
        elif rest < SEAL_OVERHEAD:
            raise self._fail("ends inside a chunk's nonce or tag (truncated or extended)")
        else:
            count, last_len = full + 1, rest - SEAL_OVERHEAD
        plain_size = (count - 1) * chunk_size + last_len
        if plain_size != size:
            raise self._fail(f"holds {plain_size} bytes, the Store recorded {size} "
                             f"(truncated, extended or replaced)")
        self._header = header
        self._chunk_size = chunk_size
        self._record = record
        self._count = count
        self._size = size

    def _load(self, index: int) -> None:
        last = index == self._count - 1
        length = (self._size - index * self._chunk_size if last else self._chunk_size)
        want = length + SEAL_OVERHEAD
        offset = HEADER_SIZE + index * self._record
        sealed = os.pread(self._fd, want, offset)
        while len(sealed) < want:  # regular files rarely read short; be correct when they do
            more = os.pread(self._fd, want - len(sealed), offset + len(sealed))
            if not more:
                raise self._fail(f"chunk {index} is cut short (file truncated while open)")
            sealed += more
        self._plain = b""
        self._index = -1
        try:
            plain = self._key.unseal(sealed, _chunk_aad(self._header, index, last, self._aad))
        except Tampered:
            pass  # re-raised below without the generic message as context
        else:
            self._plain, self._index = plain, index
            self._last_verified = self._last_verified or last
            return
        raise self._fail(f"chunk {index} of {self._count} failed authentication (modified, "
                         f"reordered, spliced from another file, truncated, or wrong aad)")

    def _available(self) -> memoryview:
        """The plaintext from the position to the end of its chunk; empty at the end."""
        if self._pos >= self._size:
            if not self._last_verified:
                self._load(self._count - 1)
            return memoryview(b"")
        index = self._pos // self._chunk_size
        if index != self._index:
            self._load(index)
        return memoryview(self._plain)[self._pos - index * self._chunk_size:]

    # io interface ---------------------------------------------------------------------------

    def readable(self) -> bool:
        self._checkClosed()
        return True

    def seekable(self) -> bool:
        self._checkClosed()
        return True

    def writable(self) -> bool:
        return False

    def tell(self) -> int:
        self._checkClosed()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._checkClosed()
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError(f"invalid whence {whence!r}")
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def read(self, size: int | None = -1) -> bytes:
        self._checkClosed()
        to_end = size is None or size < 0
        if to_end:
            size = max(self._size - self._pos, 0)
        parts = []
        while size > 0:
            view = self._available()
            if not view:
                break
            piece = view[:size]
            parts.append(bytes(piece))
            self._pos += len(piece)
            size -= len(piece)
        if to_end:
            self._available()  # authenticates the final chunk also when nothing was left to read
        return b"".join(parts)

    def read1(self, size: int = -1) -> bytes:
        self._checkClosed()
        view = self._available()
        piece = view if size is None or size < 0 else view[:size]
        self._pos += len(piece)
        return bytes(piece)

    def peek(self, size: int = 0) -> bytes:
        self._checkClosed()
        return bytes(self._available())

    def readinto(self, buffer) -> int:
        self._checkClosed()
        out = memoryview(buffer).cast("B")
        done = 0
        while done < len(out):
            view = self._available()
            if not view:
                break
            n = min(len(view), len(out) - done)
            out[done:done + n] = view[:n]
            done += n
            self._pos += n
        return done

    def readinto1(self, buffer) -> int:
        self._checkClosed()
        out = memoryview(buffer).cast("B")
        view = self._available()
        n = min(len(view), len(out))
        out[:n] = view[:n]
        self._pos += n
        return n

    def fileno(self) -> int:
        raise io.UnsupportedOperation("a spool reader has no plaintext file descriptor")

    def close(self) -> None:
        if not self.closed:
            self._plain = b""
            fd, self._fd = self._fd, -1
            try:
                if fd >= 0:
                    os.close(fd)
            finally:
                super().close()
