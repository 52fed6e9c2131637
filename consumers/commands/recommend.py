"""`stream-mf recommend USER`: ask the query service and print the answer."""

from __future__ import annotations

import argparse
from pathlib import Path

from consumers.catalog import load_titles
from consumers.client import RecClient
from consumers.commands.common import add_process_flags, build_settings, positive_float
from consumers.errors import UnavailableError
from consumers.kafka_io import require_broker
from consumers.settings import ClientSettings
from stream_mf.messages import RecResponse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recommend", help="request recommendations and print them")
    p.add_argument("user", nargs="?", default=None, help="user id (omit with --kind popular)")
    p.add_argument("-k", "--k", type=int, default=10)
    p.add_argument(
        "--kind",
        default="recommend",
        choices=["recommend", "similar_items", "recommend_anonymous", "because", "popular"],
    )
    p.add_argument("--item", default=None, help="item id for similar_items / because")
    p.add_argument("--items", default=None, help="comma-separated items for recommend_anonymous")
    p.add_argument("--catalog", type=Path, default=None, help="CSV of titles (MovieLens movies)")
    p.add_argument(
        "--timeout",
        type=positive_float,
        default=10.0,
        help="seconds to wait for the broker, then for the reply (default 10)",
    )
    add_process_flags(p, state=False, metrics=False)
    p.set_defaults(run=run)


def format_response(resp: RecResponse, titles: dict[str, str] | None = None) -> str:
    if resp.error:
        return f"error: {resp.error}"
    lines = [f"{resp.strategy} (model v{resp.model_version}) for {resp.user_id or '-'}:"]
    for rank, it in enumerate(resp.items, 1):
        title = f"  {titles.get(it.item_id, '')}" if titles else ""
        lines.append(f"{rank:>3}. {it.item_id:<10} {it.score:9.4f}{title}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    settings = build_settings(ClientSettings, args)
    req: dict = {"kind": args.kind, "k": args.k}
    if args.user:
        req["user_id"] = args.user
    if args.item:
        req["item_id"] = args.item
    if args.items:
        req["items"] = [s.strip() for s in args.items.split(",") if s.strip()]
    require_broker(settings.kafka, args.timeout)
    client = RecClient(settings.kafka, settings.topics.requests, settings.topics.responses)
    try:
        resp = client.ask(req, timeout=args.timeout)
    except TimeoutError as exc:
        raise UnavailableError(str(exc)) from exc
    finally:
        client.close()
    titles = load_titles(args.catalog) if args.catalog else None
    print(format_response(resp, titles))
    return 1 if resp.error else 0
