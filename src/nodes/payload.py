"""A stored object's bytes, as a sender reads them: small ones in memory, large ones streamed.

Every payload is a complete DICOM Part 10 file (preamble, file meta, dataset) exactly as it
was received. Senders must not assume it fits in memory: read it with :meth:`Payload.open`
in chunks (blocking reads belong in ``trio.to_thread.run_sync``). The Store provides payloads
that decrypt its spool files on the fly; :class:`BytesPayload` and :class:`FilePayload` are
the plain forms used by tests and by objects that are not at rest.
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


def read_all(payload: Payload) -> bytes:
    """The whole payload in memory: only for objects known to be small (headers, SRs)."""
    with payload.open() as f:
        return f.read()
