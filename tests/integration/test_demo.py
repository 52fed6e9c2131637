"""The demo as a user runs it and stops it: it says what a first run waits for, and SIGTERM
(or Ctrl-C) halfway leaves no process and nothing in the temporary directory."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from consumers.processes import ManagedProcess, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_sigterm_mid_demo_stops_everything_and_leaves_no_files(tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"  # the demo's TMPDIR: whatever it leaves behind shows here
    scratch.mkdir()
    logs = tmp_path / "logs"
    demo = ManagedProcess("demo", ["demo"], logs, env={"TMPDIR": str(scratch)})
    try:
        demo.start()
        # interrupt it once the replay is sent, while the updater learns it
        wait_until(
            lambda: "replayed" in demo.log_tail(100_000), 240, 0.2, "the demo to replay MovieLens"
        )
        out = demo.log_tail(100_000)
        assert out.index("compiling kernels") < out.index("state and logs in")
        assert re.search(r"(compiled \d+ kernels|kernels loaded from numba's cache) in", out)
        pid = re.search(r"\(pid (\d+)\)", out)
        assert pid, "the demo names its broker's pid"
        broker_pid = int(pid.group(1))
        assert any(scratch.iterdir()), "the demo's files are not under TMPDIR"
        code = demo.stop(grace=30.0)
    finally:
        demo.stop()
    out = demo.log_tail(100_000)
    assert code == 130, out  # interrupted: the CLI's Ctrl-C exit code, not a SIGTERM death
    # each process stopped: cleanly, or by SIGTERM's default if it was still starting up
    codes = re.search(
        r"stopped: \{'updater': (-?\d+), 'query-1': (-?\d+), 'query-2': (-?\d+)\}", out
    )
    assert codes is not None and set(codes.groups()) <= {"0", "-15"}, out
    assert f"embedded broker pid {broker_pid} stopped (exit code 0)" in out, out
    with pytest.raises(ProcessLookupError):
        os.kill(broker_pid, 0)
    assert list(scratch.iterdir()) == []
