"""Full ALS rebuilds inside the running updater: nothing lost, no stop, crash-safe."""

from __future__ import annotations

import time

import numpy as np
import orjson
import pytest

from consumers import kafka_io
from consumers.processes import metric_sum, scrape
from consumers.publish import publish
from consumers.settings import KafkaSettings
from stream_mf.store import MODEL_CFS, StateStore, raw_keys
from tests.integration.conftest import Cluster
from tests.integration.test_services import client_for, payloads_of, send, wait_for_model
from tests.synthetic import planted_stream

pytestmark = pytest.mark.integration

REBUILD_ENV = {
    "STREAM_MF_REBUILD__EVERY_EVENTS": "15000",
    "STREAM_MF_REBUILD__ITERATIONS": "4",
    "STREAM_MF_REBUILD__GUARD_EVENTS": "200",
    "STREAM_MF_REBUILD__GUARD_TIMEOUT_S": "3",
    "STREAM_MF_REBUILD__GUARD_MARGIN": "1.0",
}


def test_rebuild_during_a_live_stream_loses_nothing(cluster: Cluster) -> None:
    s = planted_stream(60_000, 3000, 2000, n_groups=10, seed=21)
    payloads = payloads_of(s)
    cluster.start("updater", "updater", "--max-batch-seconds", "0.05", env=REBUILD_ENV)
    cluster.start("query", "query-1")
    cluster.wait_metric("updater", "stream_mf_batches_total", 0, timeout=30)
    producer = kafka_io.producer(KafkaSettings(bootstrap_servers=cluster.kafka))
    # a steady stream (about 12k events/s), so the rebuild overlaps with ingestion
    consumed_while_rebuilding: list[float] = []

    def watch(_done: int) -> None:
        m = scrape(cluster.url("updater"))
        if metric_sum(m, "stream_mf_rebuild_running") == 1:
            consumed_while_rebuilding.append(metric_sum(m, "stream_mf_events_consumed_total"))

    sent = publish(
        producer, cluster.topics.interactions, payloads, rate=12_000, progress=False, on_chunk=watch
    )
    assert sent == len(payloads)
    cluster.wait_metric("updater", "stream_mf_events_applied_total", len(payloads), timeout=90)
    cluster.wait_metric("updater", "stream_mf_rebuild_swaps_total", 1, timeout=60)
    m = scrape(cluster.url("updater"))
    assert m['stream_mf_rebuild_swaps_total{decision="swapped"}'] >= 1
    assert metric_sum(m, "stream_mf_rebuild_rows_resolved_total") > 0
    # ingestion went on while a rebuild was in flight
    assert len(consumed_while_rebuilding) >= 2
    assert consumed_while_rebuilding[-1] > consumed_while_rebuilding[0]
    client = client_for(cluster)
    try:
        wait_for_model(client, "u1")
        end = time.monotonic() + 10
        while time.monotonic() < end:
            r = client.ask({"user_id": "u1", "k": 5})
            if r.model_version >= 1:
                break
            time.sleep(0.2)
        assert r.model_version >= 1 and r.strategy == "personalized" and len(r.items) == 5
    finally:
        client.close()
    cluster.stop_all()
    with StateStore(cluster.state) as store:
        state = store.load()
        assert store.generation() >= 1 and state.model_version >= 1
        assert state.events_applied == len(payloads)
        assert int(state.users.count[: state.users.n].sum()) == len(payloads)
        assert sum(store.offsets().values()) == len(payloads)


def request_rebuild(c: Cluster) -> None:
    producer = kafka_io.producer(KafkaSettings(bootstrap_servers=c.kafka))
    producer.produce(c.topics.control, value=orjson.dumps({"command": "rebuild"}))
    assert producer.flush(10) == 0


def test_sigkill_during_rebuilds_leaves_a_model_that_loads_and_serves(cluster: Cluster) -> None:
    s = planted_stream(40_000, 3000, 2000, n_groups=10, seed=22)
    payloads = payloads_of(s)
    send(cluster.kafka, cluster.topics.interactions, payloads)
    # rebuilds only on request; with no new events the guard waits out its timeout, so a
    # rebuild spans fit, guard, catch-up and swap over a few seconds
    env = {**REBUILD_ENV, "STREAM_MF_REBUILD__EVERY_EVENTS": "1000000000"}
    rng = np.random.default_rng(5)
    kills_in_rebuild = 0
    for _ in range(6):
        p = cluster.start("updater", "updater", env=env)
        cluster.wait_metric("updater", "stream_mf_batches_total", 0, timeout=30)
        running = False
        end = time.monotonic() + 30
        next_request = 0.0
        while time.monotonic() < end and not running:
            if time.monotonic() >= next_request:
                request_rebuild(cluster)
                next_request = time.monotonic() + 2.0
            time.sleep(0.05)
            running = cluster.metric("updater", "stream_mf_rebuild_running") == 1
        assert running, p.log_tail()
        time.sleep(float(rng.uniform(0.0, 4.0)))
        kills_in_rebuild += cluster.metric("updater", "stream_mf_rebuild_running") == 1
        p.kill()
        cluster.procs.remove(p)
        with StateStore(cluster.state) as store:
            state = store.load()
            gen = store.generation()
            # one generation only, complete: every user and item has its factor row
            for cf in MODEL_CFS:
                gens = {k[:4] for k in raw_keys(store.cf[cf])}
                assert gens <= {gen.to_bytes(4, "big")}, (cf, gens, gen)
            assert np.all(np.isfinite(state.users.factors[: state.users.n]))
            assert state.events_applied == int(state.items.count[: state.items.n].sum())
            assert state.events_applied <= sum(store.offsets().values())
    assert kills_in_rebuild >= 3
    # and after all that, the stream completes and the model serves
    cluster.start("updater", "updater", env=env)
    cluster.start("query", "query-1")
    client = client_for(cluster)
    try:
        wait_for_model(client, "u5")
        with StateStore(cluster.state, secondary=cluster.work / "sec") as follower:
            end = time.monotonic() + 60
            while sum(follower.offsets().values()) < len(payloads) and time.monotonic() < end:
                time.sleep(0.3)
                follower.catch_up()
            assert follower.events_applied() == len(payloads)
    finally:
        client.close()
