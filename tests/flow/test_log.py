"""The INFO+ filter lets only routing-safe fields through."""

import io
import json
import logging

import threading
import warnings

import pytest

import nodes  # noqa: F401  (declares the DICOM routing-safe fields, e.g. sop_instance_uid)
from flow import get_logger
from flow._log import Throttle, configure, flush
from support.logs import logging_to


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


# -- foreign records (issue 17) -------------------------------------------------------------

CANARY = "Zzcanary^Phiprobe"


def foreign_error(logger="somelib.net"):
    """A library's error with its exception, the way pynetdicom logs a bad PDU."""
    try:
        raise ValueError(f"bad value {CANARY!r}")
    except ValueError as exc:
        logging.getLogger(logger).error("decoding failed for %s", CANARY, exc_info=exc)


def test_a_foreign_error_is_one_line_of_facts_about_the_code(captured):
    foreign_error()
    (line,) = lines(captured)
    assert line["event"] == "log.foreign" and line["level"] == "ERROR"
    assert line["logger"] == "somelib.net" and line["error_class"] == "ValueError"
    assert line["source"].startswith("test_log.foreign_error:")
    assert line["template"] == "decoding failed for %s"  # the text before the values
    assert "traceback" not in line and "message" not in line
    assert CANARY not in captured.getvalue()


def test_a_foreign_message_without_arguments_is_withheld(captured):
    logging.getLogger("somelib").warning(f"PatientName={CANARY}")  # an f-string: values in it
    (line,) = lines(captured)
    assert "template" not in line and CANARY not in captured.getvalue()


def test_at_debug_the_foreign_text_and_traceback_are_shown_on_one_line_plus_traceback():
    with logging_to("DEBUG") as stream:
        foreign_error()
    head, *traceback = stream.getvalue().splitlines()
    assert "log.foreign" in head and f"message=\"decoding failed for {CANARY}\"" in head
    assert traceback[0] == "Traceback (most recent call last):" and "ValueError" in traceback[-1]


def test_a_flood_of_identical_foreign_lines_is_bounded_and_summarised():
    with logging_to("INFO", json_lines=True, burst=5, window_s=3600) as stream:
        for _ in range(1000):
            foreign_error()
        logging.getLogger("otherlib").warning("disk %s", "full")  # another key: its own burst
        flush()
    out = lines(stream)
    written = [d for d in out if d["event"] == "log.foreign" and d["logger"] == "somelib.net"]
    (summary,) = [d for d in out if d["event"] == "log.suppressed"]
    assert len(written) == 5 and len(out) == 7
    assert summary["count"] == 995 and summary["logger"] == "somelib.net"
    assert summary["level"] == "ERROR" and summary["repeated"] == "log.foreign"
    assert summary["source"] == written[0]["source"]
    assert summary["template"] == "decoding failed for %s"
    assert CANARY not in stream.getvalue()


def test_the_summary_is_written_when_the_window_ends():
    with logging_to("INFO", json_lines=True, burst=1, window_s=0.5) as stream:
        for _ in range(3):
            foreign_error()
        waited = threading.Event()
        for _ in range(200):  # the throttle's timer writes it; no further record is needed
            if "log.suppressed" in stream.getvalue() or waited.wait(0.05):
                break
        out = lines(stream)  # before the reconfiguring on exit would flush it
    written = [d for d in out if d["event"] == "log.foreign"]
    summaries = [d for d in out if d["event"] == "log.suppressed"]
    assert summaries and all(d["logger"] == "somelib.net" for d in summaries)
    assert len(written) + sum(d["count"] for d in summaries) == 3


def test_reconfiguring_writes_the_pending_summaries():
    with logging_to("INFO", burst=2) as stream:
        for _ in range(10):
            foreign_error()
        assert "log.suppressed" not in stream.getvalue()
    assert "log.suppressed repeated=log.foreign count=8" in stream.getvalue()


def test_the_throttle_opens_a_new_window_after_the_old_one_ends():
    throttle = Throttle(burst=2, window_s=10)
    assert [throttle.admit("k", t)[0] for t in (0, 1, 2, 3)] == [True, True, False, False]
    admitted, ended = throttle.admit("k", 10.5)
    assert admitted and ended == [("k", 2)]
    assert throttle.drain() == []


def test_the_throttle_holds_a_bounded_number_of_keys():
    throttle = Throttle(burst=1, window_s=10, max_keys=3)
    for i in range(100):
        throttle.admit(f"k{i}", 0)
    assert throttle.drain() == [(None, 96)]


def test_a_python_warning_is_a_foreign_line_without_its_text(captured):
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = __import__("flow._log", fromlist=["x"])._show_warning
        warnings.warn(f"Invalid value for VR PN: {CANARY!r}", UserWarning)
    (line,) = lines(captured)
    assert line["event"] == "log.foreign" and line["logger"] == "py.warnings"
    assert line["error_class"] == "UserWarning" and line["source"].startswith("test_log:")
    assert CANARY not in captured.getvalue()


def test_an_exception_that_ends_a_thread_is_one_line(captured):
    def crash():
        raise RuntimeError(f"quoting {CANARY}")

    thread = threading.Thread(target=crash, name="worker-1")
    thread.start()
    thread.join()
    (line,) = lines(captured)
    assert line["event"] == "thread.crashed" and line["thread"] == "worker-1"
    assert line["error_class"] == "RuntimeError" and "traceback" not in line
    assert CANARY not in captured.getvalue()
