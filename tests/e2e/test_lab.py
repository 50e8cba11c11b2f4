"""`felix-lite lab` end to end, driven through its CLI exactly as outside checks drive it.

Every lab lives in namespaces named `fll<pid%100><seq>*` and a temporary state
directory; a finalizer runs `lab down` and then removes anything left with
that prefix, by PID and by namespace name, on every exit path.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "policies"
_seq = itertools.count(1)


def _unavailable(tor: str = "bird") -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "exabgp", "felix-lite-cni"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    from felix_lite.fabric.routers import router_available

    return router_available(tor)


def run_lab(state_dir: Path, *args: str, check: bool = True, timeout: float = 180) -> str:
    argv = [sys.executable, "-m", "felix_lite", "lab", *args, "--state-dir", str(state_dir)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and r.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv[2:])}: rc={r.returncode}\nstdout:\n{r.stdout[-3000:]}\n"
            f"stderr:\n{r.stderr[-3000:]}"
        )
    return r.stdout if check else r.stdout + r.stderr


def _netns_with(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.split()[0].startswith(prefix)]


class LabHandle:
    def __init__(self, root: Path, *, nodes: int, tor: str = "bird") -> None:
        self.prefix = f"fll{os.getpid() % 100:02d}{next(_seq)}"
        self.dir = root / self.prefix
        self.nodes = nodes
        self.tor = tor
        self.up_output = ""

    def __call__(self, *args: str, **kw: Any) -> str:
        return run_lab(self.dir, *args, **kw)

    def up(self) -> LabHandle:
        self.up_output = self(
            "up", "--nodes", str(self.nodes), "--tor", self.tor, "--prefix", self.prefix
        )
        return self

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "--json"))

    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.dir / "lab.json").read_text())
        return data

    def down(self) -> None:
        """`lab down`, then a safety net: anything left with our prefix goes."""
        from felix_lite.lab.state import ProcRecord, pids_in_netns, proc_start_time, stop_process

        run_lab(self.dir, "down", check=False)
        for ns in _netns_with(self.prefix):
            for pid in pids_in_netns(ns):
                stop_process(ProcRecord("leftover", pid, proc_start_time(pid)), timeout=2)
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, check=False)


def write_yaml(path: Path, docs: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def probe(lab: LabHandle, *, port: int = 80, protocol: str = "tcp") -> dict[tuple[str, str], bool]:
    doc = lab.json("probe", "--port", str(port), "--protocol", protocol)
    assert doc["port"] == port and doc["protocol"] == protocol.upper()
    return {(r["from"], r["to"]): r["connected"] for r in doc["results"]}


def oracle(
    objs: list[dict[str, Any]], pods: list[str], *, port: int, protocol: str
) -> dict[tuple[str, str], bool]:
    """The spec's answer (policy.evaluate) for the same objects, independent of the lab."""
    from policy.evaluate import endpoint_for, evaluate
    from policy.model import Protocol
    from policy.parse import build_cluster

    state, errors = build_cluster(objs)
    assert not errors, errors
    return {
        (s, d): evaluate(
            state,
            endpoint_for(state, s),
            endpoint_for(state, d),
            port=port,
            protocol=Protocol(protocol.upper()),
        ).allowed
        for s in pods
        for d in pods
    }


def model_with_ips(lab: LabHandle) -> list[dict[str, Any]]:
    """The model's Namespace/Pod objects with the lab's real IPs and nodes."""
    from felix_lite.netlab.e2e import model_docs, upstream_model

    pods = {f"{p['namespace']}/{p['name']}": p for p in lab.json("pods")}
    docs = model_docs(upstream_model())
    for d in docs:
        if d["kind"] == "Pod":
            p = pods[f"{d['metadata']['namespace']}/{d['metadata']['name']}"]
            d["spec"]["nodeName"] = p["node"]
            d["status"] = {"phase": "Running", "podIP": p["ip"], "podIPs": [{"ip": p["ip"]}]}
    return docs


def differing(want: dict[tuple[str, str], bool], got: dict[tuple[str, str], bool]) -> list[str]:
    return [
        f"{s}->{d} want {want[(s, d)]} got {got.get((s, d))}"
        for (s, d) in want
        if s != d and got.get((s, d)) is not want[(s, d)]
    ]


@pytest.fixture(scope="module")
def lab2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHandle]:
    why = _unavailable()
    if why:
        pytest.skip(why)
    lab = LabHandle(tmp_path_factory.mktemp("lab"), nodes=2)
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


# ---------------------------------------------------------------------------- 2 nodes, BIRD


def test_up_prints_progress_and_kubeconfig(lab2: LabHandle) -> None:
    out = lab2.up_output
    assert "BGP: 2 sessions established" in out
    assert f"kubeconfig: {lab2.dir}/kubeconfig" in out
    kc = yaml.safe_load((lab2.dir / "kubeconfig").read_text())
    assert kc["clusters"][0]["cluster"]["server"] == "http://10.10.254.2:6443"


def test_pods_json_spread_over_nodes_with_ips_of_their_node(lab2: LabHandle) -> None:
    pods = lab2.json("pods")
    assert sorted(f"{p['namespace']}/{p['name']}" for p in pods) == [
        f"{ns}/{n}" for ns in "xyz" for n in "abc"
    ]
    for p in pods:
        assert set(p) == {"namespace", "name", "node", "ip"}
        k = int(p["node"].split("-")[1])
        assert p["ip"].startswith(f"10.244.{k}."), p
    by_node = {p["node"] for p in pods}
    assert by_node == {"node-1", "node-2"}
    # each pod's address is in the kernel of its node only as a local route
    st = lab2.state()
    for p in pods:
        rec = st["pods"][f"{p['namespace']}/{p['name']}"]
        node_ns = next(n["netns"] for n in st["nodes"] if n["name"] == p["node"])
        routes = subprocess.run(
            ["ip", "-n", node_ns, "route", "show", f"{p['ip']}/32"], capture_output=True, text=True
        ).stdout
        assert rec["host_ifname"] in routes


@pytest.mark.parametrize(("port", "protocol"), [(80, "tcp"), (81, "udp")])
def test_probe_all_connected_without_policy(lab2: LabHandle, port: int, protocol: str) -> None:
    got = probe(lab2, port=port, protocol=protocol)
    assert len(got) == 81
    assert all(got.values()), [k for k, v in got.items() if not v]


def test_probe_human_grid(lab2: LabHandle) -> None:
    out = lab2("probe")
    assert "81 connected" in out
    assert out.splitlines()[1].split("\t")[1:] == [f"{ns}/{n}" for ns in "xyz" for n in "abc"]


def test_apply_policy_changes_matrix_as_the_spec_says(lab2: LabHandle, tmp_path: Path) -> None:
    from controller.manifests import load_objects

    model = model_with_ips(lab2)
    pods = [f"{ns}/{n}" for ns in "xyz" for n in "abc"]
    out = lab2("apply", "-f", str(EXAMPLES))
    assert "programmed on every node" in out
    try:
        policies = load_objects([EXAMPLES])
        for port in (80, 81):
            want = oracle(model + policies, pods, port=port, protocol="tcp")
            got = probe(lab2, port=port)
            assert not differing(want, got), differing(want, got)
            assert not all(got.values())  # the policies deny something
    finally:
        lab2("delete", "-f", str(EXAMPLES))
    got = probe(lab2)
    assert all(got.values())


def test_pod_created_by_apply_is_routed_and_deleted_pod_withdrawn(
    lab2: LabHandle, tmp_path: Path
) -> None:
    from felix_lite.lab.state import ProcRecord

    f = write_yaml(
        tmp_path / "pod.yaml",
        [
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"namespace": "y", "name": "new", "labels": {"pod": "new"}},
                "spec": {
                    "containers": [
                        {
                            "name": "c",
                            "image": "i",
                            "ports": [{"containerPort": 80, "protocol": "TCP"}],
                        }
                    ]
                },
            }
        ],
    )
    lab2("apply", "-f", str(f))
    pods = {f"{p['namespace']}/{p['name']}": p for p in lab2.json("pods")}
    new = pods["y/new"]
    # least loaded: 9 model pods round-robin leave node-2 with one fewer
    assert new["node"] == "node-2"
    st = lab2.state()
    rec = st["pods"]["y/new"]
    other = next(n for n in st["nodes"] if n["name"] != new["node"])
    learned = subprocess.run(
        ["ip", "-n", other["netns"], "route", "show", "proto", "202"],
        capture_output=True,
        text=True,
    ).stdout
    assert f"{new['ip']} via" in learned
    got = probe(lab2)
    assert got[("x/a", "y/new")] and got[("y/new", "x/a")]  # x/a is on node-1
    lab2("delete", "-f", str(f))
    assert "y/new" not in {f"{p['namespace']}/{p['name']}" for p in lab2.json("pods")}
    for n in st["nodes"]:
        routes = subprocess.run(
            ["ip", "-n", n["netns"], "route", "show", f"{new['ip']}/32"],
            capture_output=True,
            text=True,
        ).stdout
        assert routes.strip() == "", (n["name"], routes)
    assert rec["netns"] not in _netns_with(lab2.prefix)
    assert not ProcRecord(**rec["server"]).alive()


def test_label_changes_on_pod_and_namespace_change_enforcement(
    lab2: LabHandle, tmp_path: Path
) -> None:
    model = model_with_ips(lab2)
    pods = [f"{ns}/{n}" for ns in "xyz" for n in "abc"]
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"namespace": "x", "name": "a-from-blue-clients"},
        "spec": {
            "podSelector": {"matchLabels": {"pod": "a"}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [
                        {
                            "namespaceSelector": {"matchLabels": {"team": "blue"}},
                            "podSelector": {"matchLabels": {"role": "client"}},
                        }
                    ]
                }
            ],
        },
    }
    pf = write_yaml(tmp_path / "policy.yaml", [policy])
    y_b = next(
        d
        for d in model
        if d["kind"] == "Pod" and d["metadata"]["namespace"] == "y" and d["metadata"]["name"] == "b"
    )
    ns_z = next(d for d in model if d["kind"] == "Namespace" and d["metadata"]["name"] == "z")
    z_c = next(
        d
        for d in model
        if d["kind"] == "Pod" and d["metadata"]["namespace"] == "z" and d["metadata"]["name"] == "c"
    )
    lab2("apply", "-f", str(pf))
    try:
        got = probe(lab2)
        assert not differing(oracle([*model, policy], pods, port=80, protocol="tcp"), got)
        assert not got[("y/b", "x/a")] and not got[("z/c", "x/a")]

        # z gets team=blue and z/c role=client: only z/c may reach x/a
        ns_z["metadata"]["labels"] = {**ns_z["metadata"]["labels"], "team": "blue"}
        z_c["metadata"]["labels"] = {"pod": "c", "role": "client"}
        lab2("apply", "-f", str(write_yaml(tmp_path / "labels1.yaml", [ns_z, z_c])))
        got = probe(lab2)
        assert not differing(oracle([*model, policy], pods, port=80, protocol="tcp"), got)
        assert got[("z/c", "x/a")] and not got[("z/b", "x/a")] and not got[("y/b", "x/a")]

        # y/b role=client is not enough (y is not blue); then z loses team=blue
        y_b["metadata"]["labels"] = {"pod": "b", "role": "client"}
        ns_z["metadata"]["labels"] = {"ns": "z", "kubernetes.io/metadata.name": "z"}
        lab2("apply", "-f", str(write_yaml(tmp_path / "labels2.yaml", [y_b, ns_z])))
        got = probe(lab2)
        assert not differing(oracle([*model, policy], pods, port=80, protocol="tcp"), got)
        assert not got[("z/c", "x/a")] and not got[("y/b", "x/a")]
        # a label change never recreates a pod: same IPs
        assert {p["ip"] for p in lab2.json("pods")} == {
            d["status"]["podIP"] for d in model if d["kind"] == "Pod"
        }
    finally:
        lab2("delete", "-f", str(pf))
        y_b["metadata"]["labels"] = {"pod": "b"}
        z_c["metadata"]["labels"] = {"pod": "c"}
        lab2("apply", "-f", str(write_yaml(tmp_path / "restore.yaml", [y_b, z_c, ns_z])))


def test_status_json_shape(lab2: LabHandle) -> None:
    st = lab2.json("status")
    assert [n["name"] for n in st["nodes"]] == ["node-1", "node-2"]
    for n in st["nodes"]:
        assert {
            "name",
            "ready",
            "generation",
            "programmed_resource_versions",
            "bgp",
            "routes",
        } <= set(n)
        assert n["ready"] is True
        assert isinstance(n["generation"], int) and n["generation"] > 0
        assert int(n["programmed_resource_versions"]["networkpolicy"]) > 0
        peers = n["bgp"]["peers"]
        assert len(peers) == 1
        k = int(n["name"].split("-")[1])
        assert peers[0]["address"] == f"10.10.{k}.1" and peers[0]["asn"] == 65000
        assert peers[0]["state"] in ("up", "established", "Established")
        assert "since" in peers[0]
        # the other node's pods: 4 or 5 of the model's 9
        assert n["routes"]["installed"] in (4, 5)
        assert n["routes"]["learned"] == n["routes"]["installed"]
    assert "PEER ADDRESS" in lab2("status")


def test_second_up_is_a_clear_error(lab2: LabHandle) -> None:
    out = run_lab(lab2.dir, "up", "--prefix", lab2.prefix + "x", check=False)
    assert "already running" in out and "lab down" in out
    assert lab2.state()["phase"] == "up"


def test_apply_rejects_unknown_kind_naming_it(lab2: LabHandle, tmp_path: Path) -> None:
    f = write_yaml(
        tmp_path / "svc.yaml",
        [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s", "namespace": "x"}}],
    )
    out = run_lab(lab2.dir, "apply", "-f", str(f), check=False)
    assert "Service x/s" in out and "kind" in out


# ---------------------------------------------------------------------------- other shapes


def _up_probe_down(tmp_path: Path, *, nodes: int, tor: str) -> None:
    why = _unavailable(tor)
    if why:
        pytest.skip(why)
    lab = LabHandle(tmp_path, nodes=nodes, tor=tor)
    try:
        lab.up()
        pods = lab.json("pods")
        assert {p["node"] for p in pods} == {f"node-{k}" for k in range(1, nodes + 1)}
        got = probe(lab)
        assert len(got) == 81 and all(got.values()), [k for k, v in got.items() if not v]
        pids = [p["pid"] for p in lab.state()["processes"]]
        starts = {p["pid"]: p["start"] for p in lab.state()["processes"]}
        assert lab.state()["netns"]
    finally:
        out = run_lab(lab.dir, "down", check=False)
        left_ns = _netns_with(lab.prefix)
        lab.down()
    assert "lab down: stopped" in out
    assert left_ns == []
    from felix_lite.lab.state import proc_start_time

    alive = [pid for pid in pids if proc_start_time(pid) == starts[pid]]
    assert alive == []
    assert not (lab.dir / "lab.json").exists()


def test_three_nodes_up_probe_down_leaves_nothing(tmp_path: Path) -> None:
    _up_probe_down(tmp_path, nodes=3, tor="bird")


def test_frr_tor(tmp_path: Path) -> None:
    _up_probe_down(tmp_path, nodes=2, tor="frr")


def test_gobgp_tor(tmp_path: Path) -> None:
    _up_probe_down(tmp_path, nodes=2, tor="gobgp")


def test_failed_up_cleans_up_everything_it_made(tmp_path: Path) -> None:
    """A namespace in the way of the 5th pod makes `up` fail after the API, the ToR,
    the agents and four pods exist: all of that goes, the foreign namespace stays."""
    why = _unavailable()
    if why:
        pytest.skip(why)
    lab = LabHandle(tmp_path, nodes=2)
    blocker = f"{lab.prefix}p5"
    subprocess.run(["ip", "netns", "add", blocker], check=True)
    try:
        out = run_lab(lab.dir, "up", "--prefix", lab.prefix, check=False)
        assert f"netns {blocker}: already exists" in out
        assert "logs:" in out
        assert _netns_with(lab.prefix) == [blocker]
        state = (
            json.loads((lab.dir / "lab.json").read_text())
            if (lab.dir / "lab.json").exists()
            else {"processes": []}
        )
        from felix_lite.lab.state import ProcRecord

        assert not [p for p in state["processes"] if ProcRecord(**p).alive()]
    finally:
        subprocess.run(["ip", "netns", "delete", blocker], check=False)
        lab.down()


def test_a_second_lab_in_the_same_state_dir_starts_from_an_empty_cluster(
    tmp_path: Path,
) -> None:
    """`down` keeps logs and the API state for post-mortem; the next `up` in the same
    directory (the default one, for `lab demo` run twice) must not load that state."""
    why = _unavailable()
    if why:
        pytest.skip(why)
    lab = LabHandle(tmp_path, nodes=2)
    try:
        lab.up()
        run_lab(lab.dir, "apply", "-f", str(EXAMPLES))
        lab.down()
        lab.up()
        pods = lab.json("pods")
        assert len(pods) == 9
        assert all(r["connected"] for r in lab.json("probe")["results"])  # no old policies
    finally:
        lab.down()


def test_bgp_peer_change_reloads_exabgp_and_traffic_keeps_flowing(tmp_path: Path) -> None:
    """A BGPPeer edit through the API: the agent re-renders exabgp.conf, the sidecar
    reloads ExaBGP (SIGUSR1, not a restart), the session is up again with the new
    hold time, and pods on the two nodes still reach each other."""
    why = _unavailable()
    if why:
        pytest.skip(why)
    lab = LabHandle(tmp_path, nodes=2)
    try:
        lab.up()
        conf = lab.dir / "node-1" / "exabgp" / "exabgp.conf"
        assert "hold-time 30;" in conf.read_text()
        sidecar = next(p for p in lab.state()["processes"] if p["role"] == "sidecar node-1")
        peer = {
            "apiVersion": "felixlite.io/v1alpha1",
            "kind": "BGPPeer",
            "metadata": {"name": "tor-node-1"},
            "spec": {
                "peerIP": "10.10.1.1",
                "asNumber": 65000,
                "node": "node-1",
                "holdTime": 45,
                "gracefulRestartSeconds": 120,
            },
        }
        run_lab(lab.dir, "apply", "-f", str(write_yaml(tmp_path / "peer.yaml", [peer])))
        from tests.functional.test_agent import wait_for

        wait_for(lambda: "hold-time 45;" in conf.read_text(), 30, "exabgp.conf re-rendered")
        log = lab.dir / "logs" / "node-1-exabgp.log"
        wait_for(lambda: "fabric.sidecar.reload" in log.read_text(), 30, "sidecar reload")

        def up() -> bool:
            node = lab.json("status")["nodes"][0]
            return all(p["state"] in ("up", "established") for p in node["bgp"]["peers"])

        wait_for(up, 60, "session up after the reload")
        alive = [p for p in lab.state()["processes"] if p["role"] == "sidecar node-1"]
        assert alive and alive[0]["pid"] == sidecar["pid"]  # reloaded, not restarted
        assert all(r["connected"] for r in lab.json("probe")["results"])
    finally:
        lab.down()
