"""NetworkPolicy engine benchmark on a real kernel (issue 2).

A synthetic cluster (bench.synthetic: 5,000 pods, 100 namespaces, 1,000
policies, 200 pods on the measured node) is programmed into a throwaway
network namespace, once per iptables backend:

- full program from empty (compile + ipset restore + iptables-restore), and
  its ratio to a bare `ipset restore` + `iptables-restore --noflush` of the
  same final payload, measured in the same run;
- single changes on a warm agent-like loop (incremental compile + apply):
  one policy added, one pod added, one label changed; time until the restore
  commands have returned (the kernel has it), p50/p99 over --runs runs.

Run as root: `python -m bench.bench_policy [--runs 100] [--backend nft]`.
Prints a table on stderr-free stdout and the JSON document last
(`--json FILE` also writes it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from typing import Any

NS_PREFIX = "flpb"


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(_pct(values, 0.50) * 1000, 2),
        "p99_ms": round(_pct(values, 0.99) * 1000, 2),
        "max_ms": round(max(values) * 1000, 2),
        "mean_ms": round(statistics.fmean(values) * 1000, 2),
        "runs": len(values),
    }


def _progress(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def _clear_memo_caches() -> None:
    """Forget what the policy package memoised (a restarted agent starts empty)."""
    import policy.compiler
    import policy.render
    import policy.selectors

    for mod in (policy.compiler, policy.render, policy.selectors):
        for obj in vars(mod).values():
            clear = getattr(obj, "cache_clear", None)
            if callable(clear):
                clear()
    policy.selectors._BY_ID.clear()


def inner(backend: str, runs: int, repeat: int = 5) -> dict[str, Any]:
    """Runs inside the benchmark's network namespace."""
    from bench.synthetic import LOCAL_NODE, _sel, make_pod, synthetic_cluster
    from felix_lite.dataplane.applier import Dataplane
    from felix_lite.dataplane.backend import BackendMode
    from policy.compiler import Compiler, compile_ruleset
    from policy.model import Labels, NetworkPolicy, Peer, PolicyPort, PolicyType, Rule
    from policy.render import render_ipset_restore, render_iptables_restore

    mode = BackendMode(backend)
    state = synthetic_cluster()
    node = LOCAL_NODE
    out: dict[str, Any] = {"backend": backend}

    # Full program from empty, `repeat` times: each in a flushed namespace with a
    # new Dataplane and the compiler's memo caches cleared (what a restarted agent
    # has), then the bare reference of the same payload. The first round also
    # pays the process's one-time costs; both it and the medians are reported.
    _progress(f"{backend}: full program from empty x{repeat}")
    fulls: list[float] = []
    compiles: list[float] = []
    bares: list[float] = []
    ruleset = None
    for _ in range(repeat):
        _clear_memo_caches()
        t0 = time.perf_counter()
        ruleset = compile_ruleset(state, node)
        t1 = time.perf_counter()
        dp = Dataplane(backend=mode)
        dp.apply(ruleset)
        t2 = time.perf_counter()
        fulls.append(t2 - t0)
        compiles.append(t1 - t0)
        # The bare reference: exactly what the applier sent into the empty
        # namespace (new sets filled in place), through the kernel tools alone.
        ipset_text = render_ipset_restore(ruleset, fresh=list(ruleset.sets))
        ipt_text = render_iptables_restore(ruleset, hook_inserts=ruleset.hooks)
        dp.flush()
        restore = dp.backend.restore
        t3 = time.perf_counter()
        subprocess.run(["ipset", "restore"], input=ipset_text, text=True, check=True)
        subprocess.run([restore, "--noflush"], input=ipt_text, text=True, check=True)
        bares.append(time.perf_counter() - t3)
        dp.flush()
    assert ruleset is not None
    rules = sum(len(c.rules) for c in ruleset.chains.values())
    members = sum(len(s.members) + len(s.nomatch) for s in ruleset.sets.values())
    out["size"] = {
        "cluster_pods": len(state.pods),
        "policies": len(state.policies),
        "local_pods": sum(1 for p in state.pods.values() if p.node == node),
        "chains": len(ruleset.chains),
        "rules": rules,
        "sets": len(ruleset.sets),
        "set_members": members,
    }
    full = statistics.median(fulls)
    bare = statistics.median(bares)
    out["full_program"] = {
        "rounds": repeat,
        "total_s": round(full, 3),
        "compile_s": round(statistics.median(compiles), 3),
        "apply_s": round(full - statistics.median(compiles), 3),
        "bare_restore_s": round(bare, 3),
        "ratio_to_bare": round(full / bare, 2),
        "first_round_total_s": round(fulls[0], 3),
        "first_round_ratio": round(fulls[0] / bares[0], 2),
    }

    # Incremental: an agent-like loop, warm.
    _progress(f"{backend}: incremental updates x{runs}")
    comp = Compiler(node)
    for ns in state.namespaces.values():
        comp.set_namespace(ns)
    for pod in state.pods.values():
        comp.set_pod(pod)
    for pol in state.policies.values():
        comp.set_policy(pol)
    # Like the agent: trust our own writes between full re-reads (docs: applier).
    dp = Dataplane(backend=mode, trust_for=3600.0)
    dp.apply(comp.ruleset())
    # As the agent does once ready (felix_lite/agent/loop.py, _freeze_heap).
    from felix_lite.agent.loop import _freeze_heap

    _freeze_heap()

    local = sorted((p for p in state.pods.values() if p.node == node), key=lambda p: p.key)
    namespaces = sorted({p.namespace for p in local})
    npods = len(state.pods)
    timings: dict[str, list[float]] = {"policy_added": [], "pod_added": [], "label_changed": []}

    def timed(fn: Any) -> float:
        t = time.perf_counter()
        fn()
        result = dp.apply(comp.ruleset())
        elapsed = time.perf_counter() - t
        if not result.changed:
            raise RuntimeError("benchmark update changed nothing in the kernel")
        return elapsed

    for r in range(runs):
        ns = namespaces[r % len(namespaces)]
        pol = NetworkPolicy(
            namespace=ns,
            name=f"bench-added-{r}",
            pod_selector=_sel(),
            policy_types=frozenset({PolicyType.INGRESS}),
            ingress=(
                Rule(
                    peers=(Peer(pod_selector=_sel(**{"bench-client": str(r)})),),
                    ports=(PolicyPort(port=9000 + r),),
                ),
            ),
        )
        timings["policy_added"].append(timed(lambda: comp.set_policy(pol)))  # noqa: B023
        comp.remove_policy(pol.key)
        dp.apply(comp.ruleset())

        pod = make_pod(npods + r, namespace=ns, node=node)
        timings["pod_added"].append(timed(lambda: comp.set_pod(pod)))  # noqa: B023
        comp.remove_pod(pod.key)
        dp.apply(comp.ruleset())

        lp = local[r % len(local)]
        tier = "db" if lp.labels.get("tier") != "db" else "web"
        moved = replace(lp, labels=Labels({**lp.labels, "tier": tier}))
        timings["label_changed"].append(timed(lambda: comp.set_pod(moved)))  # noqa: B023
        comp.set_pod(lp)
        dp.apply(comp.ruleset())
        if (r + 1) % 25 == 0:
            _progress(f"{backend}: {r + 1}/{runs}")
    out["incremental"] = {k: _summary(v) for k, v in timings.items()}
    dp.flush()
    return out


def _run_backend(backend: str, runs: int) -> dict[str, Any]:
    ns = f"{NS_PREFIX}{os.getpid() % 100000}{backend[0]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        proc = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                ns,
                sys.executable,
                "-m",
                "bench.bench_policy",
                "--inner",
                "--backend",
                backend,
                "--runs",
                str(runs),
            ],
            stdout=subprocess.PIPE,
            text=True,
            check=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        return dict(json.loads(proc.stdout))
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def _table(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        f = r["full_program"]
        s = r["size"]
        lines.append(
            f"[{r['backend']}] {s['cluster_pods']} pods, {s['policies']} policies, "
            f"{s['local_pods']} local pods -> {s['chains']} chains, {s['rules']} rules, "
            f"{s['sets']} sets, {s['set_members']} members"
        )
        lines.append(
            f"  full program   {f['total_s'] * 1000:8.1f} ms median of {f['rounds']}"
            f" (compile {f['compile_s'] * 1000:.1f}"
            f" + apply {f['apply_s'] * 1000:.1f});"
            f" bare restore {f['bare_restore_s'] * 1000:.1f} ms;"
            f" ratio {f['ratio_to_bare']}x (target <= 2x); first round"
            f" {f['first_round_total_s'] * 1000:.1f} ms, ratio {f['first_round_ratio']}x"
        )
        for k, v in r["incremental"].items():
            lines.append(
                f"  {k:14s} p50 {v['p50_ms']:7.2f} ms  p99 {v['p99_ms']:7.2f} ms"
                f"  max {v['max_ms']:7.2f} ms  (n={v['runs']}, target p99 < 100 ms)"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--backend", choices=("legacy", "nft", "both"), default="both")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the JSON here")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.inner:
        json.dump(inner(a.backend, a.runs), sys.stdout)
        return 0
    backends = ["legacy", "nft"] if a.backend == "both" else [a.backend]
    results = [_run_backend(b, a.runs) for b in backends]
    print(_table(results))
    doc = {"benchmark": "policy", "results": results}
    print(json.dumps(doc, indent=2))
    if a.json_out:
        with open(a.json_out, "w") as fh:
            json.dump(doc, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
