"""The updater: the one process that learns from `interactions` and writes the model store.

Commit order, per micro-batch (the exactly-once argument; docs/architecture.md):
  1. consume up to `max_batch_events` messages, waiting at most `max_batch_seconds` for the
     first and `batch_linger_seconds` for more;
  2. decode, and learn the valid events (in memory);
  3. bad messages go to the dead-letter topic, and that producer is flushed: a message whose
     dead letter was not acknowledged must not be skipped;
  4. the batch is committed (`CommitBatch`): published on the model log at once, and kept in
     memory until the next checkpoint;
  5. every `checkpoint_seconds` or `checkpoint_events` (before any other store write, before
     a learner snapshot, at a clean stop) a checkpoint writes everything the batches since the
     last one changed and the next offsets in one RocksDB WriteBatch; only then do the offsets
     go to Kafka, so standard tools show lag and Kafka is never ahead of the store.
On assignment the consumer seeks to the offsets stored in RocksDB, never to Kafka's, so a crash
anywhere replays exactly the batches since the last checkpoint, and the seeded learner replays
them bit for bit; the model log's publisher holds back until the replay has passed what the
log holds, and its readers skip commits behind the ones they applied (`Marker.behind`). A store
or broker error stops the process without a checkpoint. A kill after a batch's dead letters
leaves them sent: before its first dead letters a restarted updater reads the end of the
dead-letter topic back and skips those already there. With `checkpoint_seconds` 0 and
`checkpoint_events` 0 every batch is written at once, as before checkpoints.

Any other exception in step 2 is a bug met by some message; it must not stop learning for good
(a restart would meet it again). The in-memory model, which a failed attempt may have half
changed, is reloaded from the store (the last checkpoint; batches learned since are read
again, each written at once up to the end of the failed batch), and the batch is cut in halves,
each decoded, learned and committed on its own, until the message that fails alone is found: it is
dead-lettered with reason `internal`. The learner gives the same state however a batch is cut,
so the messages around it are learned exactly as without the failure, and a restart in the
middle isolates the same message again.

A stored offset the log no longer has (consumers/offset_gap.py) is never followed silently: it
stops the updater or, by explicit policy (`on_offset_gap`), moves the stored offset to the
log's start or end.

Rebuilds (stream_mf/rebuild.py) run in the background by default, stepped between batches, with
wall-clock budgets: not reproducible. With `rebuild.deterministic`, micro-batches are cut
exactly where `every_events` events have been applied since the last rebuild, and the rebuild
runs there inline, to completion, before the next event; its last commit carries the mark of
where it ended (`StateStore.rebuilt_events`), so a kill before that commit runs it again from
the same state, and one after it does not run it again. The model is then a function of the
input stream alone, however it is cut into batches and across kills and restores.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import resource
import threading
import time
from collections import deque
from collections.abc import Generator, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import numpy as np
import orjson
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from prometheus_client import CollectorRegistry
from threadpoolctl import threadpool_limits

from consumers import gc_control, kafka_io, kernel_cache, offset_gap, restore
from consumers.learner_snapshot import SnapshotWriter
from consumers.metrics import (
    CallbackGauges,
    LagCollector,
    UpdaterMetrics,
    observe_many,
    serve_metrics,
)
from consumers.model_log import ModelLogPublisher
from consumers.settings import UpdaterSettings
from stream_mf.arrays import unique_sorted
from stream_mf.decode import DecodedEvents, Reject, decode_events
from stream_mf.learner_snapshot import LearnerSnapshot
from stream_mf.live_eval import LiveEvaluator
from stream_mf.model import BatchDelta, EventBatch, Kernel, OnlineModel, merge_deltas
from stream_mf.rebuild import Rebuild, RebuildStep, run_inline, warm_up_rebuild
from stream_mf.rebuild_scheduler import OLD_GENERATION_GRACE_S, RebuildScheduler
from stream_mf.sgd import sgd_batch
from stream_mf.state import ModelState
from stream_mf.store import StateStore, StoreError
from stream_mf.writes import (
    Checkpoint,
    CommitBatch,
    DropGenerations,
    Flip,
    Stage,
    Write,
    WriteOffsets,
)

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_STORE = 3
EXIT_DEAD_LETTER = 4
EXIT_OFFSETS = 5
EXIT_OFFSET_GAP = 6
# while dead letters wait for the broker, say so this often (log and errors_total{kind="broker"})
STALL_REPORT_S = 5.0
# after a stop request a batch still waits this long for its dead letters (a slow broker), then
# stops uncommitted; well inside a container's usual 30 s stop grace period
STOP_GRACE_S = 10.0
# librdkafka's default message.max.bytes: it refuses to produce anything larger (key, value and
# headers together), raising MSG_SIZE_TOO_LARGE from produce()
DEFAULT_MESSAGE_MAX_BYTES = 1_000_000
# room left in a truncated dead letter for its key (cut to KEY_KEEP) and headers (error.message
# is cut to 2,000 characters) and the record's framing
DEAD_LETTER_HEADROOM = 16 * 1024
KEY_KEEP = 1024
# a broker refusing even this much of a dead letter refuses something else than its size
MIN_DEAD_LETTER_BYTES = 1024
# after a start, the dead-letter topic is read back from its end this many at a time
DLT_READ_BACK_CHUNK = 1000
# with checkpoints by time only, the most dead letters read back after a restart (a replay
# window with more dead letters than this may send some of them again: README)
DLT_READ_BACK_MAX = 1_000_000
# the loop's side work while a batch learns goes in steps of this many records or messages
# (about a millisecond), each inside a window of the nogil kernel; between windows it waits
SIDE_STEP = 2_000
WINDOW_POLL_S = 0.001
# a loop turn writes a background rebuild's staged blocks for at most this long (each chunk is
# one WriteBatch of `stage_blocks` blocks); the rest waits for the next turns
STAGE_TURN_S = 0.05


class DeadLetterError(RuntimeError):
    pass


class StoppedBeforeCommitError(RuntimeError):
    """A stop request ended the wait for a batch's dead letters: that batch is read again."""


class OffsetRegressionError(RuntimeError):
    """An offset went backwards: something other than this process moved the consumer."""


class OffsetGapError(RuntimeError):
    """A stored offset lies outside its partition's log and `on_offset_gap` is `fail`."""


#: failures that stop the updater uncommitted instead of isolating a message: the store, the
#: broker, a stop request, and the host itself (a message is not to blame for lack of memory)
_STOPS = (
    StoreError,
    DeadLetterError,
    StoppedBeforeCommitError,
    OffsetRegressionError,
    OffsetGapError,
    KafkaException,
    MemoryError,
)


@dataclass
class _Decoded:
    """Messages decoded ahead of their batch (while the previous batch's kernel ran)."""

    msgs: list[Message]
    parts: np.ndarray
    offs: np.ndarray
    dec: DecodedEvents


def _joined(parts: list[_Decoded]) -> _Decoded:
    """The parts' messages in order, decoded as one: decoding is per message, so this equals
    decoding them together (each part's positions shift by the messages before it)."""
    if len(parts) == 1:
        return parts[0]
    dec = DecodedEvents()
    base = 0
    for d in parts:
        p = d.dec
        dec.positions += [q + base for q in p.positions] if base else p.positions
        dec.users += p.users
        dec.items += p.items
        dec.types += p.types
        dec.weights += p.weights
        dec.times += p.times
        dec.rejects += (
            [Reject(r.position + base, r.reason, r.message) for r in p.rejects]
            if base
            else p.rejects
        )
        base += len(d.msgs)
    return _Decoded(
        [m for d in parts for m in d.msgs],
        np.concatenate([d.parts for d in parts]),
        np.concatenate([d.offs for d in parts]),
        dec,
    )


@dataclass
class _Attempt:
    """A batch decoded and learned in memory, not yet dead-lettered nor committed."""

    dec: DecodedEvents
    batch: EventBatch
    delta: BatchDelta
    parts: np.ndarray
    offs: np.ndarray


def _read_range(
    c: Any, topic: str, partition: int, start: int, end: int | None
) -> Iterator[Message]:
    """Messages [start, end) of one partition, or from `start` to wherever fetches stop
    returning more (end None); fewer if the broker stops answering. One fetch at a time in
    memory: dead letters can be a megabyte each."""
    c.assign([TopicPartition(topic, partition, start)])
    last = start - 1
    deadline = time.monotonic() + 10.0
    try:
        while (end is None or last < end - 1) and time.monotonic() < deadline:
            got = c.consume(100, 0.2)
            if not got:  # the end, or a gap in the offsets (compaction, markers)
                deadline = min(deadline, time.monotonic() + (0.5 if last >= start else 2.0))
            for m in got:
                if m.error() is None:
                    last = max(last, m.offset())
                    if end is None or m.offset() < end:
                        yield m
    finally:
        c.unassign()


def _describe(exc: BaseException) -> str:
    """The exception and where it was raised, for a dead letter and a bug report."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = ""
    if tb is not None:
        code = tb.tb_frame.f_code
        where = f" (in {code.co_name}, {code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno})"
    return f"{type(exc).__name__}: {exc}{where}"


def _truncate(
    value: bytes, key: bytes | None, limit: int
) -> tuple[bytes, bytes | None, dict[str, str | int]]:
    """Value and key cut to fit `limit` bytes together, and the headers that say so."""
    vlen, klen = len(value), len(key or b"")
    if vlen + klen <= limit:
        return value, key, {}
    headers: dict[str, str | int] = {"error.truncated": "true", "original.size": vlen}
    keep = min(KEY_KEEP, limit)
    if key is not None and klen > keep:
        key = key[:keep]
        headers["original.key.size"] = klen
    return value[: max(0, limit - len(key or b""))], key, headers


def _columns(
    msgs: list[Message],
) -> tuple[list[bytes | None], np.ndarray, np.ndarray, np.ndarray]:
    """Payloads, partitions, offsets and Kafka timestamps (ms), by C-level loops over the
    messages (a Python loop with four appends a message was 2% of the updater's time)."""
    n = len(msgs)
    values: list[bytes | None] = list(map(Message.value, msgs))
    # partitions and offsets are None only on error events, which never get here
    parts = np.fromiter(map(Message.partition, msgs), np.int32, n)
    offs = np.fromiter(map(Message.offset, msgs), np.int64, n)
    stamps = np.fromiter(map(_STAMP, map(Message.timestamp, msgs)), np.int64, n)
    return values, parts, offs, stamps


_STAMP = itemgetter(1)


def future_bounds(stamps_ms: np.ndarray, max_future_s: float) -> np.ndarray:
    """Latest accepted event time per message: its Kafka timestamp plus the tolerance.

    The record's timestamp, not this host's clock, so that a batch replayed after a crash
    decides exactly as the first time did (its dead letters were already sent); but never later
    than the wall clock, for producers that stamp records with the event's own (future) time.
    Records without a timestamp (-1) take the wall clock."""
    now = time.time()
    ref = stamps_ms.astype(np.float64) / 1000.0
    ref[(stamps_ms <= 0) | (ref > now)] = now
    return ref + max_future_s


#: a loop turn longer than this is logged with where its time went (every event of the turn
#: waited for it: freshness)
SLOW_TURN_S = 0.25


class _Turn:
    """Wall and CPU time of one loop turn by step, logged when the turn was slow: CPU far below
    wall is waiting. Where: `runq` is the time this thread was ready but not running (other
    processes on the cores: /proc/thread-self/schedstat), `vcsw` its voluntary switches (a
    wait on the disk, the broker, a lock or the GIL), `gc` the collector's pauses."""

    def __init__(self) -> None:
        self.t0 = self.at = time.perf_counter()
        self.cpu0 = time.thread_time()
        self.runq0 = _runq_seconds()
        self.vcsw0 = _voluntary_switches()
        self.gc0 = _GC.seconds
        self.steps: list[tuple[str, float]] = []
        self.inner: dict[str, float] = {}

    def mark(self, step: str) -> None:
        now = time.perf_counter()
        self.steps.append((step, now - self.at))
        self.at = now

    def add(self, part: str, seconds: float) -> None:
        """Time of a part inside a step (the store write, the publish inside `batch`)."""
        self.inner[part] = self.inner.get(part, 0.0) + seconds

    def done(self, events: int) -> None:
        wall = time.perf_counter() - self.t0
        if wall > SLOW_TURN_S:
            steps = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in self.steps)
            inner = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in self.inner.items())
            log.info("slow loop turn: %.0f ms (cpu %.0f ms, runq %.0f ms, gc %.0f ms, vcsw %d), "
                     "%d events; ms by step: %s; within: %s", wall * 1e3,
                     (time.thread_time() - self.cpu0) * 1e3,
                     (_runq_seconds() - self.runq0) * 1e3, (_GC.seconds - self.gc0) * 1e3,
                     _voluntary_switches() - self.vcsw0, events, steps, inner)  # fmt: skip


def _runq_seconds() -> float:
    """Time this thread has waited on a run queue (ready, not running), 0 where unknown."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as fh:
            return int(fh.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def _voluntary_switches() -> int:
    try:
        return resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw
    except (AttributeError, OSError):
        return 0


class _GcClock:
    """The cyclic collector's pauses, summed (gc.callbacks)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._t = 0.0

    def __call__(self, phase: str, _info: dict[str, Any]) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._t


_GC = _GcClock()
gc.callbacks.append(_GC)


class Updater:
    def __init__(self, settings: UpdaterSettings, registry: CollectorRegistry | None = None):
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.metrics = UpdaterMetrics(self.registry, settings.model.event_types)
        restore.check_state_dir(settings.state_dir, settings.topics.learner)
        self.store = StateStore(settings.state_dir, sync=settings.sync_writes)
        # checkpointed durability: batches are published at once, written every interval
        self.checkpointed = settings.checkpoint_seconds > 0 or settings.checkpoint_events > 0
        self.store.deferred = self.checkpointed
        self._next_checkpoint = time.monotonic() + settings.checkpoint_seconds
        self.metrics.checkpoint_time.set(time.time())  # the store is durable as it is now
        # a batch failed with batches learned since the checkpoint: they are read again, each
        # written at once, up to these offsets (the end of the failed batch), then checkpoints
        self._rewound_to: dict[tuple[str, int], int] | None = None
        self._replayed_seen = 0
        self.restored: restore.Restored | None = None  # `run` restores an empty store
        state = self.store.load(settings.model)
        self.model = OnlineModel(state.config, state)
        self.offsets: dict[tuple[str, int], int] = self.store.offsets()
        self.types = state.config.event_types
        self.live = LiveEvaluator(
            rate=settings.live_eval_rate, max_per_batch=settings.live_eval_max_per_batch
        )
        self.topic = settings.topics.interactions
        self._started = time.monotonic()
        self.assigned: list[TopicPartition] = []
        self._open_clients()
        self._init_rebuilds(state)
        self._init_gauges()
        self._warn_if_clock_ahead(state)

    def _open_clients(self) -> None:
        """The interactions consumer, the dead-letter producer and the control consumer."""
        settings = self.settings
        wait_ms = int(settings.dead_letter_timeout_seconds * 1000)
        self.consumer = kafka_io.consumer(
            settings.kafka,
            settings.group_id,
            settings.session_timeout_ms,
            on_error=self.metrics.errors.labels("broker").inc,
            # a batch waiting for its dead letters does not poll: with a consumer group, do not
            # leave it meanwhile
            **{
                "max.poll.interval.ms": max(
                    60_000, settings.session_timeout_ms * 2, wait_ms + 30_000
                ),
                # a fetch outside the log is reported (_AUTO_OFFSET_RESET), never silently
                # moved to the earliest or latest record: on_offset_gap decides
                "auto.offset.reset": "error",
                "fetch.wait.max.ms": settings.fetch_wait_ms,
            },
        )
        self.dlt = kafka_io.producer(
            settings.kafka,
            on_error=self.metrics.errors.labels("broker").inc,
            # librdkafka gives up on a message after this (default 300 s): never before the wait
            **{
                "message.timeout.ms": max(wait_ms, 1000),
                "compression.type": settings.dead_letter_compression,
                # no idempotence: its producer id means nothing to a broker that restarted or
                # a new cluster, and every dead letter then timed out (the replies' producer
                # met the same); one request in flight keeps batch order across retries, which
                # the read-back after a restart relies on, and a retried duplicate carries the
                # same original.* headers to dedupe on
                "enable.idempotence": False,
                "max.in.flight.requests.per.connection": 1,
            },
        )
        self.deliveries = kafka_io.DeliveryTracker()
        # the model log: published after each durable commit (the store calls it back)
        self.publisher = ModelLogPublisher(
            settings, self.store, self.metrics.errors.labels("broker").inc, self.metrics
        )
        self.store.on_commit = self._on_commit
        self._turn = _Turn()  # the loop turn under way (its log line splits the time)
        self._collected_at = 0.0  # wall time the batch under way was handed over by the consumer
        # learner snapshots: what an updater on a lost disk restores from (consumers/restore.py)
        self.snapshots = SnapshotWriter(settings, self.metrics)
        self._snapshot_requested = False
        self._next_snapshot = time.monotonic() + settings.learner_snapshot_seconds
        self._snapshot_events = self.store.events_applied()
        # what the dead-letter producer accepts (a user may raise it through kafka.extra), and
        # the most of an event's bytes one dead letter carries
        self._dlt_max = int(
            settings.kafka.client_config().get("message.max.bytes", DEFAULT_MESSAGE_MAX_BYTES)
        )
        self._dlt_limit = max(MIN_DEAD_LETTER_BYTES, self._dlt_max - DEAD_LETTER_HEADROOM)
        # (partition, offset) of messages past the stored offsets already on the dead-letter
        # topic (a batch interrupted before its commit); None until read back
        self._sent_before: set[tuple[int, int]] | None = None
        self.metrics_port: int | None = None
        self._stop = kafka_io.StopFlag()
        self._next_metadata = 0.0
        self.control = kafka_io.consumer(settings.kafka, f"{settings.group_id}-control")
        self._probe: Any = None  # a consumer that verifies a log's end by fetching (lazily)
        self._next_gap_check = time.monotonic() + settings.offset_check_seconds
        self._control_assigned = False
        self._next_control_check = 0.0
        # the pipeline (docs/architecture.md, *The loop's states*): a batch's kernel runs on
        # `_worker` while the loop prefetches into `_ahead` (decoded as `_pre`) and hands the
        # last commit's held model log records to the producer; the loop waits for the kernel
        # before anything else touches the model, the store or the consumer's positions
        self._worker = (
            ThreadPoolExecutor(1, thread_name_prefix="learn")
            if settings.pipeline_min_events
            else None
        )
        self.publisher.defer = self._worker is not None
        self._ahead: list[Message] = []  # fetched during the last kernel, not collected yet
        self._pre: _Decoded | None = None  # the valid ones among them, decoded
        self._isolating = False
        self._in_kernel = threading.Event()  # the worker is inside the nogil SGD kernel
        # the learn's seconds on the worker, the loop's wait for it, the loop's own work
        # meanwhile, batches, the learn's CPU seconds and run-queue wait: logged at stop
        # (bench_ingest reads the line)
        self._pipeline_s = [0.0, 0.0, 0.0, 0, 0.0, 0.0]

    def _init_rebuilds(self, state: ModelState) -> None:
        """The schedule; a rebuild at once if the last one stopped in its after-swap phase."""
        cfg = self.settings.rebuild
        self.rebuild: Rebuild | None = None
        self.deterministic = cfg.deterministic
        self.schedule = RebuildScheduler(
            every_events=cfg.every_events,
            every_seconds=cfg.every_seconds,
            events_at_last=self._rebuild_origin(state.events_applied),
            time_at_last=time.monotonic(),
            grace_s=OLD_GENERATION_GRACE_S,
        )
        kernel_cache.ensure_cached()  # rebuilds run cached kernels only (same bits everywhere)
        warm_up_rebuild()  # compile (or load) the rebuild's kernels now, not inside a swap
        rebuilt = self.store.rebuilt_at()
        # no rebuild yet: count the overdue alert from this start, not from 1970
        self.metrics.rebuild_last_success.set(rebuilt if rebuilt else time.time())
        unfinished = self.store.rebuild_unfinished()
        if unfinished is not None:
            # the rows left over at that swap keep the last round's solution (one consistent
            # model, but their newest evidence is missing from it): a new rebuild re-solves them
            log.warning(
                "rebuild generation %d stopped before every row left over at its swap was "
                "re-solved (the updater died in its after-swap phase): starting a new rebuild",
                unfinished,
            )
            self.schedule.request()

    def _rebuild_origin(self, events_applied: int) -> int:
        """Where the event count of the rebuild schedule starts: in the deterministic mode, the
        stored end of the last rebuild (0 if none: a store that never had one rebuilds as soon
        as `every_events` are applied in all), otherwise this start."""
        if self.deterministic:
            return self.store.rebuilt_events() or 0
        return events_applied

    def _init_gauges(self) -> None:
        self.registry.register(
            CallbackGauges(
                {"stream_mf_store_size_bytes": ("Bytes of the model store on disk", self._size)}
            )
        )
        self._size_cache = (0.0, 0)
        self._lag: list[tuple[int, int | None, int]] = []
        self.registry.register(LagCollector(lambda: self._lag))
        self._publish_gauges()

    def _warn_if_clock_ahead(self, state: ModelState) -> None:
        ahead = float(state.clock[0]) - time.time()
        if ahead > self.settings.max_future_seconds:
            log.warning(
                "the model's stream clock is %.0f s ahead of this host's clock: an event from the "
                "future reached it (before future_timestamp existed, or with a larger "
                "max_future_seconds), so new events are decayed as if that old. Check this "
                "host's clock; otherwise replay the topic into a fresh state dir (--no-restore)",
                ahead,
            )

    def _size(self) -> int:
        """Store size, recomputed at most every 10 s (scrapes must stay cheap)."""
        at, size = self._size_cache
        if time.monotonic() - at > 10.0:
            d = self.settings.state_dir
            size = sum(f.stat().st_size for f in d.glob("*") if f.is_file())
            self._size_cache = (time.monotonic(), size)
        return size

    # ---- Kafka callbacks --------------------------------------------------------------------

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        partitions = [TopicPartition(tp.topic, tp.partition) for tp in partitions]
        for tp in partitions:
            stored = self.offsets.get((tp.topic, tp.partition))
            if stored is not None:
                stored = self._check_offset(tp.topic, tp.partition, stored, consumer)
            tp.offset = stored if stored is not None else OFFSET_BEGINNING
        log.info(
            "assigned %s",
            ", ".join(f"{tp.topic}[{tp.partition}]@{tp.offset}" for tp in partitions),
        )
        self.assigned = list(partitions)
        self._forget_ahead()  # every position is set anew: what was fetched is fetched again
        consumer.assign(partitions)

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        log.info("revoked %d partition(s)", len(partitions))
        self.assigned = []
        self._forget_ahead()
        consumer.unassign()

    def _forget_ahead(self, partition: int | None = None) -> None:
        """Drop prefetched messages of a partition whose position was just set (of every
        partition: None): the consumer delivers them again from there. Only then: dropping
        others would skip them."""
        if partition is None:
            self._ahead = []
        else:
            self._ahead = [m for m in self._ahead if m.partition() != partition]
        self._pre = None

    # ---- stored offsets outside the log (consumers/offset_gap.py) ------------------------------

    def _check_offset(self, topic: str, partition: int, stored: int, consumer: Any) -> int:
        """The offset to resume `topic[partition]` at: `stored` if the log still has it, else
        what `on_offset_gap` says (or OffsetGapError). Kafka's watermarks give the log's range;
        an end below `stored` is confirmed by a fetch (the embedded broker's watermark lags)."""
        tp = TopicPartition(topic, partition)
        try:
            low, high = consumer.get_watermark_offsets(tp, timeout=5.0, cached=False)
        except Exception as exc:  # broker busy or topic just recreated: checked again later
            log.warning("cannot read the log range of %s[%d]: %s", topic, partition, exc)
            self.metrics.errors.labels("broker").inc()
            return stored
        gap = offset_gap.classify(stored, low, high)
        if gap is not None and gap.kind == "ahead_of_log":
            end = offset_gap.verified_end(self._prober(), topic, partition, stored, low, high)
            if end is None:
                log.warning(
                    "%s[%d]: the watermark puts the stored offset %d beyond the log's end %d, "
                    "but the broker delivered no record to confirm it; checked again later",
                    topic,
                    partition,
                    stored,
                    high,
                )
                return stored
            gap = offset_gap.classify(stored, low, end)
        if gap is None:
            return stored
        return self._apply_gap_policy(topic, partition, gap)

    def _apply_gap_policy(self, topic: str, partition: int, gap: offset_gap.OffsetGap) -> int:
        policy = self.settings.on_offset_gap
        log.error("%s", gap.describe(topic, partition))
        self.metrics.offset_gaps.labels(gap.kind).inc()
        if gap.lost:
            self.metrics.events_lost.inc(gap.lost)
        if policy == "fail":
            raise OffsetGapError(
                f"stopping (exit {EXIT_OFFSET_GAP}) at {topic}[{partition}]: the model store "
                f"follows offset {gap.stored}, which the log no longer has "
                f"(on_offset_gap=fail). To go on with this model, restart with "
                f"--on-offset-gap resume-from-start (apply the log from offset {gap.low}) or "
                f"resume-from-end (apply only events published from now on), or set "
                f"STREAM_MF_ON_OFFSET_GAP; to start afresh, use a new state dir with --no-restore"
            )
        new = offset_gap.resume_offset(gap, policy)
        log.warning(
            "%s[%d]: resuming at offset %d instead of %d (on_offset_gap=%s)",
            topic,
            partition,
            new,
            gap.stored,
            policy,
        )
        # deliberately moved, backwards too: the store says so at once (a restart resumes
        # there) and the regression check in _next_offsets measures from here
        key = (topic, partition)
        self._commit(WriteOffsets({key: new}))
        self.offsets[key] = new
        self.publisher.moved_offsets([f"{topic}/{partition}"], self.store.offset_epoch())
        return new

    def _prober(self) -> Any:
        if self._probe is None:
            conf: dict[str, Any] = {"auto.offset.reset": "error"}
            self._probe = kafka_io.consumer(
                self.settings.kafka,
                f"{self.settings.group_id}-probe",
                on_error=self.metrics.errors.labels("broker").inc,
                **conf,
            )
        return self._probe

    def _watch_offsets(self) -> None:
        """Every `offset_check_seconds`, assigned partitions whose watermark is below the stored
        offset are checked (a broker restarted with its topics lost, a topic recreated): a
        consumer fetching beyond the end would otherwise wait there forever, showing lag 0."""
        now = time.monotonic()
        if now < self._next_gap_check or not self.assigned:
            return
        self._next_gap_check = now + self.settings.offset_check_seconds
        for tp in list(self.assigned):
            stored = self.offsets.get((tp.topic, tp.partition))
            if stored is None:
                continue
            try:
                _low, high = self.consumer.get_watermark_offsets(tp, timeout=5.0, cached=False)
            except Exception:  # the topic is gone for now: checked again later
                continue
            if high < stored:
                self._resume_at(tp.topic, tp.partition, stored)

    def _resume_at(self, topic: str, partition: int, stored: int, always: bool = False) -> bool:
        """Check a partition already assigned; seek the consumer if the policy moved it, or
        `always` (librdkafka stops fetching a partition after reporting it out of range).
        True when the policy moved it."""
        new = self._check_offset(topic, partition, stored, self.consumer)
        if new != stored or always:
            self._forget_ahead(partition)
            self.consumer.seek(TopicPartition(topic, partition, new))
        return new != stored

    def _assign_partitions(self) -> None:
        """Assign every partition directly (no group rebalances: a restart resumes at once).

        The store's LOCK already makes this the only writer, so a group adds nothing but the
        wait for a killed member's session to expire. Offsets are still committed to the group
        so that lag shows in standard tools. New partitions are picked up every 30 s.
        """
        now = time.monotonic()
        if now < self._next_metadata:
            return
        self._next_metadata = now + (30.0 if self.assigned else 1.0)
        try:
            meta = self.consumer.list_topics(self.topic, timeout=5.0)
        except Exception as exc:
            kafka_io.THROTTLE.log(
                log, logging.WARNING, "cannot read metadata of %r: %s", self.topic, exc
            )
            self.metrics.errors.labels("broker").inc()
            return
        tmeta = meta.topics.get(self.topic)
        if tmeta is None or tmeta.error is not None or not tmeta.partitions:
            kafka_io.THROTTLE.log(log, logging.INFO, "waiting for topic %r to exist", self.topic)
            return
        have = {tp.partition for tp in self.assigned}
        new = [TopicPartition(self.topic, p) for p in sorted(tmeta.partitions) if p not in have]
        if new:
            self._on_assign(self.consumer, self.assigned + new)

    # ---- the loop -----------------------------------------------------------------------------

    def run(self, stop: kafka_io.StopFlag) -> int:
        s = self.settings
        self._stop = stop
        self.metrics_port = serve_metrics(self.registry, s.metrics.host, s.metrics.port)
        if self.metrics_port is not None:
            log.info("metrics on http://%s:%d/metrics", s.metrics.host, self.metrics_port)
        code = EXIT_OK
        if s.pause_gc:
            gc_control.freeze_startup()  # start-up objects stay out of every later collection
        busy = frozen_kernels = False
        limits = threadpool_limits(s.blas_threads, "blas")
        try:
            if self.store.is_new and s.restore:
                # an empty state dir: the latest learner snapshot on Kafka, if there is one
                self.restored = restore.restore_if_empty(
                    s, self.store, stop, self.metrics.errors.labels("broker").inc
                )
                if self.restored is not None:
                    self._restored(self.restored)
            self.publisher.start(self.model.state)
            if s.use_consumer_group:
                self.consumer.subscribe(
                    [self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke
                )
            while not stop:
                turn = self._turn = _Turn()
                if not s.use_consumer_group:
                    self._assign_partitions()
                # behind a backlog, no collections inside a batch (its objects die by reference
                # counting); an idle updater, waiting in consume, collects as usual
                pause = s.pause_gc and busy
                if not self._ahead:  # the collect may wait: the held records go out first
                    self.publisher.release()
                with gc_control.paused() if pause else contextlib.nullcontext():
                    msgs = self._collect(stop)
                    self._collected_at = time.time()
                    turn.mark("collect")
                    if msgs:
                        self.process(msgs)
                turn.mark("batch")
                busy = bool(msgs)
                if busy and s.pause_gc and not frozen_kernels:
                    gc_control.freeze_startup()  # the SGD kernels loaded by the first batch too
                    frozen_kernels = True
                self._watch_offsets()
                self._poll_control()
                turn.mark("checks")
                self._drive_rebuild()
                turn.mark("rebuild")
                self._checkpoint_if_due(idle=not msgs)
                turn.mark("checkpoint")
                self.publisher.tick(self.model.state)
                turn.mark("model_log")
                self._snapshot_if_due()
                turn.mark("learner_snapshot")
                self._refresh_lag()
                turn.done(len(msgs))
            self._checkpoint()  # a clean stop: every batch read was committed
            self._final_snapshot()
        except StoreError as exc:
            log.error("model store failure, stopping without committing offsets: %s", exc)
            self.metrics.errors.labels("store").inc()
            code = EXIT_STORE
        except DeadLetterError as exc:
            log.error("dead-letter topic unavailable, stopping without committing: %s", exc)
            self.metrics.errors.labels("dead_letter").inc()
            code = EXIT_DEAD_LETTER
        except StoppedBeforeCommitError as exc:
            log.warning("%s", exc)  # asked to stop: nothing lost, the batch is read again
        except OffsetRegressionError as exc:
            log.error("%s", exc)
            code = EXIT_OFFSETS
        except OffsetGapError as exc:
            log.error("%s", exc)
            code = EXIT_OFFSET_GAP
        finally:
            self.close()
            limits.restore_original_limits()
        return code

    # ---- rebuilds ------------------------------------------------------------------------------

    def _poll_control(self) -> None:
        """Commands on the control topic (`stream-mf rebuild` sends one)."""
        now = time.monotonic()
        if not self._control_assigned:
            if now < self._next_control_check:
                return
            self._next_control_check = now + 5.0
            try:
                meta = self.control.list_topics(self.settings.topics.control, timeout=2.0)
            except Exception:
                return
            t = meta.topics.get(self.settings.topics.control)
            if t is None or t.error is not None or not t.partitions:
                return
            self.control.assign(
                [TopicPartition(self.settings.topics.control, p, OFFSET_END) for p in t.partitions]
            )
            self._control_assigned = True
        for m in self.control.consume(10, 0):
            if m.error() is not None:
                continue
            try:
                cmd = orjson.loads(m.value() or b"{}").get("command")
            except (orjson.JSONDecodeError, AttributeError):
                cmd = None
            if cmd == "rebuild":
                log.info("rebuild requested on %s", self.settings.topics.control)
                self.schedule.request()
            elif cmd == "snapshot":
                log.info("learner snapshot requested on %s", self.settings.topics.control)
                self._snapshot_requested = True
            else:
                log.warning("ignoring unknown control message %r", (m.value() or b"")[:200])

    def _on_commit(self, info: Any) -> None:
        """The store's hook: the model log's publisher, timed for the loop turn's log line."""
        t, c = time.perf_counter(), time.thread_time()
        self.publisher.committed(info)
        self._turn.add("publish", time.perf_counter() - t)
        self._turn.add("publish_cpu", time.thread_time() - c)

    def _commit(self, write: Write) -> None:
        """Every store commit of this process, in the order the loop makes them: one place for
        the commit order (docs/architecture.md) and for whatever must follow a commit. Any
        write but a batch's comes after a checkpoint of the batches before it."""
        if not isinstance(write, CommitBatch | Checkpoint) and self.store.pending:
            self._checkpoint()
        self.store.apply(self.model.state, write)

    # ---- checkpoints ---------------------------------------------------------------------------

    def _checkpoint_if_due(self, idle: bool = False) -> None:
        """Every `checkpoint_seconds` or `checkpoint_events`, and at once when the loop is
        caught up (`idle`: a turn that collected nothing): writes are then cheap, and the
        replay after a crash is nothing."""
        s = self.settings
        if not self.store.pending:
            self._next_checkpoint = time.monotonic() + s.checkpoint_seconds
            return
        if (
            idle
            or (s.checkpoint_seconds and time.monotonic() >= self._next_checkpoint)
            or (s.checkpoint_events and self.store.pending_events() >= s.checkpoint_events)
        ):
            self._checkpoint()

    def _checkpoint(self) -> None:
        """The batches since the last checkpoint and their next offsets, one WriteBatch; then
        the offsets to Kafka."""
        self._next_checkpoint = time.monotonic() + self.settings.checkpoint_seconds
        if not self.store.pending:
            return
        self.store.apply(self.model.state, Checkpoint())
        info = self.store.last_checkpoint
        durable = self.store.offsets()
        self.consumer.commit(
            offsets=[TopicPartition(t, p, o) for (t, p), o in durable.items()], asynchronous=True
        )
        m = self.metrics
        m.checkpoint_time.set(time.time())
        m.checkpoints.inc()
        m.pending_events.set(0)
        if info is not None:
            m.checkpoint_seconds.observe(info.seconds)
            m.checkpoint_bytes.set(info.bytes)
            m.checkpoint_events.set(info.events)
            m.store_bytes.inc(info.bytes)
            self._turn.add("checkpoint_s", info.seconds)

    def _drive_rebuild(self) -> None:
        """Start a rebuild when due; otherwise advance the one in flight (see stream_mf.rebuild)."""
        now = time.monotonic()
        for below in self.schedule.drops_due(now):
            # only generations under the one that replaced them: never the current, nor the
            # one a rebuild in flight is staging
            self._commit(DropGenerations(staged=False, below=below))
        if self.rebuild is None:
            st = self.model.state
            if self.schedule.due(st.events_applied, st.users.n, st.items.n, now):
                if self.deterministic:
                    self._rebuild_inline()
                else:
                    self._start_rebuild()
            return
        t0 = t_step = time.perf_counter()
        try:
            res = self.rebuild.step(self.model.state)
            # staged blocks, a chunk per WriteBatch, while the turn's share lasts
            while isinstance(res.write, Stage) and time.perf_counter() - t0 < STAGE_TURN_S:
                self._commit(res.write)
                t_step = time.perf_counter()  # the swap's pause starts after the staging
                res = self.rebuild.step(self.model.state)
        except StoreError:
            raise  # the store itself failed: stop like any other write failure
        except RuntimeError as exc:
            self._rebuild_failed(exc)
            return
        if res.write is not None:
            self._commit_rebuild_write(res, t_step)
        self.metrics.rebuild_step.observe(time.perf_counter() - t0)
        if res.outcome is not None:
            self._rebuild_over(res, t_step)

    def _start_rebuild(self) -> None:
        self.schedule.started()
        self.rebuild = Rebuild(
            self.model.state,
            self.settings.rebuild,
            generation=self.store.generation() + 1,
            stage=True,
        )
        self.metrics.rebuild_running.set(1)

    def _rebuild_inline(self) -> None:
        """The deterministic mode: a rebuild from the state as of this event count, run to its
        end now (the loop waits), every write committed in order; its last commit carries the
        mark of where it ended, so that a restart runs it again only if it never ended."""
        st = self.model.state
        at = st.events_applied
        self.schedule.started()
        self.metrics.rebuild_running.set(1)
        log.info("deterministic rebuild due at %d events applied: running it inline", at)
        t0 = time.perf_counter()
        self.rebuild = Rebuild(
            st,
            self.settings.rebuild.inline(),
            generation=self.store.generation() + 1,
            stage=True,
            inline=True,
        )
        try:
            res = run_inline(self.rebuild, st, at, self._commit)
        except StoreError:
            raise
        except RuntimeError as exc:
            self._rebuild_failed(exc)
            return
        self._rebuild_committed(res, t0)
        self.metrics.rebuild_step.observe(time.perf_counter() - t0)
        self._rebuild_over(res, t0)

    def _commit_rebuild_write(self, res: RebuildStep, t0: float) -> None:
        """The rebuild's flip or after-swap rows; the swap's pause is its step and the flip."""
        assert res.write is not None
        self._commit(res.write)
        self._rebuild_committed(res, t0)

    def _rebuild_committed(self, res: RebuildStep, t0: float) -> None:
        assert self.rebuild is not None
        swapped = self.rebuild.swap_outcome
        if isinstance(res.write, Flip) and swapped is not None:
            m = self.metrics
            m.rebuild_last_success.set(time.time())
            m.rebuild_drift.set(swapped.drift)
            m.rebuild_pause.observe(time.perf_counter() - t0)

    def _rebuild_over(self, res: RebuildStep, t0: float) -> None:
        m = self.metrics
        outcome = res.outcome
        assert outcome is not None and self.rebuild is not None
        if not outcome.swapped:
            m.rebuild_pause.observe(time.perf_counter() - t0)
        m.rebuild_swaps.labels("swapped" if outcome.swapped else "rejected").inc()
        if outcome.swapped:  # a restore never goes back to an older model version
            self._snapshot_requested = True
        if outcome.unguarded:
            m.rebuild_unguarded.inc()
        m.rebuild_rows.inc(outcome.rows_resolved)
        m.rebuild_seconds.observe(time.monotonic() - self.rebuild.started)
        self._end_rebuild()
        self._publish_gauges()

    def _rebuild_failed(self, exc: RuntimeError) -> None:
        m = self.metrics
        assert self.rebuild is not None
        if self.rebuild.swap_outcome is not None:  # failed after the flip: the new model
            log.error("%s; the new model is live, rows not yet re-solved keep what SGD learnt", exc)
            m.rebuild_swaps.labels("swapped").inc()
            m.rebuild_last_success.set(time.time())
        else:
            log.error("%s; keeping the current model", exc)
            m.rebuild_swaps.labels("failed").inc()
        self._end_rebuild()

    def _end_rebuild(self, *, unfinished: bool = False) -> None:
        """`unfinished`: the store still marks a swap's after-swap rows (rebuild again)."""
        swapped = self.rebuild is not None and self.rebuild.swap_outcome is not None
        # a staged model nobody reads goes now; a replaced one after readers have moved on
        self._commit(DropGenerations(older=False))
        self.rebuild = None
        self.schedule.ended(
            self.model.state.events_applied,
            time.monotonic(),
            replaced_below=self.store.generation() if swapped else None,
            unfinished=unfinished,
        )
        self.metrics.rebuild_running.set(0)
        log.info("rebuild done")

    def _collect(self, stop: kafka_io.StopFlag) -> list[Message]:
        """Up to `max_batch_events` messages. `max_batch_seconds` bounds the wait for the first,
        `batch_linger_seconds` the wait for more once one is here; neither bounds the draining of
        what is already fetched: behind a backlog the batch fills up (larger commits cost less
        per event), and a light stream is committed within the linger of its first event (a
        batch that waited out `max_batch_seconds` whatever came added up to 100 ms to the
        freshness of every event at 1,000 events/s: bench_modellog.py)."""
        s = self.settings
        deadline = time.monotonic() + s.max_batch_seconds
        # what the last kernel's prefetch fetched comes first, handled as if fetched now
        ahead, self._ahead = self._ahead, []
        if ahead:
            deadline = min(deadline, time.monotonic() + s.batch_linger_seconds)
        out = self._take([], ahead)
        while len(out) < s.max_batch_events and not stop:
            left = max(0.0, deadline - time.monotonic())
            # whatever is fetched at once, else the wait for the next message only
            got = kafka_io.drain(self.consumer, min(s.max_batch_events - len(out), 10_000), left)
            if not got and left == 0.0:
                break
            if got and not out:
                deadline = min(deadline, time.monotonic() + s.batch_linger_seconds)
            out = self._take(out, got)
        return out

    def _take(self, out: list[Message], got: list[Message]) -> list[Message]:
        """`out` with the messages of `got` appended; errors are handled here."""
        for m in got:
            err = m.error()
            if err is None:
                out.append(m)
            elif err.code() in offset_gap.OUT_OF_RANGE and m.topic() == self.topic:
                # the fetch position left the log (retention, a truncated or recreated
                # topic): Kafka said so; the policy decides
                p = m.partition()
                stored = self.offsets.get((self.topic, p)) if p is not None else None
                at = m.offset() if stored is None else stored
                if (
                    p is not None
                    and at is not None
                    and at >= 0
                    and self._resume_at(self.topic, p, at, True)
                ):
                    # read before the move, from the log the policy left: not applied
                    out = [x for x in out if x.partition() != p]
            elif err.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer error: %s", err)
                self.metrics.errors.labels("broker").inc()
        return out

    def process(self, msgs: list[Message]) -> None:
        """Decode, learn, write, commit the messages: one micro-batch, or in the deterministic
        mode as many as it takes to end one exactly where a rebuild is due (run in between)."""
        if not self.deterministic:
            self._process(msgs)
            return
        while msgs:
            self._drive_rebuild()  # one due at once (a restart where one did not end)
            cut = self._cut(msgs)
            self._process(msgs[:cut])
            msgs = msgs[cut:]
        self._drive_rebuild()

    def _cut(self, msgs: list[Message]) -> int:
        """How many of `msgs` to take so that the batch holds at most the events left before
        the next rebuild (a message holds at most one event: decoded only when that matters)."""
        left = None
        if self.deterministic:
            left = self.schedule.events_until_due(self.model.state.events_applied)
        if left is None or left >= len(msgs):
            return len(msgs)
        if left == 0:  # the rebuild could not run (an empty model): nothing to cut for
            return len(msgs)
        values, _parts, _offs, stamps = _columns(msgs)
        latest = future_bounds(stamps, self.settings.max_future_seconds)
        dec = decode_events(values, self.types, self.settings.max_message_bytes, latest)
        if len(dec.positions) <= left:
            return len(msgs)
        return dec.positions[left - 1] + 1

    def _process(self, msgs: list[Message]) -> None:
        """Decode, learn, write, commit one micro-batch (see the module docstring)."""
        t0 = time.perf_counter()
        self.metrics.consumed.inc(len(msgs))
        try:
            att = self._attempt(msgs)
        except _STOPS:
            raise
        except Exception as exc:
            if self.store.pending:
                self._rewind(msgs, exc)
            else:
                self._isolate(msgs, exc)
            return
        self._finish(msgs, att, t0)

    def _rewind(self, msgs: list[Message], exc: Exception) -> None:
        """A batch failed with batches learned since the last checkpoint: the model is
        reloaded from the store (the checkpoint), and the consumer goes back to its offsets.
        Up to the end of the failed batch every batch is written at once, so the one that
        meets the failing message again is isolated from a store that holds all before it."""
        log.error("a batch of %d message(s) failed (%s) with %d batch(es) learned since the "
                  "last checkpoint: reading them again from the checkpoint", len(msgs),
                  _describe(exc), self.store.pending)  # fmt: skip
        log.debug("the batch failed with", exc_info=exc)
        _values, parts, offs, _stamps = _columns(msgs)
        to = dict(self._rewound_to or {})
        for p in unique_sorted(parts).tolist():
            key = (self.topic, p)
            to[key] = max(to.get(key, 0), int(offs[parts == p].max()) + 1)
        self._rewound_to = to
        self.publisher.replay_from_here()
        self.store.discard_pending()
        self.store.deferred = False
        self._reload()
        self.offsets = self.store.offsets()
        self._sent_before = None  # dead letters of the batches read again: read back first
        self._forget_ahead()
        for tp in self.assigned:
            at = self.offsets.get((tp.topic, tp.partition))
            self.consumer.seek(
                TopicPartition(tp.topic, tp.partition, OFFSET_BEGINNING if at is None else at)
            )

    def _after_rewind(self) -> None:
        """Checkpoints again once the batches read again passed the failed one."""
        to = self._rewound_to
        if to is not None and all(self.offsets.get(k, 0) >= o for k, o in to.items()):
            self._rewound_to = None
            self.store.deferred = self.checkpointed

    def _decode(self, msgs: list[Message]) -> _Decoded:
        values, parts, offs, stamps = _columns(msgs)
        s = self.settings
        latest = future_bounds(stamps, s.max_future_seconds)  # inf: no bound
        dec = decode_events(values, self.types, s.max_message_bytes, latest)
        return _Decoded(msgs, parts, offs, dec)

    def _decoded(self, msgs: list[Message]) -> _Decoded:
        """`msgs` decoded, reusing what the prefetch decoded of them (a prefix, if nothing
        between moved a partition: then `_pre` is gone)."""
        pre, self._pre = self._pre, None
        if pre is None or len(pre.msgs) > len(msgs):
            return self._decode(msgs)
        if not all(a is b for a, b in zip(pre.msgs, msgs, strict=False)):
            return self._decode(msgs)
        k = len(pre.msgs)
        return pre if k == len(msgs) else _joined([pre, self._decode(msgs[k:])])

    def _attempt(self, msgs: list[Message]) -> _Attempt:
        """Decode and learn a batch in memory: nothing is sent or written yet."""
        d = self._decoded(msgs)
        dec, parts, offs = d.dec, d.parts, d.offs
        pos = np.asarray(dec.positions, np.int64)
        batch = EventBatch(
            user_ids=dec.users,
            item_ids=dec.items,
            weights=np.asarray(dec.weights, np.float64),
            times=np.asarray(dec.times, np.float64),
            partitions=parts[pos],
            offsets=offs[pos],
        )
        if self.rebuild is not None and self.rebuild.wants_scores:
            st = self.model.state
            self.rebuild.score(
                st,
                st.users.lookup(batch.user_ids).astype(np.int64),
                st.items.lookup(batch.item_ids).astype(np.int64),
                lambda u: self.store.user_items(u)[0].astype(np.int64),
            )
        s = self.settings
        if self._worker is not None and not self._isolating and len(batch) >= s.pipeline_min_events:
            delta = self._learn_overlapped(batch)
        else:
            self.publisher.release()
            delta = self._learn(batch)
        if self.rebuild is not None:
            self.rebuild.note(delta)
        return _Attempt(dec, batch, delta, parts, offs)

    def _learn_overlapped(self, batch: EventBatch) -> BatchDelta:
        """The loop's one concurrent state, LEARNING: `_learn` (the nogil SGD kernel, the
        confidence and transition kernels, live evaluation) runs on the worker thread while
        this thread hands the last commit's held model log records to the producer and
        prefetches and decodes the next batch's messages, none of which reads or writes the
        model or the store; it ends here, before any other step, also on an error (the
        worker's error is raised here, as `_learn`'s would be). The order of learning is
        unchanged (one batch at a time; ids resolved inside `_learn`, after the previous
        batch's), so the state is bit-identical to learning without the pipeline."""
        assert self._worker is not None
        t0 = time.perf_counter()
        fut = self._worker.submit(self._timed_learn, batch)
        work = self._side_work()
        try:
            t1 = time.perf_counter()
            for _ in work:
                # one step at a time, inside the kernel's windows (`_windowed_kernel`)
                while not self._in_kernel.wait(WINDOW_POLL_S) and not fut.done():
                    pass
                if fut.done():
                    break
        finally:
            work.close()  # what it fetched and decoded so far is kept
            t2 = time.perf_counter()
            wait([fut])  # the kernel in flight ends before anything else happens
        t3 = time.perf_counter()
        # what the windows left of the last commit's records goes now: no record waits
        # more than a batch
        self.publisher.release()
        delta, learn_s, learn_cpu, learn_runq = fut.result()
        turn = self._turn
        turn.add("learn_worker", learn_s)
        turn.add("learn_worker_cpu", learn_cpu)
        turn.add("overlap_release", t1 - t0)
        turn.add("overlap_prefetch", t2 - t1)
        turn.add("learn_wait", t3 - t2)
        tot = self._pipeline_s
        tot[0] += learn_s
        tot[1] += t3 - t2
        tot[2] += t2 - t0
        tot[3] += 1
        tot[4] += learn_cpu
        tot[5] += learn_runq
        return delta

    def _timed_learn(self, batch: EventBatch) -> tuple[BatchDelta, float, float, float]:
        """`_learn` on the worker, with its wall time, CPU time and run-queue wait (what is
        left of the wall time is waiting for the GIL, mostly)."""
        t, c, q = time.perf_counter(), time.thread_time(), _runq_seconds()
        delta = self._learn(batch, self._windowed_kernel)
        return delta, time.perf_counter() - t, time.thread_time() - c, _runq_seconds() - q

    def _windowed_kernel(self, *args: Any) -> None:
        """`sgd_batch` (the same call: the same state), with `_in_kernel` set while it runs
        without the GIL: the loop's side work runs in these windows only, so the worker's
        Python steps (the critical path) do not wait for a GIL the loop holds to decode."""
        self._in_kernel.set()
        try:
            sgd_batch(*args)
        finally:
            self._in_kernel.clear()

    def _side_work(self) -> Generator[None]:
        """The loop's work while a batch learns, in steps of about a millisecond: hand the
        held model log records to the producer; fetch up to a batch of the next messages
        (what is there already) and decode them. No fetch with a consumer group: a rebalance
        callback inside `consume` sets positions from offsets that do not hold the batch in
        flight. What is left when the learn ends waits for the next turn (`_decoded` reuses
        a decoded prefix)."""
        while self.publisher.held:
            self.publisher.release(SIDE_STEP)
            yield
        s = self.settings
        if s.use_consumer_group:
            return
        cap = s.max_batch_events
        pre = self._pre
        # decoded chunks extend `_pre` while it covers every prefetched message
        chunks: list[_Decoded] = [] if pre is None else [pre]
        contiguous = (0 if pre is None else len(pre.msgs)) == len(self._ahead)
        try:
            while len(self._ahead) < cap and not self._stop:
                yield
                got = kafka_io.drain(self.consumer, min(cap - len(self._ahead), SIDE_STEP), 0)
                if not got:
                    return
                self._ahead.extend(got)
                # an error is handled in `_collect`, at the turn's start: nothing after it
                # is decoded ahead
                contiguous = contiguous and all(m.error() is None for m in got)
                if contiguous:
                    yield
                    chunks.append(self._decode(got))
        finally:
            if len(chunks) > (pre is not None):
                self._pre = _joined(chunks)

    def _finish(self, msgs: list[Message], att: _Attempt, t0: float) -> None:
        """Dead letters acknowledged, then one WriteBatch, then the offsets to Kafka."""
        dec, batch = att.dec, att.batch
        nxt = self._next_offsets(att.parts, att.offs)
        if dec.rejects:
            self._dead_letter(msgs, dec.rejects)
        t1 = time.perf_counter()
        inner = self._turn.inner
        published, published_cpu = inner.get("publish", 0.0), inner.get("publish_cpu", 0.0)
        c1 = time.thread_time()
        self._commit(CommitBatch(att.delta, nxt, batch.times))
        t2 = time.perf_counter()
        self._turn.add("learn", t1 - t0)
        self._turn.add("store_kb", self.store.last_write_bytes / 1e6)  # logged x1e3: kB
        self._turn.add("db_write", self.store.last_write_seconds[0])  # of which RocksDB's write
        self._turn.add("db_write_cpu", self.store.last_write_seconds[1])
        self.metrics.store_bytes.inc(self.store.last_write_bytes)
        self._turn.add("store", t2 - t1 - (inner.get("publish", 0.0) - published))
        self._turn.add(
            "store_cpu", time.thread_time() - c1 - (inner.get("publish_cpu", 0.0) - published_cpu)
        )
        self.offsets.update(nxt)
        if not self.store.deferred:  # else at the checkpoint (Kafka never ahead of the store)
            self.consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in nxt.items()], asynchronous=True
            )
        self._after_rewind()
        m = self.metrics
        m.apply_seconds.observe(t1 - t0)
        m.write_seconds.observe(t2 - t1)
        m.batches.inc()
        m.batch_events.observe(len(msgs))
        for etype in set(dec.types):  # a few types: list.count scans in C
            m.applied.labels(etype).inc(dec.types.count(etype))
        if len(batch):
            observe_many(m.event_age, time.time() - batch.times)
            if self._collected_at:
                observe_many(m.event_fetch_age, self._collected_at - batch.times)
        m.last_commit.set(time.time())
        m.pending_events.set(self.store.pending_events() if self.store.pending else 0)
        replayed = self.publisher.replayed
        if replayed > self._replayed_seen:
            m.replayed.inc(replayed - self._replayed_seen)
            self._replayed_seen = replayed
        self._publish_gauges()
        if self.restored is not None and not self.restored.done:
            self._count_replayed(att.parts, att.offs)

    def _isolate(self, msgs: list[Message], exc: Exception) -> None:
        """Find the message a batch failed on by halving it (see the module docstring):
        every half that succeeds is committed, the one message that fails alone is
        dead-lettered `internal`. Each failure reloads the model from the store first."""
        first, last = msgs[0], msgs[-1]
        log.error(
            "a batch of %d message(s) from %s[%d]@%d to %s[%d]@%d failed (%s): reloading the "
            "model from the store and isolating the message that fails",
            len(msgs),
            first.topic(),
            first.partition(),
            first.offset(),
            last.topic(),
            last.partition(),
            last.offset(),
            _describe(exc),
        )
        log.debug("the batch failed with", exc_info=exc)
        self._reload()
        # every half is written at once: the next failure reloads the store, which must hold it
        deferred, self.store.deferred = self.store.deferred, False
        self._isolating = True  # one half after the other, no prefetch
        try:
            self._halves(msgs)
        finally:
            self.store.deferred = deferred
            self._isolating = False

    def _halves(self, msgs: list[Message]) -> None:
        todo: deque[list[Message]] = deque([msgs])
        while todo:
            part = todo.popleft()
            t0 = time.perf_counter()
            try:
                att = self._attempt(part)
            except _STOPS:
                raise
            except Exception as err:
                self._reload()
                if len(part) > 1:
                    half = len(part) // 2
                    todo.extendleft([part[half:], part[:half]])  # first half first
                    continue
                att = self._failed(part[0], err)
            self._finish(part, att, t0)

    def _failed(self, m: Message, exc: Exception) -> _Attempt:
        """The attempt of a message that fails alone: nothing learnt, dead-lettered `internal`."""
        text = _describe(exc)
        log.error(
            "internal error on %s[%d]@%d, dead-lettered with reason internal (a bug: please "
            "report it with that dead letter): %s",
            m.topic(),
            m.partition(),
            m.offset(),
            text,
        )
        log.debug("the message failed with", exc_info=exc)
        dec = DecodedEvents(rejects=[Reject(0, "internal", text)])
        parts = np.asarray([m.partition()], np.int32)
        offs = np.asarray([m.offset()], np.int64)
        empty = np.empty(0, np.int64)
        batch = EventBatch([], [], np.empty(0), np.empty(0), np.empty(0, np.int32), empty)
        return _Attempt(dec, batch, BatchDelta.empty(self.model.state), parts, offs)

    def _reload(self) -> None:
        """The model as of the last commit: a failed attempt may have changed it half way.
        A rebuild in flight is given up (it holds the old arrays); one whose swap was not
        finished starts again, as after a restart."""
        if self.rebuild is not None:
            log.warning("giving up the rebuild in flight: the model is reloaded from the store")
            if self.rebuild.swap_outcome is None:
                self.metrics.rebuild_swaps.labels("failed").inc()
            self._end_rebuild(unfinished=self.store.rebuild_unfinished() is not None)
        state = self.store.load(self.settings.model)
        self.model = OnlineModel(state.config, state)
        self._publish_gauges()

    def _learn(self, batch: EventBatch, kernel: Kernel | None = None) -> BatchDelta:
        """Learn the batch, scoring the sampled events test-then-learn on the way."""
        picks = self.live.sample(batch)
        if picks.size == 0:
            return self.model.learn(batch, kernel)
        picked_users = {batch.user_ids[p] for p in picks.tolist()}
        earlier: dict[str, list[str]] = {}
        pieces: list[BatchDelta] = []
        lo = 0
        m = self.metrics
        state = self.model.state
        for p in picks.tolist():
            if p > lo:
                pieces.append(self.model.learn(batch.slice(lo, p), kernel))
                for j in range(lo, p):
                    uid = batch.user_ids[j]
                    if uid in picked_users:
                        earlier.setdefault(uid, []).append(batch.item_ids[j])
                lo = p
            uid = batch.user_ids[p]

            def seen(u: int, uid: str = uid) -> np.ndarray:
                stored, _ = self.store.user_items(u)
                recent = state.items.lookup(earlier.get(uid, []))
                return np.concatenate([stored, recent[recent >= 0]]).astype(np.int64)

            result = self.live.score(state, uid, batch.item_ids[p], seen)
            if result is not None:
                w = self.live.weight  # > 1 when the per-batch cap left sampled events out
                m.live_scored.inc(w)
                m.live_hits.inc(w * result[0])
                m.live_ndcg.inc(w * result[1])
        pieces.append(self.model.learn(batch.slice(lo, len(batch)), kernel))
        hr, ndcg = self.live.window()
        m.live_hr_window.set(hr)
        m.live_ndcg_window.set(ndcg)
        return merge_deltas(pieces, state)

    def _next_offsets(self, parts: np.ndarray, offs: np.ndarray) -> dict[tuple[str, int], int]:
        """Next offset per partition after this batch (all messages come from one topic)."""
        nxt: dict[tuple[str, int], int] = {}
        for p in unique_sorted(parts).tolist():
            nxt[(self.topic, p)] = int(offs[parts == p].max()) + 1
        for key, o in nxt.items():
            before = self.offsets.get(key, 0)
            if o <= before:
                raise OffsetRegressionError(
                    f"{key[0]}[{key[1]}] offset went backwards: next {o} after {before} was "
                    "already applied; another process may be consuming with this group id"
                )
        return nxt

    def _dead_letter(self, msgs: list[Message], rejects: list[Reject]) -> None:
        """Send each reject with its reason and origin, and wait for the broker's ack.

        A message too large to send whole (over the producer's message.max.bytes, or refused
        by the broker for its size) is sent truncated, saying so in its headers; the original
        stays findable by original.topic/partition/offset."""
        topic = self.settings.topics.dead_letter
        if self._sent_before is None:
            self._sent_before = self._read_back_dead_letters(topic)
        if self._sent_before:
            sent_before = self._sent_before
            keep = [
                r
                for r in rejects
                if (msgs[r.position].partition(), msgs[r.position].offset()) not in sent_before
            ]
            if len(keep) < len(rejects):
                log.info(
                    "%d dead letter(s) of this batch were sent before the last stop (its batch "
                    "was not committed): not sending them again",
                    len(rejects) - len(keep),
                )
                rejects = keep
        failed_before = self.deliveries.failed
        todo = [(msgs[r.position], r, self._dlt_limit) for r in rejects]
        while todo:
            refused: list[tuple[Message, Reject, int]] = []
            for m, r, limit in todo:
                self._send_dead_letter(topic, m, r, limit, refused)
            self._await_dead_letters(topic, failed_before)
            todo = []
            for m, r, sent in refused:  # the broker's limit is lower: halve until it fits
                if sent <= MIN_DEAD_LETTER_BYTES:
                    raise DeadLetterError(
                        f"the broker refuses a {sent}-byte dead letter for "
                        f"{m.topic()}[{m.partition()}]@{m.offset()} as too large; check the "
                        f"max.message.bytes of {topic!r}"
                    )
                todo.append((m, r, sent // 2))
        for r in rejects:
            self.metrics.dead_lettered.labels(r.reason).inc()

    def _read_back_dead_letters(self, topic: str) -> set[tuple[int, int]]:
        """(partition, offset) of this topic's messages at or past the stored offsets that are
        already on the dead-letter topic: a batch's dead letters are acknowledged before its
        WriteBatch, so a kill in between leaves them sent but the batch to be read again.

        They are the end of each dead-letter partition (dead letters are sent in batch order),
        so it is read back from its end until a dead letter of a committed batch shows, at most
        a batch's worth. Best effort: if the broker cannot say, they are sent again (README)."""
        if not self.offsets:
            return set()  # nothing committed yet: a fresh store sends every dead letter
        name = self.topic.encode()
        found: set[tuple[int, int]] = set()
        c = kafka_io.consumer(self.settings.kafka, f"{self.settings.group_id}-dead-letters")
        try:
            meta = c.list_topics(topic, timeout=5.0)
            t = meta.topics.get(topic)
            if t is None or t.error is not None:
                return found
            for p in sorted(t.partitions):
                lo, end = c.get_watermark_offsets(TopicPartition(topic, p), 5.0, cached=False)
                budget = self._read_back_budget()
                tail = True
                while end > lo and budget > 0:
                    start = max(lo, end - DLT_READ_BACK_CHUNK)
                    older = False
                    # the end of the log is found by fetching: the embedded broker's high
                    # watermark can lag behind a batch of several records
                    for m in _read_range(c, topic, p, start, None if tail else end):
                        h = kafka_io.headers_dict(m.headers())
                        if h.get("original.topic") != name:
                            continue
                        part, off = int(h["original.partition"]), int(h["original.offset"])
                        stored = self.offsets.get((self.topic, part))
                        if stored is None:
                            continue
                        if off >= stored:
                            found.add((part, off))
                        else:
                            older = True
                    budget -= end - start
                    if older:
                        break
                    end, tail = start, False
        except (KafkaException, KeyError, ValueError) as exc:
            log.warning(
                "cannot read back the end of %r (%s): dead letters of a batch interrupted "
                "before its commit may be sent again",
                topic,
                exc,
            )
        finally:
            c.close()
        return found

    def _read_back_budget(self) -> int:
        """Dead letters that may lie past the stored offsets: a checkpoint interval's (plus a
        batch: the checkpoint is checked between batches) and a batch's worth of margin."""
        s = self.settings
        window = (s.checkpoint_events or DLT_READ_BACK_MAX) if self.checkpointed else 0
        return window + 2 * s.max_batch_events + DLT_READ_BACK_CHUNK

    def _send_dead_letter(
        self,
        topic: str,
        m: Message,
        r: Reject,
        limit: int,
        refused: list[tuple[Message, Reject, int]],
    ) -> None:
        raw = m.value() or b""
        text = 2000  # characters of error.message
        while True:
            value, key, cut = _truncate(raw, m.key(), limit)
            headers = kafka_io.str_headers(
                {
                    "error.reason": r.reason,
                    "error.message": r.message[:text],
                    "original.topic": m.topic(),
                    "original.partition": m.partition(),
                    "original.offset": m.offset(),
                    **cut,
                }
            )
            sent = len(value) + len(key or b"")

            def delivered(err: KafkaError | None, msg: object, sent: int = sent) -> None:
                if err is not None and err.code() == KafkaError.MSG_SIZE_TOO_LARGE:
                    refused.append((m, r, sent))  # sent again, smaller
                else:
                    self.deliveries(err, msg)

            try:
                self.dlt.produce(
                    topic,
                    value=value if m.value() is not None else None,
                    key=key,
                    headers=headers,
                    on_delivery=delivered,
                )
                break
            except BufferError:  # the local queue is full: let deliveries drain it
                self.dlt.poll(0.1)
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                if not isinstance(err, KafkaError) or err.code() != KafkaError.MSG_SIZE_TOO_LARGE:
                    raise DeadLetterError(f"cannot send a dead letter to {topic!r}: {exc}") from exc
                if sent == 0 and text <= 200:
                    raise DeadLetterError(
                        f"cannot send even the headers of a dead letter to {topic!r} ({exc}): "
                        f"is message.max.bytes ({self._dlt_max}) that small?"
                    ) from exc
                # headers over the headroom (a tiny message.max.bytes): cut the rest and them
                limit, text = sent // 2, 200
        if cut:
            log.warning(
                "dead-lettered %s[%d]@%d (%s) truncated to %d of %d bytes: a dead letter must "
                "fit the producer's message.max.bytes (%d)",
                m.topic(),
                m.partition(),
                m.offset(),
                r.reason,
                len(value),
                len(raw),
                self._dlt_max,
            )
        log.debug("dead-lettered %s[%d]@%d: %s", m.topic(), m.partition(), m.offset(), r.message)

    def _await_dead_letters(self, topic: str, failed_before: int) -> None:
        """Wait until the broker acknowledges this batch's dead letters: the batch is committed
        only after them. A broker outage is ridden out for up to `dead_letter_timeout_seconds`,
        and the wait shows while it lasts (this thread serves no consumer callbacks meanwhile,
        so nothing else would count it); a stop request ends it without committing."""
        s = self.settings
        start = time.monotonic()
        deadline = start + s.dead_letter_timeout_seconds
        report_at = start + STALL_REPORT_S
        stopping = False
        left = self.dlt.flush(min(1.0, s.dead_letter_timeout_seconds))
        while left and self.deliveries.failed == failed_before:
            now = time.monotonic()
            if self._stop and not stopping:  # a slow broker gets a grace period, not a hang
                stopping = True
                deadline = min(deadline, now + STOP_GRACE_S)
            if now >= deadline:
                break
            if now >= report_at:
                log.warning(
                    "%d dead letter(s) to %r not acknowledged after %.0f s: is the broker "
                    "reachable? This batch waits (up to dead_letter_timeout_seconds=%g) and is "
                    "committed only after they are delivered",
                    left,
                    topic,
                    now - start,
                    s.dead_letter_timeout_seconds,
                )
                self.metrics.errors.labels("broker").inc()
                report_at = now + STALL_REPORT_S
            left = self.dlt.flush(min(1.0, deadline - now))
        if self.deliveries.failed != failed_before:
            raise DeadLetterError(
                f"{left} dead letter(s) not delivered to {topic!r} (last error: "
                f"{self.deliveries.last_error}); the batch is not committed and will be read again"
            )
        if left and stopping:
            raise StoppedBeforeCommitError(
                f"stopping with {left} dead letter(s) to {topic!r} not acknowledged after "
                f"{time.monotonic() - start:.0f} s: the batch is not committed and will be read "
                "again"
            )
        if left:
            raise DeadLetterError(
                f"{left} dead letter(s) not delivered to {topic!r} (not acknowledged within "
                f"dead_letter_timeout_seconds={s.dead_letter_timeout_seconds:g}); the batch is "
                "not committed and will be read again"
            )

    def _publish_gauges(self) -> None:
        st = self.model.state
        self.metrics.users.set(st.users.n)
        self.metrics.items.set(st.items.n)
        self.metrics.model_version.set(st.model_version)

    def _refresh_lag(self) -> None:
        """Read watermarks on the loop thread (the client is not to be called from the scrape
        thread: it blocked scrapes while consume() waited); the collector serves these rows."""
        rows = []
        for tp in list(self.assigned):
            try:
                _lo, hi = self.consumer.get_watermark_offsets(tp, cached=True)
            except Exception:  # not fetched yet
                hi = None
            rows.append((tp.partition, hi, self.offsets.get((tp.topic, tp.partition), 0)))
        self._lag = rows

    # ---- learner snapshots (consumers/learner_snapshot.py) ------------------------------------

    def _learner_snapshot(self) -> LearnerSnapshot:
        """The state as of the last commit (between batches the model and the store agree)."""
        st = self.store
        return LearnerSnapshot(
            self.model.state, st.offsets(), st.generation(), st.commits(), st.rebuilt_at(),
            st.rebuild_unfinished(), st.rebuilt_events(),
        )  # fmt: skip

    def _restored(self, r: restore.Restored) -> None:
        """Carry on from the store a restore just wrote, as a start on it would have."""
        state = self.store.load(self.settings.model)
        self.model = OnlineModel(state.config, state)
        self.offsets = self.store.offsets()
        self.schedule.events_at_last = self._rebuild_origin(state.events_applied)
        if self.store.rebuild_unfinished() is not None:
            self.schedule.request()
        p = self.publisher  # it was made for the empty store
        p.gen, p.seq = self.store.generation(), self.store.commits()
        p.offsets = {f"{t}/{q}": o for (t, q), o in self.offsets.items()}
        w = self.snapshots
        w.last, w.last_commits, w.last_at = r.end, self.store.commits(), r.end.at
        self._snapshot_events = state.events_applied
        self.metrics.restore_seconds.set(r.seconds)
        self._publish_gauges()

    def _snapshot_if_due(self) -> None:
        """Periodically, every N events if set, after a swap and on request; never while one is
        being written, nor when nothing was committed since the last."""
        w, s = self.snapshots, self.settings
        now = time.monotonic()
        events = self.model.state.events_applied
        due = (
            self._snapshot_requested
            or now >= self._next_snapshot
            or (
                bool(s.learner_snapshot_events)
                and events - self._snapshot_events >= (s.learner_snapshot_events or 0)
            )
        )
        if not due or w.busy:
            return
        self._checkpoint()  # the snapshot names the store's offsets: memory and store agree
        if self.store.commits() == w.last_commits or self.store.is_new:
            self._snapshot_requested = False
            self._next_snapshot = now + s.learner_snapshot_seconds
            return
        if w.submit(self._learner_snapshot()):
            self._snapshot_requested = False
            self._next_snapshot = now + s.learner_snapshot_seconds
            self._snapshot_events = events

    def _final_snapshot(self) -> None:
        """At a clean stop: the state as of the last commit, if newer than the last snapshot."""
        w = self.snapshots
        if not w.wait(30.0) or self.store.is_new or self.store.commits() == w.last_commits:
            return
        w.submit(self._learner_snapshot())
        if not w.wait(60.0):
            log.warning("the learner snapshot at stop was not acknowledged within 60 s")

    def _count_replayed(self, parts: np.ndarray, offs: np.ndarray) -> None:
        """Messages below the log's end at restore time: the replay after a restore."""
        r = self.restored
        assert r is not None
        n = 0
        for (t, p), end in r.log_ends.items():
            if t == self.topic:
                n += int(np.count_nonzero((parts == p) & (offs < end)))
        r.replayed += n
        self.metrics.restore_replayed.inc(n)
        if all(self.offsets.get(k, 0) >= end for k, end in r.log_ends.items()):
            r.done = True
            log.info("replay after the restore done: %d message(s) in %.1f s", r.replayed,
                     time.monotonic() - self._started)  # fmt: skip

    def close(self) -> None:
        for c in (self.consumer, self.control, *([self._probe] if self._probe else [])):
            try:
                c.close()
            except Exception as exc:  # already closed or broker gone: nothing to lose here
                log.debug("consumer close: %s", exc)
        self.dlt.flush(5.0)
        self.snapshots.close()
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            learn, waited, meanwhile, n, cpu, runq = self._pipeline_s
            if n:
                log.info("pipeline: %d batches learned on the worker in %.2f s, the loop waited "
                         "%.2f s of it and worked %.2f s meanwhile (overlap %.2f s, %.0f%%); the "
                         "learn's CPU %.2f s, run queue %.2f s, the rest (the GIL) %.2f s", n,
                         learn, waited, meanwhile, learn - waited,
                         100 * (learn - waited) / learn if learn else 0, cpu, runq,
                         learn - cpu - runq)  # fmt: skip
        self.publisher.close()
        try:
            self.store.close()
        except Exception as exc:  # after a failed write RocksDB reports it again on close
            log.error("closing the model store: %s", exc)
