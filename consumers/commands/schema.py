"""`stream-mf schema`: the JSON Schemas of every message, for producers in any language."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stream_mf.schema import json_schemas


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("schema", help="print or write the JSON Schemas of the messages")
    p.add_argument("--out", type=Path, default=None, help="directory to write NAME.schema.json")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    schemas = json_schemas()
    if args.out is None:
        print(json.dumps(schemas, indent=2))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, schema in schemas.items():
        (args.out / f"{name}.schema.json").write_text(json.dumps(schema, indent=2) + "\n")
    print(f"wrote {len(schemas)} schemas to {args.out}")
    return 0
