"""JSON Schemas of every message, so producers in other languages can validate before sending."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from stream_mf.events import InteractionEvent
from stream_mf.messages import RecRequest, RecResponse

MESSAGES: dict[str, type[BaseModel]] = {
    "interaction": InteractionEvent,
    "rec_request": RecRequest,
    "rec_response": RecResponse,
}


def json_schemas() -> dict[str, dict[str, Any]]:
    return {name: model.model_json_schema() for name, model in MESSAGES.items()}
