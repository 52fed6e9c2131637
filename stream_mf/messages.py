"""Request and response contracts of the query service (`rec-requests` / `rec-responses`)."""

from __future__ import annotations

import re
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator

from stream_mf.events import EntityId, Timestamp

RequestKind = Literal["recommend", "similar_items", "recommend_anonymous", "because", "popular"]
Strategy = Literal[
    "personalized", "popular", "similar_items", "anonymous", "because", "candidates", "none"
]
MAX_K = 1000
MAX_LIST = 10_000


class RecRequest(BaseModel):
    """A recommendation request; which fields are needed depends on `kind`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: str = Field(min_length=1, max_length=256)
    kind: RequestKind = "recommend"
    user_id: EntityId | None = None
    item_id: EntityId | None = None
    items: list[EntityId] | None = Field(default=None, max_length=MAX_LIST)
    k: int = Field(default=10, ge=1, le=MAX_K)
    exclude_seen: bool = True
    exclude_items: list[EntityId] = Field(default_factory=list, max_length=MAX_LIST)
    candidates: list[EntityId] | None = Field(default=None, max_length=MAX_LIST)
    sent_at: Timestamp | None = Field(
        default=None, description="client send time, for request-to-reply latency"
    )

    @model_validator(mode="after")
    def _fields_for_kind(self) -> RecRequest:
        need: dict[str, tuple[str, ...]] = {
            "recommend": ("user_id",),
            "similar_items": ("item_id",),
            "recommend_anonymous": ("items",),
            "because": ("user_id", "item_id"),
            "popular": (),
        }
        missing = [f for f in need[self.kind] if getattr(self, f) is None]
        if missing:
            raise ValueError(f"kind {self.kind!r} needs {', '.join(missing)}")
        return self


class ScoredItem(BaseModel):
    model_config = ConfigDict(frozen=True)

    item_id: str
    score: float


class RecResponse(BaseModel):
    """The answer; `error` is set (and `items` empty) when the request could not be served."""

    model_config = ConfigDict(frozen=True)

    request_id: str
    user_id: str | None = None
    items: list[ScoredItem] = Field(default_factory=list)
    strategy: Strategy = "none"
    model_version: int = 0
    generated_at: float
    error: str | None = None


# a JSON string or integer after "request_id": found in bytes that are not JSON as a whole
_REQUEST_ID = re.compile(rb'"request_id"\s*:\s*("(?:[^"\\]|\\.)*"|-?\d+)')


def _id_text(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    text = str(value)[:256]
    return text or None


def request_id_in(raw: bytes) -> str | None:
    """The request id an invalid request carries, as far as it can be read, so its sender can
    match the error reply: from the document when it parses, else from the bytes (truncated
    JSON, invalid UTF-8, NaN). None when there is none."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    else:  # parsed: the bytes hold no other id than the document's
        return _id_text(doc.get("request_id")) if isinstance(doc, dict) else None
    found = _REQUEST_ID.search(raw)
    if found is None:
        return None
    token = found.group(1)
    if not token.startswith(b'"'):
        return _id_text(token.decode())
    try:  # JSON string escapes; an invalid byte inside becomes U+FFFD
        return _id_text(orjson.loads(token.decode("utf-8", "replace").encode()))
    except orjson.JSONDecodeError:
        return None
