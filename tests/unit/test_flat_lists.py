"""`FlatLists` (stream_mf/flat_lists.py) through a replica's `SeenStore`, against a dict."""

from __future__ import annotations

import numpy as np

from stream_mf.model_log import SeenStore


def test_lists_written_again_and_compacted_equal_a_dict() -> None:
    rng = np.random.default_rng(3)
    store = SeenStore()
    ref: dict[int, np.ndarray] = {}
    compactions = 0
    for _ in range(300):
        rows = np.unique(rng.integers(0, 5000, size=int(rng.integers(1, 200))))
        lists = [np.sort(rng.integers(0, 2**31 - 1, size=int(rng.integers(0, 40)))) for _ in rows]
        before = store.items.size
        store.set_many(rows, [x.astype("<i4").tobytes() for x in lists])
        compactions += store.items.size < before
        ref.update(zip(rows.tolist(), lists, strict=True))
    assert compactions > 0
    for r in range(5100):
        np.testing.assert_array_equal(store.of(r), ref.get(r, np.empty(0, np.int64)))
    assert store.nbytes() == 4 * sum(x.size for x in ref.values())
    assert store.live == sum(x.size for x in ref.values())
