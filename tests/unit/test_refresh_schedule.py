"""The query service's refresh schedule: every refresh_seconds, but never more than a bounded
share of the time (a refresh competes with requests for the interpreter)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from consumers.query import QueryService, next_refresh
from consumers.settings import KafkaSettings, MetricsSettings, QuerySettings


def test_a_quick_refresh_keeps_the_planned_period() -> None:
    # planned at t=10.2 (period 0.2 s), the refresh at t=10.0 took 10 ms: 30 ms of serving would do
    assert next_refresh(10.2, 10.01, 0.010, 0.25) == 10.2


@pytest.mark.parametrize(("took", "share"), [(0.75, 0.25), (0.3, 0.5), (0.1, 0.1)])
def test_a_slow_refresh_leaves_the_loop_its_share(took: float, share: float) -> None:
    now = 10.0 + took
    nxt = next_refresh(10.2, now, took, share)
    serving = nxt - now
    assert took / (took + serving) == pytest.approx(share)


def test_share_one_means_the_fixed_period() -> None:
    assert next_refresh(10.2, 11.0, 1.0, 1.0) == 10.2


def test_a_service_closed_before_it_ran_stops_cleanly(tmp_path: Path) -> None:
    """close() without run(): no follower thread to join, no store to close, no hang."""
    settings = QuerySettings(
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:9"),  # never contacted here
        metrics=MetricsSettings(port=-1),
        state_dir=tmp_path / "state",
    )
    service = QueryService(settings)
    before = {t.name for t in threading.enumerate()}
    service.close()
    assert service.follower is None
    assert "follow-store" not in before | {t.name for t in threading.enumerate()}
