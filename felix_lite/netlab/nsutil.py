"""Network-namespace primitives shared by the topology, the servers and the prober.

A socket stays in the network namespace it was created in, so the harness
creates sockets on a short-lived thread that has `setns()`-ed into the target
namespace: no `ip netns exec` process per socket, and the calling thread never
changes namespace (a thread that entered a namespace simply ends).
"""

from __future__ import annotations

import errno
import logging
import socket
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

from felix_lite.nsenter import (
    NETNS_RUN_DIR,
    NetnsError,
    call_in_netns,
    enter_netns_this_thread,
    netns_path,
)

log = logging.getLogger(__name__)

__all__ = ["NETNS_RUN_DIR", "NetnsError", "call_in_netns", "enter_netns_this_thread", "netns_path"]

MAX_NETNS_NAME = 15  # not a kernel limit, but keeps derived interface names legal

T = TypeVar("T")


class CommandRunner(Protocol):
    """Runs one command; raises `NetnsError` naming the command on failure."""

    def __call__(self, argv: Sequence[str], *, stdin: str | None = None) -> str: ...


def run_command(argv: Sequence[str], *, stdin: str | None = None) -> str:
    """The real `CommandRunner`: subprocess, no shell, stdout returned."""
    proc = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise NetnsError(f"command failed rc={proc.returncode}: {' '.join(argv)}: {detail}")
    return proc.stdout


def netns_exists(name: str) -> bool:
    return netns_path(name).exists()


def sockets_in_netns(name: str, count: int, *, type_: int, proto: int = 0) -> list[socket.socket]:
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
