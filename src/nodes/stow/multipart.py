"""multipart/related framing for STOW-RS requests (PS3.18 §8.6.1.2, RFC 2046 §5.1). Pure.

A request body is, for each instance, a delimiter line, the part's headers, a blank line
and the Part 10 bytes exactly as stored; then the close delimiter::

    --B CRLF Content-Type: application/dicom CRLF CRLF <bytes> CRLF
    --B CRLF ... CRLF
    --B-- CRLF

The framing is computed separately from the bytes so the sender can stream large instances
and still announce an exact ``Content-Length`` (no chunked encoding: some archives' HTTP
servers handle it poorly). The boundary is 128 random bits; a payload containing
``CRLF--<boundary>`` by chance is not a practical concern (2**-128 per position), so the
payload bytes are not scanned.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Sequence

PART_MEDIA_TYPE = "application/dicom"

_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,./:=?-]{1,70}")  # RFC 2046 bchars, no space


def new_boundary() -> str:
    return "dicomflow-" + secrets.token_hex(16)


def content_type(boundary: str) -> str:
    """The request's Content-Type header value."""
    return f'multipart/related; type="{PART_MEDIA_TYPE}"; boundary={boundary}'


def part_head(boundary: str, *, first: bool) -> bytes:
    """Bytes before a part's content: (CRLF unless first) delimiter, headers, blank line."""
    lead = b"" if first else b"\r\n"
    return lead + b"--" + boundary.encode("ascii") + \
        b"\r\nContent-Type: " + PART_MEDIA_TYPE.encode("ascii") + b"\r\n\r\n"


def closing(boundary: str) -> bytes:
    """Bytes after the last part's content."""
    return b"\r\n--" + boundary.encode("ascii") + b"--\r\n"


def multipart_length(sizes: Sequence[int], boundary: str) -> int:
    """Exact body length for parts of these sizes (at least one part)."""
    if not sizes:
        raise ValueError("a multipart body needs at least one part")
    heads = len(part_head(boundary, first=True)) + \
        (len(sizes) - 1) * len(part_head(boundary, first=False))
    return heads + sum(sizes) + len(closing(boundary))


def check_boundary(boundary: str) -> None:
    if not _BOUNDARY.fullmatch(boundary):
        raise ValueError("boundary must be 1-70 RFC 2046 characters without spaces")


def encode_multipart(parts: Iterable[bytes], boundary: str) -> bytes:
    """The whole body in memory (tests, small batches). Same bytes as the streamed form."""
    check_boundary(boundary)
    out = bytearray()
    for i, data in enumerate(parts):
        out += part_head(boundary, first=i == 0)
        out += data
    if not out:
        raise ValueError("a multipart body needs at least one part")
    out += closing(boundary)
    return bytes(out)


def boundary_of(content_type_value: str) -> str | None:
    """The boundary parameter of a Content-Type header value, or None."""
    m = re.search(r'(?i)(?:^|;)\s*boundary\s*=\s*(?:"([^"]+)"|([^;\s]+))', content_type_value)
    return (m.group(1) or m.group(2)) if m else None


def decode_multipart(body: bytes, boundary: str) -> list[tuple[dict[str, str], bytes]]:
    """Split a multipart body into ``(headers, content)`` parts (tests and test servers).

    Raises ValueError when the body is not framed with ``boundary``.
    """
    delimiter = b"--" + boundary.encode("ascii")
    if not body.startswith(delimiter):
        # a preamble is allowed before the first delimiter
        start = body.find(b"\r\n" + delimiter)
        if start < 0:
            raise ValueError("no opening delimiter")
        body = body[start + 2:]
    sections = body.split(b"\r\n" + delimiter)
    first = sections[0]
    if not first.startswith(delimiter):
        raise ValueError("no opening delimiter")
    sections[0] = first[len(delimiter):]
    if not sections[-1].startswith(b"--"):
        raise ValueError("no close delimiter")
    parts: list[tuple[dict[str, str], bytes]] = []
    for section in sections[:-1]:
        line_end = section.find(b"\r\n")
        if line_end < 0 or section[:line_end].strip(b" \t"):
            raise ValueError("malformed delimiter line")
        rest = section[line_end + 2:]
        if rest.startswith(b"\r\n"):  # a part without headers
            head, content = b"", rest[2:]
        else:
            head, sep, content = rest.partition(b"\r\n\r\n")
            if not sep:
                raise ValueError("part without a blank line after its headers")
        headers: dict[str, str] = {}
        for line in head.split(b"\r\n") if head else ():
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon:
                raise ValueError("malformed part header")
            headers[name.strip().lower()] = value.strip()
        parts.append((headers, content))
    return parts
