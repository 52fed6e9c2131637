"""A model store ahead of its topic: the embedded broker restarted (it keeps topics in memory, so
they are gone) and the topic was recreated. The stored next offset lies beyond the new log's
end, and a consumer fetching there would wait forever while showing lag 0. A real updater
process against a real broker must stop with the documented exit code under `fail`, and under
each resuming policy apply exactly the events it says it applies.

The module has a broker of its own, restarted on the same port before each test: that restart
is the scenario.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import TopicPartition

from consumers import kafka_io
from consumers.client import RecClient
from consumers.local_broker import EmbeddedBroker
from consumers.offset_gap import verified_end
from consumers.processes import wait_until
from consumers.settings import KafkaSettings, TopicSettings
from consumers.topics import create_topics
from consumers.updater import EXIT_OFFSET_GAP
from stream_mf.store import StateStore
from tests.integration.conftest import Cluster, make_topics

OLD = 120  # events applied from the topic before the broker lost it


class Broker:
    """The module's broker, replaced by a new one on the same port at every restart."""

    def __init__(self) -> None:
        self.b = EmbeddedBroker().start()
        self.kafka = self.b.bootstrap_servers

    def restart(self) -> None:
        """Stop the broker and start a new one on the same port: every topic is gone."""
        port = self.b.port
        self.b.stop(timeout=1.0)
        self.b = EmbeddedBroker(port=port).start()


def publish(kafka: str, topic: str, users: list[str]) -> None:
    p = kafka_io.producer(KafkaSettings(bootstrap_servers=kafka))
    now = time.time()
    for j, u in enumerate(users):
        doc = {"user_id": u, "item_id": f"i{j % 7}", "event_type": "view", "timestamp": now}
        p.produce(topic, key=u.encode(), value=orjson.dumps(doc))
    assert p.flush(15) == 0


def stored(state: Path) -> tuple[dict[tuple[str, int], int], int, list[str]]:
    """Offsets, events applied and every known user, read from the store on disk."""
    with StateStore(state) as store:
        offsets, applied = store.offsets(), store.events_applied()
        users = list(store.load().users.index)
    return offsets, applied, users


def create(kafka: str, topics: TopicSettings) -> None:
    create_topics(
        kafka,
        {
            topics.interactions: 1,
            topics.dead_letter: 1,
            topics.requests: 2,
            topics.responses: 1,
            topics.control: 1,
        },
    )


@pytest.fixture(scope="module")
def applied_store(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Broker, TopicSettings, Path]]:
    """A broker, and a store a real updater wrote after applying OLD events from its topic
    (each test starts from a copy of it: one updater run, not three)."""
    broker = Broker()
    try:
        topics = make_topics(broker.kafka)
        c = Cluster(broker.kafka, topics, tmp_path_factory.mktemp("template"))
        try:
            publish(broker.kafka, topics.interactions, [f"old{j}" for j in range(OLD)])
            c.start("updater", "first")
            c.wait_metric("first", "stream_mf_events_applied_total", OLD)
            assert c.procs[-1].stop() == 0
        finally:
            c.stop_all()
        assert stored(c.state)[0] == {(topics.interactions, 0): OLD}
        yield broker, topics, c.state
    finally:
        broker.b.stop(timeout=1.0)


@pytest.fixture
def scenario(
    applied_store: tuple[Broker, TopicSettings, Path], tmp_path: Path
) -> Iterator[tuple[Cluster, int]]:
    """The broker restarted (its topics gone) and the topics were recreated with `fresh`
    events: the store's next offset (OLD) is beyond the new log's end."""
    broker, topics, template = applied_store
    fresh = 30
    broker.restart()
    create(broker.kafka, topics)
    publish(broker.kafka, topics.interactions, [f"fresh{j}" for j in range(fresh)])
    c = Cluster(broker.kafka, topics, tmp_path)
    shutil.copytree(template, c.state)
    try:
        yield c, fresh
    finally:
        c.stop_all()


def test_fail_exits_with_the_documented_code_and_says_what_to_do(
    scenario: tuple[Cluster, int],
) -> None:
    c, _fresh = scenario
    p = c.start("updater", "fail")  # the default policy
    assert p.proc is not None
    code = p.proc.wait(60)
    log = p.log_tail(20_000)
    assert code == EXIT_OFFSET_GAP, log
    topic = c.topics.interactions
    assert f"{topic}[0]: the model store's next offset {OLD} is beyond the log's end" in log
    assert "--on-offset-gap resume-from-start" in log and "STREAM_MF_ON_OFFSET_GAP" in log
    assert "Traceback" not in log
    offsets, applied, users = stored(c.state)
    assert offsets == {(topic, 0): OLD} and applied == OLD  # nothing moved, nothing applied
    assert not any(u.startswith("fresh") for u in users)


def test_resume_from_start_applies_the_new_log_from_its_first_record(
    scenario: tuple[Cluster, int],
) -> None:
    c, fresh = scenario
    c.start("updater", "start", "--on-offset-gap", "resume-from-start")
    c.wait_metric("start", "stream_mf_events_applied_total", fresh)
    assert c.metric("start", 'stream_mf_offset_gaps_total{kind="ahead_of_log"}') == 1
    assert c.metric("start", "stream_mf_events_lost_total") == 0
    publish(c.kafka, c.topics.interactions, ["late0", "late1"])
    c.wait_metric("start", "stream_mf_events_applied_total", fresh + 2)
    assert c.procs[-1].stop() == 0
    assert "resuming at offset 0 instead of 120" in c.procs[-1].log_tail(20_000)
    offsets, applied, users = stored(c.state)
    assert offsets == {(c.topics.interactions, 0): fresh + 2}
    assert applied == OLD + fresh + 2
    assert {f"fresh{j}" for j in range(fresh)} <= set(users)


def test_resume_from_end_applies_only_events_published_after(
    scenario: tuple[Cluster, int],
) -> None:
    c, fresh = scenario
    c.start("updater", "end", "--on-offset-gap", "resume-from-end")
    log = c.procs[-1]
    wait_until(
        lambda: f"resuming at offset {fresh} instead of {OLD}" in log.log_tail(20_000),
        60,
        0.1,
        "the updater to resume at the log's end",
    )
    assert c.metric("end", 'stream_mf_offset_gaps_total{kind="ahead_of_log"}') == 1
    late = [f"late{j}" for j in range(7)]
    publish(c.kafka, c.topics.interactions, late)
    c.wait_metric("end", "stream_mf_events_applied_total", len(late))
    time.sleep(1.0)
    assert c.metric("end", "stream_mf_events_applied_total") == len(late)
    assert log.stop() == 0
    offsets, applied, users = stored(c.state)
    assert offsets == {(c.topics.interactions, 0): fresh + len(late)}
    assert applied == OLD + len(late)
    assert set(late) <= set(users)
    assert not any(u.startswith("fresh") for u in users)


def test_the_end_is_verified_by_fetching_not_taken_from_the_watermark(kafka: str) -> None:
    """The embedded broker's high watermark stops at the last batch's first record (100
    records in one batch read as an end of 1): a store at the true end is not a gap, and the
    end a resume would use is the true one."""
    topics = make_topics(kafka)
    t = topics.interactions
    publish(kafka, t, [f"u{j}" for j in range(100)])
    conf: dict[str, Any] = {"auto.offset.reset": "error"}
    probe = kafka_io.consumer(KafkaSettings(bootstrap_servers=kafka), f"probe-{t}", **conf)
    try:
        low, high = probe.get_watermark_offsets(TopicPartition(t, 0), timeout=5.0)
        assert low == 0 and 1 <= high <= 100
        assert verified_end(probe, t, 0, 100, low, high) == 100  # the store is at the end
        lagged = verified_end(probe, t, 0, 60, low, high)
        assert lagged is not None and lagged >= 60  # the watermark lagged: no gap
        assert verified_end(probe, t, 0, 150, low, high) == 100  # a gap, with the true end
    finally:
        probe.close()


def test_a_running_updater_notices_that_its_broker_lost_the_topic(
    applied_store: tuple[Broker, TopicSettings, Path], tmp_path: Path
) -> None:
    """Checked while running too (every `offset_check_seconds`): on the embedded broker a
    fetch beyond the end returns nothing, not OFFSET_OUT_OF_RANGE, so without the check the
    updater would wait at its old offset forever. The steady state, where the watermark lags
    the store's offset on this broker, is not taken for a gap."""
    broker, topics, template = applied_store
    broker.restart()
    create(broker.kafka, topics)
    publish(broker.kafka, topics.interactions, [f"same{j}" for j in range(OLD)])  # end == OLD
    c = Cluster(broker.kafka, topics, tmp_path)
    shutil.copytree(template, c.state)
    try:
        env = {"STREAM_MF_OFFSET_CHECK_SECONDS": "0.5"}
        p = c.start("updater", "run", "--on-offset-gap", "resume-from-start", env=env)
        c.wait_metric("run", "stream_mf_batches_total", 0)
        time.sleep(2.0)  # a few checks against a lagging watermark
        assert c.metric("run", "stream_mf_offset_gaps_total") == 0
        assert c.metric("run", "stream_mf_events_applied_total") == 0
        broker.restart()
        create(broker.kafka, topics)
        publish(broker.kafka, topics.interactions, [f"fresh{j}" for j in range(10)])
        c.wait_metric("run", "stream_mf_events_applied_total", 10)
        assert c.metric("run", 'stream_mf_offset_gaps_total{kind="ahead_of_log"}') == 1
        assert p.stop() == 0
        offsets, applied, users = stored(c.state)
        assert offsets == {(topics.interactions, 0): 10} and applied == OLD + 10
        assert {f"fresh{j}" for j in range(10)} <= set(users)
    finally:
        c.stop_all()


def test_the_query_service_answers_after_its_broker_restarted(
    applied_store: tuple[Broker, TopicSettings, Path], tmp_path: Path
) -> None:
    """Replies are produced without idempotence: an idempotent producer's id means nothing to
    a restarted broker (or a new cluster), and librdkafka then failed every reply
    (PRODUCER_FENCED, or timeouts) until the process was restarted. A duplicate reply is
    harmless: clients match replies by correlation id."""
    broker, topics, template = applied_store
    broker.restart()
    create(broker.kafka, topics)
    c = Cluster(broker.kafka, topics, tmp_path)
    shutil.copytree(template, c.state)
    settings = KafkaSettings(bootstrap_servers=broker.kafka)
    try:
        # publishes the model log (the broker lost it with its topics), then idles
        c.start("updater", "u", "--on-offset-gap", "resume-from-end")
        c.start("query", "q")
        c.wait_metric("q", "stream_mf_requests_invalid_total", 0)
        client = RecClient(settings, topics.requests, topics.responses)
        try:
            assert client.ask({"kind": "popular", "k": 3}, timeout=30).error is None
        finally:
            client.close()
        broker.restart()
        create(broker.kafka, topics)
        client = RecClient(settings, topics.requests, topics.responses)
        try:
            reply = client.ask({"kind": "popular", "k": 3}, timeout=45)
            assert reply.error is None and len(reply.items) == 3
        finally:
            client.close()
    finally:
        c.stop_all()
