"""Synthetic DICOM objects for tests. Every patient carries the PHI canary name.

The canary must never appear in logs at INFO+, error texts, dead-letter reasons, CLI output
or, in plaintext, in the data dir. Tests grep for :data:`CANARY` (and its parts).
"""

from __future__ import annotations

import io
from pathlib import Path

from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (CTImageStorage, ExplicitVRLittleEndian, MRImageStorage,
                         PYDICOM_IMPLEMENTATION_UID, generate_uid)

CANARY = "Zzcanary^Phiprobe"
CANARY_PARTS = ("Zzcanary", "Phiprobe")
CANARY_ID = "CANARYID-4242"


def base_dataset(sop_class: str, *, study_uid: str | None = None, series_uid: str | None = None,
                 modality: str = "CT", instance_number: int = 1) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = CANARY
    ds.PatientID = CANARY_ID
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.AccessionNumber = "ACC0001"
    ds.StudyDate = "20260101"
    ds.StudyTime = "101500"
    ds.StudyID = "1"
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.ReferringPhysicianName = "Ref^Doctor"
    return ds


def image(sop_class: str = CTImageStorage, *, rows: int = 64, cols: int = 64,
          modality: str = "CT", **kw) -> Dataset:
    """An uncompressed 16-bit monochrome image with a deterministic pixel pattern."""
    ds = base_dataset(sop_class, modality=modality, **kw)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = bytes((i * 7) & 0xFF for i in range(rows * cols * 2))
    return ds


def ct(**kw) -> Dataset:
    return image(CTImageStorage, modality="CT", **kw)


def mr(**kw) -> Dataset:
    return image(MRImageStorage, modality="MR", **kw)


def to_part10(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """Encode ``ds`` as a DICOM Part 10 file (preamble, file meta, dataset)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def write(ds: Dataset, path: Path, transfer_syntax: str = ExplicitVRLittleEndian) -> Path:
    path.write_bytes(to_part10(ds, transfer_syntax))
    return path


def dataset_bytes_after_meta(part10: bytes) -> bytes:
    """The encoded dataset that follows the file meta group: what byte-identity compares."""
    from pydicom.filereader import read_preamble, _read_file_meta_info  # noqa: PLC2701

    fp = io.BytesIO(part10)
    read_preamble(fp, False)
    _read_file_meta_info(fp)
    return part10[fp.tell():]


COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def sr_report(text: str = "No acute findings.", **kw) -> Dataset:
    """A small Comprehensive SR (TID 2000 shape): a report container with one finding."""
    ds = base_dataset(COMPREHENSIVE_SR, modality="SR", **kw)
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.ConceptNameCodeSequence = [_code("18748-4", "LN", "Diagnostic Imaging Report")]
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ContentDate, ds.ContentTime = "20260101", "103000"
    finding = Dataset()
    finding.RelationshipType = "CONTAINS"
    finding.ValueType = "TEXT"
    finding.ConceptNameCodeSequence = [_code("121071", "DCM", "Finding")]
    finding.TextValue = text
    ds.ContentSequence = [finding]
    return ds


def mixed_study_part10(study_uid: str) -> list[bytes]:
    """Part 10 files of one study: four CTs (explicit and implicit VR little endian, one
    series), three MRs (another series) and an SR report."""
    from pydicom.uid import ImplicitVRLittleEndian

    series = [f"{study_uid}.1", f"{study_uid}.2"]
    out = [to_part10(ct(study_uid=study_uid, series_uid=series[0], instance_number=i + 1),
                     ExplicitVRLittleEndian if i % 2 else ImplicitVRLittleEndian)
           for i in range(4)]
    out += [to_part10(mr(study_uid=study_uid, series_uid=series[1], instance_number=i + 1,
                         rows=128, cols=96)) for i in range(3)]
    out.append(to_part10(sr_report(study_uid=study_uid)))
    return out


def large_ct(path: Path, megabytes: int = 40) -> Path:
    """A CT of about ``megabytes`` MB of (never decoded) pixel data, written to ``path``."""
    ds = base_dataset("1.2.840.10008.5.1.4.1.1.2")
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 4000, 16, 12, 11
    ds.Rows = megabytes * 1_000_000 // (4000 * 2)
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(range(256)) * (ds.Rows * 4000 * 2 // 256)
    return write(ds, path)

