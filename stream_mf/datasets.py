"""Reading event files (CSV, TSV, JSONL; gzip welcome) into columns, for replay and evaluation."""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

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


class EventFileError(ValueError):
    """An event file that cannot be read as events; the message is one line naming the file
    (and the line, where there is one) and what to fix."""


#: The product's own event format (what goes on `interactions`), recognised without flags:
#: a column left at its MovieLens default that a file lacks is read under this name instead.
PRODUCT_COLUMNS = {
    "user_col": "user_id",
    "item_col": "item_id",
    "time_col": "timestamp",
    "value_col": "value",
}
PRODUCT_TYPE_COL = "event_type"


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


def _rows(path: Path, spec: ColumnSpec) -> Iterator[tuple[int, dict[str, object]]]:
    """(line number in the file, row) pairs; blank JSONL lines are skipped but counted."""
    kind = _kind(path)
    with _open_text(path) as fh:
        if kind == "jsonl":
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    raise EventFileError(f"{path}:{lineno}: not JSON ({exc})") from None
                if not isinstance(row, dict):
                    raise EventFileError(
                        f"{path}:{lineno}: a JSON {type(row).__name__} where an event object "
                        'belongs, e.g. {"user_id": "u1", "item_id": "i1", "timestamp": 1.7e9}'
                    )
                yield lineno, row
        else:
            sep = spec.sep or ("\t" if kind == "tsv" else ",")
            reader = csv.DictReader(fh, delimiter=sep)
            for row in reader:
                yield reader.line_num, row


def _first_non_utf8_line(path: Path) -> int | None:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return lineno
    return None


def _resolve(spec: ColumnSpec, row: dict[str, object]) -> ColumnSpec:
    """The spec to read this file with: columns left at their MovieLens defaults that the file
    lacks are read under the product's own names (a file of the product's events needs no
    flags)."""
    default = ColumnSpec()
    names: dict[str, Any] = {}  # ColumnSpec's column-name fields (str) by name, for `replace`
    for field, product in PRODUCT_COLUMNS.items():
        name = getattr(spec, field)
        if name == getattr(default, field) and name not in row and product in row:
            names[field] = product
    if names and spec.type_col is None and PRODUCT_TYPE_COL in row:
        names["type_col"] = PRODUCT_TYPE_COL
    return replace(spec, **names) if names else spec


def _id(raw: object, column: str, where: str) -> str:
    if isinstance(raw, bool) or not isinstance(raw, str | int) or raw == "":
        what = "empty" if raw in (None, "") else f"{raw!r}, not a string or integer"
        raise EventFileError(f"{where}: {column} is {what}; every event needs one")
    return str(raw)


def _value(raw: object, column: str, where: str) -> float:
    if raw is None or raw == "":
        return math.nan
    try:
        if isinstance(raw, bool) or not isinstance(raw, str | int | float):
            raise ValueError
        v = float(raw)
    except (TypeError, ValueError):
        raise EventFileError(f"{where}: {column} {raw!r} is not a number") from None
    if not math.isfinite(v):
        raise EventFileError(f"{where}: {column} {raw!r} is not a finite number")
    return v


def read_events(path: str | Path, spec: ColumnSpec = ColumnSpec()) -> EventColumns:
    """Read every event. Whatever cannot be read is an `EventFileError` naming the file, the
    line and what to fix; a file without events is one too (nothing to replay or evaluate)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"event file {path} does not exist")
    if path.is_dir():
        raise EventFileError(f"{path} is a directory; give an event file (CSV, TSV or JSONL)")
    users: list[str] = []
    items: list[str] = []
    times: list[float] = []
    values: list[float] = []
    types: list[str] = []
    rows = 0
    use: ColumnSpec | None = None
    lineno = 0
    try:
        for lineno, row in _rows(path, spec):
            rows += 1
            where = f"{path}:{lineno}"
            use = use or _resolve(spec, row)
            try:
                u, i, t = row[use.user_col], row[use.item_col], row[use.time_col]
            except KeyError as exc:
                raise EventFileError(
                    f"{where}: no column {exc.args[0]!r}; columns are {sorted(map(str, row))}. "
                    "Name them with --user-col, --item-col, --time-col"
                ) from None
            v = _value(row.get(use.value_col), use.value_col, where) if use.value_col else math.nan
            if use.min_value is not None and not (v >= use.min_value):
                continue
            try:
                ts = _time(t)
            except (TypeError, ValueError) as exc:
                raise EventFileError(f"{where}: {exc}") from None
            users.append(_id(u, use.user_col, where))
            items.append(_id(i, use.item_col, where))
            times.append(ts)
            values.append(v)
            types.append(
                _id(row.get(use.type_col), use.type_col, where) if use.type_col else use.event_type
            )
    except UnicodeDecodeError as exc:  # decoded in chunks: find the line itself
        bad = _first_non_utf8_line(path)
        at = f"{path}:{bad}" if bad else str(path)
        raise EventFileError(f"{at}: not UTF-8 text ({exc.reason}); re-encode the file") from None
    except (OSError, EOFError, csv.Error) as exc:  # not gzip, truncated, a broken CSV quote
        at = f"{path}:{lineno + 1}" if lineno else str(path)
        raise EventFileError(f"{at}: {exc}") from None
    if not users:
        why = (
            "it has no rows"
            if rows == 0
            else (f"none of its {rows:,} rows has a value >= {spec.min_value}")
        )
        raise EventFileError(f"{path} holds no events: {why}")
    return EventColumns(users, items, np.asarray(times), np.asarray(values), types)
