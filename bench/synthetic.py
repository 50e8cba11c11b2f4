"""A synthetic cluster for compiler benchmarks, and the incremental scenario.

`synthetic_cluster()` builds, by default, 5,000 pods in 100 namespaces with
1,000 policies (default deny both ways, namespace isolation, cross-namespace
team access, app tiers with numeric and named ports, DNS egress, ipBlocks
with excepts and port ranges) spread over 25 nodes, so `LOCAL_NODE` has 200
local pods. `run()` times the from-scratch compile and single updates followed
by `Compiler.ruleset()`; `python -m bench.synthetic` prints the numbers.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

from policy.compiler import Compiler, compile_ruleset
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
    Pod,
    PolicyPort,
    PolicyType,
    Protocol,
    Requirement,
    Rule,
)

LOCAL_NODE = "node-0"
TIERS = ("web", "api", "db")
ING = frozenset({PolicyType.INGRESS})
EGR = frozenset({PolicyType.EGRESS})
BOTH = ING | EGR


def _sel(**labels: str) -> LabelSelector:
    return LabelSelector(Labels(labels))


def _ns_sel(name: str) -> LabelSelector:
    return _sel(**{"kubernetes.io/metadata.name": name})


def pod_ip(index: int) -> str:
    i = index + 256
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


def make_namespace(i: int) -> Namespace:
    name = f"ns-{i}"
    return Namespace(
        name,
        Labels(
            {
                "kubernetes.io/metadata.name": name,
                "team": f"team-{i % 10}",
                "env": "prod" if i % 2 == 0 else "dev",
            }
        ),
    )


def make_pod(index: int, *, namespace: str, node: str, tier: str | None = None) -> Pod:
    name = f"pod-{index}"
    tier = tier or TIERS[index % 3]
    ports = [
        ContainerPort(8080, Protocol.TCP, "http"),
        ContainerPort(9090, Protocol.TCP, "metrics"),
    ]
    if index % 7 == 0:
        ports.append(ContainerPort(53, Protocol.UDP, "dns"))
    return Pod(
        namespace=namespace,
        name=name,
        labels=Labels({"app": f"app-{index % 5}", "tier": tier, "pod": name}),
        node=node,
        ip=pod_ip(index),
        ports=tuple(ports),
    )


def make_policy(ns_index: int, j: int) -> NetworkPolicy:
    """The j-th policy of namespace ns-<ns_index>; ten templates, cycled."""
    ns = f"ns-{ns_index}"
    v = j // 10  # variant, so cycled templates differ
    kind = j % 10
    if kind == 0:
        return NetworkPolicy(ns, f"default-deny-ingress-{v}", LabelSelector(), ING)
    if kind == 1:
        return NetworkPolicy(ns, f"default-deny-egress-{v}", LabelSelector(), EGR)
    if kind == 2:
        return NetworkPolicy(
            ns,
            f"allow-same-ns-{v}",
            LabelSelector(),
            ING,
            ingress=(Rule(peers=(Peer(pod_selector=LabelSelector()),)),),
        )
    if kind == 3:
        team = f"team-{(ns_index + 1 + v) % 10}"
        return NetworkPolicy(
            ns,
            f"allow-team-{v}",
            LabelSelector(),
            ING,
            ingress=(Rule(peers=(Peer(namespace_selector=_sel(team=team)),)),),
        )
    if kind == 4:
        return NetworkPolicy(
            ns,
            f"web-{v}",
            _sel(tier="web"),
            ING,
            ingress=(
                Rule(
                    peers=(Peer(namespace_selector=LabelSelector()),),
                    ports=(PolicyPort(Protocol.TCP, 80 + v), PolicyPort(Protocol.TCP, 443)),
                ),
            ),
        )
    if kind == 5:
        return NetworkPolicy(
            ns,
            f"api-{v}",
            _sel(tier="api"),
            ING,
            ingress=(
                Rule(
                    peers=(Peer(pod_selector=_sel(tier="web")),), ports=(PolicyPort(port="http"),)
                ),
            ),
        )
    if kind == 6:
        return NetworkPolicy(
            ns,
            f"db-{v}",
            _sel(tier="db"),
            BOTH,
            ingress=(
                Rule(
                    peers=(
                        Peer(pod_selector=_sel(tier="api"), namespace_selector=_sel(env="prod")),
                    ),
                    ports=(PolicyPort(Protocol.TCP, 5432),),
                ),
            ),
            egress=(Rule(peers=(Peer(pod_selector=_sel(tier="db")),)),),
        )
    if kind == 7:
        return NetworkPolicy(
            ns,
            f"egress-dns-{v}",
            LabelSelector(),
            EGR,
            egress=(
                Rule(
                    peers=(
                        Peer(pod_selector=_sel(app="app-0"), namespace_selector=_ns_sel("ns-0")),
                    ),
                    ports=(
                        PolicyPort(Protocol.UDP, 53),
                        PolicyPort(Protocol.TCP, 53),
                        PolicyPort(Protocol.UDP, "dns"),
                    ),
                ),
                Rule(peers=(Peer(pod_selector=LabelSelector()),)),
            ),
        )
    if kind == 8:
        third = (ns_index * 7 + v) % 256
        return NetworkPolicy(
            ns,
            f"external-{v}",
            _sel(app=f"app-{ns_index % 5}"),
            BOTH,
            ingress=(
                Rule(
                    peers=(
                        Peer(ip_block=IPBlock(f"172.16.{third}.0/24", (f"172.16.{third}.16/28",))),
                    ),
                    ports=(PolicyPort(Protocol.TCP, 8000, 8100), PolicyPort(Protocol.SCTP, 9000)),
                ),
            ),
            egress=(
                Rule(
                    peers=(Peer(ip_block=IPBlock("0.0.0.0/0", ("10.0.0.0/8", "192.168.0.0/16"))),)
                ),
            ),
        )
    return NetworkPolicy(
        ns,
        f"metrics-{v}",
        _sel(tier=TIERS[v % 3]),
        ING,
        ingress=(
            Rule(
                peers=(
                    Peer(
                        pod_selector=LabelSelector(
                            match_expressions=(Requirement("app", Operator.EXISTS),)
                        ),
                        namespace_selector=LabelSelector(
                            match_expressions=(
                                Requirement("team", Operator.IN, ("team-0", "team-1")),
                            )
                        ),
                    ),
                ),
                ports=(PolicyPort(port="metrics"),),
            ),
        ),
    )


def synthetic_cluster(
    *, pods: int = 5000, namespaces: int = 100, policies: int = 1000, nodes: int = 25
) -> ClusterState:
    """Deterministic cluster; pod i is in ns-(i % namespaces) on
    node-((i // namespaces) % nodes), so every namespace has local pods."""
    nss = {f"ns-{i}": make_namespace(i) for i in range(namespaces)}
    pod_map = {}
    for i in range(pods):
        pod = make_pod(
            i, namespace=f"ns-{i % namespaces}", node=f"node-{(i // namespaces) % nodes}"
        )
        pod_map[pod.key] = pod
    pol_map = {}
    per_ns = max(1, policies // namespaces)
    for n in range(namespaces):
        for j in range(per_ns):
            pol = make_policy(n, j)
            pol_map[pol.key] = pol
    return ClusterState(namespaces=nss, pods=pod_map, policies=pol_map)


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(*, repeat: int = 5, state: ClusterState | None = None) -> dict[str, float]:
    """Seconds: the first from-scratch compile in this process (`scratch_cold`:
    selector and rule caches empty), later ones (`scratch`, median), and each
    single update plus `ruleset()` on a warm Compiler (median of `repeat`,
    each on a fresh variant so nothing is a no-op)."""
    state = state or synthetic_cluster()
    npods = len(state.pods)
    nns = len(state.namespaces)
    cold = _time(lambda: compile_ruleset(state, LOCAL_NODE))
    scratch = [_time(lambda: compile_ruleset(state, LOCAL_NODE)) for _ in range(max(1, repeat))]

    c = Compiler(LOCAL_NODE)
    for ns in state.namespaces.values():
        c.set_namespace(ns)
    for pod in state.pods.values():
        c.set_pod(pod)
    for pol in state.policies.values():
        c.set_policy(pol)
    initial = c.ruleset()

    results: dict[str, list[float]] = {
        "policy_add": [],
        "policy_change": [],
        "policy_remove": [],
        "pod_add_local": [],
        "pod_add_remote": [],
        "pod_labels_local": [],
        "pod_labels_remote": [],
        "pod_remove_local": [],
        "namespace_labels": [],
        "noop": [],
    }
    local = [p for p in state.pods.values() if p.node == LOCAL_NODE]
    remote = [p for p in state.pods.values() if p.node != LOCAL_NODE]
    for r in range(repeat):
        base = make_policy(3 + r, 3)
        pol = replace(
            base,
            name=f"bench-{r}",
            ingress=(
                Rule(
                    peers=(Peer(pod_selector=_sel(app="app-2")),),
                    ports=(PolicyPort(port=8081 + r),),
                ),
            ),
        )

        def upd(fn: Callable[[], None]) -> float:
            t0 = time.perf_counter()
            fn()
            c.ruleset()
            return time.perf_counter() - t0

        results["policy_add"].append(upd(lambda: c.set_policy(pol)))  # noqa: B023
        pol2 = replace(pol, pod_selector=_sel(tier="api"))
        results["policy_change"].append(upd(lambda: c.set_policy(pol2)))  # noqa: B023
        results["policy_remove"].append(upd(lambda: c.remove_policy(pol2.key)))  # noqa: B023
        new_local = make_pod(npods + 2 * r, namespace=f"ns-{(7 + r) % nns}", node=LOCAL_NODE)
        results["pod_add_local"].append(upd(lambda: c.set_pod(new_local)))  # noqa: B023
        new_remote = make_pod(npods + 2 * r + 1, namespace=f"ns-{(8 + r) % nns}", node="node-9")
        results["pod_add_remote"].append(upd(lambda: c.set_pod(new_remote)))  # noqa: B023
        lp = local[r % len(local)]
        moved = replace(
            lp,
            labels=Labels(
                {**lp.labels, "tier": "db" if lp.labels["tier"] != "db" else "web", "app": "app-0"}
            ),
        )
        results["pod_labels_local"].append(upd(lambda: c.set_pod(moved)))  # noqa: B023
        rp = remote[r % len(remote)]
        rmoved = replace(
            rp, labels=Labels({**rp.labels, "tier": "api" if rp.labels["tier"] != "api" else "web"})
        )
        results["pod_labels_remote"].append(upd(lambda: c.set_pod(rmoved)))  # noqa: B023
        results["pod_remove_local"].append(upd(lambda: c.remove_pod(new_local.key)))  # noqa: B023
        ns = state.namespaces[f"ns-{(r * 13) % nns}"]
        ns2 = replace(ns, labels=Labels({**ns.labels, "team": f"team-{(r + 5) % 10}"}))
        results["namespace_labels"].append(upd(lambda: c.set_namespace(ns2)))  # noqa: B023
        results["noop"].append(upd(lambda: c.set_pod(new_remote)))  # noqa: B023
    out = {"scratch_cold": cold, "scratch": statistics.median(scratch)}
    out.update({k: statistics.median(v) for k, v in results.items()})
    out["initial_chains"] = float(len(initial.chains))
    out["initial_sets"] = float(len(initial.sets))
    out["initial_set_members"] = float(sum(len(s.members) for s in initial.sets.values()))
    out["initial_rules"] = float(sum(len(ch.rules) for ch in initial.chains.values()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--pods", type=int, default=5000)
    ap.add_argument("--namespaces", type=int, default=100)
    ap.add_argument("--policies", type=int, default=1000)
    ap.add_argument("--nodes", type=int, default=25)
    a = ap.parse_args()
    state = synthetic_cluster(
        pods=a.pods, namespaces=a.namespaces, policies=a.policies, nodes=a.nodes
    )
    for k, v in run(repeat=a.repeat, state=state).items():
        if k.startswith("initial_"):
            print(f"{k:20s} {int(v)}")
        else:
            print(f"{k:20s} {v * 1000:8.2f} ms")


if __name__ == "__main__":
    main()
