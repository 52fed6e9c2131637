"""V^T V for fold-ins (`recommend_anonymous`): the chunked sum against a plain float64 product,
dropped when a commit changes item rows, and made ready off the request path by the model-log
follower while fold-ins are being asked."""

from __future__ import annotations

import numpy as np

from consumers.model_log import ModelFollower
from consumers.settings import KafkaSettings, QuerySettings
from stream_mf.model import OnlineModel
from stream_mf.model_log import decode, materialise
from stream_mf.recommend import gram_of
from stream_mf.state import ModelState
from tests.unit.test_model_log import CFG, commit, snapshot, stream


def test_gram_of_equals_one_float64_product() -> None:
    rng = np.random.default_rng(7)
    v = rng.standard_normal((10_001, 16)).astype(np.float32)  # not a multiple of the chunk
    want = v.astype(np.float64).T @ v.astype(np.float64)
    got = gram_of(v, chunk=4096)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(gram_of(v[:3]), v[:3].astype(np.float64).T @ v[:3], rtol=1e-12)


def _model_and_records() -> tuple[OnlineModel, list[tuple[bytes, bytes | None]]]:
    m = OnlineModel(CFG, ModelState.empty(CFG))
    m.learn(stream(2000))
    return m, snapshot(m.state)


def test_item_rows_changed_drop_the_gram_and_it_is_recomputed_at_their_new_values() -> None:
    m, records = _model_and_records()
    reader = materialise(records)
    served = reader.served
    assert served is not None
    before = served.view.gram.copy()
    assert served.view.has_gram
    d = m.learn(stream(300, seed=5, first=50_000))
    for k, v in commit(m.state, d.users, d.items, seq=2):
        reader.feed(decode(k, v))
    reader.publish()
    after = reader.served
    assert after is not None and not after.view.has_gram  # dropped with the old item rows
    n = m.state.items.n
    np.testing.assert_allclose(
        after.view.gram, gram_of(m.state.items.factors[:n]), rtol=1e-12, atol=1e-9
    )
    assert not np.allclose(after.view.gram, before)


def test_the_follower_keeps_the_gram_ready_only_while_fold_ins_are_asked() -> None:
    m, records = _model_and_records()
    settings = QuerySettings(kafka=KafkaSettings(bootstrap_servers="127.0.0.1:9"))
    f = ModelFollower(settings)
    try:
        f.reader = materialise(records)
        served = f.reader.served
        assert served is not None
        f._fold_in_ready()
        assert not served.view.has_gram  # nobody asked for a fold-in: no work
        f.wants_gram()
        f._fold_in_ready()
        assert served.view.has_gram
        n = m.state.items.n
        np.testing.assert_allclose(
            served.view.gram, gram_of(m.state.items.factors[:n]), rtol=1e-12, atol=1e-9
        )
    finally:
        f.consumer.close()
