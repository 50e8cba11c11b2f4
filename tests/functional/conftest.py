"""Fixtures for real-kernel tests: the upstream x/y/z model on one node in namespaces.

Every namespace made here starts with `flt` and is deleted by the fixture's
finalizer (and at interpreter exit). Policy is programmed through the
`felix-lite policy apply` CLI inside the node namespace; set `FLT_CLI` (a
command line, e.g. `python /path/shim.py`) to run another CLI build.
"""

from __future__ import annotations

import itertools
import os
import shlex
import shutil
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from felix_lite.netlab import E2EModel, NodeLab, model_docs, upstream_model
from felix_lite.netlab.nodelab import default_cli

NETNS_PREFIX = "flt"
BACKENDS = ("legacy", "nft")
_BACKEND_BINARIES = {"legacy": "iptables-legacy-restore", "nft": "iptables-nft-restore"}
_seq = itertools.count(1)


def kernel_unavailable() -> str | None:
    """Why real-kernel tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "ipset", "iptables-restore"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


def backend_unavailable(backend: str) -> str | None:
    tool = _BACKEND_BINARIES[backend]
    return None if shutil.which(tool) else f"iptables backend {backend}: {tool} not installed"


def unique_prefix(role: str) -> str:
    """`flt<role><pid%100><seq>`: unique per fixture, short enough for netns names."""
    if len(role) != 1:
        raise ValueError("role: one character")
    return f"{NETNS_PREFIX}{role}{os.getpid() % 100:02d}{next(_seq)}"


def cli_command() -> list[str]:
    env = os.environ.get("FLT_CLI")
    return shlex.split(env) if env else default_cli()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = kernel_unavailable()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "kernel" in item.keywords:
            item.add_marker(skip)


def build_node_lab(model: E2EModel, *, role: str, backend: str = "auto") -> NodeLab:
    return NodeLab(unique_prefix(role), model, backend=backend, cli=cli_command())


@pytest.fixture(scope="session")
def e2e_model() -> E2EModel:
    """Namespaces x, y, z; pods a, b, c; IPs 10.244.1.2..10; all on node-1."""
    return upstream_model()


@pytest.fixture(scope="session")
def k8s_objects(e2e_model: E2EModel) -> Callable[..., list[dict[str, Any]]]:
    """`k8s_objects(pods=None, extra=())`: model Namespaces + Pods (+ extra docs)."""

    def make(
        *, pods: Sequence[str] | None = None, extra: Sequence[dict[str, Any]] = ()
    ) -> list[dict[str, Any]]:
        return [*model_docs(e2e_model, pods=pods), *extra]

    return make


@pytest.fixture
def node_lab(e2e_model: E2EModel) -> Iterator[NodeLab]:
    """A fresh node with the nine model pods and their servers; no policy programmed."""
    lab = build_node_lab(e2e_model, role="h")
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture(scope="module", params=BACKENDS)
def policy_lab(request: pytest.FixtureRequest, e2e_model: E2EModel) -> Iterator[NodeLab]:
    """One node per iptables backend, shared by a module; tests apply full state."""
    backend = str(request.param)
    reason = backend_unavailable(backend)
    if reason:
        pytest.skip(reason)
    lab = build_node_lab(e2e_model, role="p" if backend == "legacy" else "q", backend=backend)
    try:
        yield lab
    finally:
        lab.close()
