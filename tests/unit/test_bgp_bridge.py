"""The bridge relays lines between pipes (ExaBGP's side) and a unix socket (the
agent's side); real pipes and a real unix socket, no network."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from felix_lite.bgp.bridge import Bridge

JSON = b'{"type": "state", "neighbor": {"address": {"peer": "10.0.0.1"}, "state": "up"}}\n'


class Rig:
    def __init__(self, path: str) -> None:
        self.path = path
        r_in, self.w_in = os.pipe()  # ExaBGP -> bridge stdin
        self.r_out, w_out = os.pipe()  # bridge stdout -> ExaBGP
        self.stdin = os.fdopen(r_in, "rb")
        self.stdout = os.fdopen(w_out, "wb")
        self.out = os.fdopen(self.r_out, "rb")
        self.bridge = Bridge(path, stdin=self.stdin, stdout=self.stdout, connect_timeout=2)
        self.thread = threading.Thread(target=self.bridge.run, daemon=True)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def listen(self) -> None:
        self.server.bind(self.path)
        self.server.listen(1)
        self.server.settimeout(10)

    def accept(self) -> socket.socket:
        conn, _ = self.server.accept()
        conn.settimeout(10)
        return conn

    def exabgp_says(self, data: bytes) -> None:
        os.write(self.w_in, data)

    def close_stdin(self) -> None:
        os.close(self.w_in)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(str(tmp_path / "s.sock"))
    try:
        yield r
    finally:
        with contextlib.suppress(OSError):
            r.close_stdin()
        r.thread.join(timeout=10)
        r.server.close()
        r.out.close()


def readline(conn: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = conn.recv(1)
        if not chunk:
            break
        buf += chunk
    return buf


def test_relays_both_ways(rig: Rig) -> None:
    rig.listen()
    rig.thread.start()
    conn = rig.accept()
    rig.exabgp_says(JSON)
    assert readline(conn) == JSON
    conn.sendall(b"announce eor ipv4 unicast\n")
    assert rig.out.readline() == b"announce eor ipv4 unicast\n"
    conn.close()


def test_buffers_messages_but_not_acks_while_agent_away(rig: Rig) -> None:
    rig.thread.start()
    rig.exabgp_says(b"done\n" + JSON + b"error\n")
    rig.listen()  # the agent appears later
    conn = rig.accept()
    rig.exabgp_says(b"done\n")
    assert readline(conn) == JSON
    assert readline(conn) == b"done\n"  # acks on a live connection do pass
    conn.close()


def test_reconnects_after_agent_restart(rig: Rig) -> None:
    rig.listen()
    rig.thread.start()
    first = rig.accept()
    first.close()
    second = rig.accept()
    second.sendall(b"announce route-refresh ipv4 unicast\n")
    assert rig.out.readline() == b"announce route-refresh ipv4 unicast\n"
    second.close()


def test_exits_on_stdin_eof(rig: Rig) -> None:
    rig.listen()
    rig.thread.start()
    conn = rig.accept()
    rig.close_stdin()
    rig.thread.join(timeout=10)
    assert not rig.thread.is_alive()
    assert conn.recv(10) == b""  # the agent sees the bridge go
    conn.close()
