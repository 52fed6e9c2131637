"""Flags every process shares, and building its settings object from flags over environment."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, TypeVar

from consumers.errors import UserError
from consumers.settings import ProcessSettings

S = TypeVar("S", bound=ProcessSettings)


def port(text: str) -> int:
    """argparse type: a TCP port (0 lets the OS pick one)."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0..65535 (0 picks a free one), not {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a float > 0 (and not NaN)."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, not {text}")
    return value


def nonempty_path(text: str) -> Path:
    """argparse type: a path, never '' (which Path would read as the current directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: give a path")
    return Path(text)


def state_dir_usable(path: Path, flag: str = "--state-dir") -> None:
    """A state dir that exists must be a directory (a file there is a typo, not a store)."""
    if path.exists() and not path.is_dir():
        raise UserError(
            f"{flag} {path} is a file, not a directory: point it at the model store's "
            "directory (the updater creates it)"
        )


def add_process_flags(p: argparse.ArgumentParser, state: bool = True, metrics: bool = True) -> None:
    g = p.add_argument_group("process")
    g.add_argument(
        "--bootstrap-servers",
        default=None,
        help="Kafka brokers (env STREAM_MF_KAFKA__BOOTSTRAP_SERVERS or KAFKA_BOOTSTRAP_SERVERS; "
        "default 127.0.0.1:9092)",
    )
    if state:
        g.add_argument(
            "--state-dir", type=nonempty_path, default=None, help="model store (default ./state)"
        )
    if metrics:
        g.add_argument("--metrics-host", default=None, help="default 127.0.0.1")
        g.add_argument(
            "--metrics-port", type=int, default=None, help="default 9464; 0 picks one; -1 off"
        )


def build_settings(cls: type[S], args: argparse.Namespace, **more: Any) -> S:
    """Flags override environment variables, which override defaults."""
    init: dict[str, Any] = {}
    kafka: dict[str, Any] = {}
    if getattr(args, "bootstrap_servers", None):
        kafka["bootstrap_servers"] = args.bootstrap_servers
    elif "KAFKA_BOOTSTRAP_SERVERS" in os.environ and not os.environ.get(
        "STREAM_MF_KAFKA__BOOTSTRAP_SERVERS"
    ):
        kafka["bootstrap_servers"] = os.environ["KAFKA_BOOTSTRAP_SERVERS"]
    if kafka:
        init["kafka"] = kafka
    if getattr(args, "state_dir", None) is not None:
        init["state_dir"] = args.state_dir
    metrics: dict[str, Any] = {}
    if getattr(args, "metrics_host", None):
        metrics["host"] = args.metrics_host
    if getattr(args, "metrics_port", None) is not None:
        metrics["port"] = args.metrics_port
    if metrics:
        init["metrics"] = metrics
    init.update({k: v for k, v in more.items() if v is not None})
    return cls(**init)
