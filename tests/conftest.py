"""Fixtures shared across the suite."""

from __future__ import annotations

import pytest

from support.orthanc import OrthancServer


@pytest.fixture
def orthanc(tmp_path):
    """A stopped Orthanc (with DICOMweb) of this test's own, stopped by its pid afterwards."""
    server = OrthancServer(tmp_path / "orthanc")
    try:
        yield server
    finally:
        server.stop()
