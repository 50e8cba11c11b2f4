"""The spec oracle: is a connection allowed by the NetworkPolicies, and why.

Written straight from the Kubernetes NetworkPolicy spec and deliberately
independent of `policy.compiler` (never import it here): tests compare the
compiled dataplane against this, so a shared bug cannot hide.

Interpretation choices, where the spec leaves room:
- A hostNetwork pod is treated like a bare IP: no policy isolates it and no
  selector peer matches it (the dataplane cannot tell it from its node);
  ipBlock peers still match its IP.
- A pod without an IP is never matched by selector peers.
- ipBlock peers match any endpoint's IP, pod or not.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import lru_cache

from policy.model import (
    ClusterState,
    IPBlock,
    Labels,
    NetworkPolicy,
    Peer,
    Pod,
    PodKey,
    PolicyKey,
    PolicyPort,
    PolicyType,
    Protocol,
    Rule,
)
from policy.selectors import describe, matches

_METADATA_NAME_LABEL = "kubernetes.io/metadata.name"


@dataclass(frozen=True)
class Endpoint:
    """One end of a connection: a pod, or a bare IP (outside the cluster)."""

    pod: Pod | None
    ip: str

    def __str__(self) -> str:
        return self.pod.key if self.pod is not None else self.ip


@dataclass(frozen=True)
class RuleRef:
    policy: PolicyKey
    direction: PolicyType
    rule_index: int


@dataclass(frozen=True)
class DirectionVerdict:
    """`isolated` with empty `allowed_by` means denied; not isolated means allowed."""

    allowed: bool
    isolated: bool
    selecting: tuple[PolicyKey, ...]
    allowed_by: tuple[RuleRef, ...]


@dataclass(frozen=True)
class Verdict:
    """Both checks of one connection. The connection fields default so the
    verdict stays constructible from the two directions alone."""

    allowed: bool
    egress: DirectionVerdict
    ingress: DirectionVerdict
    src: Endpoint | None = None
    dst: Endpoint | None = None
    port: int = 0
    protocol: Protocol = Protocol.TCP


class EndpointNotFound(KeyError):
    """An `ns/pod` or IP reference that names nothing known."""

    def __init__(self, ref: str, reason: str) -> None:
        super().__init__(ref)
        self.ref = ref
        self.reason = reason

    def __str__(self) -> str:
        return f"endpoint {self.ref!r}: {self.reason}"


_NOT_APPLICABLE = DirectionVerdict(allowed=True, isolated=False, selecting=(), allowed_by=())


def _policy_subject(pod: Pod | None) -> Pod | None:
    """The pod policies can apply to, or None for host-network/bare-IP ends."""
    if pod is None or pod.host_network:
        return None
    return pod


def endpoint_for(state: ClusterState, ref: str) -> Endpoint:
    """`ns/pod` -> that pod; an IP -> the (non-hostNetwork) pod owning it, if
    any, else a bare IP endpoint. Raises EndpointNotFound otherwise."""
    try:
        ip = str(ipaddress.ip_address(ref))
    except ValueError:
        ip = None
    if ip is not None:
        owners = [
            p
            for p in state.pods.values()
            if p.ip is not None and not p.host_network and _same_ip(p.ip, ip)
        ]
        if len(owners) == 1:
            return Endpoint(pod=owners[0], ip=ip)
        return Endpoint(pod=None, ip=ip)
    ns, sep, name = ref.partition("/")
    if not sep or not ns or not name or "/" in name:
        raise EndpointNotFound(ref, "expected <namespace>/<pod> or an IP address")
    pod = state.pods.get(PodKey(ref))
    if pod is None:
        raise EndpointNotFound(ref, "no such pod")
    return Endpoint(pod=pod, ip=pod.ip or "")


def _same_ip(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


def _namespace_labels(state: ClusterState, namespace: str) -> Labels:
    ns = state.namespaces.get(namespace)
    if ns is not None:
        return ns.labels
    return Labels({_METADATA_NAME_LABEL: namespace})


@lru_cache(maxsize=4096)
def _network(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(cidr, strict=False)


def _in_ip_block(block: IPBlock, ip: str) -> bool:
    if not ip:
        return False
    try:
        addr = ipaddress.ip_address(ip)
        net = _network(block.cidr)
    except ValueError:
        return False
    if addr.version != net.version or addr not in net:
        return False
    for exc in block.except_:
        enet = _network(exc)
        if addr.version == enet.version and addr in enet:
            return False
    return True


def _peer_matches(state: ClusterState, policy: NetworkPolicy, peer: Peer, other: Endpoint) -> bool:
    if peer.ip_block is not None:
        return _in_ip_block(peer.ip_block, other.ip)
    pod = _policy_subject(other.pod)
    if pod is None or not pod.ip:
        return False
    if peer.namespace_selector is None:
        if pod.namespace != policy.namespace:
            return False
    elif not matches(peer.namespace_selector, _namespace_labels(state, pod.namespace)):
        return False
    return peer.pod_selector is None or matches(peer.pod_selector, pod.labels)


def _port_matches(pp: PolicyPort, dst: Endpoint, *, port: int, protocol: Protocol) -> bool:
    if pp.protocol is not protocol:
        return False
    if pp.port is None:
        return True
    if isinstance(pp.port, int):
        if pp.end_port is not None:
            return pp.port <= port <= pp.end_port
        return pp.port == port
    # Named port: resolved against the destination pod's container ports.
    pod = _policy_subject(dst.pod)
    if pod is None:
        return False
    return any(
        cp.name == pp.port and cp.protocol is protocol and cp.port == port for cp in pod.ports
    )


def _rule_matches(
    state: ClusterState,
    policy: NetworkPolicy,
    rule: Rule,
    *,
    peer: Endpoint,
    dst: Endpoint,
    port: int,
    protocol: Protocol,
) -> bool:
    if rule.peers and not any(_peer_matches(state, policy, p, peer) for p in rule.peers):
        return False
    return not rule.ports or any(
        _port_matches(pp, dst, port=port, protocol=protocol) for pp in rule.ports
    )


def selecting_policies(
    state: ClusterState, pod: Pod, direction: PolicyType
) -> tuple[NetworkPolicy, ...]:
    """Policies of the pod's namespace that select it and have `direction`."""
    found = [
        pol
        for pol in state.policies.values()
        if pol.namespace == pod.namespace
        and direction in pol.policy_types
        and matches(pol.pod_selector, pod.labels)
    ]
    return tuple(sorted(found, key=lambda p: p.key))


def _direction(
    state: ClusterState,
    subject: Pod | None,
    *,
    direction: PolicyType,
    peer: Endpoint,
    dst: Endpoint,
    port: int,
    protocol: Protocol,
) -> DirectionVerdict:
    pod = _policy_subject(subject)
    if pod is None:
        return _NOT_APPLICABLE
    policies = selecting_policies(state, pod, direction)
    if not policies:
        return _NOT_APPLICABLE
    allowed_by: list[RuleRef] = []
    for pol in policies:
        rules = pol.ingress if direction is PolicyType.INGRESS else pol.egress
        for i, rule in enumerate(rules):
            if _rule_matches(state, pol, rule, peer=peer, dst=dst, port=port, protocol=protocol):
                allowed_by.append(RuleRef(policy=pol.key, direction=direction, rule_index=i))
    return DirectionVerdict(
        allowed=bool(allowed_by),
        isolated=True,
        selecting=tuple(p.key for p in policies),
        allowed_by=tuple(allowed_by),
    )


def evaluate(
    state: ClusterState, src: Endpoint, dst: Endpoint, *, port: int, protocol: Protocol
) -> Verdict:
    """Whether `src` may open a connection to `dst` on `protocol`/`port`:
    the egress policies of `src` AND the ingress policies of `dst`."""
    egress = _direction(
        state,
        src.pod,
        direction=PolicyType.EGRESS,
        peer=dst,
        dst=dst,
        port=port,
        protocol=protocol,
    )
    ingress = _direction(
        state,
        dst.pod,
        direction=PolicyType.INGRESS,
        peer=src,
        dst=dst,
        port=port,
        protocol=protocol,
    )
    return Verdict(
        allowed=egress.allowed and ingress.allowed,
        egress=egress,
        ingress=ingress,
        src=src,
        dst=dst,
        port=port,
        protocol=protocol,
    )


# --------------------------------------------------------------------------
# Explanation


def describe_peer(peer: Peer) -> str:
    if peer.ip_block is not None:
        text = f"ipBlock {peer.ip_block.cidr}"
        if peer.ip_block.except_:
            text += f" except {','.join(peer.ip_block.except_)}"
        return text
    if peer.namespace_selector is None:
        return f"pods [{describe(peer.pod_selector)}] in the policy's namespace"
    pods = "all pods" if peer.pod_selector is None else f"pods [{describe(peer.pod_selector)}]"
    return f"{pods} in namespaces [{describe(peer.namespace_selector)}]"


def describe_port(pp: PolicyPort) -> str:
    if pp.port is None:
        return f"{pp.protocol.value}/any"
    if pp.end_port is not None:
        return f"{pp.protocol.value}/{pp.port}-{pp.end_port}"
    return f"{pp.protocol.value}/{pp.port}"


def describe_rule(rule: Rule, direction: PolicyType) -> str:
    word = "from" if direction is PolicyType.INGRESS else "to"
    peers = "; ".join(describe_peer(p) for p in rule.peers) if rule.peers else "any peer"
    ports = ", ".join(describe_port(p) for p in rule.ports) if rule.ports else "any port"
    return f"{word} {peers}; ports {ports}"


def _explain_direction(
    lines: list[str],
    state: ClusterState,
    name: str,
    who: str,
    d: DirectionVerdict,
    direction: PolicyType,
) -> None:
    if not d.isolated:
        lines.append(
            f"  {name} of {who}: allowed (not isolated: no {direction.value} policy selects it)"
        )
        return
    status = "allowed" if d.allowed else "DENIED"
    lines.append(f"  {name} of {who}: {status} (isolated by {', '.join(d.selecting)})")
    for ref in d.allowed_by:
        pol = state.policies.get(ref.policy)
        rules = (
            () if pol is None else (pol.ingress if direction is PolicyType.INGRESS else pol.egress)
        )
        detail = (
            f": {describe_rule(rules[ref.rule_index], direction)}"
            if ref.rule_index < len(rules)
            else ""
        )
        lines.append(
            f"    allowed by {ref.policy} {direction.value.lower()} rule {ref.rule_index}{detail}"
        )
    if not d.allowed:
        lines.append(f"    no {direction.value.lower()} rule of these policies matches")


def explain_text(verdict: Verdict, state: ClusterState) -> str:
    """A readable multi-line account of a verdict, naming policies and rules."""
    src = str(verdict.src) if verdict.src is not None else "source"
    dst = str(verdict.dst) if verdict.dst is not None else "destination"
    head = "ALLOWED" if verdict.allowed else "DENIED"
    lines = [f"{src} -> {dst} {verdict.protocol.value}/{verdict.port}: {head}"]
    if verdict.src is not None and _policy_subject(verdict.src.pod) is None:
        lines.append(f"  egress of {src}: not checked (not a pod network endpoint)")
    else:
        _explain_direction(lines, state, "egress", src, verdict.egress, PolicyType.EGRESS)
    if verdict.dst is not None and _policy_subject(verdict.dst.pod) is None:
        lines.append(f"  ingress of {dst}: not checked (not a pod network endpoint)")
    else:
        _explain_direction(lines, state, "ingress", dst, verdict.ingress, PolicyType.INGRESS)
    return "\n".join(lines) + "\n"
