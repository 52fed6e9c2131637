"""Reply and dead-letter compression: none by default (every client reads it without a codec),
any librdkafka codec by flag or environment, anything else refused."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from consumers.cli import build_parser
from consumers.settings import QuerySettings, UpdaterSettings


def test_replies_and_dead_letters_are_uncompressed_by_default() -> None:
    assert QuerySettings().reply_compression == "none"
    assert UpdaterSettings().dead_letter_compression == "none"


def test_environment_chooses_a_codec_and_refuses_others(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAM_MF_REPLY_COMPRESSION", "zstd")
    monkeypatch.setenv("STREAM_MF_DEAD_LETTER_COMPRESSION", "gzip")
    assert QuerySettings().reply_compression == "zstd"
    assert UpdaterSettings().dead_letter_compression == "gzip"
    monkeypatch.setenv("STREAM_MF_REPLY_COMPRESSION", "brotli")
    with pytest.raises(ValidationError, match="reply_compression"):
        QuerySettings()


@pytest.mark.parametrize(
    ("argv", "dest"),
    [
        (["query", "--reply-compression", "lz4"], "reply_compression"),
        (["updater", "--dead-letter-compression", "snappy"], "dead_letter_compression"),
    ],
)
def test_flags_take_a_codec_and_refuse_others(
    argv: list[str], dest: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert getattr(build_parser().parse_args(argv), dest) == argv[-1]
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv[:-1], "brotli"])
    assert "invalid choice: 'brotli'" in capsys.readouterr().err
