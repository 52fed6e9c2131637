"""Niche tastes in a long tail, end to end: a real updater and query process, default settings.

The stream (`synthetic.niche_stream`, variant skewed-apart-pop) has 3 niches of 200/120/60 users
whose whole history lies in 40 items each, inside 10x as many background events over 20k tail
items, each niche in a time block of its own. The previous defaults gave the earliest niche's
users 3.4 of 10 items of their niche; the unit suite (tests/unit/test_model_suite.py) runs every
variant through every model.
"""

from __future__ import annotations

import numpy as np
import pytest

from consumers.processes import scrape
from tests.integration.conftest import Cluster
from tests.integration.test_services import client_for, payloads_of, send, wait_for_model
from tests.synthetic import NICHE_VARIANTS, NicheStream, niche_hits, niche_stream

pytestmark = pytest.mark.integration

VARIANT = "skewed-apart-pop"


def niche_answers(cluster: Cluster, s: NicheStream) -> dict[int, float]:
    """Every niche user's recommend answer from the query process, scored by `niche_hits`."""
    client = client_for(cluster)
    try:
        first = int(s.niche_users[0])
        wait_for_model(client, f"u{first}")
        sent = {client.send({"user_id": f"u{u}", "k": 10}): u for u in s.niche_users.tolist()}
        got = client.collect(timeout=60)
    finally:
        client.close()
    if set(got) != set(sent):  # what the query process saw, to tell a slow one from a deaf one
        q = next(p for p in cluster.procs if p.name == "query-1")
        m: dict[str, object]
        try:
            m = {k: v for k, v in scrape(cluster.url("query-1")).items() if "request" in k}
        except OSError as exc:
            m = {"scrape failed": str(exc)}
        raise AssertionError(
            f"{len(sent) - len(got)} of {len(sent)} requests got no reply in 60 s; query "
            f"metrics {m}; its log:\n{q.log_tail(6000)}"
        )
    top = {}
    for rid, resp in got.items():
        assert resp.error is None and resp.strategy == "personalized" and len(resp.items) == 10
        top[sent[rid]] = np.array([int(it.item_id[1:]) for it in resp.items], np.int64)
    return niche_hits(top, s)


def test_niche_users_get_their_niche_end_to_end(cluster: Cluster) -> None:
    s = niche_stream(**NICHE_VARIANTS[VARIANT])
    cluster.start("updater", "updater")
    cluster.start("query", "query-1")
    send(cluster.kafka, cluster.topics.interactions, payloads_of(s))
    cluster.wait_metric("updater", "stream_mf_events_applied_total", s.users.size, timeout=120)
    hits = niche_answers(cluster, s)
    assert min(hits.values()) >= 8, hits


def test_niche_users_keep_their_niche_after_a_rebuild_swap(cluster: Cluster) -> None:
    """A rebuild swapped in mid-stream (the rest learnt online on top of it) loses no niche."""
    s = niche_stream(**NICHE_VARIANTS[VARIANT])
    env = {"STREAM_MF_REBUILD__EVERY_EVENTS": "20000", "STREAM_MF_REBUILD__GUARD_TIMEOUT_S": "5"}
    cluster.start("updater", "updater", env=env)
    cluster.start("query", "query-1")
    send(cluster.kafka, cluster.topics.interactions, payloads_of(s))
    cluster.wait_metric("updater", "stream_mf_events_applied_total", s.users.size, timeout=120)
    cluster.wait_metric("updater", "stream_mf_rebuild_swaps_total", 1, timeout=120)
    m = scrape(cluster.url("updater"))
    assert m['stream_mf_rebuild_swaps_total{decision="swapped"}'] >= 1
    hits = niche_answers(cluster, s)
    assert min(hits.values()) >= 8, hits
