"""The retry schedule: pure, so it is tested without a clock or a Store."""

from __future__ import annotations


def retry_delay(failures: int, *, initial: float, maximum: float, jitter: float,
                retry_after: float | None = None, retry_after_max: float = 3600.0,
                unit: float = 0.5) -> float:
    """Seconds to wait before the next attempt, after ``failures`` (≥ 1) failed attempts.

    Capped exponential backoff: ``min(maximum, initial * 2**(failures-1))``, scaled by
    ``1 + jitter * (2*unit - 1)`` where ``unit`` is a uniform random number in [0, 1) chosen
    by the caller (so the function stays pure). A peer's ``retry_after`` hint (Retry-After,
    seconds) is a lower bound, itself capped at ``retry_after_max`` so a hostile or broken
    peer cannot park an object for days. Never negative.
    """
    if failures < 1:
        raise ValueError("failures counts failed attempts and starts at 1")
    base = min(maximum, initial * 2.0 ** min(failures - 1, 60))
    delay = base * (1.0 + jitter * (2.0 * unit - 1.0))
    if retry_after is not None and retry_after > 0:
        delay = max(delay, min(retry_after, retry_after_max))
    return max(0.0, delay)
