"""Id resolution registers unseen ids once, in first-seen order, and only through `resolve`."""

from __future__ import annotations

import numpy as np

from stream_mf.rng import USER_STREAM, init_rows
from stream_mf.state import EntityTable


def test_resolve_registers_new_ids_in_first_seen_order() -> None:
    t = EntityTable("user", 4, seed=3, init_scale=0.1, capacity=2)
    t.add(["a"])
    got = t.resolve(["b", "a", "c", "b", "c", "d"])
    np.testing.assert_array_equal(got, [1, 0, 2, 1, 2, 3])
    assert got.dtype == np.int32
    assert t.ids == ["a", "b", "c", "d"] and t.n == 4 and t.capacity >= 4
    assert dict(t.index) == {"a": 0, "b": 1, "c": 2, "d": 3}
    # new rows start from the seeded vector of their index, as `add` gives them
    want = np.zeros((4, 4), np.float32)
    init_rows(want, 0, 4, 3, USER_STREAM, 0.1)
    np.testing.assert_array_equal(t.factors[:4], want)
    # a batch of known ids registers nothing
    np.testing.assert_array_equal(t.resolve(["d", "a"]), [3, 0])
    assert t.n == 4 and t.index.fresh == []


def test_lookups_never_register() -> None:
    t = EntityTable("item", 4, seed=0, init_scale=0.1)
    t.add(["x"])
    assert t.index.get("y") is None and "y" not in t.index
    np.testing.assert_array_equal(t.lookup(["y", "x"]), [-1, 0])
    assert t.n == 1 and t.ids == ["x"]
