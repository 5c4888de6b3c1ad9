"""The listener's envelope scanner reads what pydicom reads, or steps aside.

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
                         scan_envelope)
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from support.synth import dataset_bytes_after_meta

sys.path.insert(0, os.path.dirname(__file__))
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


@settings(max_examples=60, deadline=None)
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
