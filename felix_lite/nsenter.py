"""Run code inside a network namespace without moving the process.

setns(2) with CLONE_NEWNET changes only the calling thread, and a socket stays
in the namespace it was created in. So the pattern everywhere (reading another
netns's iptables with python-iptables, opening an rtnetlink socket for a node,
the lab's probes and API client) is: a short-lived thread enters the namespace,
does its work or creates its sockets, and ends; no thread is ever left behind
in a foreign namespace, even when the work raises.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = Path("/run/netns")

_libc: ctypes.CDLL | None = None


class NetnsError(RuntimeError):
    pass


def netns_path(name: str) -> Path:
    """`/run/netns/<name>`, or `name` itself when it is a path (/proc/PID/ns/net)."""
    return Path(name) if "/" in name else NETNS_RUN_DIR / name


def enter_netns_this_thread(name: str) -> None:
    """Move the calling thread (only) into netns `name`. Use on a thread you own."""
    global _libc
    try:
        fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise NetnsError(f"netns {name}: does not exist") from e
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(f"netns {name}: setns failed: {os.strerror(err)}")
    finally:
        os.close(fd)


def call_in_netns(name: str | None, fn: Callable[[], T]) -> T:
    """`fn()` run on a fresh thread inside netns `name` (here when None)."""
    if name is None:
        return fn()
    box: dict[str, object] = {}

    def body() -> None:
        try:
            enter_netns_this_thread(name)
            box["result"] = fn()
        except BaseException as e:  # re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=body, name=f"netns-{name}", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]
