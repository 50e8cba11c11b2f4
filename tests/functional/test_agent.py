"""`felix-lite agent` as a process, against the API emulator, in its own netns.

Each test makes one `fla…` network namespace (loopback only, no link to the
root namespace) and runs inside it: the emulator (`python -m
felix_lite.apiserver`), the agent (`felix-lite agent --no-routing`, or with
routing in the last test) and this test's API/HTTP clients (their sockets are
made on threads that entered the namespace: `call_in_netns`). Kernel state is
read with `ip netns exec NS iptables-nft-save` / `ipset save`. Waits poll a
condition with a generous deadline and fail on timeout; only the SIGTERM test
bounds a duration, promptness being its subject.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from controller.kube import api_client
from felix_lite.netlab.nsutil import call_in_netns, delete_netns
from felix_lite.procs import stop_procs
from felix_lite.waiting import wait_until
from policy.compiler import pod_chain, policy_chain
from policy.model import PolicyType, pod_key, policy_key

pytestmark = pytest.mark.kernel

NODE = "node-1"
HEALTH_PORT = 19099
METRICS_PORT = 19091
API_PORT = 18080
_seq = itertools.count(1)


def wait_for(pred: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    return wait_until(pred, timeout, what or repr(pred))


def _rv(obj: Any) -> int:
    return int(obj.metadata.resource_version)


class AgentLab:
    """One netns with the emulator and (re)startable agents; `close()` removes all."""

    def __init__(self, tmp: Path) -> None:
        self.ns = f"fla{os.getpid() % 100:02d}{next(_seq)}"
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.agent: subprocess.Popen[bytes] | None = None
        self.agent_log = tmp / "agent.log"
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        subprocess.run(["ip", "-n", self.ns, "link", "set", "lo", "up"], check=True)
        self.kubeconfig = tmp / "kubeconfig"
        self.config = tmp / "agent.yaml"
        self._api: client.ApiClient | None = None

    # ---- processes

    def start_api(self) -> None:
        proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.ns,
                sys.executable,
                "-m",
                "felix_lite.apiserver",
                "--port",
                str(API_PORT),
                "--state",
                str(self.tmp / "api-state.json"),
                "--kubeconfig",
                str(self.kubeconfig),
                "--bookmark-interval",
                "1",
                "--log-level",
                "warning",
            ],
            stdout=subprocess.PIPE,
            stderr=open(self.tmp / "api.log", "wb"),  # noqa: SIM115
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "the API emulator did not start"
        line = json.loads(proc.stdout.readline())
        assert line["kubeconfig"] == str(self.kubeconfig)
        self._api = api_client(self.kubeconfig)

    def write_config(self, **extra: Any) -> None:
        cfg = {
            "nodeName": NODE,
            "iptablesBackend": "nft",
            "healthPort": HEALTH_PORT,
            "metricsPort": METRICS_PORT,
            "resyncSeconds": 30,
            "stateDir": str(self.tmp / "run"),
            **extra,
        }
        self.config.write_text(yaml.safe_dump(cfg))

    def start_agent(self, *extra: str, routing: bool = False) -> subprocess.Popen[bytes]:
        if not self.config.exists():
            self.write_config()
        argv = [
            "ip",
            "netns",
            "exec",
            self.ns,
            "felix-lite",
            "agent",
            "--config",
            str(self.config),
            "--kubeconfig",
            str(self.kubeconfig),
            "--secret-namespace",
            "kube-system",
            *extra,
        ]
        if not routing:
            argv.append("--no-routing")
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(self.agent_log, "ab"))  # noqa: SIM115
        self.procs.append(proc)
        self.agent = proc
        return proc

    def kill_agent(self, sig: int = signal.SIGKILL) -> int:
        assert self.agent is not None
        self.agent.send_signal(sig)
        rc = self.agent.wait(timeout=30)
        self.agent = None
        return rc

    def close(self) -> None:
        stop_procs(self.procs)
        if self._api is not None:
            self._api.close()
        delete_netns([self.ns])

    # ---- clients inside the netns

    def k8s(self, fn: Callable[[client.ApiClient], Any]) -> Any:
        api = self._api
        assert api is not None
        return call_in_netns(self.ns, lambda: fn(api))

    def http(self, path: str, port: int = HEALTH_PORT) -> tuple[int, str]:
        def get() -> tuple[int, str]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()
            except OSError:
                return 0, ""

        return call_in_netns(self.ns, get)

    def status(self) -> dict[str, Any] | None:
        code, body = self.http("/status")
        return json.loads(body) if code == 200 else None

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            if self.agent is not None and self.agent.poll() is not None:
                raise AssertionError(f"agent exited rc={self.agent.returncode}:\n{self.log()}")
            st = self.status()
            return st if st and st["ready"] else None

        return wait_for(ready, timeout, "agent ready")  # type: ignore[no-any-return]

    def wait_programmed(self, kind: str, rv: int, timeout: float = 30.0) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            st = self.status()
            got = st and st["programmed_resource_versions"].get(kind)
            return st if got and int(got) >= rv else None

        return wait_for(done, timeout, f"{kind} programmed RV >= {rv}")  # type: ignore[no-any-return]

    def log(self) -> str:
        return self.agent_log.read_text() if self.agent_log.exists() else ""

    # ---- kernel (read only, inside the netns)

    def iptables(self) -> str:
        return subprocess.run(
            ["ip", "netns", "exec", self.ns, "iptables-nft-save", "-t", "filter"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    def ipsets(self) -> dict[str, set[str]]:
        out = subprocess.run(
            ["ip", "netns", "exec", self.ns, "ipset", "save"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        sets: dict[str, set[str]] = {}
        for line in out.splitlines():
            parts = line.split()
            if parts[:1] == ["create"]:
                sets[parts[1]] = set()
            elif parts[:1] == ["add"]:
                sets[parts[1]].add(parts[2])
        return sets

    def chains(self) -> set[str]:
        return {ln[1:].split()[0] for ln in self.iptables().splitlines() if ln.startswith(":FL-")}

    # ---- objects

    def namespace(self, name: str, labels: dict[str, str] | None = None) -> int:
        body = {"metadata": {"name": name, "labels": labels or {}}}
        return _rv(self.k8s(lambda a: client.CoreV1Api(a).create_namespace(body)))

    def pod(
        self, ns: str, name: str, *, ip: str, node: str = NODE, labels: dict[str, str] | None = None
    ) -> int:
        body = {
            "metadata": {"name": name, "namespace": ns, "labels": labels or {"pod": name}},
            "spec": {
                "nodeName": node,
                "containers": [
                    {"name": "c", "image": "x", "ports": [{"name": "http", "containerPort": 80}]}
                ],
            },
        }

        def make(a: client.ApiClient) -> Any:
            core = client.CoreV1Api(a)
            core.create_namespaced_pod(ns, body)
            return core.patch_namespaced_pod_status(
                name, ns, {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}
            )

        return _rv(self.k8s(make))

    def label_pod(self, ns: str, name: str, labels: dict[str, str]) -> int:
        return _rv(
            self.k8s(
                lambda a: client.CoreV1Api(a).patch_namespaced_pod(
                    name, ns, {"metadata": {"labels": labels}}
                )
            )
        )

    def policy(self, ns: str, name: str, spec: dict[str, Any], *, replace: bool = False) -> int:
        body = {"metadata": {"name": name, "namespace": ns}, "spec": spec}

        def write(a: client.ApiClient) -> Any:
            net = client.NetworkingV1Api(a)
            if replace:
                cur = net.read_namespaced_network_policy(name, ns)
                body["metadata"]["resourceVersion"] = cur.metadata.resource_version
                return net.replace_namespaced_network_policy(name, ns, body)
            return net.create_namespaced_network_policy(ns, body)

        return _rv(self.k8s(write))

    def events(self, ns: str) -> list[Any]:
        return list(self.k8s(lambda a: client.CoreV1Api(a).list_namespaced_event(ns)).items)


def allow_from(pod: str, to: str) -> dict[str, Any]:
    return {
        "podSelector": {"matchLabels": {"pod": to}},
        "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": pod}}}]}],
    }


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[AgentLab]:
    lab = AgentLab(tmp_path)
    try:
        lab.start_api()
        yield lab
    finally:
        lab.close()


def _populate(lab: AgentLab) -> dict[str, int]:
    rvs = {"ns": lab.namespace("x", {"ns": "x"})}
    lab.pod("x", "a", ip="10.244.1.2")
    lab.pod("x", "b", ip="10.244.1.3")
    rvs["pod"] = lab.pod("x", "c", ip="10.244.2.2", node="node-2")  # not local
    rvs["np"] = lab.policy("x", "allow-b", allow_from("b", "a"))
    return rvs


def test_agent_programs_policy_and_publishes_programmed_rvs(lab: AgentLab) -> None:
    rvs = _populate(lab)
    lab.start_agent()
    st = lab.wait_ready()
    assert st["node"] == NODE and st["generation"] >= 1 and st["local_pods"] == 2
    # The first full list included every write so far.
    assert int(st["programmed_resource_versions"]["networkpolicy"]) >= rvs["np"]
    assert int(st["programmed_resource_versions"]["pod"]) >= rvs["pod"]

    chains = lab.chains()
    for pod in ("a", "b"):
        for d in (PolicyType.INGRESS, PolicyType.EGRESS):
            assert pod_chain(d, pod_key("x", pod)) in chains
    assert pod_chain(PolicyType.INGRESS, pod_key("x", "c")) not in chains  # node-2's pod
    pi = policy_chain(PolicyType.INGRESS, policy_key("x", "allow-b"))
    assert pi in chains
    sets = lab.ipsets()
    peer_sets = [n for n, m in sets.items() if n.startswith("fl-sp-")]
    assert [sets[n] for n in peer_sets] == [{"10.244.1.3"}]

    # A change through the API: programmed RV passes the write's RV only once in the kernel.
    gen = st["generation"]
    rv = lab.policy("x", "allow-b", allow_from("c", "a"), replace=True)
    st = lab.wait_programmed("networkpolicy", rv)
    assert st["generation"] > gen
    sets = lab.ipsets()
    assert [sets[n] for n in sets if n.startswith("fl-sp-")] == [{"10.244.2.2"}]

    # A new policy: its chain exists as soon as its RV is reported programmed.
    rv = lab.policy("x", "deny-all", {"podSelector": {}, "policyTypes": ["Egress"]})
    lab.wait_programmed("networkpolicy", rv)
    assert policy_chain(PolicyType.EGRESS, policy_key("x", "deny-all")) in lab.chains()

    code, text = lab.http("/metrics", METRICS_PORT)
    assert code == 200
    for metric in (
        "felix_lite_programming_latency_seconds_count",
        "felix_lite_iptables_rules",
        "felix_lite_ipsets",
        "felix_lite_watch_restarts_total",
        "felix_lite_apply_failures_total",
        "felix_lite_invalid_objects",
        'felix_lite_programmed_resource_version{kind="networkpolicy"}',
    ):
        assert metric in text, metric
    count = next(
        float(ln.split()[-1])
        for ln in text.splitlines()
        if ln.startswith("felix_lite_programming_latency_seconds_count")
    )
    assert count >= 2  # the two policy changes (the initial sync is not a "change")
    assert lab.http("/livez")[0] == 200 and lab.http("/readyz")[0] == 200

    out = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            lab.ns,
            "felix-lite",
            "status",
            "--json",
            "--url",
            f"http://127.0.0.1:{HEALTH_PORT}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["node"] == NODE and doc["ready"] is True
    assert int(doc["programmed_resource_versions"]["networkpolicy"]) >= rv
    human = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            lab.ns,
            "felix-lite",
            "status",
            "--url",
            f"http://127.0.0.1:{HEALTH_PORT}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert human.returncode == 0 and f"node {NODE}: ready" in human.stdout


def test_invalid_policy_edit_keeps_last_good_and_posts_event(lab: AgentLab) -> None:
    _populate(lab)
    lab.start_agent()
    lab.wait_ready()
    before = lab.iptables()
    pi = policy_chain(PolicyType.INGRESS, policy_key("x", "allow-b"))
    bad = allow_from("b", "a")
    bad["ingress"][0]["ports"] = [{"protocol": "TCP", "port": 90, "endPort": 80}]
    rv = lab.policy("x", "allow-b", bad, replace=True)
    st = lab.wait_programmed("networkpolicy", rv)
    assert [i["object"] for i in st["invalid_objects"]] == ["networkpolicy x/allow-b"]
    assert "endPort" in st["invalid_objects"][0]["error"]
    # The last good version is what the kernel still holds.
    assert [ln for ln in lab.iptables().splitlines() if ln.startswith(f"-A {pi}")] == [
        ln for ln in before.splitlines() if ln.startswith(f"-A {pi}")
    ]
    assert pi in lab.chains()
    events = wait_for(
        lambda: [e for e in lab.events("x") if e.reason == "InvalidNetworkPolicy"],
        what="InvalidNetworkPolicy event",
    )
    assert events[0].involved_object.name == "allow-b" and events[0].type == "Warning"
    code, text = lab.http("/metrics", METRICS_PORT)
    assert code == 200 and "felix_lite_invalid_objects 1.0" in text


def test_burst_of_label_changes_coalesces(lab: AgentLab) -> None:
    lab.namespace("x", {"ns": "x"})
    lab.pod("x", "a", ip="10.244.1.2")
    lab.pod("x", "b", ip="10.244.1.3", labels={"pod": "b", "round": "0"})
    lab.policy(
        "x",
        "by-round",
        {
            "podSelector": {"matchLabels": {"pod": "a"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"round": "even"}}}]}],
        },
    )
    lab.start_agent()
    before = lab.wait_ready()["applies"]

    def burst(a: client.ApiClient) -> int:
        core = client.CoreV1Api(a)
        rv = 0
        for i in range(1, 201):
            lab_labels = {"pod": "b", "round": "even" if i % 2 == 0 else "odd"}
            rv = _rv(core.patch_namespaced_pod("b", "x", {"metadata": {"labels": lab_labels}}))
        return rv

    last = lab.k8s(burst)  # 200 writes; the last one leaves round=even
    st = lab.wait_programmed("pod", last)
    applies = st["applies"] - before
    print(f"burst: 200 label writes -> {applies} applies")
    assert 1 <= applies <= 40, applies  # 200 changes, a handful of applies
    sets = lab.ipsets()
    assert [sets[n] for n in sets if n.startswith("fl-sp-")] == [{"10.244.1.3"}]


def test_restart_does_not_flush_and_converges(lab: AgentLab) -> None:
    _populate(lab)
    lab.start_agent()
    lab.wait_ready()
    chain_a = pod_chain(PolicyType.INGRESS, pod_key("x", "a"))
    programmed = lab.chains()
    lab.kill_agent(signal.SIGKILL)
    # While the agent is down the kernel keeps everything.
    assert lab.chains() == programmed
    rv = lab.policy("x", "allow-b", allow_from("c", "a"), replace=True)

    seen_missing: list[str] = []
    done = threading.Event()

    def watch() -> None:  # the pod's chain must exist throughout the restart
        while not done.is_set():
            if chain_a not in lab.chains():
                seen_missing.append(chain_a)
            time.sleep(0.02)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        lab.start_agent()
        lab.wait_ready()
        lab.wait_programmed("networkpolicy", rv)
    finally:
        done.set()
        t.join(5)
    assert seen_missing == []
    sets = lab.ipsets()
    assert [sets[n] for n in sets if n.startswith("fl-sp-")] == [{"10.244.2.2"}]
    assert lab.chains() == programmed  # same policies and pods: same chain set


def test_sigterm_exits_zero_promptly_and_leaves_kernel(lab: AgentLab) -> None:
    _populate(lab)
    proc = lab.start_agent()
    lab.wait_ready()
    programmed = lab.chains()
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=15)
    took = time.monotonic() - t0
    lab.agent = None
    assert rc == 0
    assert took < 5.0, took
    assert lab.chains() == programmed
    assert "agent.exit node=node-1 code=0" in lab.log()


def test_routing_half_renders_exabgp_config_and_installs_routes(lab: AgentLab) -> None:
    # The node: an InternalIP (router id) and a pod CIDR (blackhole); one ToR peer.
    # No ExaBGP runs here (the fabric's tests do that): the peer just shows as not up.
    def setup(a: client.ApiClient) -> None:
        core = client.CoreV1Api(a)
        core.create_node({"metadata": {"name": NODE}, "spec": {"podCIDR": "10.244.1.0/24"}})
        core.patch_node_status(
            NODE, {"status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.11"}]}}
        )
        client.CustomObjectsApi(a).create_cluster_custom_object(
            "felixlite.io",
            "v1alpha1",
            "bgppeers",
            {
                "apiVersion": "felixlite.io/v1alpha1",
                "kind": "BGPPeer",
                "metadata": {"name": "tor"},
                "spec": {"peerIP": "10.0.0.1", "asNumber": 65000},
            },
        )

    lab.k8s(setup)
    _populate(lab)
    iface = "fl" + __import__("hashlib").sha1(b"x.a").hexdigest()[:11]
    subprocess.run(
        ["ip", "-n", lab.ns, "link", "add", iface, "type", "veth", "peer", "name", "flapeer0"],
        check=True,
    )
    subprocess.run(["ip", "-n", lab.ns, "link", "set", iface, "up"], check=True)
    conf_dir = lab.tmp / "exabgp"
    lab.write_config(bgp={"socket": str(lab.tmp / "bgp.sock"), "exabgpConfigDir": str(conf_dir)})
    lab.start_agent(routing=True)
    st = lab.wait_ready()
    conf = (conf_dir / "exabgp.conf").read_text()
    assert "neighbor 10.0.0.1 {" in conf and "peer-as 65000;" in conf
    assert "router-id 10.0.0.11;" in conf
    assert (conf_dir / "exabgp.env").is_file()
    assert [p["address"] for p in st["bgp"]["peers"]] == ["10.0.0.1"]
    assert st["bgp"]["peers"][0]["state"] != "up"

    def routes() -> str:
        return subprocess.run(
            ["ip", "-n", lab.ns, "route", "show", "table", "main"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    out = wait_for(lambda: (r := routes()) and "10.244.1.2" in r and r, what="pod route")
    assert "blackhole 10.244.1.0/24" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("10.244.1.2 "))
    assert f"dev {iface}" in line
    # x/b has no interface here: its route cannot be installed, nothing else is affected.
    assert "10.244.2.2" not in out  # node-2's pod is not routed by this node
    assert (lab.tmp / "bgp.sock").exists()
