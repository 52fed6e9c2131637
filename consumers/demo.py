"""The demo: broker, updater, two query processes, a MovieLens replay, answers with titles."""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from consumers import kafka_io
from consumers.broker import EmbeddedBroker, create_topics, free_port
from consumers.catalog import DEFAULT_CATALOG, load_titles
from consumers.client import RecClient
from consumers.commands.broker import product_topics
from consumers.commands.recommend import format_response
from consumers.processes import ManagedProcess, metric_sum, scrape, wait_until
from consumers.publish import event_payloads, publish
from consumers.settings import KafkaSettings, TopicSettings
from stream_mf.datasets import ColumnSpec, read_events

log = logging.getLogger(__name__)
RATINGS = DEFAULT_CATALOG.parent / "ratings.csv.gz"


def run_demo(serve: bool = False, users: tuple[str, ...] = ("1", "414", "599")) -> int:
    topics = TopicSettings()
    work = Path(tempfile.mkdtemp(prefix="stream-mf-demo-"))
    procs: list[ManagedProcess] = []
    with EmbeddedBroker() as broker:
        boot = broker.bootstrap_servers
        create_topics(boot, product_topics(2, topics))
        ports = {name: free_port() for name in ("updater", "query-1", "query-2")}
        common = ["--bootstrap-servers", boot, "--state-dir", str(work / "state")]
        try:
            procs.append(
                ManagedProcess(
                    "updater", ["updater", *common, "--metrics-port", str(ports["updater"])], work
                ).start()
            )
            for q in ("query-1", "query-2"):
                procs.append(
                    ManagedProcess(q, ["query", *common, "--metrics-port", str(ports[q])], work)
                    .start()
                )  # fmt: skip
            print(f"broker {boot} (pid {broker.pid}); state and logs in {work}")
            events = read_events(RATINGS, ColumnSpec()).sorted_by_time()
            payloads = event_payloads(events, "shift")
            kafka = KafkaSettings(bootstrap_servers=boot)
            t0 = time.monotonic()
            sent = publish(kafka_io.producer(kafka), topics.interactions, payloads)
            print(f"replayed {sent:,} MovieLens ratings in {time.monotonic() - t0:.1f}s")
            url = f"http://127.0.0.1:{ports['updater']}/metrics"
            bar = tqdm(total=sent, unit="ev", desc="learned")

            def caught_up() -> bool:
                done = metric_sum(scrape(url), "stream_mf_events_consumed_total")
                bar.update(int(done) - bar.n)
                return done >= sent

            wait_until(caught_up, 90, 0.2, "the updater to apply the replay")
            bar.close()
            print(f"updater applied everything {time.monotonic() - t0:.1f}s after the replay began")
            time.sleep(0.5)  # one refresh of the query processes
            titles = load_titles()
            client = RecClient(kafka, topics.requests, topics.responses)
            try:
                for user in users:
                    resp = client.ask({"user_id": user, "k": 10})
                    print()
                    print(format_response(resp, titles))
                    if resp.items:
                        why = client.ask(
                            {"kind": "because", "user_id": user, "item_id": resp.items[0].item_id,
                             "k": 3}
                        )  # fmt: skip
                        names = ", ".join(titles.get(i.item_id, i.item_id) for i in why.items)
                        print(f"     because you watched: {names}")
                print()
                print(format_response(client.ask({"kind": "similar_items", "item_id": "1"}), titles)
                      .replace("similar_items", "similar to Toy Story (1995)"))  # fmt: skip
                print()
                print(format_response(client.ask({"user_id": "new-visitor", "k": 5}), titles))
            finally:
                client.close()
            print("\nmetrics:")
            for name, port in ports.items():
                print(f"  {name:<8} http://127.0.0.1:{port}/metrics")
            if serve:
                print(f"\nserving; try: stream-mf recommend 414 --bootstrap-servers {boot} "
                      f"--catalog {DEFAULT_CATALOG}\nCtrl-C to stop.")  # fmt: skip
                stop = kafka_io.StopFlag().install()
                while not stop and all(p.alive() for p in procs):
                    time.sleep(0.5)
        except Exception:
            for p in procs:
                if not p.alive():
                    print(f"--- {p.name} exited early; log tail:\n{p.log_tail()}", file=sys.stderr)
            raise
        finally:
            codes = {p.name: p.stop() for p in procs}
            print(f"stopped: {codes}")
    return 0
