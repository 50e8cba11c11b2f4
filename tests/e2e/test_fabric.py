"""The pure L3 fabric end to end, the same scenario against BIRD, FRR, GoBGP and a mesh.

Per variant one lab (module scope, so one lives at a time): 3 nodes, pods made
by `felix-lite-cni ADD` under `ip netns exec <node>`, real ExaBGP per node,
`NodeRouting` per node. Node-3 uses a wrong MD5 password and must never get a
session; nodes 1 and 2 use the right one (so MD5 is on for every live session).
In ToR mode the ToR also originates 10.200.0.0/24 (outside the pod CIDRs) and
node-1's first pod /32 (10.244.1.1, handed out first by the fresh IPAM), which
the import filter must keep out of the kernels they do not belong in.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from felix_lite.fabric.routers import RouterKind, StaticRoute
from felix_lite.fabric.topology import (
    FabricLab,
    FabricMode,
    FabricSpec,
    Peering,
    kernel_routes,
    wait_until,
)
from felix_lite.netlab.probe import probe_one
from felix_lite.rtproto import PROTO_BGP, PROTO_LOCAL_POD
from tests.e2e.conftest import ContinuousProbe, capture, fabric_unavailable, make_lab

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

PASSWORD = "s3cret"
OUTSIDE = "10.200.0.0/24"
NODE1_FIRST_POD = "10.244.1.1"
VARIANTS = ("bird", "frr", "gobgp", "mesh")


def _spec(variant: str) -> FabricSpec:
    mesh = variant == "mesh"
    return FabricSpec(
        nodes=3,
        mode=FabricMode.MESH if mesh else FabricMode.TOR,
        router=RouterKind.BIRD if mesh else RouterKind(variant),
        passwords={1: PASSWORD, 2: PASSWORD, 3: "wrong-password"},
        tor_passwords={1: PASSWORD, 2: PASSWORD, 3: PASSWORD},
        tor_static=()
        if mesh
        else (StaticRoute(OUTSIDE), StaticRoute(f"{NODE1_FIRST_POD}/32", via="10.10.1.2")),
        hold_time=30,
        graceful_restart=60,
        sync_timeout=8.0,  # node-3's sessions never come up: sweep without them after 8 s
        expect_down=(3,),
    )


@pytest.fixture(scope="module", params=VARIANTS)
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> FabricLab:
    variant = request.param
    why = fabric_unavailable(None if variant == "mesh" else variant)
    if why:
        pytest.skip(why)
    lab = make_lab(tmp_path_factory.mktemp(f"fab-{variant}"), _spec(variant), request)
    a = lab.add_pod("node-1", "x", "a")
    lab.add_pod("node-2", "y", "b")
    assert a.ip == NODE1_FIRST_POD, "fresh IPAM hands out the first address first"
    _wait_pods_routed(lab)
    return lab


def _wait_pods_routed(lab: FabricLab, timeout: float = 20.0) -> None:
    def ok() -> bool:
        for pod in lab.pods.values():
            for name in ("node-1", "node-2"):
                if name != pod.node and f"{pod.ip}/32" not in lab.learned_in_kernel(name):
                    return False
        return True

    wait_until(ok, timeout, "pod routes on the other nodes")


def _wire(lab: FabricLab) -> tuple[str, str]:
    """(netns, interface) carrying node-1's traffic: its ToR port or switch port."""
    if lab.spec.mode is FabricMode.TOR:
        return lab.tor_netns, "n1"
    return f"{lab.prefix}s", "n1"


def _uplink_next_hop(lab: FabricLab, name: str) -> str:
    node = lab.nodes[name]
    return f"10.10.{node.index}.1"


def test_tcp_udp_between_pods_plain_ip_on_the_wire(lab: FabricLab, tmp_path: Path) -> None:
    a, b = lab.pods["x/a"], lab.pods["y/b"]
    netns, iface = _wire(lab)
    out = tmp_path / "wire.txt"
    # the links' own control traffic (BGP, ARP, the kernel's IGMP reports to
    # link-local groups) is not pod traffic; everything else must be
    wire_filter = "not tcp port 179 and not arp and not igmp and not dst net 224.0.0.0/24"
    with capture(netns, iface, wire_filter, out):
        results = [
            probe_one(src.endpoint, dst.endpoint, port=port, protocol=proto)
            for src, dst in ((a, b), (b, a))
            for port in (80, 81)
            for proto in ("TCP", "UDP")
        ]
        time.sleep(0.3)
    assert all(r.connected for r in results), [r for r in results if not r.connected]
    lines = [ln for ln in out.read_text().splitlines() if " IP " in ln]
    # every packet between node-1 and the fabric is a bare IPv4 packet between the pods
    pods = f"({re.escape(a.ip)}|{re.escape(b.ip)})"
    pat = re.compile(rf" IP {pods}\.\d+ > {pods}\.\d+: ")
    assert lines, "captured nothing"
    assert all(pat.search(ln) for ln in lines), [ln for ln in lines if not pat.search(ln)][:5]
    assert any("Flags [S]" in ln and f"> {b.ip}.80:" in ln for ln in lines)
    assert any("UDP" in ln and f"> {a.ip}.81:" in ln for ln in lines)
    for marker in ("VXLAN", "GRE", "ipip", "ip-proto-4", "4789"):
        assert not any(marker in ln for ln in lines), marker
    # and the learned route is a plain next hop, no tunnel device
    learned = lab.learned_in_kernel("node-1")
    expected_nh = (
        _uplink_next_hop(lab, "node-1")
        if lab.spec.mode is FabricMode.TOR
        else lab.nodes["node-2"].address
    )
    assert learned[f"{b.ip}/32"] == expected_nh


def test_pod_deleted_is_withdrawn_everywhere(lab: FabricLab) -> None:
    c = lab.add_pod("node-1", "z", "c")
    prefix = f"{c.ip}/32"
    wait_until(lambda: prefix in lab.learned_in_kernel("node-2"), 15, "new pod on node-2")
    if lab.router is not None:
        wait_until(lambda: prefix in lab.router.rib_prefixes(), 10, "new pod on the ToR")
    assert probe_one(lab.pods["y/b"].endpoint, c.endpoint, port=80, protocol="TCP").connected

    lab.delete_pod("z/c")
    wait_until(lambda: prefix not in lab.learned_in_kernel("node-2"), 15, "withdrawn on node-2")
    if lab.router is not None:
        router = lab.router
        wait_until(lambda: prefix not in router.rib_prefixes(), 10, "withdrawn on the ToR")
    assert prefix not in kernel_routes(lab.nodes["node-1"].netns)
    assert prefix not in lab.agents["node-2"].learned()
    # the other pods are untouched
    assert f"{lab.pods['x/a'].ip}/32" in lab.learned_in_kernel("node-2")


def test_import_filter_outside_cidr_and_local_pod(lab: FabricLab) -> None:
    if lab.spec.mode is FabricMode.MESH:
        pytest.skip("no ToR to originate foreign routes in the mesh")
    n1 = lab.agents["node-1"]
    wait_until(
        lambda: n1.status().peers[0].rejected >= 1, 10, "node-1 rejecting the outside prefix"
    )
    for name in ("node-1", "node-2"):
        assert OUTSIDE not in kernel_routes(lab.nodes[name].netns), name
    # node-1's own pod: still its proto-201 route to the veth, never a learned one
    local = subprocess.run(
        ["ip", "-n", lab.nodes["node-1"].netns, "-j", "route", "show", f"{NODE1_FIRST_POD}/32"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f'"protocol":"{PROTO_LOCAL_POD}"' in local.replace(" ", "") or '"dev":"fl' in local
    assert f"{NODE1_FIRST_POD}/32" not in lab.learned_in_kernel("node-1")
    assert f"{NODE1_FIRST_POD}/32" not in n1.learned()
    # node-2 reaches that pod (its route is fine for node-2)
    assert f"{NODE1_FIRST_POD}/32" in lab.learned_in_kernel("node-2")
    assert probe_one(
        lab.pods["y/b"].endpoint, lab.pods["x/a"].endpoint, port=80, protocol="TCP"
    ).connected


def test_exabgp_sigkill_and_restart_keeps_traffic(lab: FabricLab) -> None:
    a, b = lab.pods["x/a"], lab.pods["y/b"]
    before = lab.learned_in_kernel("node-2")
    with (
        ContinuousProbe(a.endpoint, b.endpoint) as fwd,
        ContinuousProbe(b.endpoint, a.endpoint) as back,
    ):
        time.sleep(0.5)
        lab.kill_exabgp("node-2")
        time.sleep(2.0)
        # node-2's learned routes are kept (stale) and the fabric keeps node-2's pods
        assert f"{a.ip}/32" in lab.learned_in_kernel("node-2")
        lab.start_exabgp("node-2")
        lab.wait_established(timeout=30, nodes=["node-1", "node-2"])
        wait_until(lambda: lab.agents["node-2"].wait_announced(0.1), 15, "node-2 re-announced")
        time.sleep(1.0)
    assert fwd.attempts > 20 and back.attempts > 20
    assert fwd.failures == [] and back.failures == []
    assert lab.learned_in_kernel("node-2") == before


def test_agent_restart_reconciles_without_cut(lab: FabricLab) -> None:
    n2 = lab.nodes["node-2"].netns
    a, b = lab.pods["x/a"], lab.pods["y/b"]
    nh = (
        _uplink_next_hop(lab, "node-2")
        if lab.spec.mode is FabricMode.TOR
        else (lab.nodes["node-1"].address)
    )
    # a learned route nobody justifies any more, and a foreign route in the pod range
    subprocess.run(
        ["ip", "-n", n2, "route", "add", "10.244.77.0/24", "via", nh, "proto", str(PROTO_BGP)],
        check=True,
    )
    subprocess.run(
        ["ip", "-n", n2, "route", "add", "10.244.78.0/24", "via", nh, "proto", "static"], check=True
    )
    with ContinuousProbe(b.endpoint, a.endpoint) as probe:
        time.sleep(0.3)
        agent = lab.restart_agent("node-2")
        assert f"{a.ip}/32" in lab.learned_in_kernel("node-2")  # kept across the restart
        wait_until(lambda: agent.synced, 20, "new agent in sync")
        time.sleep(0.5)
    assert probe.attempts > 10 and probe.failures == []
    routes = kernel_routes(n2)
    assert "10.244.77.0/24" not in routes, "stale proto-202 route swept"
    assert "10.244.78.0/24" in routes, "foreign route untouched"
    assert f"{a.ip}/32" in lab.learned_in_kernel("node-2")
    st = agent.status()
    assert st.synced and st.learned_installed >= 1
    subprocess.run(
        ["ip", "-n", n2, "route", "del", "10.244.78.0/24", "proto", "static"], check=True
    )


def test_md5_wrong_password_gives_no_session(lab: FabricLab) -> None:
    # node-1/node-2 run with the right password (sessions up, checked by the fixture)
    for name in ("node-1", "node-2"):
        peers = lab.agents[name].status().peers
        assert any(p.state == "up" for p in peers), name
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        assert not any(p.state == "up" for p in lab.agents["node-3"].status().peers)
        time.sleep(0.2)
    if lab.router is not None:
        assert not lab.router.established(lab.nodes["node-3"].address)
        assert lab.router.established(lab.nodes["node-1"].address)
    netns = lab.tor_netns if lab.router is not None else lab.nodes["node-1"].netns
    out = subprocess.run(
        ["ip", "netns", "exec", netns, "nstat", "-az", "TcpExtTCPMD5Failure"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    m = re.search(r"TcpExtTCPMD5Failure\s+(\d+)", out)
    assert m and int(m.group(1)) > 0, out


@pytest.fixture(scope="module")
def rack_lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> FabricLab:
    why = fabric_unavailable("bird")
    if why:
        pytest.skip(why)
    spec = FabricSpec(nodes=2, router=RouterKind.BIRD, peering=Peering.AS_PER_RACK)
    lab = make_lab(tmp_path_factory.mktemp("fab-rack"), spec, request)
    lab.add_pod("node-1", "x", "a")
    lab.add_pod("node-2", "y", "b")
    _wait_pods_routed(lab)
    return lab


def test_as_per_rack_bird_route_reflector(rack_lab: FabricLab) -> None:
    a, b = rack_lab.pods["x/a"], rack_lab.pods["y/b"]
    assert rack_lab.nodes["node-1"].asn == rack_lab.nodes["node-2"].asn
    assert rack_lab.learned_in_kernel("node-1")[f"{b.ip}/32"] == "10.10.1.1"  # next hop self
    for proto in ("TCP", "UDP"):
        assert probe_one(a.endpoint, b.endpoint, port=80, protocol=proto).connected
        assert probe_one(b.endpoint, a.endpoint, port=80, protocol=proto).connected
