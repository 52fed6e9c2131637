from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from stream_mf.config import DEFAULT_EVENT_TYPES, EventTypeSpec
from stream_mf.events import InteractionEvent, describe_error, event_weight
from stream_mf.messages import RecRequest

CTX = {"event_types": DEFAULT_EVENT_TYPES}
GOOD = {"user_id": "u1", "item_id": "i1", "event_type": "click", "timestamp": 1_700_000_000.5}


def check(payload: dict, **ctx: object) -> InteractionEvent:
    return InteractionEvent.model_validate(payload, context=ctx or CTX)


def error_of(payload: dict) -> str:
    with pytest.raises(ValidationError) as exc:
        check(payload)
    return describe_error(exc.value)


def test_valid_event_and_timestamp_forms() -> None:
    assert check(GOOD).timestamp == 1_700_000_000.5
    assert check({**GOOD, "timestamp": 1_700_000_000_500}).timestamp == 1_700_000_000.5
    assert check({**GOOD, "timestamp": "2023-11-14T22:13:20Z"}).timestamp == 1_700_000_000.0
    assert check({**GOOD, "timestamp": "2023-11-14T23:13:20+01:00"}).timestamp == 1_700_000_000.0


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"user_id": ""}, "user_id", "at least 1"),
        ({"user_id": "x" * 10_000}, "user_id", "at most 256"),
        ({"item_id": 42}, "item_id", "ids are strings"),
        ({"item_id": None}, "item_id", "ids are strings"),
        ({"event_type": "teleport"}, "event_type", "unknown event_type"),
        ({"timestamp": math.nan}, "timestamp", "finite"),
        ({"timestamp": math.inf}, "timestamp", "finite"),
        ({"timestamp": -5}, "timestamp", "negative"),
        ({"timestamp": 1e20}, "timestamp", "too large"),
        ({"timestamp": "yesterday"}, "timestamp", "not RFC 3339"),
        ({"timestamp": "2023-11-14T22:13:20"}, "timestamp", "no UTC offset"),
        ({"timestamp": True}, "timestamp", "not a boolean"),
        ({"value": math.nan}, "value", "finite"),
        ({"value": "lots"}, "value", "number"),
        ({"value": True}, "value", "not a boolean"),
        ({"colour": "red"}, "colour", "Extra inputs"),
    ],
)
def test_errors_name_the_field_and_problem(change: dict, field: str, words: str) -> None:
    msg = error_of({**GOOD, **change})
    assert msg.startswith(field + ":") or f"{field}:" in msg, msg
    assert words in msg, msg


def test_missing_fields_are_named() -> None:
    msg = error_of({"user_id": "u1"})
    for field in ("item_id", "event_type", "timestamp"):
        assert f"{field}: Field required" in msg


def test_value_required_for_weighted_types() -> None:
    types = {"rating": EventTypeSpec(weight=1.0, use_value=True)}
    with pytest.raises(ValidationError, match="needs a numeric 'value'"):
        check({**GOOD, "event_type": "rating"}, event_types=types)
    ev = check({**GOOD, "event_type": "rating", "value": 4.5}, event_types=types)
    assert event_weight(ev.event_type, ev.value, types) == 4.5
    assert event_weight("purchase", None, DEFAULT_EVENT_TYPES) == 8.0


def test_request_fields_depend_on_kind() -> None:
    with pytest.raises(ValidationError, match="needs user_id"):
        RecRequest(request_id="r1", kind="recommend")
    with pytest.raises(ValidationError, match="needs item_id"):
        RecRequest(request_id="r1", kind="similar_items")
    with pytest.raises(ValidationError, match="less than or equal to 1000"):
        RecRequest(request_id="r1", user_id="u", k=100_000)
    assert RecRequest(request_id="r1", kind="popular").k == 10
