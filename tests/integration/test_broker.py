"""The embedded Tansu broker behaves like Kafka where stream-mf relies on it.

Each test uses its own topics and group ids on one module-scoped broker, so the tests are
independent of order; the ones that stop a broker start their own.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from consumers import kafka_io
from consumers.local_broker import (
    BrokerError,
    EmbeddedBroker,
    kafka_bootstrap,
)
from consumers.settings import KafkaSettings
from consumers.topics import create_topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

log = logging.getLogger(__name__)


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _producer(bootstrap: str, **extra: Any) -> Producer:
    return Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "logger": log, **extra})


def _consumer(bootstrap: str, group: str, **extra: Any) -> Consumer:
    """Short sessions so a group re-forms fast, short fetch waits."""
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1000,
            "max.poll.interval.ms": 10000,
            "fetch.wait.max.ms": 10,
            "fetch.queue.backoff.ms": 10,
            "max.partition.fetch.bytes": 8 * 1024 * 1024,
            "logger": log,
            **extra,
        }
    )


def _consume(consumer: Consumer, count: int, deadline_s: float) -> list[Message]:
    """Consume exactly ``count`` messages (or fail) within ``deadline_s`` seconds."""
    out: list[Message] = []
    deadline = time.monotonic() + deadline_s
    while len(out) < count and time.monotonic() < deadline:
        for msg in consumer.consume(num_messages=min(10000, count - len(out)), timeout=0.5):
            err = msg.error()
            if err is not None:
                raise AssertionError(f"consumer error: {err}")
            out.append(msg)
    assert len(out) == count, f"consumed {len(out)} of {count} in {deadline_s} s"
    return out


def _produce(producer: Producer, topic: str, items: list[tuple[bytes, bytes]]) -> dict[int, int]:
    """Produce (key, value) pairs and flush; return partition -> next offset from the reports."""
    errors: list[KafkaError] = []
    ends: dict[int, int] = {}

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            errors.append(err)
            return
        p, o = kafka_io.position(msg)
        ends[p] = max(ends.get(p, 0), o + 1)

    for key, value in items:
        while True:
            try:
                producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(15) == 0, "messages left undelivered"
    assert not errors, errors[:3]
    return ends


def _committed(consumer: Consumer, topic: str, partitions: int) -> dict[int, int]:
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    return {tp.partition: tp.offset for tp in consumer.committed(tps, timeout=10)}


def test_produce_and_consume_10k_with_commits(broker: EmbeddedBroker) -> None:
    topic = _name("bulk")
    create_topics(broker.bootstrap_servers, {topic: 3})
    n = 10_000
    items = [(f"u{i % 97}".encode(), json.dumps({"i": i}).encode()) for i in range(n)]
    ends = _produce(_producer(broker.bootstrap_servers), topic, items)
    assert sum(ends.values()) == n and len(ends) == 3

    consumer = _consumer(broker.bootstrap_servers, _name("g"))
    try:
        consumer.subscribe([topic])
        msgs = _consume(consumer, n, 20)
        assert sorted(json.loads(kafka_io.payload(m))["i"] for m in msgs) == list(range(n))
        consumer.commit(asynchronous=False)
        assert _committed(consumer, topic, 3) == ends
        # The high watermark from fetch responses is exact (ListOffsets is not: local_broker.py).
        for p, end in ends.items():
            assert consumer.get_watermark_offsets(TopicPartition(topic, p), cached=True)[1] == end
    finally:
        consumer.close()


def test_key_partitioning_keeps_per_key_order(broker: EmbeddedBroker) -> None:
    topic = _name("order")
    create_topics(broker.bootstrap_servers, {topic: 3})
    keys, per_key = 20, 150
    items = [
        (f"user-{k}".encode(), json.dumps({"k": k, "seq": s}).encode())
        for s in range(per_key)
        for k in range(keys)
    ]
    _produce(_producer(broker.bootstrap_servers), topic, items)

    consumer = _consumer(broker.bootstrap_servers, _name("g"))
    try:
        consumer.subscribe([topic])
        msgs = _consume(consumer, keys * per_key, 20)
    finally:
        consumer.close()
    partitions: dict[bytes, set[int]] = defaultdict(set)
    seqs: dict[bytes, list[int]] = defaultdict(list)
    for m in msgs:
        key = m.key() or b""
        partitions[key].add(kafka_io.position(m)[0])
        seqs[key].append(json.loads(kafka_io.payload(m))["seq"])
    assert all(len(p) == 1 for p in partitions.values()), "a key spread over partitions"
    assert len({next(iter(p)) for p in partitions.values()}) > 1, "all keys on one partition"
    assert all(s == list(range(per_key)) for s in seqs.values()), "per-key order broken"


def test_headers_round_trip(broker: EmbeddedBroker) -> None:
    topic = _name("headers")
    create_topics(broker.bootstrap_servers, {topic: 1})
    headers: kafka_io.HeaderList = [
        ("error.reason", b"schema"),
        ("original.offset", b"42"),
        ("binary", bytes(range(256))),
        ("dup", b"1"),
        ("dup", b"2"),
        ("empty", b""),
    ]
    producer = _producer(broker.bootstrap_servers)
    producer.produce(topic, value=b"v", key=b"k", headers=headers)
    producer.produce(topic, value=b"plain", key=b"k")
    assert producer.flush(10) == 0

    consumer = _consumer(broker.bootstrap_servers, _name("g"))
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        first, second = _consume(consumer, 2, 15)
    finally:
        consumer.close()
    assert first.headers() == headers
    assert (first.key(), first.value()) == (b"k", b"v")
    assert second.headers() is None


def test_second_consumer_resumes_from_committed_offsets(broker: EmbeddedBroker) -> None:
    topic, group = _name("resume"), _name("g")
    create_topics(broker.bootstrap_servers, {topic: 3})
    producer = _producer(broker.bootstrap_servers)
    _produce(producer, topic, [(f"u{i}".encode(), str(i).encode()) for i in range(300)])

    first = _consumer(broker.bootstrap_servers, group)
    try:
        first.subscribe([topic])
        done = _consume(first, 120, 15)
        # Commit only what was processed, not what the client happens to have fetched.
        next_offsets: dict[int, int] = {}
        for m in done:
            p, o = kafka_io.position(m)
            next_offsets[p] = max(next_offsets.get(p, 0), o + 1)
        first.commit(
            offsets=[TopicPartition(topic, p, o) for p, o in next_offsets.items()],
            asynchronous=False,
        )
    finally:
        first.close()
    _produce(producer, topic, [(f"u{i}".encode(), str(i).encode()) for i in range(300, 400)])

    second = _consumer(broker.bootstrap_servers, group)
    try:
        second.subscribe([topic])
        rest = _consume(second, 400 - len(done), 25)
        assert second.poll(1.0) is None, "more messages than expected"
    finally:
        second.close()
    seen = Counter(int(kafka_io.payload(m)) for m in [*done, *rest])
    assert set(seen) == set(range(400)) and max(seen.values()) == 1
    starts: dict[int, int] = {}
    for m in rest:
        p, o = kafka_io.position(m)
        starts[p] = min(starts.get(p, o), o)
    for p, o in starts.items():
        assert o == next_offsets.get(p, 0), f"partition {p} resumed at {o}"


def test_pause_and_resume_clients_recover(broker: EmbeddedBroker) -> None:
    topic = _name("pause")
    create_topics(broker.bootstrap_servers, {topic: 1})
    producer = _producer(broker.bootstrap_servers)
    consumer = _consumer(broker.bootstrap_servers, _name("g"))
    try:
        consumer.subscribe([topic])
        _produce(producer, topic, [(b"k", b"before")])
        assert _consume(consumer, 1, 15)[0].value() == b"before"

        broker.pause()
        try:
            assert broker.paused
            # SIGSTOP is asynchronous: wait until the kernel shows the broker stopped
            stat = Path(f"/proc/{broker.pid}/stat")
            deadline = time.monotonic() + 5
            while stat.read_text().rsplit(")", 1)[1].split()[0] != "T":
                assert time.monotonic() < deadline, "the broker never stopped"
                time.sleep(0.01)
            producer.produce(topic, key=b"k", value=b"during")
            assert producer.flush(1.0) == 1, "a paused broker acknowledged a message"
            assert consumer.consume(num_messages=10, timeout=1.0) == []
            time.sleep(1.0)
        finally:
            broker.resume()

        assert producer.flush(15) == 0
        _produce(producer, topic, [(b"k", b"after")])
        values = [m.value() for m in _consume(consumer, 2, 15)]
        assert values == [b"during", b"after"]
        consumer.commit(asynchronous=False)
        assert _committed(consumer, topic, 1) == {0: 3}
    finally:
        consumer.close()


def test_create_topics_is_idempotent_and_checks_partitions(broker: EmbeddedBroker) -> None:
    topic = _name("idem")
    create_topics(broker.bootstrap_servers, {topic: 2})
    create_topics(broker.bootstrap_servers, {topic: 2})
    with pytest.raises(ValueError, match="has 2 partitions"):
        create_topics(broker.bootstrap_servers, {topic: 4})


def test_stop_leaves_no_process() -> None:
    b = EmbeddedBroker().start()
    pid = b.pid
    producer = _producer(b.bootstrap_servers)  # an open connection slows Tansu's SIGTERM exit
    producer.produce(_name("stop"), b"x")
    assert producer.flush(10) == 0
    b.stop(timeout=1.0)
    assert not b.is_running()
    assert not os.path.exists(f"/proc/{pid}"), "broker process not reaped"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    b.stop()  # idempotent


def _exited(pid: int) -> bool:
    """Our child has exited (a zombie until reaped), or is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_sigterm_alone_stops_the_broker_once_clients_close() -> None:
    """Tansu waits for open connections before exiting on SIGTERM (so the demo's broker used to
    need SIGKILL): clients closed through kafka_io first, SIGTERM is enough."""
    b = EmbeddedBroker().start()
    try:
        topic = _name("sigterm")
        create_topics(b.bootstrap_servers, {topic: 1})
        kafka = KafkaSettings(bootstrap_servers=b.bootstrap_servers)
        producer = kafka_io.producer(kafka)
        for n in range(1000):
            producer.produce(topic, str(n).encode())
        assert kafka_io.close_producer(producer) == 0
        consumer = kafka_io.consumer(kafka, _name("g"))
        consumer.assign([TopicPartition(topic, 0, 0)])
        assert len(consumer.consume(1000, 5.0)) > 0
        consumer.close()
        os.killpg(b.pid, signal.SIGTERM)
        deadline = time.monotonic() + 2.0  # EmbeddedBroker.stop sends SIGKILL after 3 s
        while not _exited(b.pid):
            assert time.monotonic() < deadline, "the broker ignored SIGTERM"
            time.sleep(0.02)
    finally:
        b.stop()


def test_stop_while_paused() -> None:
    with EmbeddedBroker() as b:
        pid = b.pid
        b.pause()
    assert not os.path.exists(f"/proc/{pid}")


def test_busy_port_fails_clearly(broker: EmbeddedBroker) -> None:
    other = EmbeddedBroker(port=broker.port, startup_timeout=5)
    with pytest.raises(BrokerError, match=r"AddrInUse|Address in use|another broker"):
        other.start()
    assert not other.is_running()


def test_kafka_bootstrap_prefers_environment() -> None:
    env = {"KAFKA_BOOTSTRAP_SERVERS": "kafka.example:9092"}
    with kafka_bootstrap(env=env) as bootstrap:
        assert bootstrap == "kafka.example:9092"


def test_kafka_bootstrap_falls_back_to_embedded() -> None:
    with kafka_bootstrap(use_docker=False, env={}) as bootstrap:
        create_topics(bootstrap, {"fallback": 1})
    host, port = bootstrap.rsplit(":", 1)
    with pytest.raises(ConnectionRefusedError), socket.create_connection((host, int(port)), 2):
        pass  # the broker is gone once the context exits
