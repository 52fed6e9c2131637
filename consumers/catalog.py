"""Item titles for display (MovieLens movies.csv or any CSV with an id and a title column)."""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path

DEFAULT_CATALOG = (
    Path(__file__).resolve().parent.parent / "data/movielens-latest-small/movies.csv.gz"
)


def load_titles(
    path: str | Path = DEFAULT_CATALOG, id_col: str = "movieId", title_col: str = "title"
) -> dict[str, str]:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as fh:
        return {row[id_col]: row[title_col] for row in csv.DictReader(fh)}
