"""Restoring a lost updater disk from its learner snapshot on Kafka: time and size.

A model of 100k users x 50k items (dim 64) with 1M confidences is saved to a store; its learner
snapshot is written to the embedded broker (`SnapshotWriter`, the updater's code), then restored
into empty state dirs (`restore_if_empty`: read the topic back, check, decode, one commit). The
reference, interleaved in the same process, is the ordinary restart: `StateStore.load` of a
store that survived. Also: the snapshot's size, and its size per million confidences (the
marginal cost, from encoding the same model with 1M more).

Run: PYTHONPATH=. .venv/bin/python bench/bench_restore.py [--quick]
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from common import Col, bench_args, print_table, write_results

from consumers.learner_snapshot import SnapshotWriter
from consumers.local_broker import BOOTSTRAP_ENV, EmbeddedBroker
from consumers.restore import restore_if_empty
from consumers.settings import KafkaSettings, TopicSettings, UpdaterSettings
from stream_mf.config import ModelConfig
from stream_mf.learner_snapshot import LearnerSnapshot, encode
from stream_mf.sgd import Counter
from stream_mf.state import ModelState, fill_confidence
from stream_mf.store import StateStore


@contextlib.contextmanager
def broker() -> Iterator[str]:
    if os.environ.get(BOOTSTRAP_ENV):
        yield os.environ[BOOTSTRAP_ENV]
        return
    with EmbeddedBroker() as b:
        yield b.bootstrap_servers


def model(n_users: int, n_items: int, n_conf: int, seed: int = 0) -> ModelState:
    """A learnt-looking model: seeded factors, counts, times, popularity, sampler, confidences."""
    rng = np.random.default_rng(seed)
    st = ModelState.empty(ModelConfig(), capacity=max(n_users, n_items))
    st.users.add([f"user-{u:07d}" for u in range(n_users)])
    st.items.add([f"item-{i:06d}" for i in range(n_items)])
    for t in (st.users, st.items):
        n = t.n
        t.bias[:n] = rng.normal(0, 0.1, n).astype(np.float32)
        t.count[:n] = rng.integers(1, 100, n)
        t.last[:n] = 1.7e9 + rng.random(n) * 1e6
        t.logpop[:n] = rng.normal(0, 1, n)
    st.sync_capacity()
    st.cdf[:, :n_items] = np.cumsum(rng.random((3, n_items)), axis=1)
    st.counters[Counter.CDF_LEN] = n_items
    st.counters[Counter.EVENTS] = n_conf * 3
    st.clock[0] = 1.7e9 + 1e6
    keys = np.unique(
        rng.integers(0, n_users, n_conf * 2).astype(np.int64) << 32
        | rng.integers(0, n_items, n_conf * 2).astype(np.int64)
    )
    keys = rng.permutation(keys)[:n_conf]
    fill_confidence(st.confidence, keys, rng.normal(0, 1, keys.size))
    return st


def main() -> None:
    args = bench_args(__doc__)
    n_users, n_items, n_conf = (20_000, 10_000, 200_000) if args.quick else (
        100_000, 50_000, 1_000_000)  # fmt: skip
    reps = 2 if args.quick else 3
    work = Path(tempfile.mkdtemp(prefix="bench-restore-"))
    result: dict[str, Any] = {"quick": args.quick, "users": n_users, "items": n_items,
                              "confidences": n_conf, "dim": 64}  # fmt: skip
    try:
        t = time.perf_counter()
        st = model(n_users, n_items, n_conf)
        print(f"model built in {time.perf_counter() - t:.1f} s")
        offsets = {("interactions", 0): 123_456}
        with StateStore(work / "kept") as kept:
            kept.write_full_state(st, offsets)
            snap = LearnerSnapshot(st, kept.offsets(), 0, kept.commits())
        # size: the whole snapshot, and the marginal bytes of a million more confidences
        size = len(encode(snap))
        more = model(n_users, n_items, n_conf * 2)
        size2 = len(encode(LearnerSnapshot(more, offsets, 0, 1)))
        del more
        per_m = (size2 - size) / (n_conf / 1e6)
        with broker() as bs:
            topics = TopicSettings(interactions=f"bench-restore-{uuid.uuid4().hex[:6]}",
                                   model=f"bench-model-{uuid.uuid4().hex[:6]}")  # fmt: skip
            settings = UpdaterSettings(
                kafka=KafkaSettings(bootstrap_servers=bs), topics=topics, state_dir=work / "x"
            )
            w = SnapshotWriter(settings)
            t = time.perf_counter()
            assert w.submit(snap)
            encode_s = time.perf_counter() - t
            assert w.wait(600) and w.last is not None, "snapshot not written"
            write_s = time.perf_counter() - t
            w.close()
            loads: list[float] = []
            restores: list[float] = []
            for r in range(reps):  # interleaved: the ordinary restart, then a restore
                t = time.perf_counter()
                with StateStore(work / "kept") as kept:
                    ref = kept.load()
                loads.append(time.perf_counter() - t)
                d = work / f"restored-{r}"
                t = time.perf_counter()
                with StateStore(d) as store:
                    got = restore_if_empty(settings.model_copy(update={"state_dir": d}), store)
                    assert got is not None, "no snapshot found"
                    back = store.load()
                restores.append(time.perf_counter() - t)
                for name in ("factors", "count", "last", "logpop"):
                    a, b = getattr(ref.users, name), getattr(back.users, name)
                    assert a[: ref.users.n].tobytes() == b[: back.users.n].tobytes(), name
                assert len(back.confidence) == n_conf
                del ref, back
                shutil.rmtree(d, ignore_errors=True)
        result.update(
            snapshot_bytes=size, bytes_per_million_confidences=per_m,
            chunks=w.last.chunks, encode_seconds=encode_s, write_seconds=write_s,
            restore_seconds=restores, load_seconds=loads,
            restore_median=statistics.median(restores), load_median=statistics.median(loads),
            ratio=statistics.median(restores) / statistics.median(loads),
        )  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [
        {"what": "snapshot size", "value": f"{size / 1e6:.1f} MB ({w.last.chunks} records)"},
        {"what": "per 1M confidences (marginal)", "value": f"{per_m / 1e6:.1f} MB"},
        {"what": "encode (loop thread)", "value": f"{encode_s:.2f} s"},
        {"what": "encode + write to broker", "value": f"{write_s:.2f} s"},
        {
            "what": "restore (read, decode, commit, load)",
            "value": f"{result['restore_median']:.2f} s (median of {reps})",
        },
        {"what": "ordinary restart (store load)", "value": f"{result['load_median']:.2f} s"},
        {"what": "restore / ordinary restart", "value": f"{result['ratio']:.2f}x"},
    ]
    print_table(
        f"restore: {n_users:,} users x {n_items:,} items x {n_conf:,} confidences, dim 64",
        rows,
        [Col("what", "measure"), Col("value", "value")],
    )
    write_results("bench_restore", result, args.out)


if __name__ == "__main__":
    main()
