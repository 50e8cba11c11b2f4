"""Node, pod and outside-host namespaces wired the way felix-lite's dataplane expects.

The wiring is the contract of docs/policy-dataplane.md: the pod has `eth0`
with its /32 and a default route via 169.254.1.1 onlink; the node has the
host-side veth `names.pod_interface(ns, pod)` (up, no address, proxy ARP,
proxy_delay 0) and a /32 route to the pod through it. The node also gets an
uplink veth to an "outside" namespace with a default route through it,
because proxy ARP only answers for 169.254.1.1 when the node has a route to
it through another interface (LAB-NOTES). The outside namespace doubles as a
host outside the cluster (its address lives on its loopback).

rp_filter is set to 0 explicitly everywhere (namespaces inherit the root
namespace's default): source validation of pod traffic is the policy
dataplane's job (anti-spoof rule), and the tests measure that, not the
kernel's reverse-path filter.

Everything is created with `ip -batch` (a few ms per call) and sysctls are
written from a thread inside each namespace, so nine pods take well under a
second. Every veth is born inside namespaces; nothing touches the root
namespace. Teardown kills registered processes by PID and deletes the
namespaces; it is idempotent and also runs at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import logging
import signal
import threading
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import FrameType, TracebackType

from felix_lite.netlab.nsutil import (
    MAX_NETNS_NAME,
    CommandRunner,
    NetnsError,
    delete_netns,
    netns_exists,
    run_command,
    write_sysctls,
)
from felix_lite.procs import kill_pid
from policy.names import pod_interface

log = logging.getLogger(__name__)

POD_GATEWAY = "169.254.1.1"
DEFAULT_OUTSIDE_IP = "198.51.100.10"
NODE_UPLINK_IFACE = "eth0"
POD_IFACE = "eth0"

_BASE_SYSCTLS = {
    "net.ipv4.ip_forward": "1",
    "net.ipv4.conf.all.rp_filter": "0",
    "net.ipv4.conf.default.rp_filter": "0",
}


@dataclass(frozen=True)
class PodSpec:
    """A pod to wire: its Kubernetes identity and IP."""

    namespace: str
    name: str
    ip: str


@dataclass(frozen=True)
class PodHandle:
    namespace: str
    name: str
    ip: str
    node: str
    netns: str
    host_iface: str

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class NodeHandle:
    name: str
    netns: str
    uplink_ip: str
    pod_cidr: str | None


@dataclass(frozen=True)
class OutsideHandle:
    netns: str
    ip: str


_live: weakref.WeakSet[Topology] = weakref.WeakSet()
_atexit_done = False
_prev_sigterm: object = None


def _teardown_all() -> None:
    for topo in list(_live):
        topo.teardown()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Turn SIGTERM into SystemExit so context managers, finalizers and atexit run.
    raise SystemExit(128 + signum)


def _install_cleanup_hooks() -> None:
    global _atexit_done
    if _atexit_done:
        return
    _atexit_done = True
    atexit.register(_teardown_all)
    if threading.current_thread() is threading.main_thread():
        with contextlib.suppress(ValueError, OSError):
            if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
                signal.signal(signal.SIGTERM, _on_sigterm)


class Topology:
    """Owns a set of namespaces (named `<prefix>...`) and the processes in them.

    Use as a context manager; `teardown()` is idempotent and also registered
    with atexit. `prefix` must be short: derived names add up to 4 characters
    and must stay within 15.
    """

    def __init__(
        self,
        prefix: str,
        *,
        outside_ip: str = DEFAULT_OUTSIDE_IP,
        runner: CommandRunner = run_command,
    ) -> None:
        if len(prefix) + 4 > MAX_NETNS_NAME:
            raise ValueError(f"topology prefix {prefix!r}: longer than {MAX_NETNS_NAME - 4}")
        self.prefix = prefix
        self._run = runner
        self._outside_ip = outside_ip
        self._netns: list[str] = []
        self._pids: list[int] = []
        self.outside: OutsideHandle | None = None
        self.nodes: dict[str, NodeHandle] = {}
        self.pods: dict[str, PodHandle] = {}
        self._pod_seq = 0
        self._closed = False
        _install_cleanup_hooks()
        _live.add(self)

    # -- lifecycle -----------------------------------------------------------------

    def __enter__(self) -> Topology:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.teardown()

    def register_pid(self, pid: int) -> None:
        """A process to kill (by PID) at teardown, before the namespaces go."""
        self._pids.append(pid)

    def unregister_pid(self, pid: int) -> None:
        with contextlib.suppress(ValueError):
            self._pids.remove(pid)

    def teardown(self) -> None:
        """Kill registered processes, delete every namespace made here. Never raises."""
        if self._closed:
            return
        self._closed = True
        for pid in reversed(self._pids):
            kill_pid(pid, timeout=1.0)
        self._pids.clear()
        failures = delete_netns(reversed(self._netns), runner=self._run)
        if failures:
            log.error("topology.teardown.failed prefix=%s failures=%s", self.prefix, failures)
        else:
            log.info("topology.teardown prefix=%s netns=%d", self.prefix, len(self._netns))
        self._netns.clear()
        _live.discard(self)

    @property
    def namespaces(self) -> tuple[str, ...]:
        return tuple(self._netns)

    # -- building ------------------------------------------------------------------

    def _new_netns(self, names: Sequence[str]) -> None:
        for n in names:
            if len(n) > MAX_NETNS_NAME:
                raise ValueError(f"netns {n}: name longer than {MAX_NETNS_NAME}")
            if netns_exists(n):
                raise NetnsError(f"netns {n}: already exists (stale run? delete it first)")
        # Registered before creation so a half-made batch is still cleaned up.
        self._netns.extend(names)
        self._run(["ip", "-batch", "-"], stdin="".join(f"netns add {n}\n" for n in names))

    def add_outside(self) -> OutsideHandle:
        """The host outside the cluster; nodes' uplinks plug into it."""
        if self.outside is not None:
            return self.outside
        ns = f"{self.prefix}o"
        self._new_netns([ns])
        write_sysctls(ns, _BASE_SYSCTLS)
        self._run(
            ["ip", "-n", ns, "-batch", "-"],
            stdin=f"link set lo up\naddr add {self._outside_ip}/32 dev lo\n",
        )
        self.outside = OutsideHandle(netns=ns, ip=self._outside_ip)
        return self.outside

    def add_node(self, name: str, *, pod_cidr: str | None = None) -> NodeHandle:
        """A node namespace with an uplink to the outside namespace (made if needed).

        Node k gets 172.31.k.1/24 on its uplink, the outside side 172.31.k.254;
        the outside routes `pod_cidr` back to the node.
        """
        if name in self.nodes:
            raise ValueError(f"node {name}: already exists")
        outside = self.add_outside()
        idx = len(self.nodes) + 1
        if idx > 250:
            raise ValueError("topology: too many nodes")
        ns = f"{self.prefix}n{idx}"
        node_ip, out_ip = f"172.31.{idx}.1", f"172.31.{idx}.254"
        out_if = f"up{idx}"
        self._new_netns([ns])
        write_sysctls(ns, _BASE_SYSCTLS)
        self._run(
            ["ip", "-n", outside.netns, "-batch", "-"],
            stdin=(
                f"link add {out_if} type veth peer name {NODE_UPLINK_IFACE} netns {ns}\n"
                f"addr add {out_ip}/24 dev {out_if}\n"
                f"link set {out_if} up\n"
                + (f"route add {pod_cidr} via {node_ip} dev {out_if}\n" if pod_cidr else "")
            ),
        )
        self._run(
            ["ip", "-n", ns, "-batch", "-"],
            stdin=(
                "link set lo up\n"
                f"addr add {node_ip}/24 dev {NODE_UPLINK_IFACE}\n"
                f"link set {NODE_UPLINK_IFACE} up\n"
                f"route add default via {out_ip} dev {NODE_UPLINK_IFACE}\n"
            ),
        )
        node = NodeHandle(name=name, netns=ns, uplink_ip=node_ip, pod_cidr=pod_cidr)
        self.nodes[name] = node
        log.info("topology.node.added node=%s netns=%s uplink=%s", name, ns, node_ip)
        return node

    def add_pods(self, node: str, pods: Iterable[PodSpec]) -> list[PodHandle]:
        """Wire pods on `node` in a few batched calls."""
        nh = self.nodes[node]
        specs = list(pods)
        handles: list[PodHandle] = []
        for spec in specs:
            key = f"{spec.namespace}/{spec.name}"
            if key in self.pods:
                raise ValueError(f"pod {key}: already exists")
            ipaddress.IPv4Address(spec.ip)
            self._pod_seq += 1
            handles.append(
                PodHandle(
                    namespace=spec.namespace,
                    name=spec.name,
                    ip=spec.ip,
                    node=node,
                    netns=f"{self.prefix}p{self._pod_seq}",
                    host_iface=pod_interface(spec.namespace, spec.name),
                )
            )
        if not handles:
            return []
        self._new_netns([h.netns for h in handles])
        node_cmds: list[str] = []
        for h in handles:
            node_cmds.append(
                f"link add {h.host_iface} type veth peer name {POD_IFACE} netns {h.netns}\n"
            )
        self._run(["ip", "-n", nh.netns, "-batch", "-"], stdin="".join(node_cmds))
        sysctls: dict[str, str] = {}
        for h in handles:
            sysctls[f"net.ipv4.conf.{h.host_iface}.proxy_arp"] = "1"
            sysctls[f"net.ipv4.neigh.{h.host_iface}.proxy_delay"] = "0"
            sysctls[f"net.ipv4.conf.{h.host_iface}.rp_filter"] = "0"
        write_sysctls(nh.netns, sysctls)
        self._run(
            ["ip", "-n", nh.netns, "-batch", "-"],
            stdin="".join(
                f"link set {h.host_iface} up\nroute add {h.ip}/32 dev {h.host_iface} scope link\n"
                for h in handles
            ),
        )
        for h in handles:
            write_sysctls(h.netns, _BASE_SYSCTLS)
            self._run(
                ["ip", "-n", h.netns, "-batch", "-"],
                stdin=(
                    "link set lo up\n"
                    f"addr add {h.ip}/32 dev {POD_IFACE}\n"
                    f"link set {POD_IFACE} up\n"
                    f"route add default via {POD_GATEWAY} dev {POD_IFACE} onlink\n"
                ),
            )
            self.pods[h.key] = h
        log.info("topology.pods.added node=%s count=%d", node, len(handles))
        return handles

    def add_pod(self, node: str, namespace: str, name: str, ip: str) -> PodHandle:
        return self.add_pods(node, [PodSpec(namespace, name, ip)])[0]

    def remove_pod(self, key: str) -> None:
        """Delete a pod's namespace; its veth and the node's route go with it."""
        h = self.pods.pop(key)
        delete_netns([h.netns], runner=self._run)
        with contextlib.suppress(ValueError):
            self._netns.remove(h.netns)

    def add_pod_address(self, key: str, ip: str, *, route_on_node: bool = True) -> None:
        """Give a pod a second address (to send with a source that is not its IP).

        With `route_on_node` the node also routes that address to the pod, so
        replies come back and a spoofed connection can succeed when nothing
        filters it: the anti-spoof rule, not routing, is what must stop it.
        """
        h = self.pods[key]
        self._run(["ip", "-n", h.netns, "addr", "add", f"{ip}/32", "dev", POD_IFACE])
        if route_on_node:
            node = self.nodes[h.node]
            self._run(
                [
                    "ip",
                    "-n",
                    node.netns,
                    "route",
                    "replace",
                    f"{ip}/32",
                    "dev",
                    h.host_iface,
                    "scope",
                    "link",
                ]
            )

    def remove_pod_address(self, key: str, ip: str) -> None:
        """Undo `add_pod_address` (address and the node's route, if any)."""
        h = self.pods[key]
        node = self.nodes[h.node]
        with contextlib.suppress(NetnsError):
            self._run(["ip", "-n", node.netns, "route", "del", f"{ip}/32", "dev", h.host_iface])
        self._run(["ip", "-n", h.netns, "addr", "del", f"{ip}/32", "dev", POD_IFACE])
