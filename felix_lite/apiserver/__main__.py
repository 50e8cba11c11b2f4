"""`python -m felix_lite.apiserver --port P --state FILE`: the emulator as its own process.

Prints one JSON line `{"url": ..., "kubeconfig": ...}` on stdout once it
listens, so a parent (the lab) can wait for it; SIGTERM/SIGINT save the state
and exit 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from felix_lite.apiserver.server import ApiServer, write_kubeconfig
from felix_lite.apiserver.store import Store

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m felix_lite.apiserver",
        description="Kubernetes API emulator (felix-lite lab)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port (default: any free port)")
    p.add_argument("--state", metavar="FILE", help="JSON file to load from and save to")
    p.add_argument("--kubeconfig", metavar="FILE", help="write a kubeconfig for this server")
    p.add_argument(
        "--max-events",
        type=int,
        default=1000,
        help="events kept for watch resumption (default 1000)",
    )
    p.add_argument(
        "--bookmark-interval",
        type=float,
        default=60.0,
        help="seconds between watch bookmarks (default 60)",
    )
    p.add_argument(
        "--no-strict-status",
        action="store_true",
        help="keep status sent on create/update of the main resource",
    )
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    opts = {"max_events": args.max_events, "strict_status": not args.no_strict_status}
    if args.state:
        from pathlib import Path

        state = Path(args.state)
        store = Store.load(state, **opts) if state.exists() else Store(**opts)
    else:
        store = Store(**opts)
    server = ApiServer(
        store,
        host=args.host,
        port=args.port,
        state_path=args.state,
        bookmark_interval=args.bookmark_interval,
    )
    done = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("apiserver.signal signum=%d", signum)
        done.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    server.start()
    if args.kubeconfig:
        write_kubeconfig(args.kubeconfig, server.url)
    print(json.dumps({"url": server.url, "kubeconfig": args.kubeconfig}), flush=True)
    try:
        done.wait()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
