"""The retry schedule is a pure function: capped exponential backoff, jitter, Retry-After."""

import pytest
from hypothesis import given, strategies as st

from nodes.store import retry_delay

SCHEDULE = dict(initial=2.0, maximum=300.0, jitter=0.2)


def test_delay_doubles_from_initial_and_is_capped():
    delays = [retry_delay(n, **SCHEDULE) for n in range(1, 12)]  # unit 0.5: no jitter
    assert delays[:5] == [2.0, 4.0, 8.0, 16.0, 32.0]
    assert delays[-1] == 300.0 and max(delays) == 300.0


def test_jitter_spreads_each_delay_within_its_bounds():
    assert retry_delay(3, unit=0.0, **SCHEDULE) == pytest.approx(8.0 * 0.8)
    assert retry_delay(3, unit=1.0, **SCHEDULE) == pytest.approx(8.0 * 1.2)


def test_retry_after_is_a_lower_bound_capped_by_its_own_maximum():
    assert retry_delay(1, retry_after=120.0, **SCHEDULE) == 120.0
    assert retry_delay(8, retry_after=1.0, **SCHEDULE) == 256.0  # backoff already longer
    assert retry_delay(1, retry_after=10 ** 9, retry_after_max=3600.0, **SCHEDULE) == 3600.0


def test_failures_start_at_one():
    with pytest.raises(ValueError):
        retry_delay(0, **SCHEDULE)


@given(st.integers(1, 10_000), st.floats(0, 1, exclude_max=True),
       st.one_of(st.none(), st.floats(0, 1e6)))
def test_delay_is_never_negative_nor_beyond_the_caps(failures, unit, retry_after):
    delay = retry_delay(failures, unit=unit, retry_after=retry_after, retry_after_max=3600.0,
                        **SCHEDULE)
    assert 0.0 <= delay <= max(300.0 * 1.2, 3600.0)
