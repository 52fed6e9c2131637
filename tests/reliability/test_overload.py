"""Overload: flood the query service at twice what it can answer, then check it sheds and recovers.

1. Capacity: a flood of requests with a generous deadline; replies per second while it drains.
2. Burst: about 2x that rate for 10 s, each request with a 500 ms budget (`deadline_ms`).
3. What must hold: the query process's memory stays bounded (RSS below twice the pre-burst RSS
   plus 64 MB); requests past their deadline are dropped and counted
   (`stream_mf_requests_expired_total`), every burst request is either answered once or counted
   as expired (one process, no crash: the accounting is exact); a reply never comes long after
   its deadline; once the backlog is drained, new requests are answered within 200 ms again.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from consumers.local_broker import kafka_bootstrap
from consumers.processes import metric_sum, scrape
from tests.integration.conftest import Cluster, make_topics
from tests.reliability.harness import (
    RequestLoad,
    SentRequest,
    StreamPublisher,
    event_payloads,
    rss_bytes,
)
from tests.synthetic import planted_stream

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(180)]

BUDGET_MS = 500
BURST_S = 10.0
FLOOD = 3000
RSS_SLACK = 64 * 1024 * 1024
RECOVERED_S = 0.2


@pytest.fixture(scope="module")
def own_kafka() -> Iterator[str]:
    with kafka_bootstrap() as bootstrap:
        yield bootstrap


def _is_reply_to(rid: str, r: SentRequest) -> bool:
    return r.rid == rid


def _query_counts(c: Cluster) -> tuple[float, float]:
    m = scrape(c.url("query-1"))
    return metric_sum(m, "stream_mf_requests_total"), metric_sum(
        m, "stream_mf_requests_expired_total"
    )


def test_overload_sheds_expired_requests_stays_bounded_and_recovers(
    own_kafka: str, tmp_path: Path
) -> None:
    t_begin = time.monotonic()
    kafka = own_kafka
    topics = make_topics(kafka)
    c = Cluster(kafka, topics, tmp_path)
    s = planted_stream(20_000, 2000, 1000, seed=51)
    payloads, valid = event_payloads(s.users.tolist(), s.items.tolist(), s.times.tolist())
    users = [f"u{u}" for u in range(2000)]
    items = [f"i{i}" for i in range(1000)]

    def make(n: int) -> tuple[dict[str, Any], int]:
        # anonymous visitors (a fold-in solve each): the query process, not the broker, must be
        # the bottleneck at twice its capacity (a 2-core box runs broker, client and service)
        touched = [items[(n * 7 + j * 13) % len(items)] for j in range(20)]
        return {"kind": "recommend_anonymous", "items": touched, "k": 10}, BUDGET_MS

    # batched sends: the embedded broker is slow per produce request, not per message
    load = RequestLoad(kafka, topics, make, rate=1.0, linger_ms=5)
    try:
        c.start("updater", "updater")
        query = c.start("query", "query-1")
        pub = StreamPublisher(kafka, topics.interactions, payloads, valid, rate=1e9).start()
        assert pub.finish(60.0) == 0
        c.wait_metric("updater", "stream_mf_events_applied_total", len(payloads), timeout=60)
        first = load.send_one({"user_id": users[0]}, 30_000)
        assert not load.wait_answered(lambda r: r.rid == first, 30), "never served"
        for _ in range(50):  # warm: compiled kernels, model view loaded, group settled
            load.send_one({"user_id": users[1]}, 30_000)
        assert not load.wait_answered(None, 20)

        # ---- 1. capacity -------------------------------------------------------------------
        # the service's own count, sampled while it drains a backlog: the client's reply
        # reading must not be what is measured
        flood_req0, _ = _query_counts(c)
        for n in range(FLOOD):
            load.send_one(make(n)[0], 60_000)
        load.producer.flush(10)
        samples: list[tuple[float, float]] = []
        end = time.monotonic() + 60
        while time.monotonic() < end:
            done = _query_counts(c)[0] - flood_req0
            samples.append((time.monotonic(), done))
            if done >= FLOOD:
                break
            time.sleep(0.05)
        busy = [(t, d) for t, d in samples if 0 < d < FLOOD]
        assert len(busy) >= 2, samples
        capacity = (busy[-1][1] - busy[0][1]) / (busy[-1][0] - busy[0][0])
        assert not load.wait_answered(None, 60), "the flood was not answered"
        time.sleep(0.5)
        rss_before = rss_bytes(query.pid)

        # ---- 2. burst at twice the capacity ------------------------------------------------
        req0, exp0 = _query_counts(c)
        n0 = len(load.sent)
        load.start_sending(rate=2.0 * capacity, duration=BURST_S)
        rss_max = rss_before
        while not load.sending_done():
            rss_max = max(rss_max, rss_bytes(query.pid))
            time.sleep(0.2)
        with load._lock:
            burst = list(load.sent)[n0:]
        sent_rate = len(burst) / BURST_S
        end = time.monotonic() + 60
        while time.monotonic() < end:  # until every burst request is answered or dropped
            rss_max = max(rss_max, rss_bytes(query.pid))
            req, exp = _query_counts(c)
            if (req - req0) + (exp - exp0) >= len(burst):
                break
            time.sleep(0.2)
        drained_s = time.monotonic() - t_begin
        req, exp = _query_counts(c)
        rss_max = max(rss_max, rss_bytes(query.pid))
        rss_metric = metric_sum(scrape(c.url("query-1")), "process_resident_memory_bytes")

        # ---- 3. recovery: one request at a time, each answered quickly ---------------------
        time.sleep(0.5)
        after: list[float] = []
        for n in range(10):
            rid = load.send_one(make(n)[0], 5_000)
            load.producer.flush(1.0)
            load.wait_answered(partial(_is_reply_to, rid), 5)
            lat = load.latency(rid)
            after.append(float("inf") if lat is None else lat)
        time.sleep(0.3)
        with load._lock:
            answered = [r for r in burst if r in load.replies]
            dups = [r for r in burst if len(load.replies.get(r, [])) > 1]
            late = [
                load.replies[r][0].at - load.sent[r].sent_at - BUDGET_MS / 1000 for r in answered
            ]
        print(
            f"\noverload: capacity {capacity:.0f} req/s; burst {len(burst)} requests "
            f"({sent_rate:.0f}/s for {BURST_S:.0f} s, {BUDGET_MS} ms budget): "
            f"{len(answered)} answered, {exp - exp0:.0f} expired; RSS {rss_before / 2**20:.0f} "
            f"-> max {rss_max / 2**20:.0f} MB (metric {rss_metric / 2**20:.0f} MB); "
            f"worst reply {max(late, default=0) * 1e3:+.0f} ms past its deadline; recovery "
            f"latencies ms {[round(min(x, 99.0) * 1e3) for x in after]}; "
            f"drained at {drained_s:.0f} s, "
            f"total {time.monotonic() - t_begin:.0f} s"
        )
        assert query.alive(), query.log_tail()
        assert sent_rate >= 1.5 * capacity, "the client could not overload the service"
        assert (req - req0) + (exp - exp0) == len(burst), "a burst request vanished"
        assert exp - exp0 > 0, "nothing expired at twice the capacity"
        assert len(answered) == req - req0 and not dups
        assert rss_max < 2 * rss_before + RSS_SLACK, (rss_before, rss_max)
        # the deadline is checked when a request is taken up: a reply may trail it by the
        # time to answer it and to deliver the reply, never by the backlog
        assert max(late, default=0.0) < 2.0, max(late)
        assert float(np.median(after)) < RECOVERED_S and max(after) < 2 * RECOVERED_S, after
    finally:
        with contextlib.suppress(Exception):
            load.close()
        c.stop_all()
