"""Per-study debounce bookkeeping (pure: times are plain numbers)."""

from __future__ import annotations

import math

from nodes.fhir import StudyAggregator


def test_a_study_is_due_quiet_time_after_its_latest_instance():
    agg = StudyAggregator(10.0)
    agg.add("s1", "a", 0.0)
    agg.add("s1", "b", 4.0)
    assert agg.next_due(13.9) is None
    assert agg.next_deadline() == 14.0
    assert agg.next_due(14.0) == "s1"
    assert agg.take("s1") == ["a", "b"]


def test_a_study_that_never_goes_quiet_is_due_after_max_wait():
    agg = StudyAggregator(10.0, max_wait_s=30.0)
    for t in range(0, 40, 5):
        if agg.next_due(float(t)):
            break
        agg.add("s1", t, float(t))
    assert agg.next_deadline() == 30.0
    assert agg.next_due(30.0) == "s1"


def test_a_study_being_sent_is_not_due_until_done():
    agg = StudyAggregator(1.0)
    agg.add("s1", "a", 0.0)
    agg.take("s1")
    agg.add("s1", "b", 0.5)
    assert agg.next_due(100.0) is None and agg.next_deadline() == math.inf
    assert not agg.idle
    agg.done("s1")
    assert agg.next_due(100.0) == "s1" and agg.take("s1") == ["b"]
    agg.done("s1")
    assert agg.idle


def test_earliest_due_study_first_and_flush_ignores_deadlines():
    agg = StudyAggregator(10.0)
    agg.add("late", 1, 5.0)
    agg.add("early", 2, 1.0)
    assert agg.next_due(0.0) is None
    assert agg.next_due(0.0, flush=True) == "early"
    assert agg.next_due(20.0) == "early"
    assert (agg.pending_studies, agg.pending_items) == (2, 2)
