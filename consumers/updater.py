"""The updater: the one process that learns from `interactions` and writes the model store.

Commit order, per micro-batch (the exactly-once argument; DESIGN.md):
  1. consume up to `max_batch_events` messages, waiting at most `max_batch_seconds` for more;
  2. decode; bad messages go to the dead-letter topic, and that producer is flushed: a message
     whose dead letter was not acknowledged must not be skipped;
  3. learn the valid events (in memory);
  4. write every changed row and the next offsets in one RocksDB WriteBatch;
  5. only then commit the offsets to Kafka, so standard tools show lag.
On assignment the consumer seeks to the offsets stored in RocksDB, never to Kafka's, so a crash
anywhere replays exactly the batches that were not written, and the seeded learner replays them
bit for bit. Any error in 2-4 stops the process without committing anything.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import numpy as np
import orjson
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, KafkaError, Message, TopicPartition
from prometheus_client import CollectorRegistry

from consumers import gc_control, kafka_io
from consumers.metrics import (
    CallbackGauges,
    LagCollector,
    UpdaterMetrics,
    observe_many,
    serve_metrics,
)
from consumers.settings import UpdaterSettings
from stream_mf.decode import decode_events
from stream_mf.live_eval import LiveEvaluator
from stream_mf.model import BatchDelta, EventBatch, OnlineModel, merge_deltas
from stream_mf.rebuild import Rebuild, warm_up_rebuild
from stream_mf.store import StateStore, StoreError

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_STORE = 3
EXIT_DEAD_LETTER = 4
EXIT_OFFSETS = 5
# while dead letters wait for the broker, say so this often (log and errors_total{kind="broker"})
STALL_REPORT_S = 5.0
# a swapped-out model's rows stay this long after a rebuild (another rebuild may start
# meanwhile): query processes answer requests from the view they hold (users pinned to its
# generation) until their next refresh, which can take seconds on a large catalogue
# (bench/bench_follower.py); a restart of the updater drops them at once
OLD_GENERATION_GRACE_S = 60.0
# after a stop request a batch still waits this long for its dead letters (a slow broker), then
# stops uncommitted; well inside a container's usual 30 s stop grace period
STOP_GRACE_S = 10.0


class DeadLetterError(RuntimeError):
    pass


class StoppedBeforeCommitError(RuntimeError):
    """A stop request ended the wait for a batch's dead letters: that batch is read again."""


class OffsetRegressionError(RuntimeError):
    """An offset went backwards: something other than this process moved the consumer."""


def _columns(
    msgs: list[Message],
) -> tuple[list[bytes | None], np.ndarray, np.ndarray, np.ndarray]:
    """Payloads, partitions, offsets and Kafka timestamps (ms) in one pass over the messages."""
    values: list[bytes | None] = []
    parts: list[int] = []
    offs: list[int] = []
    stamps: list[int] = []
    va, pa, oa, sa = values.append, parts.append, offs.append, stamps.append
    for m in msgs:
        va(m.value())
        pa(m.partition())
        oa(m.offset())
        sa(m.timestamp()[1])
    return (
        values,
        np.asarray(parts, np.int32),
        np.asarray(offs, np.int64),
        np.asarray(stamps, np.int64),
    )


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


class Updater:
    def __init__(self, settings: UpdaterSettings, registry: CollectorRegistry | None = None):
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.metrics = UpdaterMetrics(self.registry, settings.model.event_types)
        self.store = StateStore(settings.state_dir, sync=settings.sync_writes)
        state = self.store.load(settings.model)
        self.model = OnlineModel(state.config, state)
        self.offsets: dict[tuple[str, int], int] = self.store.offsets()
        self.types = state.config.event_types
        self.live = LiveEvaluator(
            rate=settings.live_eval_rate, max_per_batch=settings.live_eval_max_per_batch
        )
        self.topic = settings.topics.interactions
        self.assigned: list[TopicPartition] = []
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
                )
            },
        )
        self.dlt = kafka_io.producer(
            settings.kafka,
            on_error=self.metrics.errors.labels("broker").inc,
            # librdkafka gives up on a message after this (default 300 s): never before the wait
            **{"message.timeout.ms": max(wait_ms, 1000)},
        )
        self.deliveries = kafka_io.DeliveryTracker()
        self.metrics_port: int | None = None
        self._stop = kafka_io.StopFlag()
        self._next_metadata = 0.0
        self.rebuild: Rebuild | None = None
        # (when, generation): drop the models under that generation then (a swap's old one)
        self._drops: list[tuple[float, int]] = []
        self._rebuild_requested = False
        self._rebuilt_at = time.monotonic()
        self._rebuilt_at_events = state.events_applied
        self.control = kafka_io.consumer(settings.kafka, f"{settings.group_id}-control")
        self._control_assigned = False
        self._next_control_check = 0.0
        self.registry.register(
            CallbackGauges(
                {"stream_mf_store_size_bytes": ("Bytes of the model store on disk", self._size)}
            )
        )
        self._size_cache = (0.0, 0)
        self._lag: list[tuple[int, int | None, int]] = []
        warm_up_rebuild()  # compile (or load) the rebuild's kernels now, not inside a swap
        self.registry.register(LagCollector(lambda: self._lag))
        rebuilt = self.store.rebuilt_at()
        # no rebuild yet: count the overdue alert from this start, not from 1970
        self.metrics.rebuild_last_success.set(rebuilt if rebuilt else time.time())
        self._publish_gauges()
        unfinished = self.store.rebuild_unfinished()
        if unfinished is not None:
            # the rows left over at that swap keep the last round's solution (one consistent
            # model, but their newest evidence is missing from it): a new rebuild re-solves them
            log.warning(
                "rebuild generation %d stopped before every row left over at its swap was "
                "re-solved (the updater died in its after-swap phase): starting a new rebuild",
                unfinished,
            )
            self._rebuild_requested = True
        ahead = float(state.clock[0]) - time.time()
        if ahead > settings.max_future_seconds:
            log.warning(
                "the model's stream clock is %.0f s ahead of this host's clock: an event from the "
                "future reached it (before future_timestamp existed, or with a larger "
                "max_future_seconds), so new events are decayed as if that old. Check this "
                "host's clock; otherwise replay the topic into a fresh state dir",
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
            tp.offset = stored if stored is not None else OFFSET_BEGINNING
        log.info(
            "assigned %s",
            ", ".join(f"{tp.topic}[{tp.partition}]@{tp.offset}" for tp in partitions),
        )
        self.assigned = list(partitions)
        consumer.assign(partitions)

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        log.info("revoked %d partition(s)", len(partitions))
        self.assigned = []
        consumer.unassign()

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
            log.warning("cannot read metadata of %r: %s", self.topic, exc)
            self.metrics.errors.labels("broker").inc()
            return
        tmeta = meta.topics.get(self.topic)
        if tmeta is None or tmeta.error is not None or not tmeta.partitions:
            log.info("waiting for topic %r to exist", self.topic)
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
        try:
            if s.use_consumer_group:
                self.consumer.subscribe(
                    [self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke
                )
            while not stop:
                if not s.use_consumer_group:
                    self._assign_partitions()
                # behind a backlog, no collections inside a batch (its objects die by reference
                # counting); an idle updater, waiting in consume, collects as usual
                pause = s.pause_gc and busy
                with gc_control.paused() if pause else contextlib.nullcontext():
                    msgs = self._collect(stop)
                    if msgs:
                        self.process(msgs)
                busy = bool(msgs)
                if busy and s.pause_gc and not frozen_kernels:
                    gc_control.freeze_startup()  # the SGD kernels loaded by the first batch too
                    frozen_kernels = True
                self._poll_control()
                self._drive_rebuild()
                self._refresh_lag()
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
        finally:
            self.close()
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
                self._rebuild_requested = True
            else:
                log.warning("ignoring unknown control message %r", (m.value() or b"")[:200])

    def _rebuild_due(self) -> bool:
        cfg = self.settings.rebuild
        st = self.model.state
        if st.users.n == 0 or st.items.n == 0:
            return False
        if self._rebuild_requested:
            return True
        if cfg.every_events and st.events_applied - self._rebuilt_at_events >= cfg.every_events:
            return True
        return bool(cfg.every_seconds and time.monotonic() - self._rebuilt_at >= cfg.every_seconds)

    def _drive_rebuild(self) -> None:
        """Start a rebuild when due; otherwise advance the one in flight (see stream_mf.rebuild)."""
        m = self.metrics
        state = self.model.state
        now = time.monotonic()
        while self._drops and self._drops[0][0] <= now:
            # only generations under the one that replaced them: never the current, nor the
            # one a rebuild in flight is staging
            self.store.drop_other_generations(staged=False, below=self._drops.pop(0)[1])
        if self.rebuild is None:
            if self._rebuild_due():
                self._rebuild_requested = False
                self.rebuild = Rebuild(state, self.store, self.settings.rebuild)
                m.rebuild_running.set(1)
            return
        t0 = time.perf_counter()
        try:
            outcome = self.rebuild.step(state)
        except StoreError:
            raise  # the store itself failed: stop like any other write failure
        except RuntimeError as exc:
            if self.rebuild.swap_outcome is not None:  # failed after the flip: the new model
                log.error("%s; the new model is live, rows not yet re-solved keep what SGD "
                          "learnt", exc)  # fmt: skip
                m.rebuild_swaps.labels("swapped").inc()
                m.rebuild_last_success.set(time.time())
            else:
                log.error("%s; keeping the current model", exc)
                m.rebuild_swaps.labels("failed").inc()
            self._end_rebuild()
            return
        m.rebuild_step.observe(time.perf_counter() - t0)
        if outcome is None:
            return
        if outcome.swapped:
            t_commit = time.perf_counter()
            self.store.commit(
                state,
                BatchDelta.empty(state),
                None,
                generation=outcome.generation,
                extra_users=outcome.users,
                extra_items=outcome.items,
            )
            m.rebuild_last_success.set(time.time())
            m.rebuild_drift.set(outcome.drift)
            # the pause is the swap step; this commit is the flip unless the swap step made it
            # itself and finished rows after it (then this commit writes the last of those)
            flip = 0.0 if outcome.deferred else time.perf_counter() - t_commit
            m.rebuild_pause.observe(outcome.seconds + flip)
        else:
            m.rebuild_pause.observe(time.perf_counter() - t0)
            # the guard judged a rebuild over these rows: do not start another at every restart
            self.store.clear_rebuild_unfinished()
        m.rebuild_swaps.labels("swapped" if outcome.swapped else "rejected").inc()
        if outcome.unguarded:
            m.rebuild_unguarded.inc()
        m.rebuild_rows.inc(outcome.rows_resolved)
        m.rebuild_seconds.observe(time.monotonic() - self.rebuild.started)
        self._end_rebuild()
        self._publish_gauges()

    def _end_rebuild(self) -> None:
        swapped = self.rebuild is not None and self.rebuild.swap_outcome is not None
        # a staged model nobody reads goes now; a replaced one after readers have moved on
        self.store.drop_other_generations(older=False)
        if swapped:
            self._drops.append((time.monotonic() + OLD_GENERATION_GRACE_S, self.store.generation()))
        self.rebuild = None
        self._rebuilt_at = time.monotonic()
        self._rebuilt_at_events = self.model.state.events_applied
        self.metrics.rebuild_running.set(0)
        log.info("rebuild done")

    def _collect(self, stop: kafka_io.StopFlag) -> list[Message]:
        """Up to `max_batch_events` messages. `max_batch_seconds` bounds the wait for more, not
        the draining of what is already fetched: behind a backlog the batch fills up (larger
        commits cost less per event) and a quiet topic still gets its events applied promptly."""
        s = self.settings
        deadline = time.monotonic() + s.max_batch_seconds
        out: list[Message] = []
        while len(out) < s.max_batch_events and not stop:
            left = max(0.0, deadline - time.monotonic())
            got = self.consumer.consume(min(s.max_batch_events - len(out), 10_000), left)
            if not got and left == 0.0:
                break
            for m in got:
                err = m.error()
                if err is None:
                    out.append(m)
                elif err.code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer error: %s", err)
                    self.metrics.errors.labels("broker").inc()
        return out

    def process(self, msgs: list[Message]) -> None:
        """Decode, learn, write, commit one micro-batch (see the module docstring)."""
        t0 = time.perf_counter()
        n = len(msgs)
        self.metrics.consumed.inc(n)
        values, parts, offs, stamps = _columns(msgs)
        s = self.settings
        latest = future_bounds(stamps, s.max_future_seconds)  # inf: no bound
        dec = decode_events(values, self.types, s.max_message_bytes, latest)
        del values
        if dec.rejects:
            self._dead_letter(msgs, dec.rejects)
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
        delta = self._learn(batch)
        if self.rebuild is not None:
            self.rebuild.note(delta)
        nxt = self._next_offsets(parts, offs)
        t1 = time.perf_counter()
        self.store.commit(self.model.state, delta, nxt, event_times=batch.times)
        t2 = time.perf_counter()
        self.offsets.update(nxt)
        self.consumer.commit(
            offsets=[TopicPartition(t, p, o) for (t, p), o in nxt.items()], asynchronous=True
        )
        m = self.metrics
        m.apply_seconds.observe(t1 - t0)
        m.write_seconds.observe(t2 - t1)
        m.batches.inc()
        m.batch_events.observe(n)
        for etype in set(dec.types):  # a few types: list.count scans in C
            m.applied.labels(etype).inc(dec.types.count(etype))
        if len(batch):
            observe_many(m.event_age, time.time() - batch.times)
        m.last_commit.set(time.time())
        self._publish_gauges()

    def _learn(self, batch: EventBatch) -> BatchDelta:
        """Learn the batch, scoring the sampled events test-then-learn on the way."""
        picks = self.live.sample(batch)
        if picks.size == 0:
            return self.model.learn(batch)
        picked_users = {batch.user_ids[p] for p in picks.tolist()}
        earlier: dict[str, list[str]] = {}
        pieces: list[BatchDelta] = []
        lo = 0
        m = self.metrics
        state = self.model.state
        for p in picks.tolist():
            if p > lo:
                pieces.append(self.model.learn(batch.slice(lo, p)))
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
        pieces.append(self.model.learn(batch.slice(lo, len(batch))))
        hr, ndcg = self.live.window()
        m.live_hr_window.set(hr)
        m.live_ndcg_window.set(ndcg)
        return merge_deltas(pieces, state)

    def _next_offsets(self, parts: np.ndarray, offs: np.ndarray) -> dict[tuple[str, int], int]:
        """Next offset per partition after this batch (all messages come from one topic)."""
        nxt: dict[tuple[str, int], int] = {}
        for p in np.unique(parts).tolist():
            nxt[(self.topic, p)] = int(offs[parts == p].max()) + 1
        for key, o in nxt.items():
            before = self.offsets.get(key, 0)
            if o <= before:
                raise OffsetRegressionError(
                    f"{key[0]}[{key[1]}] offset went backwards: next {o} after {before} was "
                    "already applied; another process may be consuming with this group id"
                )
        return nxt

    def _dead_letter(self, msgs: list[Message], rejects: list[Any]) -> None:
        topic = self.settings.topics.dead_letter
        for r in rejects:
            m = msgs[r.position]
            headers = kafka_io.str_headers(
                {
                    "error.reason": r.reason,
                    "error.message": r.message[:2000],
                    "original.topic": m.topic(),
                    "original.partition": m.partition(),
                    "original.offset": m.offset(),
                }
            )
            self.dlt.produce(
                topic, value=m.value(), key=m.key(), headers=headers, on_delivery=self.deliveries
            )
            self.metrics.dead_lettered.labels(r.reason).inc()
            log.debug(
                "dead-lettered %s[%d]@%d: %s", m.topic(), m.partition(), m.offset(), r.message
            )
        self._await_dead_letters(topic, self.deliveries.failed)

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
                    left, topic, now - start, s.dead_letter_timeout_seconds,
                )  # fmt: skip
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

    def close(self) -> None:
        for c in (self.consumer, self.control):
            try:
                c.close()
            except Exception as exc:  # already closed or broker gone: nothing to lose here
                log.debug("consumer close: %s", exc)
        self.dlt.flush(5.0)
        try:
            self.store.close()
        except Exception as exc:  # after a failed write RocksDB reports it again on close
            log.error("closing the model store: %s", exc)
