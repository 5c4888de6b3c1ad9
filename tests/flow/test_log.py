"""The INFO+ filter lets only routing-safe fields through."""

import io
import json
import logging

import pytest

from flow import get_logger
from flow._log import configure


@pytest.fixture
def captured():
    stream = io.StringIO()
    configure("INFO", json_lines=True, stream=stream)
    yield stream
    configure("WARNING")


def lines(stream):
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_unsafe_fields_are_dropped_at_info_and_named(captured):
    get_logger("nodes.test").info("object.received", sop_instance_uid="1.2.3",
                                  patient_name="Zzcanary^Phiprobe")
    (line,) = lines(captured)
    assert line["sop_instance_uid"] == "1.2.3"
    assert "patient_name" not in line and line["redacted"] == "patient_name"
    assert "Zzcanary" not in captured.getvalue()


def test_tracebacks_are_replaced_by_the_error_class(captured):
    try:
        raise ValueError("value quoted from a dataset: Zzcanary^Phiprobe")
    except ValueError:
        get_logger("nodes.test").exception("store.failed")
    (line,) = lines(captured)
    assert line["error_class"] == "ValueError"
    assert "Zzcanary" not in captured.getvalue()


def test_third_party_text_is_withheld_at_info(captured):
    logging.getLogger("somelib").warning("decoded PatientName=%s", "Zzcanary^Phiprobe")
    (line,) = lines(captured)
    assert line["event"] == "log.foreign" and line["logger"] == "somelib"
    assert "Zzcanary" not in captured.getvalue()


def test_debug_passes_everything():
    stream = io.StringIO()
    configure("DEBUG", stream=stream)
    try:
        get_logger("nodes.test").debug("detail", patient_name="Synthetic^Name")
    finally:
        configure("WARNING")
    assert "patient_name=Synthetic^Name" in stream.getvalue()
