"""`felix-lite` command line: the user-facing entry to every subsystem.

Subcommands import their machinery lazily so `felix-lite --help` and the
hot `policy apply` path stay fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from felix_lite import __version__

log = logging.getLogger(__name__)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


def _add_files(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-f",
        "--filename",
        dest="files",
        action="append",
        required=True,
        metavar="FILE|DIR",
        help="YAML file or directory of Namespaces, Pods, NetworkPolicies",
    )


def _add_backend(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        choices=("auto", "legacy", "nft"),
        default="auto",
        help="iptables backend (default: detect as kube-proxy does)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="felix-lite", description="Calico-style pure-L3 networking for Kubernetes"
    )
    parser.add_argument("--version", action="version", version=f"felix-lite {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", required=True)

    pol = sub.add_parser("policy", help="NetworkPolicy engine: render, apply, explain, flush")
    psub = pol.add_subparsers(dest="policy_command", required=True)

    p = psub.add_parser("render", help="print what would be programmed on NODE; touches nothing")
    p.add_argument("--node", required=True)
    _add_files(p)
    p.add_argument(
        "--format",
        choices=("human", "restore", "json"),
        default="human",
        help="human summary, the ipset/iptables-restore payload, or JSON",
    )

    p = psub.add_parser("apply", help="program NODE's policy into the current network namespace")
    p.add_argument("--node", required=True)
    _add_files(p)
    _add_backend(p)
    p.add_argument(
        "--state-dir",
        default=None,
        help="where the last good objects are kept (default /run/felix-lite/netns-<inode>)",
    )

    p = psub.add_parser("explain", help="the verdict for one connection, and which rules decided")
    p.add_argument("--from", dest="src", required=True, metavar="NS/POD|IP")
    p.add_argument("--to", dest="dst", required=True, metavar="NS/POD|IP")
    p.add_argument("--port", type=int, required=True)
    p.add_argument(
        "--protocol", default="tcp", choices=("tcp", "udp", "sctp", "TCP", "UDP", "SCTP")
    )
    p.add_argument("--json", action="store_true")
    _add_files(p)

    p = psub.add_parser("flush", help="remove every felix-lite chain, set and hook rule here")
    _add_backend(p)

    p = psub.add_parser("stats", help="per-rule packet counters of felix-lite chains here")
    _add_backend(p)
    p.add_argument("--json", action="store_true")

    p = psub.add_parser(
        "demo", help="one node in network namespaces: probe, apply examples/policies, probe again"
    )
    _add_backend(p)
    p.add_argument("--port", type=int, default=80)
    p.add_argument("--policies", default=None, metavar="DIR", help="default: examples/policies")

    from felix_lite import agent, lab
    from felix_lite.fabric import sidecar

    agent.register(sub)
    lab.register(sub)
    sidecar.register(sub)
    return parser


def own_bin_dir_on_path() -> None:
    """Tools this package installs (felix-lite-cni, exabgp, the bridge) sit next to
    the interpreter; a venv's bin/ need not be on PATH, so children find them here."""
    here = os.path.dirname(sys.executable)
    parts = os.environ.get("PATH", "").split(os.pathsep)
    if here not in parts:
        os.environ["PATH"] = os.pathsep.join([here, *parts])


def main(argv: Sequence[str] | None = None) -> int:
    own_bin_dir_on_path()
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    handler = getattr(args, "handler", None)
    try:
        if handler is not None:
            return int(handler(args))
        if args.command == "policy":
            from felix_lite import policy_cli

            return policy_cli.run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # the CLI's last line of defence: one clear line, not a traceback
        if args.log_level.upper() == "DEBUG":
            raise
        print(f"felix-lite: error: {e}", file=sys.stderr)
        return 1
    parser.error("unknown command")
    return 2


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    sys.exit(main())
