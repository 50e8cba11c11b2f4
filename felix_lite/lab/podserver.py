"""A pod's "container": echo servers on its TCP and UDP ports, one detached process per pod.

Run as `ip netns exec <pod-netns> python -m felix_lite.lab.podserver --tcp 80,81
--udp 80,81`. It outlives the `lab up`/`apply` that started it (own session,
recorded by PID in the lab state) and dies with SIGTERM from `lab down` or a
pod deletion. Standard library only, so it starts in tens of milliseconds.
(netlab.servers serves many namespaces from one process over a control pipe,
which cannot outlive its parent: the lab needs the opposite.)
"""

from __future__ import annotations

import argparse
import contextlib
import selectors
import signal
import socket
import sys
from collections.abc import Sequence
from types import FrameType


def _ports(text: str) -> list[int]:
    return [int(p) for p in text.split(",") if p.strip()]


def serve(tcp: Sequence[int], udp: Sequence[int]) -> None:
    sel = selectors.DefaultSelector()
    for port in tcp:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(128)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, "listen")
    for port in udp:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", port))
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, "udp")
    print(f"podserver.ready tcp={list(tcp)} udp={list(udp)}", flush=True)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if key.data == "listen":
                with contextlib.suppress(BlockingIOError, InterruptedError, ConnectionError):
                    conn, _ = sock.accept()
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ, "conn")
            elif key.data == "conn":
                try:
                    data = sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(sock)
                    sock.close()
                    continue
                with contextlib.suppress(OSError):
                    sock.send(data)
            else:
                try:
                    data, addr = sock.recvfrom(65536)
                except (BlockingIOError, InterruptedError, OSError):
                    continue
                with contextlib.suppress(OSError):
                    sock.sendto(data, addr)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m felix_lite.lab.podserver")
    p.add_argument("--tcp", type=_ports, default=[80, 81])
    p.add_argument("--udp", type=_ports, default=[80, 81])
    args = p.parse_args(argv)

    def _bye(_signum: int, _frame: FrameType | None) -> None:
        sys.exit(0)

    signal.signal(signal.SIGTERM, _bye)
    serve(args.tcp, args.udp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
