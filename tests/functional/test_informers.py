"""Informers against the API emulator over real HTTP, through the official client.

No network namespaces and no root: the emulator listens on 127.0.0.1 on a free
port, in-process; every fixture stops it and every informer it started.
Waits poll a condition with a generous deadline (they fail, never pass, on
timeout); only the stop test bounds a duration, as its subject is promptness.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from controller.cache import Cache, Key, Kind
from controller.coalesce import Coalescer
from controller.events import EventRecorder, core_v1_poster
from controller.informer import Informer, agent_informers
from controller.kube import api_client
from controller.nodestate import NodeState, converters
from felix_lite.apiserver import ApiServer, resource, write_kubeconfig
from felix_lite.apiserver.store import PatchType
from felix_lite.waiting import wait_until
from policy.model import NetworkPolicy

FAST = {"backoff_initial": 0.05, "backoff_max": 0.3, "watch_timeout": 30}
SECRET_NS = "felix-lite"
PODS = resource("pods")


def wait_for(pred: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    wait_until(pred, timeout, what or repr(pred), step=0.02)


class Recorder:
    """An InformerSink that records (op, kind, ns/name, labels) in arrival order."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.log: list[tuple[str, str, dict[str, str]]] = []

    @staticmethod
    def _ref(obj: Mapping[str, Any]) -> str:
        m = obj.get("metadata") or {}
        return f"{m['namespace']}/{m['name']}" if m.get("namespace") else m["name"]

    def upsert(self, kind: Kind, obj: Mapping[str, Any]) -> None:
        labels = dict((obj.get("metadata") or {}).get("labels") or {})
        with self.lock:
            self.log.append(("upsert", self._ref(obj), labels))

    def delete(self, kind: Kind, obj: Mapping[str, Any]) -> None:
        with self.lock:
            self.log.append(("delete", self._ref(obj), {}))

    def synced(self, kind: Kind) -> None:
        with self.lock:
            self.log.append(("synced", kind.value, {}))

    def ops(self, start: int = 0) -> list[tuple[str, str]]:
        with self.lock:
            return [(op, ref) for op, ref, _ in self.log[start:]]

    def __len__(self) -> int:
        with self.lock:
            return len(self.log)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ApiServer]:
    srv = ApiServer(bookmark_interval=0.2, state_path=tmp_path / "state.json").start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def api(server: ApiServer, tmp_path: Path) -> Iterator[client.ApiClient]:
    c = api_client(write_kubeconfig(tmp_path / "kubeconfig", server.url))
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def core(api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api)


@pytest.fixture
def informers() -> Iterator[list[Informer]]:
    """Informers a test starts; all are stopped (and joined) at the end."""
    started: list[Informer] = []
    try:
        yield started
    finally:
        for inf in started:
            inf.signal_stop()
        for inf in started:
            inf.join(5)


def start(
    informers: list[Informer], api: client.ApiClient, kind: Kind, sink: Any, **kw: Any
) -> Informer:
    inf = Informer(api, kind, sink, **{**FAST, **kw})
    informers.append(inf)
    return inf.start()


def make_pod(core: client.CoreV1Api, ns: str, name: str, **labels: str) -> None:
    core.create_namespaced_pod(
        ns,
        {
            "metadata": {"name": name, "labels": labels},
            "spec": {"containers": [{"name": "c", "image": "i"}]},
        },
    )


# ---------------------------------------------------------------------------


def test_initial_list_then_synced_then_watch_events(
    api: client.ApiClient, core: client.CoreV1Api, informers: list[Informer]
) -> None:
    core.create_namespace({"metadata": {"name": "x"}})
    for name in ("a", "b"):
        make_pod(core, "x", name, pod=name)
    rec = Recorder()
    inf = start(informers, api, Kind.POD, rec, page_size=1)  # paged list
    assert inf.has_synced.wait(10)
    assert rec.ops() == [("upsert", "x/a"), ("upsert", "x/b"), ("synced", "pod")]

    mark = len(rec)
    make_pod(core, "x", "c", pod="c")
    core.patch_namespaced_pod("c", "x", {"metadata": {"labels": {"pod": "c2"}}})
    core.delete_namespaced_pod("a", "x")
    wait_for(lambda: len(rec) >= mark + 3, what="three watch events")
    assert rec.ops(mark) == [("upsert", "x/c"), ("upsert", "x/c"), ("delete", "x/a")]
    assert rec.log[mark + 1][2] == {"pod": "c2"}
    assert inf.restarts == 0 and inf.relists == 0


def test_410_relist_reports_only_the_difference(
    server: ApiServer, api: client.ApiClient, core: client.CoreV1Api, informers: list[Informer]
) -> None:
    core.create_namespace({"metadata": {"name": "x"}})
    for name in ("keep", "gone", "changed"):
        make_pod(core, "x", name, pod=name)
    rec = Recorder()
    inf = start(informers, api, Kind.POD, rec)
    assert inf.has_synced.wait(10)
    old_rv = inf.resource_version
    # While the informer is disconnected: delete one, change one, add one; then
    # compact the log so that its resourceVersion is too old (410 on resume).
    server.stop()
    mark = len(rec)
    store = server.store
    store.delete(PODS, "x", "gone")
    store.patch(
        PODS, "x", "changed", {"metadata": {"labels": {"pod": "new"}}}, patch_type=PatchType.MERGE
    )
    store.create(
        PODS,
        "x",
        {"metadata": {"name": "added"}, "spec": {"containers": [{"name": "c", "image": "i"}]}},
    )
    server.compact()
    assert int(old_rv or 0) < store.oldest_watchable_rv
    server.start()
    wait_for(lambda: inf.relists >= 1 and len(rec) >= mark + 3, what="relist diff")
    time.sleep(0.3)  # let anything extra (a wrong re-emit) arrive before checking
    assert sorted(rec.ops(mark)) == [
        ("delete", "x/gone"),
        ("upsert", "x/added"),
        ("upsert", "x/changed"),
    ]
    assert ("synced", "pod") not in rec.ops(mark)  # synced once, at the first list
    assert inf.resource_version == str(store.resource_version)


def test_apiserver_restart_reconnects_and_resumes(
    server: ApiServer,
    api: client.ApiClient,
    core: client.CoreV1Api,
    informers: list[Informer],
    tmp_path: Path,
) -> None:
    core.create_namespace({"metadata": {"name": "x"}})
    rec = Recorder()
    inf = start(informers, api, Kind.POD, rec)
    assert inf.has_synced.wait(10)
    port = server.port
    server.stop()  # a crash from the client's view: watch connections cut
    wait_for(lambda: inf.restarts >= 1, what="a restart counted")
    again = ApiServer(
        bookmark_interval=0.2, port=port, state_path=tmp_path / "state.json"
    ).start()  # persisted state
    try:
        mark = len(rec)
        make_pod(core, "x", "after", pod="after")
        wait_for(lambda: ("upsert", "x/after") in rec.ops(mark), what="event after restart")
        assert inf.relists == 0  # resumed from its resourceVersion, no relist needed
        assert rec.ops(mark) == [("upsert", "x/after")]
    finally:
        inf.signal_stop()
        inf.join(5)
        again.stop()


def test_errors_back_off_and_recover(
    server: ApiServer, api: client.ApiClient, core: client.CoreV1Api, informers: list[Informer]
) -> None:
    server.set_fail(3, 500, path_contains="/networkpolicies")
    rec = Recorder()
    inf = start(informers, api, Kind.NETWORK_POLICY, rec)
    assert inf.has_synced.wait(10)
    assert inf.restarts == 3


def test_bookmarks_advance_the_resource_version(
    server: ApiServer, api: client.ApiClient, core: client.CoreV1Api, informers: list[Informer]
) -> None:
    rec = Recorder()
    inf = start(informers, api, Kind.NODE, rec)
    assert inf.has_synced.wait(10)
    for name in ("p", "q", "r"):  # other kinds move the global resourceVersion
        core.create_namespace({"metadata": {"name": name}})
    target = str(server.store.resource_version)
    wait_for(lambda: inf.resource_version == target, what="bookmark to the latest rv")
    assert inf.bookmarks >= 1
    assert rec.ops() == [("synced", "node")]


def test_crd_informers(api: client.ApiClient, informers: list[Informer]) -> None:
    crd = client.CustomObjectsApi(api)
    crd.create_cluster_custom_object(
        "felixlite.io",
        "v1alpha1",
        "bgppeers",
        {
            "apiVersion": "felixlite.io/v1alpha1",
            "kind": "BGPPeer",
            "metadata": {"name": "tor"},
            "spec": {"peerIP": "192.168.0.254", "asNumber": 65000},
        },
    )
    rec = Recorder()
    peers = start(informers, api, Kind.BGP_PEER, rec)
    confs = start(informers, api, Kind.BGP_CONFIGURATION, rec)
    assert peers.has_synced.wait(10) and confs.has_synced.wait(10)
    crd.create_cluster_custom_object(
        "felixlite.io",
        "v1alpha1",
        "bgpconfigurations",
        {
            "apiVersion": "felixlite.io/v1alpha1",
            "kind": "BGPConfiguration",
            "metadata": {"name": "default"},
            "spec": {"asNumber": 65100},
        },
    )
    wait_for(lambda: ("upsert", "default") in rec.ops(), what="BGPConfiguration event")
    assert ("upsert", "tor") in rec.ops()


def test_stop_is_prompt(api: client.ApiClient) -> None:
    cache = Cache(converters())
    group = agent_informers(api, cache, secret_namespace=SECRET_NS, **FAST)
    group.start()
    try:
        assert group.wait_synced(10)
        assert cache.in_sync
    finally:
        t0 = time.monotonic()
        group.stop(timeout=10)
        elapsed = time.monotonic() - t0
    assert not any(inf.alive for inf in group.informers)
    # watches block for up to watch_timeout (30 s): stop must cut them short,
    # not wait them out (a generous bound, not a speed target)
    assert elapsed < 5.0, f"stop took {elapsed:.2f}s"


def test_malformed_policy_logs_posts_event_and_keeps_last_good(
    api: client.ApiClient,
    core: client.CoreV1Api,
    informers: list[Informer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    core.create_namespace({"metadata": {"name": "y"}})
    net = client.NetworkingV1Api(api)

    def policy(cidr: str) -> dict[str, Any]:
        return {
            "metadata": {"name": "allow-web"},
            "spec": {
                "podSelector": {},
                "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"ipBlock": {"cidr": cidr}}]}],
            },
        }

    recorder = EventRecorder(core_v1_poster(core), host="node-1").start()
    cache = Cache(converters(), events=recorder)
    key = Key(Kind.NETWORK_POLICY, "y", "allow-web")
    try:
        net.create_namespaced_network_policy("y", policy("10.1.0.0/16"))
        inf = start(informers, api, Kind.NETWORK_POLICY, cache)
        wait_for(lambda: cache.get(key) is not None, what="the good policy")
        good = cache.get(key)
        assert isinstance(good, NetworkPolicy)
        with caplog.at_level(logging.WARNING, logger="controller.cache"):
            # The emulator validates no NetworkPolicy fields, so the broken edit is stored.
            net.patch_namespaced_network_policy(
                "allow-web",
                "y",
                {"spec": {"ingress": [{"from": [{"ipBlock": {"cidr": "10.1.0.0/33"}}]}]}},
            )
            wait_for(lambda: key in cache.invalid(), what="the invalid version")

            def events() -> list[Any]:
                return [
                    e
                    for e in core.list_namespaced_event("y").items
                    if e.reason == "InvalidNetworkPolicy"
                ]

            wait_for(lambda: len(events()) == 1, what="a Warning Event")
        ev = events()[0]
        assert ev.type == "Warning"
        assert (ev.involved_object.kind, ev.involved_object.namespace, ev.involved_object.name) == (
            "NetworkPolicy",
            "y",
            "allow-web",
        )
        assert "spec.ingress[0].from[0].ipBlock.cidr" in ev.message
        assert cache.get(key) == good  # last good version still in force
        lines = [
            r.getMessage()
            for r in caplog.records
            if r.getMessage().startswith("controller.invalid")
        ]
        assert len(lines) == 1
        assert "kind=networkpolicy object=y/allow-web" in lines[0]
        # A fix is picked up as usual.
        net.patch_namespaced_network_policy(
            "allow-web",
            "y",
            {"spec": {"ingress": [{"from": [{"ipBlock": {"cidr": "10.2.0.0/16"}}]}]}},
        )
        wait_for(
            lambda: key not in cache.invalid() and cache.get(key) != good, what="the fixed version"
        )
        assert inf.restarts == 0
    finally:
        recorder.stop()


def _node(name: str, ip: str, cidr: str, **labels: str) -> tuple[dict[str, Any], dict[str, Any]]:
    return (
        {"metadata": {"name": name, "labels": labels}, "spec": {"podCIDR": cidr}},
        {"status": {"addresses": [{"type": "InternalIP", "address": ip}]}},
    )


def test_node_desired_for_a_small_cluster(api: client.ApiClient, core: client.CoreV1Api) -> None:
    crd = client.CustomObjectsApi(api)
    net = client.NetworkingV1Api(api)
    for ns in ("x", SECRET_NS):
        core.create_namespace({"metadata": {"name": ns}})
    for name, ip, cidr, rack in (
        ("n1", "192.168.0.1", "10.244.1.0/24", "a"),
        ("n2", "192.168.0.2", "10.244.2.0/24", "b"),
    ):
        body, status = _node(name, ip, cidr, rack=rack)
        core.create_node(body)
        core.patch_node_status(name, status)
    for name, node, ip in (("a", "n1", "10.244.1.2"), ("b", "n2", "10.244.2.2")):
        core.create_namespaced_pod(
            "x",
            {
                "metadata": {"name": name, "labels": {"pod": name}},
                "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}]},
            },
        )
        core.patch_namespaced_pod_status(name, "x", {"status": {"podIP": ip}})
    net.create_namespaced_network_policy(
        "x",
        {
            "metadata": {"name": "deny-a"},
            "spec": {"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"]},
        },
    )
    core.create_namespaced_secret(
        SECRET_NS,
        {"metadata": {"name": "bgp"}, "data": {"tor": base64.b64encode(b"md5pw").decode()}},
    )
    group_ = "felixlite.io", "v1alpha1"
    crd.create_cluster_custom_object(
        *group_,
        "bgpconfigurations",
        {
            "apiVersion": "felixlite.io/v1alpha1",
            "kind": "BGPConfiguration",
            "metadata": {"name": "default"},
            "spec": {"asNumber": 65100, "podCIDRs": ["10.244.0.0/16"]},
        },
    )
    crd.create_cluster_custom_object(
        *group_,
        "bgppeers",
        {
            "apiVersion": "felixlite.io/v1alpha1",
            "kind": "BGPPeer",
            "metadata": {"name": "tor-a"},
            "spec": {
                "peerIP": "192.168.0.254",
                "asNumber": 65000,
                "nodeSelector": {"matchLabels": {"rack": "a"}},
                "passwordSecretRef": {"name": "bgp", "key": "tor"},
            },
        },
    )

    cache = Cache(converters())
    state = NodeState("n1", secret_namespace=SECRET_NS)
    group = agent_informers(api, cache, secret_namespace=SECRET_NS, **FAST).start()
    try:
        assert group.wait_synced(10)
        coalescer = Coalescer(cache, quiet=0.02, max_delay=0.2)
        coalescer.mark_seen()
        state.apply(cache.take_changes())
        d1 = state.desired(in_sync=cache.in_sync)
        assert d1.in_sync
        assert [p.key for p in d1.local_pods] == ["x/a"]
        assert d1.bgp.local_asn == 65100 and d1.bgp.router_id == "192.168.0.1"
        assert d1.bgp.node_block == "10.244.1.0/24"
        peers = {p.address: p for p in d1.bgp.peers}
        assert sorted(peers) == ["192.168.0.2", "192.168.0.254"]
        assert peers["192.168.0.254"].password == "md5pw"
        assert peers["192.168.0.2"].source == "mesh/n2"
        assert any(name.startswith("FL-") for name in d1.ruleset.chains)

        # n1 leaves rack a: the selector peer goes, in one coalesced batch.
        core.patch_node("n1", {"metadata": {"labels": {"rack": "b"}}})
        assert coalescer.next_batch(timeout=10) is not None
        state.apply(cache.take_changes())
        d2 = state.desired(in_sync=cache.in_sync)
        assert d2.generation == d1.generation + 1
        assert [p.address for p in d2.bgp.peers] == ["192.168.0.2"]

        # Mesh off, and n1 back in rack a: only the ToR remains.
        crd.patch_cluster_custom_object(
            *group_, "bgpconfigurations", "default", {"spec": {"nodeToNodeMesh": False}}
        )
        core.patch_node("n1", {"metadata": {"labels": {"rack": "a"}}})
        wait_for(
            lambda: (
                cache.get(Key(Kind.NODE, None, "n1")) is not None
                and not getattr(
                    cache.get(Key(Kind.BGP_CONFIGURATION, None, "default")),
                    "node_to_node_mesh",
                    True,
                )
                and getattr(cache.get(Key(Kind.NODE, None, "n1")), "labels", {}).get("rack") == "a"
            ),
            what="mesh off and rack a",
        )
        state.apply(cache.take_changes())
        d3 = state.desired(in_sync=cache.in_sync)
        assert [p.address for p in d3.bgp.peers] == ["192.168.0.254"]
        assert d3.generation > d2.generation
    finally:
        group.stop()
