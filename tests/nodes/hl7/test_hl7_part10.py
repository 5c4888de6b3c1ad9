"""The HL7 lane reads a Part 10 header itself (nodes.dicom.header): the dataset it hands a
Handler must be the one pydicom's dcmread(stop_before_pixels=True) gives — raw elements,
file meta, encodings — and anything it does not read must go to dcmread, whose answer
(or error) it then is."""

from __future__ import annotations

import io
import os
import sys

import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
                         ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless)

from nodes.arrival import Envelope
from nodes.delivery import Recorder
from nodes.dicom.header import dcmread_header
from nodes.hl7 import SRReportHandler, node
from nodes.hl7.fields import items
from nodes.dicom.header import STASH, TruncatedObject, _Fallback, _Reader, read_header
from nodes.payload import BytesPayload, FilePayload
from support.synth import CANARY_ID, CANARY_PARTS, ct, to_part10

sys.path.insert(0, os.path.dirname(__file__))  # the helpers next to this file
import hl7_samples as samples  # noqa: E402
from test_hl7_rawitems import FIXED, pydicom_converted, undefined_lengths  # noqa: E402

SYNTAXES = {"explicit_le": ExplicitVRLittleEndian, "implicit_le": ImplicitVRLittleEndian}


def ours_without_fallback(data: bytes) -> FileDataset:
    """The reader's own dataset (raises _Fallback where read_header would ask dcmread)."""
    return _Reader(io.BytesIO(data)).dataset()


def assert_same_dataset(ours: FileDataset, theirs: FileDataset) -> None:
    assert type(ours) is type(theirs) is FileDataset
    assert ours._dict == theirs._dict  # RawDataElement tuples: tag, VR, length, bytes, tell
    assert ours.file_meta._dict == theirs.file_meta._dict
    assert ours.preamble == theirs.preamble
    assert (ours._read_implicit, ours._read_little, ours.original_character_set) == (
        theirs._read_implicit, theirs._read_little, theirs.original_character_set)
    assert (ours.filename, ours.fileobj_type) == (theirs.filename, theirs.fileobj_type)
    converted = []
    for ds in (ours, theirs):
        try:
            converted.append(pydicom_converted(ds))
        except Exception as exc:  # noqa: BLE001 - bytes cut short convert to an error
            converted.append(type(exc))
    assert converted[0] == converted[1]


@pytest.mark.parametrize("nested_undefined", [False, True], ids=["defined", "nested_undefined"])
@pytest.mark.parametrize("syntax", sorted(SYNTAXES))
@pytest.mark.parametrize("kind", sorted(samples.REPORTS))
def test_header_is_the_dataset_dcmread_gives(kind, syntax, nested_undefined):
    ds = samples.REPORTS[kind]()
    if nested_undefined:
        undefined_lengths(ds, below=1)
    data = to_part10(ds, SYNTAXES[syntax])
    ours = ours_without_fallback(data)  # read here, not handed to dcmread
    assert all(type(e) is RawDataElement for e in ours._dict.values() if e.tag != 0x00080005)
    assert_same_dataset(ours, dcmread_header(BytesPayload(data)))
    assert_same_dataset(read_header(BytesPayload(data)), dcmread_header(BytesPayload(data)))


@pytest.mark.parametrize("syntax", sorted(SYNTAXES))
@pytest.mark.parametrize("kind", sorted(samples.REPORTS))
def test_undefined_length_top_level_sequences_stay_raw_and_convert_as_dcmread_reads_them(
        kind, syntax):
    ds = undefined_lengths(samples.REPORTS[kind]())
    payload = BytesPayload(to_part10(ds, SYNTAXES[syntax]))
    ours, theirs = ours_without_fallback(payload.open().read()), dcmread_header(payload)
    content = ours._dict[0x0040A730]
    assert type(content) is RawDataElement and content.length == 0xFFFFFFFF
    # fields.items() takes the items read with the header (same objects each time)
    assert items(ours, "ContentSequence") is vars(ours)[STASH][0x0040A730][2]
    assert ours[0x0040A730].is_undefined_length  # pydicom's conversion of the raw bytes
    assert pydicom_converted(ours) == pydicom_converted(theirs)
    handler = SRReportHandler(samples.RIS, **FIXED)
    assert handler.handle(ours).encode() == handler.handle(theirs).encode()


def test_a_sequence_replaced_by_the_handler_is_not_read_from_the_stash():
    payload = BytesPayload(to_part10(undefined_lengths(samples.fifty_items())))
    ds = read_header(payload)
    ds.ContentSequence = [samples.text(samples.code("121071", "DCM", "Finding"), "new")]
    assert [i.TextValue for i in items(ds, "ContentSequence")] == ["new"]


def test_header_stops_before_pixel_data_and_keeps_the_file_name(tmp_path):
    path = tmp_path / "ct.dcm"
    path.write_bytes(to_part10(ct()))
    ours, theirs = read_header(FilePayload(path)), dcmread_header(FilePayload(path))
    assert 0x7FE00010 not in ours and ours.filename == str(path)
    assert_same_dataset(ours, theirs)
    assert ours.timestamp == theirs.timestamp


def deflated(ds: Dataset) -> bytes:
    return to_part10(ds, DeflatedExplicitVRLittleEndian)


@pytest.mark.parametrize("make", [
    lambda: to_part10(samples.basic_text(), ExplicitVRBigEndian),
    lambda: deflated(samples.basic_text()),
], ids=["big_endian", "deflated"])
def test_what_the_reader_does_not_read_is_read_by_dcmread(make):
    data = make()
    with pytest.raises(_Fallback):
        ours_without_fallback(data)
    payload = BytesPayload(data)
    assert_same_dataset(read_header(payload), dcmread_header(payload))


def outcome(reader, data: bytes):
    try:
        return reader(BytesPayload(data))
    except Exception as exc:  # noqa: BLE001 - the class is the outcome compared
        return type(exc)


@pytest.mark.filterwarnings("ignore")  # dcmread warns about what it finds cut short
@pytest.mark.parametrize("syntax", sorted(SYNTAXES))
def test_a_file_cut_anywhere_is_refused_or_reads_as_dcmread_reads_it(syntax):
    """Cut inside a value: TruncatedObject (dcmread would hand on the bytes that are
    there); cut between elements: what dcmread reads."""
    data = to_part10(undefined_lengths(samples.enhanced(), below=1), SYNTAXES[syntax])
    refused = 0
    for end in range(100, len(data), 7):
        ours, theirs = outcome(read_header, data[:end]), outcome(dcmread_header, data[:end])
        if ours is TruncatedObject:  # dcmread reads the bytes that are there, or fails
            refused += 1
        elif isinstance(theirs, type):
            assert ours is theirs, end
        else:
            assert_same_dataset(ours, theirs)
    assert refused > len(data) // 14  # most cuts fall inside a value


def test_bytes_dcmread_refuses_get_dcmread_s_error():
    for data in (b"not DICOM at all", to_part10(samples.basic_text())[132:]):
        with pytest.raises(InvalidDicomError):
            read_header(BytesPayload(data))


def test_an_encapsulated_transfer_syntax_is_read_as_explicit_little_endian():
    data = to_part10(samples.enhanced())
    assert len(RLELossless) == len(ExplicitVRLittleEndian)  # same bytes, other syntax
    data = data.replace(ExplicitVRLittleEndian.encode() + b"\x00", RLELossless.encode() + b"\x00",
                        1)
    ours = ours_without_fallback(data)
    assert ours.file_meta.TransferSyntaxUID == RLELossless
    assert_same_dataset(ours, dcmread_header(BytesPayload(data)))


def ris_delivery(recorder: Recorder, data: bytes):
    env = Envelope("1.2.826.0.1.3680043.10.1234.77", samples.ENHANCED_SR, "1.2.840.10008.1.2.1")
    return recorder.delivery(env, BytesPayload(data), "ris")


@pytest.mark.parametrize("cut", [0.5, 0.9, 0.99])
def test_a_truncated_report_raises_a_class_never_its_values(cut):
    """A report cut short in its content tree: the lane gets an exception (the object is
    dead-lettered with its class as the reason), never a message built from half a tree,
    and nothing it says names the patient."""
    data = to_part10(samples.fifty_items())
    data = data[:int(len(data) * cut)]
    with pytest.raises(node.HeaderUnreadable) as raised:
        node.map_delivery(SRReportHandler(samples.RIS), ris_delivery(Recorder(), data))
    assert raised.value.args == ("TruncatedObject",)
    text = repr(raised.value) + str(raised.value)
    for secret in (*CANARY_PARTS, CANARY_ID, "ACC0001"):
        assert secret not in text


def test_a_corrupt_content_tree_gives_the_same_oru_or_error_as_dcmread():
    """A flipped byte inside the content tree: whatever dcmread's dataset gives, ours gives."""
    data = bytearray(to_part10(samples.fifty_items()))
    start = bytes(data).index(b"\x40\x00\x30\xa7")  # (0040,A730) Content Sequence
    handler = SRReportHandler(samples.RIS, **FIXED)
    for offset in range(40, 400, 37):
        bad = bytearray(data)
        bad[start + offset] ^= 0x5A
        results = []
        for reader in (read_header, dcmread_header):
            try:
                results.append(handler.handle(reader(BytesPayload(bytes(bad)))).encode())
            except Exception as exc:  # noqa: BLE001 - the class is the outcome compared
                results.append(type(exc))
        assert results[0] == results[1], offset


def test_deflated_input_still_maps():
    data = deflated(samples.fifty_items())
    handler = SRReportHandler(samples.RIS, **FIXED)
    assert handler.handle(read_header(BytesPayload(data))).encode() == handler.handle(
        samples.fifty_items()).encode()


class CountingPayload(BytesPayload):
    """A BytesPayload that counts the bytes its readers took."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.taken = 0

    def open(self):
        payload = self

        class Counting(io.BytesIO):
            def read(self, size=-1):
                chunk = super().read(size)
                payload.taken += len(chunk)
                return chunk

        return Counting(self.data)


def test_a_sequence_it_cannot_read_never_makes_it_read_the_pixels():
    """An undefined-length sequence the raw reader leaves to pydicom (here: an element
    with a VR it does not know) in front of 8 MiB of pixel data: the reader hands over to
    dcmread as soon as it meets it, without reading the rest of the file."""
    image = ct(rows=2048, cols=2048)
    item = Dataset()
    item.CodeValue = "CODE"
    image.ReferencedImageSequence = [item]
    data = to_part10(undefined_lengths(image), ExplicitVRLittleEndian)
    code_value = b"\x08\x00\x00\x01SH\x04\x00CODE"
    assert data.count(code_value) == 1
    payload = CountingPayload(data.replace(code_value, code_value.replace(b"SH", b"ZZ")))
    with pytest.raises(_Fallback):
        _Reader(payload.open()).dataset()
    assert payload.taken < 1024 * 1024
    ours, theirs = read_header(payload), dcmread_header(payload)  # dcmread's, both
    assert list(ours.keys()) == list(theirs.keys()) and 0x7FE00010 not in ours


class ShortReadsPayload(BytesPayload):
    """A payload whose stream returns at most 100 bytes per read (as an unbuffered or
    decrypting stream may)."""

    def open(self):
        class Short(io.BytesIO):
            def read(self, size=-1):
                return super().read(100 if size is None or size < 0 else min(size, 100))

        return Short(self.data)


def test_a_stream_that_reads_short_is_read_whole():
    data = to_part10(samples.fifty_items())
    ours = ours_without_fallback_from(ShortReadsPayload(data))
    theirs = dcmread_header(BytesPayload(data))  # (dcmread itself assumes whole reads)
    assert ours._dict == theirs._dict and ours.file_meta._dict == theirs.file_meta._dict
    handler = SRReportHandler(samples.RIS, **FIXED)
    assert handler.handle(ours).encode() == handler.handle(theirs).encode()


def ours_without_fallback_from(payload: BytesPayload) -> FileDataset:
    with payload.open() as f:
        return _Reader(f).dataset()
