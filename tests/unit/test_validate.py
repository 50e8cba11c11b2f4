"""Validation of NetworkPolicy, Pod and Namespace objects: exact errors."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from policy.errors import PolicyError
from policy.parse import (
    parse_namespace,
    parse_network_policy,
    parse_pod,
    validate_network_policy,
)


def _np(
    spec: dict[str, Any], *, name: str = "allow-web", namespace: str | None = "y"
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": meta,
        "spec": spec,
    }


def _ingress_ports(*ports: dict[str, Any]) -> dict[str, Any]:
    return {"podSelector": {}, "ingress": [{"ports": list(ports)}]}


def _ingress_from(*peers: dict[str, Any]) -> dict[str, Any]:
    return {"podSelector": {}, "ingress": [{"from": list(peers)}]}


def _pod_sel(sel: dict[str, Any]) -> dict[str, Any]:
    return {"podSelector": sel}


P = "networkpolicy y/allow-web"

INVALID: list[tuple[str, dict[str, Any], str]] = [
    # ---- ports
    (
        "endport-below-port",
        _ingress_ports({"port": 80}, {"port": 90, "endPort": 80}),
        f"{P}: spec.ingress[0].ports[1].endPort: must be >= port",
    ),
    (
        "endport-too-big",
        _ingress_ports({"port": 80, "endPort": 70000}),
        f"{P}: spec.ingress[0].ports[0].endPort: must be between 1 and 65535, inclusive",
    ),
    (
        "endport-with-named-port",
        _ingress_ports({"port": "http", "endPort": 90}),
        f"{P}: spec.ingress[0].ports[0].endPort: may not be set when port is a name",
    ),
    (
        "endport-without-port",
        _ingress_ports({"protocol": "TCP", "endPort": 90}),
        f"{P}: spec.ingress[0].ports[0].endPort: may not be set when port is not set",
    ),
    (
        "endport-not-int",
        _ingress_ports({"port": 80, "endPort": "90"}),
        f"{P}: spec.ingress[0].ports[0].endPort: must be an integer, not string",
    ),
    (
        "port-zero",
        _ingress_ports({"port": 0}),
        f"{P}: spec.ingress[0].ports[0].port: must be between 1 and 65535, inclusive",
    ),
    (
        "port-too-big",
        _ingress_ports({"port": 65536}),
        f"{P}: spec.ingress[0].ports[0].port: must be between 1 and 65535, inclusive",
    ),
    (
        "port-numeric-string",
        _ingress_ports({"port": "80"}),
        f"{P}: spec.ingress[0].ports[0].port: invalid port name '80': "
        "must contain at least one letter (a-z)",
    ),
    (
        "port-name-too-long",
        _ingress_ports({"port": "a-very-long-port-name"}),
        f"{P}: spec.ingress[0].ports[0].port: invalid port name 'a-very-long-port-name': "
        "must be no more than 15 characters",
    ),
    (
        "port-name-uppercase",
        _ingress_ports({"port": "HTTP"}),
        f"{P}: spec.ingress[0].ports[0].port: invalid port name 'HTTP': "
        "must contain only a-z, 0-9 and '-'",
    ),
    (
        "port-name-double-hyphen",
        _ingress_ports({"port": "my--port"}),
        f"{P}: spec.ingress[0].ports[0].port: invalid port name 'my--port': "
        "must not contain consecutive hyphens",
    ),
    (
        "port-name-leading-hyphen",
        _ingress_ports({"port": "-http"}),
        f"{P}: spec.ingress[0].ports[0].port: invalid port name '-http': "
        "must not begin or end with a hyphen",
    ),
    (
        "port-bool",
        _ingress_ports({"port": True}),
        f"{P}: spec.ingress[0].ports[0].port: must be an integer or a port name, not boolean",
    ),
    (
        "protocol-icmp",
        _ingress_ports({"protocol": "ICMP", "port": 80}),
        f"{P}: spec.ingress[0].ports[0].protocol: unsupported protocol 'ICMP': "
        "must be TCP, UDP or SCTP",
    ),
    (
        "protocol-lowercase",
        {"podSelector": {}, "egress": [{"ports": [{"protocol": "tcp"}]}]},
        f"{P}: spec.egress[0].ports[0].protocol: unsupported protocol 'tcp': "
        "must be TCP, UDP or SCTP",
    ),
    # ---- peers
    (
        "peer-empty",
        _ingress_from({"podSelector": {}}, {}),
        f"{P}: spec.ingress[0].from[1]: must specify a peer "
        "(podSelector, namespaceSelector or ipBlock)",
    ),
    (
        "peer-ipblock-and-pods",
        {
            "podSelector": {},
            "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}],
        },
        f"{P}: spec.egress[0].to[0]: may not specify both ipBlock and another peer",
    ),
    (
        "peer-ipblock-and-namespaces",
        _ingress_from({"ipBlock": {"cidr": "10.0.0.0/8"}, "namespaceSelector": {}}),
        f"{P}: spec.ingress[0].from[0]: may not specify both ipBlock and another peer",
    ),
    (
        "cidr-missing",
        _ingress_from({"ipBlock": {"except": ["10.0.0.0/16"]}}),
        f"{P}: spec.ingress[0].from[0].ipBlock.cidr: required",
    ),
    (
        "cidr-garbage",
        _ingress_from({"ipBlock": {"cidr": "10.0.0/8"}}),
        f"{P}: spec.ingress[0].from[0].ipBlock.cidr: invalid CIDR '10.0.0/8': "
        "must be like 10.9.8.0/24 or 2001:db8::/64",
    ),
    (
        "cidr-no-prefix",
        _ingress_from({"ipBlock": {"cidr": "10.0.0.1"}}),
        f"{P}: spec.ingress[0].from[0].ipBlock.cidr: invalid CIDR '10.0.0.1': "
        "must be like 10.9.8.0/24 or 2001:db8::/64",
    ),
    (
        "cidr-prefix-too-long",
        _ingress_from({"ipBlock": {"cidr": "10.0.0.0/33"}}),
        f"{P}: spec.ingress[0].from[0].ipBlock.cidr: invalid CIDR '10.0.0.0/33': "
        "must be like 10.9.8.0/24 or 2001:db8::/64",
    ),
    (
        "cidr-v6-prefix-too-long",
        _ingress_from({"ipBlock": {"cidr": "2001:db8::/129"}}),
        f"{P}: spec.ingress[0].from[0].ipBlock.cidr: invalid CIDR '2001:db8::/129': "
        "must be like 10.9.8.0/24 or 2001:db8::/64",
    ),
    (
        "cidr-v4-mapped",
        _ingress_from({"ipBlock": {"cidr": "::ffff:10.0.0.0/104"}}),
        f"{P}: spec.ingress[0].from[0].ipBlock.cidr: invalid CIDR '::ffff:10.0.0.0/104': "
        "must not have an IPv4-mapped IPv6 address",
    ),
    (
        "except-outside",
        _ingress_from({"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.1.0.0/24"]}}),
        f"{P}: spec.ingress[0].from[0].ipBlock.except[0]: '10.1.0.0/24' must be a strict "
        "subset of cidr '10.0.0.0/16'",
    ),
    (
        "except-equal",
        _ingress_from(
            {"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.1.0/24", "10.0.0.0/16"]}}
        ),
        f"{P}: spec.ingress[0].from[0].ipBlock.except[1]: '10.0.0.0/16' must be a strict "
        "subset of cidr '10.0.0.0/16'",
    ),
    (
        "except-wider",
        _ingress_from({"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.0.0/8"]}}),
        f"{P}: spec.ingress[0].from[0].ipBlock.except[0]: '10.0.0.0/8' must be a strict "
        "subset of cidr '10.0.0.0/16'",
    ),
    (
        "except-other-family",
        _ingress_from({"ipBlock": {"cidr": "10.0.0.0/8", "except": ["2001:db8::/64"]}}),
        f"{P}: spec.ingress[0].from[0].ipBlock.except[0]: '2001:db8::/64' must be a strict "
        "subset of cidr '10.0.0.0/8'",
    ),
    (
        "except-garbage",
        _ingress_from({"ipBlock": {"cidr": "10.0.0.0/8", "except": ["bogus"]}}),
        f"{P}: spec.ingress[0].from[0].ipBlock.except[0]: invalid CIDR 'bogus': "
        "must be like 10.9.8.0/24 or 2001:db8::/64",
    ),
    # ---- selectors
    (
        "operator-unknown",
        _pod_sel({"matchExpressions": [{"key": "app", "operator": "Equals", "values": ["a"]}]}),
        f"{P}: spec.podSelector.matchExpressions[0].operator: unsupported operator 'Equals': "
        "must be In, NotIn, Exists or DoesNotExist",
    ),
    (
        "operator-missing",
        _pod_sel({"matchExpressions": [{"key": "app", "values": ["a"]}]}),
        f"{P}: spec.podSelector.matchExpressions[0].operator: required",
    ),
    (
        "in-without-values",
        _pod_sel({"matchExpressions": [{"key": "app", "operator": "In"}]}),
        f"{P}: spec.podSelector.matchExpressions[0].values: "
        "must be specified when operator is In or NotIn",
    ),
    (
        "notin-empty-values",
        _pod_sel({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": []}]}),
        f"{P}: spec.podSelector.matchExpressions[0].values: "
        "must be specified when operator is In or NotIn",
    ),
    (
        "exists-with-values",
        _pod_sel({"matchExpressions": [{"key": "app", "operator": "Exists", "values": ["a"]}]}),
        f"{P}: spec.podSelector.matchExpressions[0].values: "
        "may not be specified when operator is Exists or DoesNotExist",
    ),
    (
        "expression-bad-key",
        _pod_sel({"matchExpressions": [{"key": "-app", "operator": "Exists"}]}),
        f"{P}: spec.podSelector.matchExpressions[0].key: invalid label key '-app': name part "
        "must consist of alphanumerics, '-', '_' or '.', starting and ending with an alphanumeric",
    ),
    (
        "expression-bad-value",
        _ingress_from(
            {
                "namespaceSelector": {
                    "matchExpressions": [{"key": "ns", "operator": "In", "values": ["x", "not ok"]}]
                }
            }
        ),
        f"{P}: spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].values[1]: "
        "invalid label value 'not ok': must be empty or consist of alphanumerics, '-', '_' or "
        "'.', starting and ending with an alphanumeric",
    ),
    (
        "match-labels-bad-prefix",
        _pod_sel({"matchLabels": {"Example.com/app": "web"}}),
        f"{P}: spec.podSelector.matchLabels[Example.com/app]: invalid label key "
        "'Example.com/app': prefix part must be a lowercase RFC 1123 subdomain (lowercase "
        "alphanumerics, '-' and '.', starting and ending with an alphanumeric)",
    ),
    (
        "match-labels-empty-prefix",
        _pod_sel({"matchLabels": {"/app": "web"}}),
        f"{P}: spec.podSelector.matchLabels[/app]: invalid label key '/app': "
        "prefix part must be non-empty",
    ),
    (
        "match-labels-long-name",
        _pod_sel({"matchLabels": {"a" * 64: "web"}}),
        f"{P}: spec.podSelector.matchLabels[{'a' * 64}]: invalid label key '{'a' * 64}': "
        "name part must be no more than 63 characters",
    ),
    (
        "match-labels-long-value",
        _pod_sel({"matchLabels": {"app": "v" * 64}}),
        f"{P}: spec.podSelector.matchLabels[app]: invalid label value '{'v' * 64}': "
        "must be no more than 63 characters",
    ),
    (
        "match-labels-int-value",
        _pod_sel({"matchLabels": {"version": 2}}),
        f"{P}: spec.podSelector.matchLabels[version]: must be a string, not integer",
    ),
    (
        "peer-pod-selector-bad",
        {
            "podSelector": {},
            "egress": [
                {
                    "to": [
                        {
                            "podSelector": {
                                "matchExpressions": [
                                    {"key": "a", "operator": "DoesNotExist", "values": ["x"]}
                                ]
                            }
                        }
                    ]
                }
            ],
        },
        f"{P}: spec.egress[0].to[0].podSelector.matchExpressions[0].values: "
        "may not be specified when operator is Exists or DoesNotExist",
    ),
    # ---- policyTypes
    (
        "policy-type-unknown",
        {"podSelector": {}, "policyTypes": ["Ingress", "Both"]},
        f"{P}: spec.policyTypes[1]: unsupported value 'Both': must be Ingress or Egress",
    ),
    (
        "policy-type-duplicate",
        {"podSelector": {}, "policyTypes": ["Egress", "Egress"]},
        f"{P}: spec.policyTypes[1]: duplicate value 'Egress'",
    ),
    (
        "policy-type-lowercase",
        {"podSelector": {}, "policyTypes": ["ingress"]},
        f"{P}: spec.policyTypes[0]: unsupported value 'ingress': must be Ingress or Egress",
    ),
    # ---- shapes
    (
        "ingress-not-list",
        {"podSelector": {}, "ingress": {"from": []}},
        f"{P}: spec.ingress: must be a list, not mapping",
    ),
    (
        "from-not-list",
        {"podSelector": {}, "ingress": [{"from": "everyone"}]},
        f"{P}: spec.ingress[0].from: must be a list, not string",
    ),
    (
        "pod-selector-not-mapping",
        {"podSelector": ["app"]},
        f"{P}: spec.podSelector: must be a mapping, not list",
    ),
]


@pytest.mark.parametrize(("case", "spec", "message"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_policy(case: str, spec: dict[str, Any], message: str) -> None:
    obj = _np(spec)
    with pytest.raises(PolicyError) as info:
        parse_network_policy(obj)
    assert str(info.value) == message
    errors = validate_network_policy(obj)
    assert errors, case
    assert str(errors[0]) == message


def test_at_least_25_invalid_cases_each_naming_a_field() -> None:
    assert len(INVALID) >= 25
    for _, spec, message in INVALID:
        err = validate_network_policy(_np(spec))[0]
        assert err.field.startswith("spec."), message
        assert f": {err.field}: " in message


def test_error_attributes() -> None:
    with pytest.raises(PolicyError) as info:
        parse_network_policy(_np(_ingress_ports({"port": 80}, {"port": 90, "endPort": 80})))
    err = info.value
    assert (err.kind, err.namespace, err.name) == ("networkpolicy", "y", "allow-web")
    assert err.field == "spec.ingress[0].ports[1].endPort"
    assert err.message == "must be >= port"
    assert isinstance(err, ValueError)


def test_validate_collects_all_errors_in_document_order() -> None:
    spec = {
        "podSelector": {"matchExpressions": [{"key": "a", "operator": "Nope"}]},
        "policyTypes": ["Sideways"],
        "ingress": [{"from": [{}], "ports": [{"port": 0}]}],
        "egress": [{"to": [{"ipBlock": {"cidr": "1.2.3.0/24", "except": ["9.9.9.0/28"]}}]}],
    }
    fields = [e.field for e in validate_network_policy(_np(spec))]
    assert fields == [
        "spec.podSelector.matchExpressions[0].operator",
        "spec.policyTypes[0]",
        "spec.ingress[0].from[0]",
        "spec.ingress[0].ports[0].port",
        "spec.egress[0].to[0].ipBlock.except[0]",
    ]


def test_valid_policy_has_no_errors() -> None:
    spec = {
        "podSelector": {"matchLabels": {"example.com/app": "web", "empty": ""}},
        "ingress": [
            {
                "from": [{"ipBlock": {"cidr": "2001:db8::/48", "except": ["2001:db8:0:1::/64"]}}],
                "ports": [{"port": "http-alt"}, {"port": 1, "endPort": 65535, "protocol": "SCTP"}],
            }
        ],
    }
    assert validate_network_policy(_np(spec)) == []


def test_metadata_name_required_and_checked() -> None:
    obj = _np({"podSelector": {}})
    del obj["metadata"]["name"]
    assert str(validate_network_policy(obj)[0]) == "networkpolicy y/: metadata.name: required"
    bad = _np({"podSelector": {}}, name="Allow_Web")
    assert str(validate_network_policy(bad)[0]).startswith(
        "networkpolicy y/Allow_Web: metadata.name: invalid name 'Allow_Web': must be a lowercase"
    )


def test_missing_namespace_is_default_in_errors() -> None:
    obj = _np(_ingress_ports({"port": 0}), namespace=None)
    assert str(validate_network_policy(obj)[0]).startswith("networkpolicy default/allow-web: ")


def test_unknown_spec_fields_are_ignored() -> None:
    obj = _np({"podSelector": {}, "futureField": {"x": 1}})
    assert validate_network_policy(obj) == []


def test_cidr_with_host_bits_is_accepted_and_masked() -> None:
    # The default apiserver (no StrictIPCIDRValidation) parses it sloppily.
    obj = _np(_ingress_from({"ipBlock": {"cidr": "192.168.1.7/24", "except": ["192.168.1.9/30"]}}))
    block = parse_network_policy(obj).ingress[0].peers[0].ip_block
    assert block is not None
    assert block.cidr == "192.168.1.0/24"
    assert block.except_ == ("192.168.1.8/30",)


def test_cidr_leading_zeros_read_as_decimal() -> None:
    obj = _np(_ingress_from({"ipBlock": {"cidr": "010.001.0.0/16"}}))
    block = parse_network_policy(obj).ingress[0].peers[0].ip_block
    assert block is not None and block.cidr == "10.1.0.0/16"


def test_validation_does_not_mutate_input() -> None:
    obj = _np(_ingress_ports({"port": 80}))
    before = copy.deepcopy(obj)
    parse_network_policy(obj)
    assert obj == before


# ---------------------------------------------------------------- pods, namespaces


def _pod(**over: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "a", "namespace": "x", "labels": {"pod": "a"}},
        "spec": {
            "nodeName": "node-1",
            "containers": [{"name": "c", "ports": [{"containerPort": 80, "name": "serve-80-tcp"}]}],
        },
        "status": {"podIP": "10.244.1.2"},
    }
    for path, value in over.items():
        node = obj
        *parents, last = path.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    return obj


POD_INVALID: list[tuple[dict[str, Any], str]] = [
    (_pod(status={"podIP": "10.244.1"}), "pod x/a: status.podIP: invalid IP address '10.244.1'"),
    (
        _pod(status={"podIPs": [{"ip": "nope"}]}),
        "pod x/a: status.podIPs[0].ip: invalid IP address 'nope'",
    ),
    (_pod(spec={"hostNetwork": "yes"}), "pod x/a: spec.hostNetwork: must be a boolean, not string"),
    (
        _pod(spec={"containers": [{"ports": [{"containerPort": 0}]}]}),
        "pod x/a: spec.containers[0].ports[0].containerPort: "
        "must be between 1 and 65535, inclusive",
    ),
    (
        _pod(spec={"containers": [{}, {"ports": [{"name": "http"}]}]}),
        "pod x/a: spec.containers[1].ports[0].containerPort: required",
    ),
    (
        _pod(spec={"containers": [{"ports": [{"containerPort": 80, "protocol": "ICMP"}]}]}),
        "pod x/a: spec.containers[0].ports[0].protocol: unsupported protocol 'ICMP': "
        "must be TCP, UDP or SCTP",
    ),
    (
        _pod(spec={"containers": [{"ports": [{"containerPort": 80, "name": "Web"}]}]}),
        "pod x/a: spec.containers[0].ports[0].name: invalid port name 'Web': "
        "must contain only a-z, 0-9 and '-'",
    ),
    (
        _pod(metadata__labels={"pod": "a b"}),
        "pod x/a: metadata.labels[pod]: invalid label value 'a b': must be empty or consist of "
        "alphanumerics, '-', '_' or '.', starting and ending with an alphanumeric",
    ),
]


@pytest.mark.parametrize(("obj", "message"), POD_INVALID)
def test_invalid_pod(obj: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_pod(obj)
    assert str(info.value) == message
    assert info.value.kind == "pod"


def test_invalid_namespace_is_cluster_scoped_in_message() -> None:
    obj = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": "x", "labels": {"team": ["a"]}},
    }
    with pytest.raises(PolicyError) as info:
        parse_namespace(obj)
    assert str(info.value) == "namespace x: metadata.labels[team]: must be a string, not list"
    assert info.value.namespace is None


def test_namespace_name_must_be_dns_label() -> None:
    obj = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a.b"}}
    with pytest.raises(PolicyError) as info:
        parse_namespace(obj)
    assert info.value.field == "metadata.name"
    assert str(info.value).startswith("namespace a.b: metadata.name: invalid name 'a.b': ")
