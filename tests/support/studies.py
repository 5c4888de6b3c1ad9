"""Synthetic studies the end-to-end tests send, and the PHI canary checks on what comes out
(logs, CLI output, the admin endpoint's pages and metrics, the data dir)."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread

from .synth import CANARY_ID, CANARY_PARTS, ct, dataset_bytes_after_meta, sr_report, write


def mixed_study(directory: Path, *, images: int = 4, reports: int = 2) -> list[Path]:
    """CT images and SR reports of one study, as Part 10 files."""
    directory.mkdir(parents=True, exist_ok=True)
    study = "1.2.826.0.1.3680043.8.498.77.1"
    files = [write(ct(study_uid=study, instance_number=i + 1), directory / f"ct{i}.dcm")
             for i in range(images)]
    files += [write(sr_report(f"Finding {i}: no acute abnormality.", study_uid=study),
                    directory / f"sr{i}.dcm") for i in range(reports)]
    return files


def sent(files: list[Path]) -> dict[str, bytes]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID):
            dataset_bytes_after_meta(p.read_bytes()) for p in files}


def assert_no_phi(text: str, where: str) -> None:
    for part in (*CANARY_PARTS, CANARY_ID):
        assert part not in text, f"PHI canary {part!r} found in {where}"


def assert_no_plaintext_phi(data_dir: Path) -> None:
    for path in data_dir.rglob("*"):
        if path.is_file():
            raw = path.read_bytes()
            for part in (*CANARY_PARTS, CANARY_ID):
                assert part.encode() not in raw, f"PHI canary in plaintext in {path}"


def malformed_report(directory: Path) -> Path:
    """An SR without Patient ID: PID-3 is required in an ORU^R01, so the RIS lane cannot map
    it. It is still a valid DICOM object that the PACS and the archive accept."""
    ds = sr_report("Report without a patient identifier.")
    del ds.PatientID
    return write(ds, directory / "bad-sr.dcm")
