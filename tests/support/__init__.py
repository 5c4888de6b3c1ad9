"""Shared test support: real peers, ports, synthetic DICOM with the PHI canary."""
