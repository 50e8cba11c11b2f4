"""ExaBGP's API process: a thin relay between ExaBGP and the agent's unix socket.

ExaBGP spawns this (possibly as `nobody`) and talks to it on stdin/stdout; the
agent serves a unix socket. Lines are relayed unchanged both ways: JSON and
`done`/`error` acks towards the agent, API commands towards ExaBGP. stdout *is*
the API, so this module logs only to stderr. stdin is drained on its own thread
whether or not the agent is connected, because a slow reader lets ExaBGP's hold
timers expire. EOF on stdin means ExaBGP is gone: exit. When the agent's socket
goes away the bridge reconnects; the agent re-announces on every new connection.

Usage: python -m felix_lite.bgp.bridge SOCKET_PATH
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
from collections import deque
from typing import BinaryIO

log = logging.getLogger(__name__)

RECONNECT_MIN = 0.05
RECONNECT_MAX = 2.0
BUFFER_LINES = 200_000


class Bridge:
    """Relays lines between ExaBGP (stdin/stdout) and the agent (unix socket)."""

    def __init__(
        self,
        socket_path: str,
        *,
        stdin: BinaryIO,
        stdout: BinaryIO,
        connect_timeout: float = 5.0,
        buffer_lines: int = BUFFER_LINES,
    ) -> None:
        self._path = socket_path
        self._stdin = stdin
        self._stdout = stdout
        self._connect_timeout = connect_timeout
        self._sock: socket.socket | None = None
        self._sock_lock = threading.Lock()
        self._stop = threading.Event()
        self.dropped = 0
        self._buffer: deque[bytes] = deque(maxlen=buffer_lines)

    def run(self) -> None:
        """Block until stdin reaches EOF."""
        reader = threading.Thread(target=self._pump_stdin, name="bridge-stdin", daemon=True)
        reader.start()
        delay = RECONNECT_MIN
        while not self._stop.is_set():
            sock = self._connect()
            if sock is None:
                self._stop.wait(delay)
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            delay = RECONNECT_MIN
            log.info("bridge.connected socket=%s", self._path)
            try:
                with self._sock_lock:
                    if self._stop.is_set():  # stdin hit EOF while we were connecting
                        sock.close()
                        break
                    while self._buffer:
                        sock.sendall(self._buffer.popleft())
                    self._sock = sock
            except OSError as e:
                log.info("bridge.replay.failed error=%s", e)
                sock.close()
                continue
            try:
                self._pump_socket(sock)
            finally:
                with self._sock_lock:
                    self._sock = None
                sock.close()
            log.info("bridge.disconnected socket=%s", self._path)

    def _connect(self) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self._connect_timeout)
        try:
            sock.connect(self._path)
        except OSError as e:
            log.debug("bridge.connect.failed socket=%s error=%s", self._path, e)
            sock.close()
            return None
        sock.settimeout(None)
        return sock

    def _pump_socket(self, sock: socket.socket) -> None:
        """Agent -> ExaBGP: write each command line to stdout and flush it."""
        f = sock.makefile("rb")
        try:
            for line in f:
                if self._stop.is_set():
                    return
                if not line.endswith(b"\n"):
                    line += b"\n"
                self._stdout.write(line)
                self._stdout.flush()
        except OSError as e:
            log.info("bridge.socket.error error=%s", e)
        finally:
            f.close()

    def _pump_stdin(self) -> None:
        """ExaBGP -> agent. While the agent is away, messages are buffered (bounded;
        it also asks for a route refresh when it comes back) and acks are dropped:
        they answer commands of the previous connection."""
        for line in self._stdin:
            with self._sock_lock:
                sock = self._sock
                if sock is None:
                    if line.strip() in (b"done", b"error"):
                        continue
                    if len(self._buffer) == self._buffer.maxlen:
                        self.dropped += 1
                    self._buffer.append(line)
                    continue
                try:
                    sock.sendall(line)
                except OSError as e:
                    log.info("bridge.send.failed error=%s", e)
                    self.dropped += 1
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
        log.info("bridge.stdin.eof dropped=%d", self.dropped)
        self._stop.set()
        with self._sock_lock:
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(
        stream=sys.stderr,
        level=os.environ.get("FELIX_LITE_BRIDGE_LOG", "INFO"),
        format="%(asctime)s bridge[%(process)d] %(levelname)s %(message)s",
    )
    if len(args) != 1:
        log.error("bridge.usage expected=SOCKET_PATH got=%r", args)
        return 2
    bridge = Bridge(args[0], stdin=sys.stdin.buffer, stdout=sys.stdout.buffer)
    bridge.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
