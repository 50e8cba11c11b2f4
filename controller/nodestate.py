"""This node's desired state, computed from the cache's current values.

`NodeState.apply(changes)` feeds what changed (Key -> value or None) into a
`policy.compiler.Compiler` incrementally (only those objects), and records
nodes, BGP objects and secrets; `desired()` returns a frozen `NodeDesired`
whose `generation` increases whenever any part of it differs from the last
one returned, so the agent can publish "programmed generation N".

The converters here turn Node, BGPPeer, BGPConfiguration and Secret objects
into small frozen values (field names follow controller/crds/*.yaml); errors
name the object and field like the policy parser's do. No I/O happens here:
Secrets arrive through an informer like everything else.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from controller.cache import Converter, Key, Kind
from policy.compiler import Compiler
from policy.model import (
    Labels,
    LabelSelector,
    Namespace,
    NetworkPolicy,
    Operator,
    Pod,
    PodKey,
    Requirement,
    pod_key,
    policy_key,
)
from policy.parse import parse_namespace, parse_network_policy, parse_pod
from policy.ruleset import Ruleset
from policy.selectors import matches

log = logging.getLogger(__name__)

_T = TypeVar("_T")

AS_NUMBER_ANNOTATION = "felixlite.io/as-number"
DEFAULT_ASN = 64512
"""Node ASN when no BGPConfiguration sets one (Calico's default)."""
DEFAULT_CONFIGURATION = "default"
DEFAULT_MULTIHOP_TTL = 255
_MAX_ASN = 4294967295


class ObjectError(ValueError):
    """An invalid Node/BGPPeer/BGPConfiguration/Secret, naming object and field."""

    def __init__(self, kind: Kind, name: str, *, field: str, message: str) -> None:
        self.kind = kind
        self.name = name
        self.field = field
        self.message = message
        super().__init__(f"{kind.value} {name}: {field}: {message}")


# ---------------------------------------------------------------- values


@dataclass(frozen=True)
class NodeInfo:
    name: str
    labels: Labels = field(default_factory=Labels)
    internal_ip: str | None = None
    pod_cidr: str | None = None
    asn: int | None = None  # the per-node override (annotation)


@dataclass(frozen=True)
class SecretRef:
    name: str
    key: str


@dataclass(frozen=True)
class BGPPeerSpec:
    name: str
    peer_ip: str
    asn: int
    node: str | None = None
    node_selector: LabelSelector | None = None
    password: SecretRef | None = None
    multihop: int | None = None  # TTL; None: directly connected
    graceful_restart: int | None = None
    hold_time: int | None = None
    max_prefix: int | None = None


@dataclass(frozen=True)
class BGPConfig:
    name: str
    asn: int | None = None
    node_to_node_mesh: bool = True
    pod_cidrs: tuple[str, ...] = ()
    export_cidrs: tuple[str, ...] | None = None  # None: podCIDRs
    import_cidrs: tuple[str, ...] | None = None  # None: podCIDRs
    aggregate: bool = False


@dataclass(frozen=True)
class SecretData:
    namespace: str
    name: str
    data: Mapping[str, str] = field(default_factory=dict, repr=False, hash=False)


@dataclass(frozen=True)
class BGPPeerDesired:
    address: str
    asn: int
    password: str | None = field(default=None, repr=False)
    multihop: int | None = None
    graceful_restart: int | None = None
    hold_time: int | None = None
    max_prefix: int | None = None
    source: str = ""  # "bgppeer/NAME" or "mesh/NODE"


@dataclass(frozen=True)
class BGPDesired:
    local_asn: int
    router_id: str | None
    peers: tuple[BGPPeerDesired, ...] = ()
    mesh: bool = True
    pod_cidrs: tuple[str, ...] = ()
    import_cidrs: tuple[str, ...] = ()
    export_cidrs: tuple[str, ...] = ()
    node_block: str | None = None
    aggregate: bool = False


@dataclass(frozen=True)
class NodeDesired:
    node: str
    generation: int
    in_sync: bool
    ruleset: Ruleset
    local_pods: tuple[Pod, ...]
    bgp: BGPDesired


# ------------------------------------------------------------ converters


class _Reader:
    def __init__(self, kind: Kind, name: str) -> None:
        self.kind, self.name = kind, name

    def fail(self, path: str, message: str) -> ObjectError:
        return ObjectError(self.kind, self.name, field=path, message=message)

    def mapping(self, value: Any, path: str) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(path, f"must be an object, not {type(value).__name__}")
        return value

    def string(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise self.fail(path, f"must be a string, not {type(value).__name__}")
        return value

    def integer(self, value: Any, path: str, *, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(path, f"must be an integer, not {type(value).__name__}")
        if not lo <= value <= hi:
            raise self.fail(path, f"must be between {lo} and {hi}, not {value}")
        return value

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(path, f"must be a boolean, not {type(value).__name__}")
        return value

    def ipv4(self, value: Any, path: str) -> str:
        text = self.string(value, path)
        try:
            return str(ipaddress.IPv4Address(text))
        except ValueError:
            raise self.fail(path, f"invalid IPv4 address {text!r}") from None

    def cidr(self, value: Any, path: str) -> str:
        text = self.string(value, path)
        try:
            return str(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise self.fail(path, f"invalid CIDR {text!r}") from None

    def cidrs(self, value: Any, path: str) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise self.fail(path, f"must be a list, not {type(value).__name__}")
        return tuple(self.cidr(v, f"{path}[{i}]") for i, v in enumerate(value))

    def labels(self, value: Any, path: str) -> Labels:
        m = self.mapping(value, path)
        for k, v in m.items():
            if not isinstance(v, str):
                raise self.fail(f"{path}[{k}]", f"must be a string, not {type(v).__name__}")
        return Labels({str(k): v for k, v in m.items()})

    def selector(self, value: Any, path: str) -> LabelSelector:
        m = self.mapping(value, path)
        exprs: list[Requirement] = []
        raw_exprs = m.get("matchExpressions") or []
        if not isinstance(raw_exprs, list):
            raise self.fail(f"{path}.matchExpressions", "must be a list")
        for i, raw in enumerate(raw_exprs):
            p = f"{path}.matchExpressions[{i}]"
            e = self.mapping(raw, p)
            key = self.string(e.get("key"), f"{p}.key")
            op_text = self.string(e.get("operator"), f"{p}.operator")
            try:
                op = Operator(op_text)
            except ValueError:
                raise self.fail(f"{p}.operator", f"unsupported operator {op_text!r}") from None
            raw_values = e.get("values") or []
            if not isinstance(raw_values, list):
                raise self.fail(f"{p}.values", "must be a list")
            values = tuple(
                sorted(self.string(v, f"{p}.values[{j}]") for j, v in enumerate(raw_values))
            )
            if op in (Operator.IN, Operator.NOT_IN) and not values:
                raise self.fail(f"{p}.values", f"must be non-empty for operator {op.value}")
            if op in (Operator.EXISTS, Operator.DOES_NOT_EXIST) and values:
                raise self.fail(f"{p}.values", f"must be empty for operator {op.value}")
            exprs.append(Requirement(key=key, operator=op, values=values))
        return LabelSelector(
            match_labels=self.labels(m.get("matchLabels"), f"{path}.matchLabels"),
            match_expressions=tuple(exprs),
        )


def _name(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, Mapping) else None
    return name if isinstance(name, str) else "<unnamed>"


def parse_node(obj: Mapping[str, Any]) -> NodeInfo:
    name = _name(obj)
    r = _Reader(Kind.NODE, name)
    meta = r.mapping(obj.get("metadata"), "metadata")
    annotations = r.mapping(meta.get("annotations"), "metadata.annotations")
    asn: int | None = None
    raw_asn = annotations.get(AS_NUMBER_ANNOTATION)
    if raw_asn is not None:
        path = f"metadata.annotations[{AS_NUMBER_ANNOTATION}]"
        text = r.string(raw_asn, path).strip()
        if not text.isdigit():
            raise r.fail(path, f"must be a decimal AS number, not {text!r}")
        asn = r.integer(int(text), path, lo=1, hi=_MAX_ASN)
    spec = r.mapping(obj.get("spec"), "spec")
    pod_cidr = r.cidr(spec["podCIDR"], "spec.podCIDR") if spec.get("podCIDR") else None
    status = r.mapping(obj.get("status"), "status")
    internal_ip: str | None = None
    addresses = status.get("addresses") or []
    if not isinstance(addresses, list):
        raise r.fail("status.addresses", "must be a list")
    for i, raw in enumerate(addresses):
        a = r.mapping(raw, f"status.addresses[{i}]")
        if a.get("type") != "InternalIP":
            continue
        text = r.string(a.get("address"), f"status.addresses[{i}].address")
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            raise r.fail(f"status.addresses[{i}].address", f"invalid IP {text!r}") from None
        if ip.version == 4:
            internal_ip = str(ip)
            break
    return NodeInfo(
        name=name,
        labels=r.labels(meta.get("labels"), "metadata.labels"),
        internal_ip=internal_ip,
        pod_cidr=pod_cidr,
        asn=asn,
    )


def parse_bgp_peer(obj: Mapping[str, Any]) -> BGPPeerSpec:
    name = _name(obj)
    r = _Reader(Kind.BGP_PEER, name)
    if obj.get("spec") is None:
        raise r.fail("spec", "required")
    spec = r.mapping(obj.get("spec"), "spec")
    if spec.get("peerIP") is None:
        raise r.fail("spec.peerIP", "required")
    if spec.get("asNumber") is None:
        raise r.fail("spec.asNumber", "required")
    node = r.string(spec["node"], "spec.node") if spec.get("node") else None
    selector = None
    if spec.get("nodeSelector") is not None:
        if node is not None:
            raise r.fail("spec.nodeSelector", "must not be set together with spec.node")
        selector = r.selector(spec["nodeSelector"], "spec.nodeSelector")
    password = None
    if spec.get("passwordSecretRef") is not None:
        ref = r.mapping(spec["passwordSecretRef"], "spec.passwordSecretRef")
        password = SecretRef(
            name=r.string(ref.get("name"), "spec.passwordSecretRef.name"),
            key=r.string(ref.get("key"), "spec.passwordSecretRef.key"),
        )
    multihop = None
    if spec.get("multihop") is not None:
        mh = r.mapping(spec["multihop"], "spec.multihop")
        multihop = (
            r.integer(mh["ttl"], "spec.multihop.ttl", lo=1, hi=255)
            if mh.get("ttl") is not None
            else DEFAULT_MULTIHOP_TTL
        )
    hold = None
    if spec.get("holdTime") is not None:
        hold = r.integer(spec["holdTime"], "spec.holdTime", lo=0, hi=65535)
        if 0 < hold < 3:
            raise r.fail("spec.holdTime", f"must be 0 or between 3 and 65535, not {hold}")

    def opt_int(f: str, lo: int, hi: int) -> int | None:
        v = spec.get(f)
        return None if v is None else r.integer(v, f"spec.{f}", lo=lo, hi=hi)

    return BGPPeerSpec(
        name=name,
        peer_ip=r.ipv4(spec["peerIP"], "spec.peerIP"),
        asn=r.integer(spec["asNumber"], "spec.asNumber", lo=1, hi=_MAX_ASN),
        node=node,
        node_selector=selector,
        password=password,
        multihop=multihop,
        graceful_restart=opt_int("gracefulRestartSeconds", 0, 4095),
        hold_time=hold,
        max_prefix=opt_int("maxPrefix", 1, 2**31 - 1),
    )


def parse_bgp_configuration(obj: Mapping[str, Any]) -> BGPConfig:
    name = _name(obj)
    r = _Reader(Kind.BGP_CONFIGURATION, name)
    spec = r.mapping(obj.get("spec"), "spec")
    mesh = spec.get("nodeToNodeMesh")
    aggregate = spec.get("aggregate")
    return BGPConfig(
        name=name,
        asn=(
            r.integer(spec["asNumber"], "spec.asNumber", lo=1, hi=_MAX_ASN)
            if spec.get("asNumber") is not None
            else None
        ),
        node_to_node_mesh=True if mesh is None else r.boolean(mesh, "spec.nodeToNodeMesh"),
        pod_cidrs=r.cidrs(spec.get("podCIDRs") or [], "spec.podCIDRs"),
        export_cidrs=(
            r.cidrs(spec["exportCIDRs"], "spec.exportCIDRs")
            if spec.get("exportCIDRs") is not None
            else None
        ),
        import_cidrs=(
            r.cidrs(spec["importCIDRs"], "spec.importCIDRs")
            if spec.get("importCIDRs") is not None
            else None
        ),
        aggregate=False if aggregate is None else r.boolean(aggregate, "spec.aggregate"),
    )


def parse_secret(obj: Mapping[str, Any]) -> SecretData:
    name = _name(obj)
    r = _Reader(Kind.SECRET, name)
    meta = r.mapping(obj.get("metadata"), "metadata")
    out: dict[str, str] = {}
    for k, v in r.mapping(obj.get("data"), "data").items():
        try:
            out[str(k)] = base64.b64decode(r.string(v, f"data[{k}]"), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise r.fail(f"data[{k}]", "not base64-encoded UTF-8 text") from None
    for k, v in r.mapping(obj.get("stringData"), "stringData").items():
        out[str(k)] = r.string(v, f"stringData[{k}]")
    return SecretData(namespace=str(meta.get("namespace") or ""), name=name, data=out)


def converters() -> dict[Kind, Converter]:
    """Every watched kind's converter (PolicyError and ObjectError are ValueErrors)."""
    return {
        Kind.NAMESPACE: parse_namespace,
        Kind.POD: parse_pod,
        Kind.NETWORK_POLICY: parse_network_policy,
        Kind.NODE: parse_node,
        Kind.BGP_PEER: parse_bgp_peer,
        Kind.BGP_CONFIGURATION: parse_bgp_configuration,
        Kind.SECRET: parse_secret,
    }


# ------------------------------------------------------------ node state


def _is_local(pod: Pod, node: str) -> bool:
    return pod.node == node and pod.ip is not None and not pod.host_network


class NodeState:
    """Incremental calculation of one node's `NodeDesired` from cache changes."""

    def __init__(
        self,
        node: str,
        *,
        secret_namespace: str,
        compiler: Compiler | None = None,
        default_asn: int = DEFAULT_ASN,
    ) -> None:
        self.node = node
        self.secret_namespace = secret_namespace
        self.default_asn = default_asn
        self._compiler = compiler if compiler is not None else Compiler(node)
        self._local: dict[PodKey, Pod] = {}
        self._nodes: dict[str, NodeInfo] = {}
        self._peers: dict[str, BGPPeerSpec] = {}
        self._configs: dict[str, BGPConfig] = {}
        self._secrets: dict[str, SecretData] = {}
        self._local_dirty = True
        self._bgp_dirty = True
        self._local_pods: tuple[Pod, ...] = ()
        self._bgp: BGPDesired | None = None
        self._last: NodeDesired | None = None
        self._generation = 0
        self._problems: frozenset[str] = frozenset()

    @property
    def generation(self) -> int:
        return self._generation

    def apply(self, changes: Mapping[Key, object | None]) -> None:
        """Feed changed keys (value None: gone) into the calculation."""
        for key, value in changes.items():
            kind = key.kind
            if kind is Kind.NAMESPACE:
                if isinstance(value, Namespace):
                    self._compiler.set_namespace(value)
                else:
                    self._compiler.remove_namespace(key.name)
            elif kind is Kind.POD:
                self._apply_pod(key, value)
            elif kind is Kind.NETWORK_POLICY:
                if isinstance(value, NetworkPolicy):
                    self._compiler.set_policy(value)
                else:
                    self._compiler.remove_policy(policy_key(key.namespace or "", key.name))
            elif kind is Kind.NODE:
                self._bgp_dirty |= _put(self._nodes, key.name, value, NodeInfo)
            elif kind is Kind.BGP_PEER:
                self._bgp_dirty |= _put(self._peers, key.name, value, BGPPeerSpec)
            elif kind is Kind.BGP_CONFIGURATION:
                self._bgp_dirty |= _put(self._configs, key.name, value, BGPConfig)
            elif kind is Kind.SECRET and key.namespace == self.secret_namespace:
                self._bgp_dirty |= _put(self._secrets, key.name, value, SecretData)

    def _apply_pod(self, key: Key, value: object | None) -> None:
        pkey = pod_key(key.namespace or "", key.name)
        if isinstance(value, Pod):
            self._compiler.set_pod(value)
            local = _is_local(value, self.node)
        else:
            self._compiler.remove_pod(pkey)
            local = False
        old = self._local.get(pkey)
        if local:
            assert isinstance(value, Pod)
            if old != value:
                self._local[pkey] = value
                self._local_dirty = True
        elif old is not None:
            del self._local[pkey]
            self._local_dirty = True

    def desired(self, *, in_sync: bool = True) -> NodeDesired:
        """The current desired state; a new generation iff something differs."""
        ruleset = self._compiler.ruleset()
        if self._local_dirty:
            self._local_pods = tuple(self._local[k] for k in sorted(self._local))
            self._local_dirty = False
        if self._bgp_dirty or self._bgp is None:
            self._bgp = self._compute_bgp()
            self._bgp_dirty = False
        last = self._last
        if (
            last is not None
            and last.in_sync == in_sync
            and (last.ruleset is ruleset or last.ruleset == ruleset)
            and last.local_pods == self._local_pods
            and last.bgp == self._bgp
        ):
            return last
        self._generation += 1
        self._last = NodeDesired(
            node=self.node,
            generation=self._generation,
            in_sync=in_sync,
            ruleset=ruleset,
            local_pods=self._local_pods,
            bgp=self._bgp,
        )
        log.debug(
            "nodestate.generation node=%s generation=%d local_pods=%d peers=%d",
            self.node,
            self._generation,
            len(self._local_pods),
            len(self._bgp.peers),
        )
        return self._last

    # ---- BGP

    def _compute_bgp(self) -> BGPDesired:
        me = self._nodes.get(self.node)
        cfg = self._configs.get(DEFAULT_CONFIGURATION) or BGPConfig(DEFAULT_CONFIGURATION)
        default_asn = cfg.asn or self.default_asn

        def asn_of(n: NodeInfo | None) -> int:
            return n.asn if n is not None and n.asn is not None else default_asn

        router_id = me.internal_ip if me is not None else None
        problems: set[str] = set()
        peers: dict[str, BGPPeerDesired] = {}
        for name in sorted(self._peers):
            p = self._peers[name]
            if not self._selects(p, me):
                continue
            if p.peer_ip == router_id:
                continue  # a global peer that is this node itself
            if p.peer_ip in peers:
                problems.add(
                    f"bgppeer.duplicate peer={name} address={p.peer_ip} "
                    f"kept={peers[p.peer_ip].source}"
                )
                continue
            password = None
            if p.password is not None:
                password = self._password(p.password)
                if password is None:
                    problems.add(
                        f"bgppeer.secret-missing peer={name} "
                        f"secret={self.secret_namespace}/{p.password.name} key={p.password.key}"
                    )
                    continue  # no session beats one without its MD5 key
            peers[p.peer_ip] = BGPPeerDesired(
                address=p.peer_ip,
                asn=p.asn,
                password=password,
                multihop=p.multihop,
                graceful_restart=p.graceful_restart,
                hold_time=p.hold_time,
                max_prefix=p.max_prefix,
                source=f"bgppeer/{name}",
            )
        if cfg.node_to_node_mesh:
            for name in sorted(self._nodes):
                n = self._nodes[name]
                ip = n.internal_ip
                if name == self.node or ip is None or ip == router_id or ip in peers:
                    continue
                peers[ip] = BGPPeerDesired(address=ip, asn=asn_of(n), source=f"mesh/{name}")
        self._report(frozenset(problems))
        return BGPDesired(
            local_asn=asn_of(me),
            router_id=router_id,
            peers=tuple(peers[a] for a in sorted(peers, key=ipaddress.IPv4Address)),
            mesh=cfg.node_to_node_mesh,
            pod_cidrs=cfg.pod_cidrs,
            import_cidrs=cfg.import_cidrs if cfg.import_cidrs is not None else cfg.pod_cidrs,
            export_cidrs=cfg.export_cidrs if cfg.export_cidrs is not None else cfg.pod_cidrs,
            node_block=me.pod_cidr if me is not None else None,
            aggregate=cfg.aggregate,
        )

    def _selects(self, p: BGPPeerSpec, me: NodeInfo | None) -> bool:
        if p.node is not None:
            return p.node == self.node
        if p.node_selector is not None:
            return me is not None and matches(p.node_selector, me.labels)
        return True

    def _password(self, ref: SecretRef) -> str | None:
        secret = self._secrets.get(ref.name)
        return None if secret is None else secret.data.get(ref.key)

    def _report(self, problems: frozenset[str]) -> None:
        for p in sorted(problems - self._problems):
            log.warning("controller.%s node=%s", p, self.node)
        self._problems = problems


def _put(d: dict[str, _T], name: str, value: object | None, cls: type[_T]) -> bool:
    """Store or remove; True when the map changed."""
    if isinstance(value, cls):
        if d.get(name) == value:
            return False
        d[name] = value
        return True
    return d.pop(name, None) is not None
