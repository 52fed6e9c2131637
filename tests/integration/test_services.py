"""The updater and query service as users run them: real broker, real RocksDB, real processes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition

from consumers import kafka_io
from consumers.client import RecClient
from consumers.publish import publish
from consumers.settings import KafkaSettings
from stream_mf.config import ModelConfig
from stream_mf.decode import decode_events
from stream_mf.model import EventBatch, OnlineModel
from stream_mf.store import StateStore
from tests.integration.conftest import Cluster, make_topics
from tests.synthetic import NicheStream, PlantedStream, planted_stream

pytestmark = pytest.mark.integration


def payloads_of(
    s: PlantedStream | NicheStream, first_t: float | None = None
) -> list[tuple[bytes, bytes]]:
    out = []
    for u, i, t in zip(s.users.tolist(), s.items.tolist(), s.times.tolist(), strict=True):
        doc = {"user_id": f"u{u}", "item_id": f"i{i}", "event_type": "view", "timestamp": t}
        out.append((f"u{u}".encode(), orjson.dumps(doc)))
    return out


def send(kafka: str, topic: str, payloads: list[tuple[bytes, bytes]]) -> None:
    producer = kafka_io.ordered_producer(KafkaSettings(bootstrap_servers=kafka))
    sent = publish(producer, topic, payloads, progress=False)
    assert sent == len(payloads)


def client_for(c: Cluster) -> RecClient:
    return RecClient(
        KafkaSettings(bootstrap_servers=c.kafka), c.topics.requests, c.topics.responses
    )


def wait_for_model(client: RecClient, user: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            r = client.ask({"user_id": user}, timeout=5)
        except TimeoutError:
            continue
        if r.error is None and r.strategy == "personalized":
            return
        time.sleep(0.2)
    raise AssertionError("the query service never served a personalized answer")


def test_planted_tastes_end_to_end(cluster: Cluster) -> None:
    s = planted_stream(40_000, 200, 1000, n_groups=5, in_group=0.9, seed=11)
    cluster.start("updater", "updater")
    cluster.start("query", "query-1")
    send(cluster.kafka, cluster.topics.interactions, payloads_of(s))
    cluster.wait_metric("updater", "stream_mf_events_applied_total", 40_000)
    client = client_for(cluster)
    try:
        wait_for_model(client, "u0")
        sent = {client.send({"user_id": f"u{u}", "k": 10}): u for u in range(200)}
        got = client.collect(timeout=30)
    finally:
        client.close()
    assert set(got) == set(sent)
    good = 0
    for rid, resp in got.items():
        u = sent[rid]
        assert resp.request_id == rid and resp.user_id == f"u{u}"
        assert resp.strategy == "personalized" and len(resp.items) == 10
        groups = [s.item_group[int(it.item_id[1:])] for it in resp.items]
        good += np.mean(np.asarray(groups) == s.user_group[u]) > 0.5
    assert good >= 0.9 * 200, f"only {good}/200 users get mostly their own taste"


def _kill_at_random(c: Cluster, total: int, kills: int, rng: np.random.Generator) -> int:
    """Restart the updater after SIGKILLs landing at random points of the stream."""
    done = 0
    for _ in range(kills):
        p = c.start("updater", "updater", "--max-batch-events", "700")
        target = min(total - 1, done + int(rng.integers(3_000, total // (kills + 1))))
        c.wait_metric("updater", "stream_mf_events_consumed_total", target - done, timeout=60)
        time.sleep(float(rng.uniform(0, 0.05)))
        p.kill()
        c.procs.remove(p)
        with StateStore(c.state) as store:
            done = sum(store.offsets().values())
            assert store.events_applied() <= done
    return done


def _hostile_mix(payloads: list[tuple[bytes, bytes]], every: int) -> list[tuple[bytes, bytes]]:
    bad = [b"{not json", b"", orjson.dumps({"user_id": "u1"}), b'{"user_id": 1}']
    out = []
    for j, kv in enumerate(payloads):
        out.append(kv)
        if j % every == 0:
            out.append((b"bad", bad[(j // every) % len(bad)]))
    return out


def test_exactly_once_under_sigkill_one_partition(cluster: Cluster) -> None:
    s = planted_stream(100_000, 2000, 1000, n_groups=8, seed=3)
    payloads = _hostile_mix(payloads_of(s), every=997)
    send(cluster.kafka, cluster.topics.interactions, payloads)
    rng = np.random.default_rng(7)
    _kill_at_random(cluster, len(payloads), 3, rng)
    cluster.start("updater", "updater", "--max-batch-events", "5000")
    cluster.wait_metric("updater", "stream_mf_events_consumed_total", 1, timeout=30)
    with StateStore(cluster.state, secondary=cluster.work / "sec") as follower:
        end = time.monotonic() + 60
        while sum(follower.offsets().values()) < len(payloads) and time.monotonic() < end:
            time.sleep(0.2)
            follower.catch_up()
    cluster.stop_all()
    # reference: the same bytes, uninterrupted, in this process
    cfg = ModelConfig()
    dec = decode_events([v for _, v in payloads], cfg.event_types)
    ref = OnlineModel(cfg)
    ref.learn(
        EventBatch.build(
            dec.users,
            dec.items,
            dec.weights,
            dec.times,
            offsets=np.asarray(dec.positions, np.int64),
        )
    )
    assert len(dec.users) == 100_000
    with StateStore(cluster.state) as store:
        state = store.load()
        assert store.offsets() == {(cluster.topics.interactions, 0): len(payloads)}
    assert state.events_applied == 100_000
    assert int(state.users.count[: state.users.n].sum()) == 100_000
    assert state.users.ids == ref.state.users.ids and state.items.ids == ref.state.items.ids
    for kind in ("users", "items"):
        a, b = getattr(state, kind), getattr(ref.state, kind)
        for arr in ("factors", "bias", "count", "last", "logpop"):
            assert np.array_equal(getattr(a, arr)[: a.n], getattr(b, arr)[: b.n]), (kind, arr)


def test_exactly_once_under_sigkill_three_partitions(kafka: str, tmp_path: Path) -> None:
    c = Cluster(kafka, make_topics(kafka, partitions=3), tmp_path)
    try:
        s = planted_stream(60_000, 3000, 1000, seed=5)
        payloads = _hostile_mix(payloads_of(s), every=499)
        send(kafka, c.topics.interactions, payloads)
        _kill_at_random(c, len(payloads), 3, np.random.default_rng(1))
        c.start("updater", "updater")
        c.wait_metric("updater", "stream_mf_events_consumed_total", 1, timeout=30)
        with StateStore(c.state, secondary=tmp_path / "sec") as follower:
            end = time.monotonic() + 60
            while sum(follower.offsets().values()) < len(payloads) and time.monotonic() < end:
                time.sleep(0.2)
                follower.catch_up()
        c.stop_all()
        with StateStore(c.state) as store:
            state = store.load()
            offsets = store.offsets()
        assert sorted(p for _, p in offsets) == [0, 1, 2]
        assert sum(offsets.values()) == len(payloads)
        assert state.events_applied == 60_000
        assert int(state.items.count[: state.items.n].sum()) == 60_000
    finally:
        c.stop_all()


HOSTILE: list[tuple[str, bytes]] = [
    ("malformed_json", b'{"user_id": "u1", "item_id": '),
    ("missing_field", orjson.dumps({"user_id": "u1", "item_id": "i1"})),
    (
        "invalid_field",
        orjson.dumps({"user_id": 7, "item_id": "i1", "event_type": "view", "timestamp": 1.7e9}),
    ),
    (
        "invalid_field",
        orjson.dumps({"user_id": "u1", "item_id": "i1", "event_type": "view", "timestamp": "soon"}),
    ),
    (
        "malformed_json",
        b'{"user_id": "u1", "item_id": "i1", "event_type": "view", "timestamp": NaN}',
    ),
    (
        "malformed_json",
        b'{"user_id": "u1", "item_id": "i1", "event_type": "view", "timestamp": Infinity}',
    ),
    (
        "malformed_json",
        b'{"user_id": "u1", "item_id": "i1", "event_type": "view", '
        b'"timestamp": 1.7e9, "value": 1e999}',
    ),
    (
        "invalid_field",
        orjson.dumps(
            {"user_id": "x" * 10_000, "item_id": "i1", "event_type": "view", "timestamp": 1.7e9}
        ),
    ),
    (
        "unknown_event_type",
        orjson.dumps(
            {"user_id": "u1", "item_id": "i1", "event_type": "teleport", "timestamp": 1.7e9}
        ),
    ),
    ("empty", b""),
    ("malformed_json", bytes(range(256))),
    ("not_an_object", b"[1, 2, 3]"),
    ("too_large", b'{"pad": "' + b"x" * 100_000 + b'"}'),
    (
        "invalid_field",
        orjson.dumps(
            {
                "user_id": "u1",
                "item_id": "i1",
                "event_type": "view",
                "timestamp": 1.7e9,
                "extra": True,
            }
        ),
    ),
    (
        "future_timestamp",
        orjson.dumps({"user_id": "u1", "item_id": "i1", "event_type": "view", "timestamp": 4.1e9}),
    ),  # 2099: would stall learning
]


def test_hostile_input_goes_to_dead_letters(cluster: Cluster) -> None:
    s = planted_stream(5_000, 100, 100, seed=2)
    good = payloads_of(s)
    mixed: list[tuple[bytes, bytes]] = []
    expect_bad: list[tuple[int, str]] = []
    for j, kv in enumerate(good):
        if j % 300 == 0:
            reason, raw = HOSTILE[(j // 300) % len(HOSTILE)]
            expect_bad.append((len(mixed), reason))
            mixed.append((b"evil", raw))
        mixed.append(kv)
    for reason, raw in HOSTILE:  # every kind at least once
        expect_bad.append((len(mixed), reason))
        mixed.append((b"evil", raw))
    conf: dict[str, Any] = {"message.max.bytes": 2_000_000}
    producer = kafka_io.producer(KafkaSettings(bootstrap_servers=cluster.kafka), **conf)
    for key, value in mixed:
        producer.produce(cluster.topics.interactions, value=value, key=key)
    assert producer.flush(30) == 0
    updater = cluster.start("updater", "updater")
    cluster.wait_metric("updater", "stream_mf_events_consumed_total", len(mixed))
    cluster.wait_metric("updater", "stream_mf_events_applied_total", len(good))
    time.sleep(0.3)
    assert cluster.metric("updater", "stream_mf_events_applied_total") == len(good)
    assert cluster.metric("updater", "stream_mf_events_dead_lettered_total") == len(expect_bad)
    assert updater.alive()
    consumer = Consumer(
        {
            "bootstrap.servers": cluster.kafka,
            "group.id": "dlt-check",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
        }
    )
    consumer.assign([TopicPartition(cluster.topics.dead_letter, 0, 0)])
    seen: dict[int, tuple[str, bytes, dict[str, bytes]]] = {}
    end = time.monotonic() + 30
    while len(seen) < len(expect_bad) and time.monotonic() < end:
        for m in consumer.consume(100, 0.5):
            if m.error():
                continue
            h = kafka_io.headers_dict(m.headers())
            seen[int(h["original.offset"])] = (h["error.reason"].decode(), m.value() or b"", h)
    consumer.close()
    assert sorted(seen) == [pos for pos, _ in expect_bad]
    for pos, reason in expect_bad:
        got_reason, value, h = seen[pos]
        assert got_reason == reason, (pos, mixed[pos][1][:80], h.get("error.message"))
        assert value == mixed[pos][1]
        assert h["original.topic"].decode() == cluster.topics.interactions
        assert h["original.partition"] == b"0" and h["error.message"]
    with StateStore(cluster.state, secondary=cluster.work / "sec") as follower:
        assert follower.events_applied() == len(good)


def test_two_query_processes_and_freshness(cluster: Cluster) -> None:
    s = planted_stream(10_000, 300, 200, seed=4)
    cluster.start("updater", "updater", "--max-batch-seconds", "0.05")
    q1 = cluster.start("query", "query-1")
    q2 = cluster.start("query", "query-2")
    send(cluster.kafka, cluster.topics.interactions, payloads_of(s))
    cluster.wait_metric("updater", "stream_mf_events_applied_total", 10_000)
    client = client_for(cluster)
    try:
        wait_for_model(client, "u1")
        end = time.monotonic() + 40
        while time.monotonic() < end:
            for u in range(100):
                client.send({"user_id": f"u{u}"})
            assert len(client.collect(timeout=20)) == 100
            if min(cluster.metric(q, "stream_mf_requests_total") for q in ("query-1", "query-2")):
                break
        counts = [cluster.metric(q, "stream_mf_requests_total") for q in ("query-1", "query-2")]
        assert min(counts) > 0, f"one query process answered nothing: {counts}"
        assert q1.alive() and q2.alive()
        # a brand-new user: personalized within 1 s of the updater applying its first event
        doc = {
            "user_id": "fresh-user",
            "item_id": "i3",
            "event_type": "view",
            "timestamp": time.time(),
        }
        send(cluster.kafka, cluster.topics.interactions, [(b"fresh-user", orjson.dumps(doc))])
        cluster.wait_metric("updater", "stream_mf_events_applied_total", 10_001, timeout=10)
        applied_at = time.monotonic()
        strategy = None
        while time.monotonic() - applied_at < 1.0:
            r = client.ask({"user_id": "fresh-user", "k": 5}, timeout=1.0)
            strategy = r.strategy
            if strategy == "personalized":
                break
        assert strategy == "personalized", f"still {strategy} 1 s after the event was applied"
        assert time.monotonic() - applied_at < 1.5
    finally:
        client.close()


def test_invalid_request_gets_an_error_reply(cluster: Cluster) -> None:
    s = planted_stream(2_000, 50, 50, seed=8)
    cluster.start("updater", "updater")
    cluster.start("query", "query-1")
    send(cluster.kafka, cluster.topics.interactions, payloads_of(s))
    cluster.wait_metric("updater", "stream_mf_events_applied_total", 2_000)
    client = client_for(cluster)
    try:
        wait_for_model(client, "u1")
        r = client.ask({"request_id": "bad-1", "kind": "recommend", "k": -3})
        assert r.request_id == "bad-1" and r.error and "k: Input should be greater" in r.error
        r = client.ask({"request_id": "bad-2", "kind": "similar_items", "item_id": "nope"})
        assert r.error and "not known" in r.error
        # expired requests are dropped and counted, never answered
        rid = client.send({"user_id": "u1"}, deadline_ms=int(time.time() * 1000) - 1000)
        assert rid not in client.collect(timeout=2)
        assert cluster.metric("query-1", "stream_mf_requests_expired_total") >= 1
    finally:
        client.close()
