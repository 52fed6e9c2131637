"""A TLS front for the embedded broker, for tests: throwaway certificates, Tansu, stunnel.

Tansu 0.6.0 cannot terminate TLS itself (its ``--cert``/``--key`` flags conflict), so a real
terminator, Debian's ``stunnel4``, sits in front of it::

    client --TLS--> 127.0.0.1:<tls_port> (stunnel) --plain--> 127.0.0.1:<plain_port> (Tansu)

Tansu listens on the plain port but *advertises* the TLS port, so every connection a client
makes after bootstrapping (metadata names the broker by its advertised address) goes through
stunnel as well. :class:`consumers.local_broker.EmbeddedBroker` always advertises its listener
URL and Tansu refuses a second ``--advertised-listener-url``, so :class:`TlsBroker` starts the
binary itself, with the same hygiene: own process group, SIGKILL on parent death, log in a file,
stop by PID.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from consumers.local_broker import free_port, tansu_binary
from consumers.settings import KafkaSettings

log = logging.getLogger(__name__)

_HOST = "127.0.0.1"
_PR_SET_PDEATHSIG = 1


def stunnel_binary() -> str | None:
    """Debian ships the binary as ``stunnel4`` (``stunnel`` is a symlink to it)."""
    return shutil.which("stunnel4") or shutil.which("stunnel")


def missing_tools() -> str | None:
    """Why the TLS tests cannot run here, or None when they can."""
    missing = [
        name
        for name, found in (
            ("stunnel4 (or stunnel)", stunnel_binary()),
            ("openssl", shutil.which("openssl")),
        )
        if not found
    ]
    if not missing:
        return None
    return (
        f"TLS tests need {' and '.join(missing)} on PATH "
        "(Debian/Ubuntu: apt-get install -y stunnel4 openssl)"
    )


# -- certificates ----------------------------------------------------------------------------

_OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no

[dn]
CN = {cn}

[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash

[v3_server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:{ip}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path


def _openssl(*args: str) -> None:
    proc = subprocess.run(
        ["openssl", *args], capture_output=True, text=True, timeout=30, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed ({proc.returncode}):\n{proc.stderr}")


def _cnf(directory: Path, name: str, cn: str, ip: str = _HOST) -> Path:
    path = directory / f"{name}.cnf"
    path.write_text(_OPENSSL_CNF.format(cn=cn, ip=ip))
    return path


_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def make_ca(directory: Path, name: str = "ca") -> CertFiles:
    """A self-signed CA (P-256, valid two days) as ``<name>.pem`` and ``<name>.key``."""
    directory.mkdir(parents=True, exist_ok=True)
    cnf = _cnf(directory, name, f"stream-mf throwaway CA {name} {uuid.uuid4().hex[:8]}")
    out = CertFiles(directory / f"{name}.pem", directory / f"{name}.key")
    _openssl(
        "req",
        "-x509",
        "-config",
        str(cnf),
        "-extensions",
        "v3_ca",
        *_EC_KEY,
        "-keyout",
        str(out.key),
        "-out",
        str(out.cert),
        "-days",
        "2",
    )
    return out


def make_server_cert(
    directory: Path, ca: CertFiles, name: str = "server", ip: str = _HOST
) -> CertFiles:
    """A server certificate signed by ``ca`` with ``subjectAltName = IP:<ip>``.

    librdkafka verifies the broker's address against the certificate by default
    (``ssl.endpoint.identification.algorithm=https``), and an IP literal only matches an IP SAN.
    """
    cnf = _cnf(directory, name, ip, ip)
    csr = directory / f"{name}.csr"
    out = CertFiles(directory / f"{name}.pem", directory / f"{name}.key")
    _openssl(
        "req", "-new", "-config", str(cnf), *_EC_KEY, "-keyout", str(out.key), "-out", str(csr)
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca.cert),
        "-CAkey",
        str(ca.key),
        "-set_serial",
        str(secrets.randbits(63)),
        "-days",
        "2",
        "-out",
        str(out.cert),
        "-extfile",
        str(cnf),
        "-extensions",
        "v3_server",
    )
    return out


# -- processes -------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGKILL it when the parent thread dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _spawn(
    cmd: list[str], log_path: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as out:
        return subprocess.Popen(
            cmd,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )


def stop_pid(proc: subprocess.Popen[bytes] | None, grace: float = 3.0) -> None:
    """SIGTERM the child's process group (its id is the child's PID), SIGKILL after ``grace``."""
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_bytes()[-n:].decode(errors="replace")
    except OSError:
        return ""


def admin(kafka: KafkaSettings) -> AdminClient:
    """An AdminClient from the same settings as every product client (``client_config()``)."""
    conf: dict[str, Any] = {**kafka.client_config(), "logger": log}
    return AdminClient(conf)


def create_topics(kafka: KafkaSettings, topics: Mapping[str, int], timeout: float = 15.0) -> None:
    """Like :func:`consumers.topics.create_topics`, but through ``KafkaSettings`` (TLS, SASL)."""
    client = admin(kafka)
    new = [NewTopic(name, num_partitions=n, replication_factor=1) for name, n in topics.items()]
    for future in client.create_topics(new, request_timeout=timeout).values():
        try:
            future.result(timeout=timeout)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    deadline = time.monotonic() + timeout
    while True:
        md = client.list_topics(timeout=max(0.1, min(2.0, deadline - time.monotonic())))
        if all(t in md.topics and md.topics[t].partitions for t in topics):
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"topics not visible after {timeout} s: {sorted(topics)}")
        time.sleep(0.05)


class TlsBroker:
    """Tansu on a plain loopback port, advertising the TLS port that stunnel listens on."""

    def __init__(
        self, work: Path, server: CertFiles, ca: CertFiles, startup_timeout: float = 20.0
    ) -> None:
        self.work = work
        self.server = server
        self.ca = ca
        self.startup_timeout = startup_timeout
        self.cluster_id = f"stream-mf-tls-{uuid.uuid4().hex[:12]}"
        self.plain_port = 0
        self.tls_port = 0
        self.tansu: subprocess.Popen[bytes] | None = None
        self.stunnel: subprocess.Popen[bytes] | None = None
        self.tansu_log = work / "tansu.log"
        self.stunnel_log = work / "stunnel.log"

    @property
    def bootstrap_servers(self) -> str:
        return f"{_HOST}:{self.tls_port}"

    def settings(self, ca: Path | None = None, **more: object) -> KafkaSettings:
        """Client settings for the TLS listener, trusting ``ca`` (default: the right CA)."""
        return KafkaSettings.model_validate(
            {
                "bootstrap_servers": self.bootstrap_servers,
                "security_protocol": "SSL",
                "ssl_ca_location": ca or self.ca.cert,
                **more,
            }
        )

    def env(self, ca: Path | None = None) -> dict[str, str]:
        """The same, as environment variables for a `stream-mf` child process."""
        return {
            "STREAM_MF_KAFKA__SECURITY_PROTOCOL": "SSL",
            "STREAM_MF_KAFKA__SSL_CA_LOCATION": str(ca or self.ca.cert),
        }

    def start(self) -> TlsBroker:
        self.work.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, 4):  # a free port can be taken before we bind it
            try:
                self._start_once()
                return self
            except RuntimeError:
                self.stop()
                if attempt == 3:
                    raise
                log.warning("TLS broker failed to start, retrying on other ports")
        raise AssertionError("unreachable")

    def _start_once(self) -> None:
        self.plain_port, self.tls_port = free_port(), free_port()
        while self.tls_port == self.plain_port:
            self.tls_port = free_port()
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in {"SCHEMA_REGISTRY", "OTEL_EXPORTER_OTLP_ENDPOINT"}
        }
        env["NO_COLOR"] = "1"
        self.tansu = _spawn(
            [
                tansu_binary(),
                "broker",
                "--cluster-id",
                self.cluster_id,
                "--listener-url",
                f"tcp://{_HOST}:{self.plain_port}",
                "--advertised-listener-url",
                f"tcp://{_HOST}:{self.tls_port}",
                "--storage-engine",
                "memory://tansu/",
            ],
            self.tansu_log,
            env,
        )
        conf = self.work / "stunnel.conf"
        conf.write_text(
            "foreground = yes\n"
            "pid =\n"
            "syslog = no\n"
            "debug = notice\n"
            "[kafka]\n"
            f"accept = {_HOST}:{self.tls_port}\n"
            f"connect = {_HOST}:{self.plain_port}\n"
            f"cert = {self.server.cert}\n"
            f"key = {self.server.key}\n"
        )
        stunnel = stunnel_binary()
        assert stunnel is not None, missing_tools()
        self.stunnel = _spawn([stunnel, str(conf)], self.stunnel_log)
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Ready when a metadata request over TLS reaches *our* Tansu through stunnel."""
        client = admin(self.settings())
        deadline = time.monotonic() + self.startup_timeout
        last: object = None
        while time.monotonic() < deadline:
            for name, proc, path in (
                ("tansu", self.tansu, self.tansu_log),
                ("stunnel", self.stunnel, self.stunnel_log),
            ):
                if proc is None or proc.poll() is not None:
                    raise RuntimeError(f"{name} exited during startup:\n{_tail(path)}")
            tail = _tail(self.tansu_log)
            if "AddrInUse" in tail or "panicked" in tail:
                raise RuntimeError(f"tansu failed to start:\n{tail}")
            try:
                md = client.list_topics(timeout=1.0)
            except KafkaException as exc:
                last = exc
            else:
                if md.cluster_id == self.cluster_id:
                    return
                last = f"another broker answers (cluster id {md.cluster_id!r})"
            time.sleep(0.1)
        raise RuntimeError(
            f"TLS broker not ready within {self.startup_timeout} s ({last});\n"
            f"tansu log:\n{_tail(self.tansu_log)}\nstunnel log:\n{_tail(self.stunnel_log)}"
        )

    def pids(self) -> list[int]:
        return [p.pid for p in (self.tansu, self.stunnel) if p is not None]

    def stop(self) -> None:
        """Stop stunnel, then Tansu, each by PID; idempotent."""
        try:
            stop_pid(self.stunnel)
        finally:
            stop_pid(self.tansu)

    def __enter__(self) -> TlsBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
