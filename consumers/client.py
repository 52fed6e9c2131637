"""A request/reply client for the query service: send requests, await replies by correlation id."""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson
from confluent_kafka import OFFSET_END, Consumer, Producer, TopicPartition

from consumers import kafka_io
from consumers.errors import UserError
from consumers.settings import KafkaSettings
from stream_mf.messages import RecResponse

#: Client defaults for request/reply through a broker that does not wake a waiting fetch when
#: data arrives (Tansu): the reply waits up to `fetch.wait.max.ms` at the client's fetch, so it
#: is short; a 1 ms linger lets requests sent together share a record batch, which is what the
#: embedded broker's CPU cost is counted in (bench/bench_query.py measures both).
FETCH_WAIT_MS = 2
LINGER_MS = 1.0


def request_producer(kafka: KafkaSettings, linger_ms: float = LINGER_MS) -> Producer:
    """Producer for requests (RecClient and bench_query's load use the same settings)."""
    conf: dict[str, Any] = {"linger.ms": linger_ms, "socket.nagle.disable": True}
    return kafka_io.producer(kafka, **conf)


def reply_consumer(kafka: KafkaSettings, fetch_wait_ms: int = FETCH_WAIT_MS) -> Consumer:
    """Consumer for the reply topic, assigned by the caller (no group join)."""
    conf: dict[str, Any] = {
        "enable.auto.commit": False,
        "fetch.wait.max.ms": fetch_wait_ms,
        "socket.nagle.disable": True,
    }
    return kafka_io.consumer(kafka, f"stream-mf-client-{uuid.uuid4().hex[:8]}", **conf)


class RecClient:
    """Reads the reply topic directly (no consumer group), from its end at start-up."""

    def __init__(
        self,
        kafka: KafkaSettings,
        requests: str,
        responses: str,
        fetch_wait_ms: int = FETCH_WAIT_MS,
        linger_ms: float = LINGER_MS,
    ):
        self.requests, self.responses = requests, responses
        self.producer: Producer = request_producer(kafka, linger_ms)
        self.consumer: Consumer = reply_consumer(kafka, fetch_wait_ms)
        meta = self.consumer.list_topics(responses, timeout=10)
        parts = meta.topics[responses].partitions
        if not parts:
            raise UserError(
                f"reply topic {responses!r} does not exist: create it (`stream-mf broker` "
                "creates the product's topics) or name yours with STREAM_MF_TOPICS__RESPONSES"
            )
        self.consumer.assign([TopicPartition(responses, p, OFFSET_END) for p in parts])
        self.pending: dict[str, RecResponse | None] = {}
        self._ready = False

    def _wait_assigned(self) -> None:
        # make sure the fetch position is established before the first request goes out
        if not self._ready:
            self.consumer.consume(1, 0.5)
            self._ready = True

    def send(self, request: dict[str, Any], deadline_ms: int | None = None) -> str:
        self._wait_assigned()
        rid = str(request.setdefault("request_id", uuid.uuid4().hex))
        request.setdefault("sent_at", time.time())
        headers: kafka_io.HeaderList = [("reply_to", self.responses.encode())]
        if deadline_ms is not None:
            headers.append(("deadline_ms", str(deadline_ms).encode()))
        key = str(request.get("user_id") or "").encode()
        self.producer.produce(self.requests, value=orjson.dumps(request), key=key, headers=headers)
        self.producer.poll(0)
        self.pending[rid] = None
        return rid

    def collect(self, timeout: float = 10.0) -> dict[str, RecResponse]:
        """Wait until every pending request has a reply, or the timeout; returns what came."""
        self.producer.flush(5.0)
        end = time.monotonic() + timeout
        while any(v is None for v in self.pending.values()) and time.monotonic() < end:
            for m in kafka_io.drain(self.consumer, 100, 0.05):
                if m.error():
                    continue
                cid = kafka_io.headers_dict(m.headers()).get("correlation_id", b"").decode()
                value = m.value()
                if cid in self.pending and self.pending[cid] is None and value is not None:
                    self.pending[cid] = RecResponse.model_validate_json(value)
        got = {k: v for k, v in self.pending.items() if v is not None}
        self.pending = {k: v for k, v in self.pending.items() if v is None}
        return got

    def ask(self, request: dict[str, Any], timeout: float = 10.0) -> RecResponse:
        rid = self.send(request)
        got = self.collect(timeout)
        if rid not in got:
            raise TimeoutError(
                f"no reply to request {rid} within {timeout:g} s: is stream-mf query running "
                "on the same broker and topics?"
            )
        return got[rid]

    def close(self) -> None:
        kafka_io.close_producer(self.producer)
        self.consumer.close()
