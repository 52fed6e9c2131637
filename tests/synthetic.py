"""Synthetic streams with planted structure, shared by tests and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PlantedStream:
    users: np.ndarray  # int32 user index
    items: np.ndarray  # int32 item index
    times: np.ndarray  # float64
    user_group: np.ndarray  # group of each user
    item_group: np.ndarray  # group of each item

    def user_ids(self) -> list[str]:
        return [f"u{u}" for u in self.users.tolist()]

    def item_ids(self) -> list[str]:
        return [f"i{i}" for i in self.items.tolist()]


def planted_stream(
    n_events: int,
    n_users: int = 1000,
    n_items: int = 500,
    n_groups: int = 5,
    in_group: float = 0.9,
    zipf: float = 1.1,
    seed: int = 0,
    t0: float = 1_700_000_000.0,
    span_s: float = 86400.0,
) -> PlantedStream:
    """Users and items fall into groups; a user picks an item of its group with p=`in_group`.

    Within a group, item popularity follows a power law, so negatives sampled by popularity and
    the popularity baseline both have something real to work with.
    """
    rng = np.random.default_rng(seed)
    user_group = rng.integers(0, n_groups, n_users)
    item_group = np.arange(n_items) % n_groups
    rank = np.empty(n_items)
    for g in range(n_groups):
        members = np.flatnonzero(item_group == g)
        rank[members] = rng.permutation(len(members)) + 1
    pop = rank**-zipf
    by_group = [np.flatnonzero(item_group == g) for g in range(n_groups)]
    probs = [pop[m] / pop[m].sum() for m in by_group]
    all_p = pop / pop.sum()
    users = rng.integers(0, n_users, n_events).astype(np.int32)
    own = rng.random(n_events) < in_group
    items = np.empty(n_events, dtype=np.int32)
    for g in range(n_groups):
        sel = own & (user_group[users] == g)
        items[sel] = rng.choice(by_group[g], size=int(sel.sum()), p=probs[g])
    items[~own] = rng.choice(n_items, size=int((~own).sum()), p=all_p)
    times = t0 + np.sort(rng.random(n_events)) * span_s
    return PlantedStream(users, items, times, user_group, item_group)
