"""Event files as users bring them: MovieLens CSV, the product's own JSONL events, and every way
one can be wrong, each named by file and line in one message."""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Sequence
from pathlib import Path

import pytest

from consumers.cli import main
from stream_mf.datasets import ColumnSpec, EventFileError, read_events

EVENTS: list[dict[str, object]] = [
    {
        "user_id": "u1",
        "item_id": "i1",
        "event_type": "click",
        "timestamp": 1_700_000_000,
        "value": None,
    },
    {"user_id": "u2", "item_id": "i1", "event_type": "view", "timestamp": "2023-11-14T22:13:21Z"},
    {
        "user_id": "u1",
        "item_id": "i2",
        "event_type": "rating",
        "timestamp": 1_700_000_002_000,
        "value": 4.5,
    },
]


def jsonl(path: Path, rows: Sequence[object], blank_after_first: bool = True) -> Path:
    lines = [json.dumps(r) for r in rows]
    if blank_after_first:
        lines.insert(1, "")  # a blank line: skipped, but counted in line numbers
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_products_own_event_format_needs_no_flags(tmp_path: Path) -> None:
    ev = read_events(jsonl(tmp_path / "e.jsonl", EVENTS))
    assert ev.users == ["u1", "u2", "u1"] and ev.items == ["i1", "i1", "i2"]
    assert ev.event_types == ["click", "view", "rating"]
    assert ev.times.tolist() == [1_700_000_000.0, 1_700_000_001.0, 1_700_000_002.0]
    assert math.isnan(ev.values[0]) and math.isnan(ev.values[1]) and ev.values[2] == 4.5


def test_movielens_columns_still_read_as_before(tmp_path: Path) -> None:
    f = tmp_path / "ratings.csv"
    f.write_text("userId,movieId,rating,timestamp\n1,31,2.5,1260759144\n7,1029,3.0,1260759179\n")
    ev = read_events(f)
    assert ev.users == ["1", "7"] and ev.items == ["31", "1029"]
    assert ev.values.tolist() == [2.5, 3.0] and ev.event_types == ["rating", "rating"]


def test_cli_evaluates_the_products_own_events_without_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [
        {
            "user_id": f"u{n % 5}",
            "item_id": f"i{n % 13}",
            "event_type": "view",
            "timestamp": 1_700_000_000 + n,
        }
        for n in range(300)
    ]
    f = jsonl(tmp_path / "events.jsonl", rows)
    assert main(["evaluate", "--events", str(f), "--no-progress", "--dim", "4"]) == 0
    captured = capsys.readouterr()
    assert "300 events from" in captured.err and "nan" not in captured.out


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", "", "holds no events: it has no rows"),
        ("blank.jsonl", "\n\n", "holds no events: it has no rows"),
        ("header.csv", "userId,movieId,rating,timestamp\n", "holds no events: it has no rows"),
    ],
)
def test_a_file_without_events_is_an_error(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    content: str,
    message: str,
) -> None:
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(EventFileError, match=message):
        read_events(f)
    assert main(["evaluate", "--events", str(f), "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert "holds no events" in captured.err and "nan" not in captured.out + captured.err


def test_filtering_away_every_row_says_so(tmp_path: Path) -> None:
    f = tmp_path / "r.csv"
    f.write_text("userId,movieId,rating,timestamp\n1,2,1.0,1700000000\n1,3,2.0,1700000001\n")
    with pytest.raises(EventFileError, match=r"none of its 2 rows has a value >= 4\.0"):
        read_events(f, ColumnSpec(min_value=4.0))


def bad(path: Path) -> str:
    with pytest.raises(EventFileError) as info:
        read_events(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path))
    return message.removeprefix(str(path))


def test_bad_values_name_file_and_line(tmp_path: Path) -> None:
    csv_file = tmp_path / "r.csv"
    csv_file.write_text("userId,movieId,rating,timestamp\n1,2,3.5,1700000000\n1,3,good,17\n")
    assert bad(csv_file) == ":3: rating 'good' is not a number"
    rows = [EVENTS[0], {**EVENTS[1], "value": "lots"}]
    assert bad(jsonl(tmp_path / "v.jsonl", rows)) == ":3: value 'lots' is not a number"
    rows = [EVENTS[0], {**EVENTS[1], "value": True}]
    assert bad(jsonl(tmp_path / "b.jsonl", rows)) == ":3: value True is not a number"
    rows = [EVENTS[0], {**EVENTS[1], "timestamp": "soon"}]
    assert bad(jsonl(tmp_path / "t.jsonl", rows)).startswith(":3: timestamp 'soon' is not RFC")


def test_jsonl_line_numbers_count_every_line(tmp_path: Path) -> None:
    f = tmp_path / "e.jsonl"
    f.write_text(json.dumps(EVENTS[0]) + "\n\n\n" + '{"user_id": "u1", "item_id":\n')
    assert bad(f).startswith(":4: not JSON")
    f.write_text("\n" + json.dumps(EVENTS[0]) + "\n[1, 2]\n")
    assert bad(f).startswith(":3: a JSON list where an event object belongs")


@pytest.mark.parametrize("missing", [None, ""])
def test_null_or_empty_ids_are_errors_not_the_string_none(tmp_path: Path, missing: object) -> None:
    rows = [EVENTS[0], {**EVENTS[1], "user_id": missing}]
    assert bad(jsonl(tmp_path / "e.jsonl", rows)) == ":3: user_id is empty; every event needs one"
    rows = [EVENTS[0], {**EVENTS[1], "item_id": ["i1"]}]
    assert bad(jsonl(tmp_path / "l.jsonl", rows)) == (
        ":3: item_id is ['i1'], not a string or integer; every event needs one"
    )
    csv_file = tmp_path / "r.csv"
    csv_file.write_text("userId,movieId,rating,timestamp\n1,2,3.5,1700000000\n,3,4,1700000001\n")
    assert bad(csv_file) == ":3: userId is empty; every event needs one"


def test_integer_ids_are_read_as_text(tmp_path: Path) -> None:
    ev = read_events(jsonl(tmp_path / "e.jsonl", [{**EVENTS[0], "user_id": 42}]))
    assert ev.users == ["42"]


def test_unreadable_files_are_named(tmp_path: Path) -> None:
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"userId,movieId,rating,timestamp\n1,2,3,1700000000\nJos\xe9,2,3,17\n")
    assert bad(latin).startswith(":3: not UTF-8 text")
    packed = tmp_path / "latin.csv.gz"
    packed.write_bytes(gzip.compress(latin.read_bytes()))
    assert bad(packed).startswith(":3: not UTF-8 text")
    fake = tmp_path / "fake.csv.gz"
    fake.write_bytes(b"userId,movieId\n")
    assert "ot a gzipped file" in bad(fake)
    assert bad(tmp_path) == " is a directory; give an event file (CSV, TSV or JSONL)"


@pytest.mark.parametrize("model", ["", " , ", "popular,tarot"])
def test_evaluate_refuses_an_empty_or_unknown_model_list(
    model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["evaluate", "--model", model, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "choose from" in err
