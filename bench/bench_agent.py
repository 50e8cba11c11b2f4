"""The agent at cluster scale: time from start to ready, and steady-state memory.

`python -m bench.bench_agent [--pods 10000] [--policies 1000] [--nodes 20] [--json]`

Builds the cluster in an in-process emulator `Store` (10,000 pods in 100
namespaces over 20 nodes, so 500 are local to `node-0`; 1,000 policies of ten
shapes: default deny, same-namespace, cross-namespace by team, tiers with
numeric/named ports and ranges, ipBlock with except, DNS egress), saves it to
a state file, starts the emulator from it inside a fresh `flab…` network
namespace (loopback only) and then the real `felix-lite agent --no-routing`
in the same namespace. Measures: start -> /readyz ready, then a few policy
and pod-label updates (write -> programmed RV >= the write's RV), then the
agent's VmRSS/VmHWM from /proc. Targets: ready < 30 s, RSS < 300 MB.
Everything it starts is stopped by PID and the namespace deleted on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from felix_lite.apiserver import Store, resource
from felix_lite.netlab.nsutil import call_in_netns, delete_netns
from felix_lite.procs import stop_procs

LOCAL_NODE = "node-0"
TIERS = ("web", "api", "db")
API_PORT = 18081
HEALTH_PORT = 19199
METRICS_PORT = 19191


def pod_ip(i: int) -> str:
    return f"10.{64 + i // 65025}.{(i // 255) % 255}.{i % 255 + 1}"


def build_store(*, pods: int, policies: int, nodes: int, namespaces: int = 100) -> Store:
    store = Store(strict_status=False, max_events=1000)
    rt = {
        k: resource(k) for k in ("namespaces", "pods", "nodes", "networkpolicies.networking.k8s.io")
    }
    for n in range(nodes):
        store.create(
            rt["nodes"],
            None,
            {
                "metadata": {"name": f"node-{n}", "labels": {"rack": f"r{n % 4}"}},
                "spec": {"podCIDR": f"10.244.{n}.0/24"},
                "status": {"addresses": [{"type": "InternalIP", "address": f"10.0.0.{n + 10}"}]},
            },
        )
    for s in range(namespaces):
        store.create(
            rt["namespaces"],
            None,
            {
                "metadata": {
                    "name": f"ns{s}",
                    "labels": {"team": f"t{s % 10}", "env": "prod" if s % 2 else "dev"},
                }
            },
        )
    for i in range(pods):
        ns = f"ns{i % namespaces}"
        store.create(
            rt["pods"],
            ns,
            {
                "metadata": {
                    "name": f"p{i}",
                    "labels": {"app": f"a{i % 50}", "tier": TIERS[i % 3]},
                },
                "spec": {
                    "nodeName": f"node-{i % nodes}",
                    "containers": [
                        {
                            "name": "c",
                            "image": "x",
                            "ports": [
                                {"name": "http", "containerPort": 8080, "protocol": "TCP"},
                                {"name": "metrics", "containerPort": 9090, "protocol": "TCP"},
                            ],
                        }
                    ],
                },
                "status": {"phase": "Running", "podIP": pod_ip(i), "podIPs": [{"ip": pod_ip(i)}]},
            },
        )
    for j in range(policies):
        s = j % namespaces
        store.create(
            rt["networkpolicies.networking.k8s.io"],
            f"ns{s}",
            {"metadata": {"name": f"pol{j}"}, "spec": policy_spec(j, s)},
        )
    return store


def policy_spec(j: int, s: int) -> dict[str, Any]:
    shape = (j // 100) % 10
    tier = TIERS[j % 3]
    sel = {"matchLabels": {"tier": tier}}
    if shape == 0:
        return {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    if shape == 1:
        return {"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}
    if shape == 2:
        return {
            "podSelector": sel,
            "ingress": [
                {"from": [{"namespaceSelector": {"matchLabels": {"team": f"t{(s + 1) % 10}"}}}]}
            ],
        }
    if shape == 3:
        return {
            "podSelector": sel,
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": {"tier": TIERS[(j + 2) % 3]}}}],
                    "ports": [{"protocol": "TCP", "port": 8080}],
                }
            ],
        }
    if shape == 4:
        return {"podSelector": sel, "ingress": [{"ports": [{"protocol": "TCP", "port": "http"}]}]}
    if shape == 5:
        return {
            "podSelector": {"matchLabels": {"app": f"a{j % 50}"}},
            "ingress": [
                {"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": [f"10.{j % 200}.0.0/16"]}}]}
            ],
        }
    if shape == 6:
        return {
            "podSelector": {},
            "policyTypes": ["Egress"],
            "egress": [
                {
                    "to": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {"kubernetes.io/metadata.name": "kube-system"}
                            }
                        }
                    ],
                    "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
                }
            ],
        }
    if shape == 7:
        return {
            "podSelector": sel,
            "ingress": [{"ports": [{"protocol": "TCP", "port": 30000, "endPort": 30100}]}],
        }
    if shape == 8:
        return {
            "podSelector": sel,
            "ingress": [
                {
                    "from": [
                        {
                            "namespaceSelector": {
                                "matchExpressions": [
                                    {"key": "env", "operator": "In", "values": ["prod"]}
                                ]
                            },
                            "podSelector": {"matchLabels": {"app": f"a{(j + 7) % 50}"}},
                        }
                    ]
                }
            ],
        }
    return {
        "podSelector": sel,
        "policyTypes": ["Egress"],
        "egress": [
            {
                "to": [{"podSelector": {"matchLabels": {"tier": "db"}}}],
                "ports": [{"protocol": "TCP", "port": "metrics"}],
            }
        ],
    }


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status: no {field}")


class Bench:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ns = f"flab{os.getpid() % 10000}"
        self.procs: list[subprocess.Popen[bytes]] = []

    def close(self) -> None:
        stop_procs(self.procs, timeout=15)
        delete_netns([self.ns])

    def status(self) -> dict[str, Any] | None:
        def get() -> dict[str, Any] | None:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{HEALTH_PORT}/status", timeout=10
                ) as r:
                    doc: dict[str, Any] = json.loads(r.read())
                    return doc
            except OSError:
                return None

        return call_in_netns(self.ns, get)

    def wait(self, pred: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[-1].poll() is not None:
                raise RuntimeError(f"agent exited rc={self.procs[-1].returncode}")
            st = self.status()
            if st is not None and pred(st):
                return st
            time.sleep(0.05)
        raise TimeoutError(f"no agent state matching within {timeout}s")

    def run(self, *, pods: int, policies: int, nodes: int, updates: int) -> dict[str, Any]:
        t = time.perf_counter()
        store = build_store(pods=pods, policies=policies, nodes=nodes)
        built = time.perf_counter() - t
        state = self.tmp / "state.json"
        store.save(state)
        del store
        kc = self.tmp / "kubeconfig"
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        subprocess.run(["ip", "-n", self.ns, "link", "set", "lo", "up"], check=True)
        api = subprocess.Popen(
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
                str(state),
                "--kubeconfig",
                str(kc),
                "--log-level",
                "warning",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.procs.append(api)
        assert api.stdout is not None
        if not select.select([api.stdout], [], [], 60)[0]:
            raise RuntimeError("API emulator did not start")
        json.loads(api.stdout.readline())
        cfg = self.tmp / "agent.yaml"
        cfg.write_text(
            json.dumps(
                {
                    "nodeName": LOCAL_NODE,
                    "iptablesBackend": "nft",
                    "healthPort": HEALTH_PORT,
                    "metricsPort": METRICS_PORT,
                    "resyncSeconds": 60,
                    "logLevel": "warning",
                }
            )
        )
        t0 = time.perf_counter()
        agent = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.ns,
                "felix-lite",
                "--log-level",
                "WARNING",
                "agent",
                "--config",
                str(cfg),
                "--kubeconfig",
                str(kc),
                "--no-routing",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.tmp / "agent.log", "wb"),  # noqa: SIM115
        )
        self.procs.append(agent)
        st = self.wait(lambda s: bool(s["ready"]), 120)
        ready_s = time.perf_counter() - t0
        rss_ready = _kib(agent.pid, "VmRSS")
        first_apply = st["last_apply"]["seconds"]

        from kubernetes import client

        from controller.kube import api_client

        kapi = api_client(kc)
        net = client.NetworkingV1Api(kapi)
        core = client.CoreV1Api(kapi)
        lat: list[float] = []
        obj: Any
        for u in range(updates):
            t1 = time.perf_counter()
            if u % 2 == 0:
                body = {
                    "metadata": {"name": f"bench-{u}"},
                    "spec": {
                        "podSelector": {"matchLabels": {"tier": "web"}},
                        "ingress": [{"ports": [{"protocol": "TCP", "port": 7000 + u}]}],
                    },
                }
                obj = call_in_netns(
                    self.ns, lambda b=body: net.create_namespaced_network_policy("ns0", b)
                )
                kind = "networkpolicy"
            else:
                name = f"p{u * 20}"  # i % 20 == 0: on node-0
                patch = {"metadata": {"labels": {"tier": TIERS[u % 3], "bench": str(u)}}}
                obj = call_in_netns(
                    self.ns,
                    lambda n=name, p=patch: core.patch_namespaced_pod(
                        n, f"ns{int(n[1:]) % 100}", p
                    ),
                )
                kind = "pod"
            rv = int(obj.metadata.resource_version)
            self.wait(
                lambda s, k=kind, r=rv: int(s["programmed_resource_versions"].get(k, 0)) >= r, 60
            )
            lat.append(time.perf_counter() - t1)
        time.sleep(1.0)
        st = self.status() or st
        kapi.close()
        return {
            "pods": pods,
            "policies": policies,
            "nodes": nodes,
            "local_pods": st["local_pods"],
            "build_state_s": round(built, 2),
            "ready_s": round(ready_s, 2),
            "first_apply_s": round(first_apply, 3),
            "chains": st["ruleset"]["chains"],
            "rules": st["ruleset"]["rules"],
            "ipsets": st["ruleset"]["sets"],
            "ipset_members": st["ruleset"]["members"],
            "update_p50_s": round(statistics.median(lat), 3) if lat else None,
            "update_max_s": round(max(lat), 3) if lat else None,
            "updates": len(lat),
            "rss_ready_mb": round(rss_ready / 1024, 1),
            "rss_steady_mb": round(_kib(agent.pid, "VmRSS") / 1024, 1),
            "rss_peak_mb": round(_kib(agent.pid, "VmHWM") / 1024, 1),
            "targets": {"ready_s": 30, "rss_mb": 300},
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_agent", description=__doc__)
    p.add_argument("--pods", type=int, default=10_000)
    p.add_argument("--policies", type=int, default=1_000)
    p.add_argument("--nodes", type=int, default=20)
    p.add_argument("--updates", type=int, default=6)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_agent: needs root (network namespaces)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as d:
        bench = Bench(Path(d))
        try:
            res = bench.run(
                pods=args.pods, policies=args.policies, nodes=args.nodes, updates=args.updates
            )
        finally:
            bench.close()
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for k, v in res.items():
            if k != "targets":
                print(f"{k:<16} {v}")
        ok = res["ready_s"] < 30 and res["rss_peak_mb"] < 300
        print(f"{'targets':<16} ready < 30 s, RSS < 300 MB: {'met' if ok else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
