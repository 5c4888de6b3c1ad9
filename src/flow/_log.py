"""Structured, PHI-safe logging: one line per event, key=value or JSON.

Events are logged as ``log.info("node.crashed", node="pacs", error_class="OSError")``: the
message is an event name, the facts are fields. A filter on the handler guarantees that at
INFO and above only fields in the routing-safe list reach the output; any other field is
dropped (its *name* is listed under ``redacted=`` so the omission is visible) and tracebacks
are dropped (exception messages can quote dataset values). At DEBUG everything passes,
tracebacks included: DEBUG is for a developer's workstation with synthetic data, never for
production.

A third-party ("foreign") logger's record becomes one ``log.foreign`` line whose fields are
facts about the *code* that logged, never its text: ``logger``, ``source`` (module.function:
line of the call), ``template`` (the message before %-formatting, only when the library
passed its values as arguments) and ``error_class``. The formatted text (``message=``) and
the traceback are added only at DEBUG. Repeated foreign lines with the same (logger, level,
source, template) are throttled: the first ``burst`` of a ``window_s`` window are written,
the rest counted and summarised in one ``log.suppressed`` line when the window ends (or at
shutdown), so a flood of garbage connections cannot fill the disk.

Node libraries declare their own routing-safe fields with :func:`register_safe_fields` and
the chatty libraries they bring with :func:`register_foreign`.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
import warnings
from typing import Any

_OWN_PREFIXES = ("flow", "nodes", "graphs", "__flow_graph__")

# The runtime's own fields; a node library registers those of its nodes and transports
# (register_safe_fields).
SAFE_FIELDS: set[str] = {
    "node", "lane", "graph", "state", "restarts", "failures", "error_class", "delay_s",
    "deadline_s", "signal", "target", "targets", "nodes", "lanes", "edges", "pid", "version",
    "config", "count", "elapsed_ms", "reason", "capacity", "logger", "level", "thread", "nice",
    # where the admin endpoint listens
    "url", "tls",
}

# Third-party loggers kept at WARNING unless the process runs at DEBUG: the runtime's own
# (hpack: HTTP/2 header coding under the admin endpoint's hypercorn); a node library
# registers those it brings (register_foreign).
_QUIET: set[str] = {"hpack"}
_level: list[int | None] = [None]  # the configured level, once configure() ran
_process: list[str | None] = [None]  # this process's name in a graph of several (set_process)

FOREIGN = "log.foreign"
BURST = 5         # foreign lines written per (logger, level, source, template) and window
WINDOW_S = 60.0   # the throttle window, seconds


def set_process(name: str | None) -> None:
    """Name this process on every line (``process=ingest-0``) when a graph runs in several
    processes; None: one process, no name."""
    _process[0] = name


def register_safe_fields(*names: str) -> None:
    """Declare field names that never carry PHI, so they pass the INFO+ filter."""
    SAFE_FIELDS.update(names)


def register_foreign(*names: str) -> None:
    """Declare third-party loggers a node library brings (e.g. ``"pynetdicom"``): they are
    kept at WARNING unless the process runs at DEBUG. Their records, like those of every
    logger outside flow/nodes/graphs, are written as structured ``log.foreign`` lines."""
    _QUIET.update(names)
    if _level[0] is not None:
        _quiet(names, _level[0])


def _quiet(names: Any, level: int) -> None:
    for name in names:
        logging.getLogger(name).setLevel(logging.DEBUG if level <= logging.DEBUG
                                         else logging.WARNING)


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
        logger = self._logger
        if logger.isEnabledFor(level):
            # The record made here, not by Logger.log: its caller is two frames up, and
            # logging's own search for it (findCaller) was a quarter of a line's cost.
            caller = sys._getframe(2)
            code = caller.f_code
            record = logger.makeRecord(
                logger.name, level, code.co_filename, caller.f_lineno, event, None,
                sys.exc_info() if exc else None, code.co_name,
                {"fields": {**self._bound, **fields}})
            logger.handle(record)

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


# A printf conversion: a template made of these alone (e.g. "%s") says nothing.
_CONVERSION = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[a-zA-Z%]")


def _template(record: logging.LogRecord) -> str | None:
    """The message as the library's source code wrote it, when its values came apart (as
    %-arguments): then it holds no data. A message without arguments may be an f-string
    with values in it, so its text is not ours to show."""
    if not record.args or not isinstance(record.msg, str):
        return None
    return record.msg if _CONVERSION.sub("", record.msg).strip() else None


def _source(record: logging.LogRecord) -> str:
    """Where in the library the record was made: ``module.function:line``."""
    func = record.funcName
    where = record.module if not func or func == "<module>" else f"{record.module}.{func}"
    return f"{where}:{record.lineno}"


class SafeFieldsFilter(logging.Filter):
    """At INFO+: only routing-safe fields, no tracebacks unless ``verbose`` (the process
    runs at DEBUG); a foreign record becomes one structured ``log.foreign`` line.

    Idempotent: a record already shaped (by this filter or as a throttle summary) passes
    unchanged.
    """

    def __init__(self, verbose: bool = False) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_flow_shaped", False):
            return True
        if not _is_own(record.name):
            self._foreign(record)
        elif record.levelno >= logging.INFO:
            self._redact(record)
        record._flow_shaped = True  # type: ignore[attr-defined]
        return True

    def _redact(self, record: logging.LogRecord) -> None:
        fields = dict(getattr(record, "fields", None) or {})
        redacted = sorted(k for k in fields if k not in SAFE_FIELDS)
        for key in redacted:
            del fields[key]
        if record.exc_info and record.exc_info[1] is not None:
            fields.setdefault("error_class", type(record.exc_info[1]).__name__)
        if not self.verbose:
            record.exc_info = None
            record.exc_text = None
        if record.args:
            record.msg, record.args = str(record.msg), None
        if redacted:
            fields["redacted"] = ",".join(redacted)
        record.fields = fields

    def _foreign(self, record: logging.LogRecord) -> None:
        # pynetdicom, pydicom, httpx etc. format free text that may quote a dataset: only
        # facts about the code that logged pass, the text itself only at DEBUG.
        template = _template(record)
        fields: dict[str, Any] = {"logger": record.name, "source": _source(record)}
        if template is not None:
            fields["template"] = template
        category = getattr(record, "_flow_category", None)  # a warning's, see _show_warning
        if category:
            fields["error_class"] = category
        if record.exc_info and record.exc_info[1] is not None:
            fields["error_class"] = type(record.exc_info[1]).__name__
        if self.verbose:
            fields["message"] = record.getMessage()
        else:
            record.exc_info = None
            record.exc_text = None
        if record.levelno >= logging.INFO:  # the throttle's key, see _Handler
            key = (record.name, record.levelno, fields["source"], template)
            record._flow_repeat = key  # type: ignore[attr-defined]
        record.msg, record.args = FOREIGN, None
        record.fields = fields


class Throttle:
    """Counts repeats per key: the first ``burst`` of a key within ``window_s`` of its first
    occurrence are admitted, the rest suppressed and counted. Pure; the caller serialises.

    Memory is bounded: at most ``max_keys`` windows are open; beyond that, new keys share
    one overflow window (key ``None``).
    """

    def __init__(self, burst: int = BURST, window_s: float = WINDOW_S,
                 max_keys: int = 1024) -> None:
        self.burst, self.window_s, self.max_keys = burst, window_s, max_keys
        self._open: dict[Any, list[float]] = {}  # key -> [window end, seen, suppressed]

    def admit(self, key: Any, now: float) -> tuple[bool, list[tuple[Any, int]]]:
        """Whether the event ``key`` at ``now`` is to be written, and the (key, suppressed
        count) of the windows that ended before ``now`` with something suppressed."""
        ended = self.expire(now)
        if key not in self._open and len(self._open) >= self.max_keys:
            key = None
        window = self._open.setdefault(key, [now + self.window_s, 0, 0])
        window[1] += 1
        if window[1] <= self.burst:
            return True, ended
        window[2] += 1
        return False, ended

    def expire(self, now: float) -> list[tuple[Any, int]]:
        """Close the windows that ended by ``now``; their (key, suppressed count) if any."""
        out = []
        for key in [key for key, (end, _, _) in self._open.items() if end <= now]:
            suppressed = int(self._open.pop(key)[2])
            if suppressed:
                out.append((key, suppressed))
        return out

    def drain(self) -> list[tuple[Any, int]]:
        """Close every window (shutdown); their (key, suppressed count) if any."""
        return self.expire(float("inf"))

    def next_end(self) -> float | None:
        """When the first window holding suppressed events ends (None: none does)."""
        return min((end for end, _, suppressed in self._open.values() if suppressed),
                   default=None)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The process's one handler: shaped by :class:`SafeFieldsFilter`, foreign repeats
    throttled, summaries written when a window ends (a timer) or the handler closes."""

    def __init__(self, stream: Any, throttle: Throttle) -> None:
        super().__init__(stream)
        self.throttle = throttle
        self._timer: threading.Timer | None = None
        self._closed = False

    def emit(self, record: logging.LogRecord) -> None:  # called under the handler's lock
        key = getattr(record, "_flow_repeat", None)
        if key is None:
            super().emit(record)
            return
        admitted, ended = self.throttle.admit(key, record.created)
        self._summarise(ended)
        if admitted:
            super().emit(record)
        else:
            self._arm()

    def _summarise(self, ended: list[tuple[Any, int]]) -> None:
        for key, count in ended:
            name, level, source, template = key or ("flow.log", logging.WARNING, "", None)
            summary = logging.LogRecord(name, level, __file__, 0, "log.suppressed", None, None)
            fields: dict[str, Any] = {"repeated": FOREIGN, "count": count, "logger": name}
            if source:
                fields["source"] = source
            if template:
                fields["template"] = template
            fields["window_s"] = self.throttle.window_s
            summary.fields = fields  # type: ignore[attr-defined]
            super().emit(summary)

    def _arm(self) -> None:
        if self._timer is not None or self._closed:
            return
        end = self.throttle.next_end()
        if end is not None:
            self._timer = threading.Timer(max(0.0, end - time.time()), self._tick)
            self._timer.daemon = True
            self._timer.start()

    def _tick(self) -> None:
        self.acquire()
        try:
            self._timer = None
            if not self._closed:
                self._summarise(self.throttle.expire(time.time()))
                self._arm()
        finally:
            self.release()

    def flush_suppressed(self) -> None:
        """Write the summaries of every open window now and start afresh."""
        self.acquire()
        try:
            self._summarise(self.throttle.drain())
        finally:
            self.release()

    def close(self) -> None:
        self.acquire()
        try:
            if not self._closed:
                self._summarise(self.throttle.drain())
                self._closed = True
                if self._timer is not None:
                    self._timer.cancel()
        finally:
            self.release()
        super().close()


_QUOTED = re.compile(r'[ "=\n\r\t]')  # a value with one of these is written as JSON


def _kv(value: Any) -> str:
    text = str(value)
    if text == "" or _QUOTED.search(text):
        return json.dumps(text)
    return text


_SECOND: list[Any] = [None, ""]  # the last whole second formatted, and its text


def _utc_second(created: float) -> str:
    """``created``'s UTC date and time to the second (the same second formatted once)."""
    second = int(created)
    if _SECOND[0] != second:
        _SECOND[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))]
    return _SECOND[1]


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = _utc_second(record.created)
        head = f"{ts}.{int(record.msecs):03d}Z {record.levelname} {record.getMessage()}"
        fields = getattr(record, "fields", None) or {}
        parts = [head, *(f"{k}={_kv(v)}" for k, v in fields.items())]
        if _process[0] is not None:  # last: a line reads the same in one process or several
            parts.append(f"process={_kv(_process[0])}")
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
        if _process[0] is not None:
            doc["process"] = _process[0]
        for key, value in (getattr(record, "fields", None) or {}).items():
            doc.setdefault(key, value if isinstance(value, (int, float, bool)) or value is None
                           else str(value))
        if record.exc_info:
            doc["traceback"] = self.formatException(record.exc_info)
        return json.dumps(doc, separators=(",", ":"))


def _show_warning(message: Warning | str, category: type[Warning], filename: str,
                  lineno: int, file: Any = None, line: str | None = None) -> None:
    """``warnings.warn`` (pydicom warns about odd values, quoting them) as a log record of
    ``py.warnings`` made where the warning points: one log.foreign line, not stderr text."""
    logger = logging.getLogger("py.warnings")
    logger.handle(logger.makeRecord("py.warnings", logging.WARNING, filename, lineno, "%s",
                                    (str(message),), None,
                                    extra={"_flow_category": category.__name__}))


def _thread_crashed(args: Any) -> None:
    """An exception that ends a thread (ours or a library's) as one ``thread.crashed``
    line, its traceback only at DEBUG (the default hook prints it to stderr)."""
    if args.exc_type is SystemExit:
        return
    logging.getLogger("flow.log").error(
        "thread.crashed", exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        extra={"fields": {"thread": args.thread.name if args.thread else ""}})


def _ours() -> _Handler | None:
    return next((h for h in logging.getLogger().handlers if getattr(h, "_flow", False)), None)


def flush() -> None:
    """Write the throttle's pending ``log.suppressed`` summaries now (e.g. at shutdown)."""
    handler = _ours()
    if handler is not None:
        handler.flush_suppressed()


def configure(level: str = "INFO", json_lines: bool = False, stream: Any = None, *,
              burst: int = BURST, window_s: float = WINDOW_S) -> None:
    """Install the one handler of the process: filtered, structured, to ``stream`` (stderr),
    foreign repeats throttled to ``burst`` lines per ``window_s``. Python warnings and
    exceptions that end a thread are logged through it too."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r} (use DEBUG, INFO, WARNING or ERROR)")
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_flow", False):
            root.removeHandler(old)
            old.close()  # writes its pending summaries
    handler = _Handler(stream or sys.stderr, Throttle(burst, window_s))
    handler._flow = True  # type: ignore[attr-defined]
    # A library logger set to DEBUG on its own must not reach an INFO output.
    handler.setLevel(numeric)
    handler.addFilter(SafeFieldsFilter(verbose=numeric <= logging.DEBUG))
    handler.setFormatter(JsonFormatter() if json_lines else KeyValueFormatter())
    root.addHandler(handler)
    root.setLevel(numeric)
    warnings.showwarning = _show_warning
    threading.excepthook = _thread_crashed
    # Records need not look up their thread and process: neither formatter writes them
    # (the process's name comes from set_process), and every line pays for the lookups.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    _level[0] = numeric
    # Chatty libraries stay quiet unless a developer asks for DEBUG.
    _quiet(_QUIET, numeric)
