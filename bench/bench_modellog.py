"""The model log end to end: freshness, reader restart, replica memory, bytes per event.

One embedded broker (or KAFKA_BOOTSTRAP_SERVERS), the real updater and query processes:

1. A model of N_USERS users x N_ITEMS items (dim 64, 4 negatives) is built by replaying events
   through the updater, which publishes it to the model log.
2. Reader start: a query process is started (only --bootstrap-servers) and timed until it
   serves (`stream_mf_model_log_catch_up_seconds`: find the latest snapshot, read it and its
   tail); then SIGKILLed and restarted while the updater keeps going, and timed again. Its
   resident memory (after a warm-up) is compared with the model it holds (the arrays of every
   row plus seen items) above the fixed overhead, measured in the same run: the same query
   process serving a 1,000 users x 500 items model written to a topic of its own. Both are
   broken down by mapping (/proc/PID/smaps: brk heap, anonymous maps, files) and by the
   process's own account (`stream_mf_replica_memory_bytes`: the model's arrays by part,
   glibc's heap in use / free / mmapped). `--memory-only` stops here (~1-2 min).
3. At each rate (1k and 20k events/s): live events (stamped with the wall clock) on the same
   model, from a producer that delivered a record first (a new producer's first delivery
   waits 0.5-1 s here); the window opens after 2 s of them. Meanwhile a brand-new user sends
   one event every 0.5 s and the time until a `recommend` for that user comes back
   personalized is measured (polled every 10 ms); then 100 requests/s (`bench_query.run_load`,
   1 s warm-up excluded) to a bare echo (the service's own consumer, producer and loop, no
   model: `bench_query.py --echo-child`) and to the query service, taking turns (`--rounds`,
   the first of each round alternating), request-to-reply p99 of each, pooled, with their
   request and reply legs and the query's own handling time. Each process's CPU over the
   window, and the events' way into the broker (stamp to acknowledgement). The query process's
   `stream_mf_freshness_seconds` histogram over the window gives p50/p99 (bucket upper bounds
   and interpolated), the updater's `stream_mf_model_log_bytes_total` over the events it
   applied gives bytes per event, and a tracer (a consumer of the model log in this process)
   splits each commit's time: its oldest event to the marker's production (`at`: the updater's
   share: the event's way in, the batch's wait, learning, the store commit) and the marker to
   its arrival here (the log's share, this process's own scheduling included).
4. The embedded broker's resident memory at the end (it keeps every record: Tansu's memory
   storage applies neither retention nor compaction).

`--soak SECONDS` runs the demo instead (broker, updater, two query processes, the MovieLens
replay) and then its live traffic for that long, sampling the broker's memory and the log's
bytes per event every 15 s (`bench/results/bench_modellog_soak*.json`).

Run: PYTHONPATH=. .venv/bin/python bench/bench_modellog.py [--quick] [--rates 1000 20000]
     [--requests 100] [--rounds 3] [--fetch-wait MS] [--request-fetch-wait MS]
     [--load-linger MS] [--soak 600] [--memory-only]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from bench_ingest import Children
from bench_query import run_load, start_echo, summarize, wait_for_echo
from common import Col, bench_args, print_table, write_results
from confluent_kafka import OFFSET_END, TopicPartition

from consumers import kafka_io
from consumers.client import FETCH_WAIT_MS, LINGER_MS, RecClient
from consumers.local_broker import BOOTSTRAP_ENV, EmbeddedBroker, free_port
from consumers.processes import (
    ManagedProcess,
    histogram_quantile,
    metric_sum,
    scrape,
    wait_until,
)
from consumers.settings import KafkaSettings
from consumers.topics import create_topics
from stream_mf.model_log import MARKER_KEY, Marker

MODEL_FLAGS = ("--dim", "64", "--n-negatives", "4")
TRACER_FETCH_WAIT_MS = 20


def cpu_of(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def memory_of(pid: int) -> dict[str, int]:
    """Resident bytes of a process: all, anonymous (heap, arrays) and file-backed (shared
    libraries: numba's LLVM alone maps about 100 MB)."""
    out = {"rss": 0, "anon": 0, "file": 0}
    names = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file"}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key = names.get(line.split(":")[0] + ":")
            if key:
                out[key] = int(line.split()[1]) * 1024
    return out


def smaps_of(pid: int) -> dict[str, int]:
    """Resident bytes by kind of mapping (/proc/PID/smaps): the brk heap, anonymous mappings
    (big arrays, other malloc arenas, thread stacks), and file-backed ones (libraries)."""
    out = {"heap": 0, "anon_maps": 0, "anon_maps_1mb": 0, "stack": 0, "file": 0}
    name = ""
    with open(f"/proc/{pid}/smaps") as fh:
        for line in fh:
            head = line.split()
            if not head:
                continue
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                name = head[5] if len(head) > 5 else ""
            elif head[0] == "Rss:":
                kb = int(head[1]) * 1024
                if name == "[heap]":
                    out["heap"] += kb
                elif name == "[stack]":
                    out["stack"] += kb
                elif name == "" or name.startswith("[anon"):
                    out["anon_maps"] += kb
                    out["anon_maps_1mb"] += kb if kb >= 1 << 20 else 0
                else:
                    out["file"] += kb
    return out


def replica_parts(url: str) -> dict[str, float]:
    """The query process's own account (`stream_mf_replica_memory_bytes` by part)."""
    name = "stream_mf_replica_memory_bytes"
    return {
        k.split('part="')[1].rstrip('"}'): v
        for k, v in scrape(url).items()
        if k.startswith(name + "{")
    }


def write_tiny_model(kafka: str, topic: str, n_users: int = 1000, n_items: int = 500) -> None:
    """A model log holding one snapshot of a small model (the fixed overhead's reference)."""
    from stream_mf.config import ModelConfig
    from stream_mf.model_log import SeenIndex, begin_record, snapshot_records
    from stream_mf.state import ModelState

    cfg = ModelConfig(dim=64, n_negatives=4)
    st = ModelState.empty(cfg, 16)
    st.users.add([f"u{i}" for i in range(n_users)])
    st.items.add([f"i{i}" for i in range(n_items)])
    keys = (np.arange(n_users, dtype=np.int64) << 32) | (np.arange(n_users) % n_items)
    create_topics(kafka, {topic: 1})
    p = kafka_io.ordered_producer(KafkaSettings(bootstrap_servers=kafka))
    mk = Marker(seq=1, gen=0, version=1, events=n_users, clock=0.0, n_users=n_users,
                n_items=n_items, snapshot=True, snap=0)  # fmt: skip
    for k, v in [begin_record(1, 0, n_users, n_items), *snapshot_records(st, 0, SeenIndex(keys))]:
        while True:
            try:
                p.produce(topic, key=k, value=v)
                break
            except BufferError:
                p.poll(0.05)
    p.flush(60)
    # the marker in a batch of its own: Tansu's high watermark is that of the last batch's first
    # record (one batch of 1,503 records read as 1), and a reader looks back from it
    p.produce(topic, key=MARKER_KEY, value=mk.encode())
    p.flush(30)


@contextlib.contextmanager
def broker() -> Iterator[tuple[str, int | None]]:
    if os.environ.get(BOOTSTRAP_ENV):
        yield os.environ[BOOTSTRAP_ENV], None
        return
    with EmbeddedBroker() as b:
        yield b.bootstrap_servers, b.pid


def quantile(metrics: dict[str, float], before: dict[str, float], name: str, q: float) -> float:
    rows = []
    for key, v in metrics.items():
        if key.startswith(f"{name}_bucket"):
            le = key.split('le="')[1].rstrip('"}')
            rows.append((float(le), v - before.get(key, 0.0)))
    rows.sort()
    total = rows[-1][1] if rows else 0.0
    if total <= 0:
        return float("nan")
    return next(le for le, c in rows if c >= q * total)


class Load:
    """Live events at `rate`/s from a thread: known users and items, wall-clock timestamps."""

    def __init__(
        self,
        kafka: str,
        topic: str,
        rate: float,
        n_users: int,
        n_items: int,
        linger_ms: float = 5,
        partition: int | None = None,
    ):
        ks = KafkaSettings(bootstrap_servers=kafka)
        self.p = kafka_io.producer(ks, **{"linger.ms": linger_ms})
        # `--backlog`: live events keep to partition 0, the backlog has partition 1
        self.where: dict[str, int] = {} if partition is None else {"partition": partition}
        self.topic, self.rate, self.nu, self.ni = topic, rate, n_users, n_items
        self.sent = 0
        # (stamp, stamp to the broker's acknowledgement) of each chunk's first event: the
        # event's way into the broker, apart from the broker to the updater
        self.acks: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)

    def acked_within(self, t0: float, t1: float) -> dict[str, float]:
        lat = np.asarray([a for at, a in self.acks if t0 <= at < t1])
        if not lat.size:
            return {}
        return {"p50_ms": float(np.percentile(lat, 50) * 1e3),
                "p99_ms": float(np.percentile(lat, 99) * 1e3)}  # fmt: skip

    def run(self) -> None:
        rng = np.random.default_rng(1)
        t0 = time.monotonic()
        while not self.stop.is_set():
            due = int((time.monotonic() - t0) * self.rate) - self.sent
            if due > 0:
                now = time.time()
                us = rng.integers(self.nu, size=due).tolist()
                its = rng.zipf(1.3, size=due) % self.ni
                for j, (u, i) in enumerate(zip(us, its.tolist(), strict=True)):
                    doc = {
                        "user_id": f"u{u}",
                        "item_id": f"i{i}",
                        "event_type": "view",
                        "timestamp": now,
                    }
                    cb = None
                    if j == 0:

                        def cb(err: Any, _m: Any, at: float = now) -> None:
                            if err is None:
                                self.acks.append((at, time.time() - at))

                    while True:
                        try:
                            self.p.produce(
                                self.topic,
                                key=f"u{u}".encode(),
                                value=orjson.dumps(doc),
                                on_delivery=cb,
                                **self.where,
                            )
                            break
                        except BufferError:
                            self.p.poll(0.01)
                self.sent += due
            self.p.poll(0)
            time.sleep(0.005)
        self.p.flush(30)


class Tracer:
    """Where a commit's time goes: a consumer of the model log (20 ms fetch wait) that notes,
    for each commit marker, its events' times (the sample it carries), when the updater
    produced it (`at`) and when it arrived here. Event to `at` is the updater's share (the
    event's way to the updater, the batch's wait to fill, learning, the store commit, encoding);
    `at` to arrival is the log's (linger, broker, fetch)."""

    def __init__(self, kafka: str, topic: str):
        self.c = kafka_io.consumer(
            KafkaSettings(bootstrap_servers=kafka),
            f"bench-tracer-{uuid.uuid4().hex[:6]}",
            # 20 ms, not 1: the embedded broker never wakes a waiting fetch and spends ~0.5 ms
            # of CPU per fetch, so a 1 ms tracer alone asked ~1,000 fetches/s of the broker it
            # measures (at ~100% CPU in those runs); the log leg below includes up to 20 ms
            **{"fetch.wait.max.ms": TRACER_FETCH_WAIT_MS, "auto.offset.reset": "latest"},
        )
        self.c.assign([TopicPartition(topic, 0, OFFSET_END)])
        self.rows: list[tuple[float, float, float, float, int, bool]] = []
        self.snaps: list[float] = []
        self.named: int | None = None  # the periodic snapshot the last marker named
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            # drain, not consume(1000, 0.05): that waits out the whole 50 ms unless 1,000
            # records come, which put up to 50 ms of this process's own wait on the log's share
            for m in kafka_io.drain(self.c, 1000, 0.05):
                if m.error() is not None or m.key() != MARKER_KEY:
                    continue
                now = time.time()
                mk = Marker.decode(m.value() or b"")
                # a snapshot on the model topic ends with a snapshot marker; a periodic one (on
                # the snapshot topic) is named by the first marker with its `snap_begin`
                if mk.snapshot or (mk.snap_begin is not None and mk.snap_begin != self.named):
                    self.snaps.append(mk.at)
                self.named = mk.snap_begin if mk.snap_begin is not None else self.named
                if mk.times and mk.count:
                    t = np.asarray(mk.times)
                    self.rows.append((float(t.min()), float(t.max()), mk.at, now, mk.count,
                                      mk.snapshot))  # fmt: skip
        self.c.close()

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        """Quantiles (events weighted by their marker's count) of each leg, over markers
        whose events fall in [t0, t1)."""
        rows = [r for r in self.rows if t0 <= r[0] < t1]
        if not rows:
            return {}
        a = np.asarray([r[:5] for r in rows])
        w = a[:, 4]
        # the oldest event of a commit waited longest: its legs are the commit's worst case
        legs = {"updater": a[:, 2] - a[:, 0], "log": a[:, 3] - a[:, 2], "total": a[:, 3] - a[:, 0]}
        out: dict[str, Any] = {"commits": len(rows), "events_per_commit": float(w.mean())}
        for name, v in legs.items():
            order = np.argsort(v)
            cw = np.cumsum(w[order]) / w.sum()
            out[f"{name}_p50_ms"] = float(v[order][np.searchsorted(cw, 0.5)] * 1e3)
            out[f"{name}_p99_ms"] = float(
                v[order][min(np.searchsorted(cw, 0.99), v.size - 1)] * 1e3
            )
        gaps = np.diff(a[:, 2])
        out["max_gap_between_commits_ms"] = float(gaps.max() * 1e3) if gaps.size else 0.0
        out["snapshots"] = sum(1 for at in self.snaps if t0 <= at < t1)
        return out


SLOW_TURN = re.compile(
    r"^(\S+ \S+) INFO consumers.updater: slow loop turn: (\d+) ms \(cpu (\d+) ms, runq (\d+) "
    r"ms, gc (\d+) ms, vcsw (\d+)\), (\d+) events; ms by step: ([^;]*); within: (.*)$"
)


def slow_turns(log_path: Path, t0: float, t1: float) -> dict[str, Any]:
    """The updater's slow loop turns (its log: over 250 ms) in [t0, t1): how many, and their
    wall time split into CPU, run-queue wait (other processes on the cores), GC, and by step."""
    out: dict[str, Any] = {"turns": 0, "events": 0}
    sums: dict[str, float] = {}
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        m = SLOW_TURN.match(line)
        if m is None:
            continue
        at = time.mktime(time.strptime(m[1].split(",")[0], "%Y-%m-%d %H:%M:%S"))
        if not t0 - 1 <= at < t1 + 1:
            continue
        out["turns"] += 1
        out["events"] += int(m[7])
        for k, v in zip(("wall", "cpu", "runq", "gc"), m.group(2, 3, 4, 5), strict=True):
            sums[k] = sums.get(k, 0.0) + float(v)
        for part in (m[8] + ", " + m[9]).split(", "):
            if part.strip():
                k, v = part.rsplit(" ", 1)
                sums[k] = sums.get(k, 0.0) + float(v)
    out["ms"] = sums
    return out


def warm_producer(p: Any, topic: str) -> None:
    """Deliver one record with a new producer before it counts: its first delivery waits
    500-1,000 ms here (connection, metadata, its idempotent producer id), a client's start-up
    that a long-lived producer of events paid long before. The record goes to a topic of the
    bench's own, so the service's first new user is still its first."""
    p.produce(topic, value=b"warm-up")
    if p.flush(15) != 0:
        raise RuntimeError("a producer's warm-up record was not delivered in 15 s")


def publish_backlog(
    kafka: str, topic: str, updater_pid: int, n: int, n_users: int, n_items: int
) -> None:
    """`n` events on partition 1 while the updater is stopped (SIGSTOP), then it goes on: a
    backlog it ingests at full speed while the live events (partition 0) keep coming. They are
    stamped as they are made, so the freshness histogram counts their wait too; the new-user
    probes (partition 0) are the live events' own measure."""
    p = kafka_io.producer(KafkaSettings(bootstrap_servers=kafka), **{"linger.ms": 50})
    rng = np.random.default_rng(5)
    os.kill(updater_pid, signal.SIGSTOP)
    try:
        t0 = time.perf_counter()
        us = rng.integers(n_users, size=n)
        its = rng.zipf(1.3, size=n) % n_items
        for u, i in zip(us.tolist(), its.tolist(), strict=True):
            doc = {"user_id": f"u{u}", "item_id": f"i{i}", "event_type": "view",
                   "timestamp": time.time()}  # fmt: skip
            while True:
                try:
                    p.produce(topic, value=orjson.dumps(doc), partition=1)
                    break
                except BufferError:
                    p.poll(0.05)
        left = p.flush(60)
        print(f"backlog: {n - left:,} events on partition 1 in {time.perf_counter() - t0:.1f} s "
              "(the updater stopped meanwhile)", flush=True)  # fmt: skip
    finally:
        os.kill(updater_pid, signal.SIGCONT)


def new_user_latency(
    kafka: str,
    topics: dict[str, str],
    seconds: float,
    client: RecClient,
    warm_topic: str,
    partition: int | None = None,
) -> tuple[list[float], int]:
    """A brand-new user's first event to a personalized answer, one probe every 0.5 s; and how
    many probes got none within 10 s."""
    ks = KafkaSettings(bootstrap_servers=kafka)
    p = kafka_io.producer(ks, **{"linger.ms": 0})
    # the probe's producer is new: without this, the first probe paid its start-up (0.6 s in
    # every run), which a live producer of events has long had
    p.list_topics(topics["interactions"], timeout=10)
    warm_producer(p, warm_topic)
    out: list[float] = []
    missed = 0
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            uid = f"probe-{uuid.uuid4().hex[:8]}"
            t0 = time.time()
            doc = {"user_id": uid, "item_id": "i1", "event_type": "view", "timestamp": t0}
            where = {} if partition is None else {"partition": partition}
            p.produce(topics["interactions"], key=uid.encode(), value=orjson.dumps(doc), **where)
            p.flush(5)
            got = False
            while time.time() - t0 < 10:
                try:
                    r = client.ask({"user_id": uid, "k": 5}, timeout=5)
                except TimeoutError:
                    continue
                if r.strategy == "personalized":
                    out.append(time.time() - t0)
                    got = True
                    break
                time.sleep(0.01)
            missed += not got
            time.sleep(max(0.0, 0.5 - (time.time() - t0)))
    finally:
        p.flush(5)
    return out, missed


def main() -> None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument(
        "--soak",
        type=float,
        default=0.0,
        help="the demo's live traffic for this "
        "many seconds instead (broker memory, log bytes per event)",
    )
    pre.add_argument("--rates", type=int, nargs="*", default=None, help="events/s (1000 20000)")
    pre.add_argument("--seconds", type=float, default=0.0, help="new-user probes per rate")
    pre.add_argument(
        "--requests",
        type=float,
        default=100.0,
        help="requests/s against the echo and the service per rate (0: none)",
    )
    pre.add_argument(
        "--fetch-wait",
        type=int,
        default=None,
        help="fetch.wait.max.ms of every consumer on the way (the updater's, the query "
        "process's requests and model log, the echo's, the clients'); default: each one's own",
    )
    pre.add_argument(
        "--request-fetch-wait",
        type=int,
        default=None,
        help="fetch.wait.max.ms of the request path only (the query process's and the echo's "
        "request consumers, the clients' reply consumers); after --fetch-wait",
    )
    pre.add_argument(
        "--load-linger", type=float, default=5.0, help="linger.ms of the live events' producer"
    )
    pre.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="the echo and the service take turns this many times per rate (latencies pooled)",
    )
    pre.add_argument(
        "--echo-follows",
        action="store_true",
        help="the bare echo also follows the model log on a thread, as the service does "
        "(and still answers without it): the process's cost to a request, apart from the answer",
    )
    pre.add_argument(
        "--backlog",
        type=int,
        default=0,
        help="before each rate's window, this many events on a partition of their own while "
        "the updater is stopped (SIGSTOP): the window measures the live events and probes "
        "while the updater ingests that backlog at full speed",
    )
    pre.add_argument(
        "--memory-only",
        action="store_true",
        help="only the model build, reader start/restart and memory (no rates: ~1-2 min)",
    )
    args = bench_args(__doc__.splitlines()[0], parents=[pre])
    known = args
    if known.soak:
        soak(known.soak, args.out)
        return
    n_users, n_items = (20_000, 10_000) if args.quick else (100_000, 50_000)
    rates = [] if known.memory_only else (known.rates or [1000, 20_000])
    seconds = known.seconds or (8.0 if args.quick else 20.0)
    req_rate, req_seconds = known.requests, 6.0 if args.quick else 12.0
    if known.memory_only:
        req_rate = 0.0  # no echo either
    probe_users = np.arange(min(n_users, 5000))
    work = Path(tempfile.mkdtemp(prefix="bench-modellog-"))
    children = Children()
    tag = uuid.uuid4().hex[:6]
    topics = {k: f"bench-ml-{k}-{tag}" for k in ("interactions", "requests", "responses", "model")}
    echo_req = f"bench-ml-echo-requests-{tag}"
    warm_topic = f"bench-ml-warm-{tag}"  # producers' first records (`warm_producer`)
    env = {f"STREAM_MF_TOPICS__{k.upper()}": v for k, v in topics.items()}
    env["STREAM_MF_TOPICS__DEAD_LETTER"] = f"bench-ml-dlt-{tag}"
    env["STREAM_MF_LIVE_EVAL_RATE"] = "0"
    env["STREAM_MF_REBUILD__EVERY_SECONDS"] = "1000000"
    client_wait = FETCH_WAIT_MS
    if known.fetch_wait is not None:
        env["STREAM_MF_FETCH_WAIT_MS"] = env["STREAM_MF_MODEL_LOG_FETCH_WAIT_MS"] = str(
            known.fetch_wait
        )
        client_wait = known.fetch_wait
    result: dict[str, Any] = {"quick": args.quick, "users": n_users, "items": n_items,
                              "memory_only": known.memory_only, "fetch_wait_ms": known.fetch_wait,
                              "client_fetch_wait_ms": client_wait,
                              "load_linger_ms": known.load_linger,
                              "echo_follows": known.echo_follows}  # fmt: skip
    rows: list[dict[str, Any]] = []
    try:
        with broker() as (kafka, broker_pid):
            create_topics(
                kafka,
                {
                    topics["interactions"]: 2 if known.backlog else 1,
                    topics["requests"]: 1,
                    topics["responses"]: 1,
                    echo_req: 1,
                    warm_topic: 1,
                    env["STREAM_MF_TOPICS__DEAD_LETTER"]: 1,
                },
            )
            # ---- 1. the model ----
            up_port = free_port()
            updater = children.start(
                ManagedProcess(
                    "updater",
                    [
                        "updater",
                        "--bootstrap-servers",
                        kafka,
                        "--state-dir",
                        str(work / "state"),
                        "--metrics-port",
                        str(up_port),
                        *MODEL_FLAGS,
                    ],
                    work,
                    env=env,
                )
            )
            up_url = f"http://127.0.0.1:{up_port}/metrics"
            if known.request_fetch_wait is not None:  # the processes started from here on
                env["STREAM_MF_FETCH_WAIT_MS"] = str(known.request_fetch_wait)
                client_wait = result["client_fetch_wait_ms"] = known.request_fetch_wait
            rng = np.random.default_rng(0)
            n_events = 3 * n_users
            users = np.arange(n_events) % n_users
            items = np.concatenate(
                [np.arange(n_items), rng.zipf(1.3, n_events - n_items) % n_items]
            )
            prod = kafka_io.ordered_producer(KafkaSettings(bootstrap_servers=kafka))
            t_ev = time.time() - 3600
            for u, i in zip(users.tolist(), items.tolist(), strict=True):
                doc = {
                    "user_id": f"u{u}",
                    "item_id": f"i{i}",
                    "event_type": "view",
                    "timestamp": t_ev,
                }
                while True:
                    try:
                        prod.produce(
                            topics["interactions"], key=f"u{u}".encode(), value=orjson.dumps(doc)
                        )
                        break
                    except BufferError:
                        prod.poll(0.05)
            prod.flush(120)
            t0 = time.monotonic()
            wait_until(
                lambda: metric_sum(scrape(up_url), "stream_mf_events_applied_total") >= n_events,
                600,
                1.0,
                "the model built",
            )
            time.sleep(3.0)  # item rows flushed
            m = scrape(up_url)
            result["build_seconds"] = time.monotonic() - t0
            result["snapshot_bytes"] = m.get("stream_mf_model_log_snapshot_bytes", 0.0)
            print(
                f"model: {n_users:,} users x {n_items:,} items built in "
                f"{result['build_seconds']:.0f} s; snapshot "
                f"{result['snapshot_bytes'] / 1e6:.1f} MB",
                flush=True,
            )

            # ---- 2. reader start and restart, memory ----
            def start_query(name: str) -> tuple[ManagedProcess, str, float]:
                port = free_port()
                cwd = work / f"{name}-cwd"
                cwd.mkdir(exist_ok=True)
                t = time.monotonic()
                q = children.start(
                    ManagedProcess(
                        name,
                        ["query", "--bootstrap-servers", kafka, "--metrics-port", str(port)],
                        work,
                        env=env,
                        cwd=cwd,
                    )
                )
                url = f"http://127.0.0.1:{port}/metrics"

                def ready() -> bool:
                    try:
                        return scrape(url).get("stream_mf_model_log_catch_up_seconds", 0.0) > 0
                    except OSError:
                        return False

                wait_until(ready, 120, 0.05, f"{name} caught up")
                return q, url, time.monotonic() - t

            q, q_url, wall = start_query("query-1")
            m = scrape(q_url)
            result["start"] = {
                "catch_up_s": m["stream_mf_model_log_catch_up_seconds"],
                "wall_s": wall,
            }
            time.sleep(2.0)
            result["start"]["memory"] = {**memory_of(q.pid), **replica_parts(q_url)}
            # restart: killed, the updater goes on (a little traffic), started again
            q.kill()
            children.procs.remove(q)
            load = Load(kafka, topics["interactions"], 500, n_users, n_items)
            load.t.start()
            time.sleep(3.0)
            q, q_url, wall = start_query("query-1")
            load.stop.set()
            load.t.join(30)
            m = scrape(q_url)
            result["restart"] = {
                "catch_up_s": m["stream_mf_model_log_catch_up_seconds"],
                "wall_s": wall,
            }
            time.sleep(2.0)
            mem = memory_of(q.pid)
            rss = mem["rss"]
            maps, parts = smaps_of(q.pid), replica_parts(q_url)
            if os.environ.get("BENCH_HOLD"):  # inspect the replica (gdb, py-spy) meanwhile
                print(f"holding {os.environ['BENCH_HOLD']} s: replica pid {q.pid}", flush=True)
                time.sleep(float(os.environ["BENCH_HOLD"]))
            # what the replica holds: every row's arrays (factors, bias, count, last, logpop)
            # and each user's seen items (int32)
            per_row = 64 * 4 + 4 + 8 + 8 + 8
            model_bytes = (n_users + n_items) * per_row + n_events * 4
            # and the transitions it serves besides (32 slots of i32 + f64 per item, each
            # user's last item): not in the figure above, kept as it was for comparison
            with_trans = model_bytes + n_items * 32 * 12 + n_users * 4
            # the fixed overhead, in the same run: the same query process serving a model of
            # 1,000 users x 500 items (its own model topic, written here)
            tiny_topic = f"bench-ml-tiny-{tag}"
            write_tiny_model(kafka, tiny_topic)
            saved = dict(env)
            # its own model, requests and group: the measured replica keeps its partition
            env["STREAM_MF_TOPICS__MODEL"] = tiny_topic
            env["STREAM_MF_TOPICS__REQUESTS"] = f"{tiny_topic}-requests"
            env["STREAM_MF_GROUP_ID"] = f"{tiny_topic}-group"
            try:
                tq, _tq_url, _ = start_query("query-tiny")
            finally:
                env.clear()
                env.update(saved)
            time.sleep(2.0)
            fixed = memory_of(tq.pid)
            fixed_maps, fixed_parts = smaps_of(tq.pid), replica_parts(_tq_url)
            children.stop(tq)
            variable = rss - fixed["rss"]
            result["memory"] = {
                "rss_bytes": rss,
                "anon_bytes": mem["anon"],
                "file_bytes": mem["file"],
                "fixed_rss_bytes": fixed["rss"],
                "fixed_anon_bytes": fixed["anon"],
                "fixed_file_bytes": fixed["file"],
                "model_bytes": model_bytes,
                "ratio": rss / model_bytes,
                "ratio_above_fixed": variable / model_bytes,
                "model_bytes_with_transitions": with_trans,
                "ratio_above_fixed_with_transitions": variable / with_trans,
                "smaps": maps,
                "fixed_smaps": fixed_maps,
                "parts": parts,
                "fixed_parts": fixed_parts,
            }
            for label, a, b in (("smaps", maps, fixed_maps), ("parts", parts, fixed_parts)):
                print(f"  {label} (replica / 1k-user process, MB): " + ", ".join(
                    f"{k} {a.get(k, 0) / 1e6:.1f}/{b.get(k, 0) / 1e6:.1f}" for k in a
                ), flush=True)  # fmt: skip
            print(
                f"reader start {result['start']['catch_up_s']:.2f} s, restart "
                f"{result['restart']['catch_up_s']:.2f} s; RSS {rss / 1e6:.0f} MB (anon "
                f"{mem['anon'] / 1e6:.0f}) for a {model_bytes / 1e6:.0f} MB model; a 1k-user "
                f"model's process {fixed['rss'] / 1e6:.0f} MB (anon {fixed['anon'] / 1e6:.0f}): "
                f"{variable / model_bytes:.2f}x the model above that ({variable / with_trans:.2f}x "
                f"of {with_trans / 1e6:.1f} MB with its transitions)",
                flush=True,
            )

            # ---- 3. freshness at each rate, requests against a bare echo ----
            client = RecClient(
                KafkaSettings(bootstrap_servers=kafka),
                topics["requests"],
                topics["responses"],
                fetch_wait_ms=client_wait,
            )
            for _ in range(4):  # joined (after the killed member's session ran out) and warm
                try:
                    client.ask({"user_id": "u1", "k": 5}, timeout=30)
                    break
                except TimeoutError:
                    continue
            echo = None
            if req_rate:
                echo_env = {
                    **env,
                    "STREAM_MF_TOPICS__REQUESTS": echo_req,
                    "STREAM_MF_GROUP_ID": f"bench-ml-echo-{tag}",
                    "BENCH_ECHO_FOLLOWS": "1" if known.echo_follows else "0",
                }
                echo = start_echo(children, work, kafka, echo_env)
                wait_for_echo(kafka, echo_req, topics["responses"], echo, 60)
            tracer = Tracer(kafka, topics["model"])
            tracer.t.start()
            pids = {"updater": updater.pid, "query": q.pid, "bench": os.getpid()}
            if echo is not None:
                pids["echo"] = echo.pid
            if broker_pid is not None:
                pids["broker"] = broker_pid
            live_part = 0 if known.backlog else None
            for rate in rates:
                load = Load(kafka, topics["interactions"], rate, n_users, n_items,
                            known.load_linger, live_part)  # fmt: skip
                warm_producer(load.p, warm_topic)
                if known.backlog:
                    publish_backlog(kafka, topics["interactions"], updater.pid, known.backlog,
                                    n_users, n_items)  # fmt: skip
                load.t.start()
                # the window opens once the load is steady: the histograms' counts are read
                # after 2 s of it (the events of its first second used to make the p99)
                time.sleep(2.0)
                before_q, before_u = scrape(q_url), scrape(up_url)
                w0 = time.time()
                cpu0 = {name: cpu_of(pid) for name, pid in pids.items()}
                lat, missed = new_user_latency(kafka, topics, seconds, client, warm_topic,
                                               live_part)  # fmt: skip
                w_probes = time.time()
                probe_events = metric_sum(
                    scrape(up_url), "stream_mf_events_applied_total"
                ) - metric_sum(before_u, "stream_mf_events_applied_total")
                rtt: dict[str, Any] = {}
                if req_rate:
                    # the bare echo and the service take turns (`--rounds`), each with the
                    # updater applying `rate` events/s and the query process following its
                    # commits: a hiccup of the host or the broker (a periodic snapshot) lands on
                    # one side's share only by chance, not on the whole of the second one
                    pooled: dict[str, list[float]] = {"echo": [], "service": []}
                    legs: dict[str, dict[str, list[float]]] = {
                        t: {"request_leg": [], "reply_leg": []} for t in pooled
                    }
                    # which goes first alternates round by round (echo, service, service, echo,
                    # ...): neither always meets a longer responses partition, nor the other's
                    # just-lingering replies
                    order = [("echo", "service"), ("service", "echo")]
                    for target in [t for r in range(known.rounds) for t in order[r % 2]]:
                        req_topic = echo_req if target == "echo" else topics["requests"]
                        r = run_load(kafka, req_topic, topics["responses"], probe_users,
                                     req_rate, 1.0, req_seconds / known.rounds, client_wait,
                                     LINGER_MS, raw=True)  # fmt: skip
                        pooled[target].extend(r.pop("total_raw_ms"))
                        for leg in ("request_leg", "reply_leg"):
                            # request: sent -> the reply's generated_at (client, broker, the
                            # process's fetch and work); reply: generated_at -> received
                            legs[target][leg].extend(r.pop(f"{leg}_raw_ms"))
                        acc = rtt.setdefault(target, {"answered": 0, "lost": 0, "errors": 0})
                        for k in ("answered", "lost", "errors"):
                            acc[k] += r[k]
                    for target, lat_ms in pooled.items():
                        rtt[target]["total_ms"] = summarize(np.asarray(lat_ms))
                        for leg, v in legs[target].items():
                            rtt[target][f"{leg}_ms"] = summarize(np.asarray(v))
                w1 = time.time()
                cpu_pct = {
                    name: round((cpu_of(pid) - cpu0[name]) / (w1 - w0) * 100, 1)
                    for name, pid in pids.items()
                }
                load.stop.set()
                load.t.join(60)
                time.sleep(2.0)
                after_q, after_u = scrape(q_url), scrape(up_url)
                ev = metric_sum(after_u, "stream_mf_events_applied_total") - metric_sum(
                    before_u, "stream_mf_events_applied_total"
                )
                by = metric_sum(after_u, "stream_mf_model_log_bytes_total") - metric_sum(
                    before_u, "stream_mf_model_log_bytes_total"
                )
                arr = np.asarray(lat) if lat else np.asarray([np.nan])
                sm = "stream_mf_"
                fresh = f"{sm}freshness_seconds"

                def hq(
                    after: dict[str, float], before: dict[str, float], name: str, q: float
                ) -> float:
                    v = histogram_quantile(before, after, name, q)
                    return float("nan") if v is None else v

                store_bytes = metric_sum(after_u, "stream_mf_store_write_bytes_total") - metric_sum(
                    before_u, "stream_mf_store_write_bytes_total"
                )
                row = {
                    "rate": rate,
                    "backlog": known.backlog,
                    # the updater's rate while the probes ran (with --backlog: at full speed)
                    "probe_window_events_per_s": probe_events / max(w_probes - w0, 1e-9),
                    "store_bytes_per_event": store_bytes / ev if ev else float("nan"),
                    "achieved": load.sent / (w1 - w0 + 2.0),
                    "fresh_p50": quantile(after_q, before_q, fresh, 0.5),
                    "fresh_p99": quantile(after_q, before_q, fresh, 0.99),
                    "fresh_p50_interp": hq(after_q, before_q, fresh, 0.5),
                    "fresh_p99_interp": hq(after_q, before_q, fresh, 0.99),
                    "new_user_s": [round(float(x), 4) for x in arr],  # in probe order
                    "new_p50": float(np.percentile(arr, 50)),
                    "new_p99": float(np.percentile(arr, 99)),
                    "probes": len(lat),
                    "missed": missed,
                    "bytes_per_event": by / ev if ev else float("nan"),
                    "rtt": rtt,
                    # CPU of each process over the window (% of one core): the embedded broker
                    # lists every batch of a partition for each fetch that is behind its end
                    "cpu_pct": cpu_pct,
                    "legs": tracer.window(w0, w1),
                    "event_acked": load.acked_within(w0, w1),
                    "slow_turns": slow_turns(work / "updater.log", w0, w1),
                    # the processes' own histograms over the window (interpolated)
                    "updater_apply_p99_s": hq(after_u, before_u, f"{sm}batch_apply_seconds", 0.99),
                    "updater_write_p99_s": hq(after_u, before_u, f"{sm}batch_write_seconds", 0.99),
                    "publish_lag_p99_s": hq(after_u, before_u, f"{sm}model_log_publish_lag_seconds",
                                            0.99),
                    "reader_apply_p99_s": hq(after_q, before_q, f"{sm}model_refresh_seconds", 0.99),
                    # the query process's own handling of a request (received -> reply queued)
                    **{f"query_handle_{q}_s": hq(after_q, before_q,
                                                 f"{sm}query_latency_seconds", qv)
                       for q, qv in (("p50", 0.5), ("p99", 0.99))},
                    "batch_events_p50": hq(after_u, before_u, f"{sm}batch_events", 0.5),
                    # the updater's share split: the event's way in (producer, broker, fetch),
                    # then to its commit (the batch's linger, learning, the store write)
                    **{f"event_{leg}_{q}": hq(after_u, before_u, f"{sm}event_{leg}_seconds", qv)
                       for leg in ("fetch_age", "age")
                       for q, qv in (("p50", 0.5), ("p99", 0.99))},
                }  # fmt: skip
                if rtt:
                    e99, s99 = rtt["echo"]["total_ms"]["p99"], rtt["service"]["total_ms"]["p99"]
                    row["rtt_echo_p99_ms"], row["rtt_service_p99_ms"] = e99, s99
                    row["rtt_ratio_p99"] = s99 / e99 if e99 else float("nan")
                rows.append(row)
                ack = row["event_acked"]
                print(f"event -> acknowledged by the broker p50 {ack.get('p50_ms', 0):.0f} / "
                      f"p99 {ack.get('p99_ms', 0):.0f} ms", flush=True)  # fmt: skip
                print(
                    f"updater's share: event -> fetched p50 {row['event_fetch_age_p50']:.3f} / "
                    f"p99 {row['event_fetch_age_p99']:.3f} s; event -> committed p50 "
                    f"{row['event_age_p50']:.3f} / p99 {row['event_age_p99']:.3f} s",
                    flush=True,
                )
                cpu_line = ", ".join(f"{k} {v:.0f}" for k, v in cpu_pct.items())
                print(f"CPU % of one core over the window: {cpu_line}", flush=True)
                print(f"RocksDB write batches: {row['store_bytes_per_event']:,.0f} bytes/event",
                      flush=True)  # fmt: skip
                st = row["slow_turns"]
                print(f"updater turns over 250 ms: {st['turns']} ({st['events']} events), ms "
                      "summed: " + ", ".join(f"{k} {v:.0f}" for k, v in st.get("ms", {}).items()),
                      flush=True)  # fmt: skip
                print(orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY).decode(), flush=True)
            tracer.stop.set()
            tracer.t.join(5)
            client.close()
            if broker_pid is not None:
                result["broker_rss_bytes"] = rss_of(broker_pid)
    finally:
        children.stop_all()
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work dir kept: {work}")
    result["rates"] = rows
    print_table(
        f"model log: {n_users:,} users x {n_items:,} items, dim 64",
        rows,
        [
            Col("rate", "events/s", ","),
            Col("achieved", "achieved", ",.0f"),
            Col("fresh_p50", "freshness p50 s (bucket)", ".2f"),
            Col("fresh_p99", "freshness p99 s (bucket)", ".2f"),
            Col("new_p50", "new user p50 s", ".3f"),
            Col("new_p99", "new user p99 s", ".3f"),
            Col("probes", "probes", "d"),
            Col("rtt_echo_p99_ms", "echo p99 ms", ".0f"),
            Col("rtt_service_p99_ms", "service p99 ms", ".0f"),
            Col("rtt_ratio_p99", "ratio", ".2f"),
            Col("bytes_per_event", "log bytes/event", ",.0f"),
        ],
    )
    legs = [{"rate": r["rate"], **r.get("legs", {})} for r in rows]
    print_table(
        "where a commit's time goes (log tracer; events weighted, each commit's oldest event)",
        legs,
        [
            Col("rate", "events/s", ","),
            Col("events_per_commit", "events/commit", ",.0f"),
            Col("updater_p50_ms", "event->marker p50 ms", ".0f"),
            Col("updater_p99_ms", "p99", ".0f"),
            Col("log_p50_ms", "marker->tracer p50 ms", ".0f"),
            Col("log_p99_ms", "p99", ".0f"),
            Col("max_gap_between_commits_ms", "longest gap ms", ".0f"),
            Col("snapshots", "snapshots", "d"),
        ],
    )
    mem = result.get("memory", {})
    if mem:
        print(
            f"replica: RSS {mem['rss_bytes'] / 1e6:.0f} MB, a 1k-user model's process "
            f"{mem['fixed_rss_bytes'] / 1e6:.0f} MB, model {mem['model_bytes'] / 1e6:.1f} MB: "
            f"{mem['ratio_above_fixed']:.2f}x the model above the fixed overhead"
        )
    write_results("bench_modellog", result, args.out)


# ---- the demo's live traffic for minutes: the broker's memory and log bytes per event ----------


def soak(seconds: float, out: Path | None) -> None:
    """The demo (embedded broker, updater, two query processes, the MovieLens replay), then its
    live phase's traffic (~400 events/s stamped now, users live-0..499 on items 1..3000) for
    `seconds`, plus a `recommend` every 0.1 s; every 15 s the broker's resident memory and the
    model log's bytes over the events applied since the live traffic began."""
    from consumers.demo import _replay, _start_processes, _wait_until_learned, prepare_kernels
    from consumers.settings import TopicSettings
    from consumers.topics import product_topics

    work = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    topics = TopicSettings()
    procs: list[ManagedProcess] = []
    samples: list[dict[str, float]] = []
    result: dict[str, Any] = {"seconds": seconds}
    try:
        prepare_kernels(work)
        with EmbeddedBroker() as b:
            boot = b.bootstrap_servers
            create_topics(boot, product_topics(2, topics, interactions=1))
            ports = {name: free_port() for name in ("updater", "query-1", "query-2")}
            _start_processes(procs, work, boot, ports)
            kafka = KafkaSettings(bootstrap_servers=boot)
            sent, t0 = _replay(kafka, topics)
            _wait_until_learned(ports, sent, t0)
            up = f"http://127.0.0.1:{ports['updater']}/metrics"
            qs = [f"http://127.0.0.1:{ports[q]}/metrics" for q in ("query-1", "query-2")]
            base = scrape(up)
            qbase = [scrape(u) for u in qs]
            result["replayed"] = sent
            result["broker_rss_after_replay"] = rss_of(b.pid)
            producer = kafka_io.producer(kafka, **{"linger.ms": 5})
            client = RecClient(kafka, topics.requests, topics.responses)
            rng = np.random.default_rng(0)
            start = time.monotonic()
            next_sample = start
            next_ask = start
            live = 0
            asked = 0
            print(f"soak: {sent:,} replayed; live traffic for {seconds:.0f} s", flush=True)
            while time.monotonic() - start < seconds:
                for _ in range(20):
                    doc = {
                        "user_id": f"live-{rng.integers(500)}",
                        "item_id": str(rng.integers(1, 3000)),
                        "event_type": "click",
                        "timestamp": time.time(),
                    }
                    producer.produce(topics.interactions, value=orjson.dumps(doc))
                    live += 1
                producer.poll(0)
                now = time.monotonic()
                if now >= next_ask:
                    with contextlib.suppress(TimeoutError):
                        client.ask({"user_id": f"live-{rng.integers(500)}", "k": 10}, timeout=2)
                        asked += 1
                    next_ask = now + 0.1
                if now >= next_sample:
                    m = scrape(up)
                    ev = metric_sum(m, "stream_mf_events_applied_total") - metric_sum(
                        base, "stream_mf_events_applied_total"
                    )
                    by = metric_sum(m, "stream_mf_model_log_bytes_total") - metric_sum(
                        base, "stream_mf_model_log_bytes_total"
                    )
                    row = {
                        "t": now - start,
                        "events": ev,
                        "log_bytes": by,
                        "bytes_per_event": by / ev if ev else float("nan"),
                        "broker_rss": rss_of(b.pid),
                        "query_rss": max(rss_of(p.pid) for p in procs if "query" in p.name),
                        "snapshot_bytes": m.get("stream_mf_model_log_snapshot_bytes", 0.0),
                    }
                    samples.append(row)
                    print(
                        f"  {row['t']:5.0f} s  events {ev:9,.0f}  log {by / 1e6:8.1f} MB  "
                        f"{row['bytes_per_event']:6.0f} B/event  broker RSS "
                        f"{row['broker_rss'] / 1e6:6.0f} MB",
                        flush=True,
                    )
                    next_sample = now + 15.0
                time.sleep(max(0.0, 0.05 - (time.monotonic() - now)))
            kafka_io.close_producer(producer, 10)
            time.sleep(2.0)
            client.close()
            fresh = [
                histogram_quantile(qb, scrape(u), "stream_mf_freshness_seconds", 0.99)
                for u, qb in zip(qs, qbase, strict=True)
            ]
            result.update(
                live_events=live,
                requests=asked,
                freshness_p99=max((f for f in fresh if f is not None), default=None),
                samples=samples,
                broker_rss_end=rss_of(b.pid),
            )
    finally:
        for p in procs:
            p.stop()
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
    last = samples[-1] if samples else {}
    rss0, rss1 = result.get("broker_rss_after_replay", 0), result.get("broker_rss_end", 0)
    print(
        f"soak over {seconds:.0f} s: broker RSS {rss0 / 1e6:.0f} MB after the replay -> "
        f"{rss1 / 1e6:.0f} MB; model log {last.get('bytes_per_event', float('nan')):.0f} "
        "bytes per live event"
    )
    write_results("bench_modellog_soak", result, out)


if __name__ == "__main__":
    main()
