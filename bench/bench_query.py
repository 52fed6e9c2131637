"""Query-service latency: one `stream-mf query` process under a fixed request rate, beside the
broker's bare round trip measured in the same run.

    PYTHONPATH=. .venv/bin/python bench/bench_query.py [--quick] [--rate 500] [--duration 30]
    PYTHONPATH=. .venv/bin/python bench/bench_query.py --compare REV [--rate 100] [--rounds 4]

Builds a model of 50k items x 64 factors with the real updater (a planted stream plus one event
per item, so every item has a vector; live evaluation off, which leaves the model unchanged), stops
the updater, starts one query process and, beside it, a bare echo process (this file with
`--echo-child`): the service's own request consumer and reply producer (`consumers.query`), same
settings and loop shape, which replies at once without a model. Both stay up throughout, so each
phase pays for the other's idle fetches alike.

Each phase sends `recommend` requests (k=10, known users) at a fixed rate from this process with
the client settings `RecClient` uses (`consumers.client`), each with `sent_at` and a `reply_to`
header, first for a warm-up (excluded, reported apart), then for the measured window. Per request,
on one clock: total = reply received - sent_at, request leg = the reply's `generated_at` - sent_at,
reply leg = received - `generated_at`. The service's own `stream_mf_query_latency_seconds` and
`stream_mf_request_to_reply_seconds` histograms are read from /metrics at the start of the window
and after it (quantiles interpolated within buckets, as Prometheus does). Phases alternate echo,
service for each client setting in `--client` (FETCH_WAIT_MS:LINGER_MS). Target: p99 < 20 ms.
Every process is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from bench_ingest import (
    Children,
    bootstrap_servers,
    cpu_seconds,
    payloads_of,
    start_pyspy,
    stop_pyspy,
    try_scrape,
)
from common import (
    BLAS_THREAD_VARS,
    ROOT,
    Col,
    compare_summary,
    in_tree,
    print_table,
    rev_label,
    round_order,
    source_tree,
    write_results,
)
from confluent_kafka import OFFSET_END, TopicPartition

from consumers import kafka_io
from consumers.client import (
    FETCH_WAIT_MS,
    LINGER_MS,
    RecClient,
    reply_consumer,
    request_producer,
)
from consumers.local_broker import free_port
from consumers.processes import ManagedProcess, metric_sum
from consumers.publish import publish
from consumers.query import REPLY_LINGER_MS, reply_producer, request_consumer
from consumers.settings import KafkaSettings, QuerySettings
from consumers.topics import create_topics
from tests.synthetic import PlantedStream, planted_stream

N_ITEMS = 50_000
MODEL_FLAGS = ("--dim", "64", "--n-negatives", "4")
TARGET_P99_MS = 20.0
HISTOGRAMS = ("stream_mf_query_latency_seconds", "stream_mf_request_to_reply_seconds")


def build_stream(n_planted: int, n_users: int, seed: int = 0) -> PlantedStream:
    """A planted stream, then one event per item (random users), so all 50k items exist."""
    s = planted_stream(n_planted, n_users=n_users, n_items=N_ITEMS, n_groups=20, seed=seed)
    rng = np.random.default_rng(seed + 1)
    sweep_items = rng.permutation(N_ITEMS).astype(np.int32)
    sweep_users = rng.integers(0, n_users, N_ITEMS).astype(np.int32)
    t_end = float(s.times[-1])
    sweep_times = t_end + np.arange(1, N_ITEMS + 1, dtype=np.float64) * 1e-3
    return PlantedStream(
        np.concatenate([s.users, sweep_users]),
        np.concatenate([s.items, sweep_items]),
        np.concatenate([s.times, sweep_times]),
        s.user_group,
        s.item_group,
    )


def build_model(
    children: Children,
    bootstrap: str,
    env: dict[str, str],
    state: Path,
    work: Path,
    n: int,
    timeout: float,
    tree: Path | None = None,
) -> dict[str, Any]:
    """Run the updater until every event is applied and every item known; then stop it.

    `tree`: that checkout's updater (`--compare`), else this one's."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    argv = [
        "updater",
        "--bootstrap-servers",
        bootstrap,
        "--state-dir",
        str(state),
        "--metrics-port",
        str(port),
        *MODEL_FLAGS,
    ]
    env = {**env, "STREAM_MF_LIVE_EVAL_RATE": "0", "STREAM_MF_RESTORE": "false"}
    p = ManagedProcess(f"updater-{uuid.uuid4().hex[:4]}", argv, work, env=env)
    if tree is not None:
        p.env, p.cwd = in_tree(p.env, tree), tree
    children.start(p)
    t0 = time.perf_counter()
    end = time.monotonic() + timeout
    try:
        while True:
            if not p.alive():
                raise RuntimeError(f"updater exited:\n{p.log_tail()}")
            got = try_scrape(url) or {}
            applied = metric_sum(got, "stream_mf_events_applied_total")
            items = metric_sum(got, "stream_mf_items_known")
            if applied >= n and items >= N_ITEMS:
                break
            if time.monotonic() > end:
                raise TimeoutError(f"model build: {applied:.0f}/{n} events, {items:.0f} items")
            time.sleep(0.25)
    finally:
        children.stop(p)
    return {"events": n, "items": int(items), "seconds": time.perf_counter() - t0}


def wait_for_query(client: RecClient, user: str, proc: ManagedProcess, timeout: float) -> float:
    """Ask until the service gives a personalized answer; returns the seconds it took."""
    t0 = time.perf_counter()
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not proc.alive():
            raise RuntimeError(f"query exited:\n{proc.log_tail()}")
        try:
            r = client.ask({"user_id": user, "k": 10}, timeout=3)
        except TimeoutError:
            continue
        if r.error is None and r.strategy == "personalized":
            return time.perf_counter() - t0
        time.sleep(0.2)
    raise TimeoutError(f"no personalized answer within {timeout}s:\n{proc.log_tail()}")


def run_load(
    bootstrap: str,
    requests: str,
    responses: str,
    users: np.ndarray,
    rate: float,
    warmup: float,
    duration: float,
    fetch_wait_ms: int,
    linger_ms: float,
    on_window: Callable[[], None] | None = None,
    raw: bool = False,
) -> dict[str, Any]:
    """Send `rate` requests/s for `warmup` + `duration` s; latencies (ms) of the requests sent
    in the measured window, and apart those of the warm-up. `on_window` runs as the window
    opens (reads the service's counters there); `raw` adds every latency (`total_raw_ms`), for
    callers that pool several runs."""
    ks = KafkaSettings(bootstrap_servers=bootstrap)
    producer = request_producer(ks, linger_ms)
    consumer = reply_consumer(ks, fetch_wait_ms)
    consumer.assign([TopicPartition(responses, 0, OFFSET_END)])
    consumer.consume(1, 0.5)  # establish the fetch position before the first request
    headers = [("reply_to", responses.encode())]
    n_warm = int(rate * warmup)
    total_n = n_warm + int(rate * duration)
    tag = uuid.uuid4().hex[:8]
    sent: dict[str, float] = {}
    total, req_leg, reply_leg, sent_rel, warm = [], [], [], [], []
    strategies: Counter[str] = Counter()
    errors = 0
    rng = np.random.default_rng(3)
    picks = users[rng.integers(0, users.size, total_n)].tolist()
    i = 0
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    t_window = t0 + n_warm / rate
    drain_end = float("inf")
    send_wall = duration
    try:
        while i < total_n or (sent and time.perf_counter() < drain_end):
            now = time.perf_counter()
            due = t0 + i / rate
            if i < total_n and now >= due:
                if i == n_warm:
                    if on_window is not None:
                        on_window()
                    cpu0 = time.process_time()
                    t_window = time.perf_counter()
                uid = f"u{picks[i]}"
                rid = f"{tag}-{i}"
                at = time.time()
                req = {
                    "request_id": rid,
                    "kind": "recommend",
                    "user_id": uid,
                    "k": 10,
                    "sent_at": at,
                }
                producer.produce(
                    requests, key=uid.encode(), value=orjson.dumps(req), headers=headers
                )
                producer.poll(0)
                sent[rid] = at
                i += 1
                if i == total_n:
                    send_wall = time.perf_counter() - t_window
                    drain_end = time.perf_counter() + 10.0
                continue
            wait = min(due - now, 0.005) if i < total_n else 0.05
            m = consumer.poll(max(wait, 0.0))
            if m is None or m.error() is not None:
                continue
            received = time.time()
            cid = kafka_io.headers_dict(m.headers()).get("correlation_id", b"").decode()
            at = sent.pop(cid, None)
            if at is None:
                continue
            seq = int(cid.rsplit("-", 1)[1])
            if seq < n_warm:
                warm.append(received - at)
                sent_rel.append(seq / rate)
                continue
            doc = orjson.loads(m.value())
            if doc.get("error"):
                errors += 1
            strategies[str(doc.get("strategy"))] += 1
            gen = float(doc.get("generated_at") or received)
            total.append(received - at)
            sent_rel.append(seq / rate)
            req_leg.append(gen - at)
            reply_leg.append(received - gen)
        wall = time.perf_counter() - t_window
    finally:
        producer.flush(5.0)
        consumer.close()
    lost = sum(1 for k in sent if int(k.rsplit("-", 1)[1]) >= n_warm)
    all_ms = np.asarray(warm + total) * 1e3
    return {
        "client_fetch_wait_ms": fetch_wait_ms,
        "client_linger_ms": linger_ms,
        "warmup_s": warmup,
        "warmup_sent": n_warm,
        "warmup_ms": summarize(np.asarray(warm) * 1e3),
        "sent": total_n - n_warm,
        "answered": len(total),
        "lost": lost,
        "errors": errors,
        "strategies": dict(strategies),
        "achieved_rate": (total_n - n_warm) / send_wall,
        "load_wall_s": wall,
        "total_ms": summarize(np.asarray(total) * 1e3),
        **(
            {
                "total_raw_ms": [x * 1e3 for x in total],
                "request_leg_raw_ms": [x * 1e3 for x in req_leg],
                "reply_leg_raw_ms": [x * 1e3 for x in reply_leg],
            }
            if raw
            else {}
        ),
        "request_leg_ms": summarize(np.asarray(req_leg) * 1e3),
        "reply_leg_ms": summarize(np.asarray(reply_leg) * 1e3),
        "client_cpu_s": time.process_time() - cpu0,
        "timeline": timeline(np.asarray(sent_rel) - warmup, all_ms),
    }


def echo_child() -> int:
    """The bare round trip: the service's consumer, producer and loop shape, no model.

    Reads the same `QuerySettings` (environment) as `stream-mf query`; replies to each request
    on its `reply_to` topic with `correlation_id`, an empty item list and `generated_at`.
    """
    settings = QuerySettings()
    stop = kafka_io.StopFlag().install()
    # BENCH_ECHO_FOLLOWS=1 (bench_modellog --echo-follows): the echo also follows the model
    # log on a thread, as the service does, and still answers without it: what the process
    # around the loop costs a request, apart from the work of answering it
    follower = None
    if os.environ.get("BENCH_ECHO_FOLLOWS") == "1":
        from consumers.model_log import ModelFollower

        follower = ModelFollower(settings)
        follower.start()
    consumer = request_consumer(settings)
    producer = reply_producer(settings)
    consumer.subscribe([settings.topics.requests])
    try:
        while not stop:
            for m in kafka_io.drain(consumer, 500, 0.05):
                if m.error() is not None:
                    continue
                headers = kafka_io.headers_dict(m.headers())
                reply_to = headers.get("reply_to", b"").decode() or settings.topics.responses
                doc = orjson.loads(m.value() or b"{}")
                rid = str(doc.get("request_id", "unknown"))
                reply = {
                    "request_id": rid,
                    "user_id": doc.get("user_id"),
                    "items": [],
                    "strategy": "none",
                    "model_version": 0,
                    "generated_at": time.time(),
                    "error": None,
                }
                producer.produce(
                    reply_to,
                    key=m.key(),
                    value=orjson.dumps(reply),
                    headers=[("correlation_id", rid.encode())],
                )
                consumer.store_offsets(message=m)
            producer.poll(0)
    finally:
        producer.flush(5.0)
        consumer.close()
        if follower is not None:
            follower.close()
    return 0


def start_echo(
    children: Children, work: Path, bootstrap: str, env: dict[str, str]
) -> ManagedProcess:
    """The echo process (this file, `--echo-child`), stopped by PID like the product's."""
    echo_env = {**env, "STREAM_MF_KAFKA__BOOTSTRAP_SERVERS": bootstrap}
    script = Path(__file__).resolve()
    return children.start(ManagedProcess("echo", ["--echo-child"], work, echo_env, script=script))


def wait_for_echo(
    bootstrap: str, requests: str, responses: str, p: ManagedProcess, timeout: float
) -> float:
    """Ask until the echo answers (its group join done); returns the seconds it took."""
    client = RecClient(KafkaSettings(bootstrap_servers=bootstrap), requests, responses)
    t0 = time.perf_counter()
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            if not p.alive():
                raise RuntimeError(f"echo exited:\n{p.log_tail()}")
            try:
                client.ask({"user_id": "u0", "k": 10}, timeout=3)
                return time.perf_counter() - t0
            except TimeoutError:
                continue
    finally:
        client.close()
    raise TimeoutError(f"no echo within {timeout}s")


def timeline(at_s: np.ndarray, ms: np.ndarray) -> list[dict[str, float]]:
    """p50 / max latency of the requests sent in each second of the load (queue growth shows)."""
    out = []
    sec = at_s.astype(np.int64) if at_s.size else at_s
    for t in np.unique(sec).tolist():
        sel = ms[sec == t]
        out.append(
            {"second": t, "n": int(sel.size), "p50": float(np.median(sel)), "max": float(sel.max())}
        )
    return out


def drain(url: str, proc: ManagedProcess, timeout: float) -> dict[str, float]:
    """Wait until the service has been idle for 1 s (no backlog left for the next phase)."""
    end = time.monotonic() + timeout
    last, since = -1.0, time.monotonic()
    got: dict[str, float] = {}
    while time.monotonic() < end and proc.alive():
        got = try_scrape(url) or got
        done = metric_sum(got, "stream_mf_requests_total") + metric_sum(
            got, "stream_mf_requests_expired_total"
        )
        if done != last:
            last, since = done, time.monotonic()
        elif time.monotonic() - since >= 1.0:
            break
        time.sleep(0.2)
    return got


def hotspots(raw: Path, top: int = 14) -> dict[str, float]:
    """Share of the query loop's samples by innermost project frame (+ the library it is in)."""
    if not raw.exists():
        return {}
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if "run (consumers/query.py" not in stack or not n.isdigit():
            continue  # not the request loop
        frames = [f for f in stack.split(";") if " (" in f]
        own = [f for f in frames if "consumers/" in f or "stream_mf/" in f]
        key = own[-1].rsplit(":", 1)[0] + ")" if own else "other"
        leaf = frames[-1] if frames else ""
        if own and leaf != own[-1]:
            lib = leaf.partition(" (")[2].split("/", 1)[0]
            key += f" -> {lib}"
        counts[key] += int(n)
    total = sum(counts.values())
    return {k: v / total for k, v in counts.most_common(top)} if total else {}


def summarize(ms: np.ndarray) -> dict[str, float] | None:
    if ms.size == 0:
        return None
    p50, p90, p99 = np.percentile(ms, [50, 90, 99]).tolist()
    return {"p50": p50, "p90": p90, "p99": p99, "max": float(ms.max()), "mean": float(ms.mean())}


def bucket_counts(samples: dict[str, float], name: str) -> dict[float, float]:
    """Cumulative bucket counts (le -> count) of a histogram, summed over its label sets."""
    out: dict[float, float] = {}
    prefix = f"{name}_bucket{{"
    for key, v in samples.items():
        if key.startswith(prefix):
            le = key.split('le="', 1)[1].split('"', 1)[0]
            b = float("inf") if le == "+Inf" else float(le)
            out[b] = out.get(b, 0.0) + v
    return out


def hist_quantiles(before: dict[float, float], after: dict[float, float]) -> dict[str, Any]:
    """Quantiles (ms) of the observations between two scrapes, linear within a bucket."""
    les = sorted(after)
    cum = [after[b] - before.get(b, 0.0) for b in les]
    n = cum[-1] if cum else 0.0
    out: dict[str, Any] = {"count": int(n)}
    if n <= 0:
        return out
    for q in (0.5, 0.9, 0.99):
        rank = q * n
        j = next(k for k, c in enumerate(cum) if c >= rank)
        hi = les[j]
        lo = les[j - 1] if j else 0.0
        below = cum[j - 1] if j else 0.0
        if hi == float("inf"):
            out[f"p{round(q * 100)}"] = lo * 1e3  # beyond the last finite bound: a lower bound
            continue
        inside = cum[j] - below
        frac = (rank - below) / inside if inside > 0 else 1.0
        out[f"p{round(q * 100)}"] = (lo + (hi - lo) * frac) * 1e3
    out["buckets_ms"] = {
        ("+Inf" if b == float("inf") else b * 1e3): c for b, c in zip(les, cum, strict=True)
    }
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller model build, 6 s of load")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/)")
    ap.add_argument("--rate", type=float, default=None, help="requests/s (500; --compare: 100)")
    ap.add_argument(
        "--duration", type=float, default=None, help="measured seconds per phase (30; quick 6)"
    )
    ap.add_argument(
        "--warmup", type=float, default=None, help="excluded seconds before each (5; quick 2)"
    )
    ap.add_argument(
        "--client",
        nargs="+",
        default=None,
        metavar="WAIT:LINGER",
        help="client fetch.wait.max.ms:linger.ms, one echo + service pair per value "
        f"(default: {FETCH_WAIT_MS}:{LINGER_MS:g} 10:0, the earlier client; quick: the first)",
    )
    ap.add_argument(
        "--service-fetch-wait-ms",
        type=int,
        default=None,
        help="STREAM_MF_FETCH_WAIT_MS for the query and echo processes (default: the setting's)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, state)")
    ap.add_argument(
        "--blas-threads",
        type=int,
        default=None,
        help="OPENBLAS/OMP/MKL_NUM_THREADS for the query process (default: inherited)",
    )
    ap.add_argument(
        "--profile", action="store_true", help="py-spy the query process during its first phase"
    )
    ap.add_argument(
        "--compare",
        metavar="REV",
        default=None,
        help="only: today's updater and query service against git revision REV's, alternating "
        "load phases at --rate, same broker",
    )
    ap.add_argument(
        "--compare-tree",
        type=Path,
        default=None,
        help="with --compare: REV is checked out here (default: a temporary git archive)",
    )
    ap.add_argument("--rounds", type=int, default=4, help="--compare: load phases per side")
    return ap.parse_args(argv)


def client_settings(values: Sequence[str]) -> list[tuple[int, float]]:
    out = []
    for v in values:
        wait, _, linger = v.partition(":")
        out.append((int(wait), float(linger or LINGER_MS)))
    return out


def has_model_log(tree: Path) -> bool:
    """Whether the checkout's query process follows the model log (else a RocksDB secondary
    over the updater's state dir: the design before the model log)."""
    return (tree / "consumers" / "model_log.py").exists()


def compare_main(args: argparse.Namespace) -> int:
    """`--compare REV`: REV's updater and query service beside today's on one broker.

    Each side builds its model from the same pre-published stream with its own updater (in
    turn, not at once), then both query services stay up while load phases alternate (ABBA) at
    `--rate` with the default client settings: what a user sees, request to reply. A side whose
    query process has no model log reads the updater's RocksDB state dir as a secondary.
    """
    # short phases at 100 req/s: the embedded broker's CPU per request grows over a run, and
    # 500 req/s or 20 s phases saturated it for both sides (bench/README.md)
    args.rate = args.rate or 100.0
    duration = args.duration or (6.0 if args.quick else 8.0)
    warmup = args.warmup if args.warmup is not None else 2.0
    fw, linger = FETCH_WAIT_MS, LINGER_MS
    n_planted, n_users = (50_000, 5_000) if args.quick else (200_000, 20_000)
    work = Path(tempfile.mkdtemp(prefix="bench-query-cmp-"))
    children = Children()
    t_all = time.perf_counter()
    rev = rev_label(args.compare)
    result: dict[str, Any] = {
        "quick": args.quick,
        "rate": args.rate,
        "duration_s": duration,
        "warmup_s": warmup,
        "client_fetch_wait_ms": fw,
        "client_linger_ms": linger,
        "old_rev": rev,
        "new_rev": rev_label("HEAD"),
        "rounds": args.rounds,
    }
    phases: list[dict[str, Any]] = []
    try:
        s = build_stream(n_planted, n_users)
        payloads = payloads_of(s)
        known = np.unique(s.users)
        with (
            source_tree(args.compare, args.compare_tree) as old_tree,
            bootstrap_servers() as (bootstrap, broker_pid),
        ):
            trees = {"old": old_tree, "new": ROOT}
            tag = uuid.uuid4().hex[:8]
            shared = {
                "STREAM_MF_TOPICS__INTERACTIONS": f"bench-qc-interactions-{tag}",
                "STREAM_MF_TOPICS__DEAD_LETTER": f"bench-qc-interactions-{tag}.DLT",
                "STREAM_MF_SESSION_TIMEOUT_MS": "6000",
            }
            envs: dict[str, dict[str, str]] = {}
            for side, tree in trees.items():
                envs[side] = {
                    **shared,
                    "STREAM_MF_TOPICS__REQUESTS": f"bench-qc-requests-{side}-{tag}",
                    "STREAM_MF_TOPICS__RESPONSES": f"bench-qc-responses-{side}-{tag}",
                }
                if has_model_log(tree):
                    envs[side]["STREAM_MF_TOPICS__MODEL"] = f"bench-qc-model-{side}-{tag}"
            create_topics(
                bootstrap,
                {
                    t: 1
                    for e in envs.values()
                    for k, t in e.items()
                    if k.startswith("STREAM_MF_TOPICS__")
                },
            )
            ks = KafkaSettings(bootstrap_servers=bootstrap)
            sent = publish(
                kafka_io.producer(ks),
                shared["STREAM_MF_TOPICS__INTERACTIONS"],
                payloads,
                progress=False,
            )
            if sent != len(payloads):
                raise RuntimeError(f"only {sent}/{len(payloads)} events delivered")
            procs: dict[str, ManagedProcess] = {}
            urls: dict[str, str] = {}
            result["design"] = {}
            result["model"] = {}
            result["ready_s"] = {}
            for side, tree in trees.items():
                state = work / f"state-{side}"
                env = {**envs[side], "STREAM_MF_GROUP_ID": f"bench-qc-updater-{side}-{tag}"}
                result["model"][side] = build_model(
                    children, bootstrap, env, state, work, sent, 240, tree=tree
                )
                port = free_port()
                urls[side] = f"http://127.0.0.1:{port}/metrics"
                argv_q = ["query", "--bootstrap-servers", bootstrap, "--metrics-port", str(port)]
                log_based = has_model_log(tree)
                result["design"][side] = (
                    "model log on Kafka" if log_based else "RocksDB secondary of the state dir"
                )
                if not log_based:
                    argv_q += ["--state-dir", str(state)]
                q_env = {**envs[side], "STREAM_MF_GROUP_ID": f"bench-qc-query-{side}-{tag}"}
                t0 = time.perf_counter()
                q = ManagedProcess(f"query-{side}", argv_q, work, env=q_env)
                q.env, q.cwd = in_tree(q.env, tree), tree
                procs[side] = children.start(q)
                client = RecClient(
                    ks,
                    envs[side]["STREAM_MF_TOPICS__REQUESTS"],
                    envs[side]["STREAM_MF_TOPICS__RESPONSES"],
                )
                try:
                    wait_for_query(client, f"u{known[0]}", q, 90)
                finally:
                    client.close()
                result["ready_s"][side] = time.perf_counter() - t0
                print(
                    f"{side} ({result['design'][side]}): model in "
                    f"{result['model'][side]['seconds']:.1f} s, query ready in "
                    f"{result['ready_s'][side]:.1f} s",
                    flush=True,
                )
            for r in range(args.rounds):
                for side in round_order(r):
                    marks: dict[str, Any] = {}
                    q, url = procs[side], urls[side]

                    def window_opens(
                        marks: dict[str, Any] = marks, url: str = url, pid: int = q.pid
                    ) -> None:
                        marks["before"] = try_scrape(url) or {}
                        marks["cpu"] = cpu_seconds(pid)
                        marks["broker_cpu"] = cpu_seconds(broker_pid)
                        marks["t"] = time.perf_counter()

                    ph = run_load(
                        bootstrap,
                        envs[side]["STREAM_MF_TOPICS__REQUESTS"],
                        envs[side]["STREAM_MF_TOPICS__RESPONSES"],
                        known,
                        args.rate,
                        warmup,
                        duration,
                        fw,
                        linger,
                        on_window=window_opens,
                    )
                    b1, t1 = cpu_seconds(broker_pid), time.perf_counter()
                    after = drain(url, q, timeout=30.0)
                    cpu1 = cpu_seconds(q.pid)
                    b0 = marks.get("broker_cpu")
                    # the broker's share of a core over the window: near 1, it is the bottleneck
                    ph["broker_cpu_share"] = (
                        (b1 - b0) / (t1 - marks["t"]) if b0 is not None and b1 is not None else None
                    )
                    ph.pop("timeline", None)
                    ph["round"], ph["side"] = r, side
                    ph["query_cpu_ms_per_request"] = (
                        1e3 * (cpu1 - marks["cpu"]) / max(ph["answered"], 1)
                        if cpu1 is not None and marks.get("cpu") is not None
                        else None
                    )
                    before = marks.get("before", {})
                    for h in HISTOGRAMS:
                        ph[h] = hist_quantiles(bucket_counts(before, h), bucket_counts(after, h))
                    phases.append(ph)
                    t = ph["total_ms"] or {}
                    print(
                        f"round {r} {side}: p50 {t.get('p50', 0):.1f} ms, p99 "
                        f"{t.get('p99', 0):.1f} ms, answered {ph['answered']}/{ph['sent']}, "
                        f"{ph['strategies']}",
                        flush=True,
                    )
            for p in procs.values():
                children.stop(p)
    finally:
        children.stop_all()
        if args.keep:
            print(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    result["phases"] = phases

    def per_side(fn: Callable[[dict[str, Any]], float | None]) -> dict[str, list[float]]:
        return {
            side: [float(fn(ph) or float("nan")) for ph in phases if ph["side"] == side]
            for side in ("old", "new")
        }

    result["summary"] = {
        f"total_{q}_ms": compare_summary(
            per_side(lambda ph, q=q: (ph["total_ms"] or {}).get(q)), higher_is_better=False
        )
        for q in ("p50", "p90", "p99", "mean")
    }
    result["summary"]["service_p99_ms"] = compare_summary(
        per_side(lambda ph: ph[HISTOGRAMS[0]].get("p99")), higher_is_better=False
    )
    result["summary"]["query_cpu_ms_per_request"] = compare_summary(
        per_side(lambda ph: ph["query_cpu_ms_per_request"]), higher_is_better=False
    )
    result["wall_s"] = time.perf_counter() - t_all
    report_compare(result)
    write_results("bench_query_compare", result, args.out)
    return 0


def report_compare(result: dict[str, Any]) -> None:
    rows = []
    for ph in result["phases"]:
        t = ph["total_ms"] or {}
        rows.append(
            {
                "round": ph["round"],
                "side": ph["side"],
                "n": ph["answered"],
                "lost": ph["lost"],
                **{k: t.get(k) for k in ("p50", "p90", "p99", "max")},
                "svc_p99": ph[HISTOGRAMS[0]].get("p99"),
                "cpu": ph["query_cpu_ms_per_request"],
                "broker": ph.get("broker_cpu_share"),
            }
        )
    print_table(
        f"request -> reply at the client (ms), {result['rate']:.0f} req/s, "
        f"{result['duration_s']:g} s measured after {result['warmup_s']:g} s warm-up per phase; "
        f"old {result['old_rev']} ({result['design']['old']}), new {result['new_rev']} "
        f"({result['design']['new']}); alternating (ABBA)",
        rows,
        [
            Col("round", "round"),
            Col("side", "code"),
            Col("n", "n"),
            Col("lost", "lost"),
            Col("p50", "p50", ".2f"),
            Col("p90", "p90", ".2f"),
            Col("p99", "p99", ".2f"),
            Col("max", "max", ".1f"),
            Col("svc_p99", "service p99", ".2f"),
            Col("cpu", "query CPU ms/req", ".2f"),
            Col("broker", "broker cores", ".2f"),
        ],
    )
    rows = []
    for key, c in result["summary"].items():
        rows.append(
            {
                "what": key,
                "old": c["median_old"],
                "new": c["median_new"],
                "ratio": c["new_over_old"],
                "spread": f"{c['ratio_min']:.2f}-{c['ratio_max']:.2f}",
            }
        )
    print_table(
        "medians over the phases; new/old (per-round range)",
        rows,
        [
            Col("what", "figure"),
            Col("old", "old", ".2f"),
            Col("new", "new", ".2f"),
            Col("ratio", "new/old", ".3f"),
            Col("spread", "per round"),
        ],
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compare:
        return compare_main(args)
    args.rate = args.rate or 500.0
    duration = args.duration or (6.0 if args.quick else 30.0)
    warmup = args.warmup if args.warmup is not None else (2.0 if args.quick else 5.0)
    clients = client_settings(args.client or [f"{FETCH_WAIT_MS}:{LINGER_MS:g}", "10:0"])
    if args.quick and not args.client:
        clients = clients[:1]
    n_planted, n_users = (50_000, 5_000) if args.quick else (200_000, 20_000)
    work = Path(tempfile.mkdtemp(prefix="bench-query-"))
    children = Children()
    t_all = time.perf_counter()
    result: dict[str, Any] = {
        "quick": args.quick,
        "rate": args.rate,
        "duration_s": duration,
        "warmup_s": warmup,
        "service_fetch_wait_ms": args.service_fetch_wait_ms or QuerySettings().fetch_wait_ms,
        "service_reply_linger_ms": REPLY_LINGER_MS,
    }
    try:
        s = build_stream(n_planted, n_users)
        payloads = payloads_of(s)
        known = np.unique(s.users)
        with bootstrap_servers() as (bootstrap, broker_pid):
            tag = uuid.uuid4().hex[:8]
            topics = {
                "STREAM_MF_TOPICS__INTERACTIONS": f"bench-q-interactions-{tag}",
                "STREAM_MF_TOPICS__DEAD_LETTER": f"bench-q-interactions-{tag}.DLT",
                "STREAM_MF_TOPICS__REQUESTS": f"bench-q-requests-{tag}",
                "STREAM_MF_TOPICS__RESPONSES": f"bench-q-responses-{tag}",
                "STREAM_MF_TOPICS__MODEL": f"bench-q-model-{tag}",
                "STREAM_MF_SESSION_TIMEOUT_MS": "6000",
            }
            if args.service_fetch_wait_ms is not None:
                topics["STREAM_MF_FETCH_WAIT_MS"] = str(args.service_fetch_wait_ms)
            echo_req = f"bench-q-echo-requests-{tag}"
            create_topics(
                bootstrap,
                {
                    echo_req: 1,
                    **{t: 1 for k, t in topics.items() if k.startswith("STREAM_MF_TOPICS__")},
                },
            )
            ks = KafkaSettings(bootstrap_servers=bootstrap)
            req_t, resp_t = (
                topics["STREAM_MF_TOPICS__REQUESTS"],
                topics["STREAM_MF_TOPICS__RESPONSES"],
            )
            sent = publish(
                kafka_io.producer(ks),
                topics["STREAM_MF_TOPICS__INTERACTIONS"],
                payloads,
                progress=False,
            )
            if sent != len(payloads):
                raise RuntimeError(f"only {sent}/{len(payloads)} events delivered")
            state = work / "state"
            result["model"] = build_model(
                children,
                bootstrap,
                topics,
                state,
                work,
                len(payloads),
                timeout=60 if args.quick else 240,
            )
            print(
                f"model: {result['model']['items']:,} items x 64 from {sent:,} events "
                f"in {result['model']['seconds']:.1f}s",
                flush=True,
            )
            port = free_port()
            url = f"http://127.0.0.1:{port}/metrics"
            argv_q = [
                "query",
                "--bootstrap-servers",
                bootstrap,
                "--metrics-port",
                str(port),
            ]
            q_env = dict(topics)
            if args.blas_threads:
                q_env.update({k: str(args.blas_threads) for k in BLAS_THREAD_VARS})
            result["query_blas_threads"] = args.blas_threads or os.environ.get(
                "OPENBLAS_NUM_THREADS", "default"
            )
            t_start = time.perf_counter()
            q = children.start(ManagedProcess("query", argv_q, work, env=q_env))
            client = RecClient(ks, req_t, resp_t)
            try:
                wait_for_query(client, f"u{known[0]}", q, 60)
            finally:
                client.close()
            result["query_ready_s"] = time.perf_counter() - t_start
            echo_env = {
                **topics,
                "STREAM_MF_TOPICS__REQUESTS": echo_req,
                "STREAM_MF_GROUP_ID": f"bench-q-echo-{tag}",
            }
            t_start = time.perf_counter()
            echo = start_echo(children, work, bootstrap, echo_env)
            wait_for_echo(bootstrap, echo_req, resp_t, echo, 60)
            result["echo_ready_s"] = time.perf_counter() - t_start
            print(
                f"ready (start to first answer, group join included): query "
                f"{result['query_ready_s']:.1f} s, echo {result['echo_ready_s']:.1f} s",
                flush=True,
            )
            phases = []
            for fw, linger in clients:
                for target in ("echo", "service"):
                    marks: dict[str, Any] = {}

                    def window_opens(marks: dict[str, Any] = marks) -> None:
                        marks["before"] = try_scrape(url) or {}
                        marks["cpu"] = (cpu_seconds(q.pid), cpu_seconds(echo.pid))
                        marks["bcpu"] = cpu_seconds(broker_pid)

                    profiled = (
                        args.profile
                        and target == "service"
                        and not any(p["target"] == "service" for p in phases)
                    )
                    spy_out = work / f"pyspy-query-{fw}-{linger:g}.txt"
                    spy = start_pyspy(children, q.pid, spy_out) if profiled else None
                    try:
                        ph = run_load(
                            bootstrap,
                            req_t if target == "service" else echo_req,
                            resp_t,
                            known,
                            args.rate,
                            warmup,
                            duration,
                            fw,
                            linger,
                            on_window=window_opens,
                        )
                    finally:
                        if spy is not None:
                            stop_pyspy(spy)
                    ph["target"] = target
                    if spy is not None:
                        ph["profile"] = hotspots(spy_out)
                    after = drain(url, q, timeout=30.0)
                    ph["window_cpu_s"] = phase_cpu(marks, q.pid, echo.pid, broker_pid)
                    if target == "service":
                        before = marks.get("before", {})
                        for h in HISTOGRAMS:
                            ph[h] = hist_quantiles(
                                bucket_counts(before, h), bucket_counts(after, h)
                            )
                        ph["expired"] = metric_sum(
                            after, "stream_mf_requests_expired_total"
                        ) - metric_sum(before, "stream_mf_requests_expired_total")
                    phases.append(ph)
                    t = ph["total_ms"] or {}
                    print(
                        f"{target:7s} client wait {fw} ms, linger {linger:g} ms: "
                        f"p50 {t.get('p50', 0):.1f} ms, p99 {t.get('p99', 0):.1f} ms, "
                        f"answered {ph['answered']}/{ph['sent']}",
                        flush=True,
                    )
            result["phases"] = phases
            children.stop(echo)
            children.stop(q)
    finally:
        children.stop_all()
        if args.keep:
            print(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    result["wall_s"] = time.perf_counter() - t_all
    result["target_p99_ms"] = TARGET_P99_MS
    services = [ph for ph in result["phases"] if ph["target"] == "service"]
    result["target_met"] = {
        f"{ph['client_fetch_wait_ms']}:{ph['client_linger_ms']:g}": (ph["total_ms"] or {}).get(
            "p99", 1e9
        )
        < TARGET_P99_MS
        for ph in services
    }
    report(result)
    write_results("bench_query", result, args.out)
    return 0


def phase_cpu(
    marks: dict[str, Any], query_pid: int, echo_pid: int, broker_pid: int | None
) -> dict[str, float | None]:
    """CPU seconds each process used from the window's start to the end of the drain."""
    q0, e0 = marks.get("cpu", (None, None))
    b0 = marks.get("bcpu")
    q1, e1, b1 = cpu_seconds(query_pid), cpu_seconds(echo_pid), cpu_seconds(broker_pid)
    return {
        "query": q1 - q0 if q0 is not None and q1 is not None else None,
        "echo": e1 - e0 if e0 is not None and e1 is not None else None,
        "broker": b1 - b0 if b0 is not None and b1 is not None else None,
    }


# columns both latency tables share
_LATENCY_COLS = [
    Col("what", "measurement"),
    Col("client", "client"),
    Col("n", "n"),
    Col("p50", "p50", ".2f"),
    Col("p90", "p90", ".2f"),
    Col("p99", "p99", ".2f"),
    Col("max", "max", ".1f"),
]


def report(result: dict[str, Any]) -> None:
    pct = lambda x: f"{100 * x:.0f}%"  # noqa: E731
    phases = result["phases"]
    pairs = []
    for ph in phases:
        if ph["target"] != "service":
            continue
        key = (ph["client_fetch_wait_ms"], ph["client_linger_ms"])
        echo = next(
            (
                e
                for e in phases
                if e["target"] == "echo"
                and (e["client_fetch_wait_ms"], e["client_linger_ms"]) == key
            ),
            None,
        )
        pairs.append((key, echo, ph))
    rows = []
    for (fw, linger), echo, svc in pairs:
        client = f"{fw}:{linger:g}"
        for what, ph in (("bare broker round trip (echo)", echo), ("query service", svc)):
            if ph is None:
                continue
            st = ph["total_ms"] or {}
            cpu = ph["window_cpu_s"]
            rows.append(
                {
                    "what": what,
                    "client": client,
                    "n": ph["answered"],
                    **st,
                    "broker_cpu": (cpu["broker"] or 0) / ph["load_wall_s"],
                }
            )
        if echo is not None and echo["total_ms"] and svc["total_ms"]:
            rows.append(
                {
                    "what": "  ratio service / echo",
                    "client": client,
                    **{
                        k: svc["total_ms"][k] / echo["total_ms"][k]
                        for k in ("p50", "p90", "p99", "max", "mean")
                        if echo["total_ms"][k] > 0
                    },
                }
            )
    met = result["target_met"]
    print_table(
        f"request -> reply at the client, {result['rate']:.0f} req/s, "
        f"{result['duration_s']:.0f} s measured after {result['warmup_s']:g} s warm-up, "
        f"50k items x 64 (ms; client = fetch.wait.max.ms:linger.ms); target p99 < "
        f"{TARGET_P99_MS:.0f} ms: "
        + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in met.items()),
        rows,
        [
            *_LATENCY_COLS,
            Col("mean", "mean", ".2f"),
            Col("broker_cpu", "broker CPU", pct),
        ],
    )
    rows = []
    for (fw, linger), _echo, ph in pairs:
        client = f"{fw}:{linger:g}"
        for key, what in (
            ("request_leg_ms", "request leg (sent_at -> generated_at)"),
            ("reply_leg_ms", "reply leg (generated_at -> received)"),
        ):
            rows.append({"what": what, "client": client, "n": ph["answered"], **(ph[key] or {})})
        for h, what in (
            (HISTOGRAMS[0], "service: receipt -> reply produced"),
            (HISTOGRAMS[1], "service: sent_at -> reply produced"),
        ):
            st = ph[h]
            rows.append(
                {
                    "what": what,
                    "client": client,
                    "n": st.get("count"),
                    **{k: st.get(k) for k in ("p50", "p90", "p99")},
                }
            )
        rows.append({"what": "warm-up (excluded)", "client": client, **(ph["warmup_ms"] or {})})
    print_table(
        "query service, where the time goes (ms; service rows from its histograms)",
        rows,
        _LATENCY_COLS,
    )
    for ph in phases:
        cpu = ph["window_cpu_s"]
        print(
            f"{ph['target']:7s} client {ph['client_fetch_wait_ms']}:{ph['client_linger_ms']:g}: "
            f"sent {ph['sent']}, answered {ph['answered']}, lost {ph['lost']}, errors "
            f"{ph['errors']}, expired {ph.get('expired', 0):.0f}, achieved "
            f"{ph['achieved_rate']:.0f} req/s; CPU s: broker {cpu['broker'] or 0:.1f}, query "
            f"{cpu['query'] or 0:.1f}, echo {cpu['echo'] or 0:.1f}, client "
            f"{ph['client_cpu_s']:.1f}; warm-up {ph['warmup_s']:g} s p50/p99/max "
            + "/".join(f"{(ph['warmup_ms'] or {}).get(k, 0):.0f}" for k in ("p50", "p99", "max"))
            + " ms"
        )
        print(
            "  per second (warm-up < 0), p50/max ms: "
            + ", ".join(f"{r['second']}: {r['p50']:.0f}/{r['max']:.0f}" for r in ph["timeline"])
        )
    for ph in phases:
        if ph.get("profile"):
            print_table(
                f"py-spy, query process request loop, client "
                f"{ph['client_fetch_wait_ms']}:{ph['client_linger_ms']:g} "
                "(share of samples, idle included)",
                [{"what": k, "share": v} for k, v in ph["profile"].items()],
                [Col("what", "innermost project frame -> library"), Col("share", "share", pct)],
            )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--echo-child"]:
        raise SystemExit(echo_child())
    raise SystemExit(main())
