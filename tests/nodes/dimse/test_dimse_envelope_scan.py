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

from nodes.dimse.part10 import ENVELOPE_KEYWORDS, Unscannable, scan_envelope
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
