"""Cache + NodeState with hand-built API objects (no HTTP)."""

from __future__ import annotations

import base64
import logging
from typing import Any

import pytest

from controller.cache import Cache, Key, Kind
from controller.events import EventRecorder, ObjectRef
from controller.nodestate import (
    AS_NUMBER_ANNOTATION,
    DEFAULT_ASN,
    NodeState,
    ObjectError,
    converters,
    parse_bgp_configuration,
    parse_bgp_peer,
    parse_node,
    parse_secret,
)
from policy.compiler import compile_ruleset
from policy.parse import build_cluster

SECRET_NS = "felix-lite"


# ---------------------------------------------------------------- builders


def ns(name: str, **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels}}


def pod(
    namespace: str,
    name: str,
    *,
    node: str,
    ip: str | None,
    host_network: bool = False,
    **labels: str,
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "metadata": {"namespace": namespace, "name": name, "labels": labels},
        "spec": {
            "nodeName": node,
            "hostNetwork": host_network,
            "containers": [{"name": "c", "ports": [{"containerPort": 80, "name": "http"}]}],
        },
        "status": {},
    }
    if ip:
        obj["status"]["podIP"] = ip
    return obj


def deny_ingress(
    namespace: str, name: str, cidr: str = "10.0.0.0/8", **match: str
) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"namespace": namespace, "name": name},
        "spec": {
            "podSelector": {"matchLabels": match},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"ipBlock": {"cidr": cidr}}]}],
        },
    }


def node(
    name: str, ip: str, *, cidr: str | None = None, asn: int | None = None, **labels: str
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": labels}
    if asn is not None:
        meta["annotations"] = {AS_NUMBER_ANNOTATION: str(asn)}
    spec = {"podCIDR": cidr} if cidr else {}
    return {
        "metadata": meta,
        "spec": spec,
        "status": {
            "addresses": [
                {"type": "Hostname", "address": name},
                {"type": "InternalIP", "address": ip},
            ]
        },
    }


def peer(name: str, ip: str, asn: int, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"peerIP": ip, "asNumber": asn, **spec}}


def bgpconfig(**spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "default"}, "spec": spec}


def secret(name: str, **data: str) -> dict[str, Any]:
    return {
        "metadata": {"namespace": SECRET_NS, "name": name},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


class FakeEvents:
    def __init__(self) -> None:
        self.warnings: list[tuple[ObjectRef, str, str]] = []

    def warn(self, ref: ObjectRef, *, reason: str, message: str) -> bool:
        self.warnings.append((ref, reason, message))
        return True


def feed(cache: Cache, state: NodeState) -> None:
    state.apply(cache.take_changes())


# ---------------------------------------------------------------- converters


def test_parse_node_reads_ip_block_labels_and_asn() -> None:
    n = parse_node(node("n1", "192.168.0.1", cidr="10.244.1.0/24", asn=65001, rack="a"))
    assert (n.name, n.internal_ip, n.pod_cidr, n.asn) == (
        "n1",
        "192.168.0.1",
        "10.244.1.0/24",
        65001,
    )
    assert dict(n.labels) == {"rack": "a"}


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (
            lambda o: o["metadata"].update(annotations={AS_NUMBER_ANNOTATION: "x1"}),
            f"metadata.annotations[{AS_NUMBER_ANNOTATION}]",
        ),
        (lambda o: o["spec"].update(podCIDR="10.1.1/33"), "spec.podCIDR"),
        (
            lambda o: o["status"]["addresses"][1].update(address="nope"),
            "status.addresses[1].address",
        ),
    ],
)
def test_parse_node_errors_name_the_field(mutate: Any, field: str) -> None:
    obj = node("n1", "192.168.0.1", cidr="10.244.1.0/24")
    mutate(obj)
    with pytest.raises(ObjectError) as e:
        parse_node(obj)
    assert e.value.field == field
    assert str(e.value).startswith(f"node n1: {field}: ")


def test_parse_bgp_peer_full() -> None:
    p = parse_bgp_peer(
        peer(
            "tor",
            "192.168.0.254",
            65000,
            nodeSelector={
                "matchLabels": {"rack": "a"},
                "matchExpressions": [{"key": "role", "operator": "NotIn", "values": ["edge"]}],
            },
            passwordSecretRef={"name": "bgp", "key": "tor"},
            multihop={},
            holdTime=90,
            gracefulRestartSeconds=120,
            maxPrefix=1000,
        )
    )
    assert p.peer_ip == "192.168.0.254" and p.asn == 65000
    assert p.node_selector is not None and dict(p.node_selector.match_labels) == {"rack": "a"}
    assert p.password is not None and (p.password.name, p.password.key) == ("bgp", "tor")
    assert (p.multihop, p.hold_time, p.graceful_restart, p.max_prefix) == (255, 90, 120, 1000)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"peerIP": "1.2.3", "asNumber": 1}, "spec.peerIP"),
        ({"peerIP": "1.2.3.4"}, "spec.asNumber"),
        ({"peerIP": "1.2.3.4", "asNumber": 0}, "spec.asNumber"),
        ({"peerIP": "1.2.3.4", "asNumber": 1, "holdTime": 2}, "spec.holdTime"),
        (
            {"peerIP": "1.2.3.4", "asNumber": 1, "node": "n1", "nodeSelector": {}},
            "spec.nodeSelector",
        ),
        (
            {
                "peerIP": "1.2.3.4",
                "asNumber": 1,
                "nodeSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]},
            },
            "spec.nodeSelector.matchExpressions[0].values",
        ),
        ({"peerIP": "1.2.3.4", "asNumber": 1, "multihop": {"ttl": 0}}, "spec.multihop.ttl"),
    ],
)
def test_parse_bgp_peer_errors(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(ObjectError) as e:
        parse_bgp_peer({"metadata": {"name": "p"}, "spec": spec})
    assert e.value.field == field
    assert str(e.value).startswith(f"bgppeer p: {field}: ")


def test_parse_bgp_configuration_defaults() -> None:
    c = parse_bgp_configuration(bgpconfig())
    assert c.node_to_node_mesh is True and c.asn is None and not c.aggregate
    c = parse_bgp_configuration(
        bgpconfig(asNumber=65010, nodeToNodeMesh=False, podCIDRs=["10.244.0.1/16"], aggregate=True)
    )
    assert (c.asn, c.node_to_node_mesh, c.pod_cidrs, c.aggregate) == (
        65010,
        False,
        ("10.244.0.0/16",),
        True,
    )


def test_parse_secret_decodes_and_hides_values() -> None:
    s = parse_secret(secret("bgp", tor="s3cret"))
    assert s.data["tor"] == "s3cret"
    assert "s3cret" not in repr(s)
    with pytest.raises(ObjectError, match=r"data\[k\]"):
        parse_secret({"metadata": {"name": "x"}, "data": {"k": "!!!"}})


# ---------------------------------------------------------------- cache


def test_cache_in_sync_needs_every_kind() -> None:
    cache = Cache(converters())
    for kind in list(Kind)[:-1]:
        cache.synced(kind)
        assert not cache.in_sync
    cache.synced(list(Kind)[-1])
    assert cache.in_sync


def test_cache_reports_only_real_changes() -> None:
    cache = Cache(converters())
    cache.upsert(Kind.NAMESPACE, ns("x", team="a"))
    cache.upsert(Kind.NAMESPACE, ns("x", team="b"))
    changes = cache.take_changes()
    assert list(changes) == [Key(Kind.NAMESPACE, None, "x")]
    cache.upsert(Kind.NAMESPACE, ns("x", team="b"))  # same value: no change
    assert cache.take_changes() == {}
    cache.delete(Kind.NAMESPACE, ns("x"))
    assert cache.take_changes() == {Key(Kind.NAMESPACE, None, "x"): None}
    cache.delete(Kind.NAMESPACE, ns("x"))  # already gone
    assert cache.take_changes() == {}


def test_invalid_edit_keeps_last_good_and_posts_event(caplog: pytest.LogCaptureFixture) -> None:
    events = FakeEvents()
    cache = Cache(converters(), events=events)
    key = Key(Kind.NETWORK_POLICY, "y", "allow")
    cache.upsert(Kind.NETWORK_POLICY, deny_ingress("y", "allow", "10.0.0.0/8"))
    good = cache.get(key)
    assert good is not None
    cache.take_changes()
    with caplog.at_level(logging.WARNING, logger="controller.cache"):
        cache.upsert(Kind.NETWORK_POLICY, deny_ingress("y", "allow", "10.0.0.0/33"))
        cache.upsert(Kind.NETWORK_POLICY, deny_ingress("y", "allow", "10.0.0.0/33"))  # again
    assert cache.get(key) is good
    assert cache.take_changes() == {}
    lines = [r.getMessage() for r in caplog.records if "controller.invalid" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith("controller.invalid kind=networkpolicy object=y/allow ")
    assert "spec.ingress[0].from[0].ipBlock.cidr" in lines[0]
    assert len(events.warnings) == 1
    ref, reason, message = events.warnings[0]
    assert (ref.kind, ref.namespace, ref.name, reason) == (
        "NetworkPolicy",
        "y",
        "allow",
        "InvalidNetworkPolicy",
    )
    assert "previous valid version" in message
    assert key in cache.invalid()
    # Fixed: the new value is current and the object is no longer invalid.
    cache.upsert(Kind.NETWORK_POLICY, deny_ingress("y", "allow", "192.168.0.0/16"))
    assert cache.get(key) != good and key not in cache.invalid()


def test_brand_new_invalid_object_is_absent() -> None:
    events = FakeEvents()
    cache = Cache(converters(), events=events)
    cache.upsert(Kind.BGP_PEER, peer("bad", "300.0.0.1", 65000))
    assert cache.get(Key(Kind.BGP_PEER, None, "bad")) is None
    assert cache.take_changes() == {}
    assert events.warnings[0][1] == "InvalidBGPPeer"
    assert "ignored until fixed" in events.warnings[0][2]


def test_event_recorder_dedupes_and_survives_post_failures() -> None:
    posted: list[tuple[str, dict[str, Any]]] = []
    fail = [True]

    def poster(namespace: str, body: dict[str, Any]) -> None:
        if fail[0]:
            raise RuntimeError("apiserver down")
        posted.append((namespace, body))

    now = [0.0]
    rec = EventRecorder(poster, host="n1", dedupe_window=60, max_per_minute=3, clock=lambda: now[0])
    ref = ObjectRef("BGPPeer", "felixlite.io/v1alpha1", None, "p")
    assert rec.warn(ref, reason="InvalidBGPPeer", message="m1")
    assert not rec.warn(ref, reason="InvalidBGPPeer", message="m1")  # duplicate
    assert rec.flush() == 1 and rec.failed == 1  # failure logged, not raised
    fail[0] = False
    now[0] = 61.0
    assert rec.warn(ref, reason="InvalidBGPPeer", message="m1")  # window passed
    assert rec.warn(ref, reason="InvalidBGPPeer", message="m2")
    assert rec.warn(ref, reason="InvalidBGPPeer", message="m3")
    assert not rec.warn(ref, reason="InvalidBGPPeer", message="m4")  # rate limit (3/min)
    rec.flush()
    assert [b["message"] for _, b in posted] == ["m1", "m2", "m3"]
    ns_, body = posted[0]
    assert ns_ == "default"  # cluster-scoped object
    assert body["type"] == "Warning" and body["involvedObject"]["name"] == "p"
    assert body["source"] == {"component": "felix-lite", "host": "n1"}


# ---------------------------------------------------------------- node state


def cluster() -> list[tuple[Kind, dict[str, Any]]]:
    return [
        (Kind.NAMESPACE, ns("x", ns="x")),
        (Kind.NAMESPACE, ns("y", ns="y")),
        (Kind.POD, pod("x", "a", node="n1", ip="10.244.1.2", pod="a")),
        (Kind.POD, pod("x", "b", node="n2", ip="10.244.2.2", pod="b")),
        (Kind.POD, pod("y", "a", node="n1", ip="10.244.1.3", pod="a")),
        (Kind.POD, pod("y", "pending", node="n1", ip=None, pod="p")),
        (Kind.POD, pod("y", "host", node="n1", ip="192.168.0.1", host_network=True)),
        (Kind.NETWORK_POLICY, deny_ingress("x", "only-a", pod="a")),
        (Kind.NODE, node("n1", "192.168.0.1", cidr="10.244.1.0/24", rack="a")),
        (Kind.NODE, node("n2", "192.168.0.2", cidr="10.244.2.0/24", asn=65002, rack="b")),
        (Kind.NODE, node("n3", "192.168.0.3", cidr="10.244.3.0/24", rack="b")),
        (Kind.BGP_CONFIGURATION, bgpconfig(asNumber=65100, podCIDRs=["10.244.0.0/16"])),
        (
            Kind.BGP_PEER,
            peer("global", "192.168.0.254", 65000, passwordSecretRef={"name": "bgp", "key": "tor"}),
        ),
        (
            Kind.BGP_PEER,
            peer(
                "rack-a",
                "192.168.10.1",
                65010,
                nodeSelector={"matchLabels": {"rack": "a"}},
                multihop={"ttl": 3},
            ),
        ),
        (Kind.BGP_PEER, peer("only-n2", "192.168.20.1", 65020, node="n2")),
        (Kind.SECRET, secret("bgp", tor="md5pass")),
    ]


def loaded(node_name: str = "n1") -> tuple[Cache, NodeState]:
    cache = Cache(converters())
    for kind, obj in cluster():
        cache.upsert(kind, obj)
    state = NodeState(node_name, secret_namespace=SECRET_NS)
    feed(cache, state)
    return cache, state


def test_node_desired_small_cluster() -> None:
    _, state = loaded()
    d = state.desired()
    assert d.node == "n1" and d.generation == 1
    assert [p.key for p in d.local_pods] == ["x/a", "y/a"]
    bgp = d.bgp
    assert (bgp.local_asn, bgp.router_id, bgp.node_block) == (65100, "192.168.0.1", "10.244.1.0/24")
    assert bgp.pod_cidrs == bgp.import_cidrs == bgp.export_cidrs == ("10.244.0.0/16",)
    by_addr = {p.address: p for p in bgp.peers}
    assert sorted(by_addr) == ["192.168.0.2", "192.168.0.254", "192.168.0.3", "192.168.10.1"]
    assert by_addr["192.168.0.254"].password == "md5pass"
    assert by_addr["192.168.0.254"].asn == 65000
    assert by_addr["192.168.10.1"].multihop == 3
    assert by_addr["192.168.0.2"].asn == 65002  # the node's own annotation
    assert by_addr["192.168.0.3"].asn == 65100  # the cluster default
    assert by_addr["192.168.0.2"].source == "mesh/n2"
    assert "md5pass" not in repr(d.bgp)
    # The incremental compiler agrees with a from-scratch compile of the same objects.
    api = {
        Kind.NAMESPACE: ("Namespace", "v1"),
        Kind.POD: ("Pod", "v1"),
        Kind.NETWORK_POLICY: ("NetworkPolicy", "networking.k8s.io/v1"),
    }
    objs = [dict(o, kind=api[k][0], apiVersion=api[k][1]) for k, o in cluster() if k in api]
    state_, errors = build_cluster(objs)
    assert errors == []
    assert d.ruleset == compile_ruleset(state_, "n1")


def test_other_node_sees_its_own_peers() -> None:
    _, state = loaded("n2")
    bgp = state.desired().bgp
    assert bgp.local_asn == 65002
    assert {p.address for p in bgp.peers} == {
        "192.168.0.1",
        "192.168.0.3",
        "192.168.0.254",
        "192.168.20.1",
    }


def test_generation_moves_only_on_change() -> None:
    cache, state = loaded()
    g1 = state.desired().generation
    cache.upsert(Kind.POD, pod("x", "b", node="n2", ip="10.244.2.2", pod="b"))  # same value
    feed(cache, state)
    assert state.desired().generation == g1
    cache.upsert(Kind.POD, pod("x", "c", node="n1", ip="10.244.1.9", pod="c"))
    feed(cache, state)
    d = state.desired()
    assert d.generation == g1 + 1
    assert "x/c" in [p.key for p in d.local_pods]
    cache.delete(Kind.POD, pod("x", "c", node="n1", ip=None))
    feed(cache, state)
    d = state.desired()
    assert d.generation == g1 + 2 and "x/c" not in [p.key for p in d.local_pods]


def test_node_label_change_moves_selector_peers() -> None:
    cache, state = loaded()
    before = {p.address for p in state.desired().bgp.peers}
    assert "192.168.10.1" in before
    cache.upsert(Kind.NODE, node("n1", "192.168.0.1", cidr="10.244.1.0/24", rack="b"))
    feed(cache, state)
    after = state.desired()
    assert {p.address for p in after.bgp.peers} == before - {"192.168.10.1"}
    cache.upsert(Kind.NODE, node("n1", "192.168.0.1", cidr="10.244.1.0/24", rack="a"))
    feed(cache, state)
    assert {p.address for p in state.desired().bgp.peers} == before


def test_mesh_off_and_missing_secret(caplog: pytest.LogCaptureFixture) -> None:
    cache, state = loaded()
    cache.upsert(Kind.BGP_CONFIGURATION, bgpconfig(asNumber=65100, nodeToNodeMesh=False))
    cache.delete(Kind.SECRET, secret("bgp"))
    feed(cache, state)
    with caplog.at_level(logging.WARNING, logger="controller.nodestate"):
        bgp = state.desired().bgp
    assert not bgp.mesh
    # Mesh peers gone; the global peer is left out rather than configured without its key.
    assert {p.address for p in bgp.peers} == {"192.168.10.1"}
    assert any("bgppeer.secret-missing peer=global" in r.getMessage() for r in caplog.records)


def test_secrets_of_other_namespaces_are_ignored() -> None:
    cache, state = loaded()
    g = state.desired().generation
    cache.upsert(
        Kind.SECRET,
        {
            "metadata": {"namespace": "other", "name": "bgp"},
            "data": {"tor": base64.b64encode(b"x").decode()},
        },
    )
    feed(cache, state)
    assert state.desired().generation == g


def test_defaults_without_configuration() -> None:
    cache = Cache(converters())
    cache.upsert(Kind.NODE, node("n1", "192.168.0.1"))
    cache.upsert(Kind.NODE, node("n2", "192.168.0.2"))
    state = NodeState("n1", secret_namespace=SECRET_NS)
    feed(cache, state)
    bgp = state.desired().bgp
    assert bgp.local_asn == DEFAULT_ASN and bgp.mesh
    assert [(p.address, p.asn) for p in bgp.peers] == [("192.168.0.2", DEFAULT_ASN)]
    assert bgp.pod_cidrs == () and bgp.node_block is None


def test_in_sync_flip_is_a_new_generation() -> None:
    _, state = loaded()
    first = state.desired(in_sync=False)
    second = state.desired(in_sync=True)
    assert second.generation == first.generation + 1 and second.in_sync
    assert state.desired(in_sync=True) is second
