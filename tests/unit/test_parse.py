"""Parsing NetworkPolicies, Pods, Namespaces and whole manifests into the model."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from hypothesis import given, settings

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
    PodKey,
    PolicyKey,
    PolicyPort,
    PolicyType,
    Protocol,
    Requirement,
    Rule,
)
from policy.parse import build_cluster, parse_namespace, parse_network_policy, parse_pod
from tests.unit.strategies import (
    cluster_to_objs,
    e2e_cluster,
    network_policies,
    network_policy_to_obj,
)

ING = PolicyType.INGRESS
EGR = PolicyType.EGRESS


def _sel(**ml: str) -> LabelSelector:
    return LabelSelector(match_labels=Labels(ml))


# Policies in the shape of the upstream e2e suite (test/e2e/network/netpol) and
# the kubernetes.io NetworkPolicy page, each with the model it must parse to.
E2E_EXAMPLES: list[tuple[str, NetworkPolicy]] = [
    (
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-ingress, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress]
""",
        NetworkPolicy("x", "deny-ingress", LabelSelector(), frozenset({ING})),
    ),
    (
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-all, namespace: x}
spec:
  podSelector: {}
  ingress:
  - {}
""",
        NetworkPolicy("x", "allow-all", LabelSelector(), frozenset({ING}), ingress=(Rule(),)),
    ),
    (
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all-egress, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Egress]
""",
        NetworkPolicy("x", "deny-all-egress", LabelSelector(), frozenset({EGR})),
    ),
    (
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: x-a-allows-x-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - podSelector: {matchLabels: {pod: b}}
""",
        NetworkPolicy(
            "x",
            "x-a-allows-x-b",
            _sel(pod="a"),
            frozenset({ING}),
            ingress=(Rule(peers=(Peer(pod_selector=_sel(pod="b")),)),),
        ),
    ),
    (
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-ns-not-y, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector:
        matchExpressions:
        - {key: ns, operator: NotIn, values: ["y"]}
""",
        NetworkPolicy(
            "x",
            "allow-ns-not-y",
            _sel(pod="a"),
            frozenset({ING}),
            ingress=(
                Rule(
                    peers=(
                        Peer(
                            namespace_selector=LabelSelector(
                                match_expressions=(Requirement("ns", Operator.NOT_IN, ("y",)),)
                            )
                        ),
                    )
                ),
            ),
        ),
    ),
    (
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-ns-y-pod-b-c, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {ns: y}}
      podSelector:
        matchExpressions:
        - {key: pod, operator: In, values: [c, b, b]}
""",
        NetworkPolicy(
            "x",
            "allow-ns-y-pod-b-c",
            _sel(pod="a"),
            frozenset({ING}),
            ingress=(
                Rule(
                    peers=(
                        Peer(
                            namespace_selector=_sel(ns="y"),
                            pod_selector=LabelSelector(
                                match_expressions=(Requirement("pod", Operator.IN, ("b", "c")),)
                            ),
                        ),
                    )
                ),
            ),
        ),
    ),
    (
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-client-a-via-except-cidr-egress-rule, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - to:
    - ipBlock:
        cidr: 10.244.0.0/16
        except: [10.244.1.2/32]
""",
        NetworkPolicy(
            "x",
            "deny-client-a-via-except-cidr-egress-rule",
            _sel(pod="a"),
            frozenset({EGR}),
            egress=(Rule(peers=(Peer(ip_block=IPBlock("10.244.0.0/16", ("10.244.1.2/32",))),)),),
        ),
    ),
    (
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-ingress-on-port-81, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - ports:
    - port: serve-81-tcp
""",
        NetworkPolicy(
            "x",
            "allow-ingress-on-port-81",
            _sel(pod="a"),
            frozenset({ING}),
            ingress=(Rule(ports=(PolicyPort(Protocol.TCP, "serve-81-tcp"),)),),
        ),
    ),
    (
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-ingress-port-range, namespace: x}
spec:
  podSelector: {}
  ingress:
  - ports:
    - {protocol: TCP, port: 80, endPort: 81}
    - {protocol: UDP}
    - {protocol: SCTP, port: 80}
""",
        NetworkPolicy(
            "x",
            "allow-ingress-port-range",
            LabelSelector(),
            frozenset({ING}),
            ingress=(
                Rule(
                    ports=(
                        PolicyPort(Protocol.TCP, 80, 81),
                        PolicyPort(Protocol.UDP),
                        PolicyPort(Protocol.SCTP, 80),
                    )
                ),
            ),
        ),
    ),
    (
        # The kubernetes.io "test-network-policy" example.
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: test-network-policy
  namespace: default
spec:
  podSelector:
    matchLabels:
      role: db
  policyTypes:
  - Ingress
  - Egress
  ingress:
  - from:
    - ipBlock:
        cidr: 172.17.0.0/16
        except:
        - 172.17.1.0/24
    - namespaceSelector:
        matchLabels:
          project: myproject
    - podSelector:
        matchLabels:
          role: frontend
    ports:
    - protocol: TCP
      port: 6379
  egress:
  - to:
    - ipBlock:
        cidr: 10.0.0.0/24
    ports:
    - protocol: TCP
      port: 5978
""",
        NetworkPolicy(
            "default",
            "test-network-policy",
            _sel(role="db"),
            frozenset({ING, EGR}),
            ingress=(
                Rule(
                    peers=(
                        Peer(ip_block=IPBlock("172.17.0.0/16", ("172.17.1.0/24",))),
                        Peer(namespace_selector=_sel(project="myproject")),
                        Peer(pod_selector=_sel(role="frontend")),
                    ),
                    ports=(PolicyPort(Protocol.TCP, 6379),),
                ),
            ),
            egress=(
                Rule(
                    peers=(Peer(ip_block=IPBlock("10.0.0.0/24")),),
                    ports=(PolicyPort(Protocol.TCP, 5978),),
                ),
            ),
        ),
    ),
]


@pytest.mark.parametrize(("text", "expected"), E2E_EXAMPLES, ids=[e.name for _, e in E2E_EXAMPLES])
def test_e2e_examples_parse(text: str, expected: NetworkPolicy) -> None:
    obj = yaml.safe_load(text)
    got = parse_network_policy(obj)
    assert got == expected
    # And back: the model re-serialised parses to itself.
    assert parse_network_policy(network_policy_to_obj(got)) == got


@given(network_policies())
@settings(max_examples=150)
def test_round_trip_random_policies(np: NetworkPolicy) -> None:
    assert parse_network_policy(network_policy_to_obj(np)) == np


# ---------------------------------------------------------------- defaulting


def _spec_types(spec: dict[str, Any]) -> frozenset[PolicyType]:
    obj = {"kind": "NetworkPolicy", "metadata": {"name": "p"}, "spec": spec}
    return parse_network_policy(obj).policy_types


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"podSelector": {}}, {ING}),
        ({"podSelector": {}, "ingress": [{}]}, {ING}),
        ({"podSelector": {}, "egress": [{}]}, {ING, EGR}),
        ({"podSelector": {}, "egress": []}, {ING}),
        ({"podSelector": {}, "egress": None}, {ING}),
        ({"podSelector": {}, "policyTypes": [], "egress": [{"to": []}]}, {ING, EGR}),
        ({"podSelector": {}, "policyTypes": None, "egress": [{}]}, {ING, EGR}),
        ({"podSelector": {}, "policyTypes": ["Egress"], "ingress": [{}]}, {EGR}),
        ({"podSelector": {}, "policyTypes": ["Ingress"], "egress": [{}]}, {ING}),
        ({"podSelector": {}, "policyTypes": ["Egress", "Ingress"]}, {ING, EGR}),
    ],
)
def test_policy_types_defaulting(spec: dict[str, Any], expected: set[PolicyType]) -> None:
    assert _spec_types(spec) == frozenset(expected)


def test_namespace_defaults_and_empty_lists() -> None:
    obj = {
        "kind": "NetworkPolicy",
        "metadata": {"name": "p"},
        "spec": {
            "ingress": [{"from": [], "ports": []}, {"from": None}],
            "egress": [{"to": [{"podSelector": {}}], "ports": [{"port": 53, "protocol": "UDP"}]}],
        },
    }
    np = parse_network_policy(obj)
    assert np.namespace == "default"
    assert np.key == PolicyKey("default/p")
    assert np.pod_selector == LabelSelector()  # absent podSelector selects all
    assert np.ingress == (Rule(), Rule())
    assert np.egress == (
        Rule(peers=(Peer(pod_selector=LabelSelector()),), ports=(PolicyPort(Protocol.UDP, 53),)),
    )


def test_protocol_defaults_to_tcp_and_ipv6_is_canonicalised() -> None:
    obj = {
        "kind": "NetworkPolicy",
        "metadata": {"name": "p", "namespace": "x"},
        "spec": {
            "podSelector": {},
            "ingress": [
                {
                    "from": [
                        {"ipBlock": {"cidr": "2001:DB8:0:0::1/64", "except": ["2001:db8::/96"]}}
                    ],
                    "ports": [{"port": 443}],
                }
            ],
        },
    }
    rule = parse_network_policy(obj).ingress[0]
    assert rule.ports == (PolicyPort(Protocol.TCP, 443),)
    assert rule.peers[0].ip_block == IPBlock("2001:db8::/64", ("2001:db8::/96",))


def test_selector_null_vs_empty_in_peers() -> None:
    obj = {
        "kind": "NetworkPolicy",
        "metadata": {"name": "p", "namespace": "x"},
        "spec": {
            "podSelector": {},
            "ingress": [
                {
                    "from": [
                        {"namespaceSelector": {}, "podSelector": None},
                        {"podSelector": {}},
                    ]
                }
            ],
        },
    }
    peers = parse_network_policy(obj).ingress[0].peers
    assert peers[0] == Peer(pod_selector=None, namespace_selector=LabelSelector())
    assert peers[1] == Peer(pod_selector=LabelSelector(), namespace_selector=None)


# ---------------------------------------------------------------- pods, namespaces


def test_parse_pod_fields() -> None:
    pod = parse_pod(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "a", "namespace": "x", "labels": {"pod": "a"}},
            "spec": {
                "nodeName": "node-1",
                "containers": [
                    {
                        "name": "c80",
                        "ports": [
                            {"containerPort": 80, "name": "serve-80-tcp"},
                            {"containerPort": 80, "protocol": "UDP"},
                        ],
                    },
                    {"name": "side"},
                    {
                        "name": "c81",
                        "ports": [
                            {"containerPort": 81, "protocol": "SCTP", "name": "serve-81-sctp"}
                        ],
                    },
                ],
            },
            "status": {"podIP": "10.244.1.2", "podIPs": [{"ip": "10.244.1.2"}]},
        }
    )
    assert pod.key == PodKey("x/a")
    assert pod.labels == {"pod": "a"}
    assert (pod.node, pod.ip, pod.host_network) == ("node-1", "10.244.1.2", False)
    assert pod.ports == (
        ContainerPort(80, Protocol.TCP, "serve-80-tcp"),
        ContainerPort(80, Protocol.UDP, None),
        ContainerPort(81, Protocol.SCTP, "serve-81-sctp"),
    )


def test_parse_pod_ip_sources_and_defaults() -> None:
    pending = parse_pod({"kind": "Pod", "metadata": {"name": "p"}, "spec": {}})
    assert (pending.namespace, pending.ip, pending.node, pending.ports) == (
        "default",
        None,
        None,
        (),
    )
    from_ips = parse_pod(
        {
            "kind": "Pod",
            "metadata": {"name": "p"},
            "status": {"podIPs": [{"ip": "fd00::0:1"}, {"ip": "10.0.0.1"}]},
        }
    )
    assert from_ips.ip == "fd00::1"
    host = parse_pod(
        {
            "kind": "Pod",
            "metadata": {"name": "h"},
            "spec": {"hostNetwork": True},
            "status": {"podIP": "192.168.0.1"},
        }
    )
    assert host.host_network is True and host.ip == "192.168.0.1"


def test_parse_namespace_sets_metadata_name_label() -> None:
    ns = parse_namespace(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x", "labels": {"ns": "x"}}}
    )
    assert ns == Namespace("x", Labels({"ns": "x", "kubernetes.io/metadata.name": "x"}))
    # A user cannot fake it: the apiserver overwrites the label.
    forged = parse_namespace(
        {
            "kind": "Namespace",
            "metadata": {"name": "x", "labels": {"kubernetes.io/metadata.name": "y"}},
        }
    )
    assert forged.labels["kubernetes.io/metadata.name"] == "x"


# ---------------------------------------------------------------- build_cluster


def _doc(kind: str, name: str, namespace: str | None = None, **extra: Any) -> dict[str, Any]:
    api = "networking.k8s.io/v1" if kind == "NetworkPolicy" else "v1"
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    return {"apiVersion": api, "kind": kind, "metadata": meta, **extra}


def test_build_cluster_mixed_stream() -> None:
    objs = [
        _doc("Namespace", "x"),
        _doc("Pod", "a", "x", status={"podIP": "10.0.0.1"}),
        _doc("Pod", "b", "q"),  # namespace q never declared
        _doc("NetworkPolicy", "deny", "x", spec={"podSelector": {}}),
        _doc("NetworkPolicy", "bad", "x", spec={"podSelector": {}, "policyTypes": ["No"]}),
        {"apiVersion": "felixlite.io/v1alpha1", "kind": "BGPPeer", "metadata": {"name": "tor"}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}},
        {"not": "an object"},
    ]
    state, errors = build_cluster(objs)
    assert set(state.namespaces) == {"x", "q"}
    assert state.namespaces["q"] == Namespace("q", Labels({"kubernetes.io/metadata.name": "q"}))
    assert set(state.pods) == {"x/a", "q/b"}
    assert set(state.policies) == {"x/deny"}
    assert [str(e) for e in errors] == [
        "networkpolicy x/bad: spec.policyTypes[0]: unsupported value 'No': "
        "must be Ingress or Egress"
    ]


def test_build_cluster_checks_api_version() -> None:
    objs = [
        {
            "apiVersion": "extensions/v1beta1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "old", "namespace": "x"},
            "spec": {},
        },
        {"kind": "Pod", "metadata": {"name": "a", "namespace": "x"}},
    ]
    state, errors = build_cluster(objs)
    assert not state.policies and not state.pods
    assert [str(e) for e in errors] == [
        "networkpolicy x/old: apiVersion: unsupported apiVersion 'extensions/v1beta1' for "
        "NetworkPolicy: must be networking.k8s.io/v1",
        "pod x/a: apiVersion: unsupported apiVersion None for Pod: must be v1",
    ]


def test_build_cluster_expands_lists() -> None:
    objs = [
        {
            "apiVersion": "v1",
            "kind": "List",
            "items": [
                _doc("Namespace", "y"),
                _doc("Pod", "a", "y"),
            ],
        },
        {
            "apiVersion": "v1",
            "kind": "PodList",
            "items": [
                {"metadata": {"name": "b", "namespace": "y"}},  # typed list items carry no kind
            ],
        },
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicyList",
            "items": [
                {"metadata": {"name": "p", "namespace": "y"}, "spec": {}},
            ],
        },
    ]
    state, errors = build_cluster(objs)
    assert errors == []
    assert set(state.pods) == {"y/a", "y/b"}
    assert set(state.policies) == {"y/p"}


def test_build_cluster_later_documents_replace_earlier() -> None:
    objs = [
        _doc("Pod", "a", "x", status={"podIP": "10.0.0.1"}),
        _doc("NetworkPolicy", "p", "x", spec={"podSelector": {}}),
        _doc("Pod", "a", "x", status={"podIP": "10.0.0.2"}),
        _doc("NetworkPolicy", "p", "x", spec={"podSelector": {}, "policyTypes": ["Egress"]}),
        # A broken later version is reported; the earlier good one stays.
        _doc(
            "NetworkPolicy",
            "p",
            "x",
            spec={"podSelector": {}, "ingress": [{"ports": [{"port": -1}]}]},
        ),
    ]
    state, errors = build_cluster(objs)
    assert state.pods[PodKey("x/a")].ip == "10.0.0.2"
    assert state.policies[PolicyKey("x/p")].policy_types == frozenset({EGR})
    assert [e.field for e in errors] == ["spec.ingress[0].ports[0].port"]


def test_build_cluster_empty() -> None:
    assert build_cluster([]) == (ClusterState(), [])


@given(e2e_cluster())
@settings(max_examples=40)
def test_build_cluster_round_trip(state: ClusterState) -> None:
    rebuilt, errors = build_cluster(cluster_to_objs(state))
    assert errors == []
    assert dict(rebuilt.namespaces) == dict(state.namespaces)
    assert dict(rebuilt.pods) == dict(state.pods)
    assert dict(rebuilt.policies) == dict(state.policies)
