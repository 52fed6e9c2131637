"""The demo: broker, updater, two query processes, a MovieLens replay, answers with titles."""

from __future__ import annotations

import logging
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import orjson
from tqdm import tqdm

from consumers import kafka_io
from consumers.catalog import DEFAULT_CATALOG, load_titles
from consumers.client import RecClient
from consumers.commands.recommend import format_response
from consumers.local_broker import EmbeddedBroker, free_port, tansu_binary
from consumers.processes import (
    ManagedProcess,
    histogram_quantile,
    metric_sum,
    scrape,
    wait_until,
)
from consumers.publish import event_payloads, publish
from consumers.settings import KafkaSettings, TopicSettings
from consumers.topics import create_topics, product_topics
from stream_mf.answer import StateUsers, answer
from stream_mf.config import ModelConfig
from stream_mf.datasets import ColumnSpec, read_events
from stream_mf.messages import RecRequest
from stream_mf.model import EventBatch, OnlineModel
from stream_mf.rebuild import warm_up_rebuild
from stream_mf.recommend import ItemView
from stream_mf.store import StateStore

log = logging.getLogger(__name__)
RATINGS = DEFAULT_CATALOG.parent / "ratings.csv.gz"


def _offline_recall() -> float | None:
    """The committed offline prequential figure for the default online model, if present."""
    path = DEFAULT_CATALOG.parents[2] / "docs" / "prequential-movielens.json"
    try:
        doc = orjson.loads(path.read_bytes())
    except OSError:
        return None
    for r in doc.get("models", [doc]):
        if r.get("model") == "sgd":
            return float(r["recall_at_k"])
    return None


def _numba_dispatchers() -> list[Any]:
    from numba.core.registry import CPUDispatcher

    out: list[Any] = []
    for name, module in list(sys.modules.items()):
        if name.startswith("stream_mf."):
            out.extend(v for v in vars(module).values() if isinstance(v, CPUDispatcher))
    return out


def prepare_kernels(work: Path) -> tuple[float, int]:
    """Compile the numba kernels (first run) or load them from numba's cache (later runs) by
    running the updater's and the query service's paths once on a tiny model, before they
    start: the processes then load every kernel from the cache, and the demo can say what the
    wait is for instead of showing a progress bar stuck at 0%. Returns (seconds, kernels
    compiled rather than loaded)."""
    t0 = time.perf_counter()
    warm_up_rebuild()
    model = OnlineModel(ModelConfig())
    users, items = ["u1", "u2", "u1", "u3"], ["i1", "i2", "i2", "i3"]
    model.learn(EventBatch.build(users, items, np.ones(4), np.arange(4.0) + 1.7e9))
    with StateStore(work / "kernels") as store:
        store.write_full_state(model.state, {("warm-up", 0): 4})
        model = OnlineModel(store.stored_config() or ModelConfig(), store.load())
    view = ItemView.from_state(model.state)
    known = StateUsers(model.state)
    for req in (
        RecRequest(request_id="w", user_id="u1"),
        RecRequest(request_id="w", kind="popular"),
        RecRequest(request_id="w", kind="similar_items", item_id="i1"),
        RecRequest(request_id="w", kind="recommend_anonymous", items=["i1"]),
        RecRequest(request_id="w", kind="because", user_id="u1", item_id="i2"),
    ):
        answer(req, view, known)
    compiled = sum(
        sum(d.stats.cache_misses.values()) for d in _numba_dispatchers() if d.stats is not None
    )
    return time.perf_counter() - t0, compiled


def _live_phase(kafka: KafkaSettings, topics: TopicSettings, ports: dict[str, int]) -> None:
    """Step 7: five seconds of live traffic stamped now: how fresh is what queries serve?"""
    urls = [f"http://127.0.0.1:{ports[q]}/metrics" for q in ("query-1", "query-2")]
    conf: dict[str, Any] = {"linger.ms": 5}
    producer = kafka_io.producer(kafka, **conf)
    # a new producer's first delivery waits 0.5-1 s (connection, metadata, its idempotent
    # producer id: bench/README.md): one event delivered and applied before the window opens,
    # so the figure is the service's freshness, not this client's start-up
    first = {"user_id": "live-0", "item_id": "1", "event_type": "click", "timestamp": time.time()}
    producer.produce(topics.interactions, value=orjson.dumps(first))
    producer.flush(10)
    time.sleep(1.0)
    before = [scrape(u) for u in urls]
    rng = np.random.default_rng(0)
    end = time.monotonic() + 5.0
    sent = 0
    while time.monotonic() < end:
        for _ in range(20):
            doc = {
                "user_id": f"live-{rng.integers(500)}",
                "item_id": str(rng.integers(1, 3000)),
                "event_type": "click",
                "timestamp": time.time(),
            }
            producer.produce(topics.interactions, value=orjson.dumps(doc))
            sent += 1
        producer.poll(0)
        time.sleep(0.05)
    kafka_io.close_producer(producer, 10)
    time.sleep(1.0)
    p99s = []
    for u, b in zip(urls, before, strict=True):
        q = histogram_quantile(b, scrape(u), "stream_mf_freshness_seconds", 0.99)
        if q is not None:
            p99s.append(q)
    if p99s:
        print(
            f"\nlive phase: {sent} events stamped now at ~400/s; freshness p99 (event time to "
            f"servable in a query process): {max(p99s):.2f} s"
        )


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run_demo(serve: bool = False, users: tuple[str, ...] = ("1", "414", "599")) -> int:
    """Everything lives in one temporary directory, removed on the way out whatever the way
    (an error, Ctrl-C, SIGTERM): the processes are stopped first, the broker last, after every
    client here has closed its connections (Tansu waits 5 s for open ones before exiting on
    SIGTERM)."""
    previous = signal.signal(signal.SIGTERM, _interrupt)  # unwinds like Ctrl-C: cleanup runs
    try:
        with tempfile.TemporaryDirectory(prefix="stream-mf-demo-") as tmp:
            return _run(Path(tmp), serve, users)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(work: Path, serve: bool, users: tuple[str, ...]) -> int:
    """The demo's steps in order; the processes are stopped whatever step fails."""
    topics = TopicSettings()
    binary = tansu_binary()  # before compiling: without the embedded extra, say so at once
    _compile_kernels(work)
    procs: list[ManagedProcess] = []
    with EmbeddedBroker(binary=binary) as broker:
        boot = broker.bootstrap_servers
        # one partition of interactions: a replay of history must reach the learner in time
        # order (the stream clock and its decay assume partitions advance together); two of
        # rec-requests, one per query process
        create_topics(boot, product_topics(2, topics, interactions=1))
        ports = {name: free_port() for name in ("updater", "query-1", "query-2")}
        try:
            _start_processes(procs, work, boot, ports)
            print(f"broker {boot} (pid {broker.pid}); state and logs in {work} (removed at exit)")
            kafka = KafkaSettings(bootstrap_servers=boot)
            sent, t0 = _replay(kafka, topics)
            print(f"replayed {sent:,} MovieLens ratings in {time.monotonic() - t0:.1f}s")
            _wait_until_learned(ports, sent, t0)
            _print_live_quality(ports)
            _print_answers(kafka, topics, users)
            _live_phase(kafka, topics, ports)
            print("\nmetrics:")
            for name, port in ports.items():
                print(f"  {name:<8} http://127.0.0.1:{port}/metrics")
            if serve:
                _serve(boot, procs)
        except Exception:
            _report_early_exits(procs)
            raise
        finally:
            _shutdown(procs)
    return 0


def _compile_kernels(work: Path) -> None:
    """Step 1: compile or load the numba kernels, saying which and how long it took."""
    print(
        "compiling kernels… (numba; the first run compiles them, about half a minute on two "
        "cores; later runs load them from its cache)",
        flush=True,
    )
    took, compiled = prepare_kernels(work)
    if compiled:
        print(f"compiled {compiled} kernels in {took:.1f}s (cached for the next run)")
    else:
        print(f"kernels loaded from numba's cache in {took:.1f}s")


def _start_processes(
    procs: list[ManagedProcess], work: Path, boot: str, ports: dict[str, int]
) -> None:
    """Step 2: the updater and two query processes, each added to `procs` as soon as it runs
    (so a failure starting the next still stops the ones before it)."""
    common = ["--bootstrap-servers", boot, "--state-dir", str(work / "state")]
    # their temporary files too
    scratch = {"TMPDIR": str(work)}
    procs.append(
        ManagedProcess(
            "updater",
            ["updater", *common, "--metrics-port", str(ports["updater"])],
            work,
            # score 5% of the replay test-then-learn, to compare with the offline figure
            env={
                "STREAM_MF_LIVE_EVAL_RATE": "0.05",
                "STREAM_MF_LIVE_EVAL_MAX_PER_BATCH": "1000",
                **scratch,
            },
        ).start()
    )
    for q in ("query-1", "query-2"):
        procs.append(  # the broker only: a query process follows the model log
            ManagedProcess(
                q,
                ["query", "--bootstrap-servers", boot, "--metrics-port", str(ports[q])],
                work,
                env=scratch,
            ).start()
        )


def _replay(kafka: KafkaSettings, topics: TopicSettings) -> tuple[int, float]:
    """Step 3: publish the MovieLens ratings in time order. Returns how many were sent and when
    (monotonic clock) publishing began, after the file was read."""
    events = read_events(RATINGS, ColumnSpec()).sorted_by_time()
    payloads = event_payloads(events, "shift")
    t0 = time.monotonic()
    producer = kafka_io.ordered_producer(kafka)
    try:
        return publish(producer, topics.interactions, payloads), t0
    finally:
        kafka_io.close_producer(producer)


def _wait_until_learned(ports: dict[str, int], sent: int, t0: float) -> None:
    """Step 4: wait for the updater to apply the replay (progress bar), then for each query
    process to load the model it wrote, so the answers below come from the whole replay."""
    url = f"http://127.0.0.1:{ports['updater']}/metrics"
    bar = tqdm(total=sent, unit="ev", desc="learned")

    def caught_up() -> bool:
        m = scrape(url)  # written to the store: applied or dead-lettered, not just read
        done = metric_sum(m, "stream_mf_events_applied_total") + metric_sum(
            m, "stream_mf_events_dead_lettered_total"
        )
        bar.update(int(done) - bar.n)
        return done >= sent

    wait_until(caught_up, 90, 0.2, "the updater to apply the replay")
    bar.close()
    print(f"updater applied everything {time.monotonic() - t0:.1f}s after the replay began")
    applied = metric_sum(scrape(url), "stream_mf_events_applied_total")
    for q in ("query-1", "query-2"):
        q_url = f"http://127.0.0.1:{ports[q]}/metrics"

        def loaded(u: str = q_url) -> bool:
            return metric_sum(scrape(u), "stream_mf_model_events_applied") >= applied

        wait_until(loaded, 30, 0.1, f"{q} to load the model")


def _print_live_quality(ports: dict[str, int]) -> None:
    """Step 5: the updater's live HR@10 over the replay, beside the offline figure."""
    m = scrape(f"http://127.0.0.1:{ports['updater']}/metrics")
    scored = metric_sum(m, "stream_mf_live_eval_events_total")
    if scored:
        hr = metric_sum(m, "stream_mf_live_eval_hits_total") / scored
        offline = _offline_recall()
        ref = f" (offline prequential, same model: {offline:.4f})" if offline else ""
        print(
            f"live HR@10 on {int(scored):,} sampled events (weighted), test-then-learn: "
            f"{hr:.4f}{ref}"
        )


def _print_answers(kafka: KafkaSettings, topics: TopicSettings, users: tuple[str, ...]) -> None:
    """Step 6: ask the query service as a client would, and print the answers with titles."""
    titles = load_titles()
    client = RecClient(kafka, topics.requests, topics.responses)
    try:
        for user in users:
            resp = client.ask({"user_id": user, "k": 10})
            print()
            print(format_response(resp, titles))
            if resp.items:
                why = client.ask(
                    {"kind": "because", "user_id": user, "item_id": resp.items[0].item_id, "k": 3}
                )
                names = ", ".join(titles.get(i.item_id, i.item_id) for i in why.items)
                print(f"     because you watched: {names}")
        print()
        print(
            format_response(client.ask({"kind": "similar_items", "item_id": "1"}), titles).replace(
                "similar_items", "similar to Toy Story (1995)"
            )
        )
        print()
        print(format_response(client.ask({"user_id": "new-visitor", "k": 5}), titles))
    finally:
        client.close()


def _report_early_exits(procs: list[ManagedProcess]) -> None:
    """On a failure: the log tail of any process that died, the likeliest cause."""
    for p in procs:
        if not p.alive():
            print(f"--- {p.name} exited early; log tail:\n{p.log_tail()}", file=sys.stderr)


def _shutdown(procs: list[ManagedProcess]) -> None:
    """Last step, whatever happened: stop every process by PID (the broker stops after this,
    when its context exits) and print their exit codes."""
    codes = {p.name: p.stop() for p in procs}
    print(f"stopped: {codes}")


def _serve(boot: str, procs: list[ManagedProcess]) -> None:
    """Step 8 (with --serve): keep everything up until Ctrl-C or a process exits."""
    print(
        f"\nserving; try: stream-mf recommend 414 --bootstrap-servers {boot} "
        f"--catalog {DEFAULT_CATALOG}\nCtrl-C to stop."
    )
    stop = kafka_io.StopFlag().install()
    while not stop and all(p.alive() for p in procs):
        time.sleep(0.5)
