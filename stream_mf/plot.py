"""PNG plots of results worth seeing (matplotlib, optional: `pip install stream-mf[plot]`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_windows(results: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Per-window Recall@K and NDCG@K of one or more prequential runs, against events seen."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError("plotting needs matplotlib: pip install 'stream-mf[plot]'") from exc
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for r in results:
        xs = [w["event"] for w in r["windows"]]
        label = f"{r['model']} (R@{r['k']}={r['recall_at_k']:.3f})"
        axes[0].plot(xs, [w["recall_at_k"] for w in r["windows"]], label=label)
        axes[1].plot(xs, [w["ndcg_at_k"] for w in r["windows"]], label=r["model"])
    k = results[0]["k"] if results else 10
    axes[0].set_ylabel(f"Recall@{k} per window")
    axes[1].set_ylabel(f"NDCG@{k} per window")
    for ax in axes:
        ax.set_xlabel("events (time order)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title or "Prequential evaluation (test-then-learn)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_recovery(
    curves: Sequence[dict[str, Any]], change: int, path: str | Path, title: str = ""
) -> Path:
    """Rolling hit rate of each model against events, with the change of tastes marked.

    Each curve is {"model", "events": [...], "hit_rate": [...], "recovered": events or None,
    optionally "note": what to say instead of the events (e.g. "no drop")}."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError("plotting needs matplotlib: pip install 'stream-mf[plot]'") from exc
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for c in curves:
        back = c.get("recovered")
        note = c.get("note") or ("never" if back is None else f"{back:,} events")
        label = f"{c['model']} ({note})"
        ax.plot(c["events"], c["hit_rate"], label=label, lw=1.4)
    ax.axvline(change, color="k", ls="--", lw=1)
    ax.set_xlabel("events (time order)")
    ax.set_ylabel("HR@10, rolling window of scored events")
    ax.grid(alpha=0.3)
    ax.legend(title="back to 90% of the rate before", fontsize=8)
    ax.set_title(title or "Recovery after a change of tastes")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
