"""The query side of the store: follow the writer and serve consistent snapshots.

A RocksDB secondary instance replays the writer's WAL on `catch_up()`; each WriteBatch is applied
whole, so a snapshot never mixes two batches. The item side is rebuilt into an immutable
`ItemView` only when the writer has moved on, and swapped in by reference; users are read on
demand, one block get and one prefix scan per request, pinned to the view's model generation
(`users_for`). So `refresh` may run on its own thread while others read: a reader takes
`view` once per request and never sees a half-built one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from stream_mf.answer import UserRecord, UserSource
from stream_mf.config import ModelConfig
from stream_mf.recommend import ItemView
from stream_mf.store import StateStore, StoreError

__all__ = ["StoreFollower"]


class StoreFollower:
    def __init__(self, path: str | os.PathLike[str], secondary_dir: str | None = None):
        self._own: Path | None = None
        if secondary_dir is None:
            self._own = _secondary_dir()
            secondary_dir = str(self._own)
        try:
            self.store = StateStore(path, secondary=secondary_dir)
        except BaseException:
            if self._own is not None:
                shutil.rmtree(self._own, ignore_errors=True)
            raise
        self.catch_up_seconds = 0.0  # of the last refresh: WAL replay, apart from the reload
        self.config: ModelConfig | None = None
        self.view: ItemView | None = None
        self.events_applied = -1
        self.commit_seq = self.store.commit_seq()  # freshness counts commits after we start
        self.model_version = -1
        self.loaded_at = 0.0

    def refresh(self) -> bool:
        """Catch up with the writer; True when a newer snapshot is now served."""
        t0 = time.perf_counter()
        self.store.catch_up()
        self.catch_up_seconds = time.perf_counter() - t0
        events, version = self.store.events_applied(), self.store.model_version()
        if events == self.events_applied and version == self.model_version:
            return False
        if self.config is None:
            self.config = self.store.stored_config()
            if self.config is None:
                return False
        n_items = self.store.counts()[1]
        ids = self.store.item_ids(list(self.view.ids) if self.view else [])
        if len(ids) < n_items:
            raise StoreError("item id map behind item count: store is inconsistent")
        gen = self.store.generation()
        factors, bias, logpop = self.store.item_arrays(self.config.dim, n_items, gen)
        self.view = ItemView(
            factors=factors,
            bias=bias,
            logpop=logpop,
            ids=ids,
            index={k: j for j, k in enumerate(ids)}
            if self.view is None
            else _extend_index(self.view.index, ids),
            clock=self.store.clock(),
            decay_rate=self.config.decay_rate,
            model_version=version,
            generation=gen,
        )
        self.events_applied, self.model_version = events, version
        self.loaded_at = time.time()
        return True

    def new_commits(self) -> list[tuple[int, np.ndarray]]:
        """(events, sampled event times) of every commit since the last call."""
        self.commit_seq, out = self.store.batch_log(self.commit_seq)
        return out

    def user(self, user_id: str, generation: int | None = None) -> UserRecord | None:
        if self.config is None:
            return None
        row = self.store.user_row(user_id, self.config.dim, generation)
        if row is None:
            return None
        u, vec, count = row
        items, _ = self.store.user_items(u)
        return UserRecord(index=u, vector=vec, events=count, seen=items.astype(np.int64))

    def users_for(self, view: ItemView) -> UserSource:
        """Users as of `view`'s model generation. A refresh on another thread may already have
        caught up with a rebuild's swap while a request still holds the older view: a user
        vector of the new model scored against the old item factors would rank noise (until
        the old generation is dropped, such a user gets its old-model row; after, none)."""
        return _PinnedUsers(self, view.generation)

    def close(self) -> None:
        self.store.close()
        if self._own is not None:
            shutil.rmtree(self._own, ignore_errors=True)


class _PinnedUsers:
    def __init__(self, follower: StoreFollower, generation: int) -> None:
        self.follower, self.generation = follower, generation

    def user(self, user_id: str) -> UserRecord | None:
        return self.follower.user(user_id, self.generation)


def _secondary_dir() -> Path:
    """A secondary instance's own files: one directory per process under one parent, where a
    process killed before cleaning up is tidied by the next one to start."""
    parent = Path(tempfile.gettempdir()) / "stream-mf-secondary"
    parent.mkdir(parents=True, exist_ok=True)
    for d in parent.iterdir():
        head = d.name.split("-", 1)[0]
        pid = int(head) if head.isdigit() else -1
        if pid > 0 and pid != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(d, ignore_errors=True)
    own = parent / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    own.mkdir()
    return own


def _extend_index(index: dict[str, int], ids: list[str]) -> dict[str, int]:
    if len(index) == len(ids):
        return index
    out = dict(index)
    for j in range(len(index), len(ids)):
        out[ids[j]] = j
    return out
