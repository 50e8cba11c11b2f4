"""The node agent process (`felix-lite agent`) and its local view (`felix-lite status`).

- `main`: `Agent` wires informers -> cache -> coalescer -> `loop.AgentLoop` ->
  dataplane + routing; `run(args)` is the command.
- `loop`: the single programming thread; programmed generation and resourceVersions.
- `routing`: `NodeDesired` -> `felix_lite.fabric.NodeRouting` (+ exabgp.conf for the sidecar).
- `health`: /livez, /readyz, /status, /metrics servers. `metrics`: Prometheus.
- `status_cli`: `felix-lite status`.

Imports are lazy so `felix-lite --help` stays fast. See docs/agent.md.
"""

from __future__ import annotations

import argparse
from typing import Any


def _agent(args: argparse.Namespace) -> int:
    from felix_lite.agent.main import run

    return run(args)


def _status(args: argparse.Namespace) -> int:
    from felix_lite.agent.status_cli import run

    return run(args)


def register(subparsers: Any) -> None:
    """Add `agent` and `status` to felix-lite's CLI (dispatch via `handler`)."""
    p = subparsers.add_parser(
        "agent", help="run the node agent: watch the API, program policy, routes and BGP"
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="agent settings YAML (the chart's ConfigMap); default: all defaults",
    )
    p.add_argument("--node", default=None, help="node name (default: config nodeName, $NODE_NAME)")
    p.add_argument(
        "--kubeconfig",
        default=None,
        help="kubeconfig (default: config kubeconfig, else in-cluster)",
    )
    p.add_argument(
        "--no-routing",
        action="store_true",
        help="policy only: no pod routes, no BGP (tests, policy-only installs)",
    )
    p.add_argument(
        "--health-bind",
        default="127.0.0.1",
        metavar="ADDR",
        help="address of the health/status and metrics servers (default 127.0.0.1)",
    )
    p.add_argument("--health-port", type=int, default=None, help="override config healthPort")
    p.add_argument("--metrics-port", type=int, default=None, help="override config metricsPort")
    p.add_argument(
        "--secret-namespace",
        default=None,
        help="namespace of BGP password Secrets (default $POD_NAMESPACE)",
    )
    p.add_argument(
        "--max-failures",
        type=int,
        default=10,
        help="consecutive apply failures before exiting (default 10, ~1 min)",
    )
    p.set_defaults(handler=_agent)

    p = subparsers.add_parser("status", help="this node's agent: readiness, generation, BGP peers")
    p.add_argument(
        "--url",
        default="http://127.0.0.1:9099",
        help="the agent's health endpoint (default http://127.0.0.1:9099)",
    )
    p.add_argument("--json", action="store_true", help="the raw /status document")
    p.add_argument("--timeout", type=float, default=5.0)
    p.set_defaults(handler=_status)
