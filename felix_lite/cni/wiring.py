"""Kernel wiring of a pod: veth pair, /32 address, routes (pyroute2).

The host side is created in the caller's (node's) network namespace and its
peer is born directly inside the pod's namespace (IFLA_NET_NS_FD on the peer),
so no interface ever appears in a third namespace. Routing is pure L3:
the pod reaches everything via 169.254.1.1, which the host-side veth answers
with proxy ARP; the node reaches the pod through a /32 route (scope link,
protocol `rtproto.PROTO_LOCAL_POD`) on the host side, which carries no address.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from felix_lite.cni.netconf import GATEWAY, CniError, ErrorCode
from felix_lite.rtproto import PROTO_LOCAL_POD

log = logging.getLogger(__name__)

MAIN_TABLE: Final = 254
SCOPE_LINK: Final = 253
RTN_BLACKHOLE: Final = 6

OpenHost = Callable[[], Any]
OpenNetns = Callable[[str], Any]
WriteSysctl = Callable[[str, str], None]


def open_host() -> Any:
    return IPRoute()


def open_netns(path: str) -> Any:
    """A netlink socket inside the namespace at `path`; never creates one (flags=0)."""
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "no such network namespace", path)
    return IPRoute(netns=path, flags=0)


def write_sysctl(key: str, value: str) -> None:
    """Write `net.ipv4...` style keys for the current network namespace."""
    Path("/proc/sys", *key.split(".")).write_text(value)


@dataclass(frozen=True)
class PodLink:
    host_ifname: str
    container_ifname: str
    netns: str
    address: ipaddress.IPv4Address
    mtu: int | None = None


@dataclass(frozen=True)
class Macs:
    host: str
    container: str


@contextlib.contextmanager
def _step(name: str, code: ErrorCode = ErrorCode.IO_FAILURE) -> Iterator[None]:
    """Turn kernel errors into a CNI error naming the failed step."""
    try:
        yield
    except CniError:
        raise
    except (NetlinkError, OSError) as exc:
        raise CniError(code, f"wiring {name}: failed", str(exc)) from exc


def _index(ipr: Any, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def _mac(ipr: Any, index: int) -> str:
    return str(ipr.get_links(index)[0].get("IFLA_ADDRESS"))


def _routes(ipr: Any, dst: str) -> list[Any]:
    # route('dump', dst=...) filters; get_routes(dst=...) would do a lookup.
    return list(ipr.route("dump", table=MAIN_TABLE, dst=dst))


def _ours(route: Any) -> bool:
    return int(route.get("proto")) == PROTO_LOCAL_POD


class Wiring:
    """Builds, checks and removes pod wiring; netlink and sysctl are seams."""

    def __init__(
        self,
        *,
        host: OpenHost = open_host,
        netns: OpenNetns = open_netns,
        sysctl: WriteSysctl = write_sysctl,
    ) -> None:
        self._open_host = host
        self._open_netns = netns
        self._sysctl = sysctl

    def _container(self, path: str) -> Any:
        try:
            return self._open_netns(path)
        except FileNotFoundError:
            raise CniError(
                ErrorCode.UNKNOWN_CONTAINER,
                f"env CNI_NETNS: network namespace {path} does not exist",
            ) from None
        except (NetlinkError, OSError) as exc:
            raise CniError(
                ErrorCode.IO_FAILURE,
                f"env CNI_NETNS: cannot enter network namespace {path}",
                str(exc),
            ) from None

    def add(self, link: PodLink) -> Macs:
        """Create everything for one pod; the caller undoes a failure with `remove`."""
        with self._open_host() as host, self._container(link.netns) as ctr:
            if _index(ctr, link.container_ifname) is not None:
                raise CniError(
                    ErrorCode.INTERFACE_CONFLICT,
                    f"env CNI_IFNAME: {link.container_ifname} already exists in {link.netns}",
                )
            stale = _index(host, link.host_ifname)
            if stale is not None:
                log.warning("wiring.host_link.stale_removed ifname=%s", link.host_ifname)
                with _step("host.link.del_stale"):
                    host.link("del", index=stale)
            with _step("host.link.add_veth"), open(link.netns, "rb") as nsfile:
                extra = {"mtu": link.mtu} if link.mtu else {}
                peer: dict[str, Any] = {
                    "ifname": link.container_ifname,
                    "net_ns_fd": nsfile.fileno(),
                    **extra,
                }
                host.link("add", ifname=link.host_ifname, kind="veth", peer=peer, **extra)
            host_idx = _index(host, link.host_ifname)
            ctr_idx = _index(ctr, link.container_ifname)
            if host_idx is None or ctr_idx is None:
                raise CniError(
                    ErrorCode.IO_FAILURE, f"wiring veth {link.host_ifname}: vanished after add"
                )
            with _step("host.sysctl"):
                self._sysctl(f"net.ipv4.conf.{link.host_ifname}.proxy_arp", "1")
                self._sysctl(f"net.ipv4.neigh.{link.host_ifname}.proxy_delay", "0")
            with _step("host.link.up"):
                host.link("set", index=host_idx, state="up")
            gw = str(GATEWAY)
            with _step("container.addr.add"):
                ctr.addr("add", index=ctr_idx, address=str(link.address), prefixlen=32)
            with _step("container.link.up"):
                ctr.link("set", index=ctr_idx, state="up")
            with _step("container.route.gateway"):
                ctr.route("add", dst=f"{gw}/32", oif=ctr_idx, scope=SCOPE_LINK)
            with _step("container.route.default"):
                ctr.route("add", dst="0.0.0.0/0", gateway=gw, oif=ctr_idx, flags=["onlink"])
            self._add_host_route(host, link, host_idx)
            return Macs(host=_mac(host, host_idx), container=_mac(ctr, ctr_idx))

    def _add_host_route(self, host: Any, link: PodLink, host_idx: int) -> None:
        dst = f"{link.address}/32"
        try:
            host.route("add", dst=dst, oif=host_idx, scope=SCOPE_LINK, proto=PROTO_LOCAL_POD)
            return
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise CniError(
                    ErrorCode.IO_FAILURE, f"wiring host.route {dst}: failed", str(exc)
                ) from exc
        existing = _routes(host, dst)
        if existing and not all(_ours(r) for r in existing):
            raise CniError(
                ErrorCode.ROUTE_CONFLICT,
                f"wiring host.route {dst}: a route of another protocol exists",
                f"proto={existing[0].get('proto')}",
            )
        log.warning("wiring.host_route.replaced dst=%s", dst)
        with _step("host.route.replace"):
            host.route("replace", dst=dst, oif=host_idx, scope=SCOPE_LINK, proto=PROTO_LOCAL_POD)

    def remove(self, *, host_ifname: str, address: ipaddress.IPv4Address | None) -> None:
        """Delete the veth (both ends go) and our /32; anything already gone is fine."""
        with self._open_host() as host:
            idx = _index(host, host_ifname) if host_ifname else None
            if idx is not None:
                try:
                    host.link("del", index=idx)
                    log.info("wiring.host_link.deleted ifname=%s", host_ifname)
                except NetlinkError as exc:
                    if exc.code != errno.ENODEV:
                        raise CniError(
                            ErrorCode.IO_FAILURE,
                            f"wiring host.link.del {host_ifname}: failed",
                            str(exc),
                        ) from exc
            if address is not None:
                self._remove_host_route(host, address)

    def _remove_host_route(self, host: Any, address: ipaddress.IPv4Address) -> None:
        for route in _routes(host, f"{address}/32"):
            if not _ours(route):
                continue
            try:
                host.route("del", dst=f"{address}/32", proto=PROTO_LOCAL_POD, table=MAIN_TABLE)
            except NetlinkError as exc:
                if exc.code not in (errno.ESRCH, errno.ENOENT):
                    raise CniError(
                        ErrorCode.IO_FAILURE,
                        f"wiring host.route.del {address}/32: failed",
                        str(exc),
                    ) from exc

    def macs(self, link: PodLink) -> Macs:
        with self._open_host() as host, self._container(link.netns) as ctr:
            host_idx = _index(host, link.host_ifname)
            ctr_idx = _index(ctr, link.container_ifname)
            if host_idx is None or ctr_idx is None:
                raise CniError(
                    ErrorCode.CHECK_FAILED, f"wiring {link.host_ifname}: interfaces missing"
                )
            return Macs(host=_mac(host, host_idx), container=_mac(ctr, ctr_idx))

    def host_link_exists(self, host_ifname: str) -> bool:
        with self._open_host() as host:
            return _index(host, host_ifname) is not None

    def check(self, link: PodLink) -> None:
        """Raise CHECK_FAILED naming the first piece that is not as ADD left it."""

        def fail(what: str) -> CniError:
            return CniError(ErrorCode.CHECK_FAILED, f"check {link.host_ifname}: {what}")

        with self._open_host() as host, self._container(link.netns) as ctr:
            host_idx = _index(host, link.host_ifname)
            if host_idx is None:
                raise fail("host-side interface missing")
            ctr_idx = _index(ctr, link.container_ifname)
            if ctr_idx is None:
                raise fail(f"{link.container_ifname} missing in {link.netns}")
            addrs = {
                (a.get("IFA_ADDRESS"), a["prefixlen"])
                for a in ctr.get_addr(index=ctr_idx, family=2)
            }
            if (str(link.address), 32) not in addrs:
                raise fail(f"{link.container_ifname} lacks {link.address}/32 (has {sorted(addrs)})")
            defaults = [
                r
                for r in ctr.route("dump", table=MAIN_TABLE, family=2)
                if r["dst_len"] == 0
                and r.get("RTA_GATEWAY") == str(GATEWAY)
                and r.get("RTA_OIF") == ctr_idx
            ]
            if not defaults:
                raise fail(f"no default route via {GATEWAY} in {link.netns}")
            routes = [
                r
                for r in _routes(host, f"{link.address}/32")
                if r.get("RTA_OIF") == host_idx and _ours(r)
            ]
            if not routes:
                raise fail(f"no /32 route to {link.address} via {link.host_ifname}")


def ensure_blackhole(cidr: str | ipaddress.IPv4Network, *, host: OpenHost = open_host) -> bool:
    """Blackhole the node's pod CIDR so unknown local addresses never leak upstream.

    Returns True if installed now, False if ours was there; a route of another
    protocol for the same prefix is left alone (logged).
    """
    net = ipaddress.IPv4Network(cidr)
    with host() as ipr:
        for route in _routes(ipr, str(net)):
            if route["dst_len"] != net.prefixlen:
                continue
            if _ours(route) and route["type"] == RTN_BLACKHOLE:
                return False
            log.warning("wiring.blackhole.foreign cidr=%s proto=%s", net, route.get("proto"))
            return False
        ipr.route("add", dst=str(net), type="blackhole", proto=PROTO_LOCAL_POD)
        log.info("wiring.blackhole.added cidr=%s", net)
        return True


def remove_blackhole(cidr: str | ipaddress.IPv4Network, *, host: OpenHost = open_host) -> None:
    net = ipaddress.IPv4Network(cidr)
    with host() as ipr:
        for route in _routes(ipr, str(net)):
            if (
                route["dst_len"] == net.prefixlen
                and _ours(route)
                and route["type"] == RTN_BLACKHOLE
            ):
                ipr.route("del", dst=str(net), type="blackhole", proto=PROTO_LOCAL_POD)
