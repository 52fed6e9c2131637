"""Every PromQL expression of the Grafana dashboard and the alert rules, evaluated by a real
Prometheus scraping a real updater and query process.

A name typo, a label that is not exported, a counter queried without `_total`: each makes an
expression return nothing, which looks like "no traffic" on a dashboard and like "all is well"
to an alert. So this test starts Prometheus (Debian's `prometheus` package) with a 1 s scrape
interval on the `cluster` fixture's processes, feeds them events (some of them bad, so that the
dead-letter series exist) and requests, and asks Prometheus' HTTP API for every expression.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from consumers import kafka_io
from consumers.client import RecClient
from consumers.local_broker import free_port
from consumers.publish import publish
from consumers.settings import KafkaSettings
from tests.integration.conftest import Cluster
from tests.synthetic import planted_stream

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD_JSON = ROOT / "deploy" / "grafana" / "dashboards" / "stream-mf.json"
ALERTS_YML = ROOT / "deploy" / "prometheus" / "alerts.yml"

# Grafana's interval variables, which Prometheus does not know: a window of many 1 s scrapes
GRAFANA_VARS = {"$__rate_interval": "30s", "$__interval": "5s", "$__range": "5m"}

# A binary operator at the top level of an expression: a comparison or a set operator, with
# its optional `bool`, `on (...)`/`ignoring (...)` and `group_left/right (...)` modifiers.
TOP_LEVEL_OP = re.compile(
    r"(?:==|!=|>=|<=|>|<|\band\b|\bor\b|\bunless\b)\s*(?:bool\b\s*)?"
    r"(?:(?:on|ignoring)\s*\([^)]*\)\s*)?(?:group_(?:left|right)\b\s*(?:\([^)]*\)\s*)?)?"
)
SELECTS_METRICS = re.compile(r"\bstream_mf_[a-z0-9_]+|\bup\b")


def top_level_operands(expr: str) -> list[str]:
    """Split `expr` at its top-level comparison and set operators (outside (), [], {} and
    strings). `a > 5 and on (job) b > 0` gives `a`, `5`, `b`, `0`."""
    parts: list[str] = []
    depth, i, start = 0, 0, 0
    quote: str | None = None
    while i < len(expr):
        c = expr[i]
        if quote:
            if c == "\\":
                i += 2
                continue
            if c == quote:
                quote = None
        elif c in "\"'`":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and (m := TOP_LEVEL_OP.match(expr, i)):
            parts.append(expr[start:i])
            i = start = m.end()
            continue
        i += 1
    parts.append(expr[start:])
    return [p.strip() for p in parts if p.strip()]


def test_top_level_operands() -> None:
    assert top_level_operands('up{job=~"a.*"} == 0') == ['up{job=~"a.*"}', "0"]
    assert top_level_operands(
        'time() - x > 300 and on (job, instance) sum by (job) (y{a!="b>c"}) > 0'
    ) == ["time() - x", "300", 'sum by (job) (y{a!="b>c"})', "0"]
    assert top_level_operands("histogram_quantile(0.99, sum by (le) (rate(h[5m]))) > 0.1") == [
        "histogram_quantile(0.99, sum by (le) (rate(h[5m])))",
        "0.1",
    ]
    assert top_level_operands("stream_mf_errors_total or vector(0)") == [
        "stream_mf_errors_total",
        "vector(0)",
    ]


def dashboard_exprs() -> list[tuple[str, str, str]]:
    """(where, expr with Grafana's variables replaced, legend format) of every panel target."""
    dash = json.loads(DASHBOARD_JSON.read_text())
    out = []
    for p in dash["panels"]:
        for panel in [p, *p.get("panels", [])]:
            for t in panel.get("targets", []):
                expr = t["expr"]
                for var, value in GRAFANA_VARS.items():
                    expr = expr.replace(var, value)
                where = f"panel {panel['title']!r} {t['refId']}"
                out.append((where, expr, t.get("legendFormat", "")))
    return out


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(ALERTS_YML.read_text())["groups"] for r in g["rules"]]


class Prometheus:
    """A Prometheus server on a free loopback port, stopped by PID."""

    def __init__(self, binary: str, work: Path, config: dict[str, Any]):
        self.work = work
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (work / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = work / "prometheus.log"
        self.argv = [
            binary,
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        end = time.monotonic() + 15
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"prometheus not ready after 15 s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()  # SIGTERM to this PID only
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_bytes()[-4000:].decode(errors="replace")

    def api(self, path: str, **params: str) -> dict[str, Any]:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                body: dict[str, Any] = json.load(r)
        except urllib.error.HTTPError as exc:  # 400/422 carry the PromQL error as JSON
            body = json.loads(exc.read() or b"{}")
        return body

    def query(self, expr: str) -> list[Any]:
        """The result of an instant query; raises on a PromQL error."""
        body = self.api("query", query=expr)
        if body.get("status") != "success":
            raise AssertionError(f"{expr!r}: {body.get('errorType')}: {body.get('error')}")
        data = body["data"]
        if data["resultType"] == "scalar":
            return [data["result"]]
        return list(data["result"])


def payloads(n: int, bad_per_reason: int) -> tuple[list[tuple[bytes, bytes]], int]:
    """`n` valid events (timestamps over the last 10 minutes) and some of every kind of bad
    message, interleaved; returns them and how many are bad."""
    now = time.time()
    s = planted_stream(n, 200, 300, n_groups=5, seed=3, t0=now - 600, span_s=590)
    kinds = ("view", "click", "add_to_cart", "purchase")
    good = [
        (
            f"u{u}".encode(),
            orjson.dumps(
                {"user_id": f"u{u}", "item_id": f"i{i}", "event_type": kinds[j % 4], "timestamp": t}
            ),
        )
        for j, (u, i, t) in enumerate(
            zip(s.users.tolist(), s.items.tolist(), s.times.tolist(), strict=True)
        )
    ]
    bad_values = [
        b"",
        b"{not json",
        b"[1, 2, 3]",
        orjson.dumps({"user_id": "u1", "event_type": "view", "timestamp": now}),
        orjson.dumps(
            {"user_id": "u1", "item_id": "i1", "event_type": "teleport", "timestamp": now}
        ),
    ]
    bad = [(b"u1", v) for v in bad_values for _ in range(bad_per_reason)]
    step = max(1, len(good) // len(bad))
    out = list(good)
    for k, msg in enumerate(bad):
        out.insert(k * (step + 1), msg)
    return out, len(bad)


def test_every_dashboard_and_alert_expression_returns_data(
    cluster: Cluster, tmp_path: Path
) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip(
            "the prometheus server is not installed (Debian: apt-get install -y prometheus)"
        )
    started = time.monotonic()
    # a quick rebuild runs during the test, so its panels are checked on real values too
    rebuild = {
        "STREAM_MF_REBUILD__EVERY_EVENTS": "1000",
        "STREAM_MF_REBUILD__ITERATIONS": "3",
        "STREAM_MF_REBUILD__GUARD_EVENTS": "20",
        "STREAM_MF_REBUILD__GUARD_TIMEOUT_S": "1",
        "STREAM_MF_REBUILD__GUARD_MARGIN": "1.0",
    }
    cluster.start("updater", "updater", env={"STREAM_MF_LIVE_EVAL_RATE": "0.2", **rebuild})
    cluster.start("query", "query-1")
    # the same job names as deploy/prometheus/prometheus.yml, so `up{job=~...}` matches
    prom = Prometheus(
        binary,
        tmp_path,
        {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": [str(ALERTS_YML)],
            "scrape_configs": [
                {
                    "job_name": "stream-mf-updater",
                    "static_configs": [{"targets": [f"127.0.0.1:{cluster.ports['updater']}"]}],
                },
                {
                    "job_name": "stream-mf-query",
                    "static_configs": [{"targets": [f"127.0.0.1:{cluster.ports['query-1']}"]}],
                },
            ],
        },
    )
    try:
        prom.start()
        # both processes serve /metrics (the query process follows the store from here on, so
        # the events below count towards its freshness histogram)
        cluster.wait_metric("updater", "stream_mf_batches_total", 0, timeout=20)
        cluster.wait_metric("query-1", "stream_mf_requests_invalid_total", 0, timeout=20)
        # and Prometheus has scraped both before anything happens: a rate or increase needs the
        # counters' values from before the events, or it reads 0 and every quantile NaN
        end = time.monotonic() + 20
        while len(prom.query("up == 1")) < 2:
            assert time.monotonic() < end, "Prometheus never scraped both processes"
            time.sleep(0.2)

        msgs, n_bad = payloads(3000, bad_per_reason=4)
        producer = kafka_io.producer(KafkaSettings(bootstrap_servers=cluster.kafka))
        assert publish(producer, cluster.topics.interactions, msgs, progress=False) == len(msgs)
        cluster.wait_metric("updater", "stream_mf_events_consumed_total", len(msgs), timeout=20)
        # consumed counts on receipt; dead letters once decoded and delivered, a moment later
        cluster.wait_metric("updater", "stream_mf_events_dead_lettered_total", n_bad, timeout=20)
        assert cluster.metric("updater", "stream_mf_events_dead_lettered_total") == n_bad

        ask_some_questions(cluster)

        # Dashboard: every expression returns data once a few scrapes have happened. Polled,
        # so the test waits only as long as scraping needs.
        checks = dashboard_exprs()
        # Alerts: the full expression must evaluate without error, but its threshold makes it
        # empty while all is well, so it cannot show that the names are right. What must return
        # data are the operands of its top-level comparison and set operators that select
        # metrics (`up{...}` of `up{...} == 0`; both sums of `sum(a) > 1e4 and sum(deriv(a)) >
        # 0`); constant operands (`0`, `2 * 3600`) are not checked.
        for rule in alert_rules():
            prom.query(rule["expr"])  # valid PromQL, evaluates
            operands = [o for o in top_level_operands(rule["expr"]) if SELECTS_METRICS.search(o)]
            assert operands, f"alert {rule['alert']}: no operand selects a metric"
            checks += [(f"alert {rule['alert']} operand", o, "") for o in operands]

        pending = checks  # every metric is exported from the start, rebuild ones included
        deadline = started + 40
        while True:
            empty = [(w, e, why) for w, e, lg in pending if (why := lacks(prom, e, lg))]
            if not empty or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        report = "\n".join(f"  {w}: {e}\n    {why}" for w, e, why in empty)
        assert not empty, f"expressions without data:\n{report}"

        # and the alerts behave: a healthy process is up, the bad messages above are seen
        by_name = {r["alert"]: r["expr"] for r in alert_rules()}
        assert prom.query(by_name["StreamMfProcessDown"]) == []
        assert prom.query(by_name["StreamMfDeadLettersArriving"]), "dead letters not detected"
        assert_rules_evaluate(prom, deadline)
        targets = prom.api("targets")["data"]["activeTargets"]
        assert {t["labels"]["job"]: t["health"] for t in targets} == {
            "stream-mf-updater": "up",
            "stream-mf-query": "up",
        }
    except BaseException:
        print(f"prometheus log:\n{prom.log() if prom.log_path.exists() else ''}")
        raise
    finally:
        prom.stop()


def lacks(prom: Prometheus, expr: str, legend: str) -> str | None:
    """What is wrong with the data of `expr`, or None: no series at all, only NaN (nothing
    observed, so the panel would be empty), or no series carrying a
    label that the panel's legend shows (`sum by (strateg)` still returns a series). A result of
    only label-less series is a constant fallback (`... or on () vector(0)`), exempt from the
    legend check."""
    result = prom.query(expr)
    if not result:
        return "no data"
    values = [r["value"][1] if isinstance(r, dict) else r[1] for r in result]
    if all(v == "NaN" for v in values):  # e.g. a quantile of a histogram never observed
        return f"only NaN: {result}"
    if all(isinstance(r, dict) and not r.get("metric") for r in result):
        return None
    wanted = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
    have = {k for r in result if isinstance(r, dict) for k in r.get("metric", {})}
    if wanted - have:
        return f"no series has the label(s) {sorted(wanted - have)} of legend {legend!r}"
    return None


def ask_some_questions(cluster: Cluster) -> None:
    """Requests of several kinds and strategies, plus one invalid, so the query series exist."""
    client = RecClient(
        KafkaSettings(bootstrap_servers=cluster.kafka),
        cluster.topics.requests,
        cluster.topics.responses,
    )
    try:
        end = time.monotonic() + 15
        while True:  # until the query process serves the updater's model
            try:
                r = client.ask({"user_id": "u0"}, timeout=3)
                if r.strategy == "personalized":
                    break
            except TimeoutError:
                pass
            assert time.monotonic() < end, "the query process never served a personalized answer"
            time.sleep(0.2)
        for u in range(20):
            client.send({"user_id": f"u{u}", "k": 10})
        for u in range(5):
            client.send({"user_id": f"stranger-{u}", "k": 10})  # cold start: popular
        client.send({"kind": "similar_items", "item_id": "i1", "k": 5})
        client.send({"kind": "popular", "k": 5})
        client.send({"user_id": "u1", "k": -3})  # invalid: answered with an error
        got = client.collect(timeout=15)
    finally:
        client.close()
    assert len(got) == 28, f"only {len(got)} of 28 requests answered"
    assert any(r.error for r in got.values()), "the invalid request got no error"


def assert_rules_evaluate(prom: Prometheus, deadline: float) -> None:
    """Prometheus loaded deploy/prometheus/alerts.yml and every rule evaluates without error."""
    names = {r["alert"] for r in alert_rules()}
    while True:
        rules = [r for g in prom.api("rules")["data"]["groups"] for r in g["rules"]]
        health = {r["name"]: (r["health"], r.get("lastError", "")) for r in rules}
        if all(h == "ok" for h, _ in health.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert set(health) == names
    assert all(h == "ok" for h, _ in health.values()), health
