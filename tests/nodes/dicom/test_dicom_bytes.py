"""The DICOM byte layer (nodes.dicom) reads what pydicom reads, or steps aside.

One module holds each piece to pydicom: the element header reader and the undefined-length
skipper, the walker with its stop tag, the file meta parser, the listener's envelope scan
and its completeness check (the header reader, nodes.dicom.header, is held to dcmread in
tests/nodes/hl7/test_hl7_part10.py, the sequence items in test_hl7_rawitems.py).

``scan_envelope`` walks element headers instead of building pydicom elements (the receive
path's CPU is shared with pynetdicom's threads). Whatever data set hypothesis builds (nested
defined and undefined length sequences, undefined-length UN, padded values, missing
elements, any of the little endian syntaxes), the scanner returns exactly pydicom's values,
or raises Unscannable so that the listener asks pydicom instead.
"""

from __future__ import annotations

import io
import os
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomFileLike
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence

from nodes.dicom import (ENVELOPE_KEYWORDS, CutShort, Unscannable, check_complete,
                         element_header, meta_elements, parse_file_meta, scan_envelope,
                         skip_undefined, walk)
from nodes.dicom.elements import UNDEFINED
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from support.synth import dataset_bytes_after_meta

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "dimse"))
from dimse_support import study  # noqa: E402

KEYWORDS = sorted(ENVELOPE_KEYWORDS.values())
uid_text = st.from_regex(r"[12](\.[1-9][0-9]{0,8}){1,6}", fullmatch=True)
modality = st.sampled_from(["CT", "MR", "SR", "OT", " US", "PT ", ""])


def encode(ds: Dataset, implicit: bool, undefined_lengths: bool) -> bytes:
    """``ds`` in little endian; sequences with undefined lengths when asked (both forms are
    legal and senders use both)."""
    for elem in ds.iterall():
        if elem.VR == "SQ":
            elem.is_undefined_length = undefined_lengths
            for item in elem.value:
                item.is_undefined_length_sequence_item = undefined_lengths
    fp = io.BytesIO()
    out = DicomFileLike(fp)
    out.is_little_endian, out.is_implicit_VR = True, implicit
    write_dataset(out, ds)
    return fp.getvalue()


def pydicom_reads(data: bytes, implicit: bool) -> dict[str, str]:
    ds = read_dataset(io.BytesIO(data), implicit, True)
    return {k: str(ds[k].value) for k in KEYWORDS if k in ds}


@st.composite
def datasets(draw) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    for keyword in KEYWORDS:
        if draw(st.booleans()) or keyword in ("SOPClassUID", "SOPInstanceUID"):
            setattr(ds, keyword, draw(modality if keyword == "Modality" else uid_text))
    if draw(st.booleans()):  # a sequence before the envelope's last element, nested
        inner = Dataset()
        inner.CodeValue, inner.CodingSchemeDesignator = "12345", "99LOCAL"
        inner.CodeMeaning = draw(st.text(alphabet="abc xyz", max_size=12))
        outer = Dataset()
        outer.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        outer.PurposeOfReferenceCodeSequence = Sequence([inner] * draw(st.integers(0, 2)))
        ds.ReferencedImageSequence = Sequence([outer] * draw(st.integers(0, 3)))
    if draw(st.booleans()):
        ds.ProcedureCodeSequence = Sequence([])
    ds.StudyDescription = draw(st.text(alphabet="ABC de", max_size=20))
    ds.InstanceNumber = draw(st.integers(0, 9999))
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated = 8
    ds.add_new(0x7FE00010, "OB", b"\x00" * 4)
    return ds


@settings(max_examples=150, deadline=None)
@given(ds=datasets(), implicit=st.booleans(), undefined=st.booleans())
def test_scanner_reads_what_pydicom_reads(ds, implicit, undefined):
    data = encode(ds, implicit, undefined)
    assert scan_envelope(data, implicit) == pydicom_reads(data, implicit)


@pytest.mark.parametrize("value", [" US", "PT ", "", "CT"])
@pytest.mark.parametrize("implicit", [True, False])
def test_padding_is_read_as_pydicom_reads_it(value, implicit):
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = "1.2.3", "1.2.3.4", value
    data = encode(ds, implicit, False)
    assert scan_envelope(data, implicit) == pydicom_reads(data, implicit)


def test_undefined_length_un_is_skipped_as_implicit_items():
    """An explicit VR data set may carry a sequence as UN with undefined length; its items
    are implicit VR (PS3.5 §6.2.2)."""
    item = b"".join([
        b"\x08\x00\x00\x01" + (6).to_bytes(4, "little") + b"12345 ",   # (0008,0100) implicit
        b"\xfe\xff\x0d\xe0" + b"\x00" * 4,                               # item delimiter
    ])
    un = (b"\x08\x00\x10\x00" + b"UN" + b"\x00\x00" + b"\xff" * 4 +     # (0008,0010) UN undef
          b"\xfe\xff\x00\xe0" + b"\xff" * 4 + item + b"\xfe\xff\xdd\xe0" + b"\x00" * 4)
    sop = b"\x08\x00\x18\x00UI" + (4).to_bytes(2, "little") + b"1.2\x00"
    data = un + sop
    assert scan_envelope(data, False) == {"SOPInstanceUID": "1.2"}


@pytest.mark.parametrize("data", [
    b"\x08\x00\x18\x00UI\x40\x00" + b"1.2",                 # value longer than the data
    b"\x08\x00\x18\x00\x01\x02\x04\x00" + b"1.2\x00",        # not a VR
    b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0",   # no delimiter
    b"\x08\x00\x60\x00CS\x04\x00" + "CTé".encode("latin-1") + b" ",  # not ASCII
    b"\x08\x00\x60\x00CS\x06\x00" + b"CT\\MR ",              # multi-valued
])
def test_malformed_or_unusual_data_sets_are_left_to_pydicom(data):
    with pytest.raises(Unscannable):
        scan_envelope(data, False)


def test_real_study_objects_scan_like_pydicom(tmp_path):
    """The mixed study the DIMSE tests send (CT, MR, SR; implicit and explicit VR; the
    compressed objects are explicit VR LE too; the deflated one is pydicom's business)."""
    scanned = 0
    for path in study(tmp_path).values():
        ds = dcmread(path, stop_before_pixels=True)
        ts = str(ds.file_meta.TransferSyntaxUID)
        if ts in (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian):
            continue
        implicit = ts == ImplicitVRLittleEndian
        body = dataset_bytes_after_meta(path.read_bytes())
        assert scan_envelope(body, implicit) == pydicom_reads(body, implicit)
        scanned += 1
    assert scanned >= 7


# -- check_complete: a data set cut short is found -----------------------------------------


def top_level_starts(ds: Dataset, implicit: bool, undefined: bool) -> list[int]:
    """Where each top-level element of ``ds`` starts, and where the data set ends, from
    pydicom's encoding of each element on its own (not from the walker under test)."""
    starts, pos = [], 0
    for elem in ds:
        one = Dataset()
        one.add(elem)
        starts.append(pos)
        pos += len(encode(one, implicit, undefined))
    return starts + [pos]


@settings(max_examples=40, deadline=None)
@given(ds=datasets(), implicit=st.booleans(), undefined=st.booleans())
def test_a_data_set_cut_anywhere_inside_an_element_is_found(ds, implicit, undefined):
    data = encode(ds, implicit, undefined)
    starts = top_level_starts(ds, implicit, undefined)
    assert starts[-1] == len(data)
    check_complete(data, implicit)  # whole: nothing to say
    for cut in range(len(data)):
        # fewer than 8 bytes after an element's start are not a header: left alone
        undetectable = any(0 <= cut - start < 8 for start in starts)
        if undetectable:
            check_complete(data[:cut], implicit)
        else:
            with pytest.raises(CutShort):
                check_complete(data[:cut], implicit)


def test_encapsulated_pixel_data_is_skipped_by_its_fragments_and_checked():
    """Compressed Pixel Data: undefined length, an offset table item, fragments, and the
    Sequence Delimitation Item; a file cut inside the last fragment is found."""
    header = b"\x28\x00\x10\x00US\x02\x00\x02\x00"            # (0028,0010) Rows
    pixel = (b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff"     # (7FE0,0010) OB undefined
             + b"\xfe\xff\x00\xe0" + b"\x00" * 4               # empty offset table
             + b"\xfe\xff\x00\xe0" + (6).to_bytes(4, "little") + b"JPEG!!"
             + b"\xfe\xff\xdd\xe0" + b"\x00" * 4)
    data = header + pixel
    check_complete(data, False)
    with pytest.raises(CutShort):
        check_complete(data[:-12], False)  # inside the fragment
    with pytest.raises(CutShort):
        check_complete(data[:-8], False)   # the delimiter missing


def test_a_spooled_data_set_is_checked_through_mmap_between_offsets(tmp_path):
    import mmap

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.3", "1.2.3.4"
    ds.add_new(0x7FE00010, "OB", b"\x01" * 4096)
    data = encode(ds, False, False)
    path = tmp_path / "spool"
    path.write_bytes(b"META" * 8 + data[:-100])  # what a spool file holds: meta, then data
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        with pytest.raises(CutShort):
            check_complete(m, False, 32, len(m))
    path.write_bytes(b"META" * 8 + data)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        check_complete(m, False, 32, len(m))


def test_a_layout_it_does_not_know_is_not_called_cut_short():
    not_a_vr = b"\x08\x00\x18\x00\x01\x02\x04\x00" + b"1.2\x00"
    with pytest.raises(Unscannable) as raised:
        check_complete(not_a_vr, False)
    assert not isinstance(raised.value, CutShort)


# -- element headers, the undefined-length skip and the walker, against pydicom ------------


def element_spans(data: bytes, implicit: bool) -> list[tuple[int, str, int, int]]:
    """(tag, VR, value offset, end) of each top-level element, read by element_header and
    skip_undefined (the pieces under test)."""
    spans, pos = [], 0
    while pos < len(data):
        tag, value, length, vr = element_header(data, pos, implicit)
        end = (skip_undefined(data, value, implicit or vr == b"UN") if length == UNDEFINED
               else value + length)
        spans.append((tag, vr.decode(), value, end))
        pos = end
    return spans


@settings(max_examples=40, deadline=None)
@given(ds=datasets(), implicit=st.booleans(), undefined=st.booleans())
def test_element_headers_are_read_as_pydicom_reads_them(ds, implicit, undefined):
    data = encode(ds, implicit, undefined)
    spans = element_spans(data, implicit)
    assert [end for *_, end in spans] == top_level_starts(ds, implicit, undefined)[1:]
    assert [tag for tag, *_ in spans] == [int(elem.tag) for elem in ds]
    if not implicit:
        assert [vr for _, vr, *_ in spans] == [elem.VR for elem in ds]
    theirs = read_dataset(io.BytesIO(data), implicit, True)
    for tag, _, value, end in spans:
        raw = theirs.get_item(tag)
        if getattr(raw, "value_tell", None) is not None:  # still raw: its offset and bytes
            assert (raw.value_tell, raw.value or b"") == (value, data[value:end])


@settings(max_examples=40, deadline=None)
@given(ds=datasets(), implicit=st.booleans(), undefined=st.booleans(),
       stop=st.sampled_from([None, 0x00080005, 0x00080018, 0x0008FFFF, 0x0020000D,
                             0x00280100, 0x7FE00000]))
def test_walk_stops_after_its_stop_tag_with_the_values_asked_for(ds, implicit, undefined,
                                                                  stop):
    data = encode(ds, implicit, undefined)
    starts = top_level_starts(ds, implicit, undefined)
    tags = [int(elem.tag) for elem in ds]
    expected = next((start for start, tag in zip(starts, tags)
                     if stop is not None and tag > stop), len(data))
    values = dict.fromkeys(tags[::2])
    assert walk(data, implicit, stop=stop, values=values) == expected
    theirs = read_dataset(io.BytesIO(data), implicit, True)
    for tag, raw in values.items():
        if stop is not None and tag > stop or ds[tag].VR == "SQ":
            assert raw is None or ds[tag].VR == "SQ"  # not reached (sequences: see above)
        else:
            assert raw == (theirs.get_item(tag).value or b"")


def test_skip_undefined_refuses_what_is_not_an_item_and_depth_beyond_32():
    with pytest.raises(Unscannable):
        skip_undefined(b"\x08\x00\x18\x00" + b"\x00" * 4, 0, True)
    nested = b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + b"\x08\x00\x15\x11" + b"\xff" * 4
    with pytest.raises(Unscannable):
        skip_undefined(nested * 40, 0, True)


# -- the file meta group, against pydicom ---------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(sop_class=uid_text, sop_instance=uid_text,
       syntax=st.sampled_from([ImplicitVRLittleEndian, "1.2.840.10008.1.2.1",
                               DeflatedExplicitVRLittleEndian]),
       source_ae=st.text(alphabet="ABCXYZ_", max_size=16),
       private=st.binary(max_size=9))
def test_the_file_meta_is_read_as_pydicom_reads_it(sop_class, sop_instance, syntax,
                                                   source_ae, private):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.filereader import _read_file_meta_info, read_preamble  # noqa: PLC2701

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, sop_instance
    meta.TransferSyntaxUID = syntax
    if source_ae:
        meta.SourceApplicationEntityTitle = source_ae
    if private:
        meta.PrivateInformationCreatorUID = "1.2.3"
        meta.PrivateInformation = private
    ds = FileDataset(None, Dataset(), file_meta=meta, preamble=b"\x00" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_instance
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    data = out.getvalue()
    elements, offset = meta_elements(data)
    fp = io.BytesIO(data)
    read_preamble(fp, False)
    theirs = _read_file_meta_info(fp)
    assert [tag for tag, *_ in elements] == [int(tag) for tag in theirs.keys()]
    for tag, vr, start, end in elements:
        assert vr.decode() == theirs[tag].VR
        raw = theirs.get_item(tag)
        if getattr(raw, "value_tell", None) is not None:  # still raw (pydicom converts 0000)
            assert data[start:end] == (raw.value or b"")
    assert data[offset:] == dataset_bytes_after_meta(data)
    facts = parse_file_meta(data)
    assert (facts.sop_class_uid, facts.sop_instance_uid, facts.transfer_syntax_uid,
            facts.dataset_offset) == (sop_class, sop_instance, syntax, offset)
