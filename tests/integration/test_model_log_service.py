"""The model log with real processes: query processes that have only the broker follow the
model through rebuild swaps without mixing generations, stay fresh, and restart from the latest
snapshot, never from older records."""

from __future__ import annotations

import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from confluent_kafka import TopicPartition

from consumers import kafka_io
from consumers.model_log import read_model
from consumers.processes import metric_sum, scrape, wait_until
from consumers.settings import KafkaSettings, TopicSettings, UpdaterSettings
from stream_mf.model_log import BEGIN_KEY, MARKER_KEY, Marker
from tests.integration.conftest import Cluster
from tests.integration.test_rebuild_service import request_rebuild
from tests.integration.test_services import client_for, wait_for_model

pytestmark = pytest.mark.integration

REBUILD_ENV = {
    "STREAM_MF_REBUILD__EVERY_EVENTS": "1000000000",  # on request only
    "STREAM_MF_REBUILD__ITERATIONS": "3",
    "STREAM_MF_REBUILD__GUARD_EVENTS": "50",
    "STREAM_MF_REBUILD__GUARD_TIMEOUT_S": "1",
    "STREAM_MF_REBUILD__GUARD_MARGIN": "1.0",  # swap whatever the guard says
}


class LiveStream:
    """Events stamped with the wall clock at `rate` a second, from a thread (freshness is
    measured from event time, so the events must be live)."""

    def __init__(self, kafka: str, topic: str, rate: float, users: int = 2000, items: int = 800):
        self.producer = kafka_io.producer(
            KafkaSettings(bootstrap_servers=kafka), None, **{"linger.ms": 5}
        )
        self.topic, self.rate = topic, rate
        self.users, self.items = users, items
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rng = np.random.default_rng(3)
        t0 = time.monotonic()
        while not self._stop.is_set():
            due = int((time.monotonic() - t0) * self.rate) - self.sent
            now = time.time()
            for _ in range(max(0, due)):
                u = int(rng.integers(self.users))
                i = int((u % 10) * (self.items // 10) + rng.integers(self.items // 10))
                doc = {"user_id": f"u{u}", "item_id": f"i{i}", "event_type": "view",
                       "timestamp": now}  # fmt: skip
                self.producer.produce(self.topic, key=f"u{u}".encode(), value=orjson.dumps(doc))
                self.sent += 1
            self.producer.poll(0)
            time.sleep(0.005)
        self.producer.flush(10)

    def __enter__(self) -> LiveStream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)


def quantile_from_buckets(
    metrics: dict[str, float], name: str, q: float, before: dict[str, float] | None = None
) -> float:
    """The upper bound of the bucket the q-quantile falls in (a Prometheus histogram), over
    what was observed since `before`."""
    rows = []
    for key, v in metrics.items():
        m = re.fullmatch(rf'{name}_bucket\{{le="([^"]+)"\}}', key)
        if m:
            rows.append((float(m.group(1)), v - (before or {}).get(key, 0.0)))
    rows.sort()
    total = rows[-1][1]
    assert total > 0, f"no {name} observations"
    for le, count in rows:
        if count >= q * total:
            return le
    return float("inf")


def test_readers_follow_rebuild_swaps_fresh_and_never_mixed(cluster: Cluster) -> None:
    """Two query processes with nothing but the broker, answering all the time while the
    updater swaps in rebuilt models: no request ever meets user rows of one generation and item
    rows of another (the check inside the reader would answer with an error and count it),
    every record parses, and freshness stays within 1 s (p99)."""
    cluster.start("updater", "updater", "--max-batch-seconds", "0.05", env=REBUILD_ENV)
    queries = [cluster.start("query", f"query-{j}") for j in (1, 2)]
    versions: set[int] = set()
    errors: list[str] = []
    with LiveStream(cluster.kafka, cluster.topics.interactions, rate=1000):
        client = client_for(cluster)
        try:
            wait_for_model(client, "u1")
            # steady state from here: the first events waited for the processes to start
            time.sleep(2.0)
            before = {q.name: scrape(cluster.url(q.name)) for q in queries}
            swaps = 0
            end = time.monotonic() + 90
            next_rebuild = 0.0
            while swaps < 3 and time.monotonic() < end:
                if time.monotonic() >= next_rebuild and (
                    cluster.metric("updater", "stream_mf_rebuild_running") == 0
                ):
                    request_rebuild(cluster)
                    next_rebuild = time.monotonic() + 3.0
                sent = [client.send({"user_id": f"u{u}", "k": 5}) for u in range(0, 400, 7)]
                sent += [client.send({"kind": "because", "user_id": "u1", "item_id": "i1"})]
                for resp in client.collect(timeout=10).values():
                    versions.add(resp.model_version)
                    if resp.error and "has no events" not in resp.error:
                        errors.append(resp.error)
                swaps = int(cluster.metric("updater", "stream_mf_rebuild_swaps_total"))
            assert swaps >= 3, "fewer than 3 rebuilds swapped"
            time.sleep(1.0)
        finally:
            client.close()
    assert not errors, errors[:5]
    assert len(versions) >= 3, versions  # the answers followed the swaps
    for q in queries:
        m = scrape(cluster.url(q.name))
        assert m['stream_mf_errors_total{kind="mixed_generation"}'] == 0
        assert metric_sum(m, "stream_mf_model_log_skipped_total") == 0
        p99 = quantile_from_buckets(m, "stream_mf_freshness_seconds", 0.99, before[q.name])
        assert p99 <= 1.0, {k: v for k, v in m.items() if k.startswith("stream_mf_freshness")}
        assert metric_sum(m, "stream_mf_model_log_applied_commit") > 0
    assert "Traceback" not in "".join(q.log_tail(200_000) for q in queries)


def _snapshot_begins(kafka: str, topic: str) -> list[int]:
    """Offsets of every BEGIN record whose snapshot marker followed (complete snapshots)."""
    c = kafka_io.consumer(KafkaSettings(bootstrap_servers=kafka), "begins")
    c.assign([TopicPartition(topic, 0, 0)])
    begins: list[int] = []
    open_at: int | None = None
    quiet = time.monotonic() + 2.0
    try:
        while time.monotonic() < quiet:
            for m in c.consume(5000, 0.1):
                if m.error() is not None:
                    continue
                quiet = time.monotonic() + 2.0
                if m.key() == BEGIN_KEY:
                    open_at = m.offset()
                elif (
                    m.key() == MARKER_KEY
                    and open_at is not None
                    and Marker.decode(kafka_io.payload(m)).snapshot
                ):
                    begins.append(open_at)
                    open_at = None
    finally:
        c.close()
    return begins


def test_a_restarted_reader_starts_at_the_latest_snapshot(cluster: Cluster) -> None:
    """A query process killed and restarted reads from the latest snapshot on: no record
    older than it (the log keeps everything on the embedded broker)."""
    cluster.start("updater", "updater", "--max-batch-seconds", "0.05", env=REBUILD_ENV)
    with LiveStream(cluster.kafka, cluster.topics.interactions, rate=500):
        cluster.wait_metric("updater", "stream_mf_events_applied_total", 1000)
        for j in range(2):  # two swaps: two snapshots after the first
            request_rebuild(cluster)
            cluster.wait_metric("updater", "stream_mf_rebuild_swaps_total", j + 1, timeout=60)
        q = cluster.start("query", "query-1")
        wait_until(lambda: "model caught up" in q.log_tail(100_000), 60, what="caught up")
        q.kill()
        cluster.procs.remove(q)
        request_rebuild(cluster)  # one more snapshot while it is down
        cluster.wait_metric("updater", "stream_mf_rebuild_swaps_total", 3, timeout=60)
        q2 = cluster.start("query", "query-1")
        wait_until(lambda: "model caught up" in q2.log_tail(100_000), 60, what="caught up")
        line = next(s for s in q2.log_tail(100_000).splitlines() if "model caught up" in s)
    begins = _snapshot_begins(cluster.kafka, cluster.topics.model)
    got = re.search(r"read from offset (\d+) \(the latest snapshot, at (\d+)\)", line)
    assert got is not None, line
    first, snap = int(got.group(1)), int(got.group(2))
    assert len(begins) >= 4, begins  # the first snapshot and one per swap
    assert first == snap, line  # nothing before the snapshot was read
    # the latest complete snapshot when it started: none after it had begun yet, or it is it
    later = [b for b in begins if b > snap]
    assert snap in begins and snap >= begins[-2], (snap, begins)
    assert len(later) <= 1, (snap, begins)
    assert snap > 0
    # and a fresh reader from the log serves the live generation
    reader, first_read = read_model(KafkaSettings(bootstrap_servers=cluster.kafka),
                                    cluster.topics.model)  # fmt: skip
    assert reader.live is not None and first_read in begins
    assert first_read >= snap


def test_periodic_snapshots_go_to_their_own_topic_and_readers_start_there(
    cluster: Cluster,
) -> None:
    """Periodic snapshots go to the snapshot topic, never to the model topic a replica tails
    (it holds one snapshot, the first); a reader started later reads the latest one there,
    then the model topic from its tail point, nothing older; and a fresh reader from there
    equals the store, bit for bit."""
    from tests.reliability.harness import log_model_mismatches

    env = {"STREAM_MF_MODEL_LOG_SNAPSHOT_RATIO": "0.01",
           "STREAM_MF_MODEL_LOG_SNAPSHOT_MIN_SECONDS": "1"}  # fmt: skip
    topics = cluster.topics
    kafka = KafkaSettings(bootstrap_servers=cluster.kafka)
    up = cluster.start("updater", "updater", "--max-batch-seconds", "0.05", env=env)
    tailing = cluster.start("query", "query-1")
    with LiveStream(cluster.kafka, topics.interactions, rate=500):
        wait_until(lambda: up.log_tail(200_000).count("model log snapshot (on") >= 2, 60,
                   what="two periodic snapshots")  # fmt: skip
        q = cluster.start("query", "query-2")
        wait_until(lambda: "model caught up" in q.log_tail(100_000), 60, what="caught up")
        time.sleep(1.0)
    line = next(s for s in q.log_tail(100_000).splitlines() if "model caught up" in s)
    side = re.escape(topics.model_snapshots)
    got = re.search(r"read from offset (\d+) \(the latest snapshot, at (\d+)\) to \d+; "
                    rf"the snapshot from '{side}' at (\d+)", line)  # fmt: skip
    assert got is not None, line
    first, snap = int(got.group(1)), int(got.group(2))
    assert first == snap > 0, line  # nothing older than the snapshot's tail point was read
    assert len(_snapshot_begins(cluster.kafka, topics.model)) == 1  # the first one only
    assert len(_snapshot_begins(cluster.kafka, topics.model_snapshots)) >= 2
    for name in ("query-1", "query-2"):
        m = scrape(cluster.url(name))
        assert metric_sum(m, "stream_mf_model_log_skipped_total") == 0
        assert metric_sum(m, "stream_mf_model_log_applied_commit") > 0
    # a fresh reader equals the store (once coalesced item rows had their time to go out)
    end = time.monotonic() + 40
    mismatches = ["not compared"]
    while mismatches and time.monotonic() < end:
        time.sleep(2.5)
        sec = cluster.work / f"sec-{time.monotonic_ns()}"
        mismatches = log_model_mismatches(cluster.kafka, topics.model, cluster.state, sec)
    assert not mismatches, mismatches
    reader, first_read = read_model(kafka, topics.model)
    marker = reader.last_marker
    assert marker is not None and marker.snap_topic == topics.model_snapshots
    assert first_read == marker.snap
    assert "Traceback" not in tailing.log_tail(200_000) + q.log_tail(200_000)


def test_the_snapshot_topic_keeps_a_named_snapshot_while_the_next_is_written(
    kafka: str, tmp_path: Path
) -> None:
    """The snapshot topic the updater creates holds back compaction (`min.compaction.lag.ms`)
    for longer than a periodic snapshot takes to be written and named: without it, the rows
    and `B` of a newer snapshot, half written (or never finished) in a closed segment, compact
    away those of the one the log's markers still name, and no replica can start."""
    from confluent_kafka.admin import ConfigResource

    from consumers.model_log import SNAPSHOT_COMPACTION_LAG_MS, ModelLogPublisher
    from consumers.settings import TopicSettings, UpdaterSettings
    from consumers.topics import admin_client
    from stream_mf.store import StateStore

    s = uuid.uuid4().hex[:8]
    settings = UpdaterSettings(
        kafka=KafkaSettings(bootstrap_servers=kafka),
        topics=TopicSettings(model=f"model-{s}"),
        state_dir=tmp_path / "state",
    )
    store = StateStore(settings.state_dir)
    try:
        ModelLogPublisher(settings, store)._look()  # what the updater does at start
    finally:
        store.close()
    res = ConfigResource("topic", settings.topics.model_snapshots)
    admin = admin_client(kafka, None)
    got = admin.describe_configs([res])[res].result(timeout=15)
    assert got["cleanup.policy"].value == "compact"
    lag = got.get("min.compaction.lag.ms")
    assert lag is not None and int(lag.value) == SNAPSHOT_COMPACTION_LAG_MS
    # longer than a snapshot may take to be named: its slices, the wait for its
    # acknowledgements, then one retry after `model_log_snapshot_min_seconds`
    from consumers.model_log import SIDE_ACK_S

    lag_s = SNAPSHOT_COMPACTION_LAG_MS / 1e3
    assert lag_s > 2 * (SIDE_ACK_S + settings.model_log_snapshot_min_seconds)


def _restarted_publisher(
    kafka: str, tmp_path: Path, snap_topic: str
) -> tuple[Any, Any, Any, UpdaterSettings]:
    """A publisher started on a log whose last marker (commit 0, nothing pending) names a
    periodic snapshot on `snap_topic` (`<model>-snapshots` by default), and its model."""
    from consumers.model_log import ModelLogPublisher
    from stream_mf.config import ModelConfig
    from stream_mf.model import OnlineModel
    from stream_mf.state import ModelState
    from stream_mf.store import StateStore
    from tests.synthetic import planted_stream

    s = uuid.uuid4().hex[:8]
    topics = TopicSettings(model=f"model-{s}")
    settings = UpdaterSettings(
        kafka=KafkaSettings(bootstrap_servers=kafka), topics=topics, state_dir=tmp_path / "st"
    )
    cfg = ModelConfig()
    model = OnlineModel(cfg, ModelState.empty(cfg))
    ev = planted_stream(200, 20, 10, seed=1)
    from stream_mf.model import EventBatch

    model.learn(EventBatch.build(ev.user_ids(), ev.item_ids(), np.ones(200), ev.times))
    st = model.state
    side = snap_topic or topics.model_snapshots
    m = Marker(seq=0, gen=0, version=st.model_version, events=st.events_applied,
               clock=float(st.clock[0]), n_users=st.users.n, n_items=st.items.n, snap=1,
               snap_topic=side, snap_begin=0)  # fmt: skip
    p = kafka_io.producer(settings.kafka, None)
    p.produce(topics.model, key=MARKER_KEY, value=m.encode())
    assert p.flush(10) == 0
    store = StateStore(settings.state_dir)
    pub = ModelLogPublisher(settings, store)
    pub.start(st)
    wait_until(pub._looked, 30, what="the publisher's look at the log's end")
    return pub, store, st, settings


def test_a_marker_naming_another_snapshot_topic_is_not_up_to_date(
    kafka: str, tmp_path: Path
) -> None:
    """An updater whose snapshot topic is not the one the log's last marker names (its name
    was changed) cannot name that snapshot (its markers would send readers to the tail point
    on the model topic as if a snapshot began there): it publishes a snapshot."""
    pub, store, _st, _s = _restarted_publisher(kafka, tmp_path, "another-snapshots")
    try:
        assert pub.need_snapshot
    finally:
        pub.close()
        store.close()


def test_a_swap_after_a_restart_tombstones_the_snapshot_topic_rows(
    kafka: str, tmp_path: Path
) -> None:
    """The rows the snapshot topic holds of the generation a swap replaces get tombstones,
    also when they were written before the updater restarted (else every restart followed
    by a swap left a whole snapshot there for good)."""
    from stream_mf.model_log import user_key
    from stream_mf.store import CommitInfo

    pub, store, st, settings = _restarted_publisher(kafka, tmp_path, "")
    try:
        info = CommitInfo(state=st, seq=1, users=np.empty(0, np.int64),
                          items=np.empty(0, np.int64), pair_keys=np.empty(0, np.int64),
                          everything=False, generation=1, offsets={}, event_times=None,
                          events=0)  # fmt: skip
        pub.committed(info)  # the rebuild's flip commit
        assert pub.side is not None
        assert pub.side.flush(10) == 0
    finally:
        pub.close()
        store.close()
    c = kafka_io.consumer(settings.kafka, f"t-{uuid.uuid4().hex[:8]}")
    try:
        c.assign([TopicPartition(settings.topics.model_snapshots, 0, 0)])
        keys: dict[bytes | None, bytes | None] = {}
        end = time.monotonic() + 10
        while time.monotonic() < end and len(keys) < st.users.n:
            for m in c.consume(1000, 0.2):
                if m.error() is None:
                    keys[m.key()] = m.value()
    finally:
        c.close()
    for u in range(st.users.n):
        assert user_key(0, u) in keys and keys[user_key(0, u)] is None


def test_a_snapshot_topic_created_without_the_compaction_lag_is_reported(
    kafka: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A snapshot topic that exists already (the previous version created it compacted, with
    no lag; `--if-not-exists` leaves it so) is not changed by creating it: the updater says
    so, and how to set the lag."""
    import logging

    from consumers.model_log import ModelLogPublisher
    from consumers.topics import create_topics
    from stream_mf.store import StateStore

    s = uuid.uuid4().hex[:8]
    settings = UpdaterSettings(
        kafka=KafkaSettings(bootstrap_servers=kafka),
        topics=TopicSettings(model=f"model-{s}"),
        state_dir=tmp_path / "state",
    )
    create_topics(kafka, {settings.topics.model_snapshots: 1}, config={"cleanup.policy": "compact"})
    store = StateStore(settings.state_dir)
    try:
        with caplog.at_level(logging.WARNING, logger="consumers.model_log"):
            ModelLogPublisher(settings, store)._look()
    finally:
        store.close()
    said = [r.getMessage() for r in caplog.records if "min.compaction.lag.ms" in r.getMessage()]
    assert len(said) == 1 and settings.topics.model_snapshots in said[0], said
    assert "--alter" in said[0] and "min.compaction.lag.ms=900000" in said[0], said
