"""Which study is due to be sent: per-study debounce bookkeeping (pure; time is an argument).

A study becomes *due* ``quiet_s`` after its latest pending instance arrived, or ``max_wait_s``
after its oldest pending one did (so a study that never goes quiet is still sent), whichever
comes first. A study being sent is never due: instances arriving meanwhile wait for that send
to finish, so updates of one study are sent one at a time, in order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

__all__ = ["StudyAggregator"]


@dataclass
class _Pending(Generic[T]):
    first: float
    last: float
    items: list[T] = field(default_factory=list)


class StudyAggregator(Generic[T]):
    """Pending items grouped by study; see the module docstring for when a study is due."""

    def __init__(self, quiet_s: float, max_wait_s: float = math.inf) -> None:
        self.quiet_s = quiet_s
        self.max_wait_s = max_wait_s
        self._pending: dict[str, _Pending[T]] = {}
        self._sending: set[str] = set()

    def add(self, study: str, item: T, now: float) -> None:
        entry = self._pending.get(study)
        if entry is None:
            entry = self._pending[study] = _Pending(now, now)
        entry.last = now
        entry.items.append(item)

    def due_at(self, study: str) -> float:
        """When a pending study becomes due (``inf`` while it is being sent)."""
        if study in self._sending:
            return math.inf
        entry = self._pending[study]
        return min(entry.last + self.quiet_s, entry.first + self.max_wait_s)

    def next_due(self, now: float, *, flush: bool = False) -> str | None:
        """A study due at ``now`` (the earliest), or any sendable one when ``flush``."""
        candidates = [(self.due_at(s), s) for s in self._pending if s not in self._sending]
        if not candidates:
            return None
        at, study = min(candidates)
        return study if flush or at <= now else None

    def next_deadline(self) -> float:
        return min((self.due_at(s) for s in self._pending), default=math.inf)

    def take(self, study: str) -> list[T]:
        """The study's pending items; it counts as being sent until :meth:`done`."""
        self._sending.add(study)
        return self._pending.pop(study).items

    def done(self, study: str) -> None:
        self._sending.discard(study)

    @property
    def idle(self) -> bool:
        return not self._pending and not self._sending

    @property
    def pending_studies(self) -> int:
        return len(self._pending)

    @property
    def pending_items(self) -> int:
        return sum(len(e.items) for e in self._pending.values())

    @property
    def sending(self) -> int:
        return len(self._sending)
