"""`memory.HeapTrim`: the free heap given back once per interval while capturing, never more often."""

from __future__ import annotations

from imaptap.capture.live.memory import HEAP_TRIM_INTERVAL_S, HeapTrim


def test_a_trim_once_the_interval_has_passed_and_not_before():
    trim = HeapTrim(1000.0)
    assert trim.interval == HEAP_TRIM_INTERVAL_S
    trim(1000.0 + HEAP_TRIM_INTERVAL_S - 0.001)
    assert trim.done == 0
    trim(1000.0 + HEAP_TRIM_INTERVAL_S)
    assert trim.done == 1
    # the next one counts from the trim, not from the start: polls every 100 ms give one an interval
    trim(1000.0 + 2 * HEAP_TRIM_INTERVAL_S - 0.5)
    assert trim.done == 1
    trim(1000.0 + 2 * HEAP_TRIM_INTERVAL_S)
    assert trim.done == 2
    # a late poll (the machine was busy) trims once, not once per interval missed
    trim(1000.0 + 10 * HEAP_TRIM_INTERVAL_S)
    trim(1000.0 + 10 * HEAP_TRIM_INTERVAL_S + 1)
    assert trim.done == 3
