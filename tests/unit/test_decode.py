"""Batch decoding keeps input order whichever path each payload takes."""

from __future__ import annotations

import orjson

from stream_mf.config import EventTypeSpec, ModelConfig
from stream_mf.decode import decode_events, fast_path

TYPES = ModelConfig().event_types


def _ev(user: str, ts: object, **extra: object) -> bytes:
    return orjson.dumps(
        {"user_id": user, "item_id": "i", "event_type": "view", "timestamp": ts, **extra}
    )


def test_columns_follow_input_order_across_fast_and_model_paths() -> None:
    payloads = [
        _ev("a", 1.7e9),  # fast
        _ev("b", 1_700_000_000_500),  # ms: the model's path
        b"{not json",
        _ev("c", "2023-11-14T22:13:20Z"),  # RFC 3339: the model's path
        None,
        _ev("d", 5),  # fast (an int)
        _ev("e", 1.7e9, value=True),  # a boolean value: the model decides (it coerces to 1.0)
    ]
    dec = decode_events(payloads, TYPES)
    assert dec.positions == [0, 1, 3, 5, 6]
    assert dec.users == ["a", "b", "c", "d", "e"]
    assert dec.times == [1.7e9, 1_700_000_000.5, 1_700_000_000.0, 5.0, 1.7e9]
    assert [(r.position, r.reason) for r in dec.rejects] == [(2, "malformed_json"), (4, "empty")]
    assert [fast_path(p, TYPES) is not None for p in payloads if p] == [
        True, False, False, False, True, False
    ]  # fmt: skip


def test_duplicate_keys_take_the_last_value_on_both_paths() -> None:
    raw = b'{"user_id":"x","user_id":"y","item_id":"i","event_type":"view","timestamp":1}'
    assert decode_events([raw], TYPES).users == ["y"]
    assert orjson.loads(raw)["user_id"] == "y"  # what the model path sees


def test_weighted_types_multiply_the_value() -> None:
    raw = orjson.dumps(
        {"user_id": "u", "item_id": "i", "event_type": "rating", "timestamp": 1, "value": 4.5}
    )
    types = {**TYPES, "rating": EventTypeSpec(weight=2.0, use_value=True)}
    assert decode_events([raw], types).weights == [9.0]
    assert fast_path(raw, types) == ("u", "i", "rating", 9.0, 1.0)
    neg = orjson.dumps(
        {"user_id": "u", "item_id": "i", "event_type": "rating", "timestamp": 1, "value": -1}
    )
    assert decode_events([neg], types).rejects[0].reason == "invalid_field"
    assert decode_events([raw.replace(b',"value":4.5', b"")], types).rejects[0].reason == (
        "invalid_field"
    )  # a weighted type needs its value


def test_events_from_the_future_are_rejected_with_their_reason() -> None:
    latest = 1.8e9
    payloads = [
        _ev("a", 1.7e9),
        _ev("b", 4.1e9),  # 2099 in seconds: fast path
        _ev("c", 4_100_000_000_000),  # the same in ms: the model's path
        _ev("d", latest),  # exactly the bound: accepted
        _ev("e", "2099-01-01T00:00:00Z"),
    ]
    dec = decode_events(payloads, TYPES, latest=latest)
    assert dec.positions == [0, 3] and dec.users == ["a", "d"]
    assert [(r.position, r.reason) for r in dec.rejects] == [
        (1, "future_timestamp"), (2, "future_timestamp"), (4, "future_timestamp")
    ]  # fmt: skip
    assert (
        "2099-12-03" in dec.rejects[0].message and "--max-future-seconds" in dec.rejects[0].message
    )
    assert decode_events(payloads, TYPES).positions == [0, 1, 2, 3, 4]  # no bound: all accepted
