"""Query-service latency: one `stream-mf query` process under a fixed request rate.

    PYTHONPATH=. .venv/bin/python bench/bench_query.py [--quick] [--rate 500] [--duration 20]

Builds a model of 50k items x 64 factors with the real updater (a planted stream plus one event
per item, so every item has a vector; live evaluation off, which leaves the model unchanged), stops
the updater, starts one query process and sends `recommend` requests (k=10, known users) at a fixed
rate from this process, each with `sent_at` and a `reply_to` header. Per request it measures, on
one clock: total = reply received - sent_at, request leg = the reply's `generated_at` - sent_at
(broker hop, the service's wait in `consume`, answering), reply leg = received - `generated_at`
(produce, broker hop, this client's fetch). The service's own `stream_mf_query_latency_seconds`
and `stream_mf_request_to_reply_seconds` histograms are read from /metrics before and after the
load (quantiles interpolated within buckets, as Prometheus does). The load runs once per client
`fetch.wait.max.ms` in `--client-fetch-wait-ms` (10 is what `RecClient` uses: the embedded broker
holds a fetch that long even when data arrives). Target: p99 < 20 ms. Every process is stopped by
PID at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
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
from common import BLAS_THREAD_VARS, Col, print_table, write_results
from confluent_kafka import OFFSET_END, TopicPartition

from consumers import kafka_io
from consumers.broker import create_topics, free_port
from consumers.client import RecClient
from consumers.processes import ManagedProcess, metric_sum
from consumers.publish import publish
from consumers.settings import KafkaSettings
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
) -> dict[str, Any]:
    """Run the updater until every event is applied and every item known; then stop it."""
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
    p = children.start(
        ManagedProcess("updater", argv, work, env={**env, "STREAM_MF_LIVE_EVAL_RATE": "0"})
    )
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
    duration: float,
    fetch_wait_ms: int,
) -> dict[str, Any]:
    """Send `rate` requests/s for `duration` s; per-request total, request and reply legs (ms)."""
    ks = KafkaSettings(bootstrap_servers=bootstrap)
    producer = kafka_io.producer(ks, **{"linger.ms": 0})
    consumer = kafka_io.consumer(
        ks, f"bench-query-{uuid.uuid4().hex[:8]}", **{"fetch.wait.max.ms": fetch_wait_ms}
    )
    consumer.assign([TopicPartition(responses, 0, OFFSET_END)])
    consumer.consume(1, 0.5)  # establish the fetch position before the first request
    headers = [("reply_to", responses.encode())]
    total_n = int(rate * duration)
    tag = uuid.uuid4().hex[:8]
    sent: dict[str, float] = {}
    total, req_leg, reply_leg, sent_rel = [], [], [], []
    strategies: Counter[str] = Counter()
    errors = 0
    rng = np.random.default_rng(3)
    picks = users[rng.integers(0, users.size, total_n)].tolist()
    i = 0
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    drain_end = float("inf")
    send_wall = duration
    try:
        while i < total_n or (sent and time.perf_counter() < drain_end):
            now = time.perf_counter()
            due = t0 + i / rate
            if i < total_n and now >= due:
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
                    send_wall = time.perf_counter() - t0
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
            doc = orjson.loads(m.value())
            if doc.get("error"):
                errors += 1
            strategies[str(doc.get("strategy"))] += 1
            gen = float(doc.get("generated_at") or received)
            total.append(received - at)
            sent_rel.append(int(cid.rsplit("-", 1)[1]) / rate)
            req_leg.append(gen - at)
            reply_leg.append(received - gen)
        wall = time.perf_counter() - t0
    finally:
        producer.flush(5.0)
        consumer.close()
    return {
        "client_fetch_wait_ms": fetch_wait_ms,
        "sent": total_n,
        "answered": len(total),
        "lost": len(sent),
        "errors": errors,
        "strategies": dict(strategies),
        "achieved_rate": total_n / send_wall,
        "load_wall_s": wall,
        "total_ms": summarize(np.asarray(total) * 1e3),
        "request_leg_ms": summarize(np.asarray(req_leg) * 1e3),
        "reply_leg_ms": summarize(np.asarray(reply_leg) * 1e3),
        "client_cpu_s": time.process_time() - cpu0,
        "timeline": timeline(np.asarray(sent_rel), np.asarray(total) * 1e3),
    }


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
    ap.add_argument("--quick", action="store_true", help="smaller model build, 5 s of load")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/)")
    ap.add_argument("--rate", type=float, default=500.0, help="requests/s")
    ap.add_argument("--duration", type=float, default=None, help="seconds of load per phase")
    ap.add_argument(
        "--client-fetch-wait-ms",
        type=int,
        nargs="+",
        default=None,
        help="one load phase per value (default: 10 1; --quick: 10)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, state)")
    ap.add_argument(
        "--blas-threads",
        type=int,
        default=None,
        help="OPENBLAS/OMP/MKL_NUM_THREADS for the query process (default: inherited)",
    )
    ap.add_argument(
        "--profile", action="store_true", help="py-spy the query process during the first phase"
    )
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    duration = args.duration or (5.0 if args.quick else 20.0)
    waits = args.client_fetch_wait_ms or ([10] if args.quick else [10, 1])
    n_planted, n_users = (50_000, 5_000) if args.quick else (200_000, 20_000)
    work = Path(tempfile.mkdtemp(prefix="bench-query-"))
    children = Children()
    t_all = time.perf_counter()
    result: dict[str, Any] = {"quick": args.quick, "rate": args.rate, "duration_s": duration}
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
                "STREAM_MF_SESSION_TIMEOUT_MS": "6000",
            }
            create_topics(
                bootstrap, {t: 1 for k, t in topics.items() if k.startswith("STREAM_MF_T")}
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
                "--state-dir",
                str(state),
                "--metrics-port",
                str(port),
            ]
            q_env = dict(topics)
            if args.blas_threads:
                q_env.update({k: str(args.blas_threads) for k in BLAS_THREAD_VARS})
            result["query_blas_threads"] = args.blas_threads or os.environ.get(
                "OPENBLAS_NUM_THREADS", "default"
            )
            q = children.start(ManagedProcess("query", argv_q, work, env=q_env))
            client = RecClient(ks, req_t, resp_t)
            try:
                result["query_ready_s"] = wait_for_query(client, f"u{known[0]}", q, 60)
            finally:
                client.close()
            phases = []
            for fw in waits:
                before = try_scrape(url) or {}
                cpu0, bcpu0 = cpu_seconds(q.pid), cpu_seconds(broker_pid)
                spy_out = work / f"pyspy-query-{fw}.txt"
                spy = start_pyspy(children, q.pid, spy_out) if args.profile and not phases else None
                try:
                    ph = run_load(bootstrap, req_t, resp_t, known, args.rate, duration, fw)
                finally:
                    if spy is not None:
                        stop_pyspy(spy)
                if spy is not None:
                    ph["profile"] = hotspots(spy_out)
                after = drain(url, q, timeout=30.0)
                cpu1, bcpu1 = cpu_seconds(q.pid), cpu_seconds(broker_pid)
                ph["broker_cpu_s"] = (bcpu1 - bcpu0) if bcpu0 is not None and bcpu1 else None
                for h in HISTOGRAMS:
                    ph[h] = hist_quantiles(bucket_counts(before, h), bucket_counts(after, h))
                ph["query_cpu_s"] = (cpu1 - cpu0) if cpu0 is not None and cpu1 else None
                ph["expired"] = metric_sum(after, "stream_mf_requests_expired_total") - metric_sum(
                    before, "stream_mf_requests_expired_total"
                )
                phases.append(ph)
                if ph["lost"] and fw != waits[-1]:
                    print("service saturated (requests lost): skipping the other phases")
                    result["skipped_phases"] = waits[waits.index(fw) + 1 :]
                    break
                t = ph["total_ms"] or {}
                print(
                    f"client fetch wait {fw} ms: p50 {t.get('p50', 0):.1f} ms, "
                    f"p99 {t.get('p99', 0):.1f} ms",
                    flush=True,
                )
            result["phases"] = phases
            children.stop(q)
    finally:
        children.stop_all()
        if args.keep:
            print(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    result["wall_s"] = time.perf_counter() - t_all
    result["target_p99_ms"] = TARGET_P99_MS
    result["target_met"] = all(
        (ph["total_ms"] or {}).get("p99", 1e9) < TARGET_P99_MS for ph in result["phases"]
    )
    report(result)
    write_results("bench_query", result, args.out)
    return 0


def report(result: dict[str, Any]) -> None:
    pct = lambda x: f"{100 * x:.0f}%"  # noqa: E731
    rows = []
    for ph in result["phases"]:
        fw = ph["client_fetch_wait_ms"]
        for key, what in (
            ("total_ms", "client: request -> reply"),
            ("request_leg_ms", "  request leg (sent_at -> generated_at)"),
            ("reply_leg_ms", "  reply leg (generated_at -> received)"),
        ):
            st = ph[key] or {}
            rows.append({"what": what, "fw": fw, "n": ph["answered"], **st})
        for h, what in (
            (HISTOGRAMS[0], "service: receipt -> reply produced"),
            (HISTOGRAMS[1], "service: sent_at -> reply produced"),
        ):
            st = ph[h]
            rows.append(
                {
                    "what": what,
                    "fw": fw,
                    "n": st.get("count"),
                    "p50": st.get("p50"),
                    "p90": st.get("p90"),
                    "p99": st.get("p99"),
                }
            )
    ok = result["target_met"]
    print_table(
        f"query latency, {result['rate']:.0f} req/s for {result['duration_s']:.0f} s, "
        f"50k items x 64 (ms; service rows from its histograms); target p99 < "
        f"{TARGET_P99_MS:.0f} ms: {'met' if ok else 'MISSED'}",
        rows,
        [
            Col("what", "measurement"),
            Col("fw", "client fetch.wait ms"),
            Col("n", "n"),
            Col("p50", "p50", ".1f"),
            Col("p90", "p90", ".1f"),
            Col("p99", "p99", ".1f"),
            Col("max", "max", ".1f"),
            Col("mean", "mean", ".1f"),
        ],
    )
    for ph in result["phases"]:
        print(
            f"fetch wait {ph['client_fetch_wait_ms']} ms: sent {ph['sent']}, answered "
            f"{ph['answered']}, lost {ph['lost']}, errors {ph['errors']}, expired "
            f"{ph['expired']:.0f}, achieved {ph['achieved_rate']:.0f} req/s, query CPU "
            f"{ph['query_cpu_s'] or 0:.1f} s, broker CPU {ph['broker_cpu_s'] or 0:.1f} s, "
            f"client CPU {ph['client_cpu_s']:.1f} s, strategies {ph['strategies']}"
        )
        print(
            "  per second of load, p50/max ms: "
            + ", ".join(f"{r['p50']:.0f}/{r['max']:.0f}" for r in ph["timeline"])
        )

    for ph in result["phases"]:
        if ph.get("profile"):
            print_table(
                f"py-spy, query process request loop, client fetch wait "
                f"{ph['client_fetch_wait_ms']} ms (share of samples, idle included)",
                [{"what": k, "share": v} for k, v in ph["profile"].items()],
                [Col("what", "innermost project frame -> library"), Col("share", "share", pct)],
            )


if __name__ == "__main__":
    raise SystemExit(main())
