"""Detached GoBGP -> kernel feeder for the lab's ToR namespace.

GoBGP installs no routes (LAB-NOTES), and `fabric.routers.GobgpRouter` feeds
the kernel from a thread of the process that started it; the lab's `up`
exits, so the lab runs the same feed as its own process inside the ToR
namespace: `gobgp monitor global rib --current -j` -> `ip -force -batch -`.
SIGTERM stops both children (by PID) and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import Sequence
from types import FrameType
from typing import IO

FEED_PROTO = 17  # the same protocol number fabric.routers uses for fed routes


def commands(line: str) -> list[str]:
    """`ip -batch` lines for one JSON line of `gobgp monitor global rib -j`."""
    try:
        paths = json.loads(line)
    except json.JSONDecodeError:
        return []
    out = []
    for path in paths if isinstance(paths, list) else []:
        if not isinstance(path, dict):
            continue
        prefix = (path.get("nlri") or {}).get("prefix")
        if not prefix:
            continue
        nh = next((a.get("nexthop") for a in path.get("attrs", []) if a.get("type") == 3), None)
        if path.get("withdrawal"):
            out.append(f"route del {prefix} proto {FEED_PROTO}\n")
        elif nh and nh != "0.0.0.0":
            out.append(f"route replace {prefix} via {nh} proto {FEED_PROTO}\n")
    return out


def feed(inp: IO[str], out: IO[str]) -> None:
    for line in inp:
        cmds = commands(line)
        if cmds:
            out.write("".join(cmds))
            out.flush()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m felix_lite.lab.gobgpfeed")
    p.add_argument("--api-port", type=int, default=50051)
    args = p.parse_args(argv)
    ip = subprocess.Popen(
        ["ip", "-force", "-batch", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    mon = subprocess.Popen(
        ["gobgp", "-p", str(args.api_port), "monitor", "global", "rib", "--current", "-j"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )

    def _bye(_signum: int, _frame: FrameType | None) -> None:
        for child in (mon, ip):
            with contextlib.suppress(OSError):
                child.kill()
        sys.exit(0)

    signal.signal(signal.SIGTERM, _bye)
    assert mon.stdout is not None and ip.stdin is not None
    try:
        feed(mon.stdout, ip.stdin)
    finally:
        for child in (mon, ip):
            with contextlib.suppress(OSError):
                child.kill()
    return 1  # the monitor ended: let the lab see a dead feeder


if __name__ == "__main__":
    sys.exit(main())
