"""Plain dicts (YAML/JSON-loaded Kubernetes objects) -> the typed model.

Validation follows the apiserver (k8s.io/kubernetes pkg/apis/networking/
validation, apimachinery label-selector and label validation) so that what
we accept is what a cluster accepts, with the same field paths in errors.
Where the apiserver is lenient we follow it and normalise: a CIDR with host
bits set ("10.0.0.1/8") or leading zeros is accepted as the network it
denotes and stored canonically ("10.0.0.0/8"), as the default
(non-StrictIPCIDRValidation) apiserver parses it. Deliberate differences:
duplicate policyTypes are rejected, and so are IPv4-mapped IPv6 CIDRs
(ambiguous between families).

Apiserver defaulting is applied: namespace "default", protocol TCP, and
policyTypes = [Ingress] (+ Egress when spec.egress is non-empty) when the
field is absent or empty.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from policy.errors import ObjectKind, PolicyError
from policy.model import (
    ClusterState,
    ContainerPort,
    IPBlock,
    Labels,
    LabelSelector,
    Namespace,
    NetworkPolicy,
    Operator,
    Peer,
    Pod,
    PodKey,
    PolicyKey,
    PolicyPort,
    PolicyType,
    Protocol,
    Requirement,
    Rule,
)

log = logging.getLogger(__name__)

METADATA_NAME_LABEL = "kubernetes.io/metadata.name"
"""The label the apiserver sets on every Namespace (since 1.21)."""

DEFAULT_NAMESPACE = "default"

_API_VERSIONS: Mapping[str, str] = {
    "NetworkPolicy": "networking.k8s.io/v1",
    "Pod": "v1",
    "Namespace": "v1",
}

_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_PORT_NAME_CHARS = re.compile(r"[-a-z0-9]+")
_HAS_LETTER = re.compile(r"[a-z]")
_DIGITS = re.compile(r"[0-9]+")

_OPERATORS = {op.value: op for op in Operator}
_PROTOCOLS = {p.value: p for p in Protocol}
_POLICY_TYPES = {t.value: t for t in PolicyType}


_SHOWN_MAX = 64


def _shown(value: object) -> str:
    """`repr` for error messages, cut short: a hostile 1 MB label value must
    not turn into a 1 MB error line."""
    if isinstance(value, str) and len(value) > _SHOWN_MAX:
        return f"{value[:_SHOWN_MAX]!r}... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= 2 * _SHOWN_MAX else f"{text[: 2 * _SHOWN_MAX]}..."


# --------------------------------------------------------------------------
# Field-level checks: each returns an error message or None.


def _dns_label_error(value: str) -> str | None:
    if len(value) > 63:
        return "must be no more than 63 characters"
    if not _DNS1123_LABEL.fullmatch(value):
        return (
            "must be a lowercase RFC 1123 label (lowercase alphanumerics and '-', "
            "starting and ending with an alphanumeric)"
        )
    return None


def _dns_subdomain_error(value: str) -> str | None:
    if len(value) > 253:
        return "must be no more than 253 characters"
    if not _DNS1123_SUBDOMAIN.fullmatch(value):
        return (
            "must be a lowercase RFC 1123 subdomain (lowercase alphanumerics, '-' and '.', "
            "starting and ending with an alphanumeric)"
        )
    return None


def label_key_error(key: str) -> str | None:
    """Why `key` is not a valid label key (a qualified name), or None."""
    prefix, sep, name = key.rpartition("/")
    if sep:
        if "/" in prefix:
            return f"invalid label key {_shown(key)}: at most one '/' allowed"
        if not prefix:
            return f"invalid label key {_shown(key)}: prefix part must be non-empty"
        why = _dns_subdomain_error(prefix)
        if why is not None:
            return f"invalid label key {_shown(key)}: prefix part {why}"
    if not name:
        return f"invalid label key {_shown(key)}: name part must be non-empty"
    if len(name) > 63:
        return f"invalid label key {_shown(key)}: name part must be no more than 63 characters"
    if not _QUALIFIED_NAME.fullmatch(name):
        return (
            f"invalid label key {_shown(key)}: name part must consist of alphanumerics, '-', '_' "
            "or '.', starting and ending with an alphanumeric"
        )
    return None


def label_value_error(value: str) -> str | None:
    """Why `value` is not a valid label value, or None."""
    if len(value) > 63:
        return f"invalid label value {_shown(value)}: must be no more than 63 characters"
    if not _LABEL_VALUE.fullmatch(value):
        return (
            f"invalid label value {_shown(value)}: must be empty or consist of alphanumerics, '-', "
            "'_' or '.', starting and ending with an alphanumeric"
        )
    return None


def port_name_error(name: str) -> str | None:
    """Why `name` is not an IANA_SVC_NAME (RFC 6335), or None."""
    if len(name) > 15:
        return f"invalid port name {_shown(name)}: must be no more than 15 characters"
    if not _PORT_NAME_CHARS.fullmatch(name):
        return f"invalid port name {_shown(name)}: must contain only a-z, 0-9 and '-'"
    if "--" in name:
        return f"invalid port name {_shown(name)}: must not contain consecutive hyphens"
    if not _HAS_LETTER.search(name):
        return f"invalid port name {_shown(name)}: must contain at least one letter (a-z)"
    if name.startswith("-") or name.endswith("-"):
        return f"invalid port name {_shown(name)}: must not begin or end with a hyphen"
    return None


def _port_number_error(value: int) -> str | None:
    if not 1 <= value <= 65535:
        return "must be between 1 and 65535, inclusive"
    return None


def _strip_octet_zeros(addr: str) -> str:
    """Go's sloppy IPv4 parsing reads "010" as decimal 10; do the same."""
    parts = addr.split(".")
    if len(parts) == 4 and all(_DIGITS.fullmatch(p) for p in parts):
        return ".".join(p.lstrip("0") or "0" for p in parts)
    return addr


def parse_cidr(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | str:
    """The network `text` denotes, or an error message.

    Requires an explicit prefix length (Go's ParseCIDR does), tolerates host
    bits and IPv4 leading zeros (masked/normalised, as the apiserver does)."""
    addr, sep, plen = text.partition("/")
    bad = f"invalid CIDR {_shown(text)}: must be like 10.9.8.0/24 or 2001:db8::/64"
    if not sep or not _DIGITS.fullmatch(plen) or "%" in addr:
        return bad
    try:
        ip = ipaddress.ip_address(_strip_octet_zeros(addr))
    except ValueError:
        return bad
    bits = int(plen)
    if bits > ip.max_prefixlen:
        return bad
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return f"invalid CIDR {_shown(text)}: must not have an IPv4-mapped IPv6 address"
    return ipaddress.ip_network(f"{ip}/{bits}", strict=False)


def _parse_ip(text: str) -> str | None:
    """Canonical text of an IP address, or None if it is not one."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        return None
    return str(ip)


# --------------------------------------------------------------------------
# The walker: reads one object, records every error with its path.


class _Reader:
    """Typed access to one object's fields, collecting PolicyErrors."""

    def __init__(self, kind: ObjectKind, namespace: str | None, name: str) -> None:
        self.kind: ObjectKind = kind
        self.namespace = namespace
        self.name = name
        self.errors: list[PolicyError] = []

    def error(self, field: str, message: str) -> None:
        self.errors.append(
            PolicyError(self.kind, self.namespace, self.name, field=field, message=message)
        )

    def mapping(self, value: Any, path: str) -> Mapping[str, Any] | None:
        """`value` as a mapping; None (absent/null) gives {}; other types an error."""
        if value is None:
            return {}
        if isinstance(value, Mapping):
            return value
        self.error(path, f"must be a mapping, not {_type_name(value)}")
        return None

    def seq(self, value: Any, path: str) -> list[Any] | None:
        """`value` as a list; None (absent/null) gives []; other types an error."""
        if value is None:
            return []
        if isinstance(value, list | tuple):
            return list(value)
        self.error(path, f"must be a list, not {_type_name(value)}")
        return None

    def string(self, value: Any, path: str) -> str | None:
        if isinstance(value, str):
            return value
        self.error(path, f"must be a string, not {_type_name(value)}")
        return None

    def integer(self, value: Any, path: str) -> int | None:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        self.error(path, f"must be an integer, not {_type_name(value)}")
        return None

    def labels(self, value: Any, path: str) -> Labels:
        m = self.mapping(value, path)
        out: dict[str, str] = {}
        for k, v in (m or {}).items():
            if not isinstance(k, str):
                self.error(path, f"keys must be strings, not {_type_name(k)}")
                continue
            kpath = f"{path}[{k if len(k) <= _SHOWN_MAX else k[:_SHOWN_MAX] + '...'}]"
            why = label_key_error(k)
            if why is not None:
                self.error(kpath, why)
                continue
            s = self.string(v, kpath)
            if s is None:
                continue
            why = label_value_error(s)
            if why is not None:
                self.error(kpath, why)
                continue
            out[k] = s
        return Labels(out)

    def selector(self, value: Any, path: str) -> LabelSelector:
        m = self.mapping(value, path) or {}
        match_labels = self.labels(m.get("matchLabels"), f"{path}.matchLabels")
        reqs: list[Requirement] = []
        exprs = self.seq(m.get("matchExpressions"), f"{path}.matchExpressions") or []
        for i, raw in enumerate(exprs):
            req = self.requirement(raw, f"{path}.matchExpressions[{i}]")
            if req is not None:
                reqs.append(req)
        return LabelSelector(match_labels=match_labels, match_expressions=tuple(reqs))

    def requirement(self, value: Any, path: str) -> Requirement | None:
        m = self.mapping(value, path)
        if m is None:
            return None
        before = len(self.errors)
        key = m.get("key")
        if key is None:
            self.error(f"{path}.key", "required")
        elif (k := self.string(key, f"{path}.key")) is not None:
            why = label_key_error(k)
            if why is not None:
                self.error(f"{path}.key", why)
        raw_op = m.get("operator")
        op: Operator | None = None
        if raw_op is None:
            self.error(f"{path}.operator", "required")
        elif (s := self.string(raw_op, f"{path}.operator")) is not None:
            op = _OPERATORS.get(s)
            if op is None:
                self.error(
                    f"{path}.operator",
                    f"unsupported operator {_shown(s)}: must be In, NotIn, Exists or DoesNotExist",
                )
        values: list[str] = []
        raw_values = self.seq(m.get("values"), f"{path}.values")
        for j, v in enumerate(raw_values or []):
            vs = self.string(v, f"{path}.values[{j}]")
            if vs is None:
                continue
            why = label_value_error(vs)
            if why is not None:
                self.error(f"{path}.values[{j}]", why)
                continue
            values.append(vs)
        if op in (Operator.IN, Operator.NOT_IN) and raw_values == []:
            self.error(f"{path}.values", "must be specified when operator is In or NotIn")
        if op in (Operator.EXISTS, Operator.DOES_NOT_EXIST) and raw_values:
            self.error(
                f"{path}.values", "may not be specified when operator is Exists or DoesNotExist"
            )
        if len(self.errors) != before or op is None or not isinstance(key, str):
            return None
        return Requirement(key=key, operator=op, values=tuple(sorted(set(values))))


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "mapping"
    if isinstance(value, list | tuple):
        return "list"
    return type(value).__name__


def _identity(obj: Mapping[str, Any], *, namespaced: bool) -> tuple[str | None, str]:
    """Best-effort (namespace, name) for naming the object in errors."""
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    name = meta.get("name")
    name = name if isinstance(name, str) else ""
    if not namespaced:
        return None, name
    ns = meta.get("namespace")
    if ns is None or ns == "":
        return DEFAULT_NAMESPACE, name
    return (ns if isinstance(ns, str) else str(ns)), name


def _metadata(r: _Reader, obj: Mapping[str, Any], *, name_rule: str) -> Mapping[str, Any]:
    """Checks metadata.name (and .namespace when namespaced); returns metadata."""
    meta = r.mapping(obj.get("metadata"), "metadata") or {}
    name = meta.get("name")
    if name is None or name == "":
        r.error("metadata.name", "required")
    elif (s := r.string(name, "metadata.name")) is not None:
        why = _dns_label_error(s) if name_rule == "label" else _dns_subdomain_error(s)
        if why is not None:
            r.error("metadata.name", f"invalid name {_shown(s)}: {why}")
    if r.namespace is not None:
        ns = meta.get("namespace")
        if ns is not None and ns != "" and (s := r.string(ns, "metadata.namespace")) is not None:
            why = _dns_label_error(s)
            if why is not None:
                r.error("metadata.namespace", f"invalid namespace {_shown(s)}: {why}")
    return meta


# --------------------------------------------------------------------------
# NetworkPolicy


def _read_ports(r: _Reader, value: Any, path: str) -> tuple[PolicyPort, ...]:
    out: list[PolicyPort] = []
    for i, raw in enumerate(r.seq(value, path) or []):
        p = f"{path}[{i}]"
        m = r.mapping(raw, p)
        if m is None:
            continue
        before = len(r.errors)
        protocol = Protocol.TCP
        raw_proto = m.get("protocol")
        if raw_proto is not None and (s := r.string(raw_proto, f"{p}.protocol")) is not None:
            proto = _PROTOCOLS.get(s)
            if proto is None:
                r.error(
                    f"{p}.protocol", f"unsupported protocol {_shown(s)}: must be TCP, UDP or SCTP"
                )
            else:
                protocol = proto
        raw_port = m.get("port")
        port: int | str | None = None
        if isinstance(raw_port, bool) or not isinstance(raw_port, int | str | None):
            r.error(f"{p}.port", f"must be an integer or a port name, not {_type_name(raw_port)}")
        elif isinstance(raw_port, int):
            why = _port_number_error(raw_port)
            if why is not None:
                r.error(f"{p}.port", why)
            port = raw_port
        elif isinstance(raw_port, str):
            why = port_name_error(raw_port)
            if why is not None:
                r.error(f"{p}.port", why)
            port = raw_port
        end_port: int | None = None
        raw_end = m.get("endPort")
        if raw_end is not None and (e := r.integer(raw_end, f"{p}.endPort")) is not None:
            end_port = e
            if port is None and raw_port is None:
                r.error(f"{p}.endPort", "may not be set when port is not set")
            elif isinstance(port, str):
                r.error(f"{p}.endPort", "may not be set when port is a name")
            elif isinstance(port, int):
                if e < port:
                    r.error(f"{p}.endPort", "must be >= port")
                elif (why := _port_number_error(e)) is not None:
                    r.error(f"{p}.endPort", why)
        if len(r.errors) == before:
            out.append(PolicyPort(protocol=protocol, port=port, end_port=end_port))
    return tuple(out)


def _read_ip_block(r: _Reader, value: Any, path: str) -> IPBlock | None:
    m = r.mapping(value, path)
    if m is None:
        return None
    raw_cidr = m.get("cidr")
    if raw_cidr is None or raw_cidr == "":
        r.error(f"{path}.cidr", "required")
        return None
    text = r.string(raw_cidr, f"{path}.cidr")
    if text is None:
        return None
    net = parse_cidr(text)
    if isinstance(net, str):
        r.error(f"{path}.cidr", net)
        return None
    before = len(r.errors)
    excepts: list[str] = []
    for j, raw in enumerate(r.seq(m.get("except"), f"{path}.except") or []):
        ep = f"{path}.except[{j}]"
        et = r.string(raw, ep)
        if et is None:
            continue
        enet = parse_cidr(et)
        if isinstance(enet, str):
            r.error(ep, enet)
            continue
        # The apiserver: except's network address inside cidr and a longer prefix.
        if enet.version != net.version or not (
            enet.network_address in net and enet.prefixlen > net.prefixlen
        ):
            r.error(ep, f"{_shown(et)} must be a strict subset of cidr {str(net)!r}")
            continue
        excepts.append(str(enet))
    if len(r.errors) != before:
        return None
    return IPBlock(cidr=str(net), except_=tuple(excepts))


def _read_peers(r: _Reader, value: Any, path: str) -> tuple[Peer, ...]:
    out: list[Peer] = []
    for i, raw in enumerate(r.seq(value, path) or []):
        p = f"{path}[{i}]"
        m = r.mapping(raw, p)
        if m is None:
            continue
        before = len(r.errors)
        pod_sel = ns_sel = None
        ip_block = None
        if m.get("podSelector") is not None:
            pod_sel = r.selector(m["podSelector"], f"{p}.podSelector")
        if m.get("namespaceSelector") is not None:
            ns_sel = r.selector(m["namespaceSelector"], f"{p}.namespaceSelector")
        has_block = m.get("ipBlock") is not None
        if has_block:
            ip_block = _read_ip_block(r, m["ipBlock"], f"{p}.ipBlock")
        if not has_block and pod_sel is None and ns_sel is None:
            r.error(p, "must specify a peer (podSelector, namespaceSelector or ipBlock)")
        elif has_block and (pod_sel is not None or ns_sel is not None):
            r.error(p, "may not specify both ipBlock and another peer")
        if len(r.errors) == before:
            out.append(Peer(pod_selector=pod_sel, namespace_selector=ns_sel, ip_block=ip_block))
    return tuple(out)


def _read_rules(r: _Reader, value: Any, path: str, peers_field: str) -> tuple[Rule, ...]:
    out: list[Rule] = []
    for i, raw in enumerate(r.seq(value, path) or []):
        p = f"{path}[{i}]"
        m = r.mapping(raw, p)
        if m is None:
            continue
        peers = _read_peers(r, m.get(peers_field), f"{p}.{peers_field}")
        ports = _read_ports(r, m.get("ports"), f"{p}.ports")
        out.append(Rule(peers=peers, ports=ports))
    return tuple(out)


def _read_policy_types(r: _Reader, value: Any, path: str) -> list[PolicyType] | None:
    raw = r.seq(value, path)
    if raw is None:
        return None
    seen: list[PolicyType] = []
    for i, v in enumerate(raw):
        s = r.string(v, f"{path}[{i}]")
        if s is None:
            continue
        t = _POLICY_TYPES.get(s)
        if t is None:
            r.error(f"{path}[{i}]", f"unsupported value {_shown(s)}: must be Ingress or Egress")
        elif t in seen:
            r.error(f"{path}[{i}]", f"duplicate value {_shown(s)}")
        else:
            seen.append(t)
    return seen


def _network_policy(obj: Mapping[str, Any]) -> tuple[NetworkPolicy | None, list[PolicyError]]:
    ns, name = _identity(obj, namespaced=True)
    r = _Reader("networkpolicy", ns, name)
    _metadata(r, obj, name_rule="subdomain")
    spec = r.mapping(obj.get("spec"), "spec")
    if spec is None:
        return None, r.errors
    pod_selector = r.selector(spec.get("podSelector"), "spec.podSelector")
    types = _read_policy_types(r, spec.get("policyTypes"), "spec.policyTypes")
    ingress = _read_rules(r, spec.get("ingress"), "spec.ingress", "from")
    egress = _read_rules(r, spec.get("egress"), "spec.egress", "to")
    if r.errors or types is None or ns is None:
        return None, r.errors
    if not types:
        types = [PolicyType.INGRESS]
        raw_egress = spec.get("egress")
        if raw_egress:
            types.append(PolicyType.EGRESS)
    policy = NetworkPolicy(
        namespace=ns,
        name=name,
        pod_selector=pod_selector,
        policy_types=frozenset(types),
        ingress=ingress,
        egress=egress,
    )
    return policy, []


def validate_network_policy(obj: Mapping[str, Any]) -> list[PolicyError]:
    """Every error of the object, in document order (empty when valid)."""
    return _network_policy(obj)[1]


def parse_network_policy(obj: Mapping[str, Any]) -> NetworkPolicy:
    """The policy, with apiserver defaulting; raises the first PolicyError."""
    policy, errors = _network_policy(obj)
    if errors:
        raise errors[0]
    assert policy is not None
    return policy


# --------------------------------------------------------------------------
# Pod and Namespace


def _container_ports(r: _Reader, spec: Mapping[str, Any]) -> tuple[ContainerPort, ...]:
    out: list[ContainerPort] = []
    for i, raw_c in enumerate(r.seq(spec.get("containers"), "spec.containers") or []):
        cpath = f"spec.containers[{i}]"
        c = r.mapping(raw_c, cpath)
        if c is None:
            continue
        for j, raw_p in enumerate(r.seq(c.get("ports"), f"{cpath}.ports") or []):
            p = f"{cpath}.ports[{j}]"
            m = r.mapping(raw_p, p)
            if m is None:
                continue
            before = len(r.errors)
            port = 0
            raw_port = m.get("containerPort")
            if raw_port is None:
                r.error(f"{p}.containerPort", "required")
            elif (n := r.integer(raw_port, f"{p}.containerPort")) is not None:
                why = _port_number_error(n)
                if why is not None:
                    r.error(f"{p}.containerPort", why)
                port = n
            protocol = Protocol.TCP
            raw_proto = m.get("protocol")
            if raw_proto is not None and (s := r.string(raw_proto, f"{p}.protocol")) is not None:
                proto = _PROTOCOLS.get(s)
                if proto is None:
                    r.error(
                        f"{p}.protocol",
                        f"unsupported protocol {_shown(s)}: must be TCP, UDP or SCTP",
                    )
                else:
                    protocol = proto
            pname: str | None = None
            raw_name = m.get("name")
            if raw_name is not None and raw_name != "":
                pname = r.string(raw_name, f"{p}.name")
                if pname is not None and (why := port_name_error(pname)) is not None:
                    r.error(f"{p}.name", why)
            if len(r.errors) == before:
                out.append(ContainerPort(port=port, protocol=protocol, name=pname))
    return tuple(out)


def _pod_ip(r: _Reader, status: Mapping[str, Any]) -> str | None:
    raw = status.get("podIP")
    path = "status.podIP"
    if raw is None or raw == "":
        ips = r.seq(status.get("podIPs"), "status.podIPs") or []
        if not ips:
            return None
        first = r.mapping(ips[0], "status.podIPs[0]") or {}
        raw = first.get("ip")
        path = "status.podIPs[0].ip"
        if raw is None or raw == "":
            return None
    text = r.string(raw, path)
    if text is None:
        return None
    ip = _parse_ip(text)
    if ip is None:
        r.error(path, f"invalid IP address {_shown(text)}")
    return ip


def _pod(obj: Mapping[str, Any]) -> tuple[Pod | None, list[PolicyError]]:
    ns, name = _identity(obj, namespaced=True)
    r = _Reader("pod", ns, name)
    meta = _metadata(r, obj, name_rule="subdomain")
    labels = r.labels(meta.get("labels"), "metadata.labels")
    spec = r.mapping(obj.get("spec"), "spec") or {}
    node: str | None = None
    raw_node = spec.get("nodeName")
    if raw_node is not None and raw_node != "":
        node = r.string(raw_node, "spec.nodeName")
    host_network = False
    raw_hn = spec.get("hostNetwork")
    if raw_hn is not None:
        if isinstance(raw_hn, bool):
            host_network = raw_hn
        else:
            r.error("spec.hostNetwork", f"must be a boolean, not {_type_name(raw_hn)}")
    ports = _container_ports(r, spec)
    status = r.mapping(obj.get("status"), "status") or {}
    ip = _pod_ip(r, status)
    if r.errors or ns is None:
        return None, r.errors
    pod = Pod(
        namespace=ns,
        name=name,
        labels=labels,
        node=node,
        ip=ip,
        ports=ports,
        host_network=host_network,
    )
    return pod, []


def parse_pod(obj: Mapping[str, Any]) -> Pod:
    """The policy-relevant part of a Pod; raises the first PolicyError."""
    pod, errors = _pod(obj)
    if errors:
        raise errors[0]
    assert pod is not None
    return pod


def _namespace(obj: Mapping[str, Any]) -> tuple[Namespace | None, list[PolicyError]]:
    _, name = _identity(obj, namespaced=False)
    r = _Reader("namespace", None, name)
    meta = _metadata(r, obj, name_rule="label")
    labels = r.labels(meta.get("labels"), "metadata.labels")
    if r.errors:
        return None, r.errors
    return Namespace(name=name, labels=Labels({**labels, METADATA_NAME_LABEL: name})), []


def parse_namespace(obj: Mapping[str, Any]) -> Namespace:
    """A Namespace with the apiserver's `kubernetes.io/metadata.name` label;
    raises the first PolicyError."""
    ns, errors = _namespace(obj)
    if errors:
        raise errors[0]
    assert ns is not None
    return ns


def implicit_namespace(name: str) -> Namespace:
    """A namespace nobody declared: only the label the apiserver always sets."""
    return Namespace(name=name, labels=Labels({METADATA_NAME_LABEL: name}))


# --------------------------------------------------------------------------
# Whole documents


def _expand(objs: Iterable[Any]) -> Iterator[Mapping[str, Any]]:
    """Flatten List kinds (`List`, `PodList`, ...): items of typed lists carry
    no kind/apiVersion, so they inherit them from the list."""
    for obj in objs:
        if not isinstance(obj, Mapping):
            continue
        kind = obj.get("kind")
        if isinstance(kind, str) and kind.endswith("List") and "items" in obj:
            item_kind = kind[: -len("List")]
            items = obj.get("items")
            for item in items if isinstance(items, list) else []:
                if not isinstance(item, Mapping):
                    continue
                if item_kind and "kind" not in item:
                    item = {"kind": item_kind, "apiVersion": obj.get("apiVersion"), **item}
                yield from _expand([item])
            continue
        yield obj


def build_cluster(
    objs: Iterable[Mapping[str, Any]],
) -> tuple[ClusterState, list[PolicyError]]:
    """Namespaces, Pods and NetworkPolicies from a stream of objects.

    Other kinds are ignored (not errors). A bad object is reported and
    skipped; the rest is still built, and an earlier valid version of the same
    object stays. Later documents replace earlier ones with the same key.
    Namespaces referenced by pods or policies but never declared get an
    implicit Namespace carrying only the metadata.name label.
    """
    namespaces: dict[str, Namespace] = {}
    pods: dict[PodKey, Pod] = {}
    policies: dict[PolicyKey, NetworkPolicy] = {}
    errors: list[PolicyError] = []
    for obj in _expand(objs):
        kind = obj.get("kind")
        if not isinstance(kind, str) or kind not in _API_VERSIONS:
            log.debug("parse.ignored kind=%s", kind)
            continue
        api_version = obj.get("apiVersion")
        if api_version != _API_VERSIONS[kind]:
            obj_kind: ObjectKind = (
                "networkpolicy"
                if kind == "NetworkPolicy"
                else "pod"
                if kind == "Pod"
                else "namespace"
            )
            ns, name = _identity(obj, namespaced=kind != "Namespace")
            errors.append(
                PolicyError(
                    obj_kind,
                    ns,
                    name,
                    field="apiVersion",
                    message=f"unsupported apiVersion {_shown(api_version)} for {kind}: "
                    f"must be {_API_VERSIONS[kind]}",
                )
            )
            continue
        if kind == "NetworkPolicy":
            policy, errs = _network_policy(obj)
            if policy is not None:
                policies[policy.key] = policy
        elif kind == "Pod":
            pod, errs = _pod(obj)
            if pod is not None:
                pods[pod.key] = pod
        else:
            namespace, errs = _namespace(obj)
            if namespace is not None:
                namespaces[namespace.name] = namespace
        errors.extend(errs)
    for ns_name in sorted(
        {p.namespace for p in pods.values()} | {p.namespace for p in policies.values()}
    ):
        if ns_name not in namespaces:
            namespaces[ns_name] = implicit_namespace(ns_name)
    return ClusterState(namespaces=namespaces, pods=pods, policies=policies), errors
