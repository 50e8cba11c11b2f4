"""Benchmark the pure L3 fabric end to end, with its references in the same run.

1. Convergence of COUNT pod /32s appearing on node-1 until all are in node-2's kernel
   via a BIRD ToR (felix-lite: NodeRouting -> ExaBGP -> BIRD -> ExaBGP -> NodeRouting
   -> kernel), against (a) a bare ExaBGP API script announcing the same prefixes in
   bulk until BIRD has them all, and (b) BIRD on both nodes (Calico's way: node-1's
   BIRD learns the pod routes from its kernel, node-2's BIRD exports to its kernel),
   timed from the `ip -batch` that adds the routes on node-1. Then with aggregation on.
2. Pod add (real CNI ADD) to route installed on the remote node, over PODS pods.
3. iperf3 TCP throughput pod-to-pod: routed through the ToR, the same over a VXLAN
   overlay between the nodes, and over a direct veth.

Namespaces `flfb<pid%100>*`, removed on every exit path. Table on stderr, JSON on stdout.

    python bench/bench_fabric.py [--count 10000] [--pods 100] [--iperf-seconds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from felix_lite.fabric.routers import BirdRouter, TorConfig
from felix_lite.fabric.topology import FabricLab, FabricSpec, kernel_routes
from felix_lite.procs import kill_pid
from felix_lite.routes import NetlinkRoutes

NODE1_RANGE = "10.244.64.0/18"  # fake pods of node-1: 16k addresses, outside other blocks


def fake_pods(count: int) -> list[str]:
    return [f"10.244.{64 + (i >> 8)}.{i & 255}" for i in range(count)]


def count_routes(nl: NetlinkRoutes, proto: int | None) -> int:
    return sum(1 for r in nl.dump_routes(table=254, proto=proto) if r.dst.startswith("10.244."))


def wait_for(pred: Callable[[], bool], timeout: float, what: str, step: float = 0.01) -> float:
    t0 = time.perf_counter()
    while not pred():
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"timed out after {timeout}s: {what}")
        time.sleep(step)
    return time.perf_counter() - t0


def sh(*args: str, stdin: str | None = None) -> str:
    r = subprocess.run(args, input=stdin, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:8])}: rc={r.returncode} {r.stderr[:400]}")
    return r.stdout


def bird_count(tor: BirdRouter, protocol: str) -> int:
    out = tor.birdc("show", "route", "protocol", protocol, "count")
    for word in out.split():
        if word.isdigit():
            return int(word)
    return 0


# --- 1. convergence ------------------------------------------------------------------


def bench_felix_full(tmp: Path, count: int, *, aggregate: bool) -> dict[str, float]:
    """Like bench_felix, also timing the moment BIRD has everything (comparable to (a))."""
    spec = FabricSpec(
        nodes=2, servers=False, manage_pod_routes=False, aggregate=aggregate,
        node_blocks={1: NODE1_RANGE},
    )  # fmt: skip
    pfx = f"flfb{os.getpid() % 100}{'a' if aggregate else 'f'}"
    with FabricLab(pfx, tmp / pfx, spec) as lab:
        lab.build(wait=30)
        tor = lab.router
        assert isinstance(tor, BirdRouter)
        nl2 = NetlinkRoutes(lab.nodes["node-2"].netns)
        agent = lab.agents["node-1"]
        want = 1 if aggregate else count
        pods = {ip: "" for ip in fake_pods(count)}
        t0 = time.perf_counter()
        agent.set_local_pods(pods)
        t_bird = wait_for(lambda: bird_count(tor, "n1") >= want, 120, "bird", step=0.02)
        wait_for(lambda: count_routes(nl2, 202) >= want, 120, "node-2 kernel")
        t_node2 = time.perf_counter() - t0
        t_withdraw = float("nan")
        if not aggregate:  # with aggregation the block stays announced without pods
            t1 = time.perf_counter()
            agent.set_local_pods({})
            wait_for(lambda: count_routes(nl2, 202) == 0, 120, "node-2 withdrawn")
            t_withdraw = time.perf_counter() - t1
        nl2.close()
        return {"to_bird_s": t_bird, "to_node2_kernel_s": t_node2, "withdraw_s": t_withdraw}


BARE_SCRIPT = """
import os, sys, time
go, batch = sys.argv[1], int(sys.argv[2])
ips = [f"10.244.{64 + (i >> 8)}.{i & 255}/32" for i in range(int(sys.argv[3]))]
while not os.path.exists(go):
    time.sleep(0.002)
for i in range(0, len(ips), batch):
    sys.stdout.write("announce attributes next-hop self nlri " + " ".join(ips[i:i + batch]) + "\\n")
    sys.stdout.flush()
for _ in sys.stdin:
    pass
"""


def bench_bare_exabgp(tmp: Path, count: int) -> dict[str, float]:
    """(a): node-1's ExaBGP driven by a bare API script (bulk, 500 per command)."""
    spec = FabricSpec(nodes=2, servers=False, manage_pod_routes=False,
                      node_blocks={1: NODE1_RANGE})  # fmt: skip
    pfx = f"flfb{os.getpid() % 100}x"
    with FabricLab(pfx, tmp / pfx, spec) as lab:
        lab.build(wait=30)
        tor = lab.router
        assert isinstance(tor, BirdRouter)
        node = lab.nodes["node-1"]
        lab.kill_exabgp("node-1")
        lab.agents["node-1"].stop()
        script = tmp / "bare.py"
        script.write_text(BARE_SCRIPT)
        go = tmp / "bare.go"
        conf = tmp / "bare.conf"
        env = tmp / "bare.env"
        settings = lab.settings["node-1"]
        from felix_lite.bgp.config import render_config, render_env

        text = render_config(settings, bridge_command=(sys.executable, str(script), str(go),
                                                       "500", str(count)))  # fmt: skip
        conf.write_text(text)
        env.write_text(render_env(settings).replace("ack = true", "ack = false"))
        proc = subprocess.Popen(
            ["ip", "netns", "exec", node.netns, "exabgp", "--env-file", str(env), "server",
             str(conf)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            wait_for(lambda: tor.established(node.address), 30, "bare exabgp session", 0.05)
            time.sleep(0.5)
            go.write_text("go")
            t_bird = wait_for(lambda: bird_count(tor, "n1") >= count, 120, "bird", step=0.02)
        finally:
            kill_pid(proc.pid)
        return {"to_bird_s": t_bird}


NODE1_BIRD = """
router id {rid};
protocol device {{ scan time 10; }}
protocol kernel {{ learn; scan time 2;
  ipv4 {{ import where net ~ [ 10.244.0.0/16+ ]; export none; }}; }}
protocol bgp tor {{ local {addr} as {asn}; neighbor {tor} as 65000; hold time 30;
  ipv4 {{ import none; export where net ~ [ 10.244.0.0/16+ ]; }}; }}
"""
NODE2_BIRD = """
router id {rid};
protocol device {{ scan time 10; }}
protocol kernel {{ ipv4 {{ import none; export all; }}; }}
protocol bgp tor {{ local {addr} as {asn}; neighbor {tor} as 65000; hold time 30;
  ipv4 {{ import all; export none; }}; }}
"""


def bench_bird_nodes(tmp: Path, count: int) -> dict[str, float]:
    """(b): BIRD on both nodes; pods appear as kernel routes on node-1 (`ip -batch`)."""
    spec = FabricSpec(nodes=2, servers=False, manage_pod_routes=False,
                      node_blocks={1: NODE1_RANGE})  # fmt: skip
    pfx = f"flfb{os.getpid() % 100}b"
    with FabricLab(pfx, tmp / pfx, spec) as lab:
        lab.build(wait=30)
        tor = lab.router
        assert isinstance(tor, BirdRouter)
        for name in ("node-1", "node-2"):
            lab.kill_exabgp(name)
            lab.agents[name].stop()
        birds: list[BirdRouter] = []
        for name, tmpl in (("node-1", NODE1_BIRD), ("node-2", NODE2_BIRD)):
            n = lab.nodes[name]
            cfg = TorConfig(router_id=n.address, asn=n.asn, peers=())
            b = BirdRouter(netns=n.netns, config=cfg, workdir=tmp / pfx / f"bird-{name}",
                           on_pid=lab.topo.register_pid)  # fmt: skip
            b.workdir.mkdir(parents=True, exist_ok=True)
            text = tmpl.format(rid=n.address, addr=n.address, asn=n.asn,
                               tor=f"10.10.{n.index}.1")  # fmt: skip
            b.conf.write_text(text)
            proc = subprocess.Popen(
                ["ip", "netns", "exec", n.netns, "bird", "-f", "-c", str(b.conf), "-s", b.ctl],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
            b._register(proc.pid)
            birds.append(b)
        wait_for(lambda: all(tor.established(n.address) for n in lab.nodes.values()), 30,
                 "bird node sessions", 0.05)  # fmt: skip
        time.sleep(0.5)
        nl2 = NetlinkRoutes(lab.nodes["node-2"].netns)
        batch = "".join(f"route add blackhole {ip}/32 proto 201\n" for ip in fake_pods(count))
        t0 = time.perf_counter()
        sh("ip", "-n", lab.nodes["node-1"].netns, "-batch", "-", stdin=batch)
        t_bird = wait_for(lambda: bird_count(tor, "n1") >= count, 120, "tor bird", step=0.02)
        try:
            wait_for(lambda: count_routes(nl2, None) >= count, 60, "node-2 kernel (bird)")
        except RuntimeError:
            print(sh("ip", "-n", lab.nodes["node-2"].netns, "route")[:600], file=sys.stderr)
            print(
                birds[1].birdc("show", "route", "count"),
                birds[1].birdc("show", "protocols"),
                file=sys.stderr,
            )
            raise
        t_node2 = time.perf_counter() - t0
        nl2.close()
        for b in birds:
            b.stop()
        return {"to_bird_s": t_bird, "to_node2_kernel_s": t_node2}


# --- 2. pod add latency ----------------------------------------------------------------


def bench_pod_add(tmp: Path, pods: int) -> dict[str, Any]:
    spec = FabricSpec(nodes=2, servers=False)
    pfx = f"flfb{os.getpid() % 100}p"
    lats: list[float] = []
    with FabricLab(pfx, tmp / pfx, spec) as lab:
        lab.build(wait=30)
        nl2 = NetlinkRoutes(lab.nodes["node-2"].netns)
        for i in range(pods):
            t0 = time.perf_counter()
            pod = lab.add_pod("node-1", "bench", f"p{i}")
            dst = f"{pod.ip}/32"
            wait_for(lambda d=dst: any(r.dst == d for r in nl2.dump_routes(table=254, proto=202)),
                     10, f"route {dst}", step=0.002)  # fmt: skip
            lats.append(time.perf_counter() - t0)
        nl2.close()
    lats.sort()
    return {
        "pods": pods,
        "p50_ms": 1000 * statistics.median(lats),
        "p99_ms": 1000 * lats[min(len(lats) - 1, int(0.99 * len(lats)))],
        "max_ms": 1000 * lats[-1],
    }


# --- 3. datapath -------------------------------------------------------------------


def iperf(client_ns: str, server_ns: str, server_ip: str, seconds: float) -> float:
    srv = subprocess.Popen(
        ["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-B", server_ip],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        time.sleep(0.3)
        out = sh("ip", "netns", "exec", client_ns, "iperf3", "-c", server_ip, "-t",
                 str(seconds), "-J")  # fmt: skip
        return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9
    finally:
        kill_pid(srv.pid)


def bench_datapath(tmp: Path, seconds: float, repeat: int) -> dict[str, Any]:
    spec = FabricSpec(nodes=2, servers=False)
    pfx = f"flfb{os.getpid() % 100}d"
    with FabricLab(pfx, tmp / pfx, spec) as lab:
        lab.build(wait=30)
        a = lab.add_pod("node-1", "x", "a")
        b = lab.add_pod("node-2", "y", "b")
        c = lab.add_pod("node-1", "x", "c")
        d = lab.add_pod("node-2", "y", "d")
        wait_for(lambda: f"{b.ip}/32" in kernel_routes(lab.nodes["node-1"].netns, proto=202)
                 and f"{d.ip}/32" in kernel_routes(lab.nodes["node-1"].netns, proto=202)
                 and f"{c.ip}/32" in kernel_routes(lab.nodes["node-2"].netns, proto=202),
                 20, "routes", 0.05)  # fmt: skip
        # the agents are done; c<->d go over VXLAN between the nodes instead (same underlay)
        for agent in lab.agents.values():
            agent.stop()
        n1, n2 = lab.nodes["node-1"], lab.nodes["node-2"]
        for n, other, vip, ovip, pod in (
            (n1, n2, "10.250.0.1", "10.250.0.2", d),
            (n2, n1, "10.250.0.2", "10.250.0.1", c),
        ):
            sh("ip", "-n", n.netns, "-batch", "-", stdin=(
                f"link add vx0 type vxlan id 42 local {n.address} remote {other.address} "
                f"dstport 4789 dev eth0\n"
                f"addr add {vip}/24 dev vx0\nlink set vx0 up\n"
                f"route replace {pod.ip}/32 via {ovip} dev vx0 proto static\n"
            ))  # fmt: skip
        # direct veth between two fresh namespaces
        da, db = f"{pfx}va", f"{pfx}vb"
        lab._ns([da, db])
        sh("ip", "-n", da, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
           "netns", db)  # fmt: skip
        for ns, ip in ((da, "10.251.0.1"), (db, "10.251.0.2")):
            batch = f"addr add {ip}/24 dev eth0\nlink set eth0 up\n"
            sh("ip", "-n", ns, "-batch", "-", stdin=batch)
        runs: dict[str, list[float]] = {"routed": [], "vxlan": [], "direct": []}
        for _ in range(repeat):
            runs["routed"].append(iperf(a.netns, b.netns, b.ip, seconds))
            runs["vxlan"].append(iperf(c.netns, d.netns, d.ip, seconds))
            runs["direct"].append(iperf(da, db, "10.251.0.2", seconds))
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "gbps_median": med,
        "gbps_runs": runs,
        "routed_over_direct": med["routed"] / med["direct"],
        "routed_over_vxlan": med["routed"] / med["vxlan"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=10000)
    ap.add_argument("--pods", type=int, default=100)
    ap.add_argument("--iperf-seconds", type=float, default=3.0)
    ap.add_argument("--iperf-repeat", type=int, default=3)
    ap.add_argument("--only", choices=("convergence", "podadd", "datapath"), default=None)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_fabric: needs root (network namespaces)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="flfb-"))
    result: dict[str, Any] = {"count": args.count}
    if args.only in (None, "convergence"):
        fl = bench_felix_full(tmp, args.count, aggregate=False)
        bare = bench_bare_exabgp(tmp, args.count)
        bird = bench_bird_nodes(tmp, args.count)
        agg = bench_felix_full(tmp, args.count, aggregate=True)
        result["convergence"] = {
            "felix_lite": fl,
            "bare_exabgp": bare,
            "bird_nodes": bird,
            "felix_lite_aggregate": agg,
            "ratio_to_bare_at_bird": fl["to_bird_s"] / bare["to_bird_s"],
            "ratio_to_bird_nodes_end_to_end": fl["to_node2_kernel_s"] / bird["to_node2_kernel_s"],
        }
    if args.only in (None, "podadd"):
        result["pod_add"] = bench_pod_add(tmp, args.pods)
    if args.only in (None, "datapath"):
        result["datapath"] = bench_datapath(tmp, args.iperf_seconds, args.iperf_repeat)
    _table(result)
    print(json.dumps(result, indent=2))
    return 0


def _table(r: dict[str, Any]) -> None:
    p = lambda s: print(s, file=sys.stderr)  # noqa: E731
    if "convergence" in r:
        c = r["convergence"]
        p(f"convergence of {r['count']} /32s (s)      to BIRD   to node-2 kernel   withdraw")
        fl, bare, bird, agg = c["felix_lite"], c["bare_exabgp"], c["bird_nodes"], c[
            "felix_lite_aggregate"]  # fmt: skip
        rows = [
            ("felix-lite", fl["to_bird_s"], fl["to_node2_kernel_s"], fl["withdraw_s"]),
            ("(a) bare ExaBGP API script", bare["to_bird_s"], None, None),
            ("(b) BIRD on both nodes", bird["to_bird_s"], bird["to_node2_kernel_s"], None),
            ("felix-lite, aggregate on", agg["to_bird_s"], agg["to_node2_kernel_s"], None),
        ]
        for name, *vals in rows:
            cells = "".join(f"{v:10.2f}" if v is not None else " " * 10 for v in vals)
            p(f"  {name:32s}{cells}")
        p(f"  ratio to (a) at BIRD: {c['ratio_to_bare_at_bird']:.2f}   "
          f"ratio to (b) end to end: {c['ratio_to_bird_nodes_end_to_end']:.2f}")  # fmt: skip
    if "pod_add" in r:
        q = r["pod_add"]
        p(f"pod add -> remote route, {q['pods']} pods: p50 {q['p50_ms']:.0f} ms, "
          f"p99 {q['p99_ms']:.0f} ms, max {q['max_ms']:.0f} ms")  # fmt: skip
    if "datapath" in r:
        d = r["datapath"]["gbps_median"]
        p(
            f"iperf3 TCP Gbit/s (median): routed {d['routed']:.2f}  vxlan {d['vxlan']:.2f}  "
            f"direct {d['direct']:.2f}  routed/direct {r['datapath']['routed_over_direct']:.2f}"
        )


if __name__ == "__main__":
    sys.exit(main())
