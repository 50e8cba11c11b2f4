"""Policy change through the API -> enforced on every node of a lab: p50/p99.

Builds a lab (default 3 nodes, BIRD ToR, the x/y/z a/b/c model) in namespaces
`fllb<pid%100>*` under a temporary state directory, then makes `--changes`
policy changes through the API emulator, alternating a NetworkPolicy between
two specs (allow port 80 / allow port 81 into x/a from namespace y). One
sample is the time from just before the write to the moment every node's
agent reports `programmed_resource_versions.networkpolicy >= the write's RV`
(what `felix-lite lab apply` waits for; each node's /status polled every
20 ms). With `--verify`, every `--verify`-th change is also checked with a
real probe (y/a -> x/a on the allowed port connects, the other does not).
Always tears the lab down. Table on stderr, JSON on stdout.

    python bench/bench_lab.py [--nodes 3] [--changes 50] [--tor bird] [--verify 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

from felix_lite.lab.cluster import Lab, LabSpec
from felix_lite.netlab.probe import probe_one


def policy(port: int) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"namespace": "x", "name": "bench-allow"},
        "spec": {
            "podSelector": {"matchLabels": {"pod": "a"}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                    "ports": [{"protocol": "TCP", "port": port}],
                }
            ],
        },
    }


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--changes", type=int, default=50)
    ap.add_argument("--tor", default="bird", choices=("bird", "frr", "gobgp"))
    ap.add_argument("--verify", type=int, default=10, help="probe every Nth change (0: never)")
    args = ap.parse_args(argv)

    state_dir = tempfile.mkdtemp(prefix="fll-bench-")
    prefix = f"fllb{os.getpid() % 100:02d}"
    t0 = time.monotonic()
    lab = Lab.up(
        LabSpec(nodes=args.nodes, tor=args.tor, state_dir=state_dir, prefix=prefix),
        out=lambda m: print(m, file=sys.stderr),
    )
    up_seconds = time.monotonic() - t0
    samples: list[float] = []
    verified = 0
    try:
        eps = {e.name: e for e in lab.endpoints()}
        lab.apply_objects([policy(81)], timeout=30)
        for i in range(args.changes):
            port = 80 if i % 2 == 0 else 81
            rep = lab.apply_objects([policy(port)], timeout=30)
            samples.append(rep.seconds)
            if args.verify and (i + 1) % args.verify == 0:
                other = 81 if port == 80 else 80
                ok = probe_one(eps["y/a"], eps["x/a"], port=port, protocol="TCP").connected
                denied = not probe_one(
                    eps["y/a"], eps["x/a"], port=other, protocol="TCP", timeout=0.5
                ).connected
                if not (ok and denied):
                    raise SystemExit(
                        f"change {i}: not enforced (port {port} ok={ok}, "
                        f"port {other} denied={denied})"
                    )
                verified += 1
    finally:
        problems = lab.down()
        if not problems:
            shutil.rmtree(state_dir, ignore_errors=True)
    result = {
        "nodes": args.nodes,
        "tor": args.tor,
        "changes": len(samples),
        "up_seconds": round(up_seconds, 2),
        "p50_ms": round(pct(samples, 50) * 1000, 1),
        "p90_ms": round(pct(samples, 90) * 1000, 1),
        "p99_ms": round(pct(samples, 99) * 1000, 1),
        "max_ms": round(max(samples) * 1000, 1),
        "mean_ms": round(statistics.mean(samples) * 1000, 1),
        "verified_by_probe": verified,
        "target_p99_ms": 1000,
        "teardown_problems": problems,
    }
    print(f"{'metric':<22}{'value':>10}", file=sys.stderr)
    for k in (
        "nodes",
        "changes",
        "up_seconds",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "max_ms",
        "mean_ms",
        "verified_by_probe",
    ):
        print(f"{k:<22}{result[k]!s:>10}", file=sys.stderr)
    print(json.dumps(result))
    return 0 if result["p99_ms"] < 1000 else 1


if __name__ == "__main__":
    sys.exit(main())
