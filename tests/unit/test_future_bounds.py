"""The updater's bound on event times comes from each record, so a replay decides the same."""

from __future__ import annotations

import time

import numpy as np

from consumers.updater import future_bounds


def test_bounds_follow_record_timestamps_never_later_than_the_clock() -> None:
    before = time.time()
    stamps = np.array([1_700_000_000_000, -1, 0, int((before + 86_400 * 365) * 1000)], np.int64)
    got = future_bounds(stamps, 10.0)
    after = time.time()
    assert got[0] == 1_700_000_000.0 + 10.0  # the record's own time: the same on every replay
    for b in got[1:]:  # no timestamp, or one stamped in the future: the consumer's clock
        assert before + 10.0 <= b <= after + 10.0


def test_inf_tolerance_accepts_any_time() -> None:
    assert np.all(np.isinf(future_bounds(np.array([1, -1], np.int64), float("inf"))))
