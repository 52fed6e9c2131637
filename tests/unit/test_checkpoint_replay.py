"""After a crash the model log is ahead of the store (batches published before their
checkpoint): the publisher holds the replay back until it passes the log's last marker, and
an offset moved back on purpose starts a new epoch instead (consumers/model_log.py). No broker:
the producer is created but nothing is sent while holding."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from consumers.model_log import ModelLogPublisher
from consumers.settings import KafkaSettings, MetricsSettings, UpdaterSettings
from stream_mf.config import ModelConfig
from stream_mf.model import EventBatch, OnlineModel
from stream_mf.state import ModelState
from stream_mf.store import CommitInfo, StateStore
from tests.synthetic import planted_stream

CFG = ModelConfig(dim=8, n_negatives=3, sampler_refresh=500)


def _info(state: ModelState, seq: int, offset: int, events: int) -> CommitInfo:
    rows = np.arange(min(state.users.n, 5), dtype=np.int64)
    return CommitInfo(
        state=state, seq=seq, users=rows, items=rows, pair_keys=np.empty(0, np.int64),
        everything=False, generation=None, offsets={("t", 0): offset}, event_times=None,
        events=events, durable=False,
    )  # fmt: skip


def test_a_replay_behind_the_log_publishes_nothing_until_it_passes_it(tmp_path: Path) -> None:
    s = planted_stream(500, 50, 40, seed=3)
    model = OnlineModel(CFG, ModelState.empty(CFG))
    model.learn(EventBatch.build(s.user_ids(), s.item_ids(), np.ones(500), s.times))
    settings = UpdaterSettings(
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:9"),  # nothing listens: never used
        metrics=MetricsSettings(port=-1),
        state_dir=tmp_path / "state",
        model=CFG,
    )
    with StateStore(tmp_path / "state") as store:
        p = ModelLogPublisher(settings, store)
        sent: list[bytes] = []
        p._produce = lambda key, *_a, **_k: sent.append(key)  # type: ignore[method-assign]
        try:
            p._started = True  # the look-up found a marker at offset 100 (a crash at 50)
            p.offsets, p.reach, p.need_snapshot = {"t/0": 50}, {"t/0": 100}, True
            for seq, off in ((1, 70), (2, 100 - 1)):
                p.committed(_info(model.state, seq, off, 20))
                assert p.holding() and not sent, "a replayed commit went out"
            assert p.replayed == 40 and p.seq == 2
            p.offsets["t/0"] = 100  # caught up: the next commit publishes (a snapshot)
            assert not p.holding() and p.reach == {}
            # an offset moved back (offset gap) is a new epoch, not a replay to hold back
            p.reach = {"t/0": 100}
            p.moved_offsets(["t/0"], epoch=1)
            assert p.epoch == 1 and p.reach == {} and p.need_snapshot
            # a batch failing with batches since the checkpoint: a replay up to what went out
            p.offsets = {"t/0": 130}
            p.replay_from_here()
            assert p.reach == {"t/0": 130}
        finally:
            p.producer.purge()
