"""Fixtures shared across the suite."""

from __future__ import annotations

import logging

import pytest

from support.orthanc import OrthancServer


@pytest.fixture
def orthanc(tmp_path):
    """A stopped Orthanc (with DICOMweb) of this test's own, stopped by its pid afterwards."""
    server = OrthancServer(tmp_path / "orthanc")
    try:
        yield server
    finally:
        server.kill()  # nothing reads its storage afterwards


@pytest.fixture(autouse=True)
def no_log_handler_outlives_its_test():
    """A test that installs dicomflow's log handler (flow.configure) binds it to the stream
    of that moment, often pytest's capture file, which is closed when the test ends: later
    tests' log lines would fail to write. Remove it after every test."""
    yield
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_flow", False):
            root.removeHandler(handler)
