"""Hypothesis strategies for the policy model, shared by every unit test.

Two worlds:
- the e2e one (`e2e_cluster`): namespaces x, y, z with pods a, b, c
  (labels pod=<name>, namespaces ns=<name> + kubernetes.io/metadata.name),
  each pod serving TCP and UDP 80/81 with named ports, plus random policies;
- free-form values (`labels`, `label_selectors`, `network_policies`, ...) for
  properties of selectors, parsing and evaluation. Label keys and values come
  from small pools so random selectors actually hit random labels.

`*_to_obj` turn model values back into Kubernetes-shaped dicts, so parse
round trips can be property tested.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import strategies as st

from policy.model import (
    ClusterState,
    ContainerPort,
    IPBlock,
    Labels,
    LabelSelector,
    Namespace,
    NetworkPolicy,
    Operator,
    Peer,
    Pod,
    PodKey,
    PolicyKey,
    PolicyPort,
    PolicyType,
    Protocol,
    Requirement,
    Rule,
)

E2E_NAMESPACES = ("x", "y", "z")
E2E_PODS = ("a", "b", "c")
E2E_PORTS = (80, 81)
METADATA_NAME = "kubernetes.io/metadata.name"

LABEL_KEYS = ("pod", "ns", "app", "tier", "example.com/team", METADATA_NAME)
LABEL_VALUES = ("a", "b", "c", "x", "y", "z", "web", "api", "")
PORT_NAMES = ("serve-80-tcp", "serve-81-tcp", "serve-80-udp", "serve-81-udp", "dns", "http")

label_keys = st.sampled_from(LABEL_KEYS)
label_values = st.sampled_from(LABEL_VALUES)
protocols = st.sampled_from(list(Protocol))
operators = st.sampled_from(list(Operator))


@st.composite
def labels(draw: st.DrawFn, *, max_size: int = 4) -> Labels:
    return Labels(draw(st.dictionaries(label_keys, label_values, max_size=max_size)))


@st.composite
def requirements(draw: st.DrawFn) -> Requirement:
    op = draw(operators)
    values: tuple[str, ...] = ()
    if op in (Operator.IN, Operator.NOT_IN):
        values = tuple(sorted(draw(st.sets(label_values, min_size=1, max_size=3))))
    return Requirement(key=draw(label_keys), operator=op, values=values)


@st.composite
def label_selectors(draw: st.DrawFn, *, max_labels: int = 2, max_exprs: int = 2) -> LabelSelector:
    return LabelSelector(
        match_labels=draw(labels(max_size=max_labels)),
        match_expressions=tuple(draw(st.lists(requirements(), max_size=max_exprs))),
    )


def optional_selectors() -> st.SearchStrategy[LabelSelector | None]:
    return st.none() | label_selectors()


ipv4_cidrs = st.builds(
    lambda a, b, plen: str(ipaddress.ip_network(f"10.{a}.{b}.0/{plen}", strict=False)),
    st.sampled_from([0, 244, 96]),
    st.integers(0, 255),
    st.integers(8, 32),
)


@st.composite
def ip_blocks(draw: st.DrawFn) -> IPBlock:
    """An ipBlock with excepts that are strict subsets (as validation demands)."""
    net = ipaddress.ip_network(draw(ipv4_cidrs))
    excepts: list[str] = []
    if net.prefixlen < 32:
        for _ in range(draw(st.integers(0, 2))):
            plen = draw(st.integers(net.prefixlen + 1, 32))
            subnets = 2 ** (plen - net.prefixlen)
            idx = draw(st.integers(0, subnets - 1))
            sub = ipaddress.ip_network((int(net.network_address) + idx * 2 ** (32 - plen), plen))
            excepts.append(str(sub))
    return IPBlock(cidr=str(net), except_=tuple(excepts))


@st.composite
def peers(draw: st.DrawFn) -> Peer:
    kind = draw(st.sampled_from(["pod", "ns", "both", "block"]))
    if kind == "block":
        return Peer(ip_block=draw(ip_blocks()))
    pod_sel = draw(label_selectors()) if kind in ("pod", "both") else None
    ns_sel = draw(label_selectors()) if kind in ("ns", "both") else None
    return Peer(pod_selector=pod_sel, namespace_selector=ns_sel)


@st.composite
def policy_ports(draw: st.DrawFn) -> PolicyPort:
    proto = draw(protocols)
    kind = draw(st.sampled_from(["any", "number", "range", "name"]))
    if kind == "any":
        return PolicyPort(protocol=proto)
    if kind == "name":
        return PolicyPort(protocol=proto, port=draw(st.sampled_from(PORT_NAMES)))
    port = draw(st.sampled_from([79, 80, 81, 82, 443, 1, 65535]))
    if kind == "range":
        return PolicyPort(protocol=proto, port=port, end_port=draw(st.integers(port, 65535)))
    return PolicyPort(protocol=proto, port=port)


@st.composite
def rules(draw: st.DrawFn) -> Rule:
    return Rule(
        peers=tuple(draw(st.lists(peers(), max_size=2))),
        ports=tuple(draw(st.lists(policy_ports(), max_size=2))),
    )


_names = st.builds(
    lambda word, n: f"{word}-{n}",
    st.sampled_from(["allow", "deny", "web", "np"]),
    st.integers(0, 99),
)


@st.composite
def network_policies(
    draw: st.DrawFn,
    *,
    namespaces: tuple[str, ...] = E2E_NAMESPACES,
    names: st.SearchStrategy[str] | None = None,
) -> NetworkPolicy:
    types = draw(st.sets(st.sampled_from(list(PolicyType)), min_size=1))
    ingress = tuple(draw(st.lists(rules(), max_size=2)))
    egress = tuple(draw(st.lists(rules(), max_size=2)))
    return NetworkPolicy(
        namespace=draw(st.sampled_from(namespaces)),
        name=draw(names if names is not None else _names),
        pod_selector=draw(label_selectors()),
        policy_types=frozenset(types),
        ingress=ingress,
        egress=egress,
    )


def e2e_ports() -> tuple[ContainerPort, ...]:
    return tuple(
        ContainerPort(port=port, protocol=proto, name=f"serve-{port}-{proto.value.lower()}")
        for port in E2E_PORTS
        for proto in (Protocol.TCP, Protocol.UDP)
    )


def e2e_namespace(name: str, extra: Labels | None = None) -> Namespace:
    return Namespace(name=name, labels=Labels({**(extra or {}), "ns": name, METADATA_NAME: name}))


def e2e_pod(namespace: str, name: str, *, index: int, extra: Labels | None = None) -> Pod:
    return Pod(
        namespace=namespace,
        name=name,
        labels=Labels({**(extra or {}), "pod": name}),
        node=f"node-{index % 2 + 1}",
        ip=f"10.244.{index % 2 + 1}.{index + 2}",
        ports=e2e_ports(),
    )


def e2e_state(policies: list[NetworkPolicy] | tuple[NetworkPolicy, ...] = ()) -> ClusterState:
    """The fixed x/y/z a/b/c world, with `policies`."""
    nss = {n: e2e_namespace(n) for n in E2E_NAMESPACES}
    pods: dict[PodKey, Pod] = {}
    for i, (ns, name) in enumerate((ns, p) for ns in E2E_NAMESPACES for p in E2E_PODS):
        pod = e2e_pod(ns, name, index=i)
        pods[pod.key] = pod
    return ClusterState(namespaces=nss, pods=pods, policies=_by_key(policies))


def _by_key(
    policies: list[NetworkPolicy] | tuple[NetworkPolicy, ...],
) -> dict[PolicyKey, NetworkPolicy]:
    return {p.key: p for p in policies}


@st.composite
def e2e_cluster(draw: st.DrawFn, *, max_policies: int = 3) -> ClusterState:
    """The e2e world with random extra labels and random policies; sometimes
    a hostNetwork pod or a pod without an IP."""
    nss = {n: e2e_namespace(n, draw(labels(max_size=1))) for n in E2E_NAMESPACES}
    pods: dict[PodKey, Pod] = {}
    for i, (ns, name) in enumerate((ns, p) for ns in E2E_NAMESPACES for p in E2E_PODS):
        pod = e2e_pod(ns, name, index=i, extra=draw(labels(max_size=1)))
        pods[pod.key] = pod
    if draw(st.booleans()):
        hn = Pod(
            namespace="x",
            name="hostnet",
            labels=Labels({"pod": "a"}),
            node="node-1",
            ip="192.168.0.1",
            ports=e2e_ports(),
            host_network=True,
        )
        pods[hn.key] = hn
    if draw(st.booleans()):
        pending = Pod(namespace="y", name="pending", labels=Labels({"pod": "b"}))
        pods[pending.key] = pending
    policies = draw(st.lists(network_policies(), max_size=max_policies, unique_by=lambda p: p.key))
    return ClusterState(namespaces=nss, pods=pods, policies=_by_key(policies))


# --------------------------------------------------------------------------
# Model -> Kubernetes-shaped dicts


def selector_to_obj(sel: LabelSelector) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if sel.match_labels:
        out["matchLabels"] = dict(sel.match_labels)
    if sel.match_expressions:
        out["matchExpressions"] = [
            {
                "key": r.key,
                "operator": r.operator.value,
                **({"values": list(r.values)} if r.values else {}),
            }
            for r in sel.match_expressions
        ]
    return out


def _peer_to_obj(peer: Peer) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if peer.pod_selector is not None:
        out["podSelector"] = selector_to_obj(peer.pod_selector)
    if peer.namespace_selector is not None:
        out["namespaceSelector"] = selector_to_obj(peer.namespace_selector)
    if peer.ip_block is not None:
        out["ipBlock"] = {"cidr": peer.ip_block.cidr}
        if peer.ip_block.except_:
            out["ipBlock"]["except"] = list(peer.ip_block.except_)
    return out


def _port_to_obj(pp: PolicyPort) -> dict[str, Any]:
    out: dict[str, Any] = {"protocol": pp.protocol.value}
    if pp.port is not None:
        out["port"] = pp.port
    if pp.end_port is not None:
        out["endPort"] = pp.end_port
    return out


def _rule_to_obj(rule: Rule, peers_field: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if rule.peers:
        out[peers_field] = [_peer_to_obj(p) for p in rule.peers]
    if rule.ports:
        out["ports"] = [_port_to_obj(p) for p in rule.ports]
    return out


def network_policy_to_obj(np: NetworkPolicy) -> dict[str, Any]:
    order = [t for t in (PolicyType.INGRESS, PolicyType.EGRESS) if t in np.policy_types]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": np.name, "namespace": np.namespace},
        "spec": {
            "podSelector": selector_to_obj(np.pod_selector),
            "policyTypes": [t.value for t in order],
            "ingress": [_rule_to_obj(r, "from") for r in np.ingress],
            "egress": [_rule_to_obj(r, "to") for r in np.egress],
        },
    }


def pod_to_obj(pod: Pod) -> dict[str, Any]:
    ports = [
        {
            "containerPort": cp.port,
            "protocol": cp.protocol.value,
            **({"name": cp.name} if cp.name else {}),
        }
        for cp in pod.ports
    ]
    obj: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod.name, "namespace": pod.namespace, "labels": dict(pod.labels)},
        "spec": {
            "hostNetwork": pod.host_network,
            "containers": [{"name": "main", "image": "agnhost", "ports": ports}],
        },
        "status": {},
    }
    if pod.node is not None:
        obj["spec"]["nodeName"] = pod.node
    if pod.ip is not None:
        obj["status"] = {"podIP": pod.ip, "podIPs": [{"ip": pod.ip}]}
    return obj


def namespace_to_obj(ns: Namespace) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": ns.name, "labels": dict(ns.labels)},
    }


def cluster_to_objs(state: ClusterState) -> list[dict[str, Any]]:
    return (
        [namespace_to_obj(n) for n in state.namespaces.values()]
        + [pod_to_obj(p) for p in state.pods.values()]
        + [network_policy_to_obj(p) for p in state.policies.values()]
    )
