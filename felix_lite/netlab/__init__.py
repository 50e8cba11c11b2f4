"""Network-namespace lab harness: topology, pod servers, prober, e2e model.

Used by the functional tests (tests/functional) and reusable by
`felix-lite lab`. Modules:

- `nsutil`: enter a netns on a thread, sockets and sysctls inside a netns, `ip` runner.
- `topology`: node / pod / outside namespaces wired as docs/policy-dataplane.md says.
- `servers`: one process serving TCP+UDP 80/81 in every pod.
- `probe`: concurrent connectivity probes (matrix, one, from node/outside).
- `matrix`: upstream-style reachability tables and grids.
- `e2e`: the upstream x/y/z a/b/c model and its Kubernetes YAML.
- `nodelab`: one node with the model's pods, servers and the policy CLI.

Safety: every namespace is created with the caller's prefix, both ends of
every veth are born inside namespaces, nothing is done in the root namespace.
"""

from felix_lite.netlab.e2e import E2EModel, ModelPod, model_docs, upstream_model
from felix_lite.netlab.matrix import Mismatch, Reachability
from felix_lite.netlab.nodelab import NodeLab, PolicyCtl
from felix_lite.netlab.probe import (
    Endpoint,
    ProbeResult,
    ProtocolUnsupported,
    open_connection,
    probe_matrix,
    probe_one,
    probe_pairs,
)
from felix_lite.netlab.servers import ServerProcess, ServeSpec
from felix_lite.netlab.topology import NodeHandle, PodHandle, PodSpec, Topology

__all__ = [
    "E2EModel",
    "Endpoint",
    "Mismatch",
    "ModelPod",
    "NodeHandle",
    "NodeLab",
    "PodHandle",
    "PodSpec",
    "PolicyCtl",
    "ProbeResult",
    "ProtocolUnsupported",
    "Reachability",
    "ServeSpec",
    "ServerProcess",
    "Topology",
    "model_docs",
    "open_connection",
    "probe_matrix",
    "probe_one",
    "probe_pairs",
    "upstream_model",
]
