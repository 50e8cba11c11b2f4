"""`felix-lite lab`: a whole cluster in network namespaces on one machine.

A ToR router namespace (BIRD, FRR or GoBGP), N node namespaces each running
the real agent and ExaBGP sidecar, pods wired by the real CNI plugin, and the
API emulator in a "control plane" namespace the agents watch over the lab
network. The verbs, flags and JSON shapes are a contract (DESIGN.md "The
lab"); see docs/lab.md.

- `state`: the state file (every namespace and PID, written as created).
- `cluster`: `Lab` -- up, kubelet (pods), apply/delete with waits, probe, status, down.
- `kube`: a small REST client that reaches the emulator inside its namespace.
- `podserver`, `gobgpfeed`: the lab's detached helper processes.
- `cli`: the verbs and their output; `demo`.

This module stays import-light: `python -m felix_lite.lab.podserver` runs
once per pod.
"""

from __future__ import annotations

from typing import Any


def register(subparsers: Any) -> None:
    """Add `lab` and its verbs to felix-lite's CLI (each with a `handler`)."""
    from felix_lite.lab.cli import register as _register

    _register(subparsers)
