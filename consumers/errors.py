"""The one place that decides how a failure ends: a user's mistake in one line, a bug in a
traceback.

Commands raise :class:`UserError` (or let a known library exception through) with a message that
says what was wrong and how to fix it; `cli.main` prints it as `stream-mf CMD: LINE` on stderr and
exits with the error's code. Anything else is a bug in stream-mf and keeps its traceback: the
updater and the query service run for hours, so a crash must carry what a report needs the first
time, not after a re-run with `--debug` that may never reproduce it.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from pydantic import ValidationError

#: an unexpected exception (a bug): Python's own code for an uncaught exception
EXIT_BUG = 1
#: a mistake the user can fix: a flag, an environment variable, a path, a store in use
EXIT_USAGE = 2
#: nothing answers: no Kafka broker, or no query service replied in time (sysexits' EX_UNAVAILABLE)
EXIT_UNAVAILABLE = 69


class UserError(Exception):
    """A mistake the user can fix; the message, one line, says what and how."""

    exit_code = EXIT_USAGE


class UnavailableError(UserError):
    """No broker answered, or no service replied, within the timeout: retrying may work."""

    exit_code = EXIT_UNAVAILABLE


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _first_line(text: str) -> str:
    """A library message on one line (embedded-broker errors append a log tail after a newline)."""
    lines = [s.strip() for s in str(text).splitlines() if s.strip()]
    return _TAIL.sub("", lines[0]) if lines else ""


_TAIL = re.compile(r"[;:,]?\s*(log tail)?:?$")


#: settings fields whose flag is named differently from the field path
_FLAG_OF: dict[tuple[str, ...], str] = {
    ("kafka", "bootstrap_servers"): "bootstrap_servers",
    ("metrics", "port"): "metrics_port",
    ("metrics", "host"): "metrics_host",
}
#: fields of configs built from flags with a prefix (evaluate's ALS flags)
_PREFIXED = {"RebuildConfig": "als_"}


def _source(title: str, loc: tuple[str, ...], args: argparse.Namespace | None) -> str:
    """Where the bad value came from: the flag if one was given, else the environment variable."""
    if not loc:
        return title
    if title == "ModelConfig":  # only ever built from the model flags over settings
        head, rest = loc[0], loc[1:]
        return flag(head) + (f" {'.'.join(rest)}" if rest else "")
    if title in _PREFIXED:
        return flag(_PREFIXED[title] + loc[0])
    dest = _FLAG_OF.get(loc[:2], loc[0] if len(loc) == 1 else None)
    if dest is not None and args is not None and getattr(args, dest, None) is not None:
        return flag(dest)
    if loc[:2] == ("kafka", "bootstrap_servers") and not os.environ.get(
        "STREAM_MF_KAFKA__BOOTSTRAP_SERVERS"
    ):
        return "KAFKA_BOOTSTRAP_SERVERS"
    return "STREAM_MF_" + "__".join(loc).upper()


def describe_validation(exc: ValidationError, args: argparse.Namespace | None = None) -> str:
    """pydantic's four lines and a URL per error as one line naming the flag or variable."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = tuple(str(x) for x in err["loc"])
        where = _source(exc.title, loc, args)
        value: Any = err.get("input")
        shown = f" {value}" if isinstance(value, str | int | float) and len(str(value)) < 80 else ""
        msg = err["msg"]
        parts.append(f"{where}{shown}: {msg[:1].lower()}{msg[1:]}")
    return "; ".join(parts)


def one_line(exc: BaseException, args: argparse.Namespace | None = None) -> tuple[str, int] | None:
    """The line and exit code for a failure the user caused or can fix; None for a bug."""
    # imported here: the store pulls in numba-backed modules the CLI's help should not wait for
    from consumers.local_broker import BrokerError
    from stream_mf.store import StoreError

    if isinstance(exc, UserError):
        return _first_line(str(exc)), exc.exit_code
    if isinstance(exc, ValidationError):
        return describe_validation(exc, args), EXIT_USAGE
    if isinstance(exc, StoreError | BrokerError):
        return _first_line(str(exc)), EXIT_USAGE
    if isinstance(exc, KafkaException):
        err = exc.args[0] if exc.args else None
        text = err.str() if isinstance(err, KafkaError) else str(exc)
        return f"Kafka: {text}", EXIT_UNAVAILABLE
    if isinstance(exc, TimeoutError):
        return _first_line(str(exc)) or "timed out", EXIT_UNAVAILABLE
    if isinstance(exc, OSError):
        # the operating system refused something (a path, a port): the environment, not a bug
        if exc.filename is not None and exc.strerror:
            return f"{exc.filename}: {exc.strerror}", EXIT_USAGE
        return _first_line(str(exc)), EXIT_USAGE
    # not a bare ValueError: the numerical code raises it for broken invariants (bugs); the
    # commands turn the ValueErrors that are the user's to fix (a bad event file) into UserError
    return None
