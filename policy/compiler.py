"""NetworkPolicy -> ipsets and iptables chains for one node, incrementally.

The layout is the contract in `docs/policy-dataplane.md`. `Compiler` keeps the
desired `Ruleset` of one node up to date as namespaces, pods and policies
change, in the spirit of Calico's calculation graph: indexes (pods by
namespace and by named port, local pods by namespace, active sets by what can
change their membership) make the work of one update scale with what that
update touches, not with the cluster. Policy chains depend only on the policy
itself, so they are compiled once per policy version. Still pure: no I/O.

`compile_ruleset` is the from-scratch entry point; the property tests check
that any sequence of updates lands on what it computes.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache
from typing import Final

from policy import names
from policy.model import (
    ClusterState,
    Labels,
    LabelSelector,
    Namespace,
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
from policy.names import ChainName, SetName
from policy.ruleset import Chain, HookRule, IpSetSpec, Ruleset, SetType
from policy.selectors import Matcher, canonical, compile_selector

log = logging.getLogger(__name__)

_MARK: Final = f"{names.MARK_ALLOW:#x}"
SET_MARK: Final = f"-j MARK --set-xmark {_MARK}/{_MARK}"
CLEAR_MARK: Final = f"-j MARK --set-xmark 0x0/{_MARK}"
RETURN_IF_MARKED: Final = f"-m mark --mark {_MARK}/{_MARK} -j RETURN"
IFACE_WILDCARD: Final = f"{names.IFACE_PREFIX}+"

HOOKS: Final = (
    HookRule("filter", "FORWARD", f"-j {names.CHAIN_FORWARD}"),
    HookRule("filter", "INPUT", f"-j {names.CHAIN_INPUT}"),
)

# Labels of a namespace we have no object for: the one the apiserver always
# sets (as policy.parse.implicit_namespace and the evaluate oracle assume).
METADATA_NAME_LABEL: Final = "kubernetes.io/metadata.name"
_ALL: Final = LabelSelector()


# First rule of FL-FORWARD and FL-INPUT, before conntrack: a packet from a pod
# interface must carry that pod's address, so a spoofed packet cannot ride on
# an existing connection's ESTABLISHED entry either. (Pod egress chains also
# start with `! -s <ip> -j DROP`, for new connections.)
ANTI_SPOOF: Final = (
    f"-i {IFACE_WILDCARD} -m set ! --match-set {names.SET_LOCAL_SOURCES} src,src -j DROP"
)


def _antispoof_set(local: Mapping[str, Mapping[PodKey, Pod]]) -> IpSetSpec:
    members = frozenset(
        f"{pod.ip},{names.pod_interface(pod.namespace, pod.name)}"
        for pods in local.values()
        for pod in pods.values()
    )
    return IpSetSpec(
        name=names.SET_LOCAL_SOURCES,
        type=SetType.HASH_NET_IFACE,
        members=members,
        description="source address allowed on each local pod interface",
    )


def _fixed_chains() -> dict[ChainName, Chain]:
    w = IFACE_WILDCARD
    forward = Chain(
        names.CHAIN_FORWARD,
        (
            ANTI_SPOOF,
            f"-i {w} -m conntrack --ctstate INVALID -j DROP",
            f"-o {w} -m conntrack --ctstate INVALID -j DROP",
            f"-i {w} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            f"-o {w} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            CLEAR_MARK,
            f"-i {w} -j {names.CHAIN_FROM_PODS}",
            CLEAR_MARK,
            f"-o {w} -j {names.CHAIN_TO_PODS}",
            f"-i {w} -j ACCEPT",
            f"-o {w} -j ACCEPT",
        ),
        "pod traffic routed by the node",
    )
    # The mark is cleared here too (the doc's FL-INPUT omitted it): a stale
    # allow bit from another component must not pass the egress check.
    # Only for our interfaces, so other traffic to the host keeps its mark.
    inp = Chain(
        names.CHAIN_INPUT,
        (
            ANTI_SPOOF,
            f"-i {w} -m conntrack --ctstate INVALID -j DROP",
            f"-i {w} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            f"-i {w} {CLEAR_MARK}",
            f"-i {w} -j {names.CHAIN_FROM_PODS}",
            f"-i {w} -j ACCEPT",
        ),
        "pod traffic to the node itself",
    )
    return {forward.name: forward, inp.name: inp}


def dispatch_chain(direction: PolicyType, prefix: str | None = None) -> ChainName:
    """FL-FROM-PODS / FL-TO-PODS, or their sub-chain for one hex prefix."""
    base = names.CHAIN_FROM_PODS if direction is PolicyType.EGRESS else names.CHAIN_TO_PODS
    return base if prefix is None else ChainName(f"{base}-{prefix}")


def pod_chain(direction: PolicyType, key: PodKey) -> ChainName:
    kind = names.KIND_POD_EGRESS if direction is PolicyType.EGRESS else names.KIND_POD_INGRESS
    return names.chain_name(kind, key)


def policy_chain(direction: PolicyType, key: PolicyKey) -> ChainName:
    kind = names.KIND_POLICY_EGRESS if direction is PolicyType.EGRESS else names.KIND_POLICY_INGRESS
    return names.chain_name(kind, key)


# --------------------------------------------------------------------------
# Sets


class _SetKind(Enum):
    PODS = "pods"
    NET = "net"
    PORT = "port"


@dataclass(frozen=True)
class _SetDef:
    """What defines a set's membership; `identity` is its canonical text."""

    name: SetName
    kind: _SetKind
    identity: str
    description: str
    # PODS: a fixed namespace (namespaceSelector absent) or a namespace selector.
    namespace: str | None = None
    ns_selector: LabelSelector | None = None
    pod_selector: LabelSelector = _ALL
    # NET: static content.
    members: frozenset[str] = frozenset()
    nomatch: frozenset[str] = frozenset()
    # PORT: named container port.
    protocol: Protocol = Protocol.TCP
    port_name: str = ""


@dataclass
class _ActiveSet:
    """A set referenced by at least one active policy chain."""

    defn: _SetDef
    pod_match: Matcher
    ns_sel_match: Matcher | None
    refs: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    # PODS with a namespace selector: namespace -> selected. Invariant: the
    # pods of `ns` are counted exactly when ns_match.get(ns) is True.
    ns_match: dict[str, bool] = field(default_factory=dict)


def _implicit_labels(namespace: str) -> Labels:
    return Labels({METADATA_NAME_LABEL: namespace})


def _addressable(pod: Pod) -> bool:
    """A pod that can be a member of our (IPv4) sets."""
    return pod.ip is not None and not pod.host_network and ":" not in pod.ip


def _describe_canonical(text: str) -> str:
    """kubectl-like text of a `selectors.canonical` form."""
    reqs = json.loads(text)
    if reqs is None:
        return "none"
    if not reqs:
        return "all"
    parts: list[str] = []
    for key, op, values in reqs:
        if op == "In" and len(values) == 1:
            parts.append(f"{key}={values[0]}")
        elif op in ("In", "NotIn"):
            parts.append(f"{key} {op.lower()} ({','.join(values)})")
        else:
            parts.append(key if op == "Exists" else f"!{key}")
    return ",".join(parts)


def _pods_set(namespace: str, peer: Peer) -> _SetDef:
    pod_sel = peer.pod_selector if peer.pod_selector is not None else _ALL
    ns = namespace if peer.namespace_selector is None else ""
    ident = json.dumps(
        ["pods", ns, canonical(peer.namespace_selector), canonical(pod_sel)],
        separators=(",", ":"),
    )
    # Described from the canonical forms, so equal identities get equal text
    # whichever policy activated the set first.
    if peer.namespace_selector is None:
        where = f"namespace {ns}"
    else:
        where = f"namespaces {_describe_canonical(canonical(peer.namespace_selector))}"
    return _SetDef(
        name=names.set_name(names.KIND_SET_PODS, ident),
        kind=_SetKind.PODS,
        identity=ident,
        description=f"pods {_describe_canonical(canonical(pod_sel))} in {where}",
        namespace=ns if peer.namespace_selector is None else None,
        ns_selector=peer.namespace_selector,
        pod_selector=pod_sel,
    )


@lru_cache(maxsize=4096)
def _net_set(cidr: str, excepts: tuple[str, ...]) -> _SetDef | None:
    """An ipBlock as a hash:net set, or None when it cannot match IPv4.

    hash:net cannot hold a /0, so 0.0.0.0/0 becomes two /1 entries; an except
    that covers a whole entry removes that entry instead of adding nomatch.
    """
    try:
        net = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        log.warning("compiler.ipblock.invalid cidr=%s", cidr)
        return None
    if not isinstance(net, ipaddress.IPv4Network):
        return None
    entries = list(net.subnets(prefixlen_diff=1)) if net.prefixlen == 0 else [net]
    nomatch: set[ipaddress.IPv4Network] = set()
    exc_text: list[str] = []
    for text in excepts:
        try:
            exc = ipaddress.ip_network(text, strict=False)
        except ValueError:
            log.warning("compiler.ipblock.invalid except=%s", text)
            continue
        if not isinstance(exc, ipaddress.IPv4Network):
            continue
        exc_text.append(str(exc))
        covered = [e for e in entries if e.subnet_of(exc)]
        if covered:
            entries = [e for e in entries if e not in covered]
        elif any(exc.overlaps(e) for e in entries):
            nomatch.add(exc)
    if not entries:
        return None
    nomatch = {n for n in nomatch if any(n.overlaps(e) for e in entries)}
    excepts_sorted = sorted(set(exc_text))
    ident = json.dumps(["net", str(net), excepts_sorted], separators=(",", ":"))
    desc = f"ipBlock {net}" + (f" except {','.join(excepts_sorted)}" if excepts_sorted else "")
    return _SetDef(
        name=names.set_name(names.KIND_SET_NET, ident),
        kind=_SetKind.NET,
        identity=ident,
        description=desc,
        members=frozenset(str(e) for e in entries),
        nomatch=frozenset(str(n) for n in nomatch),
    )


def _port_set(protocol: Protocol, port_name: str) -> _SetDef:
    ident = json.dumps(["port", protocol.value, port_name], separators=(",", ":"))
    return _SetDef(
        name=names.set_name(names.KIND_SET_NAMED_PORT, ident),
        kind=_SetKind.PORT,
        identity=ident,
        description=f"named port {protocol.value}/{port_name}",
        protocol=protocol,
        port_name=port_name,
    )


_SET_TYPES: Final = {
    _SetKind.PODS: SetType.HASH_IP,
    _SetKind.NET: SetType.HASH_NET,
    _SetKind.PORT: SetType.HASH_IP_PORT,
}


# --------------------------------------------------------------------------
# Policy chains


@dataclass(frozen=True)
class _CompiledPolicy:
    """Everything about a policy that does not depend on other objects."""

    policy: NetworkPolicy
    select: Matcher
    chains: tuple[Chain, ...]
    sets: tuple[_SetDef, ...]
    ingress: bool
    egress: bool


def _port_match(port: PolicyPort, sets: dict[SetName, _SetDef]) -> str:
    proto = port.protocol.value.lower()
    if port.port is None:
        return f"-p {proto}"
    if isinstance(port.port, str):
        sdef = _port_set(port.protocol, port.port)
        sets[sdef.name] = sdef
        return f"-p {proto} -m set --match-set {sdef.name} dst,dst"
    if port.end_port is not None and port.end_port > port.port:
        return f"-p {proto} -m {proto} --dport {port.port}:{port.end_port}"
    return f"-p {proto} -m {proto} --dport {port.port}"


def _peer_match(
    namespace: str, peer: Peer, direction: str, sets: dict[SetName, _SetDef]
) -> str | None:
    """The peer's match text, or None when it can never match IPv4."""
    sdef: _SetDef | None
    if peer.ip_block is not None:
        sdef = _net_set(peer.ip_block.cidr, peer.ip_block.except_)
        if sdef is None:
            return None
    else:
        sdef = _pods_set(namespace, peer)
    sets[sdef.name] = sdef
    return f"-m set --match-set {sdef.name} {direction}"


@lru_cache(maxsize=16384)
def _rule_block(
    namespace: str, rule: Rule, direction: str
) -> tuple[tuple[str, ...], tuple[_SetDef, ...]]:
    """One rule's lines (P peers x Q ports, then RETURN) and its sets.

    Cached: the same rule text recurs across policies and namespaces, and
    its compilation (canonical forms, hashes) dominates a from-scratch build.
    """
    sets: dict[SetName, _SetDef] = {}
    if rule.peers:
        peers = [m for p in rule.peers if (m := _peer_match(namespace, p, direction, sets))]
    else:
        peers = [""]
    ports = [_port_match(p, sets) for p in rule.ports] if rule.ports else [""]
    block = dict.fromkeys(" ".join(x for x in (q, p, SET_MARK) if x) for p in peers for q in ports)
    if not block:
        return (), ()
    return (*block, RETURN_IF_MARKED), tuple(sets.values())


def _rule_lines(
    policy: NetworkPolicy, rules: tuple[Rule, ...], direction: str, sets: dict[SetName, _SetDef]
) -> list[str]:
    lines: list[str] = []
    for rule in rules:
        block, block_sets = _rule_block(policy.namespace, rule, direction)
        lines.extend(block)
        for sdef in block_sets:
            sets[sdef.name] = sdef
    return lines


def compile_policy(policy: NetworkPolicy) -> _CompiledPolicy:
    """The policy's PI/PE chains and the sets they reference (memoisable)."""
    chains: list[Chain] = []
    sets: dict[SetName, _SetDef] = {}
    ingress = PolicyType.INGRESS in policy.policy_types
    egress = PolicyType.EGRESS in policy.policy_types
    if ingress:
        lines = _rule_lines(policy, policy.ingress, "src", sets)
        chains.append(
            Chain(
                policy_chain(PolicyType.INGRESS, policy.key),
                tuple(lines),
                f"policy {policy.key} ingress",
            )
        )
    if egress:
        lines = _rule_lines(policy, policy.egress, "dst", sets)
        chains.append(
            Chain(
                policy_chain(PolicyType.EGRESS, policy.key),
                tuple(lines),
                f"policy {policy.key} egress",
            )
        )
    return _CompiledPolicy(
        policy=policy,
        select=compile_selector(policy.pod_selector),
        chains=tuple(chains),
        sets=tuple(sets[n] for n in sorted(sets)),
        ingress=ingress,
        egress=egress,
    )


# --------------------------------------------------------------------------
# The incremental compiler


class Compiler:
    """Desired ruleset of one node, kept current under updates.

    Each `set_*`/`remove_*` updates the indexes and marks what it touched
    dirty; `ruleset()` rebuilds only the dirty pod chains, dispatch chains and
    sets, and returns an immutable snapshot (copies of the internal dicts).
    """

    def __init__(self, node: str) -> None:
        self.node = node
        self._namespaces: dict[str, Namespace] = {}
        self._pods: dict[PodKey, Pod] = {}
        # Addressable pods only (the only possible set members).
        self._pods_by_ns: dict[str, dict[PodKey, Pod]] = {}
        self._pods_by_port: dict[tuple[Protocol, str], dict[PodKey, Pod]] = {}
        self._policies: dict[PolicyKey, _CompiledPolicy] = {}
        self._policies_by_ns: dict[str, dict[PolicyKey, _CompiledPolicy]] = {}
        # Local pods and which policies select them.
        self._local_by_ns: dict[str, dict[PodKey, Pod]] = {}
        self._local_iface: dict[PodKey, str] = {}
        self._pod_policies: dict[PodKey, set[PolicyKey]] = {}
        self._policy_pods: dict[PolicyKey, set[PodKey]] = {}
        # Active sets and their indexes.
        self._sets: dict[SetName, _ActiveSet] = {}
        self._sets_fixed_ns: dict[str, set[SetName]] = {}
        self._sets_ns_sel: set[SetName] = set()
        self._sets_port: dict[tuple[Protocol, str], SetName] = {}
        # Output, updated in place.
        self._chains: dict[ChainName, Chain] = _fixed_chains()
        self._set_specs: dict[SetName, IpSetSpec] = {}
        self._dirty_pods: set[PodKey] = set()
        self._dirty_prefixes: set[str] = set()
        self._dirty_sets: set[SetName] = set()
        self._dispatch_dirty = True
        self._snapshot: Ruleset | None = None

    # ---- namespaces

    def set_namespace(self, ns: Namespace) -> None:
        old = self._namespaces.get(ns.name)
        if old == ns:
            return
        self._namespaces[ns.name] = ns
        self._namespace_labels_changed(ns.name, ns.labels)

    def remove_namespace(self, name: str) -> None:
        if self._namespaces.pop(name, None) is not None:
            self._namespace_labels_changed(name, _implicit_labels(name))

    def _namespace_labels_changed(self, ns: str, labels: Mapping[str, str]) -> None:
        self._snapshot = None
        pods = self._pods_by_ns.get(ns, {})
        for sname in self._sets_ns_sel:
            aset = self._sets[sname]
            assert aset.defn.ns_selector is not None
            was = aset.ns_match.get(ns, False)
            assert aset.ns_sel_match is not None
            now = aset.ns_sel_match(labels)
            aset.ns_match[ns] = now
            if was == now:
                continue
            match_pod = aset.pod_match
            changed = False
            for pod in pods.values():
                if match_pod(pod.labels):
                    assert pod.ip is not None
                    changed |= self._count(aset, pod.ip, 1 if now else -1)
            if changed:
                self._dirty_sets.add(sname)

    # ---- pods

    def set_pod(self, pod: Pod) -> None:
        key = pod.key
        old = self._pods.get(key)
        if old == pod:
            return
        self._snapshot = None
        if old is not None:
            self._unindex_pod(old)
        self._pods[key] = pod
        if _addressable(pod):
            self._pods_by_ns.setdefault(pod.namespace, {})[key] = pod
            for cp in pod.ports:
                if cp.name:
                    self._pods_by_port.setdefault((cp.protocol, cp.name), {})[key] = pod
        self._update_members(old, pod)
        self._update_local(key, old, pod)

    def remove_pod(self, key: PodKey) -> None:
        old = self._pods.pop(key, None)
        if old is None:
            return
        self._snapshot = None
        self._unindex_pod(old)
        self._update_members(old, None)
        self._update_local(key, old, None)

    def _unindex_pod(self, old: Pod) -> None:
        if not _addressable(old):
            return
        by_ns = self._pods_by_ns[old.namespace]
        del by_ns[old.key]
        if not by_ns:
            del self._pods_by_ns[old.namespace]
        for cp in old.ports:
            if cp.name:
                by_port = self._pods_by_port.get((cp.protocol, cp.name))
                if by_port is not None:
                    by_port.pop(old.key, None)
                    if not by_port:
                        del self._pods_by_port[(cp.protocol, cp.name)]

    def _is_local(self, pod: Pod | None) -> bool:
        return pod is not None and pod.node == self.node and _addressable(pod)

    def _update_local(self, key: PodKey, old: Pod | None, new: Pod | None) -> None:
        was = key in self._local_iface
        now = self._is_local(new)
        if not was and not now:
            return
        ns = key.split("/", 1)[0]
        self._dirty_pods.add(key)
        if now:
            assert new is not None
            self._local_by_ns.setdefault(ns, {})[key] = new
            if not was:
                iface = names.pod_interface(new.namespace, new.name)
                self._local_iface[key] = iface
                self._dirty_prefixes.add(iface[len(names.IFACE_PREFIX)])
            if was and old is not None and old.labels == new.labels:
                return
            labels = new.labels
            selecting = {
                k for k, cp in self._policies_by_ns.get(ns, {}).items() if cp.select(labels)
            }
        else:
            local = self._local_by_ns[ns]
            del local[key]
            if not local:
                del self._local_by_ns[ns]
            iface = self._local_iface.pop(key)
            self._dirty_prefixes.add(iface[len(names.IFACE_PREFIX)])
            selecting = set()
        before = self._pod_policies.get(key, set())
        for pk in selecting - before:
            pods = self._policy_pods.setdefault(pk, set())
            pods.add(key)
            if len(pods) == 1:
                self._activate(self._policies[pk])
        for pk in before - selecting:
            pods = self._policy_pods[pk]
            pods.discard(key)
            if not pods:
                del self._policy_pods[pk]
                self._deactivate(self._policies[pk])
        if selecting:
            self._pod_policies[key] = selecting
        else:
            self._pod_policies.pop(key, None)

    # ---- set membership

    def _count(self, aset: _ActiveSet, member: str, delta: int) -> bool:
        """Adjust a member's refcount; True if the member set changed."""
        counts = aset.counts
        n = counts[member] + delta
        if n <= 0:
            del counts[member]
            return True
        counts[member] = n
        return n == delta

    def _contribution(self, aset: _ActiveSet, pod: Pod | None) -> list[str]:
        """The members `pod` puts into `aset` (counting the ns-match cache in)."""
        if pod is None or not _addressable(pod):
            return []
        assert pod.ip is not None
        d = aset.defn
        if d.kind is _SetKind.PODS:
            if d.ns_selector is None:
                if pod.namespace != d.namespace:
                    return []
            elif not self._ns_selected(aset, pod.namespace):
                return []
            return [pod.ip] if aset.pod_match(pod.labels) else []
        if d.kind is _SetKind.PORT:
            return [
                f"{pod.ip},{cp.protocol.value.lower()}:{cp.port}"
                for cp in pod.ports
                if cp.name == d.port_name and cp.protocol is d.protocol
            ]
        return []

    def _ns_selected(self, aset: _ActiveSet, ns: str) -> bool:
        hit = aset.ns_match.get(ns)
        if hit is None:
            assert aset.ns_sel_match is not None
            nsobj = self._namespaces.get(ns)
            labels = nsobj.labels if nsobj is not None else _implicit_labels(ns)
            hit = aset.ns_sel_match(labels)
            aset.ns_match[ns] = hit
        return hit

    def _update_members(self, old: Pod | None, new: Pod | None) -> None:
        pod = new if new is not None else old
        assert pod is not None
        relevant: set[SetName] = set(self._sets_fixed_ns.get(pod.namespace, ()))
        relevant |= self._sets_ns_sel
        for p in (old, new):
            if p is not None:
                for cp in p.ports:
                    if cp.name:
                        sname = self._sets_port.get((cp.protocol, cp.name))
                        if sname is not None:
                            relevant.add(sname)
        for sname in relevant:
            aset = self._sets[sname]
            before = self._contribution(aset, old)
            after = self._contribution(aset, new)
            if before == after:
                continue
            changed = False
            for m in after:
                changed |= self._count(aset, m, 1)
            for m in before:
                changed |= self._count(aset, m, -1)
            if changed:
                self._dirty_sets.add(sname)

    def _activate_set(self, sdef: _SetDef) -> None:
        aset = self._sets.get(sdef.name)
        if aset is not None:
            aset.refs += 1
            return
        aset = _ActiveSet(
            defn=sdef,
            pod_match=compile_selector(sdef.pod_selector),
            ns_sel_match=(
                compile_selector(sdef.ns_selector) if sdef.ns_selector is not None else None
            ),
            refs=1,
        )
        self._sets[sdef.name] = aset
        self._dirty_sets.add(sdef.name)
        if sdef.kind is _SetKind.PODS:
            match_pod = aset.pod_match
            if sdef.ns_selector is None:
                assert sdef.namespace is not None
                self._sets_fixed_ns.setdefault(sdef.namespace, set()).add(sdef.name)
                spaces: Iterable[str] = (sdef.namespace,)
            else:
                self._sets_ns_sel.add(sdef.name)
                spaces = [ns for ns in self._pods_by_ns if self._ns_selected(aset, ns)]
            counts = aset.counts
            for ns in spaces:
                for pod in self._pods_by_ns.get(ns, {}).values():
                    if match_pod(pod.labels):
                        counts[pod.ip] += 1  # type: ignore[index]
        elif sdef.kind is _SetKind.PORT:
            self._sets_port[(sdef.protocol, sdef.port_name)] = sdef.name
            for pod in self._pods_by_port.get((sdef.protocol, sdef.port_name), {}).values():
                for m in self._contribution(aset, pod):
                    aset.counts[m] += 1

    def _deactivate_set(self, sname: SetName) -> None:
        aset = self._sets[sname]
        aset.refs -= 1
        if aset.refs:
            return
        del self._sets[sname]
        self._dirty_sets.add(sname)
        sdef = aset.defn
        if sdef.kind is _SetKind.PODS:
            if sdef.ns_selector is None:
                assert sdef.namespace is not None
                fixed = self._sets_fixed_ns[sdef.namespace]
                fixed.discard(sname)
                if not fixed:
                    del self._sets_fixed_ns[sdef.namespace]
            else:
                self._sets_ns_sel.discard(sname)
        elif sdef.kind is _SetKind.PORT:
            del self._sets_port[(sdef.protocol, sdef.port_name)]

    # ---- policies

    def set_policy(self, policy: NetworkPolicy) -> None:
        key = policy.key
        old = self._policies.get(key)
        if old is not None and old.policy == policy:
            return
        self._snapshot = None
        compiled = compile_policy(policy)
        self._policies[key] = compiled
        self._policies_by_ns.setdefault(policy.namespace, {})[key] = compiled
        match = compiled.select
        local = self._local_by_ns.get(policy.namespace, {})
        selected = {k for k, pod in local.items() if match(pod.labels)}
        self._reselect(key, old, compiled, selected)

    def remove_policy(self, key: PolicyKey) -> None:
        old = self._policies.pop(key, None)
        if old is None:
            return
        self._snapshot = None
        by_ns = self._policies_by_ns[old.policy.namespace]
        del by_ns[key]
        if not by_ns:
            del self._policies_by_ns[old.policy.namespace]
        self._reselect(key, old, None, set())

    def _reselect(
        self,
        key: PolicyKey,
        old: _CompiledPolicy | None,
        new: _CompiledPolicy | None,
        selected: set[PodKey],
    ) -> None:
        before = self._policy_pods.get(key, set())
        # Activate the new version before retiring the old one, so sets they
        # share keep their members instead of being recomputed.
        if new is not None and selected:
            self._activate(new)
        if old is not None and before:
            self._deactivate(old, keep=new.chains if new is not None and selected else ())
        if selected:
            self._policy_pods[key] = selected
        else:
            self._policy_pods.pop(key, None)
        types_changed = (
            old is None or new is None or (old.ingress, old.egress) != (new.ingress, new.egress)
        )
        touched = (before | selected) if types_changed else (before ^ selected)
        for pk in touched:
            self._dirty_pods.add(pk)
        for pk in selected - before:
            self._pod_policies.setdefault(pk, set()).add(key)
        for pk in before - selected:
            pols = self._pod_policies[pk]
            pols.discard(key)
            if not pols:
                del self._pod_policies[pk]

    def _activate(self, cp: _CompiledPolicy) -> None:
        for chain in cp.chains:
            self._chains[chain.name] = chain
        for sdef in cp.sets:
            self._activate_set(sdef)

    def _deactivate(self, cp: _CompiledPolicy, keep: Iterable[Chain] = ()) -> None:
        kept = {c.name for c in keep}
        for chain in cp.chains:
            if chain.name not in kept:
                del self._chains[chain.name]
        for sdef in cp.sets:
            self._deactivate_set(sdef.name)

    # ---- output

    def _pod_chains(self, key: PodKey) -> tuple[Chain, Chain]:
        pod = self._local_by_ns[key.split("/", 1)[0]][key]
        pols = sorted(self._pod_policies.get(key, ()))
        out: list[Chain] = []
        for direction in (PolicyType.EGRESS, PolicyType.INGRESS):
            rules: list[str] = []
            if direction is PolicyType.EGRESS:
                rules.append(f"! -s {pod.ip}/32 -j DROP")
            applied = [
                pk
                for pk in pols
                if (
                    self._policies[pk].egress
                    if direction is PolicyType.EGRESS
                    else self._policies[pk].ingress
                )
            ]
            for pk in applied:
                rules.append(f"-j {policy_chain(direction, pk)}")
                rules.append(RETURN_IF_MARKED)
            if applied:
                rules.append("-j DROP")
            what = "egress" if direction is PolicyType.EGRESS else "ingress"
            out.append(Chain(pod_chain(direction, key), tuple(rules), f"pod {key} {what}"))
        return out[0], out[1]

    def _rebuild_dispatch(self) -> None:
        plen = len(names.IFACE_PREFIX)
        by_prefix: dict[str, list[tuple[str, PodKey]]] = {}
        if self._dirty_prefixes:
            for key, iface in self._local_iface.items():
                if iface[plen] in self._dirty_prefixes:
                    by_prefix.setdefault(iface[plen], []).append((iface, key))
        in_use = sorted({iface[plen] for iface in self._local_iface.values()})
        for direction, flag in ((PolicyType.EGRESS, "-i"), (PolicyType.INGRESS, "-o")):
            for prefix in self._dirty_prefixes:
                sub = dispatch_chain(direction, prefix)
                members = sorted(by_prefix.get(prefix, ()))
                if not members:
                    self._chains.pop(sub, None)
                    continue
                rules = [f"{flag} {iface} -g {pod_chain(direction, k)}" for iface, k in members]
                rules.append("-j DROP")
                self._chains[sub] = Chain(sub, tuple(rules), f"dispatch {flag} fl{prefix}+")
            top = dispatch_chain(direction)
            rules = [
                f"{flag} {names.IFACE_PREFIX}{p}+ -g {dispatch_chain(direction, p)}" for p in in_use
            ]
            rules.append("-j DROP")
            what = "from" if direction is PolicyType.EGRESS else "to"
            self._chains[top] = Chain(top, tuple(rules), f"dispatch traffic {what} local pods")
        self._dirty_prefixes.clear()
        self._dispatch_dirty = False

    def ruleset(self) -> Ruleset:
        """The current desired state; work is proportional to what changed."""
        if self._snapshot is not None:
            return self._snapshot
        if self._dirty_pods or names.SET_LOCAL_SOURCES not in self._set_specs:
            self._set_specs[names.SET_LOCAL_SOURCES] = _antispoof_set(self._local_by_ns)
        for key in self._dirty_pods:
            if key in self._local_iface:
                fw, tw = self._pod_chains(key)
                self._chains[fw.name] = fw
                self._chains[tw.name] = tw
            else:
                self._chains.pop(pod_chain(PolicyType.EGRESS, key), None)
                self._chains.pop(pod_chain(PolicyType.INGRESS, key), None)
        self._dirty_pods.clear()
        if self._dirty_prefixes or self._dispatch_dirty:
            self._rebuild_dispatch()
        for sname in self._dirty_sets:
            aset = self._sets.get(sname)
            if aset is None:
                self._set_specs.pop(sname, None)
                continue
            d = aset.defn
            if d.kind is _SetKind.NET:
                members, nomatch = d.members, d.nomatch
            else:
                members, nomatch = frozenset(aset.counts), frozenset()
            self._set_specs[sname] = IpSetSpec(
                name=sname,
                type=_SET_TYPES[d.kind],
                members=members,
                nomatch=nomatch,
                description=d.description,
            )
        self._dirty_sets.clear()
        log.debug(
            "compiler.ruleset node=%s chains=%d sets=%d local_pods=%d",
            self.node,
            len(self._chains),
            len(self._set_specs),
            len(self._local_iface),
        )
        self._snapshot = Ruleset(sets=dict(self._set_specs), chains=dict(self._chains), hooks=HOOKS)
        return self._snapshot


def compile_ruleset(state: ClusterState, node: str) -> Ruleset:
    """The ruleset of `node` computed from scratch."""
    c = Compiler(node)
    for ns in state.namespaces.values():
        c.set_namespace(ns)
    # Pods before policies: each set's members are then computed once, at
    # activation, instead of per pod.
    for pod in state.pods.values():
        c.set_pod(pod)
    for pol in state.policies.values():
        c.set_policy(pol)
    return c.ruleset()
