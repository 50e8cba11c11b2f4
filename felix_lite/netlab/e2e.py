"""The upstream NetworkPolicy e2e model (namespaces x, y, z; pods a, b, c) as data and YAML.

Mirrors kubernetes test/e2e/network/netpol: namespaces labelled
`ns=<name>` and `kubernetes.io/metadata.name=<name>`, pods labelled
`pod=<name>`, one container per served port with ports named
`serve-<port>-<proto>` (SCTP ones too, as upstream declares them, even
though this kernel cannot serve SCTP).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

NS_NAME_LABEL = "kubernetes.io/metadata.name"
MODEL_PORTS = (80, 81)
MODEL_PROTOCOLS = ("TCP", "UDP", "SCTP")


@dataclass(frozen=True)
class ModelPod:
    namespace: str
    name: str
    ip: str
    node: str
    labels: Mapping[str, str] = field(default_factory=dict)
    ports: tuple[tuple[int, str], ...] = tuple(
        (p, proto) for p in MODEL_PORTS for proto in MODEL_PROTOCOLS
    )

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class ModelNamespace:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class E2EModel:
    namespaces: tuple[ModelNamespace, ...]
    pods: tuple[ModelPod, ...]

    @property
    def pod_keys(self) -> list[str]:
        return [p.key for p in self.pods]

    def pod(self, key: str) -> ModelPod:
        for p in self.pods:
            if p.key == key:
                return p
        raise KeyError(f"model: pod {key}: not in model")


def upstream_model(
    *,
    namespaces: Sequence[str] = ("x", "y", "z"),
    pods: Sequence[str] = ("a", "b", "c"),
    pod_cidr: str = "10.244.1.0/24",
    nodes: Sequence[str] = ("node-1",),
) -> E2EModel:
    """Pods get consecutive IPs from `.2` of `pod_cidr`, spread round-robin over `nodes`."""
    net = ipaddress.IPv4Network(pod_cidr)
    hosts = iter(net.hosts())
    next(hosts)  # .1 stays free, like a gateway address would
    mpods: list[ModelPod] = []
    for ns in namespaces:
        for name in pods:
            try:
                ip = str(next(hosts))
            except StopIteration:
                raise ValueError(f"model: pod_cidr {pod_cidr}: too small") from None
            mpods.append(
                ModelPod(ns, name, ip, nodes[len(mpods) % len(nodes)], labels={"pod": name})
            )
    mns = tuple(ModelNamespace(n, labels={"ns": n, NS_NAME_LABEL: n}) for n in namespaces)
    return E2EModel(namespaces=mns, pods=tuple(mpods))


def namespace_doc(ns: ModelNamespace) -> dict[str, Any]:
    labels = dict(ns.labels)
    labels[NS_NAME_LABEL] = ns.name  # the apiserver always sets it
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": ns.name, "labels": labels},
    }


def pod_doc(pod: ModelPod) -> dict[str, Any]:
    containers = [
        {
            "name": f"cont-{port}-{proto.lower()}",
            "image": "registry.k8s.io/e2e-test-images/agnhost:2.43",
            "ports": [
                {"containerPort": port, "protocol": proto, "name": f"serve-{port}-{proto.lower()}"}
            ],
        }
        for port, proto in pod.ports
    ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": pod.namespace, "name": pod.name, "labels": dict(pod.labels)},
        "spec": {"nodeName": pod.node, "containers": containers},
        "status": {"phase": "Running", "podIP": pod.ip, "podIPs": [{"ip": pod.ip}]},
    }


def model_docs(model: E2EModel, *, pods: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Namespace and Pod objects of the model; `pods` limits which pods (by key)."""
    keep = None if pods is None else set(pods)
    docs = [namespace_doc(ns) for ns in model.namespaces]
    docs.extend(pod_doc(p) for p in model.pods if keep is None or p.key in keep)
    return docs
