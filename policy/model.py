"""Typed, frozen model of the cluster objects the policy compiler reads.

Everything here is a hashable value so compiled fragments can be memoised on
their inputs. Parsing from Kubernetes YAML/dicts lives in `policy.parse`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NewType

PodKey = NewType("PodKey", str)
"""`<namespace>/<name>` of a pod."""

PolicyKey = NewType("PolicyKey", str)
"""`<namespace>/<name>` of a NetworkPolicy."""


class Protocol(StrEnum):
    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"


class PolicyType(StrEnum):
    INGRESS = "Ingress"
    EGRESS = "Egress"


class Operator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


class Labels(Mapping[str, str]):
    """An immutable, hashable label map (a frozen dict)."""

    __slots__ = ("_d", "_hash")

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        self._d: dict[str, str] = dict(items)
        self._hash: int | None = None

    def __getitem__(self, key: str) -> str:
        return self._d[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: object) -> bool:
        return key in self._d

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._d.items()))
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Labels):
            return self._d == other._d
        if isinstance(other, Mapping):
            return self._d == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"Labels({self._d!r})"


def pod_key(namespace: str, name: str) -> PodKey:
    return PodKey(f"{namespace}/{name}")


def policy_key(namespace: str, name: str) -> PolicyKey:
    return PolicyKey(f"{namespace}/{name}")


@dataclass(frozen=True)
class Requirement:
    """One `matchExpressions` entry; `values` is sorted for a canonical form."""

    key: str
    operator: Operator
    values: tuple[str, ...] = ()


@dataclass(frozen=True)
class LabelSelector:
    """A metav1.LabelSelector. The empty selector selects everything."""

    match_labels: Labels = field(default_factory=Labels)
    match_expressions: tuple[Requirement, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.match_labels and not self.match_expressions


@dataclass(frozen=True)
class IPBlock:
    cidr: str
    except_: tuple[str, ...] = ()


@dataclass(frozen=True)
class Peer:
    """A NetworkPolicyPeer: exactly one of (selectors) or ip_block is set.

    `namespace_selector=None` with a pod selector means the policy's own
    namespace; `pod_selector=None` with a namespace selector means all pods
    of the selected namespaces.
    """

    pod_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    ip_block: IPBlock | None = None


@dataclass(frozen=True)
class PolicyPort:
    """A NetworkPolicyPort. `port=None` means every port of `protocol`;
    a `str` port is a named container port resolved on the destination pod."""

    protocol: Protocol = Protocol.TCP
    port: int | str | None = None
    end_port: int | None = None


@dataclass(frozen=True)
class Rule:
    """An ingress or egress rule. Empty `peers` matches every peer; empty
    `ports` matches every port (both are unions of their entries)."""

    peers: tuple[Peer, ...] = ()
    ports: tuple[PolicyPort, ...] = ()


@dataclass(frozen=True)
class NetworkPolicy:
    namespace: str
    name: str
    pod_selector: LabelSelector
    policy_types: frozenset[PolicyType]
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()

    @property
    def key(self) -> PolicyKey:
        return policy_key(self.namespace, self.name)


@dataclass(frozen=True)
class ContainerPort:
    port: int
    protocol: Protocol = Protocol.TCP
    name: str | None = None


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    labels: Labels = field(default_factory=Labels)
    node: str | None = None
    ip: str | None = None
    ports: tuple[ContainerPort, ...] = ()
    host_network: bool = False

    @property
    def key(self) -> PodKey:
        return pod_key(self.namespace, self.name)


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: Labels = field(default_factory=Labels)


@dataclass(frozen=True)
class ClusterState:
    """The policy-relevant slice of a cluster, as the compiler sees it."""

    namespaces: Mapping[str, Namespace] = field(default_factory=dict)
    pods: Mapping[PodKey, Pod] = field(default_factory=dict)
    policies: Mapping[PolicyKey, NetworkPolicy] = field(default_factory=dict)
