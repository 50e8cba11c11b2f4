"""`felix-lite policy demo`: one node, the upstream e2e pods, a policy set, before and after.

Everything happens in network namespaces this command creates and removes
(also on Ctrl-C or failure); nothing touches the machine's own namespace.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import yaml

from felix_lite.netlab.e2e import model_docs, upstream_model
from felix_lite.netlab.matrix import Reachability
from felix_lite.netlab.nodelab import NodeLab

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "policies"


def _say(msg: str) -> None:
    print(msg, flush=True)


def _matrix(title: str, r: Reachability) -> None:
    allowed = sum(1 for s in r.names for d in r.names if r.get(s, d))
    _say(
        f"\n{title}  ({allowed}/{len(r.names) ** 2} connected; '.' connected, 'X' denied;"
        " rows are sources)"
    )
    _say(r.grid().expandtabs(6))


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("felix-lite policy demo: needs root (network namespaces)", file=sys.stderr)
        return 1
    policy_dir = Path(args.policies) if args.policies else EXAMPLES
    policies = []
    for f in sorted(policy_dir.glob("*.yaml")):
        policies.extend(d for d in yaml.safe_load_all(f.read_text()) if d)
    if args.log_level.upper() != "DEBUG":
        logging.getLogger("felix_lite.netlab").setLevel(logging.WARNING)
    model = upstream_model()
    t0 = time.monotonic()
    _say("== building node-1 with namespaces x, y, z and pods a, b, c (network namespaces)")
    with NodeLab(f"fldm{os.getpid() % 10000}", model, backend=args.backend) as lab:
        up = time.monotonic() - t0
        _say(f"   {len(lab.pods)} pods up in {up:.1f}s; each serves TCP/UDP 80, 81")
        for key, ep in lab.pods.items():
            _say(f"   {key:5s} {ep.ip}")
        _matrix("== TCP/80 before any policy", lab.probe(port=args.port))
        _say(f"\n== applying {len(policies)} policies from {policy_dir}:")
        for p in policies:
            meta = p["metadata"]
            _say(f"   networkpolicy {meta.get('namespace', 'default')}/{meta['name']}")
        t1 = time.monotonic()
        out = lab.policy.apply([*model_docs(model), *policies])
        _say(f"   {out.strip()}  ({(time.monotonic() - t1) * 1000:.0f} ms incl. process start)")
        _matrix("== TCP/80 after the policies", lab.probe(port=args.port))
        _matrix("== TCP/81 after the policies", lab.probe(port=81))
        _say("\n== why: felix-lite policy explain --from y/a --to x/a --port 80")
        docs_dir = lab.policy.write_docs([*model_docs(model), *policies])
        for src, dst in (("y/a", "x/a"), ("z/c", "y/b")):
            _explain(src, dst, docs_dir)
        _say("== tearing down")
    _say(f"== done in {time.monotonic() - t0:.1f}s; all namespaces removed")
    return 0


def _explain(src: str, dst: str, docs_dir: Path) -> None:
    """Through the CLI itself, so the demo shows exactly what a user would type."""
    from felix_lite.cli import main as cli_main

    argv = ["policy", "explain", "--from", src, "--to", dst, "--port", "80", "-f", str(docs_dir)]
    cli_main(["--log-level", "WARNING", *argv])
