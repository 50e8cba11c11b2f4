"""One node with the e2e model's pods, their servers, and policy programmed via the CLI.

This is what the functional tests (and `felix-lite lab` for a single node)
stand on: a `Topology` with one node and the outside host, the model's pods
wired on it, one server process serving TCP/UDP 80 and 81 in every pod, in
the outside namespace and in the node namespace, and a `PolicyCtl` that runs
`felix-lite policy apply` inside the node namespace, exactly as a user would.
"""

from __future__ import annotations

import itertools
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from felix_lite.netlab.e2e import E2EModel
from felix_lite.netlab.matrix import Reachability
from felix_lite.netlab.nsutil import CommandRunner, run_command
from felix_lite.netlab.probe import DEFAULT_TIMEOUT, Endpoint, probe_matrix
from felix_lite.netlab.servers import ServerProcess, ServeSpec
from felix_lite.netlab.topology import PodSpec, Topology
from policy.model import Protocol

log = logging.getLogger(__name__)

NODE_ENDPOINT = "node"
OUTSIDE_ENDPOINT = "outside"


def default_cli() -> list[str]:
    """`felix-lite` run by this interpreter (same code as the console script, no shim)."""
    return [sys.executable, "-m", "felix_lite.cli"]


class PolicyCtl:
    """Programs a node's policy through `felix-lite policy apply|flush` in its netns.

    `apply` is declarative: the documents given are the whole desired state
    (Namespaces, Pods, NetworkPolicies), written to a fresh directory.
    """

    def __init__(
        self,
        node_netns: str,
        node_name: str,
        *,
        backend: str = "auto",
        workdir: Path,
        runner: CommandRunner = run_command,
        cli: Sequence[str] | None = None,
    ) -> None:
        self.netns = node_netns
        self.node = node_name
        self.backend = backend
        self.workdir = workdir
        self._run = runner
        self._cli = list(cli) if cli is not None else default_cli()
        self._seq = itertools.count(1)
        self.state_dir = workdir / "state"

    def _exec(self, args: Sequence[str]) -> str:
        return self._run(["ip", "netns", "exec", self.netns, *self._cli, *args])

    def write_docs(self, docs: Sequence[dict[str, Any]]) -> Path:
        d = self.workdir / f"apply-{next(self._seq):04d}"
        d.mkdir(parents=True)
        (d / "objects.yaml").write_text(yaml.safe_dump_all(list(docs), sort_keys=False))
        return d

    def apply(self, docs: Sequence[dict[str, Any]]) -> str:
        d = self.write_docs(docs)
        out = self._exec(
            [
                "policy",
                "apply",
                "--node",
                self.node,
                "-f",
                str(d),
                "--backend",
                self.backend,
                "--state-dir",
                str(self.state_dir),
            ]
        )
        log.info("policyctl.applied netns=%s dir=%s", self.netns, d)
        return out

    def flush(self) -> str:
        return self._exec(["policy", "flush", "--backend", self.backend])


class NodeLab:
    """A single node carrying every pod of `model`. Context manager; tears down on exit."""

    def __init__(
        self,
        prefix: str,
        model: E2EModel,
        *,
        node: str = "node-1",
        pod_cidr: str = "10.244.1.0/24",
        backend: str = "auto",
        runner: CommandRunner = run_command,
        workdir: Path | None = None,
        cli: Sequence[str] | None = None,
    ) -> None:
        self.model = model
        self.node_name = node
        self.topology = Topology(prefix, runner=runner)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"{prefix}-")
            workdir = Path(self._tmp.name)
        self.workdir = workdir
        self.servers = ServerProcess(on_pid=self.topology.register_pid)
        self.pods: dict[str, Endpoint] = {}
        try:
            nh = self.topology.add_node(node, pod_cidr=pod_cidr)
            handles = self.topology.add_pods(
                node, [PodSpec(p.namespace, p.name, p.ip) for p in model.pods if p.node == node]
            )
            self.pods = {h.key: Endpoint(h.key, h.netns, h.ip) for h in handles}
            outside = self.topology.outside
            assert outside is not None
            self.node = Endpoint(NODE_ENDPOINT, nh.netns, nh.uplink_ip)
            self.outside = Endpoint(OUTSIDE_ENDPOINT, outside.netns, outside.ip)
            self.servers.start()
            self.servers.add_all(ServeSpec(e.name, e.netns) for e in self.pods.values())
            self.servers.add(ServeSpec(NODE_ENDPOINT, nh.netns))
            self.servers.add(ServeSpec(OUTSIDE_ENDPOINT, outside.netns))
            self.policy = PolicyCtl(
                nh.netns, node, backend=backend, workdir=workdir / "policy", runner=runner, cli=cli
            )
        except BaseException:
            self.close()
            raise

    @property
    def pod_endpoints(self) -> list[Endpoint]:
        return [self.pods[k] for k in self.model.pod_keys if k in self.pods]

    def probe(
        self,
        *,
        port: int,
        protocol: Protocol | str = Protocol.TCP,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Reachability:
        eps = self.pod_endpoints
        results = probe_matrix(eps, port=port, protocol=protocol, timeout=timeout)
        return Reachability.from_results([e.name for e in eps], results)

    def close(self) -> None:
        self.servers.stop()
        self.topology.teardown()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> NodeLab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
