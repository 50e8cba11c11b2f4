"""The namespace harness itself: wiring, servers, prober, teardown (no policy needed).

The first group is pure (matrix building, CLI command lines, model YAML);
the `kernel` group builds real namespaces.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from felix_lite.netlab import (
    Endpoint,
    NodeLab,
    PolicyCtl,
    ProbeResult,
    ProtocolUnsupported,
    Reachability,
    ServerProcess,
    ServeSpec,
    Topology,
    model_docs,
    open_connection,
    probe_matrix,
    probe_one,
    upstream_model,
)
from felix_lite.netlab.nsutil import netns_exists, read_sysctl, run_command, sctp_supported
from felix_lite.netlab.probe import results_json
from felix_lite.netlab.topology import POD_GATEWAY
from policy.names import pod_interface

NAMES = ["x/a", "x/b", "y/a"]


# -- pure -------------------------------------------------------------------------------


def test_reachability_ops_apply_in_order() -> None:
    r = Reachability(NAMES, default=True)
    assert r.set("*", "x/a", False) == 3
    assert r.set("y", "x", True) == 2  # y/a -> x/a, x/b
    assert not r.get("x/b", "x/a")
    assert r.get("y/a", "x/a")
    assert r.get("x/a", "y/a")


def test_reachability_compare_and_report() -> None:
    expected = Reachability(NAMES, default=True)
    expected.set("x/a", "x/b", False)
    observed = Reachability.from_results(
        NAMES,
        [ProbeResult(s, d, not (s == "y/a" and d == "x/a")) for s in NAMES for d in NAMES],
    )
    wrong = {(m.src, m.dst) for m in expected.compare(observed)}
    assert wrong == {("x/a", "x/b"), ("y/a", "x/a")}
    text = expected.report(observed, title="case")
    assert "2 wrong of 9" in text
    assert text.splitlines()[2] == "-\tx/a\tx/b\ty/a"
    assert "x/a\t.\tX\t." in text  # expected row of x/a


def test_reachability_from_results_requires_every_cell() -> None:
    with pytest.raises(ValueError, match="no probe result"):
        Reachability.from_results(NAMES, [ProbeResult("x/a", "x/a", True)])


def test_results_json_shape() -> None:
    out = results_json([ProbeResult("x/a", "y/b", True)], port=80, protocol="tcp")
    assert out == {
        "port": 80,
        "protocol": "TCP",
        "results": [{"from": "x/a", "to": "y/b", "connected": True}],
    }


def test_model_docs_follow_upstream_model() -> None:
    model = upstream_model()
    docs = model_docs(model)
    nss = [d for d in docs if d["kind"] == "Namespace"]
    pods = [d for d in docs if d["kind"] == "Pod"]
    assert [n["metadata"]["name"] for n in nss] == ["x", "y", "z"]
    assert nss[1]["metadata"]["labels"] == {"ns": "y", "kubernetes.io/metadata.name": "y"}
    assert len(pods) == 9
    xb = next(p for p in pods if p["metadata"]["namespace"] == "x" and p["metadata"]["name"] == "b")
    assert xb["metadata"]["labels"] == {"pod": "b"}
    assert xb["spec"]["nodeName"] == "node-1"
    assert xb["status"]["podIP"] == "10.244.1.3"
    names = {port["name"] for c in xb["spec"]["containers"] for port in c["ports"]}
    assert names == {f"serve-{p}-{pr}" for p in (80, 81) for pr in ("tcp", "udp", "sctp")}
    assert len({p["status"]["podIP"] for p in pods}) == 9
    only = model_docs(model, pods=["z/c"])
    assert [d["metadata"]["name"] for d in only if d["kind"] == "Pod"] == ["c"]


def test_policyctl_runs_the_cli_inside_the_node_netns(tmp_path: Path) -> None:
    calls: list[list[str]] = []

    def fake(argv: Any, *, stdin: str | None = None) -> str:
        calls.append(list(argv))
        return "applied\n"

    ctl = PolicyCtl(
        "fltn1", "node-1", backend="nft", workdir=tmp_path, runner=fake, cli=["felix-lite"]
    )
    ctl.apply([{"kind": "Namespace", "metadata": {"name": "x"}}])
    ctl.flush()
    apply_argv, flush_argv = calls
    assert apply_argv[:5] == ["ip", "netns", "exec", "fltn1", "felix-lite"]
    assert apply_argv[5:9] == ["policy", "apply", "--node", "node-1"]
    d = Path(apply_argv[apply_argv.index("-f") + 1])
    assert list(yaml.safe_load_all((d / "objects.yaml").read_text())) == [
        {"kind": "Namespace", "metadata": {"name": "x"}}
    ]
    assert apply_argv[apply_argv.index("--backend") + 1] == "nft"
    assert flush_argv[4:] == ["felix-lite", "policy", "flush", "--backend", "nft"]


def test_topology_rejects_long_prefix() -> None:
    with pytest.raises(ValueError, match="prefix"):
        Topology("flt-much-too-long")


# -- kernel -----------------------------------------------------------------------------


def _ip_json(netns: str, *args: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = json.loads(run_command(["ip", "-j", "-n", netns, *args]) or "[]")
    return out


@pytest.mark.kernel
def test_wiring_matches_the_dataplane_contract(node_lab: NodeLab) -> None:
    topo = node_lab.topology
    node = topo.nodes["node-1"]
    assert len(topo.pods) == 9
    links = {link["ifname"]: link for link in _ip_json(node.netns, "link", "show")}
    addrs = {a["ifname"]: a for a in _ip_json(node.netns, "addr", "show")}
    routes = {r["dst"]: r for r in _ip_json(node.netns, "route", "show")}
    assert routes["default"]["dev"] == "eth0"
    for key, pod in topo.pods.items():
        ns, name = key.split("/")
        assert pod.host_iface == pod_interface(ns, name)
        assert "UP" in links[pod.host_iface]["flags"]
        assert not [a for a in addrs[pod.host_iface]["addr_info"] if a["family"] == "inet"]
        assert routes[pod.ip]["dev"] == pod.host_iface
        assert routes[pod.ip]["scope"] == "link"
        assert read_sysctl(node.netns, f"net.ipv4.conf.{pod.host_iface}.proxy_arp") == "1"
        assert read_sysctl(node.netns, f"net.ipv4.neigh.{pod.host_iface}.proxy_delay") == "0"
        paddrs = _ip_json(pod.netns, "addr", "show", "dev", "eth0")[0]["addr_info"]
        assert [(a["local"], a["prefixlen"]) for a in paddrs if a["family"] == "inet"] == [
            (pod.ip, 32)
        ]
        (default,) = _ip_json(pod.netns, "route", "show", "default")
        assert default["gateway"] == POD_GATEWAY
        assert default["dev"] == "eth0"
        assert "onlink" in default["flags"]
    for ns in topo.namespaces:
        assert read_sysctl(ns, "net.ipv4.ip_forward") == "1"
        assert read_sysctl(ns, "net.ipv4.conf.all.rp_filter") == "0"
        assert read_sysctl(ns, "net.ipv4.conf.default.rp_filter") == "0"
        assert ns.startswith("flt")


@pytest.mark.kernel
@pytest.mark.parametrize("protocol", ["TCP", "UDP"])
@pytest.mark.parametrize("port", [80, 81])
def test_without_policy_every_pod_reaches_every_pod(
    node_lab: NodeLab, port: int, protocol: str
) -> None:
    t0 = time.monotonic()
    observed = node_lab.probe(port=port, protocol=protocol)
    elapsed = time.monotonic() - t0
    expected = Reachability(observed.names, default=True)
    assert len(observed.names) == 9
    assert not expected.compare(observed), expected.report(observed)
    print(f"probe 9x9 {protocol}/{port}: {elapsed:.3f}s")


@pytest.mark.kernel
def test_closed_port_and_missing_pod_are_reported_not_connected(node_lab: NodeLab) -> None:
    xa, yb = node_lab.pods["x/a"], node_lab.pods["y/b"]
    refused = probe_one(xa, yb, port=82, timeout=0.5)
    assert not refused.connected
    assert refused.detail == "ECONNREFUSED"
    udp = probe_one(xa, yb, port=82, protocol="UDP", timeout=0.5)
    assert not udp.connected
    nowhere = Endpoint("nowhere", xa.netns, "10.244.1.250")  # routed to the node, no pod
    assert not probe_one(xa, nowhere, port=80, timeout=0.5).connected


@pytest.mark.kernel
@pytest.mark.parametrize("protocol", ["TCP", "UDP"])
def test_node_and_outside_reach_pods_and_back(node_lab: NodeLab, protocol: str) -> None:
    pods = node_lab.pod_endpoints
    others = [node_lab.node, node_lab.outside]
    to_pods = probe_matrix(others, targets=pods, port=80, protocol=protocol)
    from_pods = probe_matrix(pods, targets=others, port=81, protocol=protocol)
    bad = [r for r in [*to_pods, *from_pods] if not r.connected]
    assert len(to_pods) == len(from_pods) == 18
    assert not bad, bad


@pytest.mark.kernel
def test_spoofed_source_is_not_dropped_without_policy(node_lab: NodeLab) -> None:
    """Baseline for the anti-spoof test in test_traffic_policy.py: the harness
    itself (rp_filter 0, a return route) lets a spoofed source through."""
    spoof = "10.244.1.200"
    node_lab.topology.add_pod_address("x/a", spoof)
    res = probe_one(node_lab.pods["x/a"], node_lab.pods["y/b"], port=80, source_ip=spoof)
    assert res.connected, res
    node_lab.topology.remove_pod_address("x/a", spoof)
    addrs = _ip_json(node_lab.pods["x/a"].netns, "addr", "show", "dev", "eth0")[0]["addr_info"]
    assert spoof not in {a.get("local") for a in addrs}


@pytest.mark.kernel
def test_open_connection_echoes(node_lab: NodeLab) -> None:
    with open_connection(node_lab.pods["z/c"], node_lab.pods["x/a"], port=81) as s:
        s.sendall(b"hello")
        assert s.recv(16) == b"hello"


@pytest.mark.kernel
def test_sctp_is_detected_and_skipped(node_lab: NodeLab) -> None:
    if sctp_supported():
        pytest.skip("this kernel supports SCTP")
    with pytest.raises(ProtocolUnsupported):
        probe_one(node_lab.pods["x/a"], node_lab.pods["x/b"], port=80, protocol="SCTP")
    servers = ServerProcess()
    with servers:
        servers.add(
            ServeSpec("sctp-test", node_lab.node.netns, ports=(90,), protocols=("TCP", "SCTP"))
        )
        assert servers.skipped == {"sctp-test": ["SCTP/90"]}
        assert probe_one(node_lab.pods["x/a"], node_lab.node, port=90).connected


@pytest.mark.kernel
def test_remove_pod_makes_it_unreachable(node_lab: NodeLab) -> None:
    zc = node_lab.pods["z/c"]
    node_lab.servers.remove("z/c")
    node_lab.topology.remove_pod("z/c")
    assert not netns_exists(zc.netns)
    assert not probe_one(node_lab.pods["x/a"], zc, port=80, timeout=0.5).connected
    assert probe_one(node_lab.pods["x/a"], node_lab.pods["z/b"], port=80).connected


@pytest.mark.kernel
def test_teardown_removes_namespaces_and_processes(e2e_model: Any) -> None:
    from tests.functional.conftest import build_node_lab

    lab = build_node_lab(e2e_model, role="t")
    names = lab.topology.namespaces
    pid = lab.servers.pid
    assert pid is not None
    assert all(netns_exists(n) for n in names)
    lab.close()
    lab.close()  # idempotent
    assert not [n for n in names if netns_exists(n)]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.kernel
def test_teardown_on_error_while_building() -> None:
    topo = Topology("fltx9")
    try:
        topo.add_node("node-1")
        with pytest.raises(ValueError, match="already exists"):
            topo.add_node("node-1")
        made = topo.namespaces
    finally:
        topo.teardown()
    assert made and not [n for n in made if netns_exists(n)]


@pytest.mark.kernel
def test_server_socket_lives_in_the_pod_namespace(node_lab: NodeLab) -> None:
    # Nothing listens on port 80 in the node namespace except the node's own server:
    # stopping it must not affect pods, which proves sockets are per-namespace.
    node_lab.servers.remove("node")
    assert not probe_one(node_lab.pods["x/a"], node_lab.node, port=80, timeout=0.5).connected
    assert probe_one(node_lab.node, node_lab.pods["x/a"], port=80).connected
