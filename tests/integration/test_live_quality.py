"""Live quality on today's traffic matches the offline prequential figure for the same model."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import Cluster
from test_services import send

from consumers.catalog import DEFAULT_CATALOG
from consumers.processes import scrape
from consumers.publish import event_payloads
from stream_mf.config import ModelConfig
from stream_mf.datasets import ColumnSpec, read_events
from stream_mf.evaluate import SGDLearner, prequential
from stream_mf.live_eval import sampled

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RATE = 0.05


def test_live_hit_rate_equals_offline_prequential_on_the_same_events(cluster: Cluster) -> None:
    """The updater scores the events its hash picks; offline prequential over the same topic
    scores every event. On the picked events both must agree: the learner gives the same state
    however the stream is cut into batches, so only top-K ties may differ. (Comparing with the
    offline mean over all events instead would be noisy: a per-batch cap on scoring biases the
    live sample towards some stretches of the stream.)"""
    events = read_events(DEFAULT_CATALOG.parent / "ratings.csv.gz", ColumnSpec()).sorted_by_time()
    cluster.start(
        "updater",
        "updater",
        env={"STREAM_MF_LIVE_EVAL_RATE": str(RATE), "STREAM_MF_LIVE_EVAL_MAX_PER_BATCH": "100000"},
    )
    send(cluster.kafka, cluster.topics.interactions, event_payloads(events, "shift"))
    offline = prequential(events, SGDLearner(ModelConfig()), progress=False, keep_outcomes=True)
    assert offline.outcomes is not None
    picked = sampled(np.zeros(len(events), np.int32), np.arange(len(events)), RATE)
    outcomes = offline.outcomes[picked]
    outcomes = outcomes[outcomes >= 0]
    cluster.wait_metric("updater", "stream_mf_events_applied_total", len(events), timeout=120)
    m = scrape(cluster.url("updater"))
    scored = m["stream_mf_live_eval_events_total"]
    hits = m["stream_mf_live_eval_hits_total"]
    assert scored == outcomes.size > 1500
    assert abs(hits - outcomes.sum()) <= 0.02 * outcomes.sum() + 2, (
        f"live {hits:.0f} hits vs offline {outcomes.sum()} on the same {scored:.0f} events"
    )
