"""Fixtures for the fabric e2e tests: labs in namespaces named `flf*`, torn down on every path.

A lab is a `FabricLab` (felix_lite/fabric/topology.py): a real ToR router (or a
node-to-node mesh), real ExaBGP per node, pods through the real CNI plugin.
Helpers here watch traffic (a continuous prober, a tcpdump capture), started
and stopped by PID.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from felix_lite.fabric.routers import router_available
from felix_lite.fabric.topology import FabricLab, FabricSpec
from felix_lite.netlab.probe import Endpoint, probe_one
from felix_lite.procs import stop_procs

NETNS_PREFIX = "flf"
_seq = itertools.count(1)


def fabric_unavailable(router: str | None = None) -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "exabgp", "felix-lite-cni", "tcpdump"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return router_available(router) if router else None


def unique_prefix() -> str:
    """`flf<pid%100><seq>`: at most 8 characters, so derived names stay <= 15."""
    return f"{NETNS_PREFIX}{os.getpid() % 100:02d}{next(_seq)}"


def make_lab(tmp: Path, spec: FabricSpec, request: pytest.FixtureRequest) -> FabricLab:
    lab = FabricLab(unique_prefix(), tmp, spec)
    request.addfinalizer(lab.teardown)
    lab.build(wait=45)
    return lab


@dataclass
class ContinuousProbe:
    """TCP connects from src to dst every `interval` on a thread; counts failures."""

    src: Endpoint
    dst: Endpoint
    port: int = 80
    interval: float = 0.05
    attempts: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            r = probe_one(self.src, self.dst, port=self.port, protocol="TCP", timeout=1.0)
            self.attempts += 1
            if not r.connected:
                self.failures.append(f"{time.monotonic():.3f} {r.detail}")
            self._stop.wait(self.interval)

    def __enter__(self) -> ContinuousProbe:
        self._thread = threading.Thread(target=self._run, name="cont-probe", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


@contextlib.contextmanager
def capture(netns: str, iface: str, bpf: str, out: Path) -> Iterator[Path]:
    """tcpdump -nn on `iface` inside `netns`; yields the text file it writes."""
    err = out.with_suffix(".err")
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, "tcpdump", "-l", "-nn", "-i", iface, bpf],
            stdout=fo,
            stderr=fe,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 10
        while "listening on" not in err.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tcpdump in {netns}: {err.read_text()}")
            time.sleep(0.05)
        yield out
    finally:
        stop_procs([proc], sig=signal.SIGINT, timeout=5)
