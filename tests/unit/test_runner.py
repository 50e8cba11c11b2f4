"""The real command runner's streaming path: stdin written while the tool runs,
its output collected without a pipe deadlock, errors as CommandError."""

from __future__ import annotations

import pytest

from felix_lite.dataplane.runner import CommandError, SubprocessRunner


def test_run_stream_feeds_chunks_and_returns_stdout() -> None:
    r = SubprocessRunner()
    assert r.run_stream(["wc", "-l"], (f"line {i}\n" for i in range(1000))).strip() == "1000"


def test_run_stream_survives_a_tool_that_writes_a_lot_while_reading() -> None:
    # 1 MB on stderr and stdout before the tool reads anything: with pipes this
    # would deadlock as soon as both buffers filled.
    script = "head -c 1000000 /dev/zero >&2; head -c 1000000 /dev/zero; cat >/dev/null"
    out = SubprocessRunner().run_stream(["sh", "-c", script], ("x" * 1000 for _ in range(2000)))
    assert len(out) == 1_000_000


def test_run_stream_error_carries_rc_and_stderr_even_if_the_tool_stops_reading() -> None:
    with pytest.raises(CommandError) as exc:
        SubprocessRunner().run_stream(
            ["sh", "-c", "echo 'Error in line 1: bad' >&2; exit 3"],
            ("add x y\n" for _ in range(200_000)),
        )
    assert exc.value.rc == 3
    assert "Error in line 1" in exc.value.stderr
