"""The `felix-lite lab` verbs: argument parsing, human output and JSON (the contract).

Heavy imports happen inside the handlers so `felix-lite --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from felix_lite.lab.cluster import Lab
    from felix_lite.netlab.probe import ProbeResult

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = "/run/felix-lite-lab"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "policies"


def _say(msg: str) -> None:
    print(msg, flush=True)


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _dump(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


# ------------------------------------------------------------------ formatting
def format_probe(results: Sequence[ProbeResult], *, port: int, protocol: str) -> str:
    from felix_lite.netlab.matrix import Reachability

    names = sorted({r.src for r in results} | {r.dst for r in results})
    if not names:
        return "no pods"
    grid = Reachability.from_results(names, results).grid()
    ok = sum(r.connected for r in results)
    return (
        f"probe {protocol.upper()}/{port}: {len(results)} connections, {ok} connected, "
        f"{len(results) - ok} denied (rows: from, columns: to; . connected, X denied)\n{grid}"
    )


def format_status(status: Mapping[str, Any]) -> str:
    out = []
    for n in status.get("nodes", []):
        out.append(
            f"{n['name']}  netns {n.get('netns', '')}  {n.get('address', '')}  "
            f"AS {n.get('asn', '')}  ready: {'yes' if n.get('ready') else 'NO'}  "
            f"generation: {n.get('generation')}"
        )
        rvs = n.get("programmed_resource_versions") or {}
        if rvs:
            out.append(
                "  programmed resourceVersions: "
                + " ".join(f"{k}={v}" for k, v in sorted(rvs.items()))
            )
        rows = [("PEER ADDRESS", "PEER AS", "STATE", "SINCE")]
        for p in n.get("bgp", {}).get("peers", []):
            since = str(p.get("since") or "")
            if isinstance(p.get("uptime"), int | float):
                since += f" ({p['uptime']:.0f}s)"
            rows.append(
                (str(p.get("address", "")), str(p.get("asn", "")), str(p.get("state", "")), since)
            )
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        sep = "  +" + "+".join("-" * (w + 2) for w in widths) + "+"
        out.append(sep)
        for i, r in enumerate(rows):
            out.append(
                "  | " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
            )
            if i == 0:
                out.append(sep)
        out.append(sep)
        routes = n.get("routes", {})
        out.append(
            f"  routes: learned {routes.get('learned')}, installed {routes.get('installed')}"
        )
        out.append("")
    return "\n".join(out).rstrip()


def format_pods(pods: Sequence[Mapping[str, str]]) -> str:
    rows = [("NAMESPACE", "NAME", "NODE", "IP")]
    rows += [(p["namespace"], p["name"], p["node"], p["ip"]) for p in pods]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


# ------------------------------------------------------------------ oracle
def expected_matrix(lab: Lab, *, port: int, protocol: str) -> dict[tuple[str, str], bool]:
    """What the NetworkPolicy spec says for every pod pair, from the API's current objects."""
    from felix_lite.lab.kube import KINDS
    from policy.evaluate import endpoint_for, evaluate
    from policy.model import Protocol
    from policy.parse import build_cluster

    c = lab.client()
    objs: list[dict[str, Any]] = []
    for kind in ("Namespace", "Pod", "NetworkPolicy"):
        for item in c.list(kind).get("items", []):
            objs.append({"kind": kind, "apiVersion": KINDS[kind].api_version, **item})
    state, _errors = build_cluster(objs)
    keys = [e.name for e in lab.endpoints()]
    proto = Protocol(protocol.upper())
    return {
        (s, d): evaluate(
            state, endpoint_for(state, s), endpoint_for(state, d), port=port, protocol=proto
        ).allowed
        for s in keys
        for d in keys
    }


# ------------------------------------------------------------------ handlers
def _open(args: argparse.Namespace) -> Lab:
    from felix_lite.lab.cluster import Lab

    return Lab.open(args.state_dir, out=_say)


def _files(args: argparse.Namespace) -> list[dict[str, Any]]:
    from controller.manifests import load_objects

    return load_objects(args.files)


def cmd_up(args: argparse.Namespace) -> int:
    from felix_lite.lab.cluster import LabSpec

    lab = _up(
        LabSpec(
            nodes=args.nodes,
            tor=args.tor,
            state_dir=args.state_dir,
            prefix=args.prefix or "",
            model=not args.empty,
            timeout=args.timeout,
        )
    )
    _say(
        f"kubeconfig: {lab.state.kubeconfig}  (API {lab.state.api_url}, reachable inside "
        f"netns {lab.state.api_netns}: `ip netns exec {lab.state.api_netns} kubectl "
        f"--kubeconfig {lab.state.kubeconfig} get pods -A`)"
    )
    _say(f"state: {lab.state.path}  logs: {lab.logs}")
    _say(
        f"next: felix-lite lab probe | status | apply -f FILE | down"
        f"{'' if args.state_dir == DEFAULT_STATE_DIR else ' --state-dir ' + args.state_dir}"
    )
    return 0


def _up(spec: Any) -> Lab:
    from felix_lite.lab.cluster import Lab

    return Lab.up(spec, out=_say)


def _print_report(verb: str, rep: Any) -> None:
    for ref in rep.created:
        _say(f"{ref} created")
    for ref in rep.updated:
        _say(f"{ref} configured")
    for ref in rep.unchanged:
        _say(f"{ref} unchanged")
    for ref in rep.deleted:
        _say(f"{ref} deleted")
    for ref in rep.missing:
        _say(f"{ref} not found")
    rvs = " ".join(f"{k}>={v}" for k, v in sorted(rep.rvs.items()))
    _say(f"{verb}: programmed on every node in {rep.seconds:.2f}s ({rvs or 'nothing to wait for'})")


def cmd_apply(args: argparse.Namespace) -> int:
    from felix_lite.lab.state import locked

    objs = _files(args)
    with locked(args.state_dir):
        lab = _open(args)
        rep = lab.apply_objects(objs, timeout=args.timeout)
    _print_report("apply", rep)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from felix_lite.lab.state import locked

    objs = _files(args)
    with locked(args.state_dir):
        lab = _open(args)
        rep = lab.delete_objects(objs, timeout=args.timeout)
    _print_report("delete", rep)
    return 0


def cmd_pods(args: argparse.Namespace) -> int:
    pods = _open(args).pods()
    if args.json:
        _dump(pods)
    else:
        _say(format_pods(pods))
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from felix_lite.netlab.probe import results_json

    lab = _open(args)
    results = lab.probe(port=args.port, protocol=args.protocol, timeout=args.timeout)
    if args.json:
        _dump(results_json(results, port=args.port, protocol=args.protocol))
    else:
        _say(format_probe(results, port=args.port, protocol=args.protocol))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    st = _open(args).status()
    if args.json:
        _dump(st)
    else:
        _say(format_status(st))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from felix_lite.lab.cluster import Lab
    from felix_lite.lab.state import LabState, locked

    with locked(args.state_dir):
        try:
            state = LabState.load(args.state_dir)
        except Exception as e:  # no lab: nothing to do, say so
            _say(f"lab down: {e}")
            return 0
        n_proc, n_ns = len(state.processes), len(state.netns)
        problems = Lab(state).down()
    for p in problems:
        _err(f"lab down: {p}")
    _say(
        f"lab down: stopped {n_proc} processes, removed {n_ns} namespaces"
        + (f", {len(problems)} problems" if problems else "")
    )
    return 1 if problems else 0


def _show_routes(lab: Lab) -> None:
    import subprocess

    from felix_lite.rtproto import PROTO_BGP

    for n in lab.state.nodes:
        r = subprocess.run(
            ["ip", "-n", n.netns, "route", "show", "proto", str(PROTO_BGP)],
            capture_output=True,
            text=True,
            check=False,
        )
        _say(f"$ ip -n {n.netns} route show proto {PROTO_BGP}    # {n.name}: learned over BGP")
        _say(r.stdout.rstrip() or "(none)")


def cmd_demo(args: argparse.Namespace) -> int:
    import time

    from felix_lite.lab.cluster import LabSpec

    t0 = time.monotonic()
    policies = Path(args.policies) if args.policies else EXAMPLES
    from controller.manifests import load_objects

    objs = load_objects([policies])  # fail before building anything
    _say(f"== 1. up: {args.nodes} nodes, ToR {args.tor}")
    lab = _up(
        LabSpec(
            nodes=args.nodes,
            tor=args.tor,
            state_dir=args.state_dir,
            prefix=args.prefix or "",
            timeout=args.timeout,
        )
    )
    rc = 1
    try:
        _say("\n== 2. BGP peers (each node's agent) and learned pod routes")
        _say(format_status(lab.status()))
        _show_routes(lab)
        _say(f"\n== 3. probe TCP/{args.port}, no policy: every pod reaches every pod")
        _say(
            format_probe(lab.probe(port=args.port, protocol="TCP"), port=args.port, protocol="TCP")
        )
        _say(f"\n== 4. apply {policies}")
        for f in sorted(policies.iterdir()) if policies.is_dir() else [policies]:
            _say(f"   {f.name}")
        _print_report("apply", lab.apply_objects(objs, timeout=args.timeout))
        _say(f"\n== 5. probe TCP/{args.port} again")
        results = lab.probe(port=args.port, protocol="TCP")
        _say(format_probe(results, port=args.port, protocol="TCP"))
        want = expected_matrix(lab, port=args.port, protocol="TCP")
        wrong = [r for r in results if r.src != r.dst and want.get((r.src, r.dst)) != r.connected]
        _say(
            f"spec oracle (policy.evaluate): {len(results) - len(wrong)}/{len(results)} cells "
            f"agree"
            + (
                ""
                if not wrong
                else ", differ: " + ", ".join(f"{r.src}->{r.dst}" for r in wrong[:8])
            )
        )
        rc = 0 if not wrong else 1
    finally:
        _say("\n== 6. down")
        problems = lab.down()
        for p in problems:
            _err(f"lab down: {p}")
        _say(f"demo done in {time.monotonic() - t0:.1f}s")
    return rc


# ------------------------------------------------------------------ parser
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state-dir",
        default=DEFAULT_STATE_DIR,
        metavar="DIR",
        help=f"where the lab keeps its state and logs (default {DEFAULT_STATE_DIR})",
    )


def _files_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-f",
        "--filename",
        dest="files",
        action="append",
        required=True,
        metavar="FILE|DIR",
        help="multi-document YAML: Namespace, Pod, NetworkPolicy, BGPPeer, "
        "BGPConfiguration (a directory: its *.yaml, *.yml, *.json)",
    )
    p.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for every agent (default 30)"
    )


def _build_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=2, help="node count (default 2)")
    p.add_argument(
        "--tor",
        choices=("bird", "frr", "gobgp"),
        default="bird",
        help="the ToR router (default bird)",
    )
    p.add_argument("--prefix", default="", help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=90.0, help=argparse.SUPPRESS)


def register(subparsers: Any) -> None:
    lab = subparsers.add_parser("lab", help="a whole cluster in network namespaces")
    sub = lab.add_subparsers(dest="lab_command", required=True)

    p = sub.add_parser("up", help="build the lab and wait until it routes every pod")
    _build_args(p)
    p.add_argument(
        "--empty", action="store_true", help="no x/y/z a/b/c model pods (apply your own)"
    )
    _common(p)
    p.set_defaults(handler=cmd_up)

    p = sub.add_parser("apply", help="create or update objects; wait until every agent has them")
    _files_arg(p)
    _common(p)
    p.set_defaults(handler=cmd_apply)

    p = sub.add_parser("delete", help="delete objects; wait until every agent has it")
    _files_arg(p)
    _common(p)
    p.set_defaults(handler=cmd_delete)

    p = sub.add_parser("pods", help="pods with their node and IP")
    p.add_argument("--json", action="store_true")
    _common(p)
    p.set_defaults(handler=cmd_pods)

    p = sub.add_parser("probe", help="every pod to every pod, concurrently")
    p.add_argument("--port", type=int, default=80)
    p.add_argument("--protocol", type=str.lower, choices=("tcp", "udp"), default="tcp")
    p.add_argument("--json", action="store_true")
    p.add_argument("--timeout", type=float, default=1.0, help="seconds per probe (default 1)")
    _common(p)
    p.set_defaults(handler=cmd_probe)

    p = sub.add_parser("status", help="per node: BGP sessions, routes, programmed generation")
    p.add_argument("--json", action="store_true")
    _common(p)
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("down", help="remove every namespace and process the lab made")
    _common(p)
    p.set_defaults(handler=cmd_down)

    p = sub.add_parser("demo", help="up, peers and routes, probe, apply examples, probe, down")
    _build_args(p)
    p.add_argument("--port", type=int, default=80)
    p.add_argument(
        "--policies",
        default=None,
        metavar="DIR",
        help="policies to apply (default examples/policies)",
    )
    _common(p)
    p.set_defaults(handler=cmd_demo)
