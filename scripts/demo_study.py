"""A synthetic study for the demo: a small CT series and one Comprehensive SR report."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID,
                         generate_uid)

SR = "1.2.840.10008.5.1.4.1.1.88.33"


def _base(sop_class: str, study: str, modality: str, number: int) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = (
        "Demo^Synthetic", "DEMO-0001", "19700101", "O")
    ds.AccessionNumber, ds.StudyID, ds.StudyDate, ds.StudyTime = "DEMOACC1", "1", "20260101", "101500"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, number, 1
    ds.StationName = "CT01"
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def _save(ds: Dataset, path: Path) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID, meta.ImplementationClassUID = ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    dcmwrite(path, ds, enforce_file_format=True)
    return path


def write_study(directory: Path, images: int = 5) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    files = []
    for i in range(images):
        ds = _base(CTImageStorage, study, "CT", 1)
        ds.SeriesInstanceUID, ds.InstanceNumber = series, i + 1
        ds.Rows = ds.Columns = 64
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = bytes((j * (i + 3)) & 0xFF for j in range(64 * 64 * 2))
        files.append(_save(ds, directory / f"ct{i + 1}.dcm"))
    sr = _base(SR, study, "SR", 2)
    sr.ValueType, sr.ContinuityOfContent = "CONTAINER", "SEPARATE"
    sr.ConceptNameCodeSequence = [_code("18748-4", "LN", "Diagnostic Imaging Report")]
    sr.CompletionFlag, sr.VerificationFlag = "COMPLETE", "VERIFIED"
    sr.ContentDate, sr.ContentTime = "20260101", "103000"
    item = Dataset()
    item.RelationshipType, item.ValueType = "CONTAINS", "TEXT"
    item.ConceptNameCodeSequence = [_code("121071", "DCM", "Finding")]
    item.TextValue = "No acute findings."
    sr.ContentSequence = [item]
    files.append(_save(sr, directory / "report.dcm"))
    return files
