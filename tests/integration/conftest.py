"""A real broker for the whole session, unique topics per test, and child processes that are
always stopped by PID."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from consumers.local_broker import free_port, kafka_bootstrap
from consumers.processes import ManagedProcess, metric_sum, scrape, wait_until
from consumers.settings import TopicSettings
from consumers.topics import create_topics


@pytest.fixture(scope="session")
def kafka() -> Iterator[str]:
    with kafka_bootstrap() as bootstrap:
        yield bootstrap


def make_topics(
    kafka: str, partitions: int = 1, client_config: dict[str, Any] | None = None
) -> TopicSettings:
    """The product's topics under unique names; `client_config` for a secured broker."""
    s = uuid.uuid4().hex[:8]
    t = TopicSettings(
        interactions=f"interactions-{s}",
        dead_letter=f"interactions-{s}.DLT",
        requests=f"rec-requests-{s}",
        responses=f"rec-responses-{s}",
        control=f"stream-mf-control-{s}",
        model=f"model-{s}",
        model_snapshots=f"model-{s}-snapshots",
        learner=f"learner-{s}",
    )
    create_topics(
        kafka,
        {t.interactions: partitions, t.dead_letter: 1, t.requests: 2, t.responses: 1, t.control: 1},
        client_config=client_config,
    )
    return t


def topic_env(t: TopicSettings) -> dict[str, str]:
    return {
        "STREAM_MF_TOPICS__INTERACTIONS": t.interactions,
        "STREAM_MF_TOPICS__DEAD_LETTER": t.dead_letter,
        "STREAM_MF_TOPICS__REQUESTS": t.requests,
        "STREAM_MF_TOPICS__RESPONSES": t.responses,
        "STREAM_MF_TOPICS__CONTROL": t.control,
        "STREAM_MF_TOPICS__MODEL": t.model,
        "STREAM_MF_TOPICS__MODEL_SNAPSHOTS": t.model_snapshots,
        "STREAM_MF_TOPICS__LEARNER": t.learner,
        "STREAM_MF_SESSION_TIMEOUT_MS": "6000",
    }


class Cluster:
    """The product's processes for one test; every one is stopped at teardown."""

    def __init__(self, kafka: str, topics: TopicSettings, work: Path):
        self.kafka, self.topics, self.work = kafka, topics, work
        self.state = work / "state"
        self.procs: list[ManagedProcess] = []
        self.ports: dict[str, int] = {}

    def start(
        self, kind: str, name: str, *extra: str, env: dict[str, str] | None = None
    ) -> ManagedProcess:
        port = free_port()
        self.ports[name] = port
        # a query process gets the broker only: its own empty working dir, no state dir (it
        # follows the model log)
        state = [] if kind == "query" else ["--state-dir", str(self.state)]
        argv = [
            kind,
            "--bootstrap-servers",
            self.kafka,
            *state,
            "--metrics-port",
            str(port),
            *extra,
        ]
        # a group per test and kind, so no test waits out another's departed members
        group = {"STREAM_MF_GROUP_ID": f"{kind}-{self.topics.interactions}"}
        env = {**topic_env(self.topics), **group, **(env or {})}
        cwd = None
        if kind == "query":
            cwd = self.work / f"{name}-cwd"
            cwd.mkdir(parents=True, exist_ok=True)
            env.pop("STREAM_MF_STATE_DIR", None)
        p = ManagedProcess(name, argv, self.work, env=env, cwd=cwd)
        self.procs.append(p.start())
        return p

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}/metrics"

    def metric(self, name: str, metric: str) -> float:
        try:
            return metric_sum(scrape(self.url(name)), metric)
        except OSError as exc:
            proc = next(p for p in self.procs if p.name == name)
            if proc.alive():
                raise
            raise AssertionError(f"{name} /metrics: {exc}; log:\n{proc.log_tail()}") from exc

    def wait_metric(self, name: str, metric: str, at_least: float, timeout: float = 60) -> None:
        proc = next(p for p in self.procs if p.name == name)

        def ok() -> bool:
            if not proc.alive():
                raise AssertionError(f"{name} exited:\n{proc.log_tail()}")
            return self.metric(name, metric) >= at_least

        wait_until(ok, timeout, 0.1, f"{name} {metric} >= {at_least}")

    def stop_all(self) -> None:
        for p in self.procs:
            p.stop()


@pytest.fixture
def cluster(kafka: str, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(kafka, make_topics(kafka), tmp_path)
    try:
        yield c
    finally:
        c.stop_all()
