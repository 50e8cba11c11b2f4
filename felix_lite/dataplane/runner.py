"""The one seam through which the dataplane runs kernel tools.

Tests pass a fake that records argv/input and plays the kernel; the real
runner optionally prefixes `ip netns exec NS` so functional tests and the lab
program a namespace, never the host.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
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


class StreamingRunner(CommandRunner, Protocol):
    def run_stream(self, argv: Sequence[str], chunks: Iterable[str]) -> str:
        """Like run(), with stdin written chunk by chunk as `chunks` yields them,
        so the tool works while the caller is still producing its input."""
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

    def run_stream(self, argv: Sequence[str], chunks: Iterable[str]) -> str:
        full = [*(["ip", "netns", "exec", self.netns] if self.netns else []), *argv]
        log.debug("command.run_stream argv=%s", full)
        # stdout/stderr go to temporary files: the tool may write while we still
        # write its stdin, and a full pipe would deadlock both sides.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(full, stdin=subprocess.PIPE, stdout=out, stderr=err)
            assert proc.stdin is not None
            try:
                for chunk in chunks:
                    proc.stdin.write(chunk.encode())
            except BrokenPipeError:
                pass  # the tool stopped reading (an error): its rc and stderr say why
            finally:
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.close()
            try:
                rc = proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read().decode(), err.read().decode()
        if rc != 0:
            raise CommandError(full, rc, stderr)
        return stdout
