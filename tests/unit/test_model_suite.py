"""One behavioural suite every model runs: niche tastes inside a long tail.

Each stream (`synthetic.NICHE_VARIANTS`) holds 3 niches of 200/120/60 users whose whole history
lies in their niche's 40 items, inside 10x as many background events over 20k tail items. A
niche user's top-10 (seen items excluded) must hold at least 8 items of the user's niche, on
average over each niche's users, for every niche. `default` is the online model with default
settings answered through the query service's own path (`stream_mf.answer`).
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest

from stream_mf.answer import StateUsers, answer
from stream_mf.config import ModelConfig
from stream_mf.evaluate import make_learner
from stream_mf.messages import RecRequest
from stream_mf.model import EventBatch, OnlineModel
from stream_mf.recommend import ItemView
from tests.synthetic import NICHE_VARIANTS, NicheStream, niche_hits, niche_stream, niche_top10

MIN_IN_NICHE = 8.0
#: `als` and `hybrid` refit twice over a stream of 33k events (each niche's events are in a refit)
REFIT_EVERY = 15_000
#: `hybrid` runs the updater's own Rebuild: due that many events after the last one *ended*, then
#: its guard scores up to 1000 events (or gives up after as many events as this) before the swap,
#: so 15k gives one swap, mid-stream; 5k gives two or three over the stream
HYBRID_REFIT_EVERY = 5_000


@cache
def stream(variant: str) -> NicheStream:
    return niche_stream(**NICHE_VARIANTS[variant], name=variant)


def default_model_hits(s: NicheStream) -> dict[int, float]:
    """The default online model, asked as the query service asks it."""
    m = OnlineModel(ModelConfig())
    m.learn(EventBatch.build(s.user_ids(), s.item_ids(), np.ones(s.users.size), s.times))
    view, users = ItemView.from_state(m.state), StateUsers(m.state)
    top = {}
    for u in s.niche_users.tolist():
        r = answer(RecRequest(request_id=str(u), user_id=f"u{u}", k=10), view, users)
        assert r.strategy == "personalized"
        top[u] = np.array([int(it.item_id[1:]) for it in r.items], np.int64)
    return niche_hits(top, s)


MODELS = ["popular", "sgd", "als", "hybrid", "default"]
CASES = [
    pytest.param(
        m,
        v,
        marks=pytest.mark.xfail(
            strict=True,
            reason="popularity gives every user the largest niche's (or the head's) items: the "
            "smaller niches get none, whatever the model does",
        )
        if m == "popular"
        else pytest.mark.xfail(
            strict=True,
            reason="the shipped rebuild (evaluate's hybrid now drives it): niche users whose "
            "events all come after its last swap get 3-6 of 10, where SGD alone gets 9.5+ "
            "(SGD from the swapped factors learns them slower); not solved yet",
        )
        if (m, v) == ("hybrid", "flat-apart-pop")
        else (),
    )
    for m in MODELS
    for v in NICHE_VARIANTS
]


@pytest.mark.parametrize(("model", "variant"), CASES)
def test_niche_users_get_their_niche(model: str, variant: str) -> None:
    s = stream(variant)
    if model == "default":
        hits = default_model_hits(s)
    else:
        every = HYBRID_REFIT_EVERY if model == "hybrid" else REFIT_EVERY
        hits = niche_top10(make_learner(model, ModelConfig(), refit_every=every), s)
    assert min(hits.values()) >= MIN_IN_NICHE, f"{model} on {variant}: {hits}"


def test_the_previous_defaults_fail_the_suite() -> None:
    """The suite can fail: the previous defaults (item biases at 0.2x the rate) lose niches."""
    old = ModelConfig(lr_bias=0.2, lr_user=2.0, uniform_mix=0.5)
    worst = min(
        min(niche_top10(make_learner("sgd", old), stream(v)).values()) for v in NICHE_VARIANTS
    )
    assert worst < MIN_IN_NICHE - 2
