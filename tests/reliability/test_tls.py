"""Transport security: the product's services over TLS, certificate failures, secret hygiene.

Tansu cannot terminate TLS, so `stunnel4` does it in front of an embedded broker that advertises
the TLS port (tests/reliability/tls_proxy.py). Every client here is built the way the product
builds them, from `KafkaSettings.client_config()`, and the services are the real `stream-mf`
processes configured through `STREAM_MF_KAFKA__*` environment variables.
"""

from __future__ import annotations

import os
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from confluent_kafka import KafkaError, TopicPartition

from consumers import kafka_io
from consumers.cli import build_parser
from consumers.client import RecClient
from consumers.local_broker import free_port
from consumers.processes import ManagedProcess, metric_sum, scrape, wait_until
from consumers.publish import publish
from consumers.settings import KafkaSettings, ProcessSettings, TopicSettings
from stream_mf.messages import RecResponse
from tests.integration.conftest import Cluster, make_topics, topic_env
from tests.reliability.tls_proxy import (
    CertFiles,
    TlsBroker,
    admin,
    create_topics,
    make_ca,
    make_server_cert,
    missing_tools,
)
from tests.synthetic import planted_stream

_MISSING = missing_tools()
needs_tls = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")

CERT_ERROR = "certificate verify failed"
HANDSHAKE_ERROR = "SSL handshake failed"


@dataclass(frozen=True)
class Pki:
    ca: CertFiles
    server: CertFiles
    other_ca: CertFiles  # a second, unrelated self-signed CA: the wrong one


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if _MISSING:
        pytest.skip(_MISSING)
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d, "ca")
    return Pki(ca=ca, server=make_server_cert(d, ca), other_ca=make_ca(d, "other-ca"))


@pytest.fixture(scope="module")
def tls_broker(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    broker = TlsBroker(tmp_path_factory.mktemp("tls-broker"), pki.server, pki.ca)
    try:
        yield broker.start()
    finally:
        broker.stop()


def product_topics(kafka: KafkaSettings) -> TopicSettings:
    """The product's topic layout with unique names, created over TLS."""
    return make_topics(kafka.bootstrap_servers, client_config=kafka.client_config())


def event_payloads(n_events: int, n_users: int, n_items: int) -> list[tuple[bytes, bytes]]:
    s = planted_stream(n_events, n_users, n_items, n_groups=4, seed=9)
    out = []
    for u, i, t in zip(s.users.tolist(), s.items.tolist(), s.times.tolist(), strict=True):
        doc = {"user_id": f"u{u}", "item_id": f"i{i}", "event_type": "view", "timestamp": t}
        out.append((f"u{u}".encode(), orjson.dumps(doc)))
    return out


def personalized(client: RecClient, user: str, timeout: float) -> RecResponse:
    end = time.monotonic() + timeout
    last: RecResponse | None = None
    while time.monotonic() < end:
        try:
            last = client.ask({"user_id": user, "k": 10}, timeout=5)
        except TimeoutError:
            continue
        if last.error is None and last.strategy == "personalized":
            return last
        time.sleep(0.2)
    raise AssertionError(f"no personalized answer for {user} within {timeout} s (last: {last})")


def _settings_line(log_text: str, kind: str) -> str:
    lines = [ln for ln in log_text.splitlines() if f"{kind} settings:" in ln]
    assert lines, f"no '{kind} settings:' line in the log:\n{log_text[-3000:]}"
    return lines[0]


# -- A: the services over TLS ----------------------------------------------------------------


@needs_tls
@pytest.mark.integration
@pytest.mark.timeout(60)
def test_services_work_over_tls(tls_broker: TlsBroker, tmp_path: Path) -> None:
    kafka = tls_broker.settings()
    md = admin(kafka).list_topics(timeout=10)
    assert [b.port for b in md.brokers.values()] == [tls_broker.tls_port], (
        "Tansu must advertise the TLS port, or clients would bypass stunnel after bootstrap"
    )
    topics = product_topics(kafka)
    cluster = Cluster(tls_broker.bootstrap_servers, topics, tmp_path)
    client: RecClient | None = None
    try:
        cluster.start("updater", "updater", env=tls_broker.env())
        cluster.start("query", "query-1", env=tls_broker.env())
        payloads = event_payloads(4_000, 60, 200)
        sent = publish(kafka_io.producer(kafka), topics.interactions, payloads, progress=False)
        assert sent == len(payloads)
        cluster.wait_metric("updater", "stream_mf_events_applied_total", len(payloads), 30)
        client = RecClient(kafka, topics.requests, topics.responses)
        resp = personalized(client, "u0", timeout=30)
        assert resp.user_id == "u0" and len(resp.items) == 10
    finally:
        if client is not None:
            client.close()
        cluster.stop_all()
    for proc in cluster.procs:
        text = proc.log_path.read_text(errors="replace")
        assert '"security_protocol":"SSL"' in _settings_line(text, proc.name.split("-")[0])
        assert HANDSHAKE_ERROR not in text and CERT_ERROR not in text, text[-3000:]
    assert "accepted connection" in tls_broker.stunnel_log.read_text(errors="replace")


# -- B: the wrong CA -------------------------------------------------------------------------


@needs_tls
@pytest.mark.integration
@pytest.mark.timeout(60)
def test_wrong_ca_fails_with_a_certificate_error(
    tls_broker: TlsBroker, pki: Pki, tmp_path: Path
) -> None:
    topics = product_topics(tls_broker.settings())
    wrong = tls_broker.settings(pki.other_ca.cert)

    errors: list[KafkaError] = []
    producer = kafka_io.producer(wrong, error_cb=errors.append)
    producer.produce(topics.interactions, value=b"{}")
    end = time.monotonic() + 15
    while not any(e.code() == KafkaError._SSL for e in errors) and time.monotonic() < end:
        producer.poll(0.1)
    producer.purge()
    assert producer.flush(5) == 0
    ssl_errors = [str(e) for e in errors if e.code() == KafkaError._SSL]
    assert ssl_errors, f"no SSL error from a client trusting the wrong CA; got {errors}"
    assert HANDSHAKE_ERROR in ssl_errors[0] and CERT_ERROR in ssl_errors[0], ssl_errors[0]

    port = free_port()
    updater = ManagedProcess(
        "updater-wrong-ca",
        [
            "updater",
            "--bootstrap-servers",
            tls_broker.bootstrap_servers,
            "--state-dir",
            str(tmp_path / "state"),
            "--metrics-port",
            str(port),
        ],
        tmp_path,
        env={**topic_env(topics), **tls_broker.env(pki.other_ca.cert)},
    )
    try:
        updater.start()
        wait_until(
            lambda: CERT_ERROR in updater.log_tail(1_000_000) or not updater.alive(),
            20,
            0.2,
            "the updater to log a certificate-verification error",
        )
        log_text = updater.log_tail(1_000_000)
        assert CERT_ERROR in log_text and HANDSHAKE_ERROR in log_text, log_text[-3000:]
        url = f"http://127.0.0.1:{port}/metrics"
        wait_until(
            lambda: metric_sum(scrape(url), 'stream_mf_errors_total{kind="broker"}') >= 1,
            20,
            0.2,
            "stream_mf_errors_total{kind=broker} to count the failure",
        )
        assert metric_sum(scrape(url), "stream_mf_events_consumed_total") == 0
    finally:
        updater.stop()


# -- C: secrets stay secret ------------------------------------------------------------------


def test_secrets_are_masked_in_settings() -> None:
    k = KafkaSettings.model_validate(
        {
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": "alice",
            "sasl_password": "s3cret",
            "ssl_key_password": "k3y",
        }
    )
    outer = ProcessSettings(kafka=k)
    for text in (
        repr(k),
        str(k),
        k.model_dump_json(),
        str(k.model_dump()),
        repr(outer),
        str(outer),
        outer.model_dump_json(),
    ):
        assert "s3cret" not in text and "k3y" not in text, text
    assert "alice" in k.model_dump_json() and "**********" in k.model_dump_json()
    conf = k.client_config()
    assert conf["sasl.password"] == "s3cret" and conf["ssl.key.password"] == "k3y"
    assert conf["sasl.username"] == "alice" and conf["sasl.mechanism"] == "SCRAM-SHA-512"


@pytest.mark.timeout(60)
def test_secrets_stay_out_of_the_startup_log_and_metrics(tmp_path: Path) -> None:
    password, key_password = f"s3cret-{uuid.uuid4().hex}", f"k3y-{uuid.uuid4().hex}"
    metrics_port = free_port()
    updater = ManagedProcess(
        "updater",
        [
            "updater",
            "--bootstrap-servers",
            f"127.0.0.1:{free_port()}",  # nothing listens there
            "--state-dir",
            str(tmp_path / "state"),
            "--metrics-port",
            str(metrics_port),
        ],
        tmp_path,
        env={
            "STREAM_MF_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "STREAM_MF_KAFKA__SASL_MECHANISM": "SCRAM-SHA-256",
            "STREAM_MF_KAFKA__SASL_USERNAME": "alice",
            "STREAM_MF_KAFKA__SASL_PASSWORD": password,
            "STREAM_MF_KAFKA__SSL_KEY_PASSWORD": key_password,
        },
    )
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        updater.start()

        def metrics_up() -> bool:
            if not updater.alive():
                raise AssertionError(f"updater exited:\n{updater.log_tail()}")
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status == 200

        wait_until(metrics_up, 30, 0.2, "the updater's /metrics")
        time.sleep(1.0)  # let librdkafka try (and fail) to connect, and log about it
        with urllib.request.urlopen(url, timeout=5) as resp:
            metrics_text = resp.read().decode()
    finally:
        updater.stop()
    log_text = updater.log_path.read_text(errors="replace")
    line = _settings_line(log_text, "updater")
    assert '"sasl_username":"alice"' in line and '"sasl_password":"**********"' in line, line
    assert '"ssl_key_password":"**********"' in line, line
    assert "stream_mf_events_consumed_total" in metrics_text
    for secret in (password, key_password):
        assert secret not in log_text, "a secret is in the updater's log"
        assert secret not in metrics_text, "a secret is in the updater's /metrics"


def test_secrets_passed_through_extra_are_masked() -> None:
    k = KafkaSettings.model_validate({"extra": {"sasl.oauthbearer.client.secret": "0auth-s3cret"}})
    assert k.client_config()["sasl.oauthbearer.client.secret"] == "0auth-s3cret"
    for text in (repr(k), k.model_dump_json()):
        assert "0auth-s3cret" not in text, text


# -- D: SASL/SCRAM against a real broker ------------------------------------------------------

SASL_ENV = (
    "KAFKA_BOOTSTRAP_SERVERS",
    "KAFKA_SASL_USERNAME",
    "KAFKA_SASL_PASSWORD",
    "KAFKA_SASL_MECHANISM",
)


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_sasl_scram_against_a_real_broker() -> None:
    missing = [name for name in SASL_ENV if not os.environ.get(name)]
    if missing:
        pytest.skip(
            "SASL/SCRAM needs a real broker with SCRAM users; set "
            f"{', '.join(SASL_ENV)} (missing: {', '.join(missing)}; optional "
            "KAFKA_SECURITY_PROTOCOL, default SASL_SSL, and KAFKA_SSL_CA_LOCATION)"
        )
    ca = os.environ.get("KAFKA_SSL_CA_LOCATION")
    kafka = KafkaSettings.model_validate(
        {
            "bootstrap_servers": os.environ["KAFKA_BOOTSTRAP_SERVERS"],
            "security_protocol": os.environ.get("KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
            "sasl_mechanism": os.environ["KAFKA_SASL_MECHANISM"],
            "sasl_username": os.environ["KAFKA_SASL_USERNAME"],
            "sasl_password": os.environ["KAFKA_SASL_PASSWORD"],
            "ssl_ca_location": Path(ca) if ca else None,
        }
    )
    topic = f"stream-mf-sasl-{uuid.uuid4().hex[:8]}"
    create_topics(kafka, {topic: 1})
    try:
        payloads = [(f"u{j}".encode(), f"v{j}".encode()) for j in range(100)]
        assert publish(kafka_io.producer(kafka), topic, payloads, progress=False) == 100
        consumer = kafka_io.consumer(kafka, f"stream-mf-sasl-{uuid.uuid4().hex[:8]}")
        got: list[bytes] = []
        try:
            consumer.assign([TopicPartition(topic, 0, 0)])
            end = time.monotonic() + 30
            while len(got) < 100 and time.monotonic() < end:
                got += [
                    kafka_io.payload(m) for m in kafka_io.drain(consumer, 500, 0.5) if not m.error()
                ]
        finally:
            consumer.close()
        assert got == [v for _, v in payloads]

        errors: list[KafkaError] = []
        bad = kafka.model_copy(update={"sasl_password": "not-the-password"})
        producer = kafka_io.producer(bad, error_cb=errors.append)
        end = time.monotonic() + 20
        while not any(e.code() == KafkaError._AUTHENTICATION for e in errors) and (
            time.monotonic() < end
        ):
            producer.poll(0.2)
        assert any(e.code() == KafkaError._AUTHENTICATION for e in errors), errors
    finally:
        admin(kafka).delete_topics([topic], operation_timeout=10)


# -- a product bug found on the way -----------------------------------------------------------


@needs_tls
@pytest.mark.integration
@pytest.mark.timeout(60)
def test_rebuild_request_over_tls(tls_broker: TlsBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    kafka = tls_broker.settings()
    topics = product_topics(kafka)
    for k, v in {**tls_broker.env(), "STREAM_MF_TOPICS__CONTROL": topics.control}.items():
        monkeypatch.setenv(k, v)
    watcher = kafka_io.consumer(kafka, f"watch-{uuid.uuid4().hex[:8]}")
    try:
        watcher.assign([TopicPartition(topics.control, 0, 0)])
        # the flags as the user types them: the parser fills in every default (--timeout)
        args = build_parser().parse_args(
            ["rebuild", "--bootstrap-servers", tls_broker.bootstrap_servers]
        )
        code = args.run(args)  # what `stream-mf rebuild` runs
        assert code == 0
        got: list[bytes] = []
        end = time.monotonic() + 10
        while not got and time.monotonic() < end:
            got = [kafka_io.payload(m) for m in kafka_io.drain(watcher, 10, 0.5) if not m.error()]
        assert got and orjson.loads(got[0]) == {"command": "rebuild"}
    finally:
        watcher.close()
