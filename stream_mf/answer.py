"""Turning a `RecRequest` into a `RecResponse`: strategy choice, fallbacks, exclusions.

Kept apart from Kafka so that the query service, the tests and an in-process caller all answer
exactly alike. Users come from a `UserSource` (RocksDB in the query service, memory elsewhere).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numba import njit

from stream_mf.messages import RecRequest, RecResponse, ScoredItem, Strategy
from stream_mf.recommend import ItemView, because, fold_in, popular, recommend, similar_items
from stream_mf.state import ModelState


@dataclass(frozen=True)
class UserRecord:
    index: int
    vector: np.ndarray  # float32 [dim]
    events: int
    seen: np.ndarray  # int item indices the user has interacted with
    last_item: int = -1  # the user's last item (transitions score from it), -1 if none


class UserSource(Protocol):
    def user(self, user_id: str) -> UserRecord | None: ...


@njit(cache=True)
def _items_of(conf, user):
    out = []
    for key in conf:
        if (key >> 32) == user:
            out.append(key & 0xFFFFFFFF)
    return np.array(out, dtype=np.int64)


class StateUsers:
    """Users of an in-memory `ModelState` (scans the confidence map: for tests and tools)."""

    def __init__(self, state: ModelState):
        self.state = state

    def user(self, user_id: str) -> UserRecord | None:
        u = self.state.users.index.get(user_id)
        if u is None:
            return None
        seen = np.sort(_items_of(self.state.confidence, u)) if len(self.state.confidence) else None
        last = self.state.transitions.last
        return UserRecord(
            index=u,
            vector=self.state.users.factors[u].copy(),
            events=int(self.state.users.count[u]),
            seen=seen if seen is not None else np.empty(0, np.int64),
            last_item=int(last[u]) if u < last.shape[0] else -1,
        )


def _scored(view: ItemView, idx: np.ndarray, scores: np.ndarray) -> list[ScoredItem]:
    return [
        ScoredItem(item_id=view.ids[i], score=float(s))
        for i, s in zip(idx.tolist(), scores.tolist(), strict=True)
    ]


def answer(
    req: RecRequest,
    view: ItemView,
    users: UserSource,
    *,
    min_user_events: int = 1,
    fold_in_reg: float = 0.1,
) -> RecResponse:
    """Serve one request. Unknown or too-new users get the decayed-popularity list."""
    excl = view.indices(req.exclude_items)
    cand = view.indices(req.candidates) if req.candidates is not None else None

    def reply(strategy: Strategy, idx: np.ndarray, scores: np.ndarray) -> RecResponse:
        return RecResponse(
            request_id=req.request_id,
            user_id=req.user_id,
            model_version=view.model_version,
            items=_scored(view, idx, scores),
            strategy=strategy,
            generated_at=time.time(),
        )

    def fail(message: str) -> RecResponse:
        return RecResponse(
            request_id=req.request_id,
            user_id=req.user_id,
            model_version=view.model_version,
            error=message,
            generated_at=time.time(),
        )

    if req.kind == "popular":
        return reply("popular", *popular(view, req.k, excl, cand))
    if req.kind == "similar_items":
        item = view.index.get(req.item_id or "", -1)
        if item < 0 or item >= view.n:
            return fail(f"item_id {req.item_id!r} is not known to the model yet")
        return reply("similar_items", *similar_items(view, item, req.k, excl, cand))
    if req.kind == "recommend_anonymous":
        touched = view.indices(req.items or [])
        if touched.size == 0:
            return reply("popular", *popular(view, req.k, excl, cand))
        vec = fold_in(view, touched, reg=fold_in_reg)
        exclude = np.concatenate([excl, touched])
        return reply("anonymous", *recommend(view, vec, req.k, exclude, cand, bias=False))

    rec = users.user(req.user_id or "")
    if req.kind == "because":
        item = view.index.get(req.item_id or "", -1)
        if item < 0 or item >= view.n:
            return fail(f"item_id {req.item_id!r} is not known to the model yet")
        if rec is None:
            return fail(f"user_id {req.user_id!r} has no events yet")
        mine = rec.seen[rec.seen < view.n]
        return reply("because", *because(view, item, mine, req.k, excl, cand))

    # recommend
    seen = rec.seen[rec.seen < view.n] if rec is not None else np.empty(0, np.int64)
    exclude = np.concatenate([excl, seen]) if req.exclude_seen else excl
    if rec is None or rec.events < min_user_events:
        return reply("popular", *popular(view, req.k, exclude, cand))
    return reply(
        "personalized", *recommend(view, rec.vector, req.k, exclude, cand, last_item=rec.last_item)
    )
