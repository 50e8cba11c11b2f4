"""Benchmark the kernel route installer against pyroute2 and `ip -batch`, same run.

Creates its own namespaces (flrb<pid>n with an uplink veth to flrb<pid>t), measures, and
removes them on every exit path. Prints a table on stderr and JSON on stdout.

    python bench/bench_routes.py [--count 10000] [--repeat 3] [--skip-pyroute2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from felix_lite.routes import PROTO_BGP, LearnedRoutes, NetlinkRoutes

GW1 = "192.0.2.2"
GW2 = "192.0.2.3"


def sh(*args: str, stdin: str | None = None) -> None:
    out = subprocess.run(args, input=stdin, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:6])}...: rc={out.returncode} {out.stderr[:500]}")


def prefixes(count: int) -> list[str]:
    return [f"10.{100 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}/32" for i in range(count)]


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def count_ours(nl: NetlinkRoutes) -> int:
    return len(nl.dump_routes(table=254, proto=PROTO_BGP))


def bench_felix(ns: str, pfx: list[str], repeat: int) -> dict[str, list[float]]:
    res: dict[str, list[float]] = {
        k: [] for k in ("install", "replace", "reconcile_noop", "dump", "withdraw")
    }
    with NetlinkRoutes(ns) as nl:
        for _ in range(repeat):
            _felix_round(nl, pfx, res)
    return res


def _felix_round(nl: NetlinkRoutes, pfx: list[str], res: dict[str, list[float]]) -> None:
    want1 = dict.fromkeys(pfx, GW1)
    want2 = dict.fromkeys(pfx, GW2)
    lr = LearnedRoutes(nl)
    lr.reconcile()
    res["install"].append(timed(lambda: _check(lr.set_desired(want1), "added", pfx)))
    assert count_ours(nl) == len(pfx)
    res["replace"].append(timed(lambda: _check(lr.set_desired(want2), "replaced", pfx)))
    res["dump"].append(timed(lambda: nl.dump_routes(table=254, proto=PROTO_BGP)))
    fresh = LearnedRoutes(nl)  # a restarted agent: first a full dump, then nothing to do
    fresh.update(want2)
    res["reconcile_noop"].append(timed(lambda: _check(fresh.reconcile(), "changed", [])))
    res["withdraw"].append(timed(lambda: _check(lr.set_desired({}), "removed", pfx)))
    assert count_ours(nl) == 0


def _check(result: Any, what: str, expect: list[str]) -> None:
    if not result.ok:
        raise RuntimeError(f"errors: {result.errors[:3]}")
    got = result.changed if what == "changed" else len(getattr(result, what))
    if got != len(expect):
        raise RuntimeError(f"{what}: {got} != {len(expect)}")


def bench_ip_batch(ns: str, pfx: list[str], repeat: int) -> dict[str, list[float]]:
    add = "".join(f"route add {p} via {GW1} proto {PROTO_BGP}\n" for p in pfx)
    rep = "".join(f"route replace {p} via {GW2} proto {PROTO_BGP}\n" for p in pfx)
    dele = "".join(f"route del {p} proto {PROTO_BGP}\n" for p in pfx)
    res: dict[str, list[float]] = {"install": [], "replace": [], "withdraw": []}
    batch = ("ip", "-n", ns, "-force", "-batch", "-")
    for _ in range(repeat):
        res["install"].append(timed(lambda: sh(*batch, stdin=add)))
        res["replace"].append(timed(lambda: sh(*batch, stdin=rep)))
        res["withdraw"].append(timed(lambda: sh(*batch, stdin=dele)))
    return res


def bench_pyroute2(ns: str, pfx: list[str]) -> dict[str, list[float]]:
    from pyroute2 import IPRoute

    res: dict[str, list[float]] = {}
    ipr = IPRoute(netns=ns)
    try:

        def install() -> None:
            for p in pfx:
                ipr.route("add", dst=p, gateway=GW1, proto=PROTO_BGP)

        def replace() -> None:
            for p in pfx:
                ipr.route("replace", dst=p, gateway=GW2, proto=PROTO_BGP)

        def withdraw() -> None:
            for p in pfx:
                ipr.route("del", dst=p, proto=PROTO_BGP)

        res["install"] = [timed(install)]
        res["replace"] = [timed(replace)]
        res["dump"] = [timed(lambda: list(ipr.route("dump", table=254, proto=PROTO_BGP)))]
        res["withdraw"] = [timed(withdraw)]
    finally:
        ipr.close()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=10000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-pyroute2", action="store_true")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_routes: needs root (network namespaces)", file=sys.stderr)
        return 2
    base = f"flrb{os.getpid() % 100000}"
    node, tor = f"{base}n", f"{base}t"
    made: list[str] = []
    try:
        for n in (node, tor):
            sh("ip", "netns", "add", n)
            made.append(n)
        sh(
            "ip",
            "-n",
            node,
            "link",
            "add",
            "uplink",
            "type",
            "veth",
            "peer",
            "name",
            "tor0",
            "netns",
            tor,
        )
        sh("ip", "-n", node, "addr", "add", "192.0.2.1/24", "dev", "uplink")
        sh("ip", "-n", node, "link", "set", "uplink", "up")
        sh("ip", "-n", tor, "link", "set", "tor0", "up")
        pfx = prefixes(args.count)
        results: dict[str, dict[str, list[float]]] = {
            "felix_lite_netlink": bench_felix(node, pfx, args.repeat),
            "ip_batch": bench_ip_batch(node, pfx, args.repeat),
        }
        if not args.skip_pyroute2:
            results["pyroute2_one_by_one"] = bench_pyroute2(node, pfx)
    finally:
        for n in reversed(made):
            subprocess.run(["ip", "netns", "del", n], check=False)

    summary: dict[str, Any] = {
        "count": args.count,
        "repeat": args.repeat,
        "kernel": os.uname().release,
        "results": {
            impl: {
                op: {"median_s": round(statistics.median(v), 4), "runs_s": [round(x, 4) for x in v]}
                for op, v in ops.items()
            }
            for impl, ops in results.items()
        },
    }
    ops = ["install", "replace", "withdraw", "reconcile_noop", "dump"]
    print(f"{'implementation':<22}" + "".join(f"{o:>16}" for o in ops), file=sys.stderr)
    for impl, data in summary["results"].items():
        cells = "".join(
            f"{data[o]['median_s']:>15.3f}s" if o in data else f"{'-':>16}" for o in ops
        )
        print(f"{impl:<22}{cells}", file=sys.stderr)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
