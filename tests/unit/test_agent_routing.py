"""NodeRoutingDriver: NodeDesired -> BgpSettings -> (fake) NodeRouting, no sockets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from controller.cache import Cache, Kind
from controller.nodestate import NodeDesired, NodeState, converters
from felix_lite.agent.routing import NodeRoutingDriver, bgp_settings, local_pod_routes
from felix_lite.bgp.config import BgpSettings
from felix_lite.config import AgentConfig, BgpAgentSettings
from policy.names import pod_interface

NODE = "node-1"


def desired(*objs: tuple[Kind, dict[str, Any]]) -> NodeDesired:
    cache = Cache(converters())
    for kind, obj in objs:
        cache.upsert(kind, obj)
    state = NodeState(NODE, secret_namespace="kube-system")
    state.apply(cache.take_changes())
    return state.desired()


def node(name: str, ip: str | None, cidr: str = "10.244.1.0/24") -> tuple[Kind, dict[str, Any]]:
    status = {"addresses": [{"type": "InternalIP", "address": ip}]} if ip else {}
    return Kind.NODE, {"metadata": {"name": name}, "spec": {"podCIDR": cidr}, "status": status}


def peer(name: str, ip: str, asn: int, **spec: Any) -> tuple[Kind, dict[str, Any]]:
    return Kind.BGP_PEER, {
        "metadata": {"name": name},
        "spec": {"peerIP": ip, "asNumber": asn, **spec},
    }


def pod(ns: str, name: str, ip: str, node_name: str = NODE) -> tuple[Kind, dict[str, Any]]:
    return Kind.POD, {
        "metadata": {"namespace": ns, "name": name},
        "spec": {"nodeName": node_name, "containers": [{"name": "c"}]},
        "status": {"podIP": ip},
    }


@dataclass
class FakeNode:
    settings: BgpSettings
    started: bool = False
    stopped: bool = False
    pods: list[Mapping[str, str]] = field(default_factory=list)

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.stopped = True

    def set_local_pods(self, pods: Mapping[str, str]) -> None:
        self.pods.append(dict(pods))

    def status(self) -> Any:
        from felix_lite.fabric.node import PeerRoutingStatus, RoutingStatus

        return RoutingStatus(
            node_name=self.settings.node_name,
            bridge_connected=True,
            synced=True,
            local_pods=1,
            exported=1,
            announced=1,
            learned_installed=2,
            conflicts=0,
            peers=(PeerRoutingStatus("10.0.0.1", 65000, "up", 12.34, 3, 2, 1, 0, 2, False, ""),),
        )

    def learned(self) -> dict[str, str]:
        return {"10.244.2.2/32": "10.0.0.12", "10.244.2.3/32": "10.0.0.12"}


class Harness:
    def __init__(self, tmp: Path, cfg: AgentConfig | None = None) -> None:
        self.nodes: list[FakeNode] = []
        self.rendered: list[tuple[BgpSettings, Path, str]] = []
        cfg = cfg or AgentConfig(
            node_name=NODE,
            bgp=BgpAgentSettings(
                socket=str(tmp / "run" / "bgp.sock"), exabgp_config_dir=str(tmp / "exabgp")
            ),
        )

        def factory(settings: BgpSettings, socket_path: str) -> FakeNode:
            n = FakeNode(settings)
            self.nodes.append(n)
            return n

        self.driver = NodeRoutingDriver(
            cfg, factory=factory, render=lambda s, d, sock: self.rendered.append((s, d, sock))
        )


def test_settings_from_desired_state() -> None:
    d = desired(
        node(NODE, "10.0.0.11"),
        node("node-2", "10.0.0.12"),
        peer("tor", "10.0.0.1", 65000, holdTime=30, multihop={"ttl": 2}),
    )
    s = bgp_settings(d, AgentConfig(node_name=NODE))
    assert s is not None
    assert (s.router_id, s.local_address, s.local_asn) == ("10.0.0.11", "10.0.0.11", 64512)
    assert s.node_block == "10.244.1.0/24"
    assert s.pod_cidrs == ("10.244.0.0/16",)  # the agent config's, no BGPConfiguration
    assert [(p.address, p.asn, p.hold_time, p.multihop_ttl) for p in s.peers] == [
        ("10.0.0.1", 65000, 30, 2),
        ("10.0.0.12", 64512, 90, None),
    ]  # ToR + mesh
    assert s.env["exabgp.daemon.user"] == "root"
    assert bgp_settings(desired(node(NODE, None)), AgentConfig(node_name=NODE)) is None
    cfg = AgentConfig(
        node_name=NODE, bgp=BgpAgentSettings(router_id="1.2.3.4", local_address="10.9.9.9")
    )
    s2 = bgp_settings(desired(node(NODE, None)), cfg)
    assert s2 is not None and (s2.router_id, s2.local_address) == ("1.2.3.4", "10.9.9.9")


def test_local_pod_routes_use_the_cni_interface_names() -> None:
    d = desired(
        pod("x", "a", "10.244.1.2"),
        pod("x", "b", "fd00::2"),
        pod("x", "c", "10.244.2.2", node_name="node-2"),
    )
    assert local_pod_routes(d) == {"10.244.1.2": pod_interface("x", "a")}


def test_driver_waits_for_router_id_then_starts(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.driver.update(desired(node(NODE, None), pod("x", "a", "10.244.1.2")))
    assert not h.driver.ready and h.nodes == [] and h.rendered == []
    assert "no InternalIP" in h.driver.status()["errors"][0]
    d = desired(
        node(NODE, "10.0.0.11"), pod("x", "a", "10.244.1.2"), peer("tor", "10.0.0.1", 65000)
    )
    h.driver.update(d)
    assert h.driver.ready and len(h.nodes) == 1 and h.nodes[0].started
    settings, conf_dir, sock = h.rendered[0]
    assert settings.router_id == "10.0.0.11"
    assert conf_dir == tmp_path / "exabgp" and sock == str(tmp_path / "run" / "bgp.sock")
    assert (tmp_path / "run").is_dir()
    assert h.nodes[0].pods == [{"10.244.1.2": pod_interface("x", "a")}]
    st = h.driver.status()
    assert st["peers"][0]["address"] == "10.0.0.1" and st["peers"][0]["uptime"] == 12.3
    assert st["routes"]["learned"] == 2 and st["routes"]["installed"] == 2
    assert st["errors"] == []


def test_driver_rebuilds_only_when_settings_change(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    base = [node(NODE, "10.0.0.11"), peer("tor", "10.0.0.1", 65000)]
    h.driver.update(desired(*base, pod("x", "a", "10.244.1.2")))
    h.driver.update(desired(*base, pod("x", "a", "10.244.1.2"), pod("x", "b", "10.244.1.3")))
    assert len(h.nodes) == 1 and len(h.rendered) == 1
    assert len(h.nodes[0].pods[-1]) == 2
    h.driver.update(desired(*base, peer("tor2", "10.0.0.2", 65001)))
    assert len(h.nodes) == 2 and h.nodes[0].stopped and h.nodes[1].started
    assert [p.address for p in h.rendered[-1][0].peers] == ["10.0.0.1", "10.0.0.2"]
    h.driver.stop()
    assert h.nodes[1].stopped and not h.driver.ready


def test_unrenderable_settings_keep_the_last_good(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    good = desired(node(NODE, "10.0.0.11"), peer("tor", "10.0.0.1", 65000))
    h.driver.update(good)
    bad_peer = replace(good.bgp.peers[0], password='has"quote')
    bad = replace(good, bgp=replace(good.bgp, peers=(bad_peer,)))
    h.driver.update(bad)
    assert len(h.nodes) == 1 and not h.nodes[0].stopped
    assert "password" in h.driver.status()["errors"][0]
