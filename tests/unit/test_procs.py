"""Stopping our own child processes by PID: polite first, forced after the timeout."""

from __future__ import annotations

import signal
import subprocess
import sys

from felix_lite.procs import stop_procs

_IGNORES_TERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(60)"  # noqa: E501


def _spawn(code: str) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "1"  # handlers installed before we signal
    p.stdout.close()
    return p


def test_stop_procs_terminates_all_and_kills_what_ignores_the_signal() -> None:
    polite = [_spawn("import time; print(1, flush=True); time.sleep(60)") for _ in range(3)]
    stubborn = _spawn(_IGNORES_TERM)
    stop_procs([*polite, stubborn], timeout=1.0)
    assert all(p.returncode == -signal.SIGTERM for p in polite)
    assert stubborn.returncode == -signal.SIGKILL


def test_stop_procs_reaps_exited_ones_and_uses_the_given_signal() -> None:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    running = _spawn("import time; print(1, flush=True); time.sleep(60)")
    stop_procs([done, running], sig=signal.SIGINT, timeout=5)
    assert done.returncode == 0
    assert running.returncode == -signal.SIGINT
