"""`felix-lite policy ...`: YAML in, programmed (or printed, or explained) out."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from controller.manifests import load_objects
from policy.errors import PolicyError
from policy.model import ClusterState
from policy.parse import build_cluster

log = logging.getLogger(__name__)

ObjKey = tuple[str, str, str]


def _obj_key(obj: dict[str, Any]) -> ObjKey:
    meta = obj.get("metadata") or {}
    kind = str(obj.get("kind", "")).lower()
    ns = "" if kind == "namespace" else str(meta.get("namespace") or "default")
    return (kind, ns, str(meta.get("name", "")))


def _err_key(err: PolicyError) -> ObjKey:
    return (err.kind, err.namespace or "", err.name)


def _report(errors: list[PolicyError]) -> None:
    for err in errors:
        print(f"rejected: {err}", file=sys.stderr)


def _kindless(objs: list[dict[str, Any]]) -> list[str]:
    """Objects without a usable `kind`: kubectl refuses them ("kind not set"),
    and ignoring them silently would hide a policy that is never enforced."""
    out: list[str] = []
    for obj in objs:
        kind = obj.get("kind")
        if isinstance(kind, str) and kind:
            continue
        meta = obj.get("metadata")
        meta = meta if isinstance(meta, dict) else {}
        ref = "/".join(str(meta[k]) for k in ("namespace", "name") if meta.get(k) is not None)
        what = "required" if kind is None or kind == "" else "must be a string"
        out.append(f"rejected: object {ref or '<unnamed>'}: kind: {what}")
    for line in out:
        print(line, file=sys.stderr)
    return out


def load_state(files: list[str]) -> tuple[ClusterState, list[PolicyError], list[dict[str, Any]]]:
    objs = load_objects(files)
    state, errors = build_cluster(objs)
    return state, errors, objs


def _default_state_dir() -> Path:
    ino = os.stat("/proc/self/ns/net").st_ino
    return Path("/run/felix-lite") / f"netns-{ino}"


def _with_last_good(
    objs: list[dict[str, Any]], errors: list[PolicyError], state_dir: Path
) -> tuple[ClusterState, list[PolicyError], list[dict[str, Any]]]:
    """Replace rejected objects by their last good version, so a broken edit of
    a policy keeps enforcing what was enforced before it."""
    path = state_dir / "last-good.json"
    try:
        last_good: dict[str, dict[str, Any]] = json.loads(path.read_text())
    except (OSError, ValueError):
        last_good = {}
    bad = {_err_key(e) for e in errors}
    merged: list[dict[str, Any]] = []
    for obj in objs:
        k = _obj_key(obj)
        if k in bad and "/".join(k) in last_good:
            log.warning("policy.keep_last_good object=%s", "/".join(k))
            merged.append(last_good["/".join(k)])
        else:
            merged.append(obj)
    state, errors2 = build_cluster(merged)
    bad_now = {_err_key(e) for e in errors2}
    good = {"/".join(_obj_key(o)): o for o in merged if _obj_key(o) not in bad_now}
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(good))
        tmp.replace(path)
    except OSError as e:
        log.warning("policy.state_dir.unwritable dir=%s error=%s", state_dir, e)
    return state, errors, merged


def _ruleset_json(ruleset: Any) -> dict[str, Any]:
    return {
        "sets": {
            name: {
                "type": s.type.value,
                "members": sorted(s.members),
                "nomatch": sorted(s.nomatch),
                "description": s.description,
            }
            for name, s in sorted(ruleset.sets.items())
        },
        "chains": {
            name: {"rules": list(c.rules), "description": c.description}
            for name, c in sorted(ruleset.chains.items())
        },
        "hooks": [{"table": h.table, "chain": h.chain, "rule": h.rule} for h in ruleset.hooks],
    }


def cmd_render(args: argparse.Namespace) -> int:
    from policy import render
    from policy.compiler import compile_ruleset

    state, errors, objs = load_state(args.files)
    _report(errors)
    kindless = _kindless(objs)
    ruleset = compile_ruleset(state, args.node)
    if args.format == "json":
        json.dump(_ruleset_json(ruleset), sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif args.format == "restore":
        sys.stdout.write("# ipset restore\n")
        sys.stdout.write(render.render_ipset_restore(ruleset))
        sys.stdout.write("# iptables-restore --noflush\n")
        sys.stdout.write(render.render_iptables_restore(ruleset, hook_inserts=ruleset.hooks))
    else:
        sys.stdout.write(render.render_human(ruleset))
    return 1 if errors or kindless else 0


def cmd_apply(args: argparse.Namespace) -> int:
    from felix_lite.dataplane.applier import Dataplane
    from felix_lite.dataplane.backend import BackendMode
    from policy.compiler import compile_ruleset

    objs = load_objects(args.files)
    state, errors = build_cluster(objs)
    state_dir = Path(args.state_dir) if args.state_dir else _default_state_dir()
    state, errors, _ = _with_last_good(objs, errors, state_dir)
    _report(errors)
    kindless = _kindless(objs)
    ruleset = compile_ruleset(state, args.node)
    result = Dataplane(backend=BackendMode(args.backend)).apply(ruleset)
    local = sum(
        1 for p in state.pods.values() if p.node == args.node and p.ip and not p.host_network
    )
    print(
        f"applied node={args.node} backend={result.backend} pods={local} "
        f"policies={len(state.policies)} chains={len(ruleset.chains)} sets={len(ruleset.sets)} "
        f"written: chains={len(result.chains_written)} sets={len(result.sets_written)} "
        f"removed: chains={len(result.chains_removed)} sets={len(result.sets_removed)}"
    )
    return 1 if errors or kindless else 0


def cmd_explain(args: argparse.Namespace) -> int:
    from policy.evaluate import endpoint_for, evaluate, explain_text
    from policy.model import Protocol

    if not 1 <= args.port <= 65535:
        print(
            f"felix-lite policy explain: error: --port {args.port}: "
            "must be between 1 and 65535, inclusive",
            file=sys.stderr,
        )
        return 2
    state, errors, objs = load_state(args.files)
    _report(errors)
    kindless = _kindless(objs)
    src = endpoint_for(state, args.src)
    dst = endpoint_for(state, args.dst)
    verdict = evaluate(state, src, dst, port=args.port, protocol=Protocol(args.protocol.upper()))
    if args.json:

        def side(d: Any) -> dict[str, Any]:
            return {
                "allowed": d.allowed,
                "isolated": d.isolated,
                "policies": list(d.selecting),
                "allowed_by": [
                    {"policy": r.policy, "direction": r.direction.value, "rule": r.rule_index}
                    for r in d.allowed_by
                ],
            }

        json.dump(
            {
                "from": args.src,
                "to": args.dst,
                "port": args.port,
                "protocol": args.protocol.upper(),
                "allowed": verdict.allowed,
                "egress": side(verdict.egress),
                "ingress": side(verdict.ingress),
            },
            sys.stdout,
            indent=2,
        )
        sys.stdout.write("\n")
    else:
        sys.stdout.write(explain_text(verdict, state).rstrip("\n") + "\n")
    # As render and apply: the verdict is printed, but a rejected object means
    # it may not be the verdict the user expects.
    return 1 if errors or kindless else 0


def cmd_flush(args: argparse.Namespace) -> int:
    from felix_lite.dataplane.applier import Dataplane
    from felix_lite.dataplane.backend import BackendMode

    Dataplane(backend=BackendMode(args.backend)).flush()
    print("flushed")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from felix_lite.dataplane.backend import BackendMode
    from felix_lite.dataplane.stats import Stats, format_counters

    rows = Stats.detect(BackendMode(args.backend)).counters()
    if args.json:
        json.dump([asdict(r) for r in rows], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_counters(rows))
    return 0


def run(args: argparse.Namespace) -> int:
    commands = {
        "render": cmd_render,
        "apply": cmd_apply,
        "explain": cmd_explain,
        "flush": cmd_flush,
    }
    if args.policy_command == "demo":
        from felix_lite.policy_demo import run as run_demo

        return run_demo(args)
    if args.policy_command == "stats":
        return cmd_stats(args)
    return commands[args.policy_command](args)
