"""Synthetic streams with planted structure, shared by tests and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

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


@dataclass
class NicheStream:
    """A long-tail stream with a few niches inside it (see `niche_stream`)."""

    users: np.ndarray  # int32 user index (niche users first, then background users)
    items: np.ndarray  # int32 item index (niche items first, then head/tail items)
    times: np.ndarray  # float64, sorted
    user_niche: np.ndarray  # niche of each user, -1 for background users
    item_niche: np.ndarray  # niche of each item, -1 for the rest
    name: str = "niche"

    def user_ids(self) -> list[str]:
        return [f"u{u}" for u in self.users.tolist()]

    def item_ids(self) -> list[str]:
        return [f"i{i}" for i in self.items.tolist()]

    @property
    def niche_users(self) -> np.ndarray:
        return np.flatnonzero(self.user_niche >= 0)


class NicheVariant(TypedDict):
    """What tells the niche streams apart (the keyword arguments of `niche_stream`)."""

    tail: str
    interleaved: bool
    niche_popular: bool


#: The variants the model suite and the bench run: (tail, interleaved, niche items popular).
NICHE_VARIANTS: dict[str, NicheVariant] = {
    f"{tail}-{'mixed' if mixed else 'apart'}-{'pop' if pop else 'unpop'}": NicheVariant(
        tail=tail, interleaved=mixed, niche_popular=pop
    )
    for tail in ("flat", "skewed")
    for mixed in (True, False)
    for pop in (True, False)
}


def niche_stream(
    niche_users: tuple[int, ...] = (200, 120, 60),
    niche_items: int = 40,
    history: int = 8,
    background_ratio: float = 10.0,
    background_users: int = 4000,
    tail_items: int = 20_000,
    tail: str = "flat",
    interleaved: bool = True,
    niche_popular: bool = True,
    head_items: int = 100,
    head_share: float = 0.3,
    niche_share: float = 0.1,
    zipf: float = 1.1,
    seed: int = 0,
    t0: float = 1_700_000_000.0,
    span_s: float = 86400.0,
    name: str = "niche",
) -> NicheStream:
    """Niche users whose whole history lies in their niche's `niche_items` items, inside
    `background_ratio` times as many events from background users over a long tail.

    - `tail`: "flat" spreads background events uniformly over `tail_items`; "skewed" by a power
      law (`zipf`).
    - `interleaved`: niche events spread over the whole stream; otherwise each niche has a time
      block of its own, between blocks of background events only.
    - `niche_popular`: background users also pick niche items (`niche_share` of their events),
      so niche items are the globally popular ones; otherwise `head_share` of background events
      go to `head_items` head items, each far more popular than any niche item.

    Within a niche, items follow a power law too; a niche user draws `history` events from it
    (repeats possible), so it leaves at least `niche_items - history` unseen niche items.
    """
    rng = np.random.default_rng(seed)
    n_niche = len(niche_users)
    n_nu = int(sum(niche_users))
    user_niche = np.concatenate(
        [np.full(n, g) for g, n in enumerate(niche_users)] + [np.full(background_users, -1)]
    ).astype(np.int64)
    n_ni = n_niche * niche_items
    n_head = 0 if niche_popular else head_items
    item_niche = np.concatenate(
        [np.repeat(np.arange(n_niche), niche_items), np.full(n_head + tail_items, -1)]
    ).astype(np.int64)
    within = (rng.permutation(niche_items) + 1.0) ** -zipf
    within /= within.sum()
    # niche events: each niche user draws `history` events from its niche
    nu_users = np.repeat(np.arange(n_nu), history)
    nu_items = np.empty(nu_users.size, np.int64)
    for g in range(n_niche):
        sel = user_niche[nu_users] == g
        nu_items[sel] = g * niche_items + rng.choice(niche_items, int(sel.sum()), p=within)
    # background events
    n_bg = round(background_ratio * nu_users.size)
    bg_users = n_nu + rng.integers(0, background_users, n_bg)
    if tail == "flat":
        tail_p = np.full(tail_items, 1.0 / tail_items)
    elif tail == "skewed":
        tail_p = (rng.permutation(tail_items) + 1.0) ** -zipf
        tail_p /= tail_p.sum()
    else:
        raise ValueError(f"tail must be 'flat' or 'skewed', not {tail!r}")
    bg_items = n_ni + n_head + rng.choice(tail_items, n_bg, p=tail_p)
    pick = rng.random(n_bg)
    if niche_popular:
        to_niche = pick < niche_share
        bg_items[to_niche] = rng.integers(0, n_ni, int(to_niche.sum()))
    else:
        to_head = pick < head_share
        bg_items[to_head] = n_ni + rng.integers(0, n_head, int(to_head.sum()))
    users = np.concatenate([nu_users, bg_users]).astype(np.int32)
    items = np.concatenate([nu_items, bg_items]).astype(np.int32)
    is_niche = np.arange(users.size) < nu_users.size
    if interleaved:
        order = rng.permutation(users.size)
    else:
        # background and niches alternate in time: a 1/(n_niche + 1) share of the background,
        # niche 0's events, another share, niche 1's, ..., a last share (the background first:
        # a niche alone in an empty model is a cold start, not a niche)
        bg_block = rng.integers(0, n_niche + 1, n_bg)
        block = np.concatenate([user_niche[nu_users], bg_block]) * 2 + is_niche
        order = np.lexsort((rng.random(users.size), block))
    users, items = users[order], items[order]
    times = t0 + np.sort(rng.random(users.size)) * span_s
    return NicheStream(users, items, times, user_niche, item_niche, name)


def niche_hits(top: dict[int, np.ndarray], stream: NicheStream) -> dict[int, float]:
    """Mean number of each niche's users' top-10 items that lie in their own niche.

    `top` maps a user index of the stream to the item indices (of the stream) recommended.
    """
    out: dict[int, float] = {}
    for g in range(int(stream.user_niche.max()) + 1):
        members = np.flatnonzero(stream.user_niche == g)
        got = [int(np.sum(stream.item_niche[top[int(u)]] == g)) for u in members if int(u) in top]
        out[g] = float(np.mean(got)) if got else 0.0
    return out


def niche_top10(
    learner: object, stream: NicheStream, batch: int = 1000, k: int = 10
) -> dict[int, float]:
    """Feed `stream` to a prequential learner (stream_mf.evaluate) in batches of `batch`, then
    score every niche user's top-k (items the user has excluded) with `niche_hits`."""
    from stream_mf.model import EventBatch

    uids, iids = stream.user_ids(), stream.item_ids()
    w = np.ones(len(uids))
    for lo in range(0, len(uids), batch):
        hi = min(lo + batch, len(uids))
        learner.learn(  # type: ignore[attr-defined]
            EventBatch.build(
                uids[lo:hi], iids[lo:hi], w[lo:hi], stream.times[lo:hi], first_offset=lo
            )
        )
    seen: dict[int, set[int]] = {}
    nu = stream.niche_users
    mask = np.isin(stream.users, nu)
    for u, i in zip(stream.users[mask].tolist(), stream.items[mask].tolist(), strict=True):
        seen.setdefault(u, set()).add(i)
    top: dict[int, np.ndarray] = {}
    for u in nu.tolist():
        lu = learner.user_index(f"u{u}")  # type: ignore[attr-defined]
        if lu < 0:
            continue
        ex = np.array(sorted(learner.item_index(f"i{i}") for i in seen.get(u, ())), np.int64)  # type: ignore[attr-defined]
        rec = learner.recommend(lu, k, ex)  # type: ignore[attr-defined]
        top[u] = np.array([int(learner.model.state.items.ids[int(r)][1:]) for r in rec], np.int64)  # type: ignore[attr-defined]
    return niche_hits(top, stream)


def planted_in_group(learner: object, seed: int = 11) -> int:
    """Users of 200 whose top-10 (seen items excluded) is mostly of their own group, on the
    planted stream of the end-to-end test (tests/integration/test_services.py), in process."""
    from stream_mf.model import EventBatch

    s = planted_stream(40_000, 200, 1000, n_groups=5, in_group=0.9, seed=seed)
    learner.learn(EventBatch.build(s.user_ids(), s.item_ids(), np.ones(40_000), s.times))  # type: ignore[attr-defined]
    seen: dict[int, set[int]] = {}
    for u, i in zip(s.users.tolist(), s.items.tolist(), strict=True):
        seen.setdefault(u, set()).add(learner.item_index(f"i{i}"))  # type: ignore[attr-defined]
    ids = learner.model.state.items.ids  # type: ignore[attr-defined]
    good = 0
    for u in range(200):
        ex = np.array(sorted(seen[u]), np.int64)
        rec = learner.recommend(learner.user_index(f"u{u}"), 10, ex)  # type: ignore[attr-defined]
        groups = s.item_group[[int(ids[int(r)][1:]) for r in rec]]
        good += int(np.mean(groups == s.user_group[u]) > 0.5)
    return good


@dataclass
class DriftStream:
    """A planted stream whose users change taste at event `change` (see `drift_stream`)."""

    users: np.ndarray  # int32 user index
    items: np.ndarray  # int32 item index
    times: np.ndarray  # float64, sorted
    group_before: np.ndarray  # each user's group before the change
    group_after: np.ndarray  # and after it
    item_group: np.ndarray
    change: int  # index of the first event drawn from the new tastes

    def user_ids(self) -> list[str]:
        return [f"u{u}" for u in self.users.tolist()]

    def item_ids(self) -> list[str]:
        return [f"i{i}" for i in self.items.tolist()]


def drift_stream(
    before: int = 30_000,
    after: int = 30_000,
    n_users: int = 300,
    n_items: int = 2000,
    n_groups: int = 5,
    in_group: float = 0.9,
    zipf: float = 1.1,
    drifting: float = 1.0,
    seed: int = 0,
    t0: float = 1_700_000_000.0,
    span_s: float = 2 * 86400.0,
) -> DriftStream:
    """Planted tastes (as `planted_stream`) that change mid-stream: after `before` events a
    `drifting` share of the users moves to another group (group + 1, + 2, ... at random, never
    its own) and draws `after` more events from it. Groups keep about the same number of users,
    so global popularity hardly moves: what must change is each user's vector, which is where an
    online model should beat a periodic refit. Items are many enough (`n_items / n_groups` per
    group, a power law within) that a user has unseen items of both groups on either side."""
    rng = np.random.default_rng(seed)
    g0 = rng.integers(0, n_groups, n_users)
    moves = rng.random(n_users) < drifting
    g1 = np.where(moves, (g0 + rng.integers(1, n_groups, n_users)) % n_groups, g0)
    item_group = np.arange(n_items) % n_groups
    rank = np.empty(n_items)
    for g in range(n_groups):
        members = np.flatnonzero(item_group == g)
        rank[members] = rng.permutation(len(members)) + 1
    pop = rank**-zipf
    by_group = [np.flatnonzero(item_group == g) for g in range(n_groups)]
    probs = [pop[m] / pop[m].sum() for m in by_group]
    all_p = pop / pop.sum()
    n = before + after
    users = rng.integers(0, n_users, n).astype(np.int32)
    group = np.where(np.arange(n) < before, g0[users], g1[users])
    own = rng.random(n) < in_group
    items = np.empty(n, dtype=np.int32)
    for g in range(n_groups):
        sel = own & (group == g)
        items[sel] = rng.choice(by_group[g], size=int(sel.sum()), p=probs[g])
    items[~own] = rng.choice(n_items, size=int((~own).sum()), p=all_p)
    times = t0 + np.sort(rng.random(n)) * span_s
    return DriftStream(users, items, times, g0, g1, item_group, before)


def recovery(
    outcomes: np.ndarray, change: int, window: int = 1000, share: float = 0.9
) -> tuple[float, float, int | None]:
    """(hit rate before the change, lowest rolling hit rate after it, events after the change
    until the rolling hit rate is back to `share` of the one before; None if it never is).

    `outcomes` is per event: -1 not scored, 0 miss, 1 hit (`prequential(keep_outcomes=True)`).
    The rate before is over the last `window` scored events before the change; after, the rate
    at an event is over the `window` scored events ending there (the first full window ends
    `window` scored events after the change, so a recovery is never counted below that)."""
    idx = np.flatnonzero(outcomes >= 0)
    hit = (outcomes[idx] == 1).astype(np.float64)
    pre = idx < change
    if pre.sum() < window:
        raise ValueError(f"only {int(pre.sum())} scored events before the change; need {window}")
    rate_before = float(hit[pre][-window:].mean())
    post_idx, post_hit = idx[~pre], hit[~pre]
    if post_hit.size < window:
        return rate_before, float("nan"), None
    csum = np.concatenate([[0.0], np.cumsum(post_hit)])
    rolling = (csum[window:] - csum[:-window]) / window  # window ending at scored event j+window-1
    ends = post_idx[window - 1 :]
    ok = np.flatnonzero(rolling >= share * rate_before)
    back = None if ok.size == 0 else int(ends[ok[0]] - change + 1)
    return rate_before, float(rolling.min()), back
