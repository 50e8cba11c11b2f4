"""The Kubernetes API emulator, driven through the official `kubernetes` client over real HTTP.

No network namespaces: the server listens on 127.0.0.1 on a free port; every
fixture stops it.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from felix_lite.apiserver import ApiServer, Store, resource, write_kubeconfig
from felix_lite.apiserver.store import (
    RESOURCES,
    merge_patch,
    parse_label_selector,
)

ROOT = Path(__file__).resolve().parents[2]
MERGE = "application/merge-patch+json"


@pytest.fixture
def server() -> Iterator[ApiServer]:
    srv = ApiServer(bookmark_interval=0.2).start()
    try:
        yield srv
    finally:
        srv.stop()


def _api_client(srv: ApiServer, tmp_path: Path) -> client.ApiClient:
    kc = write_kubeconfig(tmp_path / f"kubeconfig-{srv.port}", srv.url)
    return config.new_client_from_config(config_file=str(kc))


@pytest.fixture
def api(server: ApiServer, tmp_path: Path) -> Iterator[client.ApiClient]:
    c = _api_client(server, tmp_path)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def core(api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api)


@pytest.fixture
def net(api: client.ApiClient) -> client.NetworkingV1Api:
    return client.NetworkingV1Api(api)


@pytest.fixture
def crd(api: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api)


def _raw(srv: ApiServer, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(srv.url + path, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _status(e: ApiException) -> dict[str, Any]:
    body = json.loads(e.body)
    assert body["kind"] == "Status" and body["status"] == "Failure"
    assert body["code"] == e.status
    return body


def _pod(
    name: str, *, labels: dict[str, str] | None = None, node: str = "node-1"
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "c", "image": "agnhost", "ports": [{"containerPort": 80}]}],
        },
    }


def _ns(core: client.CoreV1Api, name: str, **labels: str) -> None:
    core.create_namespace({"metadata": {"name": name, "labels": labels}})


def _events(
    w: watch.Watch, func: Callable[..., Any], *args: Any, **kwargs: Any
) -> list[dict[str, Any]]:
    return [{"type": e["type"], "raw": e["raw_object"]} for e in w.stream(func, *args, **kwargs)]


# ----------------------------------------------------------------- discovery


def test_discovery(server: ApiServer, api: client.ApiClient) -> None:
    assert client.CoreApi(api).get_api_versions().versions == ["v1"]
    core_res = {r.name for r in client.CoreV1Api(api).get_api_resources().resources}
    assert {
        "pods",
        "pods/status",
        "nodes",
        "nodes/status",
        "namespaces",
        "events",
        "secrets",
        "configmaps",
    } <= core_res
    groups = {g.name: g for g in client.ApisApi(api).get_api_versions().groups}
    assert {"networking.k8s.io", "felixlite.io", "events.k8s.io"} <= set(groups)
    assert groups["felixlite.io"].preferred_version.group_version == "felixlite.io/v1alpha1"
    net_res = client.NetworkingV1Api(api).get_api_resources()
    assert [r.name for r in net_res.resources] == ["networkpolicies"]
    code, body = _raw(server, "/apis/felixlite.io/v1alpha1")
    assert code == 200
    names = {r["name"]: r for r in json.loads(body)["resources"]}
    assert names["bgppeers"]["namespaced"] is False and "bgpconfigurations/status" in names
    assert client.VersionApi(api).get_code().major == "1"
    for path in ("/healthz", "/readyz"):
        assert _raw(server, path) == (200, b"ok")
    assert _raw(server, "/apis/nope.io/v1/things")[0] == 404


def test_crd_yaml_matches_served_resources() -> None:
    served = {rt.key: rt for rt in RESOURCES if rt.custom}
    seen = set()
    for f in sorted((ROOT / "controller" / "crds").glob("*.yaml")):
        doc = yaml.safe_load(f.read_text())
        spec = doc["spec"]
        rt = served[f"{spec['names']['plural']}.{spec['group']}"]
        seen.add(rt.key)
        assert doc["metadata"]["name"] == rt.key
        assert spec["names"]["kind"] == rt.kind
        assert spec["scope"] == ("Namespaced" if rt.namespaced else "Cluster")
        [version] = spec["versions"]
        assert version["name"] == rt.version and "status" in version["subresources"]
    assert seen == set(served)


# ---------------------------------------------------------------------- CRUD

# kind -> (create, read, list, patch, replace, delete) over the typed clients.
KINDS: dict[str, Callable[[client.ApiClient], tuple[Callable[..., Any], ...]]] = {
    "Namespace": lambda c: (
        lambda n, b: client.CoreV1Api(c).create_namespace(b),
        lambda n, name: client.CoreV1Api(c).read_namespace(name),
        lambda n, **kw: client.CoreV1Api(c).list_namespace(**kw),
        lambda n, name, b: client.CoreV1Api(c).patch_namespace(name, b),
        lambda n, name, b: client.CoreV1Api(c).replace_namespace(name, b),
        lambda n, name: client.CoreV1Api(c).delete_namespace(name),
    ),
    "Node": lambda c: (
        lambda n, b: client.CoreV1Api(c).create_node(b),
        lambda n, name: client.CoreV1Api(c).read_node(name),
        lambda n, **kw: client.CoreV1Api(c).list_node(**kw),
        lambda n, name, b: client.CoreV1Api(c).patch_node(name, b),
        lambda n, name, b: client.CoreV1Api(c).replace_node(name, b),
        lambda n, name: client.CoreV1Api(c).delete_node(name),
    ),
    "Pod": lambda c: (
        client.CoreV1Api(c).create_namespaced_pod,
        lambda n, name: client.CoreV1Api(c).read_namespaced_pod(name, n),
        client.CoreV1Api(c).list_namespaced_pod,
        lambda n, name, b: client.CoreV1Api(c).patch_namespaced_pod(name, n, b),
        lambda n, name, b: client.CoreV1Api(c).replace_namespaced_pod(name, n, b),
        lambda n, name: client.CoreV1Api(c).delete_namespaced_pod(name, n),
    ),
    "Secret": lambda c: (
        client.CoreV1Api(c).create_namespaced_secret,
        lambda n, name: client.CoreV1Api(c).read_namespaced_secret(name, n),
        client.CoreV1Api(c).list_namespaced_secret,
        lambda n, name, b: client.CoreV1Api(c).patch_namespaced_secret(name, n, b),
        lambda n, name, b: client.CoreV1Api(c).replace_namespaced_secret(name, n, b),
        lambda n, name: client.CoreV1Api(c).delete_namespaced_secret(name, n),
    ),
    "ConfigMap": lambda c: (
        client.CoreV1Api(c).create_namespaced_config_map,
        lambda n, name: client.CoreV1Api(c).read_namespaced_config_map(name, n),
        client.CoreV1Api(c).list_namespaced_config_map,
        lambda n, name, b: client.CoreV1Api(c).patch_namespaced_config_map(name, n, b),
        lambda n, name, b: client.CoreV1Api(c).replace_namespaced_config_map(name, n, b),
        lambda n, name: client.CoreV1Api(c).delete_namespaced_config_map(name, n),
    ),
    "Event": lambda c: (
        client.CoreV1Api(c).create_namespaced_event,
        lambda n, name: client.CoreV1Api(c).read_namespaced_event(name, n),
        client.CoreV1Api(c).list_namespaced_event,
        lambda n, name, b: client.CoreV1Api(c).patch_namespaced_event(name, n, b),
        lambda n, name, b: client.CoreV1Api(c).replace_namespaced_event(name, n, b),
        lambda n, name: client.CoreV1Api(c).delete_namespaced_event(name, n),
    ),
    "events.k8s.io/Event": lambda c: (
        client.EventsV1Api(c).create_namespaced_event,
        lambda n, name: client.EventsV1Api(c).read_namespaced_event(name, n),
        client.EventsV1Api(c).list_namespaced_event,
        lambda n, name, b: client.EventsV1Api(c).patch_namespaced_event(name, n, b),
        lambda n, name, b: client.EventsV1Api(c).replace_namespaced_event(name, n, b),
        lambda n, name: client.EventsV1Api(c).delete_namespaced_event(name, n),
    ),
    "NetworkPolicy": lambda c: (
        client.NetworkingV1Api(c).create_namespaced_network_policy,
        lambda n, name: client.NetworkingV1Api(c).read_namespaced_network_policy(name, n),
        client.NetworkingV1Api(c).list_namespaced_network_policy,
        lambda n, name, b: client.NetworkingV1Api(c).patch_namespaced_network_policy(name, n, b),
        lambda n, name, b: client.NetworkingV1Api(c).replace_namespaced_network_policy(name, n, b),
        lambda n, name: client.NetworkingV1Api(c).delete_namespaced_network_policy(name, n),
    ),
}

BODIES: dict[str, dict[str, Any]] = {
    "Namespace": {},
    "Node": {"spec": {"podCIDR": "10.244.1.0/24"}},
    "Pod": {"spec": {"containers": [{"name": "c", "image": "agnhost"}]}},
    "Secret": {"data": {"password": "c2VjcmV0"}},
    "ConfigMap": {"data": {"k": "v"}},
    "Event": {
        "involvedObject": {"kind": "Pod", "name": "a", "namespace": "default"},
        "reason": "Test",
        "message": "hello",
        "type": "Normal",
    },
    "events.k8s.io/Event": {
        "eventTime": "2024-01-01T00:00:00.000000Z",
        "reason": "Test",
        "action": "Testing",
        "reportingController": "felix-lite",
        "reportingInstance": "t",
        "type": "Normal",
    },
    "NetworkPolicy": {"spec": {"podSelector": {}}},
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_crud_each_kind(api: client.ApiClient, kind: str) -> None:
    create, read, list_, patch, replace, delete = KINDS[kind](api)
    ns = "default"
    body = {"metadata": {"name": "t1", "labels": {"app": "one"}}, **BODIES[kind]}
    made = create(ns, body)
    assert made.metadata.name == "t1" and made.metadata.uid
    assert made.metadata.creation_timestamp is not None
    rv1 = int(made.metadata.resource_version)
    create(ns, {**body, "metadata": {"name": "t2", "labels": {"app": "two"}}})

    got = read(ns, "t1")
    assert got.metadata.uid == made.metadata.uid
    listed = list_(ns, label_selector="app=one")
    assert [o.metadata.name for o in listed.items] == ["t1"]
    assert int(listed.metadata.resource_version) > rv1

    patched = patch(ns, "t1", {"metadata": {"labels": {"extra": "yes"}}})
    assert patched.metadata.labels["extra"] == "yes" and patched.metadata.labels["app"] == "one"
    assert int(patched.metadata.resource_version) > rv1

    raw = client.ApiClient().sanitize_for_serialization(patched)
    raw["metadata"]["labels"] = {"app": "replaced"}
    replaced = replace(ns, "t1", raw)
    assert replaced.metadata.labels.get("app") == "replaced"
    assert "extra" not in replaced.metadata.labels
    assert int(replaced.metadata.resource_version) > int(patched.metadata.resource_version)

    deleted = delete(ns, "t1")
    assert deleted is not None
    with pytest.raises(ApiException) as ei:
        read(ns, "t1")
    assert ei.value.status == 404
    assert [
        o.metadata.name
        for o in list_(ns, label_selector="app").items
        if o.metadata.name.startswith("t")
    ] == ["t2"]


def test_create_defaults_and_conflicts(core: client.CoreV1Api, net: client.NetworkingV1Api) -> None:
    gen = core.create_namespaced_config_map("default", {"metadata": {"generateName": "cm-"}})
    assert gen.metadata.name.startswith("cm-") and len(gen.metadata.name) == 8

    with pytest.raises(ApiException) as ei:
        core.create_namespaced_config_map("default", {"metadata": {"name": gen.metadata.name}})
    st = _status(ei.value)
    assert (ei.value.status, st["reason"]) == (409, "AlreadyExists")
    assert st["details"] == {"name": gen.metadata.name, "group": "", "kind": "configmaps"}

    with pytest.raises(ApiException) as ei:
        core.create_namespaced_pod("missing", _pod("a"))
    assert (
        ei.value.status == 404 and 'namespaces "missing" not found' in _status(ei.value)["message"]
    )

    with pytest.raises(ApiException) as ei:
        core.create_namespaced_config_map("default", {"metadata": {"name": "Bad_Name"}})
    assert (ei.value.status, _status(ei.value)["reason"]) == (422, "Invalid")

    ns = core.read_namespace("default")
    assert ns.metadata.labels["kubernetes.io/metadata.name"] == "default"
    assert ns.status.phase == "Active"

    pol = net.create_namespaced_network_policy(
        "default",
        {
            "metadata": {"name": "p"},
            "spec": {
                "podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [{"ports": [{"port": 80}]}],
                "egress": [{}],
            },
        },
    )
    assert pol.spec.policy_types == ["Ingress", "Egress"]
    assert pol.spec.ingress[0].ports[0].protocol == "TCP"
    assert pol.metadata.generation == 1
    relabelled = net.patch_namespaced_network_policy(
        "p", "default", {"metadata": {"labels": {"a": "b"}}}
    )
    assert relabelled.metadata.generation == 1
    respec = net.patch_namespaced_network_policy("p", "default", {"spec": {"egress": None}})
    assert respec.metadata.generation == 2


def test_not_found_shape(server: ApiServer, core: client.CoreV1Api) -> None:
    with pytest.raises(ApiException) as ei:
        core.read_namespaced_pod("ghost", "default")
    st = _status(ei.value)
    assert st["reason"] == "NotFound" and st["message"] == 'pods "ghost" not found'
    assert st["details"] == {"name": "ghost", "group": "", "kind": "pods"}
    with pytest.raises(ApiException) as ei:
        core.delete_namespaced_pod("ghost", "default")
    assert ei.value.status == 404
    code, body = _raw(server, "/apis/networking.k8s.io/v1/namespaces/default/networkpolicies/ghost")
    assert code == 404
    assert json.loads(body)["message"] == 'networkpolicies.networking.k8s.io "ghost" not found'


def test_stale_update_conflicts(core: client.CoreV1Api) -> None:
    cm = core.create_namespaced_config_map(
        "default", {"metadata": {"name": "c"}, "data": {"v": "1"}}
    )
    raw = client.ApiClient().sanitize_for_serialization(cm)
    fresh = core.replace_namespaced_config_map("c", "default", {**raw, "data": {"v": "2"}})
    with pytest.raises(ApiException) as ei:
        core.replace_namespaced_config_map("c", "default", {**raw, "data": {"v": "3"}})
    st = _status(ei.value)
    assert (ei.value.status, st["reason"]) == (409, "Conflict")
    assert "the object has been modified" in st["message"]
    # A merge patch carrying a stale resourceVersion is a precondition too.
    with pytest.raises(ApiException) as ei:
        core.patch_namespaced_config_map(
            "c",
            "default",
            {
                "metadata": {"resourceVersion": raw["metadata"]["resourceVersion"]},
                "data": {"v": "4"},
            },
            _content_type=MERGE,
        )
    assert ei.value.status == 409
    assert core.read_namespaced_config_map("c", "default").data == {"v": "2"}
    # A no-op write keeps the version.
    again = core.replace_namespaced_config_map(
        "c", "default", client.ApiClient().sanitize_for_serialization(fresh)
    )
    assert again.metadata.resource_version == fresh.metadata.resource_version


def test_patch_types(core: client.CoreV1Api) -> None:
    core.create_namespaced_pod("default", _pod("a", labels={"pod": "a", "gone": "x"}))
    p = core.patch_namespaced_pod(
        "a",
        "default",
        [
            {"op": "add", "path": "/metadata/labels/new~1key", "value": "v"},
            {"op": "remove", "path": "/metadata/labels/gone"},
            {"op": "test", "path": "/metadata/labels/pod", "value": "a"},
        ],
    )
    assert p.metadata.labels == {"pod": "a", "new/key": "v"}
    with pytest.raises(ApiException) as ei:
        core.patch_namespaced_pod(
            "a", "default", [{"op": "test", "path": "/metadata/labels/pod", "value": "z"}]
        )
    assert ei.value.status == 422
    p = core.patch_namespaced_pod(
        "a", "default", {"metadata": {"labels": {"new/key": None}}}, _content_type=MERGE
    )
    assert p.metadata.labels == {"pod": "a"}
    # The client rewrites an object body to strategic merge; a raw JSON patch must be a list.
    req = urllib.request.Request(
        core.api_client.configuration.host + "/api/v1/namespaces/default/pods/a",
        data=b'{"metadata": {}}',
        method="PATCH",
        headers={"Content-Type": "application/json-patch+json"},
    )
    with pytest.raises(urllib.error.HTTPError) as he:
        urllib.request.urlopen(req, timeout=10)
    assert he.value.code == 400
    assert "jsonpatch.Patch" in json.loads(he.value.read())["message"]


def test_pod_status_subresource(core: client.CoreV1Api) -> None:
    body = _pod("a")
    body["status"] = {"podIP": "10.0.0.9", "phase": "Running"}
    made = core.create_namespaced_pod("default", body)
    assert made.status.pod_ip is None and made.status.phase == "Pending"
    st = core.patch_namespaced_pod_status(
        "a", "default", {"status": {"podIP": "10.244.1.2", "phase": "Running"}}
    )
    assert st.status.pod_ip == "10.244.1.2"
    assert st.metadata.generation == made.metadata.generation
    # Status sent to the main resource is ignored, as with a real apiserver.
    p = core.patch_namespaced_pod(
        "a", "default", {"status": {"podIP": "10.9.9.9"}, "metadata": {"labels": {"x": "y"}}}
    )
    assert p.status.pod_ip == "10.244.1.2" and p.metadata.labels == {"x": "y"}
    node = core.create_node({"metadata": {"name": "n1"}})
    node.status = client.V1NodeStatus(
        addresses=[client.V1NodeAddress(type="InternalIP", address="192.168.0.1")]
    )
    out = core.replace_node_status("n1", node)
    assert out.status.addresses[0].address == "192.168.0.1"


def test_secret_string_data(core: client.CoreV1Api) -> None:
    s = core.create_namespaced_secret(
        "default", {"metadata": {"name": "bgp"}, "stringData": {"password": "hunter2"}}
    )
    assert s.data == {"password": "aHVudGVyMg=="} and s.type == "Opaque"


# ----------------------------------------------------------------- selectors


def test_label_and_field_selectors(core: client.CoreV1Api) -> None:
    _ns(core, "x", ns="x")
    _ns(core, "y", ns="y")
    core.create_namespaced_pod("x", _pod("a", labels={"pod": "a", "tier": "web"}, node="node-1"))
    core.create_namespaced_pod("x", _pod("b", labels={"pod": "b", "tier": "db"}, node="node-2"))
    core.create_namespaced_pod("y", _pod("c", labels={"pod": "c"}, node="node-1"))

    def names(**kw: Any) -> list[str]:
        return [
            f"{p.metadata.namespace}/{p.metadata.name}"
            for p in core.list_pod_for_all_namespaces(**kw).items
        ]

    assert names() == ["x/a", "x/b", "y/c"]
    assert names(label_selector="tier") == ["x/a", "x/b"]
    assert names(label_selector="!tier") == ["y/c"]
    assert names(label_selector="tier==web") == ["x/a"]
    assert names(label_selector="tier!=web") == ["x/b", "y/c"]
    assert names(label_selector="pod in (a, c)") == ["x/a", "y/c"]
    assert names(label_selector="pod notin (a,c),tier") == ["x/b"]
    assert names(field_selector="spec.nodeName=node-1") == ["x/a", "y/c"]
    assert names(field_selector="spec.nodeName!=node-1,metadata.namespace=x") == ["x/b"]
    assert [p.metadata.name for p in core.list_namespaced_pod("x").items] == ["a", "b"]
    assert [n.metadata.name for n in core.list_namespace(label_selector="ns in (x)").items] == ["x"]
    for bad in ("tier in (a", "=x", "a b c"):
        with pytest.raises(ApiException) as ei:
            core.list_pod_for_all_namespaces(label_selector=bad)
        assert ei.value.status == 400, bad
    with pytest.raises(ApiException) as ei:
        core.list_pod_for_all_namespaces(field_selector="spec.bogus=1")
    assert ei.value.status == 400 and "field label not supported" in _status(ei.value)["message"]


def test_label_selector_matching_table() -> None:
    labels = {"a": "1", "b": "2"}
    table = {
        "a": True,
        "!a": False,
        "c": False,
        "!c": True,
        "a=1": True,
        "a==2": False,
        "a!=2": True,
        "c!=2": True,
        "a in (1,3)": True,
        "a notin (1)": False,
        "c notin (1)": True,
        "a=1,b=2": True,
        "a=1,b=3": False,
        "": True,
    }
    for text, want in table.items():
        assert all(r.matches(labels) for r in parse_label_selector(text)) is want, text


def test_merge_patch_rfc7386() -> None:
    assert merge_patch({"a": "b", "c": {"d": "e", "f": "g"}}, {"a": "z", "c": {"f": None}}) == {
        "a": "z",
        "c": {"d": "e"},
    }
    assert merge_patch({"a": [1, 2]}, {"a": [3]}) == {"a": [3]}
    assert merge_patch({"a": {"b": "c"}}, {"a": {"b": {"x": None}}}) == {"a": {"b": {}}}


def test_pagination(core: client.CoreV1Api) -> None:
    for i in range(5):
        core.create_namespaced_config_map("default", {"metadata": {"name": f"cm{i}"}})
    first = core.list_namespaced_config_map("default", limit=2)
    assert [c.metadata.name for c in first.items] == ["cm0", "cm1"]
    assert first.metadata.remaining_item_count == 3
    seen = [c.metadata.name for c in first.items]
    token = first.metadata._continue
    while token:
        page = core.list_namespaced_config_map("default", limit=2, _continue=token)
        assert page.metadata.resource_version == first.metadata.resource_version
        seen += [c.metadata.name for c in page.items]
        token = page.metadata._continue
    assert seen == [f"cm{i}" for i in range(5)]


# -------------------------------------------------------------------- watch


def test_watch_replays_events_in_order(core: client.CoreV1Api) -> None:
    rv0 = core.list_namespaced_pod("default").metadata.resource_version
    core.create_namespaced_pod("default", _pod("a", labels={"pod": "a"}))
    core.patch_namespaced_pod("a", "default", {"metadata": {"labels": {"v": "2"}}})
    core.create_namespaced_config_map("default", {"metadata": {"name": "other-kind"}})
    core.delete_namespaced_pod("a", "default")
    evs = _events(
        watch.Watch(), core.list_namespaced_pod, "default", resource_version=rv0, timeout_seconds=1
    )
    assert [e["type"] for e in evs] == ["ADDED", "MODIFIED", "DELETED"]
    rvs = [int(e["raw"]["metadata"]["resourceVersion"]) for e in evs]
    assert rvs == sorted(rvs) and len(set(rvs)) == 3 and rvs[0] > int(rv0)
    assert evs[1]["raw"]["metadata"]["labels"] == {"pod": "a", "v": "2"}
    assert evs[0]["raw"]["kind"] == "Pod"


def test_watch_live_events(core: client.CoreV1Api) -> None:
    rv0 = core.list_namespaced_pod("default").metadata.resource_version
    w = watch.Watch()
    got: list[tuple[str, str]] = []
    started = threading.Event()

    def writer() -> None:
        started.wait(10)
        core.create_namespaced_pod("default", _pod("live"))
        core.delete_namespaced_pod("live", "default")

    t = threading.Thread(target=writer)
    t.start()
    try:
        for e in w.stream(
            core.list_namespaced_pod,
            "default",
            resource_version=rv0,
            timeout_seconds=20,
            allow_watch_bookmarks=True,
        ):
            started.set()
            if e["type"] == "BOOKMARK":
                continue
            got.append((e["type"], e["object"].metadata.name))
            if e["type"] == "DELETED":
                w.stop()
    finally:
        started.set()
        t.join()
    assert got == [("ADDED", "live"), ("DELETED", "live")]


def test_watch_without_version_lists_first(core: client.CoreV1Api) -> None:
    core.create_namespaced_pod("default", _pod("a"))
    core.create_namespaced_pod("default", _pod("b"))
    evs = _events(watch.Watch(), core.list_namespaced_pod, "default", timeout_seconds=1)
    assert [(e["type"], e["raw"]["metadata"]["name"]) for e in evs] == [
        ("ADDED", "a"),
        ("ADDED", "b"),
    ]


def test_watch_selector_transitions(core: client.CoreV1Api) -> None:
    core.create_namespaced_pod("default", _pod("a", labels={"role": "web"}))
    rv0 = core.list_namespaced_pod("default").metadata.resource_version
    core.patch_namespaced_pod("a", "default", {"metadata": {"labels": {"role": "db"}}})
    core.patch_namespaced_pod("a", "default", {"metadata": {"labels": {"role": "web"}}})
    core.patch_namespaced_pod("a", "default", {"metadata": {"labels": {"x": "1"}}})
    evs = _events(
        watch.Watch(),
        core.list_namespaced_pod,
        "default",
        resource_version=rv0,
        label_selector="role=web",
        timeout_seconds=1,
    )
    assert [e["type"] for e in evs] == ["DELETED", "ADDED", "MODIFIED"]


def test_watch_after_compact_is_gone(server: ApiServer, core: client.CoreV1Api) -> None:
    rv0 = core.list_namespaced_pod("default").metadata.resource_version
    core.create_namespaced_pod("default", _pod("a"))
    server.compact()
    with pytest.raises(ApiException) as ei:
        list(
            watch.Watch().stream(
                core.list_namespaced_pod, "default", resource_version=rv0, timeout_seconds=5
            )
        )
    assert ei.value.status == 410 and "Expired" in ei.value.reason
    # Without timeout_seconds the client retries once, then raises the same way.
    with pytest.raises(ApiException) as ei:
        list(watch.Watch().stream(core.list_namespaced_pod, "default", resource_version=rv0))
    assert ei.value.status == 410
    # On the wire: HTTP 200, then one ERROR event carrying a 410 Status.
    code, body = _raw(server, f"/api/v1/namespaces/default/pods?watch=1&resourceVersion={rv0}")
    [line] = body.decode().splitlines()
    ev = json.loads(line)
    assert code == 200 and ev["type"] == "ERROR"
    assert (ev["object"]["code"], ev["object"]["reason"]) == (410, "Expired")
    # Watching from the current version still works.
    rv1 = core.list_namespaced_pod("default").metadata.resource_version
    assert (
        list(
            watch.Watch().stream(
                core.list_namespaced_pod, "default", resource_version=rv1, timeout_seconds=1
            )
        )
        == []
    )


def test_bounded_log_expires_old_versions(tmp_path: Path) -> None:
    with ApiServer(Store(max_events=3)) as srv:
        c = _api_client(srv, tmp_path)
        core = client.CoreV1Api(c)
        rv0 = core.list_namespaced_config_map("default").metadata.resource_version
        for i in range(8):
            core.create_namespaced_config_map("default", {"metadata": {"name": f"c{i}"}})
        with pytest.raises(ApiException) as ei:
            list(
                watch.Watch().stream(
                    core.list_namespaced_config_map,
                    "default",
                    resource_version=rv0,
                    timeout_seconds=1,
                )
            )
        assert ei.value.status == 410
        c.close()


def test_bookmarks_and_timeout(server: ApiServer, core: client.CoreV1Api) -> None:
    core.create_namespaced_pod("default", _pod("a"))
    rv = core.list_namespaced_pod("default").metadata.resource_version
    w = watch.Watch()
    evs = list(
        w.stream(
            core.list_namespaced_pod,
            "default",
            resource_version=rv,
            allow_watch_bookmarks=True,
            timeout_seconds=1,
        )
    )
    # The stream ended by itself (timeoutSeconds) with only bookmarks in it.
    assert evs and {e["type"] for e in evs} == {"BOOKMARK"}
    assert all(e["raw_object"]["metadata"]["resourceVersion"] == rv for e in evs)
    assert w.resource_version == rv
    # No bookmarks unless asked.
    assert (
        list(
            watch.Watch().stream(
                core.list_namespaced_pod, "default", resource_version=rv, timeout_seconds=1
            )
        )
        == []
    )


def test_send_initial_events(server: ApiServer, core: client.CoreV1Api) -> None:
    core.create_namespaced_pod("default", _pod("a"))
    code, body = _raw(
        server,
        "/api/v1/namespaces/default/pods?watch=1&sendInitialEvents=true"
        "&allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan"
        "&timeoutSeconds=1",
    )
    assert code == 200
    evs = [json.loads(line) for line in body.decode().splitlines()]
    assert [e["type"] for e in evs[:2]] == ["ADDED", "BOOKMARK"]
    assert evs[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


def test_many_watchers(core: client.CoreV1Api, api: client.ApiClient) -> None:
    rv0 = core.list_namespaced_config_map("default").metadata.resource_version
    results: list[list[str]] = []
    lock = threading.Lock()

    def run() -> None:
        w = watch.Watch()
        names = []
        for e in w.stream(
            core.list_namespaced_config_map, "default", resource_version=rv0, timeout_seconds=20
        ):
            names.append(e["object"].metadata.name)
            if len(names) == 3:
                w.stop()
        with lock:
            results.append(names)

    threads = [threading.Thread(target=run) for _ in range(18)]
    for t in threads:
        t.start()
    for i in range(3):
        core.create_namespaced_config_map("default", {"metadata": {"name": f"m{i}"}})
    for t in threads:
        t.join(30)
    assert results == [["m0", "m1", "m2"]] * 18


def test_namespace_delete_cascades(core: client.CoreV1Api) -> None:
    _ns(core, "x")
    core.create_namespaced_pod("x", _pod("a"))
    rv0 = core.list_pod_for_all_namespaces().metadata.resource_version
    core.delete_namespace("x")
    evs = _events(
        watch.Watch(), core.list_pod_for_all_namespaces, resource_version=rv0, timeout_seconds=1
    )
    assert [(e["type"], e["raw"]["metadata"]["name"]) for e in evs] == [("DELETED", "a")]
    assert core.list_pod_for_all_namespaces().items == []


# -------------------------------------------------------------- custom objects


def test_bgppeer_custom_objects(crd: client.CustomObjectsApi) -> None:
    g, v, plural = "felixlite.io", "v1alpha1", "bgppeers"
    peer = {
        "apiVersion": "felixlite.io/v1alpha1",
        "kind": "BGPPeer",
        "metadata": {"name": "tor"},
        "spec": {
            "peerIP": "10.0.0.1",
            "asNumber": 65000,
            "nodeSelector": {"matchLabels": {"rack": "r1"}},
            "passwordSecretRef": {"name": "bgp", "key": "password"},
        },
    }
    made = crd.create_cluster_custom_object(g, v, plural, peer)
    assert made["metadata"]["generation"] == 1 and "namespace" not in made["metadata"]
    assert crd.get_cluster_custom_object(g, v, plural, "tor")["spec"]["asNumber"] == 65000
    listed = crd.list_cluster_custom_object(g, v, plural)
    assert listed["kind"] == "BGPPeerList" and [i["kind"] for i in listed["items"]] == ["BGPPeer"]
    patched = crd.patch_cluster_custom_object(g, v, plural, "tor", {"spec": {"holdTime": 90}})
    assert patched["spec"]["holdTime"] == 90 and patched["metadata"]["generation"] == 2
    status = crd.patch_cluster_custom_object_status(
        g, v, plural, "tor", {"status": {"nodes": [{"node": "node-1", "state": "Established"}]}}
    )
    assert status["status"]["nodes"][0]["state"] == "Established"
    assert status["metadata"]["generation"] == 2

    no_rv = {k: v_ for k, v_ in patched.items() if k != "metadata"}
    no_rv["metadata"] = {"name": "tor"}
    with pytest.raises(ApiException) as ei:
        crd.replace_cluster_custom_object(g, v, plural, "tor", no_rv)
    assert ei.value.status == 422  # custom resources need metadata.resourceVersion on PUT
    with pytest.raises(ApiException) as ei:
        crd.patch_cluster_custom_object(
            g,
            v,
            plural,
            "tor",
            {"spec": {"holdTime": 30}},
            _content_type="application/strategic-merge-patch+json",
        )
    assert ei.value.status == 415

    crd.create_cluster_custom_object(
        g,
        v,
        "bgpconfigurations",
        {
            "apiVersion": "felixlite.io/v1alpha1",
            "kind": "BGPConfiguration",
            "metadata": {"name": "default"},
            "spec": {"asNumber": 64512, "nodeToNodeMesh": False, "podCIDRs": ["10.244.0.0/16"]},
        },
    )
    evs = _events(
        watch.Watch(), crd.list_cluster_custom_object, g, v, "bgpconfigurations", timeout_seconds=1
    )
    assert [(e["type"], e["raw"]["spec"]["asNumber"]) for e in evs] == [("ADDED", 64512)]
    deleted = crd.delete_cluster_custom_object(g, v, plural, "tor")
    assert deleted["metadata"]["name"] == "tor"
    with pytest.raises(ApiException) as ei:
        crd.get_cluster_custom_object(g, v, plural, "tor")
    assert ei.value.status == 404


# ------------------------------------------------------- failures and restarts


def test_injected_failures(server: ApiServer, core: client.CoreV1Api) -> None:
    server.set_fail(2, 503)
    for _ in range(2):
        with pytest.raises(ApiException) as ei:
            core.list_namespace()
        assert ei.value.status == 503 and _status(ei.value)["reason"] == "ServiceUnavailable"
    assert [n.metadata.name for n in core.list_namespace().items] == ["default", "kube-system"]
    # With Retry-After the client retries a GET by itself, as client-go does.
    server.set_fail(1, 429, retry_after=1)
    before = server.requests
    assert [n.metadata.name for n in core.list_namespace().items] == ["default", "kube-system"]
    assert server.requests == before + 1
    server.set_fail(1, 500, path_contains="/pods")
    core.list_namespace()
    with pytest.raises(ApiException) as ei:
        core.list_namespaced_pod("default")
    assert ei.value.status == 500


def test_restart_with_persisted_state(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    srv = ApiServer(state_path=state).start()
    try:
        c = _api_client(srv, tmp_path)
        core = client.CoreV1Api(c)
        made = core.create_namespaced_pod("default", _pod("a"))
        rv_before = int(core.list_namespaced_pod("default").metadata.resource_version)
        # A watch open across the restart ends when the server goes.
        ended = threading.Event()

        def watcher() -> None:
            with contextlib.suppress(Exception):  # a cut connection, as in a crash
                for _ in watch.Watch().stream(
                    core.list_namespaced_pod, "default", resource_version=str(rv_before)
                ):
                    pass
            ended.set()

        t = threading.Thread(target=watcher, daemon=True)
        t.start()
        srv.stop()
        assert state.exists()
        srv = ApiServer(state_path=state, port=srv.port).start()
        assert ended.wait(30)
        c.close()
        core = client.CoreV1Api(_api_client(srv, tmp_path))
        got = core.read_namespaced_pod("a", "default")
        assert got.metadata.uid == made.metadata.uid
        assert got.metadata.resource_version == made.metadata.resource_version
        after = core.create_namespaced_pod("default", _pod("b"))
        assert int(after.metadata.resource_version) > rv_before
        # The event log survived: a watch from before the restart resumes.
        evs = _events(
            watch.Watch(),
            core.list_namespaced_pod,
            "default",
            resource_version=str(rv_before),
            timeout_seconds=1,
        )
        assert [(e["type"], e["raw"]["metadata"]["name"]) for e in evs] == [("ADDED", "b")]
    finally:
        srv.stop()


def test_restart_losing_state(server: ApiServer, core: client.CoreV1Api) -> None:
    core.create_namespaced_pod("default", _pod("a"))
    server.restart(keep_state=False)
    assert core.list_namespaced_pod("default").items == []
    server.restart(keep_state=True)
    assert [n.metadata.name for n in core.list_namespace().items] == ["default", "kube-system"]


def test_state_file_rejects_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json"):
        Store.load(bad)
    bad.write_text(json.dumps({"format": 99}))
    with pytest.raises(ValueError, match="format"):
        Store.load(bad)


def test_standalone_process(tmp_path: Path) -> None:
    state, kc = tmp_path / "state.json", tmp_path / "kubeconfig"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "felix_lite.apiserver",
            "--port",
            "0",
            "--state",
            str(state),
            "--kubeconfig",
            str(kc),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert info["url"].startswith("http://127.0.0.1:")
        c = config.new_client_from_config(config_file=str(kc))
        client.CoreV1Api(c).create_namespace({"metadata": {"name": "x"}})
        c.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=20)
    assert rc == 0
    saved = Store.load(state)
    assert "x" in [n["metadata"]["name"] for n in saved.list(resource("namespaces"))[0]]
