"""Live quality on today's traffic matches the offline prequential figure for the same model."""

from __future__ import annotations

import numpy as np
import pytest

from consumers.catalog import DEFAULT_CATALOG
from consumers.processes import scrape
from consumers.publish import event_payloads
from stream_mf.config import ModelConfig
from stream_mf.datasets import ColumnSpec, EventColumns, read_events
from stream_mf.evaluate import PrequentialResult, SGDLearner, prequential
from stream_mf.live_eval import sampled
from tests.integration.conftest import Cluster
from tests.integration.test_services import send

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RATE = 0.05


@pytest.fixture(scope="module")
def movielens() -> tuple[EventColumns, PrequentialResult]:
    events = read_events(DEFAULT_CATALOG.parent / "ratings.csv.gz", ColumnSpec()).sorted_by_time()
    offline = prequential(events, SGDLearner(ModelConfig()), progress=False, keep_outcomes=True)
    return events, offline


def _replay(cluster: Cluster, events: EventColumns, max_per_batch: int) -> dict[str, float]:
    # published first, so the updater meets a backlog and fills large batches (as the demo does)
    send(cluster.kafka, cluster.topics.interactions, event_payloads(events, "shift"))
    cluster.start(
        "updater",
        "updater",
        env={
            "STREAM_MF_LIVE_EVAL_RATE": str(RATE),
            "STREAM_MF_LIVE_EVAL_MAX_PER_BATCH": str(max_per_batch),
        },
    )
    cluster.wait_metric("updater", "stream_mf_events_applied_total", len(events), timeout=120)
    return scrape(cluster.url("updater"))


def test_live_hit_rate_equals_offline_prequential_on_the_same_events(
    cluster: Cluster, movielens: tuple[EventColumns, PrequentialResult]
) -> None:
    """With no per-batch cap the updater scores exactly the events its hash picks; offline
    prequential over the same topic scores every event. On the picked events both must agree:
    the learner gives the same state however the stream is cut into batches, so only top-K
    ties may differ."""
    events, offline = movielens
    assert offline.outcomes is not None
    picked = sampled(np.zeros(len(events), np.int32), np.arange(len(events)), RATE)
    outcomes = offline.outcomes[picked]
    outcomes = outcomes[outcomes >= 0]
    m = _replay(cluster, events, max_per_batch=100_000)
    scored = m["stream_mf_live_eval_events_total"]
    hits = m["stream_mf_live_eval_hits_total"]
    assert scored == outcomes.size > 1500
    assert abs(hits - outcomes.sum()) <= 0.02 * outcomes.sum() + 2, (
        f"live {hits:.0f} hits vs offline {outcomes.sum()} on the same {scored:.0f} events"
    )


def test_capped_live_hit_rate_is_within_20_percent_of_offline(
    cluster: Cluster, movielens: tuple[EventColumns, PrequentialResult]
) -> None:
    """The demo's settings: at most 1,000 scored per batch, so large batches are subsampled and
    their events weighted; the live HR@10 must stay within 20% of the offline figure (unweighted,
    the cap over-represented small batches and read 22-24% high)."""
    events, offline = movielens
    assert offline.outcomes is not None
    picked = sampled(np.zeros(len(events), np.int32), np.arange(len(events)), RATE)
    scorable = int((offline.outcomes[picked] >= 0).sum())
    m = _replay(cluster, events, max_per_batch=1000)
    weighted, batches = m["stream_mf_live_eval_events_total"], m["stream_mf_batches_total"]
    # the cap bit (at most 1,000 scored per batch could not reach the picked count) ...
    assert scorable > 1000 * batches, (scorable, batches)
    # ... and the weights make up for what it left out: an unbiased count of the picked events
    assert abs(weighted - scorable) <= 0.1 * scorable, (weighted, scorable)
    live = m["stream_mf_live_eval_hits_total"] / weighted
    rel = abs(live - offline.recall_at_k) / offline.recall_at_k
    assert rel < 0.2, f"live HR@10 {live:.4f} vs offline {offline.recall_at_k:.4f}"
