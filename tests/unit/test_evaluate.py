from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from consumers.cli import main
from stream_mf.config import ModelConfig
from stream_mf.datasets import EventColumns
from stream_mf.evaluate import PopularLearner, SGDLearner, prequential, refit_pieces
from stream_mf.model import EventBatch
from tests.synthetic import planted_stream


def columns(n: int, seed: int = 0, n_users: int = 150, n_items: int = 120) -> EventColumns:
    s = planted_stream(n, n_users, n_items, n_groups=4, seed=seed)
    return EventColumns(s.user_ids(), s.item_ids(), s.times, np.full(n, np.nan), ["view"] * n)


def test_sgd_beats_popularity_on_planted_tastes() -> None:
    ev = columns(30_000, n_users=300, n_items=600)
    pop = prequential(ev, PopularLearner(ModelConfig()), progress=False)
    sgd = prequential(ev, SGDLearner(ModelConfig(dim=16)), progress=False)
    assert pop.evaluated == sgd.evaluated > 3000
    assert sgd.recall_at_k > 1.5 * pop.recall_at_k
    assert 0 < sgd.ndcg_at_k <= sgd.recall_at_k


class NaNLearner(SGDLearner):
    """A diverged model: every score is NaN. It must score zero, not look good."""

    def scores(self, user: int) -> np.ndarray:
        self.model.state.items.factors[:] = np.nan
        return super().scores(user)


def test_nan_scores_count_as_misses() -> None:
    r = prequential(columns(3000), NaNLearner(ModelConfig(dim=4)), progress=False)
    assert r.evaluated > 0 and r.hits == 0 and r.recall_at_k == 0.0


def test_hand_computed_metrics() -> None:
    # u1 sees a, b, then c: popularity ranks (a, b) by weight; c was never seen -> miss
    ev = EventColumns(
        ["u1", "u2", "u2", "u1", "u3"],
        ["a", "a", "b", "b", "c"],
        np.arange(5.0),
        np.full(5, np.nan),
        ["view"] * 5,
    )
    r = prequential(ev, PopularLearner(ModelConfig()), k=2, progress=False)
    # scored: u2/b (seen a -> top excludes a: [] -> b unknown? b unseen -> miss),
    #         u1/b (b known, top-2 excluding a = [b] -> hit at rank 0)
    assert r.evaluated == 2 and r.hits == 1
    assert abs(r.ndcg_at_k - 0.5) < 1e-12


def test_cli_writes_json_and_plot(tmp_path: Path) -> None:
    ev = columns(4000, seed=3)
    f = tmp_path / "events.jsonl"
    with f.open("w") as fh:
        for u, i, t in zip(ev.users, ev.items, ev.times.tolist(), strict=True):
            fh.write(json.dumps({"who": u, "what": i, "when": t}) + "\n")
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(
        [
            "evaluate",
            "--events",
            str(f),
            "--user-col",
            "who",
            "--item-col",
            "what",
            "--time-col",
            "when",
            "--value-col",
            "",
            "--event-type",
            "view",
            "--dim",
            "8",
            "--json",
            str(out),
            "--plot",
            str(png),
            "--window",
            "500",
            "--model",
            "popular,sgd",
            "--no-progress",
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    for key in ("recall_at_k", "ndcg_at_k", "k", "evaluated", "events_per_s", "windows"):
        assert key in res
    assert [m["model"] for m in res["models"]] == ["popular", "sgd"]
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_cli_evaluates_the_shipped_model_by_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No --model: `default`, from the updater's environment (rebuilds every 1,500 events)."""
    ev = columns(4000, seed=4)
    f = tmp_path / "events.csv"
    rows = zip(ev.users, ev.items, ev.times.tolist(), strict=True)
    f.write_text("userId,movieId,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows))
    monkeypatch.setenv("STREAM_MF_REBUILD__EVERY_EVENTS", "1500")
    monkeypatch.setenv("STREAM_MF_REBUILD__ITERATIONS", "2")
    monkeypatch.setenv("STREAM_MF_MODEL__DIM", "8")
    out = tmp_path / "r.json"
    argv = ["evaluate", "--events", str(f), "--value-col", "", "--no-progress", "--json", str(out)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    # as in the updater, a STREAM_MF_REBUILD__ variable replaces the hourly default schedule
    assert "default: the updater's model, rebuilt every 1,500 events, answered" in err
    assert "default: 2 rebuilds" in err
    res = json.loads(out.read_text())
    assert res["model"] == "default" and res["config"]["dim"] == 8
    assert res["config"]["rebuild"]["every_events"] == 1500


def test_cli_names_a_missing_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "e.csv"
    f.write_text("user,item,ts\nu1,i1,1\n")
    assert main(["evaluate", "--events", str(f), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no column 'userId'" in err and "--user-col" in err


def test_refit_pieces_cut_at_the_same_events_however_batched() -> None:
    ev = columns(25)
    batch = EventBatch.build(ev.users, ev.items, np.ones(25), ev.times)

    def refit_points(sizes: list[int]) -> list[int]:
        seen, points, lo = 0, [], 0
        for size in sizes:
            for piece, refit in refit_pieces(batch.slice(lo, lo + size), seen, 10):
                seen += len(piece)
                if refit:
                    points.append(seen)
            lo += size
        return points

    assert refit_points([25]) == [1, 10, 20]
    assert refit_points([1] * 25) == [1, 10, 20]
    assert refit_points([3, 9, 2, 11]) == [1, 10, 20]


def test_hybrid_drives_the_shipped_rebuild_and_repeats() -> None:
    """`hybrid` is the updater's Rebuild (guard, catch-up, swap), run synchronously and counted
    in events: two runs give the same outcomes, event for event."""
    from stream_mf.evaluate import HybridLearner
    from stream_mf.rebuild import RebuildConfig

    ev = columns(12_000, n_users=200, n_items=300)
    rcfg = RebuildConfig(iterations=3, guard_events=300, final_rows=50, after_rows=100)
    runs = []
    for _ in range(2):
        learner = HybridLearner(ModelConfig(dim=16), rcfg, refit_every=3000)
        res = prequential(ev, learner, progress=False, keep_outcomes=True)
        runs.append((res, learner))
    (a, la), (b, lb) = runs
    assert a.outcomes is not None and b.outcomes is not None
    np.testing.assert_array_equal(a.outcomes, b.outcomes)
    assert len(la.outcomes) >= 2 and la.failed == 0
    assert [o.swapped for o in la.outcomes] == [o.swapped for o in lb.outcomes]
    assert all(o.scored >= 300 and not o.unguarded for o in la.outcomes)
    assert la.model.state.model_version == sum(o.swapped for o in la.outcomes) >= 1
