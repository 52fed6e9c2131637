"""End-to-end ingest: `stream-mf updater` over a pre-published topic, against the raw consume rate.

    PYTHONPATH=. .venv/bin/python bench/bench_ingest.py [--quick] [--profile]
    PYTHONPATH=. .venv/bin/python bench/bench_ingest.py --compare REV [--compare-new R] [--profile]

Publishes the shared planted stream (1M events, 100k users, 50k items; `--quick`: 200k) as the
product's JSON to a fresh one-partition topic (lz4 batches), then measures in the same run:

- raw: confluent-kafka `consume(10000)` in this process with `consumers.kafka_io.consumer`'s fetch
  settings, touching `msg.value()` of every message (and once more with `fetch.queue.backoff.ms`
  10, the setting the broker notes recommend), the ceiling any consumer of this topic can reach;
- updater: the real updater as a child process (`--dim 64`, the shipped negatives unless
  `--n-negatives N`; runs before 2026-12-07 19:00 used 4; fresh state dir) at
  several `--max-batch-events`, events/s between its first and last commit read from /metrics,
  with the split its own histograms give (decode+learn, RocksDB write, the rest = consume, Kafka
  commit, metrics) and the CPU seconds of the updater and the broker; then the first batch size
  again with CPython's default collector (`STREAM_MF_PAUSE_GC=false`), and 50k batches with live
  evaluation off, each showing what one feature costs or buys;
- river: `river.reco.BiasedMF.learn_one` in memory on the same events (if installed).

`--profile` adds one more updater run under py-spy (`--threads`; more flags from
`BENCH_PYSPY_FLAGS`, e.g. `--gil`) and splits its main-thread samples into decode, learn, RocksDB
write, consume, Kafka commit, metrics and the rest, and the pipeline's learn worker's apart. The
updater's own account of the pipeline (`pipeline: ...` at its stop) is printed per run.
Targets: the updater at >= 100k events/s and >= 0.6x the raw consume rate. Every child process
is stopped by PID.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from common import (
    ROOT,
    TYPE_FREQ,
    Col,
    compare_summary,
    fmt_rate,
    in_tree,
    print_table,
    rev_label,
    round_order,
    source_tree,
    write_results,
)
from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition

from consumers import kafka_io
from consumers.local_broker import EmbeddedBroker, free_port
from consumers.processes import ManagedProcess, metric_sum, scrape
from consumers.publish import publish
from consumers.settings import KafkaSettings, UpdaterSettings
from consumers.topics import create_topics
from stream_mf.config import ModelConfig
from tests.synthetic import PlantedStream, planted_stream

TYPE_NAMES = ("view", "click", "add_to_cart", "purchase")
MODEL_FLAGS: tuple[str, ...] = ("--dim", "64", "--n-negatives", str(ModelConfig().n_negatives))
TARGET_RATE = 100_000.0
TARGET_RATIO = 0.6
APPLIED = "stream_mf_events_applied_total"
LAST_COMMIT = "stream_mf_last_commit_timestamp_seconds"
# checkpointed durability: a run ends when its last event is durable (a checkpoint after it)
CHECKPOINT_AT = "stream_mf_checkpoint_timestamp_seconds"
PENDING = "stream_mf_checkpoint_pending_events"
PYSPY_RATE = 250  # samples/s
# more py-spy flags, e.g. `--gil` (only samples holding the GIL) or `--native`
PYSPY_EXTRA: tuple[str, ...] = tuple(os.environ.get("BENCH_PYSPY_FLAGS", "").split())


# ---- processes ----------------------------------------------------------------------------------


class Children:
    """Every child process this bench starts, stopped by PID (SIGTERM, then SIGKILL)."""

    def __init__(self) -> None:
        self.procs: list[ManagedProcess] = []
        self.raw: list[subprocess.Popen[bytes]] = []

    def start(self, p: ManagedProcess) -> ManagedProcess:
        self.procs.append(p.start())
        return p

    def stop(self, p: ManagedProcess) -> int | None:
        code = p.stop(grace=20.0)
        if p in self.procs:
            self.procs.remove(p)
        return code

    def stop_all(self) -> None:
        for p in list(self.procs):
            self.stop(p)
        for r in self.raw:
            if r.poll() is None:
                r.kill()
                r.wait(10)
        self.raw.clear()


@contextlib.contextmanager
def bootstrap_servers() -> Iterator[tuple[str, int | None]]:
    """(bootstrap, broker pid or None): KAFKA_BOOTSTRAP_SERVERS if set, else an EmbeddedBroker."""
    configured = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if configured:
        yield configured, None
        return
    broker = EmbeddedBroker().start()
    try:
        yield broker.bootstrap_servers, broker.pid
    finally:
        broker.stop()


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def try_scrape(url: str) -> dict[str, float] | None:
    try:
        return scrape(url, timeout=2.0)
    except OSError:
        return None


# ---- the stream ---------------------------------------------------------------------------------


def stream_spec(quick: bool, n_events: int | None = None) -> dict[str, int]:
    n = n_events or (200_000 if quick else 1_000_000)
    return {"n_events": n, "n_users": 100_000, "n_items": 50_000, "n_groups": 20}


def payloads_of(s: PlantedStream, seed: int = 7) -> list[tuple[bytes, bytes]]:
    """(key, JSON value) per event as producers send them; event types drawn 70/20/7/3 %."""
    rng = np.random.default_rng(seed)
    kinds = rng.choice(len(TYPE_NAMES), size=len(s.users), p=TYPE_FREQ).tolist()
    out = []
    dumps = orjson.dumps
    for u, i, t, k in zip(s.users.tolist(), s.items.tolist(), s.times.tolist(), kinds, strict=True):
        uid = f"u{u}"
        out.append(
            (
                uid.encode(),
                dumps(
                    {
                        "user_id": uid,
                        "item_id": f"i{i}",
                        "event_type": TYPE_NAMES[k],
                        "timestamp": t,
                    }
                ),
            )
        )
    return out


def prepublish(bootstrap: str, topic: str, payloads: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """Publish every payload (lz4 batches) and wait for delivery; returns timing."""
    producer = kafka_io.producer(
        KafkaSettings(bootstrap_servers=bootstrap),
        **{
            "linger.ms": 50,
            "queue.buffering.max.messages": 1_000_000,
            "queue.buffering.max.kbytes": 1_048_576,
        },
    )
    t0 = time.perf_counter()
    sent = publish(producer, topic, payloads, progress=False)
    wall = time.perf_counter() - t0
    if sent != len(payloads):
        raise RuntimeError(f"only {sent}/{len(payloads)} events were delivered")
    return {"events": sent, "seconds": wall, "events_per_s": sent / wall}


# ---- (a) raw consume ----------------------------------------------------------------------------


def raw_consume(
    bootstrap: str, topic: str, n: int, timeout: float, partitions: int = 1, **extra: Any
) -> dict[str, Any]:
    """consume(10000) loop over the whole topic, touching every value; events/s."""
    c = kafka_io.consumer(
        KafkaSettings(bootstrap_servers=bootstrap), f"bench-raw-{uuid.uuid4().hex[:8]}", **extra
    )
    try:
        c.assign([TopicPartition(topic, q, OFFSET_BEGINNING) for q in range(partitions)])
        got = nbytes = 0
        t0 = time.perf_counter()
        first = None
        end = time.monotonic() + timeout
        while got < n and time.monotonic() < end:
            for m in c.consume(num_messages=10_000, timeout=1.0):
                if m.error() is None:
                    nbytes += len(m.value())
                    got += 1
                elif m.error().code() != KafkaError._PARTITION_EOF:
                    raise RuntimeError(f"consume error: {m.error()}")
            if first is None and got:
                first = time.perf_counter()
        wall = time.perf_counter() - t0
    finally:
        c.close()
    if got < n:
        raise TimeoutError(f"raw consume read {got}/{n} messages in {timeout}s")
    return {"events": got, "seconds": wall, "events_per_s": got / wall, "bytes": nbytes}


# ---- (b) the updater ----------------------------------------------------------------------------


@dataclass
class UpdaterRun:
    batch: int
    label: str
    events: int
    startup_s: float = 0.0  # process start -> first commit
    commit_span_s: float = 0.0  # first -> last commit (stable /metrics pairs)
    events_in_span: int = 0
    wall_s: float = 0.0  # process start -> all applied
    apply_s: float = 0.0  # decode + learn (the updater's own histogram)
    write_s: float = 0.0  # RocksDB write
    batches: int = 0
    updater_cpu_s: float | None = None
    span_cpu_s: float | None = None  # updater CPU between first and last commit
    broker_cpu_s: float | None = None
    profile: dict[str, float] = field(default_factory=dict)
    profile_s: dict[str, float] = field(default_factory=dict)  # seconds sampled per category
    model_log_s: dict[str, float] = field(default_factory=dict)  # the same inside the model log
    worker_s: dict[str, float] = field(default_factory=dict)  # the learn worker's, seconds
    # the updater's own account at stop: seconds the worker learned, the loop waited for it,
    # the loop worked meanwhile; batches (revisions without the pipeline: empty)
    pipeline: dict[str, float] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        rate = self.events_in_span / self.commit_span_s if self.commit_span_s > 0 else None
        busy = self.apply_s + self.write_s  # histogram sums over the batches in the span
        span = self.commit_span_s
        return {
            "batch": self.batch,
            "label": self.label,
            "events": self.events,
            "events_per_s": rate,
            "wall_events_per_s": self.events / self.wall_s if self.wall_s else None,
            "startup_s": self.startup_s,
            "commit_span_s": self.commit_span_s,
            "events_in_span": self.events_in_span,
            "wall_s": self.wall_s,
            "batches": self.batches,
            "apply_s": self.apply_s,
            "write_s": self.write_s,
            "apply_share": self.apply_s / span if span > 0 else None,
            "write_share": self.write_s / span if span > 0 else None,
            "rest_share": max(0.0, 1 - busy / span) if span > 0 else None,
            "updater_cpu_s": self.updater_cpu_s,
            "span_cpu_s": self.span_cpu_s,
            "broker_cpu_s": self.broker_cpu_s,
            "profile": self.profile or None,
            "profile_s": self.profile_s or None,
            "model_log_s": self.model_log_s or None,
            "worker_s": self.worker_s or None,
            "pipeline": self.pipeline or None,
        }


def run_updater(
    children: Children,
    bootstrap: str,
    topic: str,
    dead_letter: str,
    n: int,
    batch: int,
    work: Path,
    timeout: float,
    broker_pid: int | None,
    profile: bool = False,
    label: str = "",
    extra_env: dict[str, str] | None = None,
    tree: Path | None = None,
) -> UpdaterRun:
    """One updater process over the topic from offset 0 with a fresh store; stopped afterwards.

    `tree`: run the updater of that checkout (`--compare`) instead of this one's. Every run is
    told to start fresh (`STREAM_MF_RESTORE=false`): a run leaves a learner snapshot behind at
    its clean stop, which the next run on the same topic would otherwise restore, skipping the
    work.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    state = work / f"state-{uuid.uuid4().hex[:8]}"
    env = {
        "STREAM_MF_TOPICS__INTERACTIONS": topic,
        "STREAM_MF_TOPICS__DEAD_LETTER": dead_letter,
        "STREAM_MF_GROUP_ID": f"bench-updater-{uuid.uuid4().hex[:8]}",
        "STREAM_MF_RESTORE": "false",  # ignored by revisions without restore
        **(extra_env or {}),
    }
    argv = [
        "updater",
        "--bootstrap-servers",
        bootstrap,
        "--state-dir",
        str(state),
        "--metrics-port",
        str(port),
        "--max-batch-events",
        str(batch),
        *MODEL_FLAGS,
    ]
    run = UpdaterRun(batch=batch, label=label or f"--max-batch-events {batch}", events=n)
    name = f"updater-{batch}-{uuid.uuid4().hex[:4]}"
    p = ManagedProcess(name, argv, work, env=env)
    if tree is not None:
        p.env, p.cwd = in_tree(p.env, tree), tree
    spy: subprocess.Popen[bytes] | None = None
    spy_out = work / f"pyspy-{name}.txt"
    t_start = time.time()
    b_cpu0 = cpu_seconds(broker_pid)
    children.start(p)
    try:
        if profile:
            spy = start_pyspy(children, p.pid, spy_out)
        first: tuple[float, float] | None = None  # (applied, last commit) at the first stable pair
        first_sums = (0.0, 0.0, 0.0)  # apply s, write s, batches at that point
        cpu_first: float | None = None
        end = time.monotonic() + timeout
        last: dict[str, float] = {}
        while True:
            if not p.alive():
                raise RuntimeError(f"updater exited:\n{p.log_tail()}")
            if time.monotonic() > end:
                raise TimeoutError(
                    f"updater applied {metric_sum(last, APPLIED):.0f}/{n} "
                    f"events in {timeout}s:\n{p.log_tail()}"
                )
            got = try_scrape(url)
            if got is not None:
                last = got
                pair = (metric_sum(got, APPLIED), got.get(LAST_COMMIT, 0.0))
                # the first commit: its count and time (a pair stable over two scrapes was
                # the rule, but a checkpoint's pause mid-run is as stable)
                if first is None and pair[0] > 0 and pair[1] > 0:
                    first = pair
                    first_sums = _sums(got)
                    cpu_first = cpu_seconds(p.pid)
                if pair[0] >= n and got.get(PENDING, 0.0) == 0:  # learned, and durable
                    break
            time.sleep(0.5)  # scrapes cost the updater GIL time (4% at 5/s): keep them rare
        run.wall_s = time.time() - t_start
        run.updater_cpu_s = cpu_seconds(p.pid)
        if cpu_first is not None and run.updater_cpu_s is not None and first is not None:
            run.span_cpu_s = run.updater_cpu_s - cpu_first
        b_cpu1 = cpu_seconds(broker_pid)
        if b_cpu0 is not None and b_cpu1 is not None:
            run.broker_cpu_s = b_cpu1 - b_cpu0
        # the last batch's commit, or (checkpoints) the checkpoint that made it durable
        t_last = max(last[LAST_COMMIT], last.get(CHECKPOINT_AT, 0.0))
        if first is None or first[0] >= n:  # one batch only: fall back to process wall time
            first = (0.0, t_start)
        run.events_in_span = int(n - first[0])
        run.commit_span_s = t_last - first[1]
        run.startup_s = (first[1] if first[0] > 0 else t_last) - t_start
        if first[0] == 0.0:
            first_sums = (0.0, 0.0, 0.0)
        sums = _sums(last)
        run.apply_s, run.write_s = sums[0] - first_sums[0], sums[1] - first_sums[1]
        run.batches = int(sums[2] - first_sums[2])
        if spy is not None:
            stop_pyspy(spy)
            counts = sample_counts(spy_out, tree or ROOT)
            total = sum(counts.values())
            run.profile = {k: v / total for k, v in counts.most_common()} if total else {}
            run.profile_s = {k: v / PYSPY_RATE for k, v in counts.items()}
            run.model_log_s = model_log_detail(spy_out)
            run.worker_s = {
                k: v / PYSPY_RATE for k, v in sample_counts(spy_out, tree or ROOT, WORKER).items()
            }
    finally:
        if spy is not None:
            stop_pyspy(spy)
        children.stop(p)
        run.pipeline = pipeline_account(p.log_path)
        shutil.rmtree(state, ignore_errors=True)
    return run


def replay_after_kill(
    children: Children,
    bootstrap: str,
    topic: str,
    dead_letter: str,
    n: int,
    batch: int,
    work: Path,
    timeout: float,
    at: float,
    tree: Path | None = None,
    interval: float = 2.0,
    extra_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The updater (checkpoints every `interval` s) over the topic, SIGKILLed just before a
    checkpoint is due once `at` of the stream is learned (the most a crash replays), then
    started again on its store: the time to learn the lost events again (start-up included),
    and to the end of the stream."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    state = work / f"state-replay-{uuid.uuid4().hex[:8]}"
    env = {
        "STREAM_MF_TOPICS__INTERACTIONS": topic,
        "STREAM_MF_TOPICS__DEAD_LETTER": dead_letter,
        "STREAM_MF_GROUP_ID": f"bench-updater-{uuid.uuid4().hex[:8]}",
        "STREAM_MF_RESTORE": "false",
        **(extra_env or {}),
        "STREAM_MF_CHECKPOINT_SECONDS": str(interval),
        # the model log of each run apart: the replay is held back against this run's log
        "STREAM_MF_TOPICS__MODEL": f"bench-model-{uuid.uuid4().hex[:8]}",
    }
    argv = ["updater", "--bootstrap-servers", bootstrap, "--state-dir", str(state),
            "--metrics-port", str(port), "--max-batch-events", str(batch),
            *MODEL_FLAGS]  # fmt: skip
    out: dict[str, Any] = {"interval_s": interval, "load": os.getloadavg()[0]}

    def proc() -> ManagedProcess:
        p = ManagedProcess(f"updater-replay-{uuid.uuid4().hex[:4]}", argv, work, env=env)
        if tree is not None:
            p.env, p.cwd = in_tree(p.env, tree), tree
        return p

    first = children.start(proc())
    try:
        end = time.monotonic() + timeout
        up = None
        while True:  # `at` of the stream learned
            assert first.alive(), first.log_tail()
            assert time.monotonic() < end, first.log_tail()
            got = try_scrape(url) or {}
            if got and up is None:
                up = time.time()  # about when its first interval began (no checkpoint yet)
            if metric_sum(got, APPLIED) >= at * n:
                break
            time.sleep(0.05)
        ck = got.get(CHECKPOINT_AT, 0.0) or (up or time.time())
        while time.time() < ck + interval - 0.15:  # just before the next one is due
            time.sleep(0.01)
        got = try_scrape(url) or {}
        first.kill()
        out["pending_at_kill"] = got.get(PENDING, 0.0)
        out["applied_at_kill"] = metric_sum(got, APPLIED)
        # since the last checkpoint, or since the process came up if none came yet
        out["checkpoint_age_at_kill_s"] = time.time() - ck
    finally:
        children.stop(first)
    t0 = time.monotonic()
    second = children.start(proc())
    try:
        end = time.monotonic() + timeout
        replayed_s = up_s = None
        while True:
            assert second.alive(), second.log_tail()
            assert time.monotonic() < end, second.log_tail()
            got = try_scrape(url)
            if got is not None:
                if up_s is None:
                    up_s = time.monotonic() - t0
                applied = metric_sum(got, APPLIED)
                if replayed_s is None and applied >= out["pending_at_kill"]:
                    replayed_s = time.monotonic() - t0
                    out["replayed_events"] = got.get("stream_mf_replayed_events_total", 0.0)
                if applied + out["applied_at_kill"] - out["pending_at_kill"] >= n:
                    break
            time.sleep(0.05)
        out["metrics_up_s"] = up_s
        out["replay_s"] = replayed_s
        out["to_end_s"] = time.monotonic() - t0
    finally:
        children.stop(second)
        shutil.rmtree(state, ignore_errors=True)
    print(f"replay after a SIGKILL {out['checkpoint_age_at_kill_s']:.2f} s after a checkpoint: "
          f"{out['pending_at_kill']:.0f} events learned again in {out['replay_s']:.1f} s "
          f"(metrics up after {out['metrics_up_s']:.1f} s)", flush=True)  # fmt: skip
    return out


PIPELINE_LINE = re.compile(
    r"pipeline: (\d+) batches learned on the worker in ([\d.]+) s, the loop waited ([\d.]+) s "
    r"of it and worked ([\d.]+) s meanwhile[^;\n]*(?:; the learn's CPU ([\d.]+) s, run queue "
    r"([\d.]+) s)?"
)


def pipeline_account(log_path: Path) -> dict[str, float]:
    """The updater's own account of the pipeline, logged at its clean stop."""
    try:
        m = PIPELINE_LINE.search(log_path.read_text(errors="replace"))
    except OSError:
        return {}
    if m is None:
        return {}
    n, learn, waited, meanwhile = int(m[1]), float(m[2]), float(m[3]), float(m[4])
    out = {
        "batches": n,
        "learn_s": learn,
        "wait_s": waited,
        "loop_meanwhile_s": meanwhile,
        "overlap_s": learn - waited,
    }
    if m[5] is not None:
        cpu, runq = float(m[5]), float(m[6])
        out |= {"learn_cpu_s": cpu, "learn_runq_s": runq, "learn_gil_s": learn - cpu - runq}
    return out


def _sums(samples: dict[str, float]) -> tuple[float, float, float]:
    return (
        samples.get("stream_mf_batch_apply_seconds_sum", 0.0),
        samples.get("stream_mf_batch_write_seconds_sum", 0.0),
        samples.get("stream_mf_batches_total", 0.0),
    )


# ---- profiling ----------------------------------------------------------------------------------


def start_pyspy(children: Children, pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    exe = ROOT / ".venv" / "bin" / "py-spy"
    if not exe.exists():
        print("py-spy not installed (.venv/bin/pip install py-spy): no profile")
        return None
    spy = subprocess.Popen(
        [
            str(exe),
            "record",
            "--pid",
            str(pid),
            "--rate",
            str(PYSPY_RATE),
            "--idle",
            "--threads",  # per-thread stacks: the kernel's worker apart from the loop
            *PYSPY_EXTRA,
            "--nonblocking",
            "--format",
            "raw",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    children.raw.append(spy)
    time.sleep(0.3)
    return spy


def stop_pyspy(spy: subprocess.Popen[bytes]) -> None:
    if spy.poll() is None:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            spy.wait(20)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait(10)


def _process_line_kinds(tree: Path = ROOT) -> dict[int, str]:
    """Line number in consumers/updater.py -> category, for the statements of `process`."""
    kinds: dict[int, str] = {}
    src = (tree / "consumers" / "updater.py").read_text().splitlines()
    for j, line in enumerate(src, start=1):
        text = line.strip()
        if "m.value()" in text or "np.fromiter" in text or "EventBatch(" in text:
            kinds[j] = "decode"
        elif "consumer.commit" in text or "TopicPartition(t, p, o)" in text:
            kinds[j] = "kafka_commit"
        elif "metrics" in text or text.startswith("m.") or "observe_many" in text:
            kinds[j] = "metrics"
    return kinds


#: (category, test on one frame), checked in order against the whole stack: the first rule any
#: frame matches wins, so scoring inside live evaluation counts as live evaluation even where it
#: reads RocksDB, and a write is a write wherever it is called from.
_RULES: tuple[tuple[str, Any], ...] = (
    # the loop waits for the kernel in flight (the pipeline)
    ("learn_wait", lambda f, p: f == "wait" and p.endswith("concurrent/futures/_base.py")),
    # the model log is published from inside the store's commit (its `on_commit` hook)
    ("model_log", lambda f, p: p.endswith(("consumers/model_log.py", "stream_mf/model_log.py"))),
    ("learner_snapshot", lambda f, p: p.endswith("consumers/learner_snapshot.py")),
    ("live_eval", lambda f, p: p.endswith("stream_mf/live_eval.py")),
    ("decode", lambda f, p: p.endswith(("stream_mf/decode.py", "stream_mf/events.py"))),
    # `commit_batch` today, `commit` before the store had one commit path per operation
    (
        "rocksdb_write",
        lambda f, p: p.endswith("stream_mf/store.py") and f.endswith(("commit_batch", "commit")),
    ),
    (
        "learn",
        lambda f, p: p.endswith(
            ("stream_mf/model.py", "stream_mf/sgd.py", "stream_mf/state.py", "stream_mf/rng.py")
        ),
    ),
    (
        "metrics",
        lambda f, p: (
            "prometheus_client" in p
            or p.endswith("consumers/metrics.py")
            or f.endswith("_publish_gauges")
        ),
    ),
    ("consume", lambda f, p: f.endswith("_collect")),
    ("prefetch", lambda f, p: f.endswith("_prefetch")),
    ("offsets", lambda f, p: f.endswith("_next_offsets")),
    ("dead_letter", lambda f, p: f.endswith("_dead_letter")),
    ("metadata", lambda f, p: f.endswith("_assign_partitions")),
    ("live_eval", lambda f, p: f.endswith("_learn") and p.endswith("consumers/updater.py")),
)


def _classify(frames: Sequence[str], lines: dict[int, str]) -> str:
    """The category of one main-thread stack (frames as `func (file:line)`, root first)."""
    parsed = []
    for fr in frames:
        func, _, loc = fr.partition(" (")
        path, _, lineno = loc.rstrip(")").rpartition(":")
        parsed.append((func, path, lineno))
    for name, test in _RULES:
        if any(test(f, p) for f, p, _ in parsed):
            return name
    for f, p, lineno in reversed(parsed):
        if p.endswith("consumers/updater.py") and f.endswith("process"):
            return lines.get(int(lineno) if lineno.isdigit() else 0, "process_other")
    return "loop_other"


MAIN, WORKER = "run (consumers/updater.py", "_timed_learn (consumers/updater.py"


def sample_counts(raw: Path, tree: Path = ROOT, thread: str = MAIN) -> Counter[str]:
    """py-spy samples per category, from py-spy's raw output: of the updater's main loop, or
    (`WORKER`) of the pipeline's learn worker (its samples outside a learn: `worker_idle`)."""
    counts: Counter[str] = Counter()
    if not raw.exists():
        return counts
    lines = _process_line_kinds(tree)
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        on_worker = thread == WORKER and "): learn_" in stack.split(";")[0]
        if on_worker and WORKER not in stack:
            counts["worker_idle"] += int(n)
            continue
        if thread not in stack:
            continue  # not that thread (metrics server thread, imports at start-up)
        counts[_classify([f for f in stack.split(";") if " (" in f], lines)] += int(n)
    return counts


def model_log_detail(raw: Path) -> dict[str, float]:
    """Seconds sampled in the model log publisher by its innermost frame (function, or the
    library function it called: numpy's set operations, prometheus_client's counters)."""
    counts: Counter[str] = Counter()
    if not raw.exists():
        return {}
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if "run (consumers/updater.py" not in stack or not n.isdigit():
            continue
        frames = [f for f in stack.split(";") if " (" in f]
        own = [f for f in frames if "model_log.py" in f]
        if not own:
            continue
        key = own[-1].split(" (")[0]
        if frames[-1] != own[-1]:
            leaf = frames[-1].split(" (")
            key += f" -> {leaf[0]} ({leaf[1].rsplit('/', 1)[-1].rsplit(':', 1)[0]})"
        counts[key] += int(n)
    return {k: v / PYSPY_RATE for k, v in counts.most_common()}


def categorize(raw: Path, tree: Path = ROOT) -> dict[str, float]:
    """Share of the updater's main-loop samples per category, from py-spy's raw output."""
    counts = sample_counts(raw, tree)
    total = sum(counts.values())
    return {k: v / total for k, v in counts.most_common()} if total else {}


# ---- river reference ----------------------------------------------------------------------------


def river_rate(s: PlantedStream, n: int, n_negatives: int = 0) -> dict[str, Any] | None:
    """`river.reco.BiasedMF.learn_one` events/s (64 factors); negatives as extra y=0 updates."""
    try:
        from river import optim, reco
    except ImportError:
        return None
    model = reco.BiasedMF(
        n_factors=64,
        bias_optimizer=optim.SGD(0.05),
        latent_optimizer=optim.SGD(0.05),
        l2_latent=0.002,
        seed=42,
    )
    users = [f"u{u}" for u in s.users[:n].tolist()]
    items = [f"i{i}" for i in s.items[:n].tolist()]
    rng = np.random.default_rng(1)
    negs = [f"i{i}" for i in rng.integers(0, int(s.items.max()) + 1, n * n_negatives).tolist()]
    learn = model.learn_one
    t0 = time.perf_counter()
    for j in range(n):
        u = users[j]
        learn(u, items[j], 1.0)
        for q in range(j * n_negatives, (j + 1) * n_negatives):
            learn(u, negs[q], 0.0)
    wall = time.perf_counter() - t0
    return {"events": n, "n_negatives": n_negatives, "seconds": wall, "events_per_s": n / wall}


# ---- main ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="200k events, two batch sizes (< 60 s)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/)")
    ap.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=None,
        help="--max-batch-events values (default 200000 50000; quick: 50000)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="one more updater run at the first batch size, under py-spy",
    )
    ap.add_argument(
        "--no-variants",
        action="store_true",
        help="skip the extra runs (default gc, live evaluation off)",
    )
    ap.add_argument("--river-events", type=int, default=None)
    ap.add_argument(
        "--compare",
        metavar="REV",
        default=None,
        help="only: today's updater against git revision REV's, alternating, same topic and broker",
    )
    ap.add_argument(
        "--compare-tree",
        type=Path,
        default=None,
        help="with --compare: REV is checked out here (default: a temporary git archive)",
    )
    ap.add_argument(
        "--compare-new",
        metavar="REV",
        default=None,
        help="with --compare: REV's updater as the new side instead of this checkout's (to "
        "split a change into steps)",
    )
    ap.add_argument("--rounds", type=int, default=3, help="--compare: runs of each side")
    ap.add_argument("--partitions", type=int, default=1, help="--compare: partitions of the topic")
    ap.add_argument(
        "--new-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="--compare: an environment setting of the new side only (repeatable), e.g. "
        "STREAM_MF_CHECKPOINT_SECONDS=10",
    )
    ap.add_argument(
        "--replay",
        type=int,
        default=0,
        help="--compare: this many more runs of the new side, SIGKILLed just before a "
        "checkpoint is due, and restarted: the replay's time",
    )
    ap.add_argument(
        "--replay-at",
        type=float,
        default=0.1,
        help="--replay: once this share of the stream is learned, kill just before the next "
        "checkpoint is due",
    )
    ap.add_argument("--events", type=int, default=None, help="stream length (1M; quick 200k)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    ap.add_argument(
        "--n-negatives", type=int, default=None, help="negatives per event (the shipped default)"
    )
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    global MODEL_FLAGS
    args = parse_args(argv)
    if args.n_negatives is not None:
        MODEL_FLAGS = ("--dim", "64", "--n-negatives", str(args.n_negatives))
    if args.compare:
        return compare_main(args)
    spec = stream_spec(args.quick, args.events)
    batches = args.batches or ([50_000] if args.quick else [200_000, 50_000])
    budget = 45.0 if args.quick else 240.0  # per updater run
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    children = Children()
    t_all = time.perf_counter()
    result: dict[str, Any] = {"quick": args.quick, "stream": spec, "model_flags": MODEL_FLAGS}
    try:
        s = planted_stream(
            spec["n_events"],
            n_users=spec["n_users"],
            n_items=spec["n_items"],
            n_groups=spec["n_groups"],
        )
        payloads = payloads_of(s)
        n = len(payloads)
        with bootstrap_servers() as (bootstrap, broker_pid):
            tag = uuid.uuid4().hex[:8]
            topic, dlt = f"bench-interactions-{tag}", f"bench-interactions-{tag}.DLT"
            create_topics(bootstrap, {topic: 1, dlt: 1})
            result["broker"] = "embedded tansu" if broker_pid else bootstrap
            result["publish"] = prepublish(bootstrap, topic, payloads)
            del payloads
            print(f"published {n:,} events in {result['publish']['seconds']:.1f}s", flush=True)
            raw = raw_consume(bootstrap, topic, n, budget)
            raw_fast = raw_consume(bootstrap, topic, n, budget, **{"fetch.queue.backoff.ms": 10})
            result["raw_consume"] = raw
            result["raw_consume_backoff10"] = raw_fast
            print(
                f"raw consume {fmt_rate(raw['events_per_s'])}/s "
                f"(backoff 10 ms: {fmt_rate(raw_fast['events_per_s'])}/s)",
                flush=True,
            )
            plan: list[tuple[int, str, dict[str, str], bool]] = [
                (b, "", {}, False) for b in batches
            ]
            if not args.no_variants:
                # the first batch size again with CPython's default collector, right after it
                # (the same minute of this noisy host), to show what pausing the GC buys
                b0 = batches[0]
                gc_label = f"--max-batch-events {b0}, CPython's default gc"
                plan.insert(1, (b0, gc_label, {"STREAM_MF_PAUSE_GC": "false"}, False))
                # without live evaluation, to show what it costs
                plan.append(
                    (
                        50_000,
                        "--max-batch-events 50000, live eval off",
                        {"STREAM_MF_LIVE_EVAL_RATE": "0"},
                        False,
                    )
                )
            if args.profile:  # apart from the measured runs: py-spy slows what it samples
                plan.append((batches[0], f"--max-batch-events {batches[0]}, py-spy", {}, True))
            runs = []
            for b, label, env, prof in plan:
                r = run_updater(
                    children,
                    bootstrap,
                    topic,
                    dlt,
                    n,
                    b,
                    work,
                    budget,
                    broker_pid,
                    profile=prof,
                    label=label,
                    extra_env=env,
                )
                row = r.row()
                row["vs_raw"] = (row["events_per_s"] or 0) / raw["events_per_s"]
                row["vs_raw_backoff10"] = (row["events_per_s"] or 0) / raw_fast["events_per_s"]
                row["meets_target"] = bool(
                    (row["events_per_s"] or 0) >= TARGET_RATE and row["vs_raw"] >= TARGET_RATIO
                )
                runs.append(row)
                print(f"updater {row['label']}: {fmt_rate(row['events_per_s'] or 0)}/s", flush=True)
        result["updater"] = runs
        river_n = args.river_events or (20_000 if args.quick else 100_000)
        result["river"] = [
            r for r in (river_rate(s, river_n), river_rate(s, river_n // 5, n_negatives=4)) if r
        ]
    finally:
        children.stop_all()
        if args.keep:
            print(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    result["wall_s"] = time.perf_counter() - t_all
    report(result)
    write_results("bench_ingest", result, args.out)
    return 0


def compare_main(args: argparse.Namespace) -> int:
    """`--compare REV`: the updater of REV and today's, alternating (ABBA) on one pre-published
    topic through one broker, each run a fresh process and store; median events/s per side,
    new/old of the medians and of each round, and updater CPU seconds per 1k events."""
    spec = stream_spec(args.quick, args.events)
    batch = (args.batches or [50_000])[0]
    budget = 45.0 if args.quick else 240.0
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-cmp-"))
    children = Children()
    t_all = time.perf_counter()
    rev = rev_label(args.compare)
    result: dict[str, Any] = {
        "quick": args.quick,
        "stream": spec,
        "model_flags": MODEL_FLAGS,
        "batch": batch,
        "old_rev": rev,
        "new_rev": rev_label(args.compare_new or "HEAD"),
        "rounds": args.rounds,
        "partitions": args.partitions,
        "load_before": os.getloadavg(),
    }
    runs: list[dict[str, Any]] = []
    bare: list[dict[str, Any]] = []
    new_env = dict(kv.split("=", 1) for kv in args.new_env)
    interval = float(
        new_env.get(
            "STREAM_MF_CHECKPOINT_SECONDS",
            UpdaterSettings.model_fields["checkpoint_seconds"].default,
        )
    )
    result["new_env"] = new_env
    try:
        s = planted_stream(
            spec["n_events"],
            n_users=spec["n_users"],
            n_items=spec["n_items"],
            n_groups=spec["n_groups"],
        )
        payloads = payloads_of(s)
        n = len(payloads)
        with (
            source_tree(args.compare, args.compare_tree) as old_tree,
            contextlib.ExitStack() as stack,
            bootstrap_servers() as (bootstrap, broker_pid),
        ):
            new_tree = (
                stack.enter_context(source_tree(args.compare_new)) if args.compare_new else ROOT
            )
            tag = uuid.uuid4().hex[:8]
            topic, dlt = f"bench-interactions-{tag}", f"bench-interactions-{tag}.DLT"
            create_topics(bootstrap, {topic: args.partitions, dlt: 1})
            result["broker"] = "embedded tansu" if broker_pid else bootstrap
            result["publish"] = prepublish(bootstrap, topic, payloads)
            del payloads
            print(f"published {n:,} events; old = {rev} ({old_tree}), new = {new_tree}", flush=True)
            trees = {"old": old_tree, "new": new_tree}
            for r in range(args.rounds):
                raw = raw_consume(bootstrap, topic, n, budget, args.partitions)
                raw["load"] = os.getloadavg()[0]
                bare.append({"round": r, **raw})
                print(f"round {r} bare consume: {fmt_rate(raw['events_per_s'])}/s", flush=True)
                for side in round_order(r):
                    run = run_updater(
                        children,
                        bootstrap,
                        topic,
                        dlt,
                        n,
                        batch,
                        work,
                        budget,
                        broker_pid,
                        label=side,
                        tree=trees[side],
                        extra_env=new_env if side == "new" else None,
                    )
                    row = {"round": r, "side": side, **run.row(), "load": os.getloadavg()[0]}
                    span_cpu, span_n = row["span_cpu_s"], row["events_in_span"]
                    row["cpu_ms_per_1k"] = 1e6 * span_cpu / span_n if span_cpu and span_n else None
                    runs.append(row)
                    print(
                        f"round {r} {side}: {fmt_rate(row['events_per_s'] or 0)}/s, "
                        f"updater CPU {row['updater_cpu_s'] or 0:.1f} s",
                        flush=True,
                    )
            if args.replay:
                result["replay"] = [
                    replay_after_kill(children, bootstrap, topic, dlt, n, batch, work, budget,
                                      args.replay_at, tree=trees["new"], interval=interval,
                                      extra_env=new_env)
                    for _ in range(args.replay)
                ]  # fmt: skip
            if args.profile:  # apart from the measured runs: py-spy slows what it samples
                profiles = {}
                for side in ("old", "new"):
                    run = run_updater(
                        children,
                        bootstrap,
                        topic,
                        dlt,
                        n,
                        batch,
                        work,
                        budget,
                        broker_pid,
                        profile=True,
                        label=f"{side}, py-spy",
                        tree=trees[side],
                    )
                    profiles[side] = run.row()
                result["profiles"] = profiles
    finally:
        children.stop_all()
        if args.keep:
            print(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    result["runs"] = runs
    result["bare"] = bare
    result["load_after"] = os.getloadavg()

    def per_side(key: str) -> dict[str, list[float]]:
        return {
            side: [r[key] or float("nan") for r in runs if r["side"] == side]
            for side in ("old", "new")
        }

    result["events_per_s"] = compare_summary(per_side("events_per_s"), higher_is_better=True)
    result["wall_events_per_s"] = compare_summary(
        per_side("wall_events_per_s"), higher_is_better=True
    )
    result["cpu_ms_per_1k"] = compare_summary(per_side("cpu_ms_per_1k"), higher_is_better=False)
    if bare:
        raw_med = float(np.median([b["events_per_s"] for b in bare]))
        result["bare_events_per_s"] = raw_med
        result["x_bare"] = {
            side: result["events_per_s"][f"median_{side}"] / raw_med
            for side in ("old", "new")
            if f"median_{side}" in result["events_per_s"]
        }
    result["wall_s"] = time.perf_counter() - t_all
    report_compare(result)
    if bare:
        xo, xn = (result["x_bare"].get(k, float("nan")) for k in ("old", "new"))
        print(f"bare consume (median of {len(bare)}, {args.partitions} partition(s)): "
              f"{fmt_rate(result['bare_events_per_s'])}/s; updater / bare: old "
              f"{xo:.2f}, new {xn:.2f}")  # fmt: skip
    for rp in result.get("replay") or []:
        print(f"replay: {rp['pending_at_kill']:.0f} events lost at the kill, learned again "
              f"{rp['replay_s']:.1f} s after the restart (metrics up at {rp['metrics_up_s']:.1f} "
              f"s), load {rp['load']:.1f}")  # fmt: skip
    print(f"load average before {result['load_before'][0]:.1f}, after "
          f"{result['load_after'][0]:.1f} (2 cores)")  # fmt: skip
    write_results("bench_ingest_compare", result, args.out)
    return 0


def report_compare(result: dict[str, Any]) -> None:
    pct = lambda x: f"{100 * x:.0f}%"  # noqa: E731
    profiles = result.get("profiles") or {}
    if profiles:
        kinds = sorted({k for p in profiles.values() for k in (p.get("profile") or {})})
        per_1k = 1e3 / result["stream"]["n_events"]
        print_table(
            "py-spy, updater main thread, whole run incl. start-up (one more run per side): "
            "share of samples, and ms sampled per 1k events (idle included)",
            [
                {
                    "what": k,
                    **{s: (p.get("profile") or {}).get(k, 0.0) for s, p in profiles.items()},
                    **{
                        f"{s}_ms": 1e3 * (p.get("profile_s") or {}).get(k, 0.0) * per_1k
                        for s, p in profiles.items()
                    },
                }
                for k in kinds
            ],
            [
                Col("what", "category"),
                Col("old", "old", pct),
                Col("new", "new", pct),
                Col("old_ms", "old ms/1k", ".1f"),
                Col("new_ms", "new ms/1k", ".1f"),
            ],
        )
        detail = (profiles.get("new") or {}).get("model_log_s") or {}
        if detail:
            print_table(
                "new: inside the model log publisher, ms sampled per 1k events (top 12)",
                [{"what": k, "ms": 1e3 * v * per_1k} for k, v in list(detail.items())[:12]],
                [Col("what", "innermost frame"), Col("ms", "ms/1k", ".2f")],
            )
        worker = (profiles.get("new") or {}).get("worker_s") or {}
        if worker:
            print_table(
                "new: the learn worker thread (the pipeline), ms sampled per 1k events",
                [{"what": k, "ms": 1e3 * v * per_1k} for k, v in worker.items()],
                [Col("what", "category"), Col("ms", "ms/1k", ".2f")],
            )
    acct = [
        {"round": r["round"], "side": r["side"], **r["pipeline"]}
        for r in result["runs"]
        if r.get("pipeline")
    ]
    if acct:
        print_table(
            "the pipeline, as the updater accounts for it at stop (whole run): seconds the "
            "worker learned, the loop waited for it, the loop worked meanwhile; overlap = "
            "learned - waited; the learn's CPU and run-queue seconds, and the rest of its wall "
            "time (waiting for the GIL, mostly)",
            acct,
            [
                Col("round", "round"),
                Col("side", "code"),
                Col("batches", "batches", ".0f"),
                Col("learn_s", "learn s", ".2f"),
                Col("wait_s", "wait s", ".2f"),
                Col("loop_meanwhile_s", "loop meanwhile s", ".2f"),
                Col("overlap_s", "overlap s", ".2f"),
                Col("learn_cpu_s", "learn CPU s", ".2f"),
                Col("learn_runq_s", "run queue s", ".2f"),
                Col("learn_gil_s", "GIL etc. s", ".2f"),
            ],
        )
    print_table(
        f"updater at {result['old_rev']} (old) and {result['new_rev']} (new), "
        f"{result['stream']['n_events']:,} events, --max-batch-events {result['batch']}, "
        "alternating (ABBA); rate between first and last commit",
        result["runs"],
        [
            Col("round", "round"),
            Col("side", "code"),
            Col("events_per_s", "events/s", fmt_rate),
            Col("wall_events_per_s", "incl. startup", fmt_rate),
            Col("startup_s", "startup s", ".1f"),
            Col("apply_share", "decode+learn", pct),
            Col("write_share", "rocksdb", pct),
            Col("rest_share", "rest", pct),
            Col("cpu_ms_per_1k", "CPU ms/1k ev", ".0f"),
            Col("broker_cpu_s", "broker cpu s", ".1f"),
        ],
    )
    rows = []
    for key, what, fmt in (
        ("events_per_s", "events/s, first to last commit", fmt_rate),
        ("wall_events_per_s", "events/s incl. startup", fmt_rate),
        ("cpu_ms_per_1k", "updater CPU ms per 1k events (span)", lambda x: f"{x:.0f}"),
    ):
        c = result[key]
        rows.append(
            {
                "what": what,
                "old": fmt(c["median_old"]),
                "new": fmt(c["median_new"]),
                "ratio": c["new_over_old"],
                "spread": f"{c['ratio_min']:.2f}-{c['ratio_max']:.2f}",
            }
        )
    print_table(
        "medians over the rounds; new/old (per-round range)",
        rows,
        [
            Col("what", "figure"),
            Col("old", "old"),
            Col("new", "new"),
            Col("ratio", "new/old", ".3f"),
            Col("spread", "per round"),
        ],
    )


def report(result: dict[str, Any]) -> None:
    pct = lambda x: f"{100 * x:.0f}%"  # noqa: E731
    raw, fast = result["raw_consume"], result["raw_consume_backoff10"]
    rows: list[dict[str, Any]] = [
        {
            "what": "publish (lz4, 1 partition)",
            "rate": result["publish"]["events_per_s"],
            "seconds": result["publish"]["seconds"],
        },
        {
            "what": "raw consume (kafka_io fetch settings)",
            "rate": raw["events_per_s"],
            "seconds": raw["seconds"],
        },
        {
            "what": "raw consume + fetch.queue.backoff.ms=10",
            "rate": fast["events_per_s"],
            "seconds": fast["seconds"],
        },
    ]
    for r in result["updater"]:
        rows.append(
            {
                "what": f"updater {r['label']}",
                "rate": r["events_per_s"],
                "seconds": r["commit_span_s"],
                "vs_raw": r["vs_raw"],
                "wall_rate": r["wall_events_per_s"],
                "ok": "yes" if r["meets_target"] else "NO",
            }
        )
    for r in result["river"]:
        rows.append(
            {
                "what": f"river BiasedMF learn_one, {r['n_negatives']} neg",
                "rate": r["events_per_s"],
                "seconds": r["seconds"],
            }
        )
    print_table(
        f"ingest, {result['stream']['n_events']:,} events ({result['broker']}); target >= "
        f"{fmt_rate(TARGET_RATE)}/s and >= {TARGET_RATIO}x raw",
        rows,
        [
            Col("what", "measurement"),
            Col("rate", "events/s", fmt_rate),
            Col("seconds", "s", ".2f"),
            Col("vs_raw", "x raw", ".2f"),
            Col("wall_rate", "incl. startup", fmt_rate),
            Col("ok", "target"),
        ],
    )
    print_table(
        "updater time split between first and last commit (own histograms; CPU from /proc)",
        result["updater"],
        [
            Col("label", "run"),
            Col("batches", "batches"),
            Col("startup_s", "startup s", ".1f"),
            Col("apply_share", "decode+learn", pct),
            Col("write_share", "rocksdb", pct),
            Col("rest_share", "consume+commit+other", pct),
            Col("updater_cpu_s", "updater cpu s", ".1f"),
            Col("broker_cpu_s", "broker cpu s", ".1f"),
        ],
    )
    for r in result["updater"]:
        if r.get("profile"):
            print_table(
                f"py-spy, updater main thread, {r['label']} (share of samples)",
                [{"what": k, "share": v} for k, v in r["profile"].items()],
                [Col("what", "category"), Col("share", "share", pct)],
            )


if __name__ == "__main__":
    raise SystemExit(main())
