"""The interaction event contract: what producers publish to the `interactions` topic.

Validation errors must tell a producer what to fix, so every check raises with the field name and a
concrete example of an accepted value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from stream_mf.config import EventTypeSpec

MAX_ID_CHARS = 256
#: Epoch values at or above this are read as milliseconds (1e11 s would be the year 5138).
MS_THRESHOLD = 1e11
#: Latest accepted time, in ms: year 5138. Anything later is a unit mistake, not a date.
MAX_EPOCH_MS = 1e14


def normalize_timestamp(value: Any) -> float:
    """Epoch seconds, epoch milliseconds or an RFC 3339 string -> float epoch seconds."""
    if isinstance(value, bool):
        raise ValueError("timestamp must be a number or an RFC 3339 string, not a boolean")
    if isinstance(value, int | float):
        ts = float(value)
        if not math.isfinite(ts):
            raise ValueError("timestamp must be finite, e.g. 1700000000.5")
        if ts < 0:
            raise ValueError("timestamp must not be negative (epoch seconds or milliseconds)")
        if ts >= MAX_EPOCH_MS:
            raise ValueError(
                f"timestamp {value!r} is too large for epoch milliseconds; send epoch seconds "
                "(1700000000.5), milliseconds (1700000000500) or RFC 3339 text"
            )
        return ts / 1000.0 if ts >= MS_THRESHOLD else ts
    if isinstance(value, str):
        text = value.strip()
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(
                f"timestamp {value[:64]!r} is not RFC 3339; e.g. '2023-11-14T22:13:20Z'"
            ) from None
        if dt.tzinfo is None:
            raise ValueError(f"timestamp {value[:64]!r} has no UTC offset; add 'Z' or '+00:00'")
        ts = dt.timestamp()
        if ts < 0:
            raise ValueError(f"timestamp {value[:64]!r} is before 1970; events come after it")
        return ts
    raise ValueError(
        f"timestamp must be a number or an RFC 3339 string, got {type(value).__name__}"
    )


def _strict_id(value: Any) -> Any:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise ValueError(
            f"ids are strings: send {str(value)!r} (in quotes), not the number {value!r}"
        )
    raise ValueError(f"ids are strings, got {type(value).__name__}")


def _not_bool(value: Any) -> Any:
    """JSON true would be read as 1.0: almost surely a producer bug, never a weight."""
    if isinstance(value, bool):
        raise ValueError("value must be a number, not a boolean (send e.g. 1.0)")
    return value


EntityId = Annotated[
    str,
    BeforeValidator(_strict_id),
    Field(min_length=1, max_length=MAX_ID_CHARS),
]
Timestamp = Annotated[float, BeforeValidator(normalize_timestamp)]


class InteractionEvent(BaseModel):
    """One user-item interaction. Validate with `context={"event_types": ...}` to check the type."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)

    user_id: EntityId
    item_id: EntityId
    event_type: str = Field(min_length=1, max_length=64)
    timestamp: Timestamp
    value: Annotated[float | None, BeforeValidator(_not_bool)] = Field(
        default=None, allow_inf_nan=False
    )
    event_id: EntityId | None = None

    @field_validator("event_type")
    @classmethod
    def _known_type(cls, v: str, info: ValidationInfo) -> str:
        types = (info.context or {}).get("event_types")
        if types is not None and v not in types:
            known = ", ".join(sorted(types))
            raise ValueError(
                f"unknown event_type {v[:64]!r}; configured types are: {known} "
                "(add it to the event_types setting to accept it)"
            )
        return v

    @model_validator(mode="after")
    def _value_when_needed(self, info: ValidationInfo) -> InteractionEvent:
        types: Mapping[str, EventTypeSpec] | None = (info.context or {}).get("event_types")
        if types is not None and types[self.event_type].use_value:
            if self.value is None:
                raise ValueError(f"event_type {self.event_type!r} needs a numeric 'value'")
            if self.value < 0:
                raise ValueError("value must be >= 0 for a weighted event type")
        return self


def event_weight(event_type: str, value: float | None, types: Mapping[str, EventTypeSpec]) -> float:
    """The base (undecayed) weight an event contributes."""
    spec = types[event_type]
    return spec.weight * value if spec.use_value and value is not None else spec.weight


def describe_error(exc: ValidationError) -> str:
    """One line naming every failing field and what was wrong with it."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "message"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)
