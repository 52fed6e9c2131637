"""Scoring: top-N, popularity fallback, similar items, anonymous fold-in, explanations.

Everything works on an `ItemView`, an immutable snapshot of the item side, so a query process can
swap in a fresh snapshot atomically while requests are being answered from the old one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from stream_mf.state import ModelState
from stream_mf.topk import top_k
from stream_mf.transitions import add_bonus


@dataclass(frozen=True)
class ItemView:
    """Item factors, biases and decayed popularity as of one model version."""

    factors: np.ndarray  # float32 [n, dim]
    bias: np.ndarray  # float32 [n]
    logpop: np.ndarray  # float64 [n], log decayed popularity anchored at t=0
    ids: Sequence[str]
    index: dict[str, int]
    clock: float
    decay_rate: float
    model_version: int = 0
    generation: int = 0  # the store's model generation these rows belong to (rebuilds add one)
    # transitions (`stream_mf/transitions.py`): each item's successors and their log counts;
    # None: none (the weight comes from the model config, 0 turns them off)
    succ: np.ndarray | None = None
    logw: np.ndarray | None = None
    transition_weight: float = 0.0
    transition_share: bool = False  # `ModelConfig.transition_norm` is "share"
    _cache: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_state(cls, state: ModelState, copy: bool = True) -> ItemView:
        n = state.items.n
        take = (lambda a: a[:n].copy()) if copy else (lambda a: a[:n])
        t = state.transitions
        return cls(
            factors=take(state.items.factors),
            bias=take(state.items.bias),
            logpop=take(state.items.logpop),
            ids=list(state.items.ids) if copy else state.items.ids,
            index=dict(state.items.index) if copy else state.items.index,
            clock=float(state.clock[0]),
            decay_rate=state.config.decay_rate,
            model_version=state.model_version,
            succ=take(t.succ) if t.succ.shape[0] >= n else None,
            logw=take(t.logw) if t.logw.shape[0] >= n else None,
            transition_weight=state.config.transition_weight,
            transition_share=state.config.transition_norm == "share",
        )

    @property
    def n(self) -> int:
        return self.factors.shape[0]

    @property
    def unit(self) -> np.ndarray:
        """Row-normalised factors, computed once per snapshot (cosine similarity)."""
        if "unit" not in self._cache:
            norms = np.linalg.norm(self.factors, axis=1, keepdims=True)
            self._cache["unit"] = self.factors / np.maximum(norms, 1e-12)
        return self._cache["unit"]

    @property
    def norms(self) -> np.ndarray:
        """Row norms (float32), computed once per snapshot: cosine similarity divides by them
        instead of keeping a normalised copy of every factor (a replica's memory)."""
        if "norms" not in self._cache:
            self._cache["norms"] = np.linalg.norm(self.factors, axis=1)
        return self._cache["norms"]

    @property
    def gram(self) -> np.ndarray:
        """V^T V in float64, for fold-ins (`gram_of`)."""
        if "gram" not in self._cache:
            self._cache["gram"] = gram_of(self.factors)
        return self._cache["gram"]

    @property
    def has_gram(self) -> bool:
        return "gram" in self._cache

    def popularity(self, idx: np.ndarray) -> np.ndarray:
        """Decayed event weight at the stream clock."""
        return np.exp(self.logpop[idx] - self.clock * self.decay_rate)

    def indices(self, ids: Sequence[str]) -> np.ndarray:
        get = self.index.get
        out = np.fromiter((get(i, -1) for i in ids), dtype=np.int64, count=len(ids))
        return out[(out >= 0) & (out < self.n)]


def gram_of(factors: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """V^T V accumulated in float64 over row chunks: the same sums as one product of a float64
    copy, without a copy of the whole matrix (25.6 MB at 50k x 64) in a replica's heap."""
    d = factors.shape[1]
    out = np.zeros((d, d), dtype=np.float64)
    for lo in range(0, factors.shape[0], chunk):
        c = factors[lo : lo + chunk].astype(np.float64)
        out += c.T @ c
    return out


def _mask(scores: np.ndarray, exclude: np.ndarray | None, candidates: np.ndarray | None) -> None:
    if candidates is not None:
        keep = np.zeros(scores.shape[0], dtype=bool)
        keep[candidates] = True
        scores[~keep] = -np.inf
    if exclude is not None and exclude.size:
        scores[exclude] = -np.inf


def recommend(
    view: ItemView,
    user_vec: np.ndarray,
    k: int,
    exclude: np.ndarray | None = None,
    candidates: np.ndarray | None = None,
    bias: bool = True,
    last_item: int = -1,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k items by V.u + b (V.u without `bias`), plus the transitions from the user's
    `last_item` (its successors, `stream_mf/transitions.py`), excluding `exclude`,
    restricted to `candidates` when given. The one scoring rule of the query and of
    `stream-mf evaluate`."""
    u = user_vec.astype(np.float32)
    scores = view.factors @ u  # one streaming pass beats gathering candidate rows
    if bias:
        scores += view.bias
    if last_item >= 0 and view.succ is not None and view.logw is not None:
        add_bonus(scores, view.succ, view.logw, last_item, view.clock, view.decay_rate,
                  view.transition_weight, view.transition_share)  # fmt: skip
    if candidates is not None:
        keep = np.zeros(scores.shape[0], dtype=np.bool_)
        keep[candidates] = True
        if exclude is not None and exclude.size:
            keep[exclude] = False
        cand = np.flatnonzero(keep)  # sorted and unique, cheaper than np.unique
        idx, sc = top_k(scores[cand], k)
        return cand[idx].astype(np.int64), sc
    _mask(scores, exclude, None)
    return top_k(scores, k)


def recommend_batch(
    view: ItemView,
    user_vecs: np.ndarray,
    k: int,
    excludes: Sequence[np.ndarray | None] | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Many users in one matrix product (the batched form), by the factors alone: no service
    path uses it, and it takes no last items (`recommend` adds the transitions)."""
    scores = user_vecs.astype(np.float32) @ view.factors.T + view.bias
    out = []
    for r in range(scores.shape[0]):
        row = scores[r]
        ex = excludes[r] if excludes is not None else None
        if ex is not None and ex.size:
            row[ex] = -np.inf
        out.append(top_k(row, k))
    return out


def popular(
    view: ItemView,
    k: int,
    exclude: np.ndarray | None = None,
    candidates: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Most popular by decayed weight; ranking needs no decay (it scales every item alike)."""
    scores = view.logpop.copy()
    _mask(scores, exclude, candidates)
    idx, _ = top_k(scores, k)
    return idx, view.popularity(idx)


def similar_items(
    view: ItemView,
    item: int,
    k: int,
    exclude: np.ndarray | None = None,
    candidates: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Cosine neighbours of `item`, itself excluded, among `candidates` when given."""
    f, norms = view.factors, view.norms
    scores = (f @ f[item]) / np.maximum(norms * norms[item], 1e-12)
    scores[item] = -np.inf
    _mask(scores, exclude, candidates)
    return top_k(scores, k)


def fold_in(
    view: ItemView,
    items: np.ndarray,
    confidence: np.ndarray | None = None,
    reg: float = 0.1,
    alpha: float = 10.0,
) -> np.ndarray:
    """A user vector for a set of items: one implicit-ALS user solve against fixed item factors.

    Solves (V^T V + V_S^T (C_S - I) V_S + reg I) u = V_S^T C_S 1 with C = 1 + alpha * confidence
    (Hu, Koren, Volinsky 2008): every other item counts as a weak negative, so the vector points
    at what these items share rather than at what is merely popular. Rank with it by V.u alone
    (`recommend(..., bias=False)`): the solve knows nothing of the online model's item biases,
    which would otherwise give nearly the same list whatever the items.
    """
    dim = view.factors.shape[1]
    if items.size == 0:
        return np.zeros(dim, dtype=np.float32)
    c = 1.0 + alpha * (np.ones(items.size) if confidence is None else np.asarray(confidence))
    vs = view.factors[items].astype(np.float64)
    a = view.gram + (vs.T * (c - 1.0)) @ vs + reg * np.eye(dim)
    b = vs.T @ c
    return np.linalg.solve(a, b).astype(np.float32)


def because(
    view: ItemView,
    item: int,
    user_items: np.ndarray,
    k: int,
    exclude: np.ndarray | None = None,
    candidates: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The user's own items most similar to `item`: why it was recommended. `candidates` and
    `exclude` narrow which of the user's items may explain it."""
    if candidates is not None:
        user_items = user_items[np.isin(user_items, candidates)]
    if exclude is not None and exclude.size:
        user_items = user_items[~np.isin(user_items, exclude)]
    if user_items.size == 0:
        return np.empty(0, np.int64), np.empty(0, np.float64)
    f, norms = view.factors, view.norms
    sims = (f[user_items] @ f[item]) / np.maximum(norms[user_items] * norms[item], 1e-12)
    sims[user_items == item] = -np.inf
    idx, s = top_k(sims, k)
    return user_items[idx].astype(np.int64), s


def add_transitions(scores: np.ndarray, state: ModelState, user: int) -> None:
    """`scores` += the transitions of `user`'s last item, at the model's clock (none when the
    model's `transition_weight` is 0): `recommend`'s rule on a `ModelState` (the evaluator's
    learners, the updater's live evaluation)."""
    c, t = state.config, state.transitions
    if c.transition_weight > 0 and user < t.last.shape[0]:
        add_bonus(
            scores,
            t.succ,
            t.logw,
            int(t.last[user]),
            float(state.clock[0]),
            c.decay_rate,
            c.transition_weight,
            c.transition_norm == "share",
        )
