"""`stream-mf rebuild`: ask the running updater for a full ALS rebuild now."""

from __future__ import annotations

import argparse

from consumers.commands.control import add_control_parser


def add_parser(sub: argparse._SubParsersAction) -> None:
    add_control_parser(sub, "rebuild", "ask the running updater for a full ALS rebuild now")
