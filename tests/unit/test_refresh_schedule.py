"""The query service's refresh schedule: every refresh_seconds, but never more than a bounded
share of the time (a refresh competes with requests for the interpreter)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from consumers.kafka_io import StopFlag
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


def test_the_follower_thread_stops_with_the_service(tmp_path: Path) -> None:
    """run() starts the store follower on its own thread; a stop request ends both, and close()
    joins the thread before the store would be closed. Also without run(): nothing to join."""
    settings = QuerySettings(
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:9"),  # nothing answers: no requests
        metrics=MetricsSettings(port=-1),
        state_dir=tmp_path / "state",  # no store yet: the thread keeps waiting for one
        refresh_seconds=0.05,
    )
    QueryService(settings).close()  # never ran: returns at once
    service = QueryService(settings)
    stop = StopFlag()
    runner = threading.Thread(target=service.run, args=(stop,))
    runner.start()
    try:
        end = time.monotonic() + 20
        while service._follower_thread is None or not service._follower_thread.is_alive():
            assert time.monotonic() < end and runner.is_alive(), "the follower never started"
            time.sleep(0.05)
    finally:
        stop.event.set()
        runner.join(30)
    assert not runner.is_alive(), "run() did not return after the stop request"
    assert not service._follower_thread.is_alive()
    assert "follow-store" not in {t.name for t in threading.enumerate()}
