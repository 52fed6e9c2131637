"""The query service: answers `rec-requests` on each request's `reply_to` topic.

It never writes the model and needs no state dir: it follows the model log on Kafka
(`consumers/model_log.py`) on a thread of its own, holding the model in memory and applying
each commit as it arrives, so it can run on any machine that reaches the broker. Until it has
caught up with the log it answers with an error reply saying so. Each request takes the served
model once (an item view and the users of the same generation), so it never mixes two models
(user rows may be a commit newer than the item view, never a generation). Several processes
share the requests as one consumer group.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
from confluent_kafka import Consumer, KafkaError, Message, Producer
from prometheus_client import CollectorRegistry
from pydantic import ValidationError
from threadpoolctl import threadpool_limits

from consumers import kafka_io
from consumers.gc_control import freeze_startup
from consumers.metrics import PartsCollector, QueryMetrics, observe_many, serve_metrics
from consumers.model_log import ModelFollower, trim_heap
from consumers.reply_delay import ReplyDelay
from consumers.settings import QuerySettings
from stream_mf.answer import answer
from stream_mf.events import describe_error
from stream_mf.messages import RecRequest, RecResponse, request_id_in
from stream_mf.model_log import Marker, MixedGenerationError
from stream_mf.transitions import bonus

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


def reply_id(raw: bytes, key: bytes | None, headers: dict[str, bytes]) -> str:
    """The id an error reply carries, so the sender can match it even to a request that could
    not be read: the request's own `request_id` as far as it can be read, else a
    `request_id` or `correlation_id` header, else the message key, else "unknown"."""
    found = request_id_in(raw)
    if found is not None:
        return found
    for candidate in (headers.get("request_id"), headers.get("correlation_id"), key):
        if candidate:
            return candidate.decode(errors="replace")[:256]
    return "unknown"


#: Producer batching for replies. Tansu spends about 1 ms of CPU per stored record batch (a
#: produce and its fetch), so replies sent one per request cost the broker more than the
#: service costs; a short linger lets the replies of one fetch share a batch (bench_query.py).
REPLY_LINGER_MS = 1.0


def request_consumer(
    settings: QuerySettings, on_error: Callable[[], None] | None = None
) -> Consumer:
    """The service's request consumer (also what bench_query's bare echo uses, so the two
    differ only by the model).

    A broker that does not wake a waiting fetch when data arrives (Tansu answers at once when
    data is there, else after `fetch.wait.max.ms`) adds up to that wait to every request, so it
    is short; a fetch on an idle topic costs the broker little at 2 ms.
    """
    return kafka_io.consumer(
        settings.kafka,
        settings.group_id,
        settings.session_timeout_ms,
        on_error=on_error,
        **{
            "enable.auto.commit": True,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": settings.fetch_wait_ms,
            "socket.nagle.disable": True,
        },
    )


def reply_producer(settings: QuerySettings, on_error: Callable[[], None] | None = None) -> Producer:
    """The service's reply producer: short linger (see REPLY_LINGER_MS), bounded queue,
    uncompressed by default (`reply_compression`: any client reads it without a codec), and no
    idempotence: its producer id means nothing to a restarted broker or a new cluster, and
    librdkafka then failed every reply (PRODUCER_FENCED, or timeouts) until the process was
    restarted; a duplicate reply is harmless (clients match replies by correlation id)."""
    return kafka_io.producer(
        settings.kafka,
        on_error=on_error,
        **{
            "enable.idempotence": False,
            "linger.ms": REPLY_LINGER_MS,
            "socket.nagle.disable": True,
            "queue.buffering.max.kbytes": 64 * 1024,  # bounded under overload
            "compression.type": settings.reply_compression,
        },
    )


#: longest a starting process holds requests while it reads the model (they wait in the topic;
#: the deadline of each still applies when it is handled)
HOLD_S = 30.0


#: glibc malloc arenas for a query process (M_ARENA_MAX): each thread that allocates may get
#: one of its own (up to 8 per core), and what the model log's follower thread and
#: librdkafka's threads freed after a catch-up stayed in theirs. Arenas made before the cap
#: stay: `commands/query.py` sets it before its first thread (set later, a replica had 6).
MALLOC_ARENAS = 2
#: glibc's mmap threshold, fixed (M_MMAP_THRESHOLD): by default it rises to the size of any
#: mmapped block freed (up to 32 MB), after which librdkafka's fetch buffers (Tansu answers a
#: fetch with up to ~20 MB) and a catch-up's temporaries are carved from the heap and their
#: freed space stays resident. Fixed, every block over 1 MB is its own mapping, given back
#: when freed: 17 MB less anonymous memory after a 100k x 50k catch-up (165 vs 182 MB, 3 runs
#: interleaved), catch-up time unchanged (2.5-2.7 s vs 2.4-2.8 s).
MMAP_THRESHOLD = 1 << 20


def limit_malloc_arenas(n: int = MALLOC_ARENAS) -> None:
    """Cap glibc's malloc arenas (before the process starts its threads) and fix its mmap
    threshold; a no-op elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, n)  # M_ARENA_MAX
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD (fixed: no dynamic raise)
    except (OSError, AttributeError):
        pass


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]  # fmt: skip


def malloc_state() -> dict[str, int]:
    """glibc's heap over every arena (`mallinfo2`): bytes in use, free but kept (freed
    memory the process still holds: fragmentation), and in mmapped chunks; {} elsewhere."""
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return {}
    fn.restype = _MallInfo2
    mi = fn()
    return {"malloc_in_use": mi.uordblks, "malloc_free": mi.fordblks, "malloc_mmapped": mi.hblkhd}


class QueryService:
    def __init__(self, settings: QuerySettings, registry: CollectorRegistry | None = None):
        limit_malloc_arenas()  # before the follower's and librdkafka's threads
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.metrics = QueryMetrics(self.registry)
        self.follower = ModelFollower(settings, self.metrics, self._applied)
        self.registry.register(
            PartsCollector(
                "stream_mf_replica_memory_bytes",
                "What the process holds, by part: the served model's arrays, ids and seen "
                "items, records waiting for their marker, and glibc's heap (in use, free, mmapped)",
                self._memory,
            )
        )
        broker_error = self.metrics.errors.labels("broker").inc
        self.consumer = request_consumer(settings, on_error=broker_error)
        self.producer = reply_producer(settings, on_error=broker_error)
        self.metrics_port: int | None = None
        self._warm = False
        self.reply_delay = ReplyDelay()

    def _memory(self) -> dict[str, float]:
        reader = self.follower.reader
        out: dict[str, float] = {}
        live = reader.live
        if live is not None:
            out.update(live.memory())
        out["pending"] = reader.pending.nbytes()
        out.update(malloc_state())
        return out

    def _applied(self, markers: list[Marker], took: float) -> None:
        """On the follower thread, after a run of commits became servable."""
        now = time.time()
        m = self.metrics
        for marker in markers:  # commits published since this process started
            if marker.times and marker.count and marker.at >= self.follower.started_at:
                observe_many(m.freshness, now - np.asarray(marker.times),
                             marker.count / len(marker.times))  # fmt: skip
        m.refresh_seconds.observe(took)
        if markers:
            last = markers[-1]
            m.model_version.set(last.version)
            m.model_events.set(last.events)
            m.model_log_commit.set(last.seq)
        m.model_log_lag.set(self.follower.lag())

    def _warm_up(self) -> None:
        """Before the first real request: load the numba kernels' caches and touch BLAS and the
        item arrays, then move start-up objects out of the collector's way (`gc.freeze`), so
        neither first requests nor later full collections pay for them."""
        self._warm = True
        served = self.follower.served
        assert served is not None
        view = served.view
        t0 = time.perf_counter()
        try:
            reqs = [RecRequest(request_id="warm-up", kind="popular")]
            if len(view.ids):
                first = view.ids[0]
                reqs += [
                    RecRequest(request_id="warm-up", kind="similar_items", item_id=first),
                    RecRequest(request_id="warm-up", kind="recommend_anonymous", items=[first]),
                    RecRequest(request_id="warm-up", kind="recommend", user_id="warm-up"),
                ]
            users = served.users
            if view.succ is not None and view.logw is not None:  # the transitions' kernel
                bonus(view.succ, view.logw, 0, view.clock, view.decay_rate, 1.0, view.n)
            for req in reqs:
                with served.reading():
                    resp = answer(req, view, users, min_user_events=self.settings.min_user_events)
                resp.model_dump_json()
        except Exception as exc:  # warming is an optimisation: never fail start-up over it
            log.warning("warm-up failed (first requests will be slower): %s", exc)
        freeze_startup()
        trim_heap()  # what the warm-up freed (the follower trims every `TRIM_S` after)
        log.info("warmed up in %.3f s", time.perf_counter() - t0)

    def run(self, stop: kafka_io.StopFlag) -> int:
        s = self.settings
        self.metrics_port = serve_metrics(self.registry, s.metrics.host, s.metrics.port)
        if self.metrics_port is not None:
            log.info("metrics on http://%s:%d/metrics", s.metrics.host, self.metrics_port)
        self.consumer.subscribe([s.topics.requests])
        # one BLAS thread per process: a request's product is small, and several query
        # processes on shared cores lose more to thread contention than they gain
        limits = threadpool_limits(s.blas_threads)
        self.follower.start()
        try:
            while not stop:
                if not self._warm and self.follower.served is not None:
                    self._warm_up()
                if self._holding():
                    time.sleep(0.02)
                    continue
                self.metrics.reply_delay.set(self.reply_delay.update(len(self.producer)))
                for m in kafka_io.drain(self.consumer, 500, 0.05):
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

    def _holding(self) -> bool:
        """Until the model is read (found, then its snapshot and tail) requests wait, within
        their deadline, rather than get an error; at most HOLD_S from start, then they are
        answered with an error saying why (no model in the log yet, or not caught up)."""
        f = self.follower
        return not f.ready.is_set() and time.monotonic() - f.started < HOLD_S

    def handle(self, m: Message) -> None:
        t_recv = time.time()
        headers = kafka_io.headers_dict(m.headers())
        reply_to = headers.get("reply_to", b"").decode(errors="replace") or (
            self.settings.topics.responses
        )
        _kind, ts_ms = m.timestamp()
        deadline = _deadline(headers, ts_ms, self.settings.default_deadline_ms)
        # a reply that would land after the deadline is not worth making (consumers/reply_delay.py)
        if deadline is not None and t_recv + self.reply_delay.current > deadline:
            self.metrics.expired.inc()
            self._store(m)
            return
        kind = "invalid"
        req: RecRequest | None = None
        user_id = None
        raw = m.value() or b""
        try:
            if len(raw) > self.settings.max_message_bytes:
                raise ValueError(f"request of {len(raw)} bytes exceeds the limit")
            doc: Any = orjson.loads(raw)
            if isinstance(doc, dict):
                uid = doc.get("user_id")
                user_id = uid[:256] if isinstance(uid, str) else None
            req = RecRequest.model_validate(doc)
            kind = req.kind
        except ValidationError as exc:
            request_id = reply_id(raw, m.key(), headers)
            resp = self._error(request_id, user_id, f"invalid request: {describe_error(exc)}")
        except (orjson.JSONDecodeError, ValueError) as exc:
            request_id = reply_id(raw, m.key(), headers)
            resp = self._error(request_id, user_id, f"invalid request: {exc}")
        if req is not None:
            f = self.follower
            if req.kind == "recommend_anonymous" and f is not None:
                f.wants_gram()  # kept ready off this path after item rows change
            served = f.served if f is not None else None
            if served is None:
                why = f.status() if f is not None else "no model yet: start the updater"
                resp = self._error(req.request_id, req.user_id, why)
            else:
                try:
                    with served.reading():  # the reader writes commits into the same arrays
                        resp = answer(req, served.view, served.users,
                                      min_user_events=self.settings.min_user_events)  # fmt: skip
                except MixedGenerationError as exc:  # a bug: say so, never answer from a mix
                    log.error("refusing to answer %s: %s", req.request_id, exc)
                    self.metrics.errors.labels("mixed_generation").inc()
                    resp = self._error(req.request_id, req.user_id, f"internal error: {exc}")
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
        """Time the reply's acknowledgement; count a reply the broker did not take (the
        request's offset is stored at once)."""
        produced_at = time.monotonic()

        def done(err: KafkaError | None, _reply: Message) -> None:
            if err is None:
                self.reply_delay.note(produced_at)
            else:
                log.warning(
                    "reply to %s[%d]@%d not delivered: %s",
                    m.topic(),
                    m.partition(),
                    m.offset(),
                    err,
                )
                self.metrics.errors.labels("reply").inc()

        return done

    def _store(self, m: Message) -> None:
        """Mark a request done. After a rebalance its partition may belong to another process:
        then that one answers it again (at least once), and there is nothing to store here."""
        try:
            self.consumer.store_offsets(message=m)
        except Exception as exc:
            log.debug(
                "offset of %s[%d]@%d not stored: %s", m.topic(), m.partition(), m.offset(), exc
            )

    def _error(self, request_id: str, user_id: str | None, message: str) -> RecResponse:
        return RecResponse(
            request_id=request_id,
            user_id=user_id,
            error=message,
            generated_at=time.time(),
            model_version=self._version(),
        )

    def _version(self) -> int:
        served = self.follower.reader.served if self.follower is not None else None
        return served.marker.version if served is not None else 0

    def close(self) -> None:
        # replies first (a request's offset is stored once its reply is produced; flushing
        # delivers them before closing the consumer commits those offsets)
        self.producer.flush(5.0)
        try:
            self.consumer.close()
        except Exception as exc:
            log.debug("consumer close: %s", exc)
        self.follower.close()
