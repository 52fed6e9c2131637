"""The collector is paused inside a batch and restored after it, even when the batch fails."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from consumers import gc_control


@pytest.fixture(autouse=True)
def _restore_gc() -> Iterator[None]:
    was = gc.isenabled()
    yield
    gc.unfreeze()
    if was:
        gc.enable()


def test_paused_disables_and_restores() -> None:
    gc.enable()
    with gc_control.paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_paused_restores_after_an_error_and_keeps_a_disabled_collector_disabled() -> None:
    gc.enable()
    with pytest.raises(ValueError), gc_control.paused():
        raise ValueError("batch failed")
    assert gc.isenabled()
    gc.disable()
    with gc_control.paused():
        pass
    assert not gc.isenabled()


def test_a_cycle_made_during_a_pause_is_collected_after_it() -> None:
    class Node:
        other: object = None

    gc.enable()
    with gc_control.paused():
        a, b = Node(), Node()
        a.other, b.other = b, a
        ref = weakref.ref(a)
        del a, b
        junk: list[list[int]] = [[] for _ in range(10_000)]  # would trigger collections if enabled
        assert ref() is not None and len(junk) == 10_000
    gc.collect()
    assert ref() is None


def test_freeze_startup_moves_live_objects_out_of_collections() -> None:
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    gc_control.freeze_startup()
    assert gc.get_freeze_count() > 0
