"""Starting and stopping the product's own processes (demo, tests): by PID, always.

Each child runs in its own process group and is stopped with SIGTERM, then SIGKILL after a
grace period, so nothing outlives its owner even when a test fails halfway.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from prometheus_client.parser import text_string_to_metric_families

from consumers.local_broker import die_with_parent


class ManagedProcess:
    """`stream-mf SUBCOMMAND ...` (or, with `script`, that Python file) as a child process with
    its log in a file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        env: dict | None = None,
        *,
        script: Path | None = None,
        cwd: Path | None = None,
    ):
        self.name = name
        self.cwd = cwd
        head = [str(script)] if script is not None else ["-m", "consumers.cli"]
        self.argv = [sys.executable, *head, *argv]
        self.log_path = Path(log_dir) / f"{name}.log"
        self.env = {**os.environ, **(env or {})}
        root = str(Path(__file__).resolve().parent.parent)
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (root, self.env.get("PYTHONPATH")) if p)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 (owned by the child)
        self.proc = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
            cwd=self.cwd,
            # a test run or demo killed outright (SIGKILL, an unhandled SIGTERM) runs no cleanup:
            # its children die with it instead of running on in their own sessions
            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> int:
        """SIGKILL now (crash simulation); returns the exit code."""
        assert self.proc is not None
        self._signal(signal.SIGKILL)
        return self.proc.wait(10)

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode

    def _signal(self, sig: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> ManagedProcess:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()


def scrape(url: str, timeout: float = 2.0) -> dict[str, float]:
    """Sample name (with labels) -> value, from a /metrics endpoint."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def metric_sum(samples: dict[str, float], name: str) -> float:
    """Sum of a metric over all its label sets."""
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


def wait_until(
    check: Callable[[], bool], timeout: float, interval: float = 0.1, what: str = "condition"
) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def histogram_quantile(
    before: dict[str, float], after: dict[str, float], name: str, q: float
) -> float | None:
    """PromQL's histogram_quantile over the increase between two scrapes, summed over series."""
    buckets: dict[float, float] = {}
    for k, v in after.items():
        if not k.startswith(name + "_bucket{"):
            continue
        le = k.split('le="', 1)[1].split('"', 1)[0]
        bound = float("inf") if le == "+Inf" else float(le)
        buckets[bound] = buckets.get(bound, 0.0) + v - before.get(k, 0.0)
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for b in bounds:
        if buckets[b] >= rank:
            if b == float("inf"):
                return prev_bound
            span = buckets[b] - prev_count
            frac = (rank - prev_count) / span if span > 0 else 1.0
            return prev_bound + (b - prev_bound) * frac
        prev_bound, prev_count = b, buckets[b]
    return prev_bound
