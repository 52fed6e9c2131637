"""Shared benchmark plumbing: argument convention, timers, a table printer and JSON results.

Every bench script takes `--quick` (a smaller run for CI and smoke checks, under 30 s) and writes
`bench/results/<name>.json` (`<name>.quick.json` for quick runs) with the machine it ran on:
figures from 2 shared, noisy cores only mean something next to a reference from the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:  # `tests.synthetic` lives outside the installed package
    sys.path.insert(0, str(ROOT))

#: Environment variables that bound BLAS/OpenMP thread pools; set them *before* numpy is imported.
BLAS_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

# The stream every throughput bench uses (bench_sgd, bench_store): same ids, same order.
STREAM_FULL = {"n_events": 1_000_000, "n_users": 100_000, "n_items": 50_000, "n_groups": 20}
STREAM_QUICK = {"n_events": 200_000, "n_users": 100_000, "n_items": 50_000, "n_groups": 20}
#: Event-type weights (view, click, add_to_cart, purchase) and how often each type occurs.
TYPE_WEIGHTS = np.array([1.0, 2.0, 4.0, 8.0])
TYPE_FREQ = np.array([0.70, 0.20, 0.07, 0.03])


def bench_args(
    description: str | None,
    argv: Sequence[str] | None = None,
    parents: Sequence[argparse.ArgumentParser] = (),
) -> argparse.Namespace:
    """The common flags: `--quick` for a smaller run, `--out` to override the JSON path; a
    bench's own flags come in `parents` (made with add_help=False), so --help lists them all."""
    ap = argparse.ArgumentParser(description=description, parents=list(parents))
    ap.add_argument("--quick", action="store_true", help="smaller run (under 30 s)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/)")
    return ap.parse_args(argv)


def synthetic_events(quick: bool) -> tuple[Any, Any]:
    """(PlantedStream, EventBatch) for the shared stream; ids are strings, as from Kafka.

    Weights are drawn from the default event-type weights so the decay/log-weight paths see
    realistic values rather than a constant.
    """
    from stream_mf.model import EventBatch
    from tests.synthetic import planted_stream

    spec = STREAM_QUICK if quick else STREAM_FULL
    s = planted_stream(
        spec["n_events"],
        n_users=spec["n_users"],
        n_items=spec["n_items"],
        n_groups=spec["n_groups"],
    )
    rng = np.random.default_rng(7)
    w = TYPE_WEIGHTS[rng.choice(len(TYPE_WEIGHTS), size=len(s.users), p=TYPE_FREQ)]
    return s, EventBatch.build(s.user_ids(), s.item_ids(), w, s.times)


# ---- timing ------------------------------------------------------------------------------------


class Stopwatch:
    """Accumulates wall time over many `with sw:` blocks (e.g. commit time across batches)."""

    def __init__(self) -> None:
        self.total = 0.0
        self._t0 = 0.0

    def __enter__(self) -> Stopwatch:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.total += time.perf_counter() - self._t0


def best_of(
    fn: Callable[[], object], repeats: int, setup: Callable[[], object] | None = None
) -> tuple[float, list[float]]:
    """(best, all) wall seconds of `fn()` over `repeats` runs; `setup()` runs untimed before each.

    Best-of is the figure to quote on a shared machine: noise only ever adds time.
    """
    times = []
    for _ in range(max(repeats, 1)):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), times


def latencies_ms(fn: Callable[[int], object], n: int, warmup: int = 50) -> np.ndarray:
    """Per-call latency in ms of `fn(q)` for q in range(n), after `warmup` untimed calls."""
    for q in range(min(warmup, n)):
        fn(q)
    out = np.empty(n)
    clock = time.perf_counter_ns
    for q in range(n):
        t0 = clock()
        fn(q)
        out[q] = clock() - t0
    return out / 1e6


def interleaved_latencies_ms(
    fns: Sequence[Callable[[int], object]], n: int, warmup: int = 50
) -> tuple[np.ndarray, np.ndarray]:
    """(wall, thread-CPU) latencies in ms, each (len(fns), n); query q runs every fn in turn.

    Interleaving (rotating the order) puts the implementations under the same bursts of noise
    from other processes, so their percentiles compare fairly on a busy machine. Thread CPU time
    leaves out time spent preempted: when wall p99 >> CPU p99, the tail is the scheduler's.
    """
    for q in range(min(warmup, n)):
        for fn in fns:
            fn(q)
    m = len(fns)
    wall = np.empty((m, n))
    cpu = np.empty((m, n))
    clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
    for q in range(n):
        for r in range(m):
            j = (q + r) % m
            c0 = cpu_clock()
            t0 = clock()
            fns[j](q)
            wall[j, q] = clock() - t0
            cpu[j, q] = cpu_clock() - c0
    return wall / 1e6, cpu / 1e6


def summarize_ms(samples: np.ndarray) -> dict[str, float]:
    """p50 / p99 / max (and mean) of latencies in ms."""
    return {
        "p50_ms": float(np.percentile(samples, 50)),
        "p99_ms": float(np.percentile(samples, 99)),
        "max_ms": float(samples.max()),
        "mean_ms": float(samples.mean()),
    }


# ---- output ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Col:
    """A table column: the row key, its header, and a format spec (or a callable)."""

    key: str
    header: str
    fmt: str | Callable[[Any], str] = ""


def fmt_rate(x: float) -> str:
    """Events/s in a readable unit (12.3k, 1.05M)."""
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def print_table(title: str, rows: Iterable[dict[str, Any]], cols: Sequence[Col]) -> str:
    """Print (and return) a plain right-aligned text table; missing cells show as '-'."""

    def cell(row: dict[str, Any], c: Col) -> str:
        v = row.get(c.key)
        if v is None:
            return "-"
        if callable(c.fmt):
            return c.fmt(v)
        return format(v, c.fmt)

    body = [[cell(r, c) for c in cols] for r in rows]
    widths = [max([len(c.header)] + [len(b[j]) for b in body]) for j, c in enumerate(cols)]
    lines = [title, "  ".join(c.header.rjust(w) for c, w in zip(cols, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(b, widths, strict=True)) for b in body]
    text = "\n".join(lines)
    print(text + "\n", flush=True)
    return text


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """What the figures depend on: cores, CPU, library versions, thread-pool settings, time."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "cpu_model": _cpu_model(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": _version("numba"),
        "rocksdict": _version("rocksdict"),
        "thread_env": {k: os.environ.get(k) for k in BLAS_THREAD_VARS},
    }


def results_path(name: str, quick: bool) -> Path:
    """bench/results/<name>.json, or <name>.quick.json so a smoke run never hides a full one."""
    return RESULTS / f"{name}{'.quick' if quick else ''}.json"


def write_results(name: str, payload: dict[str, Any], out: Path | None = None) -> Path:
    """Write `payload` plus machine info to `results_path(name, payload["quick"])` (or `out`)."""
    path = out or results_path(name, bool(payload.get("quick")))
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"bench": name, "machine": machine_info(), **payload}
    path.write_text(json.dumps(doc, indent=1, default=_json_default) + "\n")
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    load = doc["machine"]["load_avg_1m"]
    print(f"results: {shown} (1-min load average {load:.1f} on {os.cpu_count()} cores)")
    return path


def _json_default(o: object) -> object:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ---- old code against new, interleaved ---------------------------------------------------------


@contextlib.contextmanager
def source_tree(rev: str, tree: Path | None = None) -> Iterator[Path]:
    """A checkout of git revision `rev` to run as "old" code (`tree` if given: used as is).

    `git archive` into a temporary directory, so nothing is added to the repository's worktree
    list; removed afterwards. Its numba cache starts cold: every `--compare` excludes compile time
    (a warm-up, or timing from the first commit on).
    """
    if tree is not None:
        yield tree.resolve()
        return
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-at-{rev.replace('/', '_')}-"))
    try:
        archive = subprocess.run(
            ["git", "archive", "--format=tar", rev], cwd=ROOT, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def rev_label(rev: str) -> str:
    """`rev` as a short commit id (what the JSON records, so a branch name cannot drift)."""
    out = subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=ROOT, check=True, capture_output=True, text=True
    )
    return out.stdout.strip()


def in_tree(env: dict[str, str], tree: Path) -> dict[str, str]:
    """`env` with PYTHONPATH = `tree` only, so a child imports that checkout's stream_mf and
    consumers (the editable install's finder comes after PYTHONPATH)."""
    return {**env, "PYTHONPATH": str(tree)}


def round_order(r: int) -> tuple[str, str]:
    """Who goes first in round r: old, new, then new, old, ... (ABBA), so a drift in the load
    of other jobs over the run lands on both alike."""
    return ("old", "new") if r % 2 == 0 else ("new", "old")


def compare_summary(per_round: dict[str, list[float]], higher_is_better: bool) -> dict[str, Any]:
    """Medians of `old` and `new` over the rounds, new/old of the medians and of each round.

    The spread of the per-round ratios is the noise the verdict is read against: on this shared
    machine a median ratio inside [min, max] of the per-round ratios is no change.
    """
    old, new = np.asarray(per_round["old"]), np.asarray(per_round["new"])
    n = min(old.size, new.size)
    pair = new[:n] / old[:n]
    rounds = pair[np.isfinite(pair)].tolist()  # a failed round (NaN) is left out, not zeroed
    med_old, med_new = float(np.nanmedian(old)), float(np.nanmedian(new))
    ratio = med_new / med_old
    # "slower" in the direction of the figure: a rate that falls or a time that grows
    slowdown = 1 / ratio if higher_is_better else ratio
    return {
        "old": old.tolist(),
        "new": new.tolist(),
        "median_old": med_old,
        "median_new": med_new,
        "new_over_old": ratio,
        "per_round_new_over_old": rounds,
        "ratio_min": min(rounds) if rounds else None,
        "ratio_max": max(rounds) if rounds else None,
        "higher_is_better": higher_is_better,
        "slowdown": slowdown,
    }
