"""The ExaBGP sidecar supervisor: waits for the agent's files, reloads ExaBGP
(SIGUSR1) when they change, restarts it when it dies, gives up after a burst of
deaths. A fake child process records signals; no ExaBGP needed."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from felix_lite.fabric.sidecar import CONFIG_NAME, ENV_NAME, Supervisor
from felix_lite.waiting import wait_until


class FakeProc:
    pid = 4242

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.signals: list[int] = []
        self.rc: int | None = None
        self.terminated = False

    def poll(self) -> int | None:
        return self.rc

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)

    def terminate(self) -> None:
        self.terminated = True
        self.rc = -15

    def wait(self, timeout: float | None = None) -> int:
        return self.rc or 0

    def kill(self) -> None:
        self.rc = -9


def _render(d: Path, text: str) -> None:
    (d / ENV_NAME).write_text("[exabgp.daemon]\nuser = 'root'\n")
    (d / CONFIG_NAME).write_text(text)


def _wait(pred: Callable[[], object], timeout: float = 5.0) -> None:
    wait_until(pred, timeout, "condition", step=0.01)


def test_reload_on_change_restart_on_death_and_stop(tmp_path: Path) -> None:
    procs: list[FakeProc] = []

    def popen(argv: list[str]) -> FakeProc:
        procs.append(FakeProc(argv))
        return procs[-1]

    sup = Supervisor(tmp_path, poll=0.01, popen=popen)  # type: ignore[arg-type]
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(sup.run(timeout=5)))
    t.start()
    try:
        time.sleep(0.05)
        assert not procs  # waits for both rendered files
        _render(tmp_path, "neighbor 192.0.2.1 { }\n")
        _wait(lambda: len(procs) == 1)
        assert procs[0].argv[-2:] == ["server", str(tmp_path / CONFIG_NAME)]
        assert "--env-file" in procs[0].argv

        _render(tmp_path, "neighbor 192.0.2.1 { }\nneighbor 192.0.2.2 { }\n")
        _wait(lambda: procs[0].signals == [signal.SIGUSR1])
        assert sup.reloads == 1

        procs[0].rc = 1  # ExaBGP died
        _wait(lambda: len(procs) == 2)
        assert procs[1].signals == []  # a fresh start reads the current files
    finally:
        sup.stop()
        t.join(timeout=5)
    assert result == [0]
    assert procs[1].terminated  # SIGTERM passed on


def test_gives_up_after_repeated_deaths(tmp_path: Path) -> None:
    _render(tmp_path, "x")

    def popen(argv: list[str]) -> FakeProc:
        p = FakeProc(argv)
        p.rc = 1  # dies at once, every time
        return p

    sup = Supervisor(tmp_path, poll=0.01, max_deaths=3, popen=popen)  # type: ignore[arg-type]
    assert sup.run(timeout=5) == 1
    assert sup.starts == 3


def test_times_out_when_the_agent_never_renders(tmp_path: Path) -> None:
    from felix_lite.fabric.sidecar import SidecarTimeout

    sup = Supervisor(tmp_path, poll=0.01)
    with pytest.raises(SidecarTimeout, match=CONFIG_NAME):
        sup.run(timeout=0.1)
