"""The query service's estimate of how long a reply takes to land (consumers/reply_delay.py)."""

from __future__ import annotations

import pytest

from consumers.reply_delay import ReplyDelay


def test_idle_estimate_is_zero() -> None:
    d = ReplyDelay()
    assert d.update(waiting=0, now=100.0) == 0.0


def test_quantile_of_recent_acknowledgements() -> None:
    d = ReplyDelay(window_s=1.0, quantile=0.9)
    for i in range(10):  # acknowledged at 100.0 .. 100.9, each after (i + 1) * 10 ms
        d.note(produced_at=100.0 + i / 10 - (i + 1) / 100, now=100.0 + i / 10)
    assert d.update(waiting=0, now=100.95) == pytest.approx(0.091)


def test_a_growing_queue_counts_at_the_rate_replies_drain() -> None:
    d = ReplyDelay(window_s=1.0)
    d.update(waiting=10, now=99.9)  # replies have been waiting since: the broker sets the pace
    for i in range(100):  # 100 acknowledgements a second, each 5 ms after its produce
        d.note(produced_at=100.0 + i / 100 - 0.005, now=100.0 + i / 100)
    # 300 replies waiting drain in 3 s at that rate: later than any recent acknowledgement
    assert d.update(waiting=300, now=100.995) == pytest.approx(3.0)


def test_it_forgets_so_shedding_cannot_last() -> None:
    d = ReplyDelay(window_s=1.0)
    d.note(produced_at=99.0, now=100.0)  # one slow reply (1 s)
    assert d.update(waiting=0, now=100.5) == pytest.approx(1.0)
    # nothing acknowledged since (everything was shed): the service answers again
    assert d.update(waiting=0, now=101.5) == 0.0


def test_a_burst_after_a_quiet_spell_is_not_a_backlog() -> None:
    """One acknowledgement in the window, then 200 replies queued at once: the acknowledgement
    rate says nothing about how fast they drain (demand paced it), so the estimate stays the
    recent acknowledgement time instead of 200 s (which dropped every request behind it)."""
    d = ReplyDelay(window_s=1.0)
    d.note(produced_at=100.0 - 0.004, now=100.0)
    assert d.update(waiting=0, now=100.2) == pytest.approx(0.004)
    assert d.update(waiting=200, now=100.3) == pytest.approx(0.004)
    assert d.update(waiting=150, now=100.9) == pytest.approx(0.004)
    # still waiting a whole window later: the broker is the bottleneck, the drain counts
    assert d.update(waiting=150, now=101.35) == 0.0  # (no acknowledgement in the window)
    d.note(produced_at=101.3, now=101.4)
    assert d.update(waiting=150, now=101.45) == pytest.approx(150.0)
