"""What a client outside this code base sees: replies and dead letters read by aiokafka, a
second client family, with no compression codec installed (as kafkajs users have none by
default); and error replies that carry whatever request id could be read."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiokafka.codec
import orjson
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from consumers import kafka_io
from consumers.client import RecClient
from consumers.settings import KafkaSettings
from tests.integration.conftest import Cluster, make_topics

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def running(kafka: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """An updater that has learnt a little and dead-lettered one event, and a query service
    serving it."""
    c = Cluster(kafka, make_topics(kafka), Path(tmp_path_factory.mktemp("interop")))
    try:
        c.start("updater", "updater")
        c.start("query", "query")
        events = [
            orjson.dumps(
                {
                    "user_id": f"u{n % 7}",
                    "item_id": f"i{n % 53}",
                    "event_type": "view",
                    "timestamp": time.time(),
                }
            )
            for n in range(200)
        ]
        poison = b'{"user_id": "u1", "item_id": "i1", "event_type": "teleport", "timestamp": 1}'
        producer = kafka_io.producer(KafkaSettings(bootstrap_servers=kafka))
        for value in [*events[:100], poison, *events[100:]]:
            producer.produce(c.topics.interactions, value=value, key=b"k")
        assert producer.flush(30) == 0
        c.wait_metric("updater", "stream_mf_events_applied_total", 200)
        c.wait_metric("updater", "stream_mf_events_dead_lettered_total", 1)
        client = RecClient(
            KafkaSettings(bootstrap_servers=kafka), c.topics.requests, c.topics.responses
        )
        try:  # the query service has followed the store once it answers from the model
            end = time.monotonic() + 60
            while True:
                r = client.ask({"user_id": "u1"}, timeout=5)
                if r.error is None and r.strategy == "personalized":
                    break
                assert time.monotonic() < end, f"no personalized answer: {r}"
                time.sleep(0.2)
        finally:
            client.close()
        yield c
    finally:
        c.stop_all()


async def _read_all(
    kafka: str, topic: str, enough: Callable[[list[Any]], bool], timeout: float
) -> list[Any]:
    """Records of a one-partition topic from offset 0, read by aiokafka until `enough`."""
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        got: list[Any] = []
        end = time.monotonic() + timeout
        while not enough(got) and time.monotonic() < end:
            batch = await consumer.getmany(tp, timeout_ms=500)
            got.extend(batch.get(tp, []))
        return got
    finally:
        await consumer.stop()


def read_all(
    kafka: str, topic: str, enough: Callable[[list[Any]], bool], timeout: float = 30.0
) -> list[Any]:
    return asyncio.run(_read_all(kafka, topic, enough, timeout))


def test_aiokafka_without_codecs_reads_replies_and_dead_letters(running: Cluster) -> None:
    # the point of the test: this aiokafka cannot decompress lz4, snappy or zstd records
    codecs = [aiokafka.codec.has_lz4(), aiokafka.codec.has_snappy(), aiokafka.codec.has_zstd()]
    assert not any(codecs), "a codec is installed here: the test would prove less"
    [letter] = read_all(running.kafka, running.topics.dead_letter, lambda got: len(got) >= 1)
    h = {k: v.decode() for k, v in letter.headers}
    assert h["error.reason"] == "unknown_event_type" and "teleport" in h["error.message"]
    assert h["original.topic"] == running.topics.interactions
    assert (h["original.partition"], h["original.offset"]) == ("0", "100")
    assert b"teleport" in letter.value

    def personal(got: list[Any]) -> list[Any]:
        return [r for r in got if orjson.loads(r.value)["strategy"] == "personalized"]

    ok = personal(read_all(running.kafka, running.topics.responses, lambda g: bool(personal(g))))
    assert ok
    doc = orjson.loads(ok[-1].value)
    assert dict(ok[-1].headers)["correlation_id"].decode() == doc["request_id"]
    assert ok[-1].key == b"u1" and doc["user_id"] == "u1" and len(doc["items"]) > 0


#: (raw request, Kafka key, extra headers, the request_id its error reply must carry)
UNREADABLE: list[tuple[bytes, bytes | None, kafka_io.HeaderList, str]] = [
    (b'{"request_id": "latin-1", "user_id": "Jos\xe9"}', None, [], "latin-1"),  # not UTF-8
    (b'{"request_id": "cut", "kind": "recommend", "user_id": "u', None, [], "cut"),
    (b'{"request_id": "nan", "user_id": "u1", "k": NaN}', None, [], "nan"),
    (b'{"request_id": "k-neg", "user_id": "u1", "k": -3}', None, [], "k-neg"),  # schema
    (b'{"request_id": 42, "kind": "nope"}', None, [], "42"),
    (b"\xff\xfe not json", b"key-1", [("correlation_id", b"hdr-1")], "hdr-1"),
    (b'{"user_id": "u1", "k": 0}', b"key-2", [("request_id", b"hdr-2")], "hdr-2"),
    (b"[1, 2]", b"key-3", [], "key-3"),
    (b"", None, [], "unknown"),
]


def test_error_replies_echo_whatever_request_id_could_be_read(running: Cluster) -> None:
    producer = kafka_io.producer(KafkaSettings(bootstrap_servers=running.kafka))
    for raw, key, headers, _ in UNREADABLE:
        reply_to: kafka_io.HeaderList = [("reply_to", running.topics.responses.encode())]
        producer.produce(running.topics.requests, value=raw, key=key, headers=reply_to + headers)
    assert producer.flush(10) == 0

    def invalid(got: list[Any]) -> list[Any]:
        return [r for r in got if (orjson.loads(r.value)["error"] or "").startswith("invalid")]

    replies = invalid(
        read_all(
            running.kafka, running.topics.responses, lambda g: len(invalid(g)) >= len(UNREADABLE)
        )
    )
    got = sorted(orjson.loads(r.value)["request_id"] for r in replies)
    assert got == sorted(rid for *_, rid in UNREADABLE)
    for r in replies:
        assert dict(r.headers)["correlation_id"] == orjson.loads(r.value)["request_id"].encode()
