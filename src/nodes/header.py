"""Reading and rewriting a stored object's header without touching its pixel data.

Pure functions over byte streams (blocking: call them in ``trio.to_thread.run_sync``).
Pixel data is never decoded and, for every transfer syntax but deflate, never even read into
memory: a rewritten object is the new header followed by the original bytes from the Pixel
Data element on, spliced on the fly by :class:`SplicedPayload`.
"""

from __future__ import annotations

import io
from typing import BinaryIO

from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian

from .payload import BytesPayload, Payload, read_all


def read_header(payload: Payload) -> Dataset:
    """The object's file meta and data set up to (not including) Pixel Data."""
    with payload.open() as f:
        return dcmread(f, stop_before_pixels=True)


def _header_and_offset(f: BinaryIO) -> tuple[Dataset, int]:
    ds = dcmread(f, stop_before_pixels=True)
    # pydicom rewinds to the start of the element that stopped the read (Pixel Data or a
    # later tag), so everything from here on is copied verbatim.
    return ds, f.tell()


def _encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


class SplicedPayload:
    """``head`` followed by ``source``'s bytes from ``offset`` on: a header rewrite that
    streams the untouched remainder (pixel data) from the stored object."""

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


def header_for_edit(payload: Payload) -> tuple[Dataset, int | None]:
    """(header, offset of the untouched remainder). For a deflated data set the remainder
    cannot be spliced: the whole object is read (offset None) and re-encoded by
    :func:`rewrite`."""
    with payload.open() as f:
        ds, offset = _header_and_offset(f)
    if ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian:
        return dcmread(io.BytesIO(read_all(payload))), None
    return ds, offset


def rewrite(payload: Payload, ds: Dataset, offset: int | None) -> Payload:
    """The edited object: header ``ds`` followed by ``payload``'s bytes from ``offset`` on
    (both from :func:`header_for_edit`), or wholly re-encoded when ``offset`` is None."""
    if offset is None:
        return BytesPayload(_encode(ds))
    return SplicedPayload(_encode(ds), payload, offset)
