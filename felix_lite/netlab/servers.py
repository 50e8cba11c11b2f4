"""TCP and UDP servers for every pod, from ONE process.

Why one process: a socket stays in the namespace it was created in, so a
single selector loop can serve sockets bound inside many pod namespaces. One
Python start (~50 ms) instead of one per pod, one PID to kill, and pods can be
added or removed at run time over the control pipe (the lab needs that).

The process (`servers.main()` in a fresh interpreter) reads JSON lines on stdin:
`{"op": "add", "key": "x/a", "netns": "...", "ports": [80, 81],
"protocols": ["TCP", "UDP"]}` and `{"op": "remove", "key": "x/a"}`, and
answers each with one JSON line on stdout (`{"ok": true, ...}` or
`{"ok": false, "error": "..."}`). EOF on stdin makes it exit, so it never
outlives its parent. TCP connections are echoed until EOF; UDP datagrams are
echoed to their sender. SCTP is skipped (reported in the answer) when the
kernel cannot make SCTP sockets, as on this machine.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import IO, Any

from felix_lite.netlab.nsutil import call_in_netns, sctp_supported

log = logging.getLogger(__name__)

DEFAULT_PORTS = (80, 81)
DEFAULT_PROTOCOLS = ("TCP", "UDP")
# `-c`, not `-m`: the package __init__ already imports this module.
_BOOT = "import sys; from felix_lite.netlab.servers import main; sys.exit(main())"


@dataclass(frozen=True)
class ServeSpec:
    """Serve `ports` x `protocols` on 0.0.0.0 inside netns `netns`."""

    key: str
    netns: str
    ports: tuple[int, ...] = DEFAULT_PORTS
    protocols: tuple[str, ...] = DEFAULT_PROTOCOLS


class ServerError(RuntimeError):
    pass


class ServerProcess:
    """Handle on the server process: start, add/remove endpoints, stop (by PID).

    `on_pid` is told the PID right after spawn, so a `Topology` can kill it on
    every exit path (`Topology.register_pid`).
    """

    def __init__(
        self,
        *,
        python: str = sys.executable,
        on_pid: Callable[[int], None] | None = None,
    ) -> None:
        self._python = python
        self._on_pid = on_pid
        self._proc: subprocess.Popen[str] | None = None
        self.skipped: dict[str, list[str]] = {}

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> None:
        if self._proc is not None:
            return
        self._proc = subprocess.Popen(
            [self._python, "-c", _BOOT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            close_fds=True,
        )
        if self._on_pid is not None:
            self._on_pid(self._proc.pid)
        log.info("servers.started pid=%d", self._proc.pid)

    def _call(self, msg: dict[str, Any]) -> dict[str, Any]:
        if self._proc is None or self._proc.stdin is None or self._proc.stdout is None:
            raise ServerError("server process not started")
        self._proc.stdin.write(json.dumps(msg) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            rc = self._proc.poll()
            raise ServerError(f"server process pid={self._proc.pid} exited (rc={rc})")
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise ServerError(f"server {msg.get('key')}: {reply.get('error')}")
        return reply

    def add(self, spec: ServeSpec) -> None:
        reply = self._call(
            {
                "op": "add",
                "key": spec.key,
                "netns": spec.netns,
                "ports": list(spec.ports),
                "protocols": list(spec.protocols),
            }
        )
        if reply.get("skipped"):
            self.skipped[spec.key] = list(reply["skipped"])

    def add_all(self, specs: Iterable[ServeSpec]) -> None:
        for s in specs:
            self.add(s)

    def remove(self, key: str) -> None:
        self._call({"op": "remove", "key": key})

    def stop(self) -> None:
        """Close its stdin (it exits), then SIGKILL by PID if it lingers. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            if proc.stdin:
                proc.stdin.close()
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
        log.info("servers.stopped pid=%d rc=%s", proc.pid, proc.returncode)

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the server process itself -----------------------------------------------------

_IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # linux/in.h; Python 3.11 lacks the name
_PKTINFO_LEN = 12  # struct in_pktinfo: ifindex, spec_dst, addr

_PROTO = {
    "TCP": (socket.SOCK_STREAM, 0),
    "UDP": (socket.SOCK_DGRAM, 0),
    "SCTP": (socket.SOCK_STREAM, getattr(socket, "IPPROTO_SCTP", 132)),
}


@dataclass
class _Endpoint:
    listeners: list[socket.socket] = field(default_factory=list)
    conns: set[socket.socket] = field(default_factory=set)


class _Server:
    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.endpoints: dict[str, _Endpoint] = {}

    def add(self, key: str, netns: str, ports: list[int], protocols: list[str]) -> list[str]:
        if key in self.endpoints:
            raise ValueError(f"{key}: already served")
        skipped: list[str] = []
        wanted: list[tuple[str, int]] = []
        for proto in protocols:
            if proto not in _PROTO:
                raise ValueError(f"{key}: protocol {proto}: unknown")
            if proto == "SCTP" and not sctp_supported():
                skipped.extend(f"{proto}/{p}" for p in ports)
                continue
            wanted.extend((proto, p) for p in ports)

        def make() -> list[tuple[str, socket.socket]]:
            out: list[tuple[str, socket.socket]] = []
            try:
                for proto, port in wanted:
                    kind, pnum = _PROTO[proto]
                    s = socket.socket(socket.AF_INET, kind, pnum)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if kind == socket.SOCK_DGRAM:
                        s.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
                    s.bind(("0.0.0.0", port))
                    if kind == socket.SOCK_STREAM:
                        s.listen(128)
                    s.setblocking(False)
                    out.append((proto, s))
            except BaseException:
                for _, s in out:
                    s.close()
                raise
            return out

        ep = _Endpoint()
        for proto, s in call_in_netns(netns, make):
            ep.listeners.append(s)
            self.sel.register(s, selectors.EVENT_READ, ("udp" if proto == "UDP" else "listen", key))
        self.endpoints[key] = ep
        return skipped

    def remove(self, key: str) -> None:
        ep = self.endpoints.pop(key)
        for s in [*ep.listeners, *ep.conns]:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(s)
            s.close()

    def _close_conn(self, key: str, conn: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(conn)
        ep = self.endpoints.get(key)
        if ep:
            ep.conns.discard(conn)
        conn.close()

    def handle(self, sock: socket.socket, role: str, key: str) -> None:
        if role == "listen":
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionError):
                return
            conn.setblocking(False)
            self.endpoints[key].conns.add(conn)
            self.sel.register(conn, selectors.EVENT_READ, ("conn", key))
        elif role == "conn":
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._close_conn(key, sock)
                return
            with contextlib.suppress(OSError):
                sock.send(data)
        elif role == "udp":
            # Reply from the address the datagram was sent to (IP_PKTINFO), not
            # the route's preferred source: on a multi-address host (the outside
            # namespace) a connected UDP client drops replies from another address.
            try:
                data, anc, _, addr = sock.recvmsg(65536, socket.CMSG_SPACE(_PKTINFO_LEN))
            except (BlockingIOError, InterruptedError, OSError):
                return
            cmsgs = []
            for level, ctype, cdata in anc:
                if level == socket.IPPROTO_IP and ctype == _IP_PKTINFO:
                    dst = cdata[8:12]
                    cmsgs.append((level, ctype, struct.pack("=i4s4s", 0, dst, b"\0" * 4)))
            with contextlib.suppress(OSError):
                sock.sendmsg([data], cmsgs, 0, addr)


def _reply(out: IO[str], **kw: Any) -> None:
    out.write(json.dumps(kw) + "\n")
    out.flush()


def serve_forever(inp: IO[str], out: IO[str]) -> None:
    """The server loop: control lines on `inp`, answers on `out`; returns on EOF."""
    srv = _Server()
    fd = inp.fileno()
    os.set_blocking(fd, True)
    srv.sel.register(fd, selectors.EVENT_READ, ("control", ""))
    buf = b""
    while True:
        for skey, _ in srv.sel.select():
            role, key = skey.data
            if role != "control":
                srv.handle(skey.fileobj, role, key)  # type: ignore[arg-type]
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                for k in list(srv.endpoints):
                    srv.remove(k)
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if not line.strip():
                    continue
                try:
                    msg = json.loads(line)
                    if msg["op"] == "add":
                        skipped = srv.add(
                            str(msg["key"]),
                            str(msg["netns"]),
                            [int(p) for p in msg.get("ports", DEFAULT_PORTS)],
                            [str(p).upper() for p in msg.get("protocols", DEFAULT_PROTOCOLS)],
                        )
                        _reply(out, ok=True, key=msg["key"], skipped=skipped)
                    elif msg["op"] == "remove":
                        srv.remove(str(msg["key"]))
                        _reply(out, ok=True, key=msg["key"])
                    else:
                        _reply(out, ok=False, error=f"op {msg['op']!r}: unknown")
                except Exception as e:
                    _reply(out, ok=False, error=f"{type(e).__name__}: {e}")


def main() -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    serve_forever(sys.stdin, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
