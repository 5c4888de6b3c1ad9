"""A stored object's bytes, as a sender reads them: small ones in memory, large ones streamed.

Every payload is a complete DICOM Part 10 file (preamble, file meta, dataset) exactly as it
was received. Senders must not assume it fits in memory: read it with :meth:`Payload.open`
in chunks (blocking reads belong in ``trio.to_thread.run_sync``). The Store provides payloads
that decrypt its spool files on the fly; :class:`BytesPayload` and :class:`FilePayload` are
the plain forms used by tests and by objects that are not at rest; :class:`SplicedPayload`
is new bytes followed by the rest of another payload (a rewritten header before the stored
pixel data, a file meta before a spooled data set).
"""

from __future__ import annotations

import io
import os
from typing import BinaryIO, Protocol, runtime_checkable

CHUNK = 1 << 20  # 1 MiB: large enough to amortise syscalls, small enough to stream 300 MB objects


@runtime_checkable
class Payload(Protocol):
    """Readable, re-openable Part 10 bytes of known size."""

    @property
    def size(self) -> int: ...

    def open(self) -> BinaryIO:
        """A fresh binary stream positioned at byte 0. The caller closes it. Blocking."""
        ...


class BytesPayload:
    """A payload held in memory."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    @property
    def size(self) -> int:
        return len(self.data)

    def open(self) -> BinaryIO:
        return io.BytesIO(self.data)


class FilePayload:
    """A payload read from a plain file on disk."""

    __slots__ = ("path",)

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)

    @property
    def size(self) -> int:
        return os.path.getsize(self.path)

    def open(self) -> BinaryIO:
        return open(self.path, "rb")


class SplicedPayload:
    """``head`` followed by ``source``'s bytes from ``offset`` on, streamed: a rewritten
    header before the untouched remainder (pixel data) of the stored object, or a file meta
    before a spooled data set."""

    __slots__ = ("head", "source", "offset")

    def __init__(self, head: bytes, source: Payload, offset: int) -> None:
        self.head, self.source, self.offset = head, source, offset

    @property
    def size(self) -> int:
        return len(self.head) + self.source.size - self.offset

    def open(self) -> BinaryIO:
        tail = self.source.open()
        tail.seek(self.offset)
        return io.BufferedReader(_Concat(io.BytesIO(self.head), tail))


class _Concat(io.RawIOBase):
    def __init__(self, first: BinaryIO, second: BinaryIO) -> None:
        self.parts = [first, second]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        while self.parts:
            n = self.parts[0].readinto(buffer)  # type: ignore[attr-defined]
            if n:
                return n
            self.parts.pop(0).close()
        return 0

    def close(self) -> None:
        for part in self.parts:
            part.close()
        self.parts = []
        super().close()


def read_all(payload: Payload) -> bytes:
    """The whole payload in memory: only for objects known to be small (headers, SRs)."""
    with payload.open() as f:
        return f.read()
