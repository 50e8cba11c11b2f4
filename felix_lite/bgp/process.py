"""Start and stop an ExaBGP process (tests and the lab; the chart runs a sidecar).

The config and env file are rendered into `workdir` with absolute paths (the
daemon chdirs to /). Inside a network namespace it is started through
`ip netns exec NS`, which execs, so the PID we hold is ExaBGP's own and it is
stopped by that PID only.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from felix_lite.bgp.config import BgpSettings, render_config, render_env

log = logging.getLogger(__name__)


def bridge_command(socket_path: str, *, python: str = sys.executable) -> tuple[str, ...]:
    """The API process argv ExaBGP runs: this interpreter, the bridge module."""
    return (python, "-m", "felix_lite.bgp.bridge", socket_path)


@dataclass(frozen=True, slots=True)
class ExabgpFiles:
    config: Path
    env: Path
    log: Path


def write_files(
    settings: BgpSettings, workdir: Path, *, socket_path: str, python: str = sys.executable
) -> ExabgpFiles:
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    files = ExabgpFiles(
        config=workdir / "exabgp.conf", env=workdir / "exabgp.env", log=workdir / "exabgp.log"
    )
    files.config.write_text(
        render_config(settings, bridge_command=bridge_command(socket_path, python=python))
    )
    files.env.write_text(render_env(settings))
    return files


class ExabgpProcess:
    """One ExaBGP daemon, optionally in a network namespace; stopped by its PID."""

    def __init__(
        self,
        files: ExabgpFiles,
        *,
        netns: str | None = None,
        exabgp: str = "exabgp",
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.files = files
        self.netns = netns
        self._exabgp = exabgp
        self._extra_env = dict(extra_env or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def argv(self) -> list[str]:
        cmd: Sequence[str] = [
            self._exabgp,
            "--env-file",
            str(self.files.env),
            "server",
            str(self.files.config),
        ]
        if self.netns is not None:
            return ["ip", "netns", "exec", self.netns, *cmd]
        return list(cmd)

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> None:
        if self.running():
            raise RuntimeError(f"exabgp {self.files.config}: already running pid={self.pid}")
        env = dict(os.environ)
        env.update(self._extra_env)
        self._log = open(self.files.log, "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            self.argv(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        log.info("bgp.exabgp.started pid=%d netns=%s", self._proc.pid, self.netns)

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, *, sig: signal.Signals = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Signal ExaBGP by PID (SIGTERM/SIGKILL both close without NOTIFICATION,
        so peers keep our routes for the graceful-restart time), then reap it."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("bgp.exabgp.kill pid=%d reason=timeout", proc.pid)
                proc.kill()
                proc.wait(timeout=timeout)
        log.info("bgp.exabgp.stopped pid=%d rc=%s", proc.pid, proc.returncode)
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        self.stop(sig=signal.SIGKILL)
