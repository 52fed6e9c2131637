"""Id resolution registers unseen ids once, in first-seen order, and only through `resolve`."""

from __future__ import annotations

import numpy as np
import pytest

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
    assert t.n == 4 and len(t.index) == 4 and t.ids == ["a", "b", "c", "d"]
    assert t.index.fresh is None  # registration is only armed while `resolve` runs


def test_lookups_never_register() -> None:
    t = EntityTable("item", 4, seed=0, init_scale=0.1)
    t.add(["x"])
    assert t.index.get("y") is None and "y" not in t.index
    np.testing.assert_array_equal(t.lookup(["y", "x"]), [-1, 0])
    assert t.n == 1 and t.ids == ["x"]


def test_indexing_an_unknown_id_outside_resolve_raises_and_registers_nothing() -> None:
    t = EntityTable("user", 4, seed=0, init_scale=0.1)
    t.resolve(["a", "b"])
    with pytest.raises(KeyError):
        t.index["zzz"]
    assert "zzz" not in t.index and t.n == 2
    # the next registration still gets the next row, in the index and in `ids` alike
    np.testing.assert_array_equal(t.resolve(["new", "a"]), [2, 0])
    assert t.ids == ["a", "b", "new"] and t.index["new"] == 2 and len(t.index) == t.n


def test_a_failed_resolve_registers_nothing_and_leaves_lookups_strict() -> None:
    t = EntityTable("user", 4, seed=0, init_scale=0.1)
    with pytest.raises(TypeError):
        t.resolve(["a", ["not", "hashable"]])  # type: ignore[list-item]
    assert len(t.index) == t.n == 0
    with pytest.raises(KeyError):
        t.index["a"]
    np.testing.assert_array_equal(t.resolve(["b"]), [0])
