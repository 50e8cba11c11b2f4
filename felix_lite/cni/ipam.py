"""Pod address allocation from the node's pod CIDR, persisted on disk.

Layout (like the reference host-local plugin, so operators can read it):
`<dataDir>/<network>/` holds one file per allocated address, named by the
address, with a JSON record (container id, ifname, host-side interface, pod);
`last_reserved_ip` makes allocation round-robin so a released address is not
handed straight to the next pod; `lock` is taken with `fcntl.flock` around
every read-modify-write, so concurrent ADDs in separate processes never hand
out one address twice. Record files are written to a temporary name and
renamed, so a crash never leaves a half-written record.

The pod CIDR is a routed block (the node holds a blackhole for it), so every
address is technically usable; the network and broadcast addresses are still
never handed out, to avoid surprising software that treats them specially.
The gateway 169.254.1.1 is outside any pod CIDR and excluded as well.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from felix_lite.cni.netconf import GATEWAY, CniError, ErrorCode

log = logging.getLogger(__name__)

LOCK_FILE: Final = "lock"
LAST_RESERVED_FILE: Final = "last_reserved_ip"


@dataclass(frozen=True)
class Allocation:
    address: ipaddress.IPv4Address
    container_id: str
    ifname: str
    host_ifname: str = ""
    pod: str = ""


def usable(cidr: ipaddress.IPv4Network) -> Iterator[ipaddress.IPv4Address]:
    """Addresses we may hand out: all but network, broadcast and the gateway."""
    for addr in cidr.hosts():
        if addr != GATEWAY:
            yield addr


def pick_free(
    cidr: ipaddress.IPv4Network,
    used: Iterable[ipaddress.IPv4Address],
    last: ipaddress.IPv4Address | None,
) -> ipaddress.IPv4Address | None:
    """The first free usable address after `last`, wrapping around; None when full."""
    taken = set(used)
    candidates = list(usable(cidr))
    start = 0
    if last is not None and last in cidr:
        # first candidate strictly after `last`
        start = next((i for i, a in enumerate(candidates) if a > last), 0)
    for addr in candidates[start:] + candidates[:start]:
        if addr not in taken:
            return addr
    return None


class Ipam:
    """One network's allocations in `directory`; every method takes the lock."""

    def __init__(self, directory: Path, cidr: ipaddress.IPv4Network) -> None:
        self.directory = directory
        self.cidr = cidr

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise CniError(
                ErrorCode.IO_FAILURE, f"ipam {self.directory}: cannot open lock", str(exc)
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _records(self) -> list[Allocation]:
        out = []
        for entry in self.directory.iterdir():
            try:
                addr = ipaddress.IPv4Address(entry.name)
            except ValueError:
                continue  # lock, last_reserved_ip, temporaries
            try:
                doc = json.loads(entry.read_text())
                out.append(
                    Allocation(
                        address=addr,
                        container_id=str(doc["containerID"]),
                        ifname=str(doc["ifname"]),
                        host_ifname=str(doc.get("hostIfname", "")),
                        pod=str(doc.get("pod", "")),
                    )
                )
            except (OSError, ValueError, KeyError, TypeError) as exc:
                # Unreadable record: keep the address taken rather than risk a duplicate.
                log.warning("ipam.record.unreadable path=%s error=%s", entry, exc)
                out.append(Allocation(address=addr, container_id="", ifname=""))
        return out

    def _write(self, alloc: Allocation) -> None:
        doc = {
            "containerID": alloc.container_id,
            "ifname": alloc.ifname,
            "hostIfname": alloc.host_ifname,
            "pod": alloc.pod,
        }
        final = self.directory / str(alloc.address)
        tmp = self.directory / f".{alloc.address}.tmp"
        tmp.write_text(json.dumps(doc) + "\n")
        os.replace(tmp, final)

    def _last(self) -> ipaddress.IPv4Address | None:
        try:
            return ipaddress.IPv4Address((self.directory / LAST_RESERVED_FILE).read_text().strip())
        except (OSError, ValueError):
            return None

    def allocate(
        self, container_id: str, ifname: str, *, host_ifname: str = "", pod: str = ""
    ) -> Allocation:
        """A new address, or the one this attachment already holds (ADD retried)."""
        with self._locked():
            try:
                records = self._records()
                for rec in records:
                    if rec.container_id == container_id and rec.ifname == ifname:
                        log.info(
                            "ipam.allocate.existing container=%s ip=%s", container_id, rec.address
                        )
                        return rec
                addr = pick_free(self.cidr, (r.address for r in records), self._last())
                if addr is None:
                    raise CniError(
                        ErrorCode.IP_EXHAUSTED,
                        f"ipam: no free address in pod CIDR {self.cidr}",
                        f"{len(records)} of {self.cidr.num_addresses - 2} addresses allocated",
                    )
                alloc = Allocation(
                    address=addr,
                    container_id=container_id,
                    ifname=ifname,
                    host_ifname=host_ifname,
                    pod=pod,
                )
                self._write(alloc)
                (self.directory / LAST_RESERVED_FILE).write_text(f"{addr}\n")
            except OSError as exc:
                raise CniError(
                    ErrorCode.IO_FAILURE, f"ipam {self.directory}: cannot allocate", str(exc)
                ) from None
        log.info("ipam.allocate.done container=%s ip=%s", container_id, addr)
        return alloc

    def find(self, container_id: str, ifname: str) -> Allocation | None:
        with self._locked():
            for rec in self._records():
                if rec.container_id == container_id and rec.ifname == ifname:
                    return rec
        return None

    def list(self) -> list[Allocation]:
        with self._locked():
            return sorted(self._records(), key=lambda r: r.address)

    def release(self, container_id: str, ifname: str) -> Allocation | None:
        """Drop this attachment's address; unknown attachments are not an error."""
        with self._locked():
            for rec in self._records():
                if rec.container_id == container_id and rec.ifname == ifname:
                    try:
                        (self.directory / str(rec.address)).unlink(missing_ok=True)
                    except OSError as exc:
                        raise CniError(
                            ErrorCode.IO_FAILURE, f"ipam {self.directory}: cannot release", str(exc)
                        ) from None
                    log.info("ipam.release.done container=%s ip=%s", container_id, rec.address)
                    return rec
        return None

    def release_address(self, address: ipaddress.IPv4Address) -> None:
        with self._locked():
            (self.directory / str(address)).unlink(missing_ok=True)
