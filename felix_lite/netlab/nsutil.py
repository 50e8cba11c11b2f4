"""Network-namespace primitives shared by the topology, the servers and the prober.

A socket stays in the network namespace it was created in, so the harness
creates sockets on a short-lived thread that has `setns()`-ed into the target
namespace: no `ip netns exec` process per socket, and the calling thread never
changes namespace (a thread that entered a namespace simply ends).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

log = logging.getLogger(__name__)

NETNS_RUN_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
MAX_NETNS_NAME = 15  # not a kernel limit, but keeps derived interface names legal

T = TypeVar("T")


class NetnsError(RuntimeError):
    """A namespace operation failed; the message names the namespace."""


class CommandRunner(Protocol):
    """Runs one command; raises `NetnsError` naming the command on failure."""

    def __call__(self, argv: Sequence[str], *, stdin: str | None = None) -> str: ...


def run_command(argv: Sequence[str], *, stdin: str | None = None) -> str:
    """The real `CommandRunner`: subprocess, no shell, stdout returned."""
    proc = subprocess.run(
        list(argv), input=stdin, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise NetnsError(f"command failed rc={proc.returncode}: {' '.join(argv)}: {detail}")
    return proc.stdout


_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def netns_path(name: str) -> Path:
    return NETNS_RUN_DIR / name


def netns_exists(name: str) -> bool:
    return netns_path(name).exists()


def enter_netns_this_thread(name: str) -> None:
    """Move the calling thread (only) into netns `name`. Use on a thread you own."""
    try:
        fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise NetnsError(f"netns {name}: does not exist") from e
    try:
        _setns(fd)
    except OSError as e:
        raise NetnsError(f"netns {name}: setns failed: {e}") from e
    finally:
        os.close(fd)


def call_in_netns(name: str, fn: Callable[[], T]) -> T:
    """Run `fn` on a fresh thread inside netns `name` and return its result.

    The thread ends afterwards, so no thread is ever left in a foreign
    namespace even if `fn` raises.
    """
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


def sockets_in_netns(
    name: str, count: int, *, type_: int, proto: int = 0
) -> list[socket.socket]:
    """`count` non-blocking AF_INET sockets created inside netns `name`."""

    def make() -> list[socket.socket]:
        out: list[socket.socket] = []
        try:
            for _ in range(count):
                s = socket.socket(socket.AF_INET, type_, proto)
                s.setblocking(False)
                out.append(s)
        except BaseException:
            for s in out:
                s.close()
            raise
        return out

    return call_in_netns(name, make)


def write_sysctls(name: str, values: Mapping[str, str]) -> None:
    """Write `net.*` sysctls of netns `name` (/proc/sys/net is per calling thread's netns)."""

    def write() -> None:
        for key, value in values.items():
            path = Path("/proc/sys") / key.replace(".", "/")
            try:
                path.write_text(f"{value}\n")
            except OSError as e:
                raise NetnsError(f"netns {name}: sysctl {key}={value}: {e.strerror}") from e

    call_in_netns(name, write)


def read_sysctl(name: str, key: str) -> str:
    return call_in_netns(
        name, lambda: (Path("/proc/sys") / key.replace(".", "/")).read_text().strip()
    )


_sctp: bool | None = None


def sctp_supported() -> bool:
    """Whether this kernel can make SCTP sockets (here it reports EPROTONOSUPPORT)."""
    global _sctp
    if _sctp is None:
        try:
            socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP).close()
            _sctp = True
        except OSError as e:
            if e.errno not in (errno.EPROTONOSUPPORT, errno.ESOCKTNOSUPPORT, errno.EAFNOSUPPORT):
                raise
            _sctp = False
    return _sctp


def delete_netns(names: Iterable[str], *, runner: CommandRunner = run_command) -> list[str]:
    """Delete the namespaces that exist; returns failures as messages (never raises)."""
    failures: list[str] = []
    for name in names:
        if not netns_exists(name):
            continue
        try:
            runner(["ip", "netns", "delete", name])
        except NetnsError as e:
            failures.append(str(e))
            log.warning("netns.delete.failed netns=%s error=%s", name, e)
    return failures
