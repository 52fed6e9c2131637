"""Command-line flags generated from the pydantic models, so flags and settings never drift."""

from __future__ import annotations

import argparse
import json
from typing import Any

from pydantic import BaseModel

from consumers.errors import UserError
from stream_mf.config import ModelConfig

_SKIP = {"event_types"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel] = ModelConfig) -> None:
    """One flag per field; unset flags keep the model's default."""
    group = parser.add_argument_group("model hyper-parameters")
    for name, field in model.model_fields.items():
        if name in _SKIP:
            continue
        ann = field.annotation
        kind: Any = ann if ann in (int, float) else str
        group.add_argument(
            _flag(name),
            dest=f"model_{name}",
            metavar=name.upper(),
            type=kind,
            default=None,
            help=f"{field.description or name} (default: {field.default})",
        )
    group.add_argument(
        "--event-types",
        dest="model_event_types",
        default=None,
        help='JSON, e.g. \'{"view": {"weight": 1}, "rating": {"weight": 1, "use_value": true}}\'',
    )


def model_config_from(args: argparse.Namespace, base: ModelConfig | None = None) -> ModelConfig:
    values = (base or ModelConfig()).model_dump()
    for name in ModelConfig.model_fields:
        v = getattr(args, f"model_{name}", None)
        if v is not None:
            values[name] = _event_types(v) if name == "event_types" else v
    return ModelConfig.model_validate(values)


def _event_types(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"--event-types is not valid JSON ({exc}): e.g. "
            '\'{"view": {"weight": 1}, "rating": {"weight": 1, "use_value": true}}\''
        ) from None
