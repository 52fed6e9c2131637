"""Reading event files (CSV, TSV, JSONL; gzip welcome) into columns, for replay and evaluation."""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import orjson

from stream_mf.events import normalize_timestamp


@dataclass
class EventColumns:
    users: list[str]
    items: list[str]
    times: np.ndarray  # float64 epoch seconds
    values: np.ndarray  # float64, NaN where absent
    event_types: list[str]

    def __len__(self) -> int:
        return len(self.users)

    def sorted_by_time(self) -> EventColumns:
        order = np.argsort(self.times, kind="stable")
        return self.take(order)

    def take(self, order: np.ndarray) -> EventColumns:
        ol = order.tolist()
        return EventColumns(
            users=[self.users[j] for j in ol],
            items=[self.items[j] for j in ol],
            times=self.times[order],
            values=self.values[order],
            event_types=[self.event_types[j] for j in ol],
        )


@dataclass(frozen=True)
class ColumnSpec:
    """Which columns hold what; the defaults read MovieLens `ratings.csv` as it comes."""

    user_col: str = "userId"
    item_col: str = "movieId"
    time_col: str = "timestamp"
    value_col: str | None = "rating"
    type_col: str | None = None
    event_type: str = "rating"
    sep: str | None = None  # None: ',' for .csv, '\t' for .tsv
    min_value: float | None = None


def _open_text(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _kind(path: Path) -> str:
    name = path.name.removesuffix(".gz")
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if name.endswith(".tsv"):
        return "tsv"
    return "csv"


def _time(raw: object) -> float:
    if isinstance(raw, str):
        with contextlib.suppress(ValueError):
            raw = float(raw)
    return normalize_timestamp(raw)


def _rows(path: Path, spec: ColumnSpec) -> Iterator[dict[str, object]]:
    kind = _kind(path)
    with _open_text(path) as fh:
        if kind == "jsonl":
            for lineno, line in enumerate(fh, start=1):
                if line.strip():
                    try:
                        doc = orjson.loads(line)
                    except orjson.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{lineno}: not JSON ({exc})") from None
                    if not isinstance(doc, dict):
                        raise ValueError(
                            f"{path}:{lineno}: a JSON {type(doc).__name__} where an event object "
                            'belongs, e.g. {"user_id": "u1", "item_id": "i1", "timestamp": 1.7e9}'
                        )
                    yield doc
        else:
            sep = spec.sep or ("\t" if kind == "tsv" else ",")
            yield from csv.DictReader(fh, delimiter=sep)


def read_events(path: str | Path, spec: ColumnSpec = ColumnSpec()) -> EventColumns:
    """Read every event; a missing column is an error that names the columns present."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"event file {path} does not exist")
    users: list[str] = []
    items: list[str] = []
    times: list[float] = []
    values: list[float] = []
    types: list[str] = []
    for lineno, row in enumerate(_rows(path, spec), start=2):
        try:
            u, i, t = row[spec.user_col], row[spec.item_col], row[spec.time_col]
        except KeyError as exc:
            raise ValueError(
                f"{path}: no column {exc.args[0]!r}; columns are {sorted(row)}. "
                "Name them with --user-col, --item-col, --time-col"
            ) from None
        v = math.nan
        if spec.value_col and row.get(spec.value_col) not in (None, ""):
            v = float(row[spec.value_col])  # type: ignore[arg-type]
        if spec.min_value is not None and not (v >= spec.min_value):
            continue
        try:
            ts = _time(t)
        except ValueError as exc:
            raise ValueError(f"{path}:{lineno}: {exc}") from None
        users.append(str(u))
        items.append(str(i))
        times.append(ts)
        values.append(v)
        types.append(str(row[spec.type_col]) if spec.type_col else spec.event_type)
    return EventColumns(users, items, np.asarray(times), np.asarray(values), types)
