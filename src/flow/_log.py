"""Structured, PHI-safe logging: one line per event, key=value or JSON.

Events are logged as ``log.info("node.crashed", node="pacs", error_class="OSError")``: the
message is an event name, the facts are fields. A filter on the handler guarantees that at
INFO and above only fields in the routing-safe list reach the output; any other field is
dropped (its *name* is listed under ``redacted=`` so the omission is visible), tracebacks are
dropped (exception messages can quote dataset values) and messages of third-party loggers are
withheld, because their text is not ours to vet. At DEBUG everything passes: DEBUG is for a
developer's workstation with synthetic data, never for production.

Node libraries declare their own routing-safe fields with :func:`register_safe_fields`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_OWN_PREFIXES = ("flow", "nodes", "graphs", "__flow_graph__")

SAFE_FIELDS: set[str] = {
    # runtime
    "node", "lane", "graph", "state", "restarts", "failures", "error_class", "delay_s",
    "deadline_s", "signal", "target", "targets", "nodes", "lanes", "edges", "pid", "version",
    "config", "count", "elapsed_ms", "ms", "reason", "outcome", "status", "attempt",
    "capacity", "logger", "level",
    # routing-safe DICOM / transport identifiers (DESIGN.md, "PHI rules")
    "sop_instance_uid", "sop_class_uid", "transfer_syntax", "calling_ae", "called_ae",
    "ae_title", "peer", "host", "port", "url", "bytes", "duration_ms", "http_status",
    "handler", "transform", "batch", "instances", "ack_code", "control_id", "tls",
}


def register_safe_fields(*names: str) -> None:
    """Declare field names that never carry PHI, so they pass the INFO+ filter."""
    SAFE_FIELDS.update(names)


class Logger:
    """A thin event logger over :mod:`logging`: ``log.info(event, **fields)``."""

    __slots__ = ("_logger", "_bound")

    def __init__(self, name: str, **bound: Any) -> None:
        self._logger = logging.getLogger(name)
        self._bound = bound

    def bind(self, **fields: Any) -> "Logger":
        """A logger that adds ``fields`` to every event."""
        child = Logger(self._logger.name)
        child._bound = {**self._bound, **fields}
        return child

    def _log(self, level: int, event: str, fields: dict[str, Any], exc: bool = False) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, event, extra={"fields": {**self._bound, **fields}},
                             exc_info=exc, stacklevel=3)

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        """ERROR with the traceback; the traceback is only emitted when DEBUG is on."""
        self._log(logging.ERROR, event, fields, exc=True)


def get_logger(name: str, **bound: Any) -> Logger:
    return Logger(name, **bound)


def _is_own(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in _OWN_PREFIXES)


class SafeFieldsFilter(logging.Filter):
    """At INFO+: only routing-safe fields, no tracebacks, no third-party message text."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.INFO:
            return True
        fields = dict(getattr(record, "fields", None) or {})
        redacted = sorted(k for k in fields if k not in SAFE_FIELDS)
        for key in redacted:
            del fields[key]
        if record.exc_info and record.exc_info[1] is not None:
            fields.setdefault("error_class", type(record.exc_info[1]).__name__)
        record.exc_info = None
        record.exc_text = None
        if not _is_own(record.name):
            # pynetdicom, httpx etc. format free text that may quote a dataset.
            fields = {"logger": record.name}
            record.msg, record.args = "log.foreign", None
        elif record.args:
            record.msg, record.args = str(record.msg), None
        if redacted:
            fields["redacted"] = ",".join(redacted)
        record.fields = fields
        return True


def _kv(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\r\t'):
        return json.dumps(text)
    return text


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        head = f"{ts}.{int(record.msecs):03d}Z {record.levelname} {record.getMessage()}"
        fields = getattr(record, "fields", None) or {}
        parts = [head, *(f"{k}={_kv(v)}" for k, v in fields.items())]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "event": record.getMessage(),
            "logger": record.name,
        }
        for key, value in (getattr(record, "fields", None) or {}).items():
            doc.setdefault(key, value if isinstance(value, (int, float, bool)) or value is None
                           else str(value))
        if record.exc_info:
            doc["traceback"] = self.formatException(record.exc_info)
        return json.dumps(doc, separators=(",", ":"))


def configure(level: str = "INFO", json_lines: bool = False, stream: Any = None) -> None:
    """Install the one handler of the process: filtered, structured, to ``stream`` (stderr)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_flow", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler._flow = True  # type: ignore[attr-defined]
    handler.addFilter(SafeFieldsFilter())
    handler.setFormatter(JsonFormatter() if json_lines else KeyValueFormatter())
    root.addHandler(handler)
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r} (use DEBUG, INFO, WARNING or ERROR)")
    root.setLevel(numeric)
    # Chatty libraries stay quiet unless a developer asks for DEBUG.
    for noisy in ("pynetdicom", "httpx", "httpcore", "hpack", "hl7apy"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if numeric <= logging.DEBUG
                                          else logging.WARNING)
