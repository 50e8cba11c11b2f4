"""Connectivity prober: does a connection from endpoint A to endpoint B succeed?

Each client socket is created inside the source's network namespace (on a
short-lived thread that entered it), then every probe of a matrix runs at once
from one selector loop: a denied cell costs one timeout, and a whole matrix
costs about one timeout, not one per cell.

TCP: the three-way handshake completes (connect without error). UDP: a
datagram sent to the server comes back (the servers echo); it is re-sent a
few times within the timeout so one lost first packet does not fail a cell.
SCTP raises `ProtocolUnsupported` when the kernel cannot make SCTP sockets.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import socket
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from felix_lite.netlab.nsutil import sctp_supported, sockets_in_netns
from policy.model import Protocol

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 1.0
UDP_SENDS = 3


@dataclass(frozen=True)
class Endpoint:
    """Something that can connect or be connected to: a pod, a node, the outside host."""

    name: str
    netns: str
    ip: str


@dataclass(frozen=True)
class ProbeResult:
    src: str
    dst: str
    connected: bool
    detail: str = ""


class ProtocolUnsupported(RuntimeError):
    """The kernel cannot make sockets of this protocol (SCTP here)."""


def _as_protocol(protocol: Protocol | str) -> Protocol:
    try:
        return Protocol(str(protocol.value if isinstance(protocol, Protocol) else protocol).upper())
    except ValueError as e:
        raise ValueError(f"probe: protocol {protocol!r}: expected TCP, UDP or SCTP") from e


@dataclass
class _Cell:
    idx: int
    sock: socket.socket
    payload: bytes
    sends: int = 0


def probe_pairs(
    pairs: Sequence[tuple[Endpoint, Endpoint]],
    *,
    port: int,
    protocol: Protocol | str,
    timeout: float = DEFAULT_TIMEOUT,
    source_ips: Mapping[str, str] | None = None,
) -> list[ProbeResult]:
    """Probe every (src, dst) pair concurrently; results in the order of `pairs`.

    `source_ips` maps a source endpoint name to an address to bind the client
    socket to (for example a second, spoofed, address inside a pod).
    """
    proto = _as_protocol(protocol)
    if proto is Protocol.SCTP and not sctp_supported():
        raise ProtocolUnsupported("probe: SCTP: kernel reports EPROTONOSUPPORT")
    kind, pnum = {
        Protocol.TCP: (socket.SOCK_STREAM, 0),
        Protocol.UDP: (socket.SOCK_DGRAM, 0),
        Protocol.SCTP: (socket.SOCK_STREAM, getattr(socket, "IPPROTO_SCTP", 132)),
    }[proto]
    source_ips = source_ips or {}
    results: list[ProbeResult | None] = [None] * len(pairs)

    by_netns: dict[str, list[int]] = defaultdict(list)
    for i, (src, _) in enumerate(pairs):
        by_netns[src.netns].append(i)

    sel = selectors.DefaultSelector()
    cells: list[_Cell] = []
    udp_cells: list[_Cell] = []

    def done(cell: _Cell, ok: bool, detail: str) -> None:
        src, dst = pairs[cell.idx]
        results[cell.idx] = ProbeResult(src.name, dst.name, ok, detail)
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(cell.sock)

    try:
        for netns, idxs in by_netns.items():
            socks = sockets_in_netns(netns, len(idxs), type_=kind, proto=pnum)
            for i, s in zip(idxs, socks, strict=True):
                cells.append(_Cell(i, s, f"probe-{os.getpid()}-{i}".encode()))
        for cell in cells:
            src, dst = pairs[cell.idx]
            try:
                if src.name in source_ips:
                    cell.sock.bind((source_ips[src.name], 0))
                if kind == socket.SOCK_STREAM:
                    rc = cell.sock.connect_ex((dst.ip, port))
                    if rc == 0:
                        done(cell, True, "connected")
                    elif rc in (errno.EINPROGRESS, errno.EAGAIN):
                        sel.register(cell.sock, selectors.EVENT_WRITE, cell)
                    else:
                        done(cell, False, errno.errorcode.get(rc, str(rc)))
                else:
                    cell.sock.connect((dst.ip, port))
                    sel.register(cell.sock, selectors.EVENT_READ, cell)
                    udp_cells.append(cell)
            except OSError as e:
                done(cell, False, errno.errorcode.get(e.errno or 0, str(e)))

        start = time.monotonic()
        deadline = start + timeout
        next_send = start
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                break
            if udp_cells and now >= next_send:
                for cell in udp_cells:
                    if results[cell.idx] is None and cell.sends < UDP_SENDS:
                        cell.sends += 1
                        with contextlib.suppress(OSError):
                            cell.sock.send(cell.payload)
                next_send = now + timeout / UDP_SENDS
            wait = min(deadline, next_send if udp_cells else deadline) - time.monotonic()
            for key, _ in sel.select(max(wait, 0.0)):
                cell = key.data
                if kind == socket.SOCK_STREAM:
                    err = cell.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err == 0:
                        done(cell, True, "connected")
                    else:
                        done(cell, False, errno.errorcode.get(err, str(err)))
                else:
                    try:
                        data = cell.sock.recv(65536)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as e:
                        done(cell, False, errno.errorcode.get(e.errno or 0, str(e)))
                        continue
                    if data == cell.payload:
                        done(cell, True, "echoed")
        for cell in cells:
            if results[cell.idx] is None:
                done(cell, False, "timeout")
    finally:
        sel.close()
        for cell in cells:
            cell.sock.close()
    out = [r for r in results if r is not None]
    assert len(out) == len(pairs)
    return out


def probe_matrix(
    pods: Sequence[Endpoint],
    *,
    port: int,
    protocol: Protocol | str,
    timeout: float = DEFAULT_TIMEOUT,
    targets: Sequence[Endpoint] | None = None,
) -> list[ProbeResult]:
    """Every source to every target (default: every pod to every pod, self included)."""
    dsts = pods if targets is None else targets
    pairs = [(s, d) for s in pods for d in dsts]
    t0 = time.monotonic()
    out = probe_pairs(pairs, port=port, protocol=protocol, timeout=timeout)
    log.debug(
        "probe.matrix port=%d protocol=%s cells=%d seconds=%.3f",
        port,
        _as_protocol(protocol).value,
        len(pairs),
        time.monotonic() - t0,
    )
    return out


def probe_one(
    src: Endpoint,
    dst: Endpoint,
    *,
    port: int,
    protocol: Protocol | str = Protocol.TCP,
    timeout: float = DEFAULT_TIMEOUT,
    source_ip: str | None = None,
) -> ProbeResult:
    """One probe; `source_ip` binds the client to that address inside `src`."""
    ips = {src.name: source_ip} if source_ip else None
    return probe_pairs([(src, dst)], port=port, protocol=protocol, timeout=timeout, source_ips=ips)[
        0
    ]


def results_json(
    results: Iterable[ProbeResult], *, port: int, protocol: Protocol | str
) -> dict[str, Any]:
    """The `felix-lite lab probe --json` shape."""
    return {
        "port": port,
        "protocol": _as_protocol(protocol).value,
        "results": [{"from": r.src, "to": r.dst, "connected": r.connected} for r in results],
    }


def open_connection(
    src: Endpoint, dst: Endpoint, *, port: int, timeout: float = DEFAULT_TIMEOUT
) -> socket.socket:
    """A connected, blocking TCP socket from inside `src` (for long-lived-flow tests).

    The caller owns (and closes) it; `timeout` becomes the socket's timeout.
    """
    s = sockets_in_netns(src.netns, 1, type_=socket.SOCK_STREAM)[0]
    try:
        s.settimeout(timeout)
        s.connect((dst.ip, port))
    except BaseException:
        s.close()
        raise
    return s
