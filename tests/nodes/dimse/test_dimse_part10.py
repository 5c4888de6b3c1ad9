"""Part 10 file meta: what the listener writes is what pydicom (and the sender) read back."""

from __future__ import annotations

import io

import pytest
from pydicom import dcmread
from pydicom.uid import JPEGBaseline8Bit

from nodes.dimse import NotPart10, encode_file_meta, parse_file_meta
from nodes.dicom.filemeta import IMPLEMENTATION_CLASS_UID, read_file_meta
from support.synth import ct, dataset_bytes_after_meta, to_part10


def test_encoded_meta_reads_back_with_pydicom():
    ds = ct()
    body = dataset_bytes_after_meta(to_part10(ds))
    data = encode_file_meta(ds.SOPClassUID, ds.SOPInstanceUID, "1.2.840.10008.1.2.1",
                            source_ae_title="MODALITY") + body
    back = dcmread(io.BytesIO(data))
    assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert back.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert back.file_meta.SourceApplicationEntityTitle == "MODALITY"
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    assert dataset_bytes_after_meta(data) == body


@pytest.mark.parametrize("source_ae", ["", "ODD", "EVEN"])
def test_parse_finds_uids_and_the_dataset_offset(source_ae):
    meta = encode_file_meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", JPEGBaseline8Bit,
                            source_ae_title=source_ae)
    parsed = parse_file_meta(meta + b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100")
    assert (parsed.sop_class_uid, parsed.sop_instance_uid, parsed.transfer_syntax_uid) == (
        "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", JPEGBaseline8Bit)
    assert parsed.dataset_offset == len(meta)


def test_parse_matches_pydicom_written_files():
    data = to_part10(ct())
    assert data[parse_file_meta(data).dataset_offset:] == dataset_bytes_after_meta(data)


def test_read_from_stream_extends_past_the_first_block():
    meta = encode_file_meta("1.2.3", "1.2.3." + "4" * 60, "1.2.840.10008.1.2",
                            source_ae_title="A")
    data = meta + b"\x08\x00\x16\x00" + b"\x00" * 10000
    assert read_file_meta(io.BufferedReader(io.BytesIO(data), 64)).dataset_offset == len(meta)
    assert read_file_meta(io.BytesIO(meta)).dataset_offset == len(meta)  # meta only


@pytest.mark.parametrize("data", [b"", b"\x00" * 200, b"\x00" * 128 + b"DICM" + b"\x02\x00",
                                  b"\x00" * 128 + b"DICM" + b"\x08\x00\x05\x00CS\x00\x00"])
def test_not_part10_is_refused(data):
    with pytest.raises(NotPart10):
        parse_file_meta(data, whole=True)
