"""The pieces behind one-line errors: pydantic errors named by flag or variable, the log
throttle, and the split between a user's mistake and a bug."""

from __future__ import annotations

import argparse
import logging

import pytest
from pydantic import ValidationError

from consumers.commands.common import build_settings
from consumers.errors import EXIT_USAGE, UserError, describe_validation, one_line
from consumers.flags import model_config_from
from consumers.kafka_io import LogThrottle
from consumers.settings import UpdaterSettings


def _args(**kw: object) -> argparse.Namespace:
    names = ("bootstrap_servers", "state_dir", "metrics_host", "metrics_port")
    return argparse.Namespace(**{**dict.fromkeys(names), **kw})


def test_a_flag_is_named_as_typed() -> None:
    with pytest.raises(ValidationError) as info:
        build_settings(UpdaterSettings, _args(metrics_port=70000), max_batch_events=0)
    line = describe_validation(info.value, _args(metrics_port=70000, max_batch_events=0))
    assert "--metrics-port 70000: input should be less than or equal to 65535" in line
    assert "--max-batch-events 0: input should be greater than or equal to 1" in line
    assert "\n" not in line and "errors.pydantic.dev" not in line


def test_an_environment_variable_is_named_when_no_flag_was_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STREAM_MF_MODEL__DIM", "0")
    monkeypatch.setenv("STREAM_MF_KAFKA__SECURITY_PROTOCOL", "TLS")
    with pytest.raises(ValidationError) as info:
        build_settings(UpdaterSettings, _args())
    line = describe_validation(info.value, _args())
    assert "STREAM_MF_MODEL__DIM 0:" in line
    assert "STREAM_MF_KAFKA__SECURITY_PROTOCOL TLS: input should be 'PLAINTEXT'" in line


def test_model_flags_and_event_types() -> None:
    args = argparse.Namespace(model_dim=0, model_event_types='{"view": {"weight": -1}}')
    with pytest.raises(ValidationError) as info:
        model_config_from(args)
    line = describe_validation(info.value, args)
    assert "--dim 0:" in line and "--event-types view.weight -1:" in line
    with pytest.raises(UserError, match="--event-types is not valid JSON"):
        model_config_from(argparse.Namespace(model_event_types="{bad"))


def test_throttle_shows_a_condition_once_per_interval_with_a_count() -> None:
    now = [0.0]
    t = LogThrottle(interval=30.0, clock=lambda: now[0])
    refused = "127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed: Connection refused"
    assert t.admit(f"[thrd:127.0.0.1:1/bootstrap]: {refused} (after 0ms in state CONNECT)") == 0
    for ms in range(1, 90):  # the same failure from the error callback, other timings
        now[0] += 0.01
        assert t.admit(f"{refused} (after {ms}ms in state CONNECT)") is None
    assert t.admit("1/1 brokers are down") == 0  # another condition is shown at once
    now[0] = 30.5
    assert t.admit(f"{refused} (after 2ms in state CONNECT)") == 89
    assert t.suffix(89) == " (89 more like it in the last 30 s)"
    assert t.admit(f"{refused} (after 2ms in state CONNECT)") is None


def test_throttle_log_formats_before_comparing(caplog: pytest.LogCaptureFixture) -> None:
    t = LogThrottle(interval=60.0)
    log = logging.getLogger("test_errors")
    with caplog.at_level(logging.WARNING, logger="test_errors"):
        for _ in range(5):
            t.log(log, logging.WARNING, "cannot read metadata of %r: %s", "interactions", "down")
        t.log(log, logging.WARNING, "cannot read metadata of %r: %s", "interactions", "auth")
    assert [r.getMessage() for r in caplog.records] == [
        "cannot read metadata of 'interactions': down",
        "cannot read metadata of 'interactions': auth",
    ]


def test_a_bug_is_not_a_user_error() -> None:
    assert one_line(KeyError("user_id")) is None
    assert one_line(AttributeError("x")) is None
    assert one_line(ValueError("factor dims differ: 8 vs 16")) is None  # an invariant broke
    assert one_line(UserError("--x is wrong\nmore")) == ("--x is wrong", EXIT_USAGE)
    assert one_line(IsADirectoryError(21, "Is a directory", "/tmp")) == (
        "/tmp: Is a directory",
        EXIT_USAGE,
    )


def test_verbose_is_ours_only() -> None:
    """-v: our loggers at DEBUG; numba's compiler log (thousands of lines) stays at WARNING."""
    from consumers.cli import NOISY_LOGGERS, OWN_LOGGERS, configure_logging

    names = (*OWN_LOGGERS, *NOISY_LOGGERS)
    before = {n: logging.getLogger(n).level for n in names}
    try:
        configure_logging(1)
        assert logging.getLogger("consumers.updater").isEnabledFor(logging.DEBUG)
        assert logging.getLogger("stream_mf.rebuild").isEnabledFor(logging.DEBUG)
        assert not logging.getLogger("numba.core.ssa").isEnabledFor(logging.INFO)
        assert logging.getLogger("numba.core.ssa").isEnabledFor(logging.WARNING)
    finally:
        for n, level in before.items():
            logging.getLogger(n).setLevel(level)
