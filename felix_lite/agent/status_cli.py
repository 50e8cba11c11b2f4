"""`felix-lite status [--json] [--url URL]`: the local agent's view, like
`calicoctl node status`: readiness, programmed generation and resource
versions, BGP peers and routes. Reads the agent's /status; exit 1 with one
clear line when the agent cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

DEFAULT_URL = "http://127.0.0.1:9099"


class AgentUnreachable(RuntimeError):
    pass


def fetch_status(url: str, *, timeout: float = 5.0) -> dict[str, Any]:
    """GET <url>/status as a dict; AgentUnreachable names the URL and why."""
    full = url.rstrip("/") + "/status"
    try:
        with urllib.request.urlopen(full, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as e:
        raise AgentUnreachable(f"agent at {full}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise AgentUnreachable(f"agent at {full}: not reachable ({reason})") from None
    try:
        doc = json.loads(body)
    except ValueError:
        raise AgentUnreachable(f"agent at {full}: answer is not JSON") from None
    if not isinstance(doc, dict):
        raise AgentUnreachable(f"agent at {full}: answer is not a JSON object")
    return doc


def _since(uptime: Any) -> str:
    if uptime is None:
        return "-"
    secs = int(float(uptime))
    if secs < 60:
        return f"{secs}s"
    if secs < 3600:
        return f"{secs // 60}m{secs % 60:02d}s"
    if secs < 86400:
        return f"{secs // 3600}h{(secs % 3600) // 60:02d}m"
    return f"{secs // 86400}d{(secs % 86400) // 3600:02d}h"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    sep = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def line(cells: Sequence[str]) -> str:
        return "|" + "|".join(f" {c:<{w}} " for c, w in zip(cells, widths, strict=True)) + "|"

    return [sep, line(headers), sep, *(line(r) for r in rows), sep]


def format_status(doc: Mapping[str, Any], *, now: float | None = None) -> str:
    """Human-readable rendering of an agent's /status document."""
    now = time.time() if now is None else now
    out: list[str] = []
    ready = "ready" if doc.get("ready") else "NOT ready"
    if not doc.get("in_sync", True):
        ready += " (waiting for the first full list)"
    out.append(f"felix-lite agent on node {doc.get('node', '?')}: {ready}")
    out.append(f"Programmed generation: {doc.get('generation', 0)}")
    rvs = doc.get("programmed_resource_versions") or {}
    if rvs:
        out.append(
            "Programmed resource versions: " + " ".join(f"{k}={v}" for k, v in sorted(rvs.items()))
        )
    la = doc.get("last_apply")
    if la:
        ago = max(0.0, now - float(la.get("at", now)))
        out.append(
            f"Last apply: {ago:.0f}s ago, took {float(la.get('seconds', 0)):.3f}s,"
            f" {la.get('chains_written', 0)} chains and {la.get('sets_written', 0)} sets written"
            f" ({doc.get('applies', 0)} applies, {doc.get('apply_failures', 0)} failures)"
        )
    rs = doc.get("ruleset") or {}
    out.append(
        f"Policy: {rs.get('chains', 0)} chains, {rs.get('rules', 0)} rules,"
        f" {rs.get('sets', 0)} ipsets ({rs.get('members', 0)} members);"
        f" {doc.get('local_pods', 0)} local pods"
    )
    bgp = doc.get("bgp") or {}
    out.append("")
    if not bgp.get("enabled", True):
        out.append("BGP: disabled (--no-routing)")
    else:
        peers = bgp.get("peers") or []
        out.append("IPv4 BGP status")
        if peers:
            rows = [
                [
                    str(p.get("address", "")),
                    str(p.get("asn", "")),
                    str(p.get("state", "")),
                    _since(p.get("uptime")),
                    str(p.get("received", 0)),
                    str(p.get("accepted", 0)),
                    str(p.get("installed", 0)),
                ]
                for p in peers
            ]
            out += _table(
                ["PEER ADDRESS", "ASN", "STATE", "SINCE", "RECEIVED", "ACCEPTED", "INSTALLED"],
                rows,
            )
        else:
            out.append("No BGP peers." if bgp.get("started") else "BGP not started.")
        routes = bgp.get("routes") or {}
        if routes:
            out.append(
                f"Routes: announced {routes.get('announced', 0)},"
                f" learned {routes.get('learned', 0)}, installed {routes.get('installed', 0)}"
            )
    invalid = doc.get("invalid_objects") or []
    if invalid:
        out.append("")
        out.append(f"Invalid objects ({len(invalid)}; last good version kept):")
        out += [f"  {i.get('object')}: {i.get('error')}" for i in invalid]
    errors = doc.get("errors") or []
    if errors:
        out.append("")
        out.append("Errors:")
        out += [f"  {e}" for e in errors]
    return "\n".join(out) + "\n"


def run(args: argparse.Namespace, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        doc = fetch_status(args.url, timeout=args.timeout)
    except AgentUnreachable as e:
        print(f"felix-lite status: {e}; is the agent running on this node?", file=err)
        return 1
    if args.json:
        out.write(json.dumps(doc, indent=2) + "\n")
    else:
        out.write(format_status(doc))
    return 0
