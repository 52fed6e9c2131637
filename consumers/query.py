"""The query service: answers `rec-requests` on each request's `reply_to` topic.

It never writes the model. It follows the updater's RocksDB through a secondary instance
(`StoreFollower`), refreshed every `refresh_seconds` between polls on the same thread, so a
request is always answered from one consistent snapshot and an event the updater has committed
is served within about `refresh_seconds` plus one poll. Several processes share the requests as
one consumer group.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
from confluent_kafka import KafkaError, Message
from prometheus_client import CollectorRegistry
from pydantic import ValidationError
from threadpoolctl import threadpool_limits

from consumers import kafka_io
from consumers.metrics import QueryMetrics, observe_many, serve_metrics
from consumers.settings import QuerySettings
from stream_mf.answer import answer
from stream_mf.events import describe_error
from stream_mf.follower import StoreFollower
from stream_mf.messages import RecRequest, RecResponse
from stream_mf.store import StoreError

log = logging.getLogger(__name__)


def _deadline(headers: dict[str, bytes], msg_ts_ms: int, default_ms: int | None) -> float | None:
    """Absolute deadline in epoch seconds: `deadline_ms` is epoch ms, or a budget in ms counted
    from the message timestamp when it is smaller than 1e12."""
    raw = headers.get("deadline_ms")
    if raw is None:
        return None if default_ms is None else (msg_ts_ms + default_ms) / 1000.0
    try:
        v = float(raw)
    except ValueError:
        return None
    return v / 1000.0 if v >= 1e12 else (msg_ts_ms + v) / 1000.0


class QueryService:
    def __init__(self, settings: QuerySettings, registry: CollectorRegistry | None = None):
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.metrics = QueryMetrics(self.registry)
        self.follower: StoreFollower | None = None
        broker_error = self.metrics.errors.labels("broker").inc
        self.consumer = kafka_io.consumer(
            settings.kafka,
            settings.group_id,
            settings.session_timeout_ms,
            on_error=broker_error,
            **{
                "enable.auto.commit": True,
                "auto.offset.reset": "earliest",
                # a broker that does not answer a waiting fetch early when data arrives (Tansu)
                # adds this wait to every request; keep it short for request/reply
                "fetch.wait.max.ms": settings.fetch_wait_ms,
            },
        )
        # 1 ms lets replies under load share a produce request (broker CPU is the limit)
        self.producer = kafka_io.producer(
            settings.kafka,
            on_error=broker_error,
            **{"linger.ms": 1, "queue.buffering.max.kbytes": 64 * 1024},  # bounded under overload
        )
        self.metrics_port: int | None = None
        self._next_refresh = 0.0

    def _follow(self) -> None:
        now = time.monotonic()
        if now < self._next_refresh:
            return
        self._next_refresh = now + self.settings.refresh_seconds
        if self.follower is None:
            try:
                self.follower = StoreFollower(self.settings.state_dir)
            except StoreError as exc:
                log.info("waiting for the model store: %s", exc)
                return
        t0 = time.perf_counter()
        try:
            changed = self.follower.refresh()
        except Exception as exc:  # keep serving the snapshot we have; say why in logs/metrics
            log.warning("could not refresh the model: %s", exc)
            self.metrics.errors.labels("store").inc()
            return
        if changed:
            now = time.time()
            for count, times in self.follower.new_commits():
                if times.size:
                    observe_many(self.metrics.freshness, now - times, count / times.size)
            self.metrics.refresh_seconds.observe(time.perf_counter() - t0)
            self.metrics.model_version.set(self.follower.model_version)
            self.metrics.model_events.set(self.follower.events_applied)

    def run(self, stop: kafka_io.StopFlag) -> int:
        s = self.settings
        self.metrics_port = serve_metrics(self.registry, s.metrics.host, s.metrics.port)
        if self.metrics_port is not None:
            log.info("metrics on http://%s:%d/metrics", s.metrics.host, self.metrics_port)
        self.consumer.subscribe([s.topics.requests])
        # one BLAS thread per process: a request's product is small, and several query
        # processes on shared cores lose more to thread contention than they gain
        limits = threadpool_limits(s.blas_threads)
        try:
            while not stop:
                self._follow()
                wait = max(0.0, min(0.05, self._next_refresh - time.monotonic()))
                for m in kafka_io.drain(self.consumer, 500, wait):
                    err = m.error()
                    if err is None:
                        self.handle(m)
                    elif err.code() != KafkaError._PARTITION_EOF:
                        log.warning("consumer error: %s", err)
                        self.metrics.errors.labels("broker").inc()
                self.producer.poll(0)
        finally:
            limits.restore_original_limits()
            self.close()
        return 0

    def handle(self, m: Message) -> None:
        t_recv = time.time()
        headers = kafka_io.headers_dict(m.headers())
        reply_to = headers.get("reply_to", b"").decode(errors="replace") or (
            self.settings.topics.responses
        )
        _kind, ts_ms = m.timestamp()
        deadline = _deadline(headers, ts_ms, self.settings.default_deadline_ms)
        if deadline is not None and t_recv > deadline:
            self.metrics.expired.inc()
            self._store(m)
            return
        kind = "invalid"
        req: RecRequest | None = None
        request_id = "unknown"
        user_id = None
        try:
            raw = m.value() or b""
            if len(raw) > self.settings.max_message_bytes:
                raise ValueError(f"request of {len(raw)} bytes exceeds the limit")
            doc: Any = orjson.loads(raw)
            if isinstance(doc, dict):
                request_id = str(doc.get("request_id") or "unknown")[:256]
                uid = doc.get("user_id")
                user_id = uid[:256] if isinstance(uid, str) else None
            req = RecRequest.model_validate(doc)
            kind = req.kind
        except ValidationError as exc:
            resp = self._error(request_id, user_id, f"invalid request: {describe_error(exc)}")
        except (orjson.JSONDecodeError, ValueError) as exc:
            resp = self._error(request_id, user_id, f"invalid request: {exc}")
        if req is not None:
            view = self.follower.view if self.follower else None
            if view is None:
                resp = self._error(req.request_id, req.user_id, "no model yet: start the updater")
            else:
                assert self.follower is not None
                resp = answer(
                    req, view, self.follower, min_user_events=self.settings.min_user_events
                )
        if resp.error:
            self.metrics.invalid.inc()
        self.metrics.requests.labels(kind, resp.strategy).inc()
        try:
            self.producer.produce(
                reply_to,
                key=(resp.user_id or "").encode(),
                value=resp.model_dump_json().encode(),
                headers=[("correlation_id", resp.request_id.encode())],
                on_delivery=self._delivered(m),
            )
        except (BufferError, Exception) as exc:  # unknown reply topic, full queue
            log.warning("could not reply to %r: %s", reply_to, exc)
            self.metrics.errors.labels("reply").inc()
        done = time.time()
        self.metrics.latency.labels(kind).observe(done - t_recv)
        if req is not None and req.sent_at is not None:
            self.metrics.request_to_reply.observe(max(0.0, done - req.sent_at))
        self._store(m)

    def _delivered(self, m: Message) -> Callable[[KafkaError | None, Message], None]:
        """Count a reply the broker did not take (the request's offset is stored at once)."""

        def done(err: KafkaError | None, _reply: Message) -> None:
            if err is not None:
                log.warning("reply to %s[%d]@%d not delivered: %s",
                            m.topic(), m.partition(), m.offset(), err)  # fmt: skip
                self.metrics.errors.labels("reply").inc()

        return done

    def _store(self, m: Message) -> None:
        """Mark a request done. After a rebalance its partition may belong to another process:
        then that one answers it again (at least once), and there is nothing to store here."""
        try:
            self.consumer.store_offsets(message=m)
        except Exception as exc:
            log.debug("offset of %s[%d]@%d not stored: %s", m.topic(), m.partition(),
                      m.offset(), exc)  # fmt: skip

    def _error(self, request_id: str, user_id: str | None, message: str) -> RecResponse:
        return RecResponse(
            request_id=request_id,
            user_id=user_id,
            error=message,
            generated_at=time.time(),
            model_version=max(0, self.follower.model_version) if self.follower else 0,
        )

    def close(self) -> None:
        # replies first: their delivery callbacks store the requests' offsets, which closing
        # the consumer then commits
        self.producer.flush(5.0)
        try:
            self.consumer.close()
        except Exception as exc:
            log.debug("consumer close: %s", exc)
        if self.follower is not None:
            self.follower.close()
