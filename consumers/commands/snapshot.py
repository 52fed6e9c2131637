"""`stream-mf snapshot`: ask the running updater for a learner snapshot now (before a planned
move of its disk, or to shorten the replay a lost disk would need)."""

from __future__ import annotations

import argparse

from consumers.commands.control import add_control_parser


def add_parser(sub: argparse._SubParsersAction) -> None:
    add_control_parser(
        sub, "snapshot", "ask the running updater to write a learner snapshot to Kafka now"
    )
