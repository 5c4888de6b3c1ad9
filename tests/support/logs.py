"""The process log captured in memory, the way ``flow run`` configures it."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager

from flow._log import configure


@contextmanager
def logging_to(level: str, **kw: object) -> Iterator[io.StringIO]:
    """``flow._log.configure(level, **kw)`` writing to the yielded stream; afterwards the
    handler is reconfigured at WARNING (which writes its pending summaries first)."""
    stream = io.StringIO()
    configure(level, stream=stream, **kw)  # type: ignore[arg-type]
    try:
        yield stream
    finally:
        configure("WARNING")
