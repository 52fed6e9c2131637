"""Prequential (test-then-learn) evaluation, Vinagre et al. 2014.

For each event, in time order: if its user has been seen before, ask the model for its top-K
(excluding items the user already has) and record whether the event's item is there, and at which
rank; then learn the event. Repeats of an item the user already has are learned but not scored,
because excluding seen items would make them certain misses.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from stream_mf.als import als_fit, confidence_matrix
from stream_mf.config import EventTypeSpec, ModelConfig
from stream_mf.datasets import EventColumns
from stream_mf.model import EventBatch, OnlineModel
from stream_mf.rebuild import Outcome, Rebuild, RebuildConfig
from stream_mf.rebuild_scheduler import RebuildScheduler
from stream_mf.scoring import score_event, top_unseen
from stream_mf.state import confidence_items


class PrequentialLearner(Protocol):
    name: str

    def user_index(self, user_id: str) -> int: ...

    def item_index(self, item_id: str) -> int: ...

    def scores(self, user: int) -> np.ndarray: ...

    def recommend(self, user: int, k: int, exclude: np.ndarray) -> np.ndarray: ...

    def learn(self, batch: EventBatch) -> None: ...


class _ModelLearner:
    """Shared id handling: every learner here keeps its ids in an OnlineModel's tables."""

    name = "base"

    def __init__(self, config: ModelConfig):
        self.model = OnlineModel(config)

    def user_index(self, user_id: str) -> int:
        return self.model.state.users.index.get(user_id, -1)

    def item_index(self, item_id: str) -> int:
        return self.model.state.items.index.get(item_id, -1)

    def learn(self, batch: EventBatch) -> None:
        self.model.learn(batch)

    def scores(self, user: int) -> np.ndarray:
        """A fresh score per item for `user` (callers may overwrite it)."""
        raise NotImplementedError

    def recommend(self, user: int, k: int, exclude: np.ndarray) -> np.ndarray:
        return top_unseen(self.scores(user), exclude, k)


class SGDLearner(_ModelLearner):
    name = "sgd"

    def scores(self, user: int) -> np.ndarray:
        items = self.model.state.items
        n = items.n
        return items.factors[:n] @ self.model.state.users.factors[user] + items.bias[:n]


class PopularLearner(_ModelLearner):
    """Decayed popularity so far; the SGD part runs with no negatives and is ignored."""

    name = "popular"

    def __init__(self, config: ModelConfig):
        super().__init__(config.model_copy(update={"dim": 1, "n_negatives": 0}))

    def scores(self, user: int) -> np.ndarray:
        items = self.model.state.items
        return items.logpop[: items.n].copy()


def _fit_als(
    model: OnlineModel, U: np.ndarray, V: np.ndarray, rcfg: RebuildConfig
) -> tuple[np.ndarray, np.ndarray]:
    """A full ALS fit on the model's decayed confidences, warm-started from (U, V) grown to
    the current number of users and items."""
    st = model.state
    nu, ni, dim = st.users.n, st.items.n, U.shape[1]
    U = _grow(U, nu, dim, st.config.seed)
    V = _grow(V, ni, dim, st.config.seed + 1)
    keys, vals = confidence_items(st.confidence)
    by_user, by_item = confidence_matrix(
        keys,
        vals,
        nu,
        ni,
        float(st.clock[0]),
        st.config.decay_rate,
        rcfg.alpha,
        rcfg.min_confidence,
    )
    als_fit(
        by_user,
        by_item,
        U,
        V,
        rcfg.reg,
        rcfg.iterations,
        rcfg.solver,
        rcfg.cg_steps,
        compute_loss=False,
    )
    return U, V


def refit_pieces(batch: EventBatch, seen: int, every: int) -> Iterator[tuple[EventBatch, bool]]:
    """`batch` cut where a refit is due, after the first event ever and then every `every`
    events, each piece with whether a refit follows it. Refits then land on the same events
    however the stream was cut into batches (one event at a time, as `prequential` feeds it, or
    in bulk), so a model's answers do not depend on the batching."""
    lo, n = 0, len(batch)
    while lo < n:
        done = seen + lo
        due = 1 if done == 0 else (done // every + 1) * every
        hi = min(n, due - seen)
        yield batch.slice(lo, hi), seen + hi == due
        lo = hi


def _grow(a: np.ndarray, n: int, dim: int, seed: int) -> np.ndarray:
    if a.shape[0] >= n:
        return a[:n]
    rng = np.random.default_rng(seed + a.shape[0])
    extra = (rng.standard_normal((n - a.shape[0], dim)) * 0.01).astype(np.float32)
    return np.concatenate([a, extra])


class ALSLearner(_ModelLearner):
    """Implicit ALS refit every `refit_every` events; in between, each user's vector is folded in
    from the user's current decayed row against the last item factors (without it, a model
    refit every N events has not seen most users it must score on bursty streams)."""

    name = "als"

    def __init__(
        self, config: ModelConfig, rebuild: RebuildConfig | None = None, refit_every: int = 1000
    ):
        super().__init__(config.model_copy(update={"n_negatives": 0}))
        self.rcfg = rebuild or RebuildConfig()
        self.refit_every = refit_every
        self.U = np.zeros((0, config.dim), np.float32)
        self.V = np.zeros((0, config.dim), np.float32)
        self.gram = np.zeros((config.dim, config.dim))
        self.rows: dict[int, dict[int, float]] = {}
        # per user, since the last refit: (M = sum e v v^T, m = sum e v, s = sum v, L) with
        # e = exp(logc - L); decay scales every e alike, so the fold-in costs O(k^2) an event
        # instead of O(items of the user x k^2)
        self.stats: dict[int, list] = {}
        self.seen_events = 0

    def learn(self, batch: EventBatch) -> None:
        for piece, refit in refit_pieces(batch, self.seen_events, self.refit_every):
            self._learn(piece, refit)

    def _learn(self, batch: EventBatch, refit: bool) -> None:
        delta = self.model.learn(batch)
        n_items = self.V.shape[0]
        for key, val in zip(delta.pair_keys.tolist(), delta.pair_values.tolist(), strict=True):
            u, i = key >> 32, key & 0xFFFFFFFF
            row = self.rows.setdefault(u, {})
            old = row.get(i)
            row[i] = val
            st = self.stats.get(u)
            if st is not None and i < n_items:
                self._update(st, i, old, val)
        self.seen_events += len(batch)
        if refit:
            self.U, self.V = _fit_als(self.model, self.U, self.V, self.rcfg)
            v = self.V.astype(np.float64)
            self.gram = v.T @ v
            self.stats = {}

    def _update(self, st: list, i: int, old: float | None, new: float) -> None:
        M, m, s, L = st
        v = self.V[i].astype(np.float64)
        if new - L > 30.0:  # rebase before exp overflows
            scale = np.exp(L - new)
            M *= scale
            m *= scale
            st[3] = L = new
        if old is not None:
            e = np.exp(old - L)
            M -= e * np.outer(v, v)
            m -= e * v
            s -= v
        e = np.exp(new - L)
        M += e * np.outer(v, v)
        m += e * v
        s += v

    def _stats(self, user: int) -> list:
        st = self.stats.get(user)
        if st is None:
            row = self.rows.get(user, {})
            items = np.fromiter((i for i in row if i < self.V.shape[0]), np.int64)
            logc = np.fromiter((row[i] for i in items.tolist()), np.float64, items.size)
            L = float(logc.max()) if logc.size else 0.0
            e = np.exp(logc - L)
            vs = self.V[items].astype(np.float64)
            st = [(vs.T * e) @ vs, vs.T @ e, vs.sum(axis=0), L]
            self.stats[user] = st
        return st

    def user_vector(self, user: int) -> np.ndarray:
        M, m, s, L = self._stats(user)
        if not s.any():
            return np.zeros(self.V.shape[1], np.float32)
        state = self.model.state
        scale = self.rcfg.alpha * np.exp(L - float(state.clock[0]) * state.config.decay_rate)
        a = self.gram + scale * M + self.rcfg.reg * np.eye(M.shape[0])
        return np.linalg.solve(a, s + scale * m).astype(np.float32)

    def scores(self, user: int) -> np.ndarray:
        return self.V @ self.user_vector(user)


class HybridLearner(SGDLearner):
    """Online SGD with the updater's own rebuild (`stream_mf.rebuild.Rebuild`: fit, guard,
    catch-up, swap, after-swap) driven synchronously: due `refit_every` events after the last
    one ended (`RebuildScheduler`), its background work run inline, its guard scoring the events
    that come next. Evaluation has no wall clock, so the guard's timeout is counted in events
    (`refit_every` of them; it scores only users known when the rebuild started, and on
    MovieLens most events after that are new users') and the swap solves up to `final_rows`
    (never cut by `swap_budget_s`): results repeat. Nothing is persisted: the rebuild's writes
    are what a store would commit."""

    name = "hybrid"

    def __init__(
        self, config: ModelConfig, rebuild: RebuildConfig | None = None, refit_every: int = 1000
    ):
        super().__init__(config)
        self.rcfg = (rebuild or RebuildConfig()).model_copy(
            update={"guard_timeout_s": float(refit_every), "swap_budget_s": math.inf}
        )
        self.schedule = RebuildScheduler(
            every_events=refit_every, every_seconds=None, events_at_last=0, time_at_last=0.0
        )
        self.rebuild: Rebuild | None = None
        self.generation = 0
        self.outcomes: list[Outcome] = []
        self.failed = 0
        self._items_of: dict[int, set[int]] = {}  # what the guard excludes, as the store has it

    def learn(self, batch: EventBatch) -> None:
        st = self.model.state
        rb = self.rebuild
        if rb is not None and rb.wants_scores:
            users = st.users.lookup(batch.user_ids).astype(np.int64)
            items = st.items.lookup(batch.item_ids).astype(np.int64)
            rb.score(st, users, items, self._seen)
        delta = self.model.learn(batch)
        for key in delta.pair_keys.tolist():
            self._items_of.setdefault(key >> 32, set()).add(key & 0xFFFFFFFF)
        if rb is not None:
            rb.note(delta)
            self._step(rb)
        elif self.schedule.due(st.events_applied, st.users.n, st.items.n, 0.0):
            self.schedule.started()
            self.generation += 1
            self.rebuild = Rebuild(
                st, self.rcfg, generation=self.generation, inline=True, clock=self._events
            )

    def _events(self) -> float:
        """The rebuild's clock here: events learnt (results must not depend on the machine)."""
        return float(self.model.state.events_applied)

    def _seen(self, user: int) -> np.ndarray:
        return np.fromiter(self._items_of.get(user, ()), np.int64)

    def _step(self, rb: Rebuild) -> None:
        st = self.model.state
        try:
            outcome = rb.step(st).outcome
        except RuntimeError:
            self.failed += 1
            outcome = None
        if outcome is None and not rb.phase.over:
            return
        if outcome is not None:
            self.outcomes.append(outcome)
        self.rebuild = None
        self.schedule.ended(st.events_applied, 0.0, replaced_below=None, unfinished=False)


LEARNERS: dict[str, Callable[..., PrequentialLearner]] = {
    "sgd": SGDLearner,
    "popular": PopularLearner,
    "als": ALSLearner,
    "hybrid": HybridLearner,
}


def make_learner(
    name: str,
    config: ModelConfig,
    rebuild: RebuildConfig | None = None,
    refit_every: int = 1000,
) -> PrequentialLearner:
    """A learner by name; `als` and `hybrid` also take the rebuild settings."""
    if name in ("als", "hybrid"):
        return LEARNERS[name](config, rebuild, refit_every)
    return LEARNERS[name](config)


@dataclass
class PrequentialResult:
    model: str
    k: int
    events: int = 0
    evaluated: int = 0
    hits: int = 0
    ndcg_sum: float = 0.0
    seconds: float = 0.0
    windows: list[dict[str, float]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    # per event: -1 not scored (new user or an item the user has), 0 miss, 1 hit; kept on request
    outcomes: np.ndarray | None = None

    @property
    def recall_at_k(self) -> float:
        return self.hits / self.evaluated if self.evaluated else 0.0

    @property
    def ndcg_at_k(self) -> float:
        return self.ndcg_sum / self.evaluated if self.evaluated else 0.0

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "k": self.k,
            "recall_at_k": self.recall_at_k,
            "ndcg_at_k": self.ndcg_at_k,
            "evaluated": self.evaluated,
            "events": self.events,
            "events_per_s": self.events_per_s,
            "seconds": self.seconds,
            "windows": self.windows,
            "config": self.config,
        }


def base_weights(events: EventColumns, types: Mapping[str, EventTypeSpec]) -> np.ndarray:
    """Type weight, times the value where the type uses one."""
    w = np.empty(len(events))
    for j, (t, v) in enumerate(zip(events.event_types, events.values.tolist(), strict=True)):
        spec = types.get(t)
        if spec is None:
            raise ValueError(
                f"event type {t!r} is not configured (known: {', '.join(sorted(types))})"
            )
        w[j] = spec.weight * v if spec.use_value and math.isfinite(v) else spec.weight
    return w


def prequential(
    events: EventColumns,
    learner: PrequentialLearner,
    k: int = 10,
    types: Mapping[str, EventTypeSpec] | None = None,
    window: int = 5000,
    progress: bool = True,
    keep_outcomes: bool = False,
) -> PrequentialResult:
    """Test-then-learn over `events` (which must already be in time order). `keep_outcomes`
    records each event's outcome, to compare with a sample scored elsewhere (the live eval)."""
    types = types or ModelConfig().event_types
    weights = base_weights(events, types)
    res = PrequentialResult(model=learner.name, k=k)
    outcomes = np.full(len(events), -1, np.int8) if keep_outcomes else None
    seen: dict[int, set[int]] = {}
    seen_list: dict[int, list[int]] = {}
    w_hits, w_ndcg, w_n = 0, 0.0, 0
    empty = np.empty(0, np.int64)
    start = time.perf_counter()
    bar = tqdm(total=len(events), disable=not progress, unit="ev", desc=learner.name, leave=False)
    for e in range(len(events)):
        uid, iid = events.users[e], events.items[e]
        u = learner.user_index(uid)
        if u >= 0:
            item = learner.item_index(iid)
            mine = seen.get(u)
            if mine is None or item not in mine:
                lst = seen_list.get(u)
                exclude = np.asarray(lst, np.int64) if lst else empty
                scored = score_event(learner.scores(u), item, exclude, k)
                res.evaluated += 1
                w_n += 1
                if outcomes is not None:
                    outcomes[e] = 1 if scored.hit else 0
                if scored.hit:
                    res.hits += 1
                    res.ndcg_sum += scored.ndcg
                    w_hits += 1
                    w_ndcg += scored.ndcg
                if w_n == window:
                    res.windows.append(
                        {"event": e + 1, "recall_at_k": w_hits / w_n, "ndcg_at_k": w_ndcg / w_n}
                    )
                    w_hits, w_ndcg, w_n = 0, 0.0, 0
        learner.learn(
            EventBatch.build(
                [uid], [iid], weights[e : e + 1], events.times[e : e + 1], first_offset=e
            )
        )
        u = learner.user_index(uid)
        item = learner.item_index(iid)
        if item not in seen.setdefault(u, set()):
            seen[u].add(item)
            seen_list.setdefault(u, []).append(item)
        if e % 2000 == 0:
            bar.update(2000 if e else 1)
    bar.close()
    if w_n >= max(1, window // 4):  # a tiny last window would only add noise
        res.windows.append(
            {"event": len(events), "recall_at_k": w_hits / w_n, "ndcg_at_k": w_ndcg / w_n}
        )
    res.events = len(events)
    res.seconds = time.perf_counter() - start
    res.outcomes = outcomes
    return res
