"""STOW-RS multipart framing: pure, byte-exact, identical streamed and in memory."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodes.payload import CHUNK, BytesPayload
from nodes.stow import decode_multipart, encode_multipart
from nodes.stow.multipart import (boundary_of, content_type, multipart_length, new_boundary)
from nodes.stow.sender import PayloadSizeError, stream_body

BOUNDARY = "dicomflow-0123456789abcdef"


def test_layout_is_rfc2046():
    body = encode_multipart([b"AAA", b"BB"], BOUNDARY)
    assert body == (b"--" + BOUNDARY.encode() + b"\r\nContent-Type: application/dicom\r\n\r\nAAA"
                    b"\r\n--" + BOUNDARY.encode() + b"\r\nContent-Type: application/dicom\r\n\r\nBB"
                    b"\r\n--" + BOUNDARY.encode() + b"--\r\n")


def test_content_type_names_the_part_type_and_boundary():
    value = content_type(BOUNDARY)
    assert value.startswith("multipart/related;") and 'type="application/dicom"' in value
    assert boundary_of(value) == BOUNDARY
    assert boundary_of('multipart/related; boundary="a b"; type=x') == "a b"


def test_boundaries_are_random_and_valid():
    a, b = new_boundary(), new_boundary()
    assert a != b and len(a) <= 70
    encode_multipart([b"x"], a)


def test_empty_batch_is_refused():
    with pytest.raises(ValueError):
        encode_multipart([], BOUNDARY)
    with pytest.raises(ValueError):
        multipart_length([], BOUNDARY)


def test_bad_boundary_is_refused():
    with pytest.raises(ValueError):
        encode_multipart([b"x"], "has space")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=6))
def test_round_trip_and_exact_length(parts):
    # Payloads may contain CRLF, dashes, even "--dicomflow" fragments: only the full
    # random boundary delimits.
    body = encode_multipart(parts, BOUNDARY)
    assert len(body) == multipart_length([len(p) for p in parts], BOUNDARY)
    decoded = decode_multipart(body, BOUNDARY)
    assert [content for _, content in decoded] == parts
    assert all(h == {"content-type": "application/dicom"} for h, _ in decoded)


async def _collect(items):
    out = bytearray()
    async for chunk in stream_body(items, BOUNDARY):
        out += chunk
    return bytes(out)


async def test_streamed_body_equals_encoded_body_for_small_and_large_parts():
    parts = [b"a" * 10, bytes(range(256)) * (CHUNK // 256 * 2 + 3), b"", b"z" * 100,
             b"q" * (CHUNK - 1)]
    items = [(f"1.2.{i}", BytesPayload(p), len(p)) for i, p in enumerate(parts)]
    assert await _collect(items) == encode_multipart(parts, BOUNDARY)


@pytest.mark.parametrize("declared", [9, 11, CHUNK * 2])
async def test_a_payload_that_is_not_its_declared_size_aborts_the_body(declared):
    data = b"x" * (10 if declared < CHUNK else CHUNK * 2 + 5)
    with pytest.raises(PayloadSizeError):
        await _collect([("1.2.3", BytesPayload(data), declared)])
