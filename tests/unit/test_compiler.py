"""The NetworkPolicy compiler: exact chains for small cases, stable names,
determinism, incremental == from scratch, and (through a small interpreter of
the rules the compiler emits) agreement with the spec oracle."""

from __future__ import annotations

import ipaddress
import os
import random
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.synthetic import LOCAL_NODE, make_policy, synthetic_cluster
from policy import names
from policy.compiler import (
    HOOKS,
    Compiler,
    compile_ruleset,
    dispatch_chain,
    pod_chain,
    policy_chain,
)
from policy.evaluate import Endpoint, evaluate
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
from policy.ruleset import Ruleset, SetType
from tests.unit import strategies as sts

ING = frozenset({PolicyType.INGRESS})
EGR = frozenset({PolicyType.EGRESS})
BOTH = ING | EGR
MARK = "-j MARK --set-xmark 0x40000/0x40000"
RET = "-m mark --mark 0x40000/0x40000 -j RETURN"
NODE = "n1"


def sel(**labels: str) -> LabelSelector:
    return LabelSelector(Labels(labels))


def ns_obj(name: str, **labels: str) -> Namespace:
    return Namespace(name, Labels({"kubernetes.io/metadata.name": name, **labels}))


def pod(
    ns: str,
    name: str,
    ip: str | None,
    *,
    node: str = NODE,
    host_network: bool = False,
    ports: tuple[ContainerPort, ...] = (),
    **labels: str,
) -> Pod:
    return Pod(
        ns,
        name,
        Labels({"pod": name, **labels}),
        node=node,
        ip=ip,
        ports=ports,
        host_network=host_network,
    )


def state(*objs: Namespace | Pod | NetworkPolicy) -> ClusterState:
    return ClusterState(
        namespaces={o.name: o for o in objs if isinstance(o, Namespace)},
        pods={o.key: o for o in objs if isinstance(o, Pod)},
        policies={o.key: o for o in objs if isinstance(o, NetworkPolicy)},
    )


def pi(key: str) -> str:
    return policy_chain(PolicyType.INGRESS, PolicyKey(key))


def pe(key: str) -> str:
    return policy_chain(PolicyType.EGRESS, PolicyKey(key))


def tw(key: str) -> str:
    return pod_chain(PolicyType.INGRESS, PodKey(key))


def fw(key: str) -> str:
    return pod_chain(PolicyType.EGRESS, PodKey(key))


def rules(rs: Ruleset, chain: str) -> tuple[str, ...]:
    return rs.chains[names.ChainName(chain)].rules


def set_of(rs: Ruleset, rule: str) -> str:
    m = re.search(r"--match-set (\S+) (src|dst)\b", rule)
    assert m, rule
    return m.group(1)


BASE = (
    ns_obj("x", ns="x"),
    ns_obj("y", ns="y"),
    pod("x", "a", "10.0.1.1"),
    pod("x", "b", "10.0.1.2"),
    pod("y", "a", "10.0.2.1", node="n2"),
    pod("y", "b", "10.0.2.2"),
)


# --------------------------------------------------------------------------
# Exact layout


def test_fixed_chains_hooks_and_dispatch() -> None:
    rs = compile_ruleset(state(*BASE), NODE)
    assert rs.hooks == HOOKS
    assert [(h.table, h.chain, h.rule) for h in rs.hooks] == [
        ("filter", "FORWARD", "-j FL-FORWARD"),
        ("filter", "INPUT", "-j FL-INPUT"),
    ]
    anti_spoof = f"-i fl+ -m set ! --match-set {names.SET_LOCAL_SOURCES} src,src -j DROP"
    assert rules(rs, "FL-FORWARD") == (
        anti_spoof,
        "-i fl+ -m conntrack --ctstate INVALID -j DROP",
        "-o fl+ -m conntrack --ctstate INVALID -j DROP",
        "-i fl+ -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-o fl+ -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-j MARK --set-xmark 0x0/0x40000",
        "-i fl+ -j FL-FROM-PODS",
        "-j MARK --set-xmark 0x0/0x40000",
        "-o fl+ -j FL-TO-PODS",
        "-i fl+ -j ACCEPT",
        "-o fl+ -j ACCEPT",
    )
    assert rules(rs, "FL-INPUT")[0] == anti_spoof
    assert rules(rs, "FL-INPUT")[-2:] == ("-i fl+ -j FL-FROM-PODS", "-i fl+ -j ACCEPT")
    # Which source may arrive on which pod interface: local pods only.
    sources = rs.sets[names.SET_LOCAL_SOURCES]
    assert sources.type is SetType.HASH_NET_IFACE
    assert sources.members == {
        f"{ip},{names.pod_interface(*k.split('/'))}"
        for k, ip in (("x/a", "10.0.1.1"), ("x/b", "10.0.1.2"), ("y/b", "10.0.2.2"))
    }
    local = ["x/a", "x/b", "y/b"]
    ifaces = {k: names.pod_interface(*k.split("/")) for k in local}
    prefixes = sorted({i[2] for i in ifaces.values()})
    for direction, flag in ((PolicyType.EGRESS, "-i"), (PolicyType.INGRESS, "-o")):
        top = rules(rs, dispatch_chain(direction))
        assert top == (
            *(f"{flag} fl{p}+ -g {dispatch_chain(direction, p)}" for p in prefixes),
            "-j DROP",
        )
        for p in prefixes:
            expect = sorted((i, k) for k, i in ifaces.items() if i[2] == p)
            assert rules(rs, dispatch_chain(direction, p)) == (
                *(f"{flag} {i} -g {pod_chain(direction, PodKey(k))}" for i, k in expect),
                "-j DROP",
            )
    # Not isolated: anti-spoof only; nothing for the remote pod; no policy chains, no sets.
    assert rules(rs, fw("x/a")) == ("! -s 10.0.1.1/32 -j DROP",)
    assert rules(rs, tw("x/a")) == ()
    assert fw("y/a") not in rs.chains and tw("y/a") not in rs.chains
    assert not policy_sets(rs)
    assert not [c for c in rs.chains if c.startswith(("FL-PI-", "FL-PE-"))]


def test_empty_node_fails_closed() -> None:
    rs = compile_ruleset(state(), NODE)
    assert rules(rs, "FL-FROM-PODS") == ("-j DROP",)
    assert rules(rs, "FL-TO-PODS") == ("-j DROP",)
    assert set(rs.chains) == {"FL-FORWARD", "FL-INPUT", "FL-FROM-PODS", "FL-TO-PODS"}


def test_default_deny_ingress() -> None:
    deny = NetworkPolicy("x", "deny", LabelSelector(), ING)
    rs = compile_ruleset(state(*BASE, deny), NODE)
    assert rules(rs, pi("x/deny")) == ()
    assert pe("x/deny") not in rs.chains
    for k in ("x/a", "x/b"):
        assert rules(rs, tw(k)) == (f"-j {pi('x/deny')}", RET, "-j DROP")
        assert rules(rs, fw(k)) == (f"! -s {'10.0.1.1' if k == 'x/a' else '10.0.1.2'}/32 -j DROP",)
    assert rules(rs, tw("y/b")) == ()


def test_allow_from_pod_selector() -> None:
    pol = NetworkPolicy(
        "x", "allow", sel(pod="a"), ING, ingress=(Rule(peers=(Peer(pod_selector=sel(pod="b")),)),)
    )
    rs = compile_ruleset(state(*BASE, pol), NODE)
    (line, ret) = rules(rs, pi("x/allow"))
    assert ret == RET
    s = set_of(rs, line)
    assert line == f"-m set --match-set {s} src {MARK}"
    assert s.startswith("fl-sp-") and len(s) <= names.MAX_NAME
    assert rs.sets[names.SetName(s)].type is SetType.HASH_IP
    assert rs.sets[names.SetName(s)].members == {"10.0.1.2"}  # y/b is another namespace
    assert rules(rs, tw("x/a")) == (f"-j {pi('x/allow')}", RET, "-j DROP")
    assert rules(rs, tw("x/b")) == ()


def test_namespace_selector_and_both() -> None:
    only_ns = NetworkPolicy(
        "x", "ns", sel(pod="a"), ING, ingress=(Rule(peers=(Peer(namespace_selector=sel(ns="y")),)),)
    )
    both = NetworkPolicy(
        "x",
        "both",
        sel(pod="a"),
        ING,
        ingress=(Rule(peers=(Peer(namespace_selector=sel(ns="y"), pod_selector=sel(pod="a")),)),),
    )
    all_ns = NetworkPolicy(
        "x",
        "all",
        sel(pod="a"),
        ING,
        ingress=(Rule(peers=(Peer(namespace_selector=LabelSelector()),)),),
    )
    extra = (pod("y", "h", "10.0.2.9", host_network=True), pod("y", "p", None))
    rs = compile_ruleset(state(*BASE, *extra, only_ns, both, all_ns), NODE)
    members = {
        k: rs.sets[names.SetName(set_of(rs, rules(rs, pi(k))[0]))].members
        for k in ("x/ns", "x/both", "x/all")
    }
    assert members == {
        "x/ns": {"10.0.2.1", "10.0.2.2"},  # remote pods included; hostNetwork and no-IP not
        "x/both": {"10.0.2.1"},
        "x/all": {"10.0.1.1", "10.0.1.2", "10.0.2.1", "10.0.2.2"},
    }
    # Sorted by policy key.
    assert rules(rs, tw("x/a")) == (
        f"-j {pi('x/all')}",
        RET,
        f"-j {pi('x/both')}",
        RET,
        f"-j {pi('x/ns')}",
        RET,
        "-j DROP",
    )


def test_ip_block_with_except_and_ipv6_skipped() -> None:
    pol = NetworkPolicy(
        "x",
        "net",
        sel(pod="a"),
        ING,
        ingress=(
            Rule(
                peers=(
                    Peer(ip_block=IPBlock("192.168.0.0/16", ("192.168.1.0/24", "192.168.2.0/24"))),
                    Peer(ip_block=IPBlock("fd00::/8")),
                )
            ),
            Rule(peers=(Peer(ip_block=IPBlock("fd00::/8")),)),  # only IPv6: matches nothing
            Rule(peers=(Peer(ip_block=IPBlock("0.0.0.0/0", ("10.0.0.0/8",))),)),
        ),
    )
    rs = compile_ruleset(state(*BASE, pol), NODE)
    r = rules(rs, pi("x/net"))
    assert len(r) == 4 and r[1] == RET and r[3] == RET
    s1, s2 = (rs.sets[names.SetName(set_of(rs, r[i]))] for i in (0, 2))
    assert r[0] == f"-m set --match-set {s1.name} src {MARK}"
    assert s1.type is SetType.HASH_NET and s1.name.startswith("fl-nb-")
    assert s1.members == {"192.168.0.0/16"}
    assert s1.nomatch == {"192.168.1.0/24", "192.168.2.0/24"}
    # hash:net cannot hold /0.
    assert s2.members == {"0.0.0.0/1", "128.0.0.0/1"} and s2.nomatch == {"10.0.0.0/8"}
    assert all(s.type is not SetType.HASH_IP for s in rs.sets.values())


def test_ports_numeric_range_protocols_and_named() -> None:
    web = (ContainerPort(8080, Protocol.TCP, "http"), ContainerPort(5353, Protocol.UDP, "http"))
    pods = (
        pod("x", "a", "10.0.1.1", ports=web),
        pod("y", "c", "10.0.2.3", node="n9", ports=web),
        pod("x", "b", "10.0.1.2", ports=(ContainerPort(81, Protocol.TCP, "other"),)),
    )
    pol = NetworkPolicy(
        "x",
        "ports",
        sel(pod="a"),
        ING,
        ingress=(
            Rule(
                ports=(
                    PolicyPort(Protocol.TCP, 80),
                    PolicyPort(Protocol.TCP, 80, 90),
                    PolicyPort(Protocol.UDP),
                    PolicyPort(Protocol.SCTP, 7),
                    PolicyPort(Protocol.UDP, 53),
                    PolicyPort(Protocol.TCP, "http"),
                )
            ),
        ),
    )
    rs = compile_ruleset(state(*pods, pol), NODE)
    r = rules(rs, pi("x/ports"))
    named = set_of(rs, r[5])
    assert r == (
        f"-p tcp -m tcp --dport 80 {MARK}",
        f"-p tcp -m tcp --dport 80:90 {MARK}",
        f"-p udp {MARK}",
        f"-p sctp -m sctp --dport 7 {MARK}",
        f"-p udp -m udp --dport 53 {MARK}",
        f"-p tcp -m set --match-set {named} dst,dst {MARK}",
        RET,
    )
    spec = rs.sets[names.SetName(named)]
    assert spec.type is SetType.HASH_IP_PORT and named.startswith("fl-np-")
    assert spec.members == {"10.0.1.1,tcp:8080", "10.0.2.3,tcp:8080"}


def test_peers_times_ports_and_egress() -> None:
    pol = NetworkPolicy(
        "x",
        "eg",
        sel(pod="a"),
        BOTH,
        egress=(
            Rule(
                peers=(Peer(pod_selector=sel(pod="b")), Peer(ip_block=IPBlock("10.9.0.0/16"))),
                ports=(PolicyPort(Protocol.TCP, 80), PolicyPort(Protocol.UDP, 53)),
            ),
        ),
    )
    rs = compile_ruleset(state(*BASE, pol), NODE)
    assert rules(rs, pi("x/eg")) == ()  # Ingress type without rules: deny all
    r = rules(rs, pe("x/eg"))
    sp, nb = set_of(rs, r[0]), set_of(rs, r[2])
    assert r == (
        f"-p tcp -m tcp --dport 80 -m set --match-set {sp} dst {MARK}",
        f"-p udp -m udp --dport 53 -m set --match-set {sp} dst {MARK}",
        f"-p tcp -m tcp --dport 80 -m set --match-set {nb} dst {MARK}",
        f"-p udp -m udp --dport 53 -m set --match-set {nb} dst {MARK}",
        RET,
    )
    assert rules(rs, fw("x/a")) == ("! -s 10.0.1.1/32 -j DROP", f"-j {pe('x/eg')}", RET, "-j DROP")
    assert rules(rs, tw("x/a")) == (f"-j {pi('x/eg')}", RET, "-j DROP")


def test_sets_shared_and_policies_without_local_pods_contribute_nothing() -> None:
    rule = Rule(peers=(Peer(pod_selector=sel(pod="b")),))
    p1 = NetworkPolicy("x", "one", sel(pod="a"), ING, ingress=(rule,))
    p2 = NetworkPolicy("x", "two", LabelSelector(), ING, ingress=(rule,))
    remote_only = NetworkPolicy(
        "y", "r", sel(pod="a"), ING, ingress=(Rule(peers=(Peer(ip_block=IPBlock("10.7.0.0/16")),)),)
    )
    rs = compile_ruleset(state(*BASE, p1, p2, remote_only), NODE)
    assert set_of(rs, rules(rs, pi("x/one"))[0]) == set_of(rs, rules(rs, pi("x/two"))[0])
    assert len(policy_sets(rs)) == 1
    assert pi("y/r") not in rs.chains


def test_names_stable_and_short() -> None:
    pol = NetworkPolicy("x", "a" * 253, LabelSelector(), BOTH)
    a = compile_ruleset(state(*BASE, pol), NODE)
    b = compile_ruleset(state(*BASE, pol), NODE)
    assert a == b
    assert all(len(n) <= names.MAX_NAME for n in [*a.chains, *a.sets])
    # Stable across processes (hash seeds): the names are a function of identity only.
    code = (
        "from policy.compiler import policy_chain, pod_chain;"
        "from policy.model import PolicyType as T;"
        "print(policy_chain(T.INGRESS, 'x/allow'), pod_chain(T.EGRESS, 'x/a'))"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2")
    }
    assert outs == {f"{pi('x/allow')} {fw('x/a')}\n"}


def test_ruleset_snapshots_do_not_change() -> None:
    c = Compiler(NODE)
    _incremental(c, *BASE)
    before = c.ruleset()
    copy = Ruleset(sets=dict(before.sets), chains=dict(before.chains), hooks=before.hooks)
    c.set_policy(NetworkPolicy("x", "deny", LabelSelector(), BOTH))
    c.remove_pod(PodKey("x/b"))
    after = c.ruleset()
    assert before == copy and after != before
    assert c.ruleset() is after  # nothing changed: same snapshot


# --------------------------------------------------------------------------
# A tiny interpreter of exactly the rule forms the compiler emits


@dataclass(frozen=True)
class Packet:
    src: str
    dst: str
    proto: str
    dport: int
    iif: str | None
    oif: str | None


def _in_set(rs: Ruleset, name: str, pkt: Packet, flags: str) -> bool:
    spec = rs.sets[names.SetName(name)]
    ip = pkt.src if flags == "src" else pkt.dst
    if spec.type is SetType.HASH_IP:
        return ip in spec.members
    if spec.type is SetType.HASH_IP_PORT:
        return f"{pkt.dst},{pkt.proto}:{pkt.dport}" in spec.members
    addr = ipaddress.ip_address(ip)
    best = None  # most specific entry wins, nomatch included
    for entry, nomatch in [*((m, False) for m in spec.members), *((m, True) for m in spec.nomatch)]:
        net = ipaddress.ip_network(entry)
        if addr in net and (best is None or net.prefixlen > best[0]):
            best = (net.prefixlen, nomatch)
    return best is not None and not best[1]


def policy_sets(rs: Ruleset) -> dict[names.SetName, object]:
    """The ruleset's sets other than the fixed anti-spoof set."""
    return {n: s for n, s in rs.sets.items() if n != names.SET_LOCAL_SOURCES}


def _iface(spec: str, actual: str | None) -> bool:
    if actual is None:
        return False
    return actual.startswith(spec[:-1]) if spec.endswith("+") else actual == spec


def _matches(rs: Ruleset, tokens: list[str], pkt: Packet, mark: int) -> bool:
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if t == "!" and tokens[i + 1] == "-s":
            if pkt.src == tokens[i + 2].removesuffix("/32"):
                return False
            i += 3
        elif t in ("-i", "-o"):
            if not _iface(tokens[i + 1], pkt.iif if t == "-i" else pkt.oif):
                return False
            i += 2
        elif t == "-p":
            if pkt.proto != tokens[i + 1]:
                return False
            i += 2
        elif t == "-m" and tokens[i + 1] in ("tcp", "udp", "sctp"):
            assert tokens[i + 2] == "--dport"
            lo, _, hi = tokens[i + 3].partition(":")
            if not int(lo) <= pkt.dport <= int(hi or lo):
                return False
            i += 4
        elif t == "-m" and tokens[i + 1] == "set" and tokens[i + 2] == "!":
            # `! --match-set S src,src`: the (source, in-interface) pair is not in S
            assert tokens[i + 3] == "--match-set" and tokens[i + 5] == "src,src"
            if f"{pkt.src},{pkt.iif}" in rs.sets[names.SetName(tokens[i + 4])].members:
                return False
            i += 6
        elif t == "-m" and tokens[i + 1] == "set":
            assert tokens[i + 2] == "--match-set"
            if not _in_set(rs, tokens[i + 3], pkt, tokens[i + 4]):
                return False
            i += 5
        elif t == "-m" and tokens[i + 1] == "mark":
            value, mask = (int(x, 16) for x in tokens[i + 3].split("/"))
            if mark & mask != value:
                return False
            i += 4
        elif t == "-m" and tokens[i + 1] == "conntrack":
            return False  # every probe is a NEW connection
        else:
            raise AssertionError(f"unknown match {t} in {tokens}")
    return True


def run_chain(
    rs: Ruleset, chain: str, pkt: Packet, mark: int = 0, depth: int = 0
) -> tuple[str, int]:
    """-> (verdict ACCEPT|DROP|RETURN, mark)."""
    assert depth < 10
    for rule in rs.chains[names.ChainName(chain)].rules:
        tokens = rule.split()
        j = max(i for i, t in enumerate(tokens) if t in ("-j", "-g"))
        if not _matches(rs, tokens[:j], pkt, mark):
            continue
        target = tokens[j + 1]
        if target in ("ACCEPT", "DROP"):
            return target, mark
        if target == "RETURN":
            return "RETURN", mark
        if target == "MARK":
            value, mask = (int(x, 16) for x in tokens[j + 3].split("/"))
            mark = (mark & ~mask) | value
            continue
        verdict, mark = run_chain(rs, target, pkt, mark, depth + 1)
        if verdict != "RETURN" or tokens[j] == "-g":
            return verdict, mark
    return "RETURN", mark


def forwarded(rs: Ruleset, pkt: Packet) -> bool:
    return run_chain(rs, "FL-FORWARD", pkt)[0] != "DROP"


def dataplane_allows(
    rulesets: Mapping[str, Ruleset], src: Pod, dst: Pod, proto: str, port: int
) -> bool:
    """Both nodes' FORWARD paths (one pass when both pods share a node)."""
    assert src.ip and dst.ip and src.node and dst.node
    s_if = names.pod_interface(src.namespace, src.name)
    d_if = names.pod_interface(dst.namespace, dst.name)
    if src.node == dst.node:
        return forwarded(rulesets[src.node], Packet(src.ip, dst.ip, proto, port, s_if, d_if))
    return forwarded(
        rulesets[src.node], Packet(src.ip, dst.ip, proto, port, s_if, "eth0")
    ) and forwarded(rulesets[dst.node], Packet(src.ip, dst.ip, proto, port, "eth0", d_if))


def _probe_all(st_: ClusterState) -> None:
    nodes = sorted({p.node for p in st_.pods.values() if p.node})
    rulesets = {n: compile_ruleset(st_, n) for n in nodes}
    pods = [p for p in st_.pods.values() if p.ip and not p.host_network and p.node]
    for src in pods:
        for dst in pods:
            for proto, port in (("tcp", 80), ("udp", 81), ("tcp", 81), ("sctp", 80)):
                want = evaluate(
                    st_,
                    Endpoint(src, src.ip or ""),
                    Endpoint(dst, dst.ip or ""),
                    port=port,
                    protocol=Protocol(proto.upper()),
                ).allowed
                got = dataplane_allows(rulesets, src, dst, proto, port)
                assert got == want, (src.key, dst.key, proto, port)


def test_interpreter_sees_spoofing_and_unknown_interfaces_dropped() -> None:
    rs = compile_ruleset(state(*BASE), NODE)
    a_if = names.pod_interface("x", "a")
    assert forwarded(rs, Packet("10.0.1.1", "10.0.2.1", "tcp", 80, a_if, "eth0"))
    assert not forwarded(rs, Packet("10.0.1.9", "10.0.2.1", "tcp", 80, a_if, "eth0"))
    assert not forwarded(rs, Packet("10.0.1.1", "10.0.2.1", "tcp", 80, "fl0000000000", "eth0"))
    assert not forwarded(rs, Packet("10.0.2.1", "10.0.1.5", "tcp", 80, "eth0", "flffffffffff"))
    assert (
        run_chain(rs, "FL-INPUT", Packet("10.0.1.9", "10.0.0.1", "tcp", 80, a_if, None))[0]
        == "DROP"
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sts.e2e_cluster(max_policies=3))
def test_dataplane_agrees_with_oracle(cluster: ClusterState) -> None:
    _probe_all(cluster)


# --------------------------------------------------------------------------
# Incremental == from scratch, and structural invariants


def check_invariants(rs: Ruleset) -> None:
    for chain in rs.chains.values():
        for rule in chain.rules:
            for m in re.finditer(r"--match-set (\S+) ", rule):
                assert m.group(1) in rs.sets, (chain.name, rule)
            jump = re.search(r"-[jg] (FL-\S+)", rule)
            if jump:
                assert jump.group(1) in rs.chains, (chain.name, rule)
    referenced = {
        m for c in rs.chains.values() for r in c.rules for m in re.findall(r"--match-set (\S+) ", r)
    }
    assert referenced == set(rs.sets), "a set nobody references"
    for h in rs.hooks:
        assert h.rule.split()[-1] in rs.chains
    assert all(len(n) <= names.MAX_NAME for n in [*rs.chains, *rs.sets])


_NS = ("x", "y", "z")
_NODES = ("n1", "n2")
_IPS = (*(f"10.0.0.{i}" for i in range(1, 7)), "fd00::1")

# Small pools so that selectors often select, sets fill and updates matter.
_SELS = (
    LabelSelector(),
    sel(pod="a"),
    sel(app="web"),
    sel(app="db", pod="b"),
    LabelSelector(match_expressions=(Requirement("app", Operator.EXISTS),)),
    LabelSelector(match_expressions=(Requirement("app", Operator.NOT_IN, ("web",)),)),
)
_NS_SELS = (
    LabelSelector(),
    sel(team="red"),
    sel(**{"kubernetes.io/metadata.name": "y"}),
    LabelSelector(match_expressions=(Requirement("team", Operator.DOES_NOT_EXIST),)),
)
small_labels = st.dictionaries(
    st.sampled_from(("pod", "app")), st.sampled_from(("a", "b", "web", "db")), max_size=2
).map(Labels)
simple_peers = st.one_of(
    st.sampled_from(_SELS).map(lambda s: Peer(pod_selector=s)),
    st.sampled_from(_NS_SELS).map(lambda s: Peer(namespace_selector=s)),
    st.builds(
        lambda p, n: Peer(pod_selector=p, namespace_selector=n),
        st.sampled_from(_SELS),
        st.sampled_from(_NS_SELS),
    ),
    sts.ip_blocks().map(lambda b: Peer(ip_block=b)),
)
simple_rules = st.builds(
    Rule,
    st.lists(simple_peers, max_size=2).map(tuple),
    st.lists(sts.policy_ports(), max_size=2).map(tuple),
)
simple_policies = st.builds(
    NetworkPolicy,
    st.sampled_from(_NS),
    st.sampled_from(("p", "q", "r")),
    st.sampled_from(_SELS),
    st.sets(st.sampled_from(list(PolicyType)), min_size=1).map(frozenset),
    st.lists(simple_rules, max_size=2).map(tuple),
    st.lists(simple_rules, max_size=2).map(tuple),
)
pods_st = st.builds(
    lambda ns, name, lab, node, ip, hn, ports: Pod(
        ns, name, lab, node=node, ip=ip, host_network=hn, ports=ports
    ),
    st.sampled_from(_NS),
    st.sampled_from(("a", "b", "c", "d")),
    small_labels,
    st.sampled_from((*_NODES, _NODES[0], None)),
    st.sampled_from((*_IPS, None)),
    st.sampled_from((False, False, False, True)),
    st.lists(
        st.builds(
            ContainerPort,
            st.sampled_from((80, 81, 53)),
            sts.protocols,
            st.sampled_from(sts.PORT_NAMES),
        ),
        max_size=2,
    ).map(tuple),
)
namespaces_st = st.builds(
    lambda n, team: Namespace(n, Labels({"kubernetes.io/metadata.name": n, **team})),
    st.sampled_from(_NS),
    st.sampled_from(({}, {"team": "red"}, {"team": "blue"})),
)
policies_st = st.one_of(
    simple_policies, sts.network_policies(namespaces=_NS, names=st.sampled_from(("p", "q", "r")))
)

Op = tuple[str, object]
ops_st = st.lists(
    st.one_of(
        namespaces_st.map(lambda v: ("ns", v)),
        pods_st.map(lambda v: ("pod", v)),
        policies_st.map(lambda v: ("pol", v)),
        st.sampled_from(_NS).map(lambda v: ("-ns", v)),
        st.sampled_from([f"{n}/{p}" for n in _NS for p in "abcd"]).map(lambda v: ("-pod", v)),
        st.sampled_from([f"{n}/{p}" for n in _NS for p in "pqr"]).map(lambda v: ("-pol", v)),
    ),
    max_size=30,
)


@dataclass
class World:
    """The cluster an op sequence leads to, kept beside the Compiler."""

    ns: dict[str, Namespace] = field(default_factory=dict)
    pod: dict[PodKey, Pod] = field(default_factory=dict)
    pol: dict[PolicyKey, NetworkPolicy] = field(default_factory=dict)

    def state(self) -> ClusterState:
        return ClusterState(namespaces=self.ns, pods=self.pod, policies=self.pol)


def apply_ops(
    c: Compiler | None, ops: Iterable[Op], world: World, *, check_each: bool = False
) -> None:
    for kind, value in ops:
        if isinstance(value, Namespace):
            world.ns[value.name] = value
            if c:
                c.set_namespace(value)
        elif isinstance(value, Pod):
            world.pod[value.key] = value
            if c:
                c.set_pod(value)
        elif isinstance(value, NetworkPolicy):
            world.pol[value.key] = value
            if c:
                c.set_policy(value)
        elif kind == "-ns":
            assert isinstance(value, str)
            world.ns.pop(value, None)
            if c:
                c.remove_namespace(value)
        elif kind == "-pod":
            world.pod.pop(PodKey(str(value)), None)
            if c:
                c.remove_pod(PodKey(str(value)))
        else:
            assert kind == "-pol"
            world.pol.pop(PolicyKey(str(value)), None)
            if c:
                c.remove_policy(PolicyKey(str(value)))
        if c and check_each:
            check_invariants(c.ruleset())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops_st, st.sampled_from(_NODES), st.booleans())
def test_incremental_equals_scratch(ops: list[Op], node: str, check_each: bool) -> None:
    c = Compiler(node)
    world = World()
    apply_ops(c, ops, world, check_each=check_each)
    got = c.ruleset()
    want = compile_ruleset(world.state(), node)
    assert got == want
    check_invariants(got)


@settings(max_examples=40, deadline=None)
@given(ops_st, st.randoms(use_true_random=False))
def test_same_inputs_any_order(ops: list[Op], rnd: random.Random) -> None:
    world = World()
    apply_ops(None, ops, world)
    final: list[Op] = [("ns", v) for v in world.ns.values()]
    final += [("pod", v) for v in world.pod.values()]
    final += [("pol", v) for v in world.pol.values()]
    rnd.shuffle(final)
    c = Compiler("n1")
    apply_ops(c, final, World())
    assert c.ruleset() == compile_ruleset(world.state(), "n1")


def test_synthetic_cluster_incremental_matches_scratch() -> None:
    """The bench scenario at reduced size: every kind of update, then compare."""
    st_ = synthetic_cluster(pods=400, namespaces=10, policies=100, nodes=5)
    c = Compiler(LOCAL_NODE)
    for ns in st_.namespaces.values():
        c.set_namespace(ns)
    pols = list(st_.policies.values())
    _incremental(c, *pols[:50])  # some policies before the pods: sets filled per pod
    _incremental(c, *st_.pods.values())
    _incremental(c, *pols[50:])
    rs0 = c.ruleset()
    assert rs0 == compile_ruleset(st_, LOCAL_NODE)
    assert sum(k.startswith("FL-TW-") for k in rs0.chains) == 80
    check_invariants(rs0)
    world = World(dict(st_.namespaces), dict(st_.pods), dict(st_.policies))
    local = [p for p in st_.pods.values() if p.node == LOCAL_NODE]
    ops: list[Op] = [
        ("pol", replace(make_policy(3, 5), name="new")),
        ("pod", replace(local[0], labels=Labels({**local[0].labels, "tier": "db"}))),
        ("pod", replace(local[1], node="node-3")),
        ("pod", replace(local[2], ip=None)),
        ("ns", replace(st_.namespaces["ns-1"], labels=Labels({"team": "team-0"}))),
        ("-ns", "ns-2"),
        ("-pol", next(iter(st_.policies))),
        ("-pod", local[3].key),
    ]
    apply_ops(c, ops, world, check_each=True)
    assert c.ruleset() == compile_ruleset(world.state(), LOCAL_NODE)


@pytest.mark.parametrize("order", ["pods_first", "policies_first"])
def test_build_order_does_not_matter(order: str) -> None:
    st_ = synthetic_cluster(pods=200, namespaces=10, policies=50, nodes=4)
    c = Compiler(LOCAL_NODE)
    groups: list[Iterable[Namespace | Pod | NetworkPolicy]] = [
        st_.namespaces.values(),
        st_.pods.values(),
        st_.policies.values(),
    ]
    if order == "policies_first":
        groups.reverse()
    for g in groups:
        _incremental(c, *g)
    assert c.ruleset() == compile_ruleset(st_, LOCAL_NODE)


# --------------------------------------------------------------------------
# Targeted updates (each one a path the random sequences hit only rarely)


def _incremental(c: Compiler, *objs: Namespace | Pod | NetworkPolicy) -> None:
    for o in objs:
        if isinstance(o, Namespace):
            c.set_namespace(o)
        elif isinstance(o, Pod):
            c.set_pod(o)
        else:
            c.set_policy(o)


TEAM = NetworkPolicy(
    "x",
    "team",
    sel(pod="a"),
    ING,
    ingress=(Rule(peers=(Peer(namespace_selector=sel(team="red")),)),),
)


def _team_members(rs: Ruleset) -> frozenset[str]:
    return rs.sets[names.SetName(set_of(rs, rules(rs, pi("x/team"))[0]))].members


def test_namespace_label_changes_move_its_pods() -> None:
    c = Compiler(NODE)
    _incremental(c, *BASE, TEAM)
    assert _team_members(c.ruleset()) == frozenset()
    c.set_namespace(ns_obj("y", ns="y", team="red"))
    assert _team_members(c.ruleset()) == {"10.0.2.1", "10.0.2.2"}
    c.set_pod(pod("y", "c", "10.0.2.3", node="n7"))
    assert _team_members(c.ruleset()) == {"10.0.2.1", "10.0.2.2", "10.0.2.3"}
    c.set_namespace(ns_obj("y", ns="y", team="blue"))
    assert _team_members(c.ruleset()) == frozenset()
    c.set_namespace(ns_obj("z", team="red"))  # labels before its pods arrive
    c.set_pod(pod("z", "a", "10.0.3.1", node="n2"))
    assert _team_members(c.ruleset()) == {"10.0.3.1"}
    c.remove_namespace("z")
    assert _team_members(c.ruleset()) == frozenset()


def test_missing_namespace_has_its_metadata_name_label() -> None:
    by_name = NetworkPolicy(
        "x",
        "team",
        sel(pod="a"),
        ING,
        ingress=(
            Rule(peers=(Peer(namespace_selector=sel(**{"kubernetes.io/metadata.name": "w"})),)),
        ),
    )
    orphan = pod("w", "a", "10.0.9.1", node="n2")
    rs = compile_ruleset(state(*BASE, orphan, by_name), NODE)
    assert _team_members(rs) == {"10.0.9.1"}
    c = Compiler(NODE)
    _incremental(c, *BASE, orphan, by_name, ns_obj("w", team="red"))
    c.remove_namespace("w")
    assert c.ruleset() == rs


def test_policy_types_change_with_same_selection() -> None:
    c = Compiler(NODE)
    p = NetworkPolicy("x", "p", sel(pod="a"), ING)
    _incremental(c, *BASE, p)
    assert rules(c.ruleset(), fw("x/a")) == ("! -s 10.0.1.1/32 -j DROP",)
    c.set_policy(replace(p, policy_types=BOTH))
    rs = c.ruleset()
    assert rules(rs, fw("x/a")) == ("! -s 10.0.1.1/32 -j DROP", f"-j {pe('x/p')}", RET, "-j DROP")
    c.set_policy(replace(p, policy_types=EGR))
    rs = c.ruleset()
    assert rules(rs, tw("x/a")) == () and pi("x/p") not in rs.chains
    assert rs == compile_ruleset(state(*BASE, replace(p, policy_types=EGR)), NODE)


def test_policy_rules_change_while_selected() -> None:
    c = Compiler(NODE)
    p1 = NetworkPolicy(
        "x", "p", sel(pod="a"), ING, ingress=(Rule(peers=(Peer(pod_selector=sel(pod="b")),)),)
    )
    p2 = replace(p1, ingress=(Rule(peers=(Peer(ip_block=IPBlock("10.5.0.0/16")),)),))
    _incremental(c, *BASE, p1)
    first = c.ruleset()
    c.set_policy(p2)
    second = c.ruleset()
    assert second == compile_ruleset(state(*BASE, p2), NODE)
    assert set(policy_sets(first)).isdisjoint(policy_sets(second))
    assert len(policy_sets(second)) == 1
    assert rules(second, pi("x/p")) != rules(first, pi("x/p"))
    c.set_policy(p1)
    assert c.ruleset() == first


def test_local_pod_leaving_retires_policy_and_sets() -> None:
    c = Compiler(NODE)
    p = NetworkPolicy(
        "x", "p", sel(pod="a"), BOTH, egress=(Rule(ports=(PolicyPort(Protocol.TCP, "http"),)),)
    )
    _incremental(c, *BASE, p)
    assert pe("x/p") in c.ruleset().chains and len(policy_sets(c.ruleset())) == 1
    c.set_pod(pod("x", "a", "10.0.1.1", node="n2"))  # moved away (as a new incarnation would)
    rs = c.ruleset()
    assert pe("x/p") not in rs.chains and not policy_sets(rs)
    assert fw("x/a") not in rs.chains
    c.set_pod(pod("x", "a", "10.0.1.7", app="web"))
    rs = c.ruleset()
    assert rules(rs, fw("x/a"))[0] == "! -s 10.0.1.7/32 -j DROP"
    assert rs == compile_ruleset(
        state(*BASE[:2], pod("x", "a", "10.0.1.7", app="web"), *BASE[3:], p), NODE
    )


def test_duplicate_ips_are_refcounted() -> None:
    p = NetworkPolicy(
        "x",
        "p",
        sel(pod="a"),
        ING,
        ingress=(Rule(peers=(Peer(namespace_selector=LabelSelector()),)),),
    )
    old = pod("y", "old", "10.0.2.1", node="n2")  # terminating pod still holding y/a's IP
    c = Compiler(NODE)
    _incremental(c, *BASE, old, p)
    c.remove_pod(PodKey("y/old"))
    members = policy_sets(c.ruleset())
    assert "10.0.2.1" in next(iter(members.values())).members  # type: ignore[attr-defined]
