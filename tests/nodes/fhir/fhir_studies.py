"""Synthetic studies with fixed UIDs for the FHIR lane tests (golden files depend on them)."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage

from support.synth import ct, sr_report

STUDY = "1.2.826.0.1.3680043.2.1143.9.1"
CT_SERIES = "1.2.826.0.1.3680043.2.1143.9.1.1"
SR_SERIES = "1.2.826.0.1.3680043.2.1143.9.1.2"


def ct_instance(n: int, *, study: str = STUDY, series: str = CT_SERIES, **kw) -> Dataset:
    ds = ct(study_uid=study, series_uid=series, instance_number=n, rows=4, cols=4, **kw)
    ds.SOPInstanceUID = f"{series}.{n}"
    ds.SeriesNumber = 1
    ds.SeriesDescription = "Thorax 1.0 mm"
    ds.StudyDescription = "CT Thorax"
    ds.BodyPartExamined = "CHEST"
    ds.TimezoneOffsetFromUTC = "+0100"
    return ds


def sr_instance(n: int = 1, *, study: str = STUDY, series: str = SR_SERIES) -> Dataset:
    ds = sr_report(study_uid=study, series_uid=series, instance_number=n)
    ds.SOPInstanceUID = f"{series}.{n}"
    ds.SeriesNumber = 2
    ds.TimezoneOffsetFromUTC = "+0100"
    return ds


def ct_sr_study() -> list[Dataset]:
    """CT series of 3 (one multi-frame) + an SR series, in a scrambled order."""
    cts = [ct_instance(n) for n in (1, 2, 3)]
    cts[1].NumberOfFrames = 2
    return [sr_instance(), cts[2], cts[0], cts[1]]


def bare_instance(study: str = STUDY) -> Dataset:
    """Only what an ImagingStudy must have: UIDs, SOP class, modality, patient ID."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = f"{study}.77.1"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = f"{study}.77"
    ds.Modality = "CT"
    ds.PatientID = "P1"
    ds.AccessionNumber = ""      # present but empty: still no element
    ds.StudyDescription = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDate = ""
    return ds
