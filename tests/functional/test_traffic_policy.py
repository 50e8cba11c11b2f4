"""Real traffic under policies programmed by `felix-lite policy apply`, on both backends.

One node per iptables backend (module-scoped `policy_lab`); every test applies
the whole desired state (model objects + its policies), so tests do not depend
on each other's policies. Self cells (a pod to itself) never leave the pod
and are not compared, as upstream (`ignoreLoopback`) does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from felix_lite.netlab import NodeLab, Reachability, open_connection, probe_matrix, probe_one

pytestmark = pytest.mark.kernel

Objects = Callable[..., list[dict[str, Any]]]


def netpol(
    ns: str,
    name: str,
    *,
    selector: dict[str, Any] | None = None,
    types: Sequence[str] = ("Ingress",),
    ingress: list[dict[str, Any]] | None = None,
    egress: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"podSelector": selector or {}, "policyTypes": list(types)}
    if ingress is not None:
        spec["ingress"] = ingress
    if egress is not None:
        spec["egress"] = egress
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"namespace": ns, "name": name},
        "spec": spec,
    }


def peer(ns: str | None = None, pod: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if ns is not None:
        out["namespaceSelector"] = {"matchLabels": {"ns": ns}}
    if pod is not None:
        out["podSelector"] = {"matchLabels": {"pod": pod}}
    return out


def check(lab: NodeLab, expected: Reachability, *, port: int = 80, protocol: str = "TCP") -> None:
    observed = lab.probe(port=port, protocol=protocol)
    wrong = [m for m in expected.compare(observed) if m.src != m.dst]
    assert not wrong, expected.report(observed, title=f"{protocol}/{port}")


def expect(lab: NodeLab, default: bool, *ops: tuple[str, str, bool]) -> Reachability:
    r = Reachability([e.name for e in lab.pod_endpoints], default=default)
    for frm, to, allow in ops:
        r.set(frm, to, allow)
    return r


@pytest.fixture
def lab(policy_lab: NodeLab, k8s_objects: Objects) -> Iterator[NodeLab]:
    """The backend's node, reset to "every pod programmed, no policy" after the test."""
    yield policy_lab
    policy_lab.policy.apply(k8s_objects())


def test_programmed_without_policies_everything_connects(
    lab: NodeLab, k8s_objects: Objects
) -> None:
    lab.policy.apply(k8s_objects())
    check(lab, expect(lab, True))
    check(lab, expect(lab, True), port=81, protocol="UDP")


def test_default_deny_ingress_isolates_namespace_x(lab: NodeLab, k8s_objects: Objects) -> None:
    lab.policy.apply(k8s_objects(extra=[netpol("x", "deny-all")]))
    want = expect(lab, True, ("*", "x", False))
    check(lab, want)
    check(lab, want, port=81, protocol="UDP")


def test_allow_from_one_pod_of_another_namespace(lab: NodeLab, k8s_objects: Objects) -> None:
    lab.policy.apply(
        k8s_objects(
            extra=[
                netpol("x", "deny-all"),
                netpol(
                    "x",
                    "allow-yb-to-a",
                    selector={"matchLabels": {"pod": "a"}},
                    ingress=[{"from": [peer(ns="y", pod="b")]}],
                ),
            ]
        )
    )
    check(lab, expect(lab, True, ("*", "x", False), ("y/b", "x/a", True)))


def test_replies_pass_when_server_side_denies_all_egress(
    lab: NodeLab, k8s_objects: Objects
) -> None:
    lab.policy.apply(k8s_objects(extra=[netpol("x", "deny-egress", types=["Egress"])]))
    want = expect(lab, True, ("x", "*", False))  # x initiates nothing; x still answers
    check(lab, want)
    check(lab, want, port=81, protocol="UDP")


def test_established_connection_survives_a_later_deny(lab: NodeLab, k8s_objects: Objects) -> None:
    """Observed and intended: conntrack ESTABLISHED is accepted before any policy
    chain, so a flow allowed when it started keeps working after a deny; only new
    connections are refused (as with Calico)."""
    lab.policy.apply(k8s_objects())
    src, dst = lab.pods["y/a"], lab.pods["x/a"]
    with open_connection(src, dst, port=80) as conn:
        conn.sendall(b"before")
        assert conn.recv(64) == b"before"
        lab.policy.apply(k8s_objects(extra=[netpol("x", "deny-all")]))
        assert not probe_one(src, dst, port=80).connected
        conn.sendall(b"after")
        assert conn.recv(64) == b"after"


def test_same_node_needs_egress_of_source_and_ingress_of_destination(
    lab: NodeLab, k8s_objects: Objects
) -> None:
    lab.policy.apply(
        k8s_objects(
            extra=[
                # x/a may only talk to namespace y ...
                netpol(
                    "x",
                    "a-egress-to-y",
                    selector={"matchLabels": {"pod": "a"}},
                    types=["Egress"],
                    egress=[{"to": [peer(ns="y")]}],
                ),
                # ... and y/b only accepts namespace z.
                netpol(
                    "y",
                    "b-ingress-from-z",
                    selector={"matchLabels": {"pod": "b"}},
                    ingress=[{"from": [peer(ns="z")]}],
                ),
            ]
        )
    )
    want = expect(
        lab,
        True,
        ("x/a", "*", False),
        ("x/a", "y", True),  # egress of x/a
        ("*", "y/b", False),
        ("z", "y/b", True),  # ingress of y/b
    )
    assert not want.get("x/a", "y/b")  # egress allows it, ingress does not
    assert want.get("x/a", "y/a")
    check(lab, want)


def test_node_reaches_local_pods_under_default_deny_ingress(
    lab: NodeLab, k8s_objects: Objects
) -> None:
    lab.policy.apply(k8s_objects(extra=[netpol(ns, "deny-all") for ns in ("x", "y", "z")]))
    from_node = probe_matrix([lab.node], targets=lab.pod_endpoints, port=80, protocol="TCP")
    assert [r for r in from_node if not r.connected] == []
    check(lab, expect(lab, False))


def test_spoofed_source_is_dropped_once_the_pod_is_programmed(
    lab: NodeLab, k8s_objects: Objects
) -> None:
    spoof = "10.244.1.201"
    xa, yb = lab.pods["x/a"], lab.pods["y/b"]
    lab.topology.add_pod_address("x/a", spoof)
    try:
        lab.policy.flush()
        assert probe_one(xa, yb, port=80, source_ip=spoof).connected  # the harness lets it through
        lab.policy.apply(k8s_objects())
        assert not probe_one(xa, yb, port=80, source_ip=spoof).connected  # forwarded path
        assert not probe_one(xa, lab.node, port=80, source_ip=spoof).connected  # to the node
        assert not probe_one(xa, yb, port=81, protocol="UDP", source_ip=spoof).connected
        assert probe_one(xa, yb, port=80).connected  # its real address still works
    finally:
        lab.topology.remove_pod_address("x/a", spoof)


def test_unprogrammed_pod_interface_is_dropped_while_others_work(
    lab: NodeLab, k8s_objects: Objects, e2e_model: Any
) -> None:
    others = [k for k in e2e_model.pod_keys if k != "z/c"]
    lab.policy.apply(k8s_objects(pods=others))
    check(lab, expect(lab, True, ("z/c", "*", False), ("*", "z/c", False)))


def test_flush_reopens_everything(lab: NodeLab, k8s_objects: Objects) -> None:
    lab.policy.apply(k8s_objects(extra=[netpol(ns, "deny-all") for ns in ("x", "y", "z")]))
    check(lab, expect(lab, False))
    lab.policy.flush()
    check(lab, expect(lab, True))
