"""Every Prometheus metric of every process, declared in one place.

Names follow `stream_mf_<what>_<unit>`; labels are small fixed sets, never user or item ids.
Each process builds its own registry and passes it in, so tests get a fresh one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import get_args

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from consumers.offset_gap import GAP_KINDS
from stream_mf.decode import REASONS
from stream_mf.messages import RequestKind

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
)  # fmt: skip
# fine around 1 s: freshness is judged against a 1 s bound (tests) and 250 ms (bench)
AGE_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 1, 1.5, 2, 5, 10, 30, 60,
    300, 3600, 86400, 604800,
)  # fmt: skip


class UpdaterMetrics:
    def __init__(self, registry: CollectorRegistry, event_types: Iterable[str] = ()):
        r = registry
        ProcessCollector(registry=r)
        self.consumed = Counter(
            "stream_mf_events_consumed_total",
            "Messages read from the interactions topic",
            registry=r,
        )
        self.applied = Counter(
            "stream_mf_events_applied_total",
            "Events folded into the model",
            ["event_type"],
            registry=r,
        )
        self.dead_lettered = Counter(
            "stream_mf_events_dead_lettered_total",
            "Messages sent to the dead-letter topic",
            ["reason"],
            registry=r,
        )
        self.batches = Counter("stream_mf_batches_total", "Micro-batches committed", registry=r)
        self.store_bytes = Counter(
            "stream_mf_store_write_bytes_total",
            "Bytes of the RocksDB write batches of committed micro-batches (WAL and memtable "
            "volume: rows are written in 16-row blocks)",
            registry=r,
        )
        self.batch_events = Histogram(
            "stream_mf_batch_events",
            "Messages per micro-batch",
            buckets=(1, 10, 100, 1000, 5000, 10_000, 50_000, 100_000),
            registry=r,
        )
        self.apply_seconds = Histogram(
            "stream_mf_batch_apply_seconds",
            "Time to decode and learn one micro-batch",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.write_seconds = Histogram(
            "stream_mf_batch_write_seconds",
            "Time to write one micro-batch to RocksDB",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.event_age = Histogram(
            "stream_mf_event_age_seconds",
            "Wall-clock now minus event timestamp when the event is applied",
            buckets=AGE_BUCKETS,
            registry=r,
        )
        self.event_fetch_age = Histogram(
            "stream_mf_event_fetch_age_seconds",
            "Wall-clock time the updater got an event's message minus the event timestamp (its "
            "way in: producer, broker, fetch); event_age minus this is the updater's own share",
            buckets=AGE_BUCKETS,
            registry=r,
        )
        self.users = Gauge("stream_mf_users_known", "Users with a vector", registry=r)
        self.items = Gauge("stream_mf_items_known", "Items with a vector", registry=r)
        self.model_version = Gauge(
            "stream_mf_model_version", "Version of the model being written or served", registry=r
        )
        self.errors = Counter(
            "stream_mf_errors_total",
            "Errors by kind (broker, store, dead_letter)",
            ["kind"],
            registry=r,
        )
        self.live_scored = Counter(
            "stream_mf_live_eval_events_total",
            "Sampled events scored test-then-learn before being learned (weighted: past the "
            "per-batch cap, each scored event stands for the sampled ones left out)",
            registry=r,
        )
        self.live_hits = Counter(
            "stream_mf_live_eval_hits_total",
            "Sampled events whose item was in the user's top-10 just before (weighted)",
            registry=r,
        )
        self.live_ndcg = Counter(
            "stream_mf_live_eval_ndcg_total", "Sum of NDCG@10 over scored events", registry=r
        )
        self.live_hr_window = Gauge(
            "stream_mf_live_hit_rate", "HR@10 over the last 2000 scored events", registry=r
        )
        self.live_ndcg_window = Gauge(
            "stream_mf_live_ndcg", "NDCG@10 over the last 2000 scored events", registry=r
        )
        self.rebuild_seconds = Histogram(
            "stream_mf_rebuild_duration_seconds",
            "A full ALS rebuild, from snapshot to its last step (after the swap, if rows were "
            "left over)",
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
            registry=r,
        )
        self.rebuild_pause = Histogram(
            "stream_mf_rebuild_swap_pause_seconds",
            "Ingestion paused by a rebuild's swap step (re-solve, copy, flip commit)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rebuild_step = Histogram(
            "stream_mf_rebuild_step_seconds",
            "Loop-thread time of every step of a rebuild (ingestion waits for each), the swap "
            "and the after-swap steps included",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rebuild_last_success = Gauge(
            "stream_mf_rebuild_last_success_timestamp_seconds",
            "When a rebuild last swapped in a new model",
            registry=r,
        )
        self.rebuild_running = Gauge(
            "stream_mf_rebuild_running", "1 while a rebuild is in flight", registry=r
        )
        self.rebuild_rows = Counter(
            "stream_mf_rebuild_rows_resolved_total",
            "Rows re-solved after a rebuild's snapshot",
            registry=r,
        )
        self.rebuild_swaps = Counter(
            "stream_mf_rebuild_swaps_total",
            "Rebuild outcomes: swapped, rejected (guard), failed",
            ["decision"],
            registry=r,
        )
        self.rebuild_unguarded = Counter(
            "stream_mf_rebuild_unguarded_swaps_total",
            "Rebuilds swapped in although the guard scored fewer than guard_min_events events",
            registry=r,
        )
        self.rebuild_drift = Gauge(
            "stream_mf_rebuild_drift",
            "Mean cosine between the online and the rebuilt vectors of the same users",
            registry=r,
        )
        self.offset_gaps = Counter(
            "stream_mf_offset_gaps_total",
            "Stored next offsets found outside their partition's log: ahead_of_log (topic "
            "recreated, broker data lost) or before_log_start (events removed unapplied)",
            ["kind"],
            registry=r,
        )
        self.events_lost = Counter(
            "stream_mf_events_lost_total",
            "Events removed from the log (retention, deleted records) before they were applied",
            registry=r,
        )
        self.last_commit = Gauge(
            "stream_mf_last_commit_timestamp_seconds",
            "When the last batch was committed",
            registry=r,
        )
        self.model_log_bytes = Counter(
            "stream_mf_model_log_bytes_total",
            "Bytes (keys and values) published to the model log",
            registry=r,
        )
        self.model_log_records = Counter(
            "stream_mf_model_log_records_total", "Records published to the model log", registry=r
        )
        self.model_log_publish_lag = Histogram(
            "stream_mf_model_log_publish_lag_seconds",
            "From a commit's marker being produced to the broker acknowledging it",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_log_snapshot_bytes = Gauge(
            "stream_mf_model_log_snapshot_bytes", "Size of the last model log snapshot", registry=r
        )
        self.model_log_snapshot_time = Gauge(
            "stream_mf_model_log_snapshot_timestamp_seconds",
            "When the last model log snapshot was published",
            registry=r,
        )
        self.learner_snapshot_bytes = Gauge(
            "stream_mf_learner_snapshot_bytes",
            "Size of the last complete learner snapshot (the state a lost disk is restored from)",
            registry=r,
        )
        self.learner_snapshot_time = Gauge(
            "stream_mf_learner_snapshot_timestamp_seconds",
            "When the state in the last complete learner snapshot was taken (age: time() - this)",
            registry=r,
        )
        self.learner_snapshot_seconds = Histogram(
            "stream_mf_learner_snapshot_duration_seconds",
            "From taking the state to the broker acknowledging the snapshot's end record",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.restore_seconds = Gauge(
            "stream_mf_restore_duration_seconds",
            "How long this process took to find, read and commit the learner snapshot it "
            "started from (0: it did not restore)",
            registry=r,
        )
        self.restore_replayed = Counter(
            "stream_mf_restore_replayed_events",
            "Messages of interactions replayed after a restore: from the snapshot's offsets to "
            "the log's end when it was restored",
            registry=r,
        )
        self.checkpoint_time = Gauge(
            "stream_mf_checkpoint_timestamp_seconds",
            "When the last checkpoint made the learned state durable (age: time() - this; a "
            "crash replays the events learned since)",
            registry=r,
        )
        self.checkpoint_seconds = Histogram(
            "stream_mf_checkpoint_duration_seconds",
            "Time to merge and write one checkpoint (one RocksDB WriteBatch)",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.checkpoint_bytes = Gauge(
            "stream_mf_checkpoint_bytes", "Size of the last checkpoint's WriteBatch", registry=r
        )
        self.checkpoint_events = Gauge(
            "stream_mf_checkpoint_events",
            "Events the last checkpoint made durable (what a crash just before it replays)",
            registry=r,
        )
        self.pending_events = Gauge(
            "stream_mf_checkpoint_pending_events",
            "Events learned (and published on the model log) since the last checkpoint",
            registry=r,
        )
        self.checkpoints = Counter(
            "stream_mf_checkpoints", "Checkpoints written to the model store", registry=r
        )
        self.replayed = Counter(
            "stream_mf_replayed_events",
            "Events learned again after a restart, from the store's last checkpoint to where "
            "the previous process had published (the model log's last marker)",
            registry=r,
        )
        # every label a series can have exists from the start, so rate() sees the first one
        for reason in REASONS:
            self.dead_lettered.labels(reason)
        for kind in ("broker", "store", "dead_letter", "model_log", "learner_snapshot"):
            self.errors.labels(kind)
        for etype in event_types:
            self.applied.labels(etype)
        for decision in ("swapped", "rejected", "failed"):
            self.rebuild_swaps.labels(decision)
        for gap in GAP_KINDS:
            self.offset_gaps.labels(gap)


class QueryMetrics:
    def __init__(self, registry: CollectorRegistry):
        r = registry
        ProcessCollector(registry=r)
        self.requests = Counter(
            "stream_mf_requests_total",
            "Requests answered, by kind and strategy",
            ["kind", "strategy"],
            registry=r,
        )
        self.invalid = Counter(
            "stream_mf_requests_invalid_total", "Requests answered with an error", registry=r
        )
        self.expired = Counter(
            "stream_mf_requests_expired_total",
            "Requests dropped: past their deadline, or their reply could not land before it",
            registry=r,
        )
        self.reply_delay = Gauge(
            "stream_mf_reply_delay_seconds",
            "Recent produce-to-acknowledgement time of replies (p90 over 1 s; 0 when idle): "
            "a request whose deadline falls within it is dropped",
            registry=r,
        )
        self.latency = Histogram(
            "stream_mf_query_latency_seconds",
            "From receipt of a request to its reply being handed to the producer",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_to_reply = Histogram(
            "stream_mf_request_to_reply_seconds",
            "From the request's sent_at to its reply (clients that send sent_at)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_version = Gauge(
            "stream_mf_model_version", "Version of the model being written or served", registry=r
        )
        self.model_events = Gauge(
            "stream_mf_model_events_applied",
            "Events the served model includes",
            registry=r,
        )
        self.freshness = Histogram(
            "stream_mf_freshness_seconds",
            "Event timestamp to the moment this process serves a model that includes the event",
            buckets=AGE_BUCKETS,
            registry=r,
        )
        self.refresh_seconds = Histogram(
            "stream_mf_model_refresh_seconds",
            "Time to apply a run of model log records and serve the result",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_log_lag = Gauge(
            "stream_mf_model_log_lag_records",
            "Model log records not yet read by this process (high watermark minus position)",
            registry=r,
        )
        self.model_log_commit = Gauge(
            "stream_mf_model_log_applied_commit",
            "The store commit (sequence) of the model this process serves",
            registry=r,
        )
        self.model_log_catch_up = Gauge(
            "stream_mf_model_log_catch_up_seconds",
            "From start to serving: reading the latest snapshot and the log after it",
            registry=r,
        )
        self.model_log_skipped = Counter(
            "stream_mf_model_log_skipped_total",
            "Model log records that could not be read (skipped, never applied)",
            registry=r,
        )
        self.errors = Counter(
            "stream_mf_errors_total",
            "Errors by kind (broker, model_log, reply, mixed_generation)",
            ["kind"],
            registry=r,
        )
        for kind in ("broker", "model_log", "reply", "mixed_generation"):
            self.errors.labels(kind)
        # every label a series can have exists from the start, so rate() sees the first one
        for kind in (*get_args(RequestKind), "invalid"):
            self.latency.labels(kind)
        for kind, strategy in (
            ("recommend", "personalized"), ("recommend", "popular"), ("popular", "popular"),
            ("similar_items", "similar_items"), ("recommend_anonymous", "anonymous"),
            ("because", "because"), ("invalid", "none"),
        ):  # fmt: skip
            self.requests.labels(kind, strategy)


class LagCollector(Collector):
    """Consumer lag read at scrape time: high watermark (from the latest fetch) minus the next
    offset to apply, per partition, so a stuck or idle updater still shows its real lag."""

    def __init__(self, assigned: Callable[[], Iterable[tuple[int, int | None, int]]]):
        self.assigned = assigned  # -> (partition, high watermark or None, next offset)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        fam = GaugeMetricFamily(
            "stream_mf_consumer_lag_messages",
            "High watermark minus next offset to apply, per partition",
            labels=["partition"],
        )
        try:
            rows = list(self.assigned())
        except Exception:  # the consumer is closing: no sample this time
            rows = []
        for partition, high, nxt in rows:
            if high is not None and high >= 0:
                fam.add_metric([str(partition)], max(high - nxt, 0))
        yield fam


class CallbackGauges(Collector):
    """Gauges read at scrape time (store size and the like), from callables."""

    def __init__(self, gauges: dict[str, tuple[str, Callable[[], float]]]):
        self.gauges = gauges
        self.lock = threading.Lock()

    def collect(self) -> Iterable[GaugeMetricFamily]:
        with self.lock:
            for name, (doc, fn) in self.gauges.items():
                try:
                    value = float(fn())
                except Exception:  # a failing probe must not break the scrape
                    continue
                yield GaugeMetricFamily(name, doc, value=value)


class PartsCollector(Collector):
    """One gauge with a `part` label, its values read at scrape time from a callable (a
    replica's memory by part); nothing if the callable fails."""

    def __init__(self, name: str, doc: str, parts: Callable[[], dict[str, float]]):
        self.name, self.doc, self.parts = name, doc, parts

    def collect(self) -> Iterable[GaugeMetricFamily]:
        fam = GaugeMetricFamily(self.name, self.doc, labels=["part"])
        try:
            rows = self.parts()
        except Exception:  # the model is being swapped: no sample this time
            rows = {}
        for part, value in rows.items():
            fam.add_metric([part], float(value))
        yield fam


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> int | None:
    """Serve /metrics; returns the bound port (port 0 picks one), or None when disabled."""
    if port < 0:
        return None
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return int(server.server_port)


def observe_many(hist: Histogram, values: object, weight: float = 1.0) -> None:
    """Observe a whole array at once (one call per batch, not per event); `weight` counts each
    value that many times (a sample standing for a whole batch)."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return
    bounds = np.asarray(hist._upper_bounds)  # includes +Inf
    idx = np.searchsorted(bounds, v, side="left")
    counts = np.bincount(idx, minlength=bounds.size) * weight
    for j, c in enumerate(counts.tolist()):
        if c:
            hist._buckets[j].inc(c)
    hist._sum.inc(float(v.sum()) * weight)
