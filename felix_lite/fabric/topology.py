"""A multi-node pure-L3 lab in network namespaces: ToR router, nodes, pods via the real CNI.

Two shapes:
- `FabricMode.TOR`: a ToR namespace `<p>t` runs a real router (BIRD, FRR or
  GoBGP); node k (`<p>n<k>`) has `eth0` 10.10.k.2/24 on a veth whose other end
  `n<k>` (10.10.k.1) is in the ToR. Peering: eBGP with an AS per node
  (ToR 65000, node k 65000+k) or one AS per rack (65100) with the ToR as
  route reflector.
- `FabricMode.MESH`: no router. A "switch" namespace `<p>s` holds a Linux
  bridge; node k has 10.10.0.(10+k)/24 on it and iBGP (AS 64512) to every
  other node (the lower index listens passively, the higher one connects).

Each node runs what a real node runs for routing: a `NodeRouting` (in this
process, talking netlink into the node namespace) and a real ExaBGP process
inside the node namespace whose API process is felix-lite's bridge. Pods are
made by running `felix-lite-cni ADD` under `ip netns exec <node>` with
CNI_NETNS pointing at a fresh pod namespace, exactly as a runtime does; one
server process serves TCP+UDP 80/81 in every pod (felix_lite.netlab.servers).

Safety: every namespace starts with the caller's prefix, both ends of every
veth are born inside namespaces, processes are stopped by PID, and teardown
(idempotent, also at interpreter exit through netlab's Topology hooks) removes
everything made here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import TracebackType

from felix_lite.bgp.config import BgpPeer, BgpSettings
from felix_lite.bgp.process import ExabgpProcess, write_files
from felix_lite.fabric.node import NodeRouting
from felix_lite.fabric.routers import (
    BirdRouter,
    FrrRouter,
    GobgpRouter,
    RouterKind,
    StaticRoute,
    TorConfig,
    TorPeer,
    make_router,
)
from felix_lite.netlab.nsutil import MAX_NETNS_NAME, write_sysctls
from felix_lite.netlab.probe import Endpoint
from felix_lite.netlab.runtime import PluginFailed, network_config, run_plugin
from felix_lite.netlab.servers import ServerProcess, ServeSpec
from felix_lite.netlab.topology import Topology
from felix_lite.waiting import wait_until

log = logging.getLogger(__name__)

POD_CIDR = "10.244.0.0/16"
TOR_ASN = 65000
RACK_ASN = 65100
MESH_ASN = 64512
CNI_NETWORK = "fl-fabric"

_SYSCTLS = {
    "net.ipv4.ip_forward": "1",
    "net.ipv4.conf.all.rp_filter": "0",
    "net.ipv4.conf.default.rp_filter": "0",
}


class FabricMode(Enum):
    TOR = "tor"
    MESH = "mesh"


class Peering(Enum):
    AS_PER_NODE = "as-per-node"
    AS_PER_RACK = "as-per-rack"
    """iBGP to the ToR as route reflector (one AS for the rack)."""


class FabricError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class FabricNode:
    name: str
    index: int
    netns: str
    address: str
    asn: int
    node_block: str
    workdir: Path

    @property
    def socket_path(self) -> str:
        return str(self.workdir / "bgp.sock")

    @property
    def ipam_dir(self) -> Path:
        return self.workdir / "ipam"


@dataclass(frozen=True, slots=True)
class FabricPod:
    namespace: str
    name: str
    node: str
    netns: str
    ip: str
    host_ifname: str
    container_id: str

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(name=self.key, netns=self.netns, ip=self.ip)


@dataclass(frozen=True, slots=True)
class FabricSpec:
    """What to build. `passwords` maps a node index to the MD5 password the node
    uses; `tor_passwords` the one the ToR expects (differ: no session)."""

    nodes: int = 2
    mode: FabricMode = FabricMode.TOR
    router: RouterKind = RouterKind.BIRD
    peering: Peering = Peering.AS_PER_NODE
    passwords: dict[int, str] = field(default_factory=dict)
    tor_passwords: dict[int, str] = field(default_factory=dict)
    tor_static: tuple[StaticRoute, ...] = ()
    aggregate: bool = False
    hold_time: int = 30
    graceful_restart: int = 60
    servers: bool = True
    settle: float = 3.0
    sync_timeout: float = 30.0
    manage_pod_routes: bool = True
    """False: the agents only export pods (the benchmark's fake pods have no veth)."""
    node_blocks: dict[int, str] = field(default_factory=dict)
    """Override node k's block (default 10.244.k.0/24)."""
    expect_down: tuple[int, ...] = ()
    """Node indexes whose sessions are expected not to come up (wrong MD5)."""


def _cni_container_id(namespace: str, name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"{namespace}_{name}")


class FabricLab:
    """Builds and owns one fabric; use as a context manager."""

    def __init__(
        self,
        prefix: str,
        workdir: Path,
        spec: FabricSpec,
        *,
        cni: Iterable[str] = ("felix-lite-cni",),
    ) -> None:
        if len(prefix) + 4 > MAX_NETNS_NAME:
            raise ValueError(f"fabric prefix {prefix!r}: longer than {MAX_NETNS_NAME - 4}")
        self.prefix = prefix
        self.workdir = workdir.resolve()
        self.spec = spec
        self._cni_argv = list(cni)
        self.topo = Topology(prefix)  # namespaces + PIDs, cleaned up on every exit path
        self.nodes: dict[str, FabricNode] = {}
        self.settings: dict[str, BgpSettings] = {}
        self.agents: dict[str, NodeRouting] = {}
        self.exabgp: dict[str, ExabgpProcess] = {}
        self.pods: dict[str, FabricPod] = {}
        self.router: BirdRouter | FrrRouter | GobgpRouter | None = None
        self.servers: ServerProcess | None = None
        self.tor_netns = f"{prefix}t"
        self._pod_seq = 0

    # --- lifecycle -------------------------------------------------------
    def __enter__(self) -> FabricLab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.teardown()

    def teardown(self) -> None:
        """Agents, ExaBGP, router, servers (by PID), then every namespace. Never raises."""
        for agent in self.agents.values():
            with contextlib.suppress(Exception):
                agent.stop()
        for proc in self.exabgp.values():
            with contextlib.suppress(Exception):
                proc.stop(timeout=3)
        if self.router is not None:
            with contextlib.suppress(Exception):
                self.router.stop()
        if self.servers is not None:
            with contextlib.suppress(Exception):
                self.servers.stop()
        self.topo.teardown()

    def _ns(self, names: list[str]) -> None:
        self.topo._new_netns(names)
        for n in names:
            write_sysctls(n, _SYSCTLS)
            _ip(n, "link set lo up\n")

    def build(self, *, wait: float = 60.0) -> FabricLab:
        s = self.spec
        self.workdir.mkdir(parents=True, exist_ok=True)
        node_ns = [f"{self.prefix}n{i}" for i in range(1, s.nodes + 1)]
        if s.mode is FabricMode.TOR:
            self._ns([self.tor_netns, *node_ns])
        else:
            self._ns([f"{self.prefix}s", *node_ns])
            _ip(
                f"{self.prefix}s",
                "link add br0 type bridge\nlink set br0 up\naddr add 10.10.0.1/24 dev br0\n",
            )
            write_sysctls(f"{self.prefix}s", {"net.ipv4.ip_forward": "0"})
        for i, ns in enumerate(node_ns, start=1):
            self._add_node(i, ns)
        if s.mode is FabricMode.TOR:
            self._start_router()
        for name in self.nodes:
            self._start_agent(name)
            self.start_exabgp(name)
        if s.servers:
            self.servers = ServerProcess(on_pid=self.topo.register_pid)
            self.servers.start()
        self.wait_established(timeout=wait)
        return self

    def _add_node(self, i: int, ns: str) -> None:
        s = self.spec
        if s.mode is FabricMode.TOR:
            addr, gw, peer_if = f"10.10.{i}.2", f"10.10.{i}.1", f"n{i}"
            _ip(
                self.tor_netns,
                f"link add {peer_if} type veth peer name eth0 netns {ns}\n"
                f"addr add {gw}/24 dev {peer_if}\nlink set {peer_if} up\n",
            )
        else:
            addr, gw, peer_if = f"10.10.0.{10 + i}", "10.10.0.1", f"n{i}"
            sw = f"{self.prefix}s"
            _ip(
                sw,
                f"link add {peer_if} type veth peer name eth0 netns {ns}\n"
                f"link set {peer_if} master br0\nlink set {peer_if} up\n",
            )
        # the default route is what lets proxy ARP answer pods for 169.254.1.1 (LAB-NOTES)
        _ip(ns, f"addr add {addr}/24 dev eth0\nlink set eth0 up\nroute add default via {gw}\n")
        asn = {
            (FabricMode.TOR, Peering.AS_PER_NODE): TOR_ASN + i,
            (FabricMode.TOR, Peering.AS_PER_RACK): RACK_ASN,
        }.get((s.mode, s.peering), MESH_ASN)
        node = FabricNode(
            name=f"node-{i}",
            index=i,
            netns=ns,
            address=addr,
            asn=asn,
            node_block=s.node_blocks.get(i, f"10.244.{i}.0/24"),
            workdir=self.workdir / f"node-{i}",
        )
        node.workdir.mkdir(parents=True, exist_ok=True)
        self.nodes[node.name] = node

    def _peers_of(self, node: FabricNode) -> tuple[BgpPeer, ...]:
        s = self.spec
        pw = s.passwords.get(node.index)
        if s.mode is FabricMode.TOR:
            tor_asn = RACK_ASN if s.peering is Peering.AS_PER_RACK else TOR_ASN
            return (
                BgpPeer(
                    address=f"10.10.{node.index}.1",
                    asn=tor_asn,
                    password=pw,
                    hold_time=s.hold_time,
                    graceful_restart=s.graceful_restart,
                ),
            )
        return tuple(
            BgpPeer(
                address=other.address,
                asn=other.asn,
                password=pw,
                passive=other.index > node.index,
                hold_time=s.hold_time,
                graceful_restart=s.graceful_restart,
            )
            for other in self.nodes.values()
            if other.index != node.index
        )

    def node_settings(self, name: str) -> BgpSettings:
        node = self.nodes[name]
        return BgpSettings(
            node_name=node.name,
            router_id=node.address,
            local_asn=node.asn,
            local_address=node.address,
            peers=self._peers_of(node),
            pod_cidrs=(POD_CIDR,),
            node_block=node.node_block,
            aggregate=self.spec.aggregate,
            listen=self.spec.mode is FabricMode.MESH,
            # root: the bridge must reach a socket under a 0700 test directory (docs/bgp.md)
            env={"exabgp.daemon.user": "root"},
        )

    def tor_config(self) -> TorConfig:
        s = self.spec
        rack = s.peering is Peering.AS_PER_RACK
        return TorConfig(
            router_id="10.10.0.254",
            asn=RACK_ASN if rack else TOR_ASN,
            peers=tuple(
                TorPeer(
                    name=f"n{n.index}",
                    address=n.address,
                    asn=n.asn,
                    local_address=f"10.10.{n.index}.1",
                    password=s.tor_passwords.get(n.index),
                    rr_client=rack,
                )
                for n in self.nodes.values()
            ),
            hold_time=s.hold_time,
            graceful_restart=s.graceful_restart,
            static=s.tor_static,
        )

    def _start_router(self) -> None:
        self.router = make_router(
            self.spec.router,
            netns=self.tor_netns,
            config=self.tor_config(),
            workdir=self.workdir / "tor",
            on_pid=self.topo.register_pid,
        )
        self.router.start()

    def _start_agent(self, name: str) -> NodeRouting:
        node = self.nodes[name]
        settings = self.settings.get(name) or self.node_settings(name)
        self.settings[name] = settings
        agent = NodeRouting(
            settings,
            node.socket_path,
            netns=node.netns,
            settle=self.spec.settle,
            sync_timeout=self.spec.sync_timeout,
            manage_pod_routes=self.spec.manage_pod_routes,
        )
        agent.start()
        agent.set_local_pods(self.local_pods(name))
        self.agents[name] = agent
        return agent

    def restart_agent(self, name: str) -> NodeRouting:
        """Stop the node's NodeRouting and start a fresh one with no memory."""
        self.agents.pop(name).stop()
        return self._start_agent(name)

    def start_exabgp(self, name: str) -> ExabgpProcess:
        node = self.nodes[name]
        old = self.exabgp.get(name)
        if old is not None and old.running():
            raise FabricError(f"node {name}: exabgp already running pid={old.pid}")
        files = write_files(
            self.settings[name], node.workdir / "exabgp", socket_path=node.socket_path
        )
        proc = ExabgpProcess(files, netns=node.netns)
        proc.start()
        assert proc.pid is not None
        self.topo.register_pid(proc.pid)
        self.exabgp[name] = proc
        return proc

    def kill_exabgp(self, name: str) -> None:
        """SIGKILL the node's ExaBGP (no NOTIFICATION: peers keep routes as stale)."""
        proc = self.exabgp[name]
        pid = proc.pid
        proc.kill()
        if pid is not None:
            self.topo.unregister_pid(pid)

    def set_settings(self, name: str, settings: BgpSettings) -> None:
        """Change a node's BGP settings (takes effect on the next agent/ExaBGP start)."""
        self.settings[name] = settings

    # --- waiting ------------------------------------------------------------
    def sessions_up(self, nodes: Iterable[str] | None = None) -> dict[str, bool]:
        """Per node: are its sessions up (in the mesh, only those to `nodes`)?"""
        want = set(nodes) if nodes is not None else set(self.nodes)
        among = {self.nodes[n].address for n in want}
        out = {}
        for name in want:
            peers = self.agents[name].status().peers
            out[name] = all(
                p.state == "up"
                for p in peers
                if self.spec.mode is FabricMode.TOR or p.address in among
            )
        return out

    def wait_established(
        self, *, timeout: float = 60.0, nodes: Iterable[str] | None = None
    ) -> None:
        want = (
            list(nodes)
            if nodes is not None
            else [n.name for n in self.nodes.values() if n.index not in self.spec.expect_down]
        )
        wait_until(
            lambda: all(self.sessions_up(want).values()), timeout, "BGP sessions established"
        )

    # --- pods ---------------------------------------------------------------
    def local_pods(self, node: str) -> dict[str, str]:
        return {p.ip: p.host_ifname for p in self.pods.values() if p.node == node}

    def _cni(
        self, node: FabricNode, command: str, pod_ns: str, cid: str, namespace: str, name: str
    ) -> dict[str, object]:
        conf = network_config(CNI_NETWORK, node.node_block, str(node.ipam_dir))
        try:
            return run_plugin(
                self._cni_argv,
                node.netns,
                command,
                conf,
                container_id=cid,
                pod_netns=pod_ns,
                namespace=namespace,
                name=name,
            )
        except PluginFailed as e:
            raise FabricError(f"cni {command} {namespace}/{name} on {node.name}: {e}") from e

    def add_pod(
        self, node: str, namespace: str, name: str, *, update_agent: bool = True
    ) -> FabricPod:
        """Pod namespace + CNI ADD on the node + server; the agent exports it."""
        key = f"{namespace}/{name}"
        if key in self.pods:
            raise FabricError(f"pod {key}: already exists")
        n = self.nodes[node]
        self._pod_seq += 1
        pod_ns = f"{self.prefix}p{self._pod_seq}"
        self._ns([pod_ns])
        cid = _cni_container_id(namespace, name)
        result = self._cni(n, "ADD", pod_ns, cid, namespace, name)
        ips = result.get("ips")
        ifaces = result.get("interfaces")
        if not isinstance(ips, list) or not ips or not isinstance(ifaces, list):
            raise FabricError(f"cni ADD {key}: result without ips/interfaces: {result}")
        ip = str(ips[0]["address"]).split("/")[0]
        host_if = str(ifaces[0]["name"])
        pod = FabricPod(namespace, name, node, pod_ns, ip, host_if, cid)
        self.pods[key] = pod
        if self.servers is not None:
            self.servers.add(ServeSpec(key=key, netns=pod_ns))
        if update_agent:
            self.agents[node].set_local_pods(self.local_pods(node))
        return pod

    def delete_pod(self, key: str, *, update_agent: bool = True) -> FabricPod:
        """CNI DEL, namespace gone, the agent withdraws it."""
        pod = self.pods.pop(key)
        n = self.nodes[pod.node]
        if self.servers is not None:
            with contextlib.suppress(Exception):
                self.servers.remove(key)
        self._cni(n, "DEL", pod.netns, pod.container_id, pod.namespace, pod.name)
        with contextlib.suppress(Exception):
            subprocess.run(["ip", "netns", "delete", pod.netns], check=False, capture_output=True)
        with contextlib.suppress(ValueError):
            self.topo._netns.remove(pod.netns)
        if update_agent:
            self.agents[pod.node].set_local_pods(self.local_pods(pod.node))
        return pod

    # --- observing ------------------------------------------------------------
    def node_endpoint(self, name: str) -> Endpoint:
        n = self.nodes[name]
        return Endpoint(name=name, netns=n.netns, ip=n.address)

    def learned_in_kernel(self, name: str) -> dict[str, str]:
        """prefix -> next hop of proto-202 routes in the node's kernel."""
        return kernel_routes(self.nodes[name].netns, proto=202)


def _ip(netns: str, batch: str) -> None:
    r = subprocess.run(
        ["ip", "-n", netns, "-batch", "-"],
        input=batch,
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        raise FabricError(f"ip -n {netns} -batch: {r.stderr.strip()}")


def kernel_routes(netns: str, *, proto: int | str | None = None) -> dict[str, str]:
    """prefix -> next hop ('' for device or blackhole routes) in netns' main table."""
    argv = ["ip", "-n", netns, "-4", "-j", "route", "show", "table", "main"]
    if proto is not None:
        argv += ["proto", str(proto)]
    r = subprocess.run(argv, capture_output=True, text=True, check=True)
    out: dict[str, str] = {}
    for route in json.loads(r.stdout or "[]"):
        dst = route.get("dst", "")
        if dst == "default":
            continue
        out[dst if "/" in dst else dst + "/32"] = route.get("gateway", "")
    return out


__all__ = [
    "FabricError",
    "FabricLab",
    "FabricMode",
    "FabricNode",
    "FabricPod",
    "FabricSpec",
    "Peering",
    "kernel_routes",
    "wait_until",
]
