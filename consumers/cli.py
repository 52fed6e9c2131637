"""`stream-mf`: one entry point for every process and tool.

A user's mistake ends in one line on stderr, `stream-mf CMD: what was wrong and how to fix it`,
and a distinct exit code (consumers/errors.py); `--debug` (or `-vv`) adds the traceback. An
unexpected exception is a bug and always prints its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
from typing import NoReturn

from consumers.errors import EXIT_BUG, one_line

COMMANDS = (
    "broker",
    "updater",
    "query",
    "publish",
    "recommend",
    "rebuild",
    "snapshot",
    "evaluate",
    "schema",
    "demo",
)

#: our own loggers: DEBUG with -v
OWN_LOGGERS = ("consumers", "stream_mf", "__main__")
#: third-party loggers that stay at WARNING whatever the verbosity (numba's compiler debug log
#: alone is thousands of lines a kernel)
NOISY_LOGGERS = ("numba", "llvmlite", "matplotlib", "PIL", "urllib3", "docker", "asyncio")


class CliParser(argparse.ArgumentParser):
    """A usage mistake in one line too (argparse prints the whole usage block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _add_verbosity(p: argparse.ArgumentParser, default: object) -> None:
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=default,
        help="debug logging of stream-mf's own loggers; twice: also tracebacks",
    )
    p.add_argument(
        "--debug",
        action="store_true",
        default=default if default is argparse.SUPPRESS else False,
        help="print the traceback of an error, not just its one line",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(
        prog="stream-mf",
        description="Streaming matrix-factorisation recommender over Kafka with RocksDB state.",
    )
    _add_verbosity(parser, 0)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"consumers.commands.{name}").add_parser(sub)
        # after the command too (`stream-mf updater ... --debug`); SUPPRESS keeps the global
        # value when the command's own is not given
        _add_verbosity(sub.choices[name], argparse.SUPPRESS)
    return parser


def configure_logging(verbose: int) -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if verbose:
        for name in OWN_LOGGERS:
            logging.getLogger(name).setLevel(logging.DEBUG)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = int(args.verbose or 0)
    debug = bool(args.debug) or verbose >= 2
    configure_logging(verbose)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        known = one_line(exc, args)
        if known is None:
            traceback.print_exc()
            print(
                f"stream-mf {args.command}: internal error ({type(exc).__name__}: {exc}); "
                "this is a bug in stream-mf, please report it with the traceback above",
                file=sys.stderr,
            )
            return EXIT_BUG
        line, code = known
        if debug:
            traceback.print_exc()
        print(f"stream-mf {args.command}: {line}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
