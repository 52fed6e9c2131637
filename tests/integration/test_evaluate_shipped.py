"""`stream-mf evaluate` with no --model scores what a real updater and query pair answers.

The same environment goes to the processes and to evaluate's shipped learner (the function the
command uses). After each chunk of a small stream has reached the query process, every known
user's top-10 from the query equals evaluate's for the same prefix, and the first event after
the chunk is a hit for evaluate exactly when the query's list holds its item.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from consumers.commands.evaluate import shipped_learner
from stream_mf.datasets import EventColumns
from stream_mf.evaluate import prequential
from tests.integration.conftest import Cluster
from tests.integration.test_services import client_for, payloads_of, send
from tests.synthetic import planted_stream

pytestmark = pytest.mark.integration

#: settings both sides take from the environment (not the defaults, to show they are read)
ENV = {"STREAM_MF_MODEL__DIM": "16", "STREAM_MF_MODEL__N_NEGATIVES": "4"}
CHECKPOINTS = (150, 300, 450, 599)


def test_evaluate_defaults_score_what_updater_and_query_answer(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 10 minutes of stream time, an hour before now: no rebuild is due on either side (the
    # updater's hourly one counts wall time, evaluate's stream time)
    s = planted_stream(600, 40, 80, n_groups=4, seed=5, t0=time.time() - 3600, span_s=600)
    n = s.users.size
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    events = EventColumns(s.user_ids(), s.item_ids(), s.times, np.full(n, np.nan), ["view"] * n)
    learner, what = shipped_learner()
    assert "min_user_events 1" in what and "3600 s of stream time" in what
    full = prequential(events, learner, progress=False, keep_outcomes=True)
    assert full.outcomes is not None and full.evaluated > 250

    # item rows go to the model log with every commit (by default at most once a second, so a
    # query could serve rows a second stale): what is compared is the model, not its freshness
    cluster.start("updater", "updater", env={**ENV, "STREAM_MF_MODEL_LOG_ITEM_SECONDS": "0"})
    cluster.start("query", "query-1", env=ENV)
    payloads = payloads_of(s)
    client = client_for(cluster)
    compared = checked_events = 0
    try:
        lo = 0
        for cut in CHECKPOINTS:
            send(cluster.kafka, cluster.topics.interactions, payloads[lo:cut])
            lo = cut
            cluster.wait_metric("updater", "stream_mf_events_applied_total", cut)
            cluster.wait_metric("query-1", "stream_mf_model_events_applied", cut, timeout=30)
            # evaluate's shipped learner on the same prefix
            ev, _ = shipped_learner()
            prequential(events.take(np.arange(cut)), ev, progress=False)
            st = ev.model.state  # type: ignore[attr-defined]
            seen: dict[str, set[int]] = {}
            for u, i in zip(events.users[:cut], events.items[:cut], strict=True):
                seen.setdefault(u, set()).add(st.items.index[i])
            sent = {client.send({"user_id": u, "k": 10}): u for u in sorted(seen)}
            got = client.collect(timeout=30)
            assert set(got) == set(sent)
            for rid, resp in got.items():
                u = sent[rid]
                mine = ev.recommend(ev.user_index(u), 10, np.array(sorted(seen[u]), np.int64))
                assert resp.strategy == "personalized"
                assert [it.item_id for it in resp.items] == [st.items.ids[j] for j in mine], u
                compared += 1
            # the next event, scored test-then-learn: evaluate's outcome is the query's answer
            nxt_user, nxt_item = events.users[cut], events.items[cut]
            if full.outcomes[cut] >= 0:
                listed = next(r for q, r in got.items() if sent[q] == nxt_user)
                hit = nxt_item in [it.item_id for it in listed.items]
                assert full.outcomes[cut] == int(hit)
                checked_events += 1
    finally:
        client.close()
    assert compared >= 100 and checked_events >= 2
