"""The ported upstream NetworkPolicy e2e cases against the spec oracle, and the
case loader itself.

Every cell of every probe of every case must agree with `policy.evaluate`: a
disagreement is either a porting error in `tests/conformance/cases/` or an
oracle bug, and either way the two truths (upstream's tables and our reading of
the spec) must not drift apart silently.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conformance.loader import (
    CASES_DIR,
    IGNORE_LOOPBACK,
    PODS,
    Case,
    CaseFormatError,
    Probe,
    build_matrix,
    default_ips,
    delete_objects,
    iter_probes,
    load_case,
    load_cases,
    mismatches,
    model_objects,
    render_matrix,
    state_objects,
    step_objects,
)

IPS = default_ips()
CASES = load_cases(IPS)

# Upstream network_policy.go: 42 It()s in "Netpol / NetworkPolicy between
# server and client", 3 in the UDP context, 3 in the SCTP context.
UPSTREAM_IT_COUNT = 48
REPEATED_ACROSS_CONTEXTS = {
    "should support a 'default-deny-ingress' policy": 3,
    "should enforce policy based on Ports": 3,
    "should enforce policy to allow traffic only from a pod in a different namespace based "
    "on PodSelector and NamespaceSelector": 3,
}


def _probe_params() -> list[Any]:
    params = []
    for case in CASES:
        for i, j, probe in iter_probes(case):
            params.append(
                pytest.param(case, i, j, id=f"{case.name}/step{i}/{probe.protocol}-{probe.port}")
            )
    return params


# --------------------------------------------------------------------------
# The oracle against upstream's truth tables


@pytest.fixture(scope="module")
def oracle() -> Callable[[list[dict[str, Any]], Probe], dict[tuple[str, str], bool]]:
    # Imported here, not at module level, so the loader tests below still run
    # (and report) if the oracle is broken.
    from policy.evaluate import endpoint_for, evaluate
    from policy.model import Protocol
    from policy.parse import build_cluster

    def run(objects: list[dict[str, Any]], probe: Probe) -> dict[tuple[str, str], bool]:
        state, errors = build_cluster(objects)
        assert not errors, "case objects rejected by policy.parse: " + "; ".join(map(str, errors))
        eps = {pod: endpoint_for(state, pod) for pod in PODS}
        proto = Protocol(probe.protocol)
        return {
            (src, dst): evaluate(state, eps[src], eps[dst], port=probe.port, protocol=proto).allowed
            for src in PODS
            for dst in PODS
        }

    return run


@pytest.mark.parametrize(("case", "step", "index"), _probe_params())
def test_oracle_agrees_with_upstream(
    oracle: Callable[[list[dict[str, Any]], Probe], dict[tuple[str, str], bool]],
    case: Case,
    step: int,
    index: int,
) -> None:
    probe = case.steps[step].probes[index]
    observed = oracle(state_objects(case, step, IPS), probe)
    # Self cells included: upstream ignores them when probing real pods, but its
    # expectations for them follow the spec, and so must the oracle.
    wrong = mismatches(probe.expected, observed, ignore_loopback=False)
    assert not wrong, (
        f"{case.path.name} step {step} {probe.protocol}/{probe.port}: cells {wrong}\n"
        f"expected (upstream):\n{render_matrix(probe.expected)}\n"
        f"oracle:\n{render_matrix(observed)}"
    )


# --------------------------------------------------------------------------
# The case set


def test_every_upstream_case_is_ported_once() -> None:
    assert len(CASES) == UPSTREAM_IT_COUNT
    counts = Counter(case.upstream for case in CASES)
    for text, n in counts.items():
        assert n == REPEATED_ACROSS_CONTEXTS.get(text, 1), text
    assert len({case.name for case in CASES}) == len(CASES)


def test_cases_cover_all_protocols_and_multi_step_changes() -> None:
    protocols = {p.protocol for c in CASES for s in c.steps for p in s.probes}
    assert protocols == {"TCP", "UDP", "SCTP"}
    kinds = {obj["kind"] for c in CASES for s in c.steps for obj in s.apply}
    assert kinds == {"NetworkPolicy", "Pod", "Namespace"}
    assert any(s.delete for c in CASES for s in c.steps)


def test_every_probe_has_a_complete_matrix() -> None:
    for case in CASES:
        for _, _, probe in iter_probes(case):
            assert set(probe.expected) == {(s, d) for s in PODS for d in PODS}, case.name


def test_load_cases_defaults_to_default_ips() -> None:
    by_name = {c.name: c for c in load_cases()}
    case = by_name["should-allow-egress-access-to-server-in-cidr-block"]
    block = case.steps[0].apply[0]["spec"]["egress"][0]["to"][0]["ipBlock"]
    assert block == {"cidr": f"{IPS['y/b']}/32"}


def test_placeholders_use_the_given_ips() -> None:
    ips = {pod: f"192.168.{i}.7" for i, pod in enumerate(PODS)}
    by_name = {c.name: c for c in load_cases(ips)}
    case = by_name["should-enforce-except-clause-while-egress-access-to-server-in-cidr-block"]
    block = case.steps[0].apply[0]["spec"]["egress"][0]["to"][0]["ipBlock"]
    # makeLargeCIDRForIP: the canonical /4 holding x/b's address.
    assert block == {"cidr": "192.0.0.0/4", "except": [f"{ips['x/b']}/32"]}
    assert ipaddress.ip_address(ips["x/b"]) in ipaddress.ip_network(block["cidr"])


# --------------------------------------------------------------------------
# The model


def test_default_ips_are_distinct_pod_cidr_addresses() -> None:
    assert list(IPS) == PODS
    assert len(set(IPS.values())) == 9
    net = ipaddress.ip_network("10.244.1.0/24")
    assert all(ipaddress.ip_address(ip) in net for ip in IPS.values())
    assert default_ips() == IPS


def test_model_objects_follow_upstream_model() -> None:
    objects = model_objects(IPS, {pod: f"node-{i % 2 + 1}" for i, pod in enumerate(PODS)})
    namespaces = [o for o in objects if o["kind"] == "Namespace"]
    pods = {
        f"{o['metadata']['namespace']}/{o['metadata']['name']}": o
        for o in objects
        if o["kind"] == "Pod"
    }
    assert [n["metadata"]["labels"] for n in namespaces] == [
        {"ns": ns, "kubernetes.io/metadata.name": ns} for ns in ("x", "y", "z")
    ]
    assert list(pods) == PODS
    yb = pods["y/b"]
    assert yb["metadata"]["labels"] == {"pod": "b"}
    assert yb["status"]["podIP"] == IPS["y/b"]
    assert yb["spec"]["nodeName"] == "node-1"
    assert pods["x/b"]["spec"]["nodeName"] == "node-2"
    names = {
        p["name"]: (p["containerPort"], p["protocol"])
        for c in yb["spec"]["containers"]
        for p in c["ports"]
    }
    assert names == {
        f"serve-{port}-{proto.lower()}": (port, proto)
        for port in (80, 81)
        for proto in ("TCP", "UDP", "SCTP")
    }


def test_model_objects_refuses_missing_ips() -> None:
    ips = dict(IPS)
    del ips["z/c"]
    with pytest.raises(ValueError, match="z/c"):
        model_objects(ips)


def test_state_objects_applies_updates_labels_and_deletions() -> None:
    by_name = {c.name: c for c in CASES}

    def policies(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [o for o in objs if o["kind"] == "NetworkPolicy"]

    updated = by_name["should-enforce-updated-policy"]
    assert policies(state_objects(updated, 0, IPS))[0]["spec"]["ingress"] == [{}]
    after = policies(state_objects(updated, 1, IPS))
    assert len(after) == 1 and after[0]["spec"]["ingress"] == []

    deleted = by_name["should-stop-enforcing-policies-after-they-are-deleted"]
    assert len(policies(state_objects(deleted, 0, IPS))) == 1
    assert policies(state_objects(deleted, 1, IPS)) == []

    relabel = by_name["should-allow-ingress-access-from-updated-pod"]

    def labels_of(objs: list[dict[str, Any]], ns: str, name: str) -> dict[str, str]:
        [pod] = [
            o
            for o in objs
            if o["kind"] == "Pod"
            and o["metadata"]["namespace"] == ns
            and o["metadata"]["name"] == name
        ]
        return dict(pod["metadata"]["labels"])

    assert labels_of(state_objects(relabel, 0, IPS), "x", "b") == {"pod": "b"}
    assert labels_of(state_objects(relabel, 1, IPS), "x", "b") == {"pod": "b", "pod2": "updated"}
    # The case itself is not mutated by building a state from it.
    assert labels_of(state_objects(relabel, 0, IPS), "x", "b") == {"pod": "b"}


# --------------------------------------------------------------------------
# Matrices


def test_build_matrix_applies_ops_in_order() -> None:
    cells = build_matrix(True, [("*", "x/a", False), ("x/b", "x/a", True), ("y", "*", False)])
    assert cells[("x/b", "x/a")] is True
    assert cells[("x/c", "x/a")] is False
    assert cells[("x/a", "x/a")] is False
    assert cells[("y/c", "z/b")] is False
    assert cells[("z/c", "y/a")] is True
    # column x/a less x/b (8) plus the three y rows (27), y->x/a counted once (-3)
    assert sum(not v for v in cells.values()) == 8 + 27 - 3


def test_render_matrix_is_upstream_truth_table_format() -> None:
    cells = build_matrix(True, [("*", "x/b", False)])
    del cells[("z/c", "z/c")]
    lines = render_matrix(cells).splitlines()
    assert lines[0] == "-\t" + "\t".join(PODS)
    assert lines[1] == "x/a\t.\tX\t.\t.\t.\t.\t.\t.\t."
    assert lines[9].endswith("\tX\t.\t.\t.\t.\t.\t.\t?")
    assert len(lines) == 10


def test_mismatches_ignores_loopback_only_when_asked() -> None:
    expected = build_matrix(True, [("*", "x", False)])
    observed = dict(expected)
    observed[("x/a", "x/a")] = True
    assert IGNORE_LOOPBACK is True
    assert mismatches(expected, observed) == []
    assert mismatches(expected, observed, ignore_loopback=False) == [("x/a", "x/a")]
    del observed[("y/a", "z/b")]
    assert mismatches(expected, observed) == [("y/a", "z/b")]


# --------------------------------------------------------------------------
# Format errors name the file and the field


GOOD = """\
name: {name}
upstream: "some upstream text"
steps:
  - apply:
      - apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {{name: p, namespace: x}}
        spec: {{podSelector: {{}}, policyTypes: [Ingress]}}
    probes:
      - port: 80
        protocol: TCP
        expect:
          default: true
          ops:
            - {{from: "*", to: "x", allow: false}}
"""


def _write(tmp_path: Path, text: str, name: str = "c") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_good_minimal_case_loads(tmp_path: Path) -> None:
    [case] = load_cases(directory=_write(tmp_path, GOOD.format(name="c")).parent)
    assert case.name == "c" and case.upstream == "some upstream text"
    [probe] = case.steps[0].probes
    assert probe.expected[("y/a", "x/c")] is False
    assert probe.expected[("x/a", "y/c")] is True


@pytest.mark.parametrize(
    ("old", "new", "field", "message"),
    [
        ("upstream: ", "upstrem: ", "upstrem", "unknown field"),
        ('upstream: "some upstream text"\n', "", "upstream", "required field missing"),
        ("protocol: TCP", "protocol: ICMP", "steps[0].probes[0].protocol", "must be one of"),
        ("port: 80", "port: 8080", "steps[0].probes[0].port", "served port"),
        ("port: 80", "port: true", "steps[0].probes[0].port", "served port"),
        ('to: "x"', 'to: "x/d"', "steps[0].probes[0].expect.ops[0].to", "x/d"),
        ('from: "*"', 'from: "w"', "steps[0].probes[0].expect.ops[0].from", "'w'"),
        ("allow: false", "allow: nope", "steps[0].probes[0].expect.ops[0].allow", "true or false"),
        ("default: true", "dflt: true", "steps[0].probes[0].expect.dflt", "unknown field"),
        ("kind: NetworkPolicy", "kind: Service", "steps[0].apply[0].kind", "Service"),
        (
            "networking.k8s.io/v1",
            "extensions/v1beta1",
            "steps[0].apply[0].apiVersion",
            "networking.k8s.io/v1",
        ),
        ("namespace: x}", "namespace: q}", "steps[0].apply[0].metadata.namespace", "'q'"),
        ("name: p,", "name: P_1,", "steps[0].apply[0].metadata.name", "valid object name"),
        ("  - apply:", "  - aply:", "steps[0].aply", "unknown field"),
    ],
)
def test_format_errors_name_file_and_field(
    tmp_path: Path, old: str, new: str, field: str, message: str
) -> None:
    text = GOOD.format(name="broken")
    assert old in text
    path = _write(tmp_path, text.replace(old, new, 1), "broken")
    with pytest.raises(CaseFormatError) as err:
        load_case(path)
    assert err.value.field == field
    assert str(err.value).startswith(f"broken.yaml: {field}: ")
    assert message in str(err.value)


def test_name_must_match_file(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD.format(name="other"), "c")
    with pytest.raises(CaseFormatError, match=r"^c\.yaml: name: must match the file name"):
        load_case(path)


def test_duplicate_keys_are_refused(tmp_path: Path) -> None:
    text = GOOD.format(name="c").replace("protocol: TCP", "protocol: TCP\n        port: 81")
    with pytest.raises(CaseFormatError, match=r"^c\.yaml: invalid YAML: .*duplicate key 'port'"):
        load_case(_write(tmp_path, text))


def test_deleting_an_unknown_policy_is_refused(tmp_path: Path) -> None:
    text = GOOD.format(name="c") + (
        "  - delete: [{kind: NetworkPolicy, namespace: x, name: q}]\n"
        "    probes: [{port: 80, protocol: TCP, expect: {default: true}}]\n"
    )
    with pytest.raises(CaseFormatError, match=r"steps\[1\]\.delete\[0\]: no NetworkPolicy x/q"):
        load_case(_write(tmp_path, text))


def test_label_change_must_target_a_model_object(tmp_path: Path) -> None:
    text = GOOD.format(name="c") + (
        "  - apply: [{kind: Pod, namespace: x, name: d, labels: {pod: d}}]\n"
        "    probes: [{port: 80, protocol: TCP, expect: {default: true}}]\n"
    )
    with pytest.raises(CaseFormatError, match=r"steps\[1\]\.apply\[0\]\.name: pod 'x/d'"):
        load_case(_write(tmp_path, text))


def test_a_step_needs_probes(tmp_path: Path) -> None:
    text = GOOD.format(name="c") + "  - probes: []\n"
    with pytest.raises(CaseFormatError, match=r"steps\[1\]\.probes: must not be empty"):
        load_case(_write(tmp_path, text))


@pytest.mark.parametrize(
    ("placeholder", "message"),
    [
        ("{ip:x/d}/32", "unknown pod 'x/d'"),
        ("{mac:x/a}", "unknown placeholder"),
        ("{net:x/a/40}", "want {net:ns/pod/LEN}"),
    ],
)
def test_bad_placeholders_are_refused(tmp_path: Path, placeholder: str, message: str) -> None:
    text = GOOD.format(name="c").replace(
        "spec: {podSelector: {}, policyTypes: [Ingress]}",
        f'spec: {{podSelector: {{}}, egress: [{{to: [{{ipBlock: {{cidr: "{placeholder}"}}}}]}}]}}',
    )
    assert placeholder in text
    with pytest.raises(CaseFormatError) as err:
        load_case(_write(tmp_path, text))
    assert err.value.field == "steps[0].apply[0].spec.egress[0].to[0].ipBlock.cidr"
    assert message in str(err.value)


def test_shipped_cases_live_beside_the_loader() -> None:
    assert CASES_DIR.is_dir()
    assert all(case.path.parent == CASES_DIR for case in CASES)


def test_step_objects_are_full_api_objects() -> None:
    by_name = {c.name: c for c in CASES}
    ns_step = by_name["should-allow-ingress-access-from-updated-namespace"].steps[1]
    [ns] = step_objects(ns_step, IPS)
    assert ns["apiVersion"] == "v1" and ns["kind"] == "Namespace"
    assert ns["metadata"] == {
        "name": "y",
        "labels": {"ns": "y", "kubernetes.io/metadata.name": "y", "ns2": "updated"},
    }
    pod_step = by_name["should-deny-ingress-access-to-updated-pod"].steps[1]
    [pod] = step_objects(pod_step, IPS, "node-2")
    assert pod["metadata"]["labels"] == {"pod": "a", "target": "isolated"}
    assert pod["spec"]["nodeName"] == "node-2"
    assert pod["status"]["podIP"] == IPS["x/a"]
    deleted = by_name["should-stop-enforcing-policies-after-they-are-deleted"].steps[1]
    assert step_objects(deleted, IPS) == []
    assert delete_objects(deleted) == [
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "deny-all", "namespace": "x"},
        }
    ]
