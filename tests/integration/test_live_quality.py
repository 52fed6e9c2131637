"""Live quality on today's traffic matches the offline prequential figure for the same model."""

from __future__ import annotations

import pytest
from conftest import Cluster
from test_services import send

from consumers.catalog import DEFAULT_CATALOG
from consumers.processes import scrape
from consumers.publish import event_payloads
from stream_mf.config import ModelConfig
from stream_mf.datasets import ColumnSpec, read_events
from stream_mf.evaluate import SGDLearner, prequential

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_live_hit_rate_is_close_to_offline_prequential(cluster: Cluster) -> None:
    events = read_events(DEFAULT_CATALOG.parent / "ratings.csv.gz", ColumnSpec()).sorted_by_time()
    cluster.start(
        "updater",
        "updater",
        env={"STREAM_MF_LIVE_EVAL_RATE": "0.05", "STREAM_MF_LIVE_EVAL_MAX_PER_BATCH": "1000"},
    )
    send(cluster.kafka, cluster.topics.interactions, event_payloads(events, "shift"))
    offline = prequential(events, SGDLearner(ModelConfig()), progress=False).recall_at_k
    cluster.wait_metric("updater", "stream_mf_events_applied_total", len(events), timeout=120)
    m = scrape(cluster.url("updater"))
    scored = m["stream_mf_live_eval_events_total"]
    live = m["stream_mf_live_eval_hits_total"] / scored
    assert scored > 1500
    assert abs(live - offline) / offline < 0.2, f"live HR@10 {live:.4f} vs offline {offline:.4f}"
