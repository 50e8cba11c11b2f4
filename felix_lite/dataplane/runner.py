"""The one seam through which the dataplane runs kernel tools.

Tests pass a fake that records argv/input and plays the kernel; the real
runner optionally prefixes `ip netns exec NS` so functional tests and the lab
program a namespace, never the host.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Sequence
from typing import Protocol

log = logging.getLogger(__name__)


class CommandError(Exception):
    def __init__(self, argv: Sequence[str], rc: int, stderr: str) -> None:
        self.argv = tuple(argv)
        self.rc = rc
        self.stderr = stderr
        super().__init__(f"{' '.join(self.argv)}: exit {rc}: {stderr.strip()}")


class CommandRunner(Protocol):
    def run(self, argv: Sequence[str], *, input: str | None = None) -> str:
        """Run argv, feed `input` on stdin, return stdout; raise CommandError on rc != 0."""
        ...


class SubprocessRunner:
    def __init__(self, *, netns: str | None = None, timeout: float = 60.0) -> None:
        self.netns = netns
        self.timeout = timeout

    def run(self, argv: Sequence[str], *, input: str | None = None) -> str:
        full = [*(["ip", "netns", "exec", self.netns] if self.netns else []), *argv]
        log.debug("command.run argv=%s stdin_bytes=%d", full, len(input or ""))
        proc = subprocess.run(
            full,
            input=input,
            capture_output=True,
            text=True,
            timeout=self.timeout,
            check=False,
        )
        if proc.returncode != 0:
            raise CommandError(full, proc.returncode, proc.stderr)
        return proc.stdout
