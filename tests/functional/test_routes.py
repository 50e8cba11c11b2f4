"""Route installers against the real kernel, inside throwaway network namespaces.

Topology per test (nothing linked to the root namespace):
  node ns  uplink 192.0.2.1/24  <-veth->  tor ns 192.0.2.2/24 (+ 10.50.0.1 on lo)
  node ns  fl0123456789a        <-veth->  pod ns eth0 10.244.1.5/32
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from felix_lite.routes import LearnedRoutes, LocalPodRoutes, NetlinkRoutes

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

_counter = itertools.count()
POD_IF = "fl0123456789a"


def sh(*args: str, check: bool = True) -> str:
    out = subprocess.run(args, capture_output=True, text=True, check=False)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: rc={out.returncode} {out.stderr.strip()}")
    return out.stdout


_SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 7777)); s.listen(1); s.settimeout(5)
print("ready", flush=True)
try:
    c, _ = s.accept(); c.sendall(b"ok"); c.close()
except OSError:
    pass
"""
_CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], 7777), timeout=2)
sys.stdout.write(c.recv(2).decode())
"""


def reachable(src_ns: str, dst_ns: str, addr: str) -> bool:
    """One TCP exchange from src_ns to addr (served in dst_ns); the test has no ping."""
    server = subprocess.Popen(
        ["ip", "netns", "exec", dst_ns, sys.executable, "-c", _SERVER, addr],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        client = subprocess.run(
            ["ip", "netns", "exec", src_ns, sys.executable, "-c", _CLIENT, addr],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )
        return client.stdout == "ok"
    finally:
        server.kill()
        server.wait()


@dataclass
class Lab:
    node: str
    tor: str
    pod: str

    def ip(self, *args: str, check: bool = True) -> str:
        return sh("ip", "-n", self.node, *args, check=check)

    def routes(self, *selector: str) -> list[dict[str, object]]:
        out = self.ip("-j", "route", "show", *selector)
        return list(json.loads(out or "[]"))

    def by_dst(self, *selector: str) -> dict[str, dict[str, object]]:
        return {str(r["dst"]): r for r in self.routes(*selector)}


@pytest.fixture
def lab() -> Iterator[Lab]:
    base = f"flr{os.getpid() % 100000}{next(_counter)}"
    names = Lab(node=f"{base}n", tor=f"{base}t", pod=f"{base}p")
    made: list[str] = []
    try:
        for ns in (names.node, names.tor, names.pod):
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh(
            "ip",
            "-n",
            names.node,
            "link",
            "add",
            "uplink",
            "type",
            "veth",
            "peer",
            "name",
            "downlink",
            "netns",
            names.tor,
        )
        sh("ip", "-n", names.node, "addr", "add", "192.0.2.1/24", "dev", "uplink")
        sh("ip", "-n", names.node, "link", "set", "uplink", "up")
        sh("ip", "-n", names.tor, "addr", "add", "192.0.2.2/24", "dev", "downlink")
        sh("ip", "-n", names.tor, "addr", "add", "10.50.0.1/32", "dev", "lo")
        sh("ip", "-n", names.tor, "link", "set", "downlink", "up")
        sh(
            "ip",
            "-n",
            names.node,
            "link",
            "add",
            POD_IF,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            names.pod,
        )
        sh("ip", "-n", names.node, "link", "set", POD_IF, "up")
        sh("ip", "-n", names.pod, "addr", "add", "10.244.1.5/32", "dev", "eth0")
        sh("ip", "-n", names.pod, "link", "set", "eth0", "up")
        # replies leave the pod straight onto its veth; the node answers ARP for its own address
        sh("ip", "-n", names.pod, "route", "add", "default", "dev", "eth0", "scope", "link")
        yield names
    finally:
        for ns in reversed(made):
            sh("ip", "netns", "del", ns, check=False)


@pytest.fixture
def nl(lab: Lab) -> Iterator[NetlinkRoutes]:
    handle = NetlinkRoutes(lab.node)
    try:
        yield handle
    finally:
        handle.close()


def test_install_replace_withdraw_and_traffic(lab: Lab, nl: NetlinkRoutes) -> None:
    lr = LearnedRoutes(nl)
    lr.reconcile()
    assert not reachable(lab.node, lab.tor, "10.50.0.1")  # no route yet
    res = lr.set_desired({"10.50.0.1/32": "192.0.2.2", "10.60.0.0/16": "192.0.2.2"})
    assert res.ok and sorted(res.added) == ["10.50.0.1/32", "10.60.0.0/16"]
    got = lab.by_dst("proto", "202")
    assert set(got) == {"10.50.0.1", "10.60.0.0/16"}
    assert got["10.50.0.1"]["gateway"] == "192.0.2.2" and got["10.50.0.1"]["dev"] == "uplink"
    # the route really carries traffic (the tor owns 10.50.0.1; it answers via its connected /24)
    assert reachable(lab.node, lab.tor, "10.50.0.1")

    sh("ip", "-n", lab.tor, "addr", "add", "192.0.2.3/24", "dev", "downlink")
    res = lr.update({"10.60.0.0/16": "192.0.2.3"})
    assert res.replaced == ("10.60.0.0/16",)
    assert lab.by_dst("proto", "202")["10.60.0.0/16"]["gateway"] == "192.0.2.3"

    res = lr.update({}, ["10.50.0.1/32"])
    assert res.removed == ("10.50.0.1/32",)
    assert set(lab.by_dst("proto", "202")) == {"10.60.0.0/16"}
    assert lr.set_desired({}).removed == ("10.60.0.0/16",)
    assert lab.routes("proto", "202") == []


def test_socket_lives_in_the_target_namespace_only(lab: Lab, nl: NetlinkRoutes) -> None:
    assert set(nl.link_indexes()) == {"lo", "uplink", POD_IF}
    LearnedRoutes(nl).set_desired({"10.61.0.0/16": "192.0.2.2"})
    root = json.loads(sh("ip", "-j", "route", "show", "proto", "202") or "[]")
    assert all(r.get("dst") != "10.61.0.0/16" for r in root)
    assert "10.61.0.0/16" in lab.by_dst("proto", "202")


def test_reconcile_after_restart_removes_stale_ours_keeps_foreign(
    lab: Lab, nl: NetlinkRoutes
) -> None:
    first = LearnedRoutes(nl)
    first.set_desired({f"10.70.0.{i}/32": "192.0.2.2" for i in range(10)})
    # foreign routes of every kind a node has
    lab.ip("route", "add", "10.80.0.0/16", "via", "192.0.2.2", "proto", "static")
    lab.ip("route", "add", "10.81.0.0/16", "via", "192.0.2.2", "proto", "boot")
    lab.ip("route", "add", "10.82.0.0/16", "via", "192.0.2.2", "proto", "kernel")
    lab.ip("route", "add", "10.83.0.0/16", "via", "192.0.2.2", "proto", "186")
    lab.ip("route", "add", "10.244.1.5/32", "dev", POD_IF, "scope", "link", "proto", "201")
    lab.ip("route", "add", "10.70.0.3/32", "via", "192.0.2.2", "proto", "static", "metric", "50")
    foreign_before = [r for r in lab.routes() if r.get("protocol") != "202"]

    restarted = LearnedRoutes(NetlinkRoutes(lab.node))  # no memory of the first
    restarted.update({"10.70.0.1/32": "192.0.2.2"})  # a peer re-announces before in-sync
    assert len(lab.routes("proto", "202")) == 10  # nothing swept before reconcile
    # 10.70.0.3 is also held by a foreign route (metric 50): the foreign owner wins
    res = restarted.update({f"10.70.0.{i}/32": "192.0.2.2" for i in range(2, 5)})
    assert res.removed == ("10.70.0.3/32",) and res.conflicts[0].proto == 4
    res = restarted.reconcile()
    assert sorted(res.removed) == ["10.70.0.0/32"] + [f"10.70.0.{i}/32" for i in range(5, 10)]
    assert [(c.prefix, c.proto) for c in res.conflicts] == [("10.70.0.3/32", 4)]
    assert set(lab.by_dst("proto", "202")) == {"10.70.0.1", "10.70.0.2", "10.70.0.4"}
    foreign_after = [r for r in lab.routes() if r.get("protocol") != "202"]
    assert foreign_after == foreign_before
    assert restarted.reconcile().changed == 0


def test_conflict_with_local_pod_route_is_skipped_not_overwritten(
    lab: Lab, nl: NetlinkRoutes, caplog: pytest.LogCaptureFixture
) -> None:
    pods = LocalPodRoutes(nl, node_block="10.244.1.0/24")
    assert pods.set_desired({"10.244.1.5": POD_IF}).ok
    lr = LearnedRoutes(NetlinkRoutes(lab.node))
    lr.reconcile()
    lab.ip("route", "add", "10.90.0.0/24", "via", "192.0.2.2", "proto", "static")
    with caplog.at_level("WARNING", logger="felix_lite.routes"):
        res = lr.update(  # 10.90.0.0/24 appeared after our last dump: found via EEXIST
            {"10.244.1.5/32": "192.0.2.2", "10.90.0.0/24": "192.0.2.2", "10.91.0.0/24": "192.0.2.2"}
        )
    assert res.added == ("10.91.0.0/24",) and res.ok
    assert sorted((c.prefix, c.proto) for c in res.conflicts) == [
        ("10.244.1.5/32", 201),
        ("10.90.0.0/24", 4),
    ]
    assert "routes.conflict prefix=10.244.1.5/32 proto=201" in caplog.text
    pod_route = lab.by_dst("10.244.1.5/32")["10.244.1.5"]
    assert pod_route["dev"] == POD_IF and pod_route["protocol"] == "201"
    assert lab.by_dst("10.90.0.0/24")["10.90.0.0/24"]["protocol"] == "static"
    assert reachable(
        lab.node, lab.pod, "10.244.1.5"
    )  # the pod is still reachable through its own route


def test_unreachable_nexthop_is_a_clear_per_route_error(lab: Lab, nl: NetlinkRoutes) -> None:
    lr = LearnedRoutes(nl)
    want = {f"10.71.0.{i}/32": "192.0.2.2" for i in range(20)}
    want["10.72.0.0/16"] = "198.51.100.7"
    res = lr.set_desired(want)
    assert len(res.added) == 20
    (err,) = res.errors
    assert err.prefix == "10.72.0.0/16" and err.errno == errno.ENETUNREACH
    assert "10.72.0.0/16 via 198.51.100.7" in err.message and "gateway" in err.message
    assert len(lab.routes("proto", "202")) == 20


def test_onlink_next_hop(lab: Lab, nl: NetlinkRoutes) -> None:
    lr = LearnedRoutes(nl, onlink_dev="uplink")
    assert lr.set_desired({"10.73.0.0/16": "198.51.100.7"}).ok
    (r,) = lab.routes("proto", "202")
    flags = r.get("flags", [])
    assert r["gateway"] == "198.51.100.7" and isinstance(flags, list) and "onlink" in flags
    again = LearnedRoutes(NetlinkRoutes(lab.node), onlink_dev="uplink")
    assert again.set_desired({"10.73.0.0/16": "198.51.100.7"}).changed == 0  # read back as equal


def test_local_pod_routes_blackhole_and_reconcile(lab: Lab, nl: NetlinkRoutes) -> None:
    learned = LearnedRoutes(NetlinkRoutes(lab.node))
    learned.set_desired({"10.244.2.0/24": "192.0.2.2"})
    pods = LocalPodRoutes(nl, node_block="10.244.1.0/24")
    res = pods.set_desired({"10.244.1.5": POD_IF, "10.244.1.6": "flmissing00000"})
    assert sorted(res.added) == ["10.244.1.0/24", "10.244.1.5/32"]
    assert [e.errno for e in res.errors] == [errno.ENODEV]
    ours = lab.by_dst("proto", "201")
    assert ours["10.244.1.0/24"]["type"] == "blackhole"
    assert ours["10.244.1.5"]["dev"] == POD_IF and ours["10.244.1.5"]["scope"] == "link"
    assert reachable(lab.node, lab.pod, "10.244.1.5")

    # restart: the same pods again change nothing; a pod gone is swept, the block stays
    restarted = LocalPodRoutes(NetlinkRoutes(lab.node), node_block="10.244.1.0/24")
    assert restarted.set_desired({"10.244.1.5": POD_IF}).changed == 0
    again = LocalPodRoutes(NetlinkRoutes(lab.node), node_block="10.244.1.0/24")
    assert again.reconcile().removed == ("10.244.1.5/32",)
    assert set(lab.by_dst("proto", "201")) == {"10.244.1.0/24"}
    assert set(lab.by_dst("proto", "202")) == {"10.244.2.0/24"}  # learned untouched


def test_10k_install_and_withdraw(lab: Lab, nl: NetlinkRoutes) -> None:
    lr = LearnedRoutes(nl)
    lr.reconcile()
    want = {
        f"10.{100 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}/32": "192.0.2.2" for i in range(10000)
    }
    res = lr.set_desired(want)
    assert res.ok and len(res.added) == 10000
    assert len(nl.dump_routes(table=254, proto=202)) == 10000
    assert lr.reconcile().changed == 0
    res = lr.set_desired({})
    assert res.ok and len(res.removed) == 10000
    assert nl.dump_routes(table=254, proto=202) == []
