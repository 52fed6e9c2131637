"""The decision on a stored offset against its partition's log range, with pure inputs.

The embedded broker applies no retention and cannot delete records, so the `before_log_start`
case (events removed before they were applied) is decided here, not provoked on a broker;
`ahead_of_log` is also tested end to end in tests/reliability/test_offset_gap.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from consumers.cli import build_parser
from consumers.offset_gap import OffsetGap, classify, resume_offset
from consumers.settings import UpdaterSettings


@pytest.mark.parametrize(
    ("stored", "low", "high"),
    [(0, 0, 0), (0, 0, 10), (5, 0, 10), (10, 0, 10), (100, 100, 100), (150, 100, 200)],
)
def test_any_offset_from_the_log_start_to_its_end_is_followed(
    stored: int, low: int, high: int
) -> None:
    assert classify(stored, low, high) is None


def test_beyond_the_end_is_a_gap_with_nothing_known_lost() -> None:
    gap = classify(100_839, 0, 10)
    assert gap == OffsetGap("ahead_of_log", 100_839, 0, 10)
    assert gap.lost == 0
    assert resume_offset(gap, "resume-from-start") == 0
    assert resume_offset(gap, "resume-from-end") == 10
    text = gap.describe("interactions", 3)
    assert text.startswith("interactions[3]: the model store's next offset 100839 is beyond")
    assert "offsets 0..9" in text and "forgets every topic" in text


def test_before_the_start_counts_the_events_removed_unapplied() -> None:
    gap = classify(40, 250, 900)
    assert gap is not None and gap.kind == "before_log_start"
    assert gap.lost == 210
    assert resume_offset(gap, "resume-from-start") == 250
    assert resume_offset(gap, "resume-from-end") == 900
    assert "210 event(s) were removed" in gap.describe("interactions", 0)
    assert "offsets 250..899" in gap.describe("interactions", 0)


def test_an_empty_log_is_named_as_such() -> None:
    gap = classify(7, 0, 0)
    assert gap is not None and gap.kind == "ahead_of_log"
    assert "the log is empty (start and end 0)" in gap.describe("t", 0)
    assert resume_offset(gap, "resume-from-start") == resume_offset(gap, "resume-from-end") == 0
    # retention emptied a log the updater was behind on: everything up to its end is lost
    gone = classify(3, 12, 12)
    assert gone is not None and gone.kind == "before_log_start" and gone.lost == 9


def test_fail_does_not_resume() -> None:
    with pytest.raises(ValueError, match="does not resume"):
        resume_offset(OffsetGap("ahead_of_log", 5, 0, 1), "fail")


def test_the_policy_is_a_setting_and_a_flag_with_fail_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("STREAM_MF_ON_OFFSET_GAP", raising=False)
    assert UpdaterSettings().on_offset_gap == "fail"
    monkeypatch.setenv("STREAM_MF_ON_OFFSET_GAP", "resume-from-end")
    assert UpdaterSettings().on_offset_gap == "resume-from-end"
    not_a_policy: Any = "skip"  # outside the Literal on purpose: the settings must refuse it
    with pytest.raises(ValidationError):
        UpdaterSettings(on_offset_gap=not_a_policy)
    args = build_parser().parse_args(["updater", "--on-offset-gap", "resume-from-start"])
    assert args.on_offset_gap == "resume-from-start"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["updater", "--on-offset-gap", "skip"])
