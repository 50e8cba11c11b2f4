"""The spec oracle: concrete NetworkPolicy cases and union properties."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy.evaluate import (
    Endpoint,
    EndpointNotFound,
    RuleRef,
    Verdict,
    endpoint_for,
    evaluate,
    explain_text,
)
from policy.model import (
    ClusterState,
    IPBlock,
    Labels,
    LabelSelector,
    NetworkPolicy,
    Operator,
    Peer,
    Pod,
    PolicyKey,
    PolicyPort,
    PolicyType,
    Protocol,
    Requirement,
    Rule,
)
from policy.selectors import matches
from tests.unit.strategies import e2e_cluster, e2e_state, network_policies

ING = PolicyType.INGRESS
EGR = PolicyType.EGRESS
TCP = Protocol.TCP
UDP = Protocol.UDP


def _sel(**ml: str) -> LabelSelector:
    return LabelSelector(match_labels=Labels(ml))


def _pol(
    ns: str,
    name: str,
    sel: LabelSelector,
    *types: PolicyType,
    ingress: tuple[Rule, ...] = (),
    egress: tuple[Rule, ...] = (),
) -> NetworkPolicy:
    return NetworkPolicy(ns, name, sel, frozenset(types), ingress=ingress, egress=egress)


def _check(
    state: ClusterState, src: str, dst: str, port: int = 80, protocol: Protocol = TCP
) -> Verdict:
    return evaluate(
        state, endpoint_for(state, src), endpoint_for(state, dst), port=port, protocol=protocol
    )


def _allowed(
    state: ClusterState, src: str, dst: str, port: int = 80, protocol: Protocol = TCP
) -> bool:
    return _check(state, src, dst, port, protocol).allowed


DENY_X_INGRESS = _pol("x", "deny", LabelSelector(), ING)


# ---------------------------------------------------------------- basics


def test_no_policies_everything_allowed_and_nothing_isolated() -> None:
    state = e2e_state()
    v = _check(state, "x/a", "y/b")
    assert v.allowed
    assert not v.egress.isolated and not v.ingress.isolated
    assert v.egress.selecting == () and v.ingress.allowed_by == ()


def test_deny_all_ingress_isolates_only_its_namespace() -> None:
    state = e2e_state([DENY_X_INGRESS])
    v = _check(state, "y/b", "x/a")
    assert not v.allowed
    assert v.ingress.isolated and v.ingress.selecting == (PolicyKey("x/deny"),)
    assert v.ingress.allowed_by == ()
    assert v.egress.allowed and not v.egress.isolated
    assert _allowed(state, "x/a", "y/b")  # egress of x/a is not restricted
    assert not _allowed(state, "x/a", "x/a")  # self traffic is checked like any pair


def test_pod_selector_peer_is_same_namespace_only() -> None:
    pol = _pol(
        "x",
        "a-from-b",
        _sel(pod="a"),
        ING,
        ingress=(Rule(peers=(Peer(pod_selector=_sel(pod="b")),)),),
    )
    state = e2e_state([pol])
    assert _allowed(state, "x/b", "x/a")
    assert not _allowed(state, "y/b", "x/a")
    assert not _allowed(state, "x/c", "x/a")
    assert _allowed(state, "y/c", "x/b")  # x/b not selected
    assert _check(state, "x/b", "x/a").ingress.allowed_by == (
        RuleRef(PolicyKey("x/a-from-b"), ING, 0),
    )


def test_namespace_selector_alone_selects_all_pods_of_namespaces() -> None:
    pol = _pol(
        "x",
        "from-y",
        _sel(pod="a"),
        ING,
        ingress=(Rule(peers=(Peer(namespace_selector=_sel(ns="y")),)),),
    )
    state = e2e_state([pol])
    assert all(_allowed(state, f"y/{p}", "x/a") for p in "abc")
    assert not _allowed(state, "x/b", "x/a")
    assert not _allowed(state, "z/a", "x/a")


def test_namespace_and_pod_selector_intersect() -> None:
    pol = _pol(
        "x",
        "y-b",
        _sel(pod="a"),
        ING,
        ingress=(Rule(peers=(Peer(namespace_selector=_sel(ns="y"), pod_selector=_sel(pod="b")),)),),
    )
    state = e2e_state([pol])
    assert _allowed(state, "y/b", "x/a")
    assert not _allowed(state, "y/a", "x/a")
    assert not _allowed(state, "x/b", "x/a")
    assert not _allowed(state, "z/b", "x/a")


def test_namespace_selector_on_metadata_name_label() -> None:
    sel = LabelSelector(
        match_expressions=(Requirement("kubernetes.io/metadata.name", Operator.NOT_IN, ("y",)),)
    )
    pol = _pol(
        "x", "not-y", _sel(pod="a"), ING, ingress=(Rule(peers=(Peer(namespace_selector=sel),)),)
    )
    state = e2e_state([pol])
    assert _allowed(state, "z/c", "x/a") and _allowed(state, "x/a", "x/a")
    assert not _allowed(state, "y/c", "x/a")


def test_rules_and_policies_are_unions() -> None:
    p1 = _pol(
        "x", "p1", _sel(pod="a"), ING, ingress=(Rule(peers=(Peer(pod_selector=_sel(pod="b")),)),)
    )
    p2 = _pol(
        "x",
        "p2",
        LabelSelector(),
        ING,
        ingress=(
            Rule(peers=(Peer(namespace_selector=_sel(ns="z")),)),
            Rule(peers=(Peer(pod_selector=_sel(pod="b")),), ports=(PolicyPort(TCP, 80),)),
        ),
    )
    state = e2e_state([p2, p1])
    v = _check(state, "x/b", "x/a")
    assert v.allowed
    assert v.ingress.selecting == (PolicyKey("x/p1"), PolicyKey("x/p2"))
    assert v.ingress.allowed_by == (
        RuleRef(PolicyKey("x/p1"), ING, 0),
        RuleRef(PolicyKey("x/p2"), ING, 1),
    )
    assert _allowed(state, "z/a", "x/a")
    assert not _allowed(state, "y/a", "x/a")


# ---------------------------------------------------------------- ports


def _ports_policy(*ports: PolicyPort) -> NetworkPolicy:
    return _pol("x", "ports", _sel(pod="a"), ING, ingress=(Rule(ports=ports),))


def test_numeric_port_and_protocol() -> None:
    state = e2e_state([_ports_policy(PolicyPort(TCP, 81))])
    assert _allowed(state, "y/a", "x/a", 81, TCP)
    assert not _allowed(state, "y/a", "x/a", 80, TCP)
    assert not _allowed(state, "y/a", "x/a", 81, UDP)


def test_port_range() -> None:
    state = e2e_state([_ports_policy(PolicyPort(TCP, 80, 90))])
    assert [p for p in (79, 80, 85, 90, 91) if _allowed(state, "y/a", "x/a", p)] == [80, 85, 90]


def test_protocol_only_port_matches_every_port_of_that_protocol() -> None:
    state = e2e_state([_ports_policy(PolicyPort(UDP))])
    assert _allowed(state, "y/a", "x/a", 1, UDP) and _allowed(state, "y/a", "x/a", 65535, UDP)
    assert not _allowed(state, "y/a", "x/a", 80, TCP)
    assert not _allowed(state, "y/a", "x/a", 80, Protocol.SCTP)


def test_named_port_resolves_on_destination() -> None:
    state = e2e_state([_ports_policy(PolicyPort(TCP, "serve-81-tcp"))])
    assert _allowed(state, "y/a", "x/a", 81, TCP)
    assert not _allowed(state, "y/a", "x/a", 80, TCP)
    assert not _allowed(state, "y/a", "x/a", 81, UDP)
    # Name+protocol must both match the container port: UDP name with TCP rule fails.
    state2 = e2e_state([_ports_policy(PolicyPort(TCP, "serve-81-udp"))])
    assert not _allowed(state2, "y/a", "x/a", 81, TCP)
    assert not _allowed(state2, "y/a", "x/a", 81, UDP)
    state3 = e2e_state([_ports_policy(PolicyPort(UDP, "serve-81-udp"))])
    assert _allowed(state3, "y/a", "x/a", 81, UDP)


def test_named_port_egress_resolves_on_destination_and_never_on_bare_ip() -> None:
    pol = _pol(
        "x",
        "egress-named",
        _sel(pod="a"),
        EGR,
        egress=(Rule(ports=(PolicyPort(TCP, "serve-80-tcp"),)),),
    )
    state = e2e_state([pol])
    assert _allowed(state, "x/a", "y/b", 80)
    assert not _allowed(state, "x/a", "y/b", 81)
    assert not _allowed(state, "x/a", "192.0.2.10", 80)


# ---------------------------------------------------------------- ipBlock, bare IPs


def test_ip_block_with_except_applies_to_pod_ips() -> None:
    # y/b is 10.244.1.6 in the e2e world (index 4); x/b is 10.244.2.3.
    state = e2e_state()
    assert state.pods["y/b"].ip == "10.244.1.6"  # type: ignore[index]
    pol = _pol(
        "x",
        "cidr",
        _sel(pod="a"),
        ING,
        ingress=(Rule(peers=(Peer(ip_block=IPBlock("10.244.0.0/16", ("10.244.1.6/32",))),)),),
    )
    state = e2e_state([pol])
    assert not _allowed(state, "y/b", "x/a")
    assert _allowed(state, "x/b", "x/a")


def test_bare_ip_source_matches_ip_block_not_selectors() -> None:
    pol = _pol(
        "x",
        "mixed",
        _sel(pod="a"),
        ING,
        ingress=(
            Rule(peers=(Peer(pod_selector=LabelSelector(), namespace_selector=LabelSelector()),)),
            Rule(peers=(Peer(ip_block=IPBlock("192.0.2.0/24", ("192.0.2.128/25",))),)),
        ),
    )
    state = e2e_state([pol])
    assert _allowed(state, "192.0.2.1", "x/a")
    assert not _allowed(state, "192.0.2.200", "x/a")
    assert not _allowed(state, "198.51.100.1", "x/a")
    assert not _allowed(state, "2001:db8::1", "x/a")
    v = _check(state, "192.0.2.1", "x/a")
    assert v.ingress.allowed_by == (RuleRef(PolicyKey("x/mixed"), ING, 1),)
    assert not v.egress.isolated  # a bare IP has no egress policies


def test_egress_to_bare_ip() -> None:
    pol = _pol(
        "x",
        "egress-cidr",
        _sel(pod="a"),
        EGR,
        egress=(Rule(peers=(Peer(ip_block=IPBlock("203.0.113.0/24")),)),),
    )
    state = e2e_state([pol])
    assert _allowed(state, "x/a", "203.0.113.9")
    assert not _allowed(state, "x/a", "203.0.114.9")
    assert not _allowed(state, "x/a", "y/a")
    assert _allowed(state, "x/b", "203.0.114.9")


def test_host_network_and_ipless_pods() -> None:
    base = e2e_state(
        [
            DENY_X_INGRESS,
            _pol(
                "y",
                "from-x",
                LabelSelector(),
                ING,
                ingress=(Rule(peers=(Peer(namespace_selector=_sel(ns="x")),)),),
            ),
        ]
    )
    hn = Pod("x", "hn", Labels({"pod": "a"}), "node-1", "192.168.0.1", host_network=True)
    nip = Pod("x", "nip", Labels({"pod": "a"}))
    state = dataclasses.replace(base, pods={**base.pods, hn.key: hn, nip.key: nip})
    # A hostNetwork pod is not isolated by the deny policy of its namespace ...
    assert _allowed(state, "y/a", "x/hn")
    # ... and not matched by the namespace selector of y's policy.
    assert not _allowed(state, "x/hn", "y/a")
    assert _allowed(state, "x/a", "y/a")
    # A pod without IP is never matched by selector peers.
    assert not evaluate(
        state, Endpoint(nip, ""), endpoint_for(state, "y/a"), port=80, protocol=TCP
    ).allowed


# ---------------------------------------------------------------- egress


def test_egress_isolation_and_combination_with_ingress() -> None:
    egress = _pol(
        "x",
        "to-y",
        _sel(pod="a"),
        EGR,
        egress=(Rule(peers=(Peer(namespace_selector=_sel(ns="y")),)),),
    )
    state = e2e_state([egress])
    assert _allowed(state, "x/a", "y/c")
    assert not _allowed(state, "x/a", "z/c")
    assert not _allowed(state, "x/a", "x/a")
    deny_y = _pol("y", "deny", LabelSelector(), ING)
    state2 = e2e_state([egress, deny_y])
    v = _check(state2, "x/a", "y/c")
    assert v.egress.allowed and not v.ingress.allowed and not v.allowed


def test_policy_with_only_ingress_type_ignores_its_egress_rules() -> None:
    pol = _pol("x", "ingress-only", _sel(pod="a"), ING, ingress=(Rule(),), egress=())
    state = e2e_state([pol])
    v = _check(state, "x/a", "z/b")
    assert not v.egress.isolated and v.allowed


# ---------------------------------------------------------------- endpoints, explain


def test_endpoint_for() -> None:
    state = e2e_state()
    a = endpoint_for(state, "x/a")
    assert a.pod is state.pods["x/a"]  # type: ignore[index]
    assert a.ip == "10.244.1.2"
    by_ip = endpoint_for(state, "10.244.1.2")
    assert by_ip.pod is a.pod
    outside = endpoint_for(state, "8.8.8.8")
    assert outside == Endpoint(pod=None, ip="8.8.8.8")
    with pytest.raises(EndpointNotFound, match="'x/nope': no such pod"):
        endpoint_for(state, "x/nope")
    with pytest.raises(KeyError):
        endpoint_for(state, "garbage")
    with pytest.raises(EndpointNotFound) as info:
        endpoint_for(state, "a/b/c")
    assert str(info.value) == "endpoint 'a/b/c': expected <namespace>/<pod> or an IP address"


def test_explain_text_names_policies_and_rules() -> None:
    pol = _pol(
        "x",
        "web",
        _sel(pod="a"),
        ING,
        ingress=(
            Rule(peers=(Peer(pod_selector=_sel(pod="c")),)),
            Rule(
                peers=(Peer(namespace_selector=_sel(ns="y"), pod_selector=_sel(pod="b")),),
                ports=(PolicyPort(TCP, 80, 81),),
            ),
        ),
    )
    state = e2e_state([pol, _pol("y", "deny-egress", LabelSelector(), EGR)])
    text = explain_text(_check(state, "x/b", "x/a"), state)
    assert text.splitlines()[0] == "x/b -> x/a TCP/80: DENIED"
    assert "ingress of x/a: DENIED (isolated by x/web)" in text
    assert "no ingress rule of these policies matches" in text
    state2 = e2e_state([pol])
    text2 = explain_text(_check(state2, "y/b", "x/a"), state2)
    assert text2.splitlines()[0] == "y/b -> x/a TCP/80: ALLOWED"
    assert (
        "allowed by x/web ingress rule 1: from pods [pod=b] in namespaces [ns=y]; ports TCP/80-81"
    ) in text2
    assert "egress of y/b: allowed (not isolated" in text2
    text3 = explain_text(_check(state, "y/b", "x/c"), state)
    assert "egress of y/b: DENIED (isolated by y/deny-egress)" in text3


# ---------------------------------------------------------------- properties


_refs = st.sampled_from(
    [f"{ns}/{p}" for ns in "xyz" for p in "abc"]
    + ["x/hostnet", "y/pending", "10.244.1.2", "192.0.2.7", "10.96.0.1"]
)
_ports = st.sampled_from([80, 81, 82, 443])
_protocols = st.sampled_from(list(Protocol))


def _endpoint(state: ClusterState, ref: str) -> Endpoint:
    if "/" in ref and ref not in state.pods:
        return Endpoint(pod=None, ip="192.0.2.99")
    return endpoint_for(state, ref)


@given(e2e_cluster(), network_policies(), _refs, _refs, _ports, _protocols)
@settings(max_examples=100, deadline=None)
def test_adding_a_policy_never_reduces_an_isolated_pods_allowances(
    state: ClusterState,
    extra: NetworkPolicy,
    src_ref: str,
    dst_ref: str,
    port: int,
    protocol: Protocol,
) -> None:
    src, dst = _endpoint(state, src_ref), _endpoint(state, dst_ref)
    before = evaluate(state, src, dst, port=port, protocol=protocol)
    if extra.key in state.policies:
        return
    grown = dataclasses.replace(state, policies={**state.policies, extra.key: extra})
    after = evaluate(grown, src, dst, port=port, protocol=protocol)
    for b, a in ((before.ingress, after.ingress), (before.egress, after.egress)):
        if b.isolated:
            assert a.isolated
            assert set(b.allowed_by) <= set(a.allowed_by)
            if b.allowed:
                assert a.allowed


@given(
    e2e_cluster(),
    _refs,
    st.sampled_from([f"{ns}/{p}" for ns in "xyz" for p in "abc"]),
    _ports,
    _protocols,
)
@settings(max_examples=80, deadline=None)
def test_allow_all_ingress_rule_allows_all_ingress(
    state: ClusterState, src_ref: str, dst_ref: str, port: int, protocol: Protocol
) -> None:
    src, dst = _endpoint(state, src_ref), endpoint_for(state, dst_ref)
    assert dst.pod is not None
    allow = _pol(dst.pod.namespace, "zz-allow-all", LabelSelector(), ING, ingress=(Rule(),))
    grown = dataclasses.replace(state, policies={**state.policies, allow.key: allow})
    v = evaluate(grown, src, dst, port=port, protocol=protocol)
    assert v.ingress.isolated and v.ingress.allowed
    assert RuleRef(allow.key, ING, 0) in v.ingress.allowed_by


@given(e2e_cluster(), _refs, _refs, _ports, _protocols)
@settings(max_examples=80, deadline=None)
def test_isolated_exactly_when_some_policy_selects_the_pod(
    state: ClusterState, src_ref: str, dst_ref: str, port: int, protocol: Protocol
) -> None:
    src, dst = _endpoint(state, src_ref), _endpoint(state, dst_ref)
    v = evaluate(state, src, dst, port=port, protocol=protocol)

    def selected(pod: Pod | None, direction: PolicyType) -> bool:
        if pod is None or pod.host_network:
            return False
        return any(
            p.namespace == pod.namespace
            and direction in p.policy_types
            and matches(p.pod_selector, pod.labels)
            for p in state.policies.values()
        )

    assert v.egress.isolated == selected(src.pod, EGR)
    assert v.ingress.isolated == selected(dst.pod, ING)
    if not v.egress.isolated:
        assert v.egress.allowed and v.egress.selecting == ()
    if not v.ingress.isolated:
        assert v.ingress.allowed and v.ingress.selecting == ()
    assert v.allowed == (v.egress.allowed and v.ingress.allowed)
    for d in (v.egress, v.ingress):
        assert d.allowed == (not d.isolated or bool(d.allowed_by))
        assert {r.policy for r in d.allowed_by} <= set(d.selecting)
    assert explain_text(v, state).startswith(f"{src} -> {dst} {protocol.value}/{port}: ")
