"""The emulator's object store: objects, one resourceVersion counter, an event log.

Every write bumps one global counter and appends exactly one event to the log,
so an event's resourceVersion is also its position: a watch from N replays the
log entries after N, or gets `410 Expired` when the log no longer reaches back
to N (after `compact()` or when the bounded log has dropped them), as a real
apiserver does once etcd has compacted.

Stored objects are never mutated in place (every write stores a new dict), so
readers holding a reference see a consistent snapshot.
"""

from __future__ import annotations

import base64
import builtins
import copy
import json
import logging
import os
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Obj = dict[str, Any]

_STATE_FORMAT = 1


# --------------------------------------------------------------------- errors


class ApiError(Exception):
    """An error the server returns as a `Status` object."""

    def __init__(self, code: int, reason: str, message: str, *, details: Obj | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details
        self.retry_after: int | None = None  # seconds, sent as a Retry-After header

    def status(self) -> Obj:
        st: Obj = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            st["details"] = self.details
        return st


def _not_found(rt: ResourceType, name: str) -> ApiError:
    return ApiError(
        404,
        "NotFound",
        f'{rt.qualified} "{name}" not found',
        details={"name": name, "group": rt.group, "kind": rt.plural},
    )


def _bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def _invalid(rt: ResourceType, name: str, field_path: str, message: str) -> ApiError:
    return ApiError(
        422,
        "Invalid",
        f'{rt.kind} "{name}" is invalid: {field_path}: {message}',
        details={
            "name": name,
            "group": rt.group,
            "kind": rt.kind,
            "causes": [{"reason": "FieldValueInvalid", "message": message, "field": field_path}],
        },
    )


def _conflict(rt: ResourceType, name: str) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {rt.qualified} "{name}": the object has been '
        "modified; please apply your changes to the latest version and try again",
        details={"name": name, "group": rt.group, "kind": rt.plural},
    )


# ------------------------------------------------------------------ resources


@dataclass(frozen=True)
class ResourceType:
    """One served resource: where it lives in the URL space and how writes treat it."""

    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool
    singular: str
    short_names: tuple[str, ...] = ()
    status_subresource: bool = False
    has_generation: bool = False
    custom: bool = False  # a custom resource (served because of a CRD)
    field_labels: frozenset[str] = frozenset({"metadata.name", "metadata.namespace"})

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> str:
        """Unique key: `plural` for core, `plural.group` otherwise (as kubectl names them)."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def qualified(self) -> str:
        """How apiserver messages name the resource: `pods`, `networkpolicies.networking.k8s.io`."""
        return self.key

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"


_POD_FIELDS = frozenset(
    {
        "metadata.name",
        "metadata.namespace",
        "spec.nodeName",
        "spec.restartPolicy",
        "spec.schedulerName",
        "spec.serviceAccountName",
        "spec.hostNetwork",
        "status.phase",
        "status.podIP",
        "status.nominatedNodeName",
    }
)
_EVENT_FIELDS = frozenset(
    {
        "metadata.name",
        "metadata.namespace",
        "involvedObject.kind",
        "involvedObject.namespace",
        "involvedObject.name",
        "involvedObject.uid",
        "involvedObject.apiVersion",
        "involvedObject.resourceVersion",
        "involvedObject.fieldPath",
        "reason",
        "reportingComponent",
        "source",
        "type",
    }
)

FELIX_GROUP = "felixlite.io"
FELIX_VERSION = "v1alpha1"

RESOURCES: tuple[ResourceType, ...] = (
    ResourceType(
        "",
        "v1",
        "namespaces",
        "Namespace",
        False,
        "namespace",
        ("ns",),
        status_subresource=True,
        field_labels=frozenset({"metadata.name", "status.phase"}),
    ),
    ResourceType(
        "",
        "v1",
        "pods",
        "Pod",
        True,
        "pod",
        ("po",),
        status_subresource=True,
        has_generation=True,
        field_labels=_POD_FIELDS,
    ),
    ResourceType(
        "",
        "v1",
        "nodes",
        "Node",
        False,
        "node",
        ("no",),
        status_subresource=True,
        field_labels=frozenset({"metadata.name", "spec.unschedulable"}),
    ),
    ResourceType("", "v1", "events", "Event", True, "event", ("ev",), field_labels=_EVENT_FIELDS),
    ResourceType(
        "",
        "v1",
        "secrets",
        "Secret",
        True,
        "secret",
        field_labels=frozenset({"metadata.name", "metadata.namespace", "type"}),
    ),
    ResourceType("", "v1", "configmaps", "ConfigMap", True, "configmap", ("cm",)),
    ResourceType(
        "networking.k8s.io",
        "v1",
        "networkpolicies",
        "NetworkPolicy",
        True,
        "networkpolicy",
        ("netpol",),
        has_generation=True,
    ),
    ResourceType("events.k8s.io", "v1", "events", "Event", True, "event", ("ev",)),
    ResourceType(
        FELIX_GROUP,
        FELIX_VERSION,
        "bgppeers",
        "BGPPeer",
        False,
        "bgppeer",
        status_subresource=True,
        has_generation=True,
        custom=True,
    ),
    ResourceType(
        FELIX_GROUP,
        FELIX_VERSION,
        "bgpconfigurations",
        "BGPConfiguration",
        False,
        "bgpconfiguration",
        ("bgpconfig",),
        status_subresource=True,
        has_generation=True,
        custom=True,
    ),
    ResourceType(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        False,
        "customresourcedefinition",
        ("crd", "crds"),
        status_subresource=True,
        has_generation=True,
    ),
)


def resource(key: str) -> ResourceType:
    """The resource by key: `pods`, `networkpolicies.networking.k8s.io`, `bgppeers.felixlite.io`."""
    for rt in RESOURCES:
        if rt.key == key:
            return rt
    raise KeyError(key)


def resource_for(group: str, version: str, plural: str) -> ResourceType | None:
    for rt in RESOURCES:
        if rt.group == group and rt.version == version and rt.plural == plural:
            return rt
    return None


# ------------------------------------------------------------------ selectors


class Op(Enum):
    EQ = "="
    NE = "!="
    IN = "in"
    NOTIN = "notin"
    EXISTS = "exists"
    NOT_EXISTS = "!"


@dataclass(frozen=True)
class Requirement:
    key: str
    op: Op
    values: frozenset[str] = frozenset()

    def matches(self, labels: dict[str, str]) -> bool:
        has = self.key in labels
        if self.op is Op.EXISTS:
            return has
        if self.op is Op.NOT_EXISTS:
            return not has
        if self.op in (Op.EQ, Op.IN):
            return has and labels[self.key] in self.values
        # != and notin also match objects without the label, as in Kubernetes.
        return not has or labels[self.key] not in self.values


_KEY_RE = re.compile(
    r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
_VALUE_RE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_SET_RE = re.compile(r"^(\S+)\s+(in|notin)\s*\((.*)\)$")


def _split_terms(text: str) -> list[str]:
    terms: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            terms.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    terms.append("".join(cur))
    return [t.strip() for t in terms]


def parse_label_selector(text: str | None) -> tuple[Requirement, ...]:
    """Parse the `labelSelector` query syntax; raises ApiError 400 like the apiserver."""
    if not text or not text.strip():
        return ()
    reqs: list[Requirement] = []
    for term in _split_terms(text):
        if not term:
            raise _bad_request(
                f"unable to parse requirement: found '', expected: identifier in selector {text!r}"
            )
        m = _SET_RE.match(term)
        if m:
            key, opname, inner = m.group(1), m.group(2), m.group(3)
            values = [v.strip() for v in inner.split(",")]
            op = Op.IN if opname == "in" else Op.NOTIN
        elif term.startswith("!"):
            key, op, values = term[1:].strip(), Op.NOT_EXISTS, []
        elif "!=" in term:
            key, _, v = term.partition("!=")
            op, values = Op.NE, [v]
        elif "==" in term:
            key, _, v = term.partition("==")
            op, values = Op.EQ, [v]
        elif "=" in term:
            key, _, v = term.partition("=")
            op, values = Op.EQ, [v]
        else:
            key, op, values = term, Op.EXISTS, []
        key = key.strip()
        values = [v.strip() for v in values]
        if not _KEY_RE.match(key):
            raise _bad_request(
                f"unable to parse requirement: invalid label key {key!r} in selector {text!r}"
            )
        for v in values:
            if not _VALUE_RE.match(v) or len(v) > 63:
                raise _bad_request(
                    f"unable to parse requirement: invalid label value {v!r} in selector {text!r}"
                )
        reqs.append(Requirement(key, op, frozenset(values)))
    return tuple(reqs)


@dataclass(frozen=True)
class FieldRequirement:
    path: str
    equal: bool
    value: str

    def matches(self, obj: Obj) -> bool:
        return (_field_value(obj, self.path) == self.value) == self.equal


def _field_value(obj: Obj, path: str) -> str:
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, dict):
            return ""
        cur = cur.get(part)
    if cur is None:
        return ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    if isinstance(cur, dict):  # core Event's `source` field label is source.component
        return str(cur.get("component", ""))
    return str(cur)


def parse_field_selector(rt: ResourceType, text: str | None) -> tuple[FieldRequirement, ...]:
    if not text or not text.strip():
        return ()
    out = []
    for term in _split_terms(text):
        if "!=" in term:
            path, _, value = term.partition("!=")
            equal = False
        elif "==" in term:
            path, _, value = term.partition("==")
            equal = True
        elif "=" in term:
            path, _, value = term.partition("=")
            equal = True
        else:
            raise _bad_request(f"invalid selector: '{text}'; can't understand '{term}'")
        path = path.strip()
        if path not in rt.field_labels:
            raise _bad_request(f"field label not supported: {path}")
        out.append(FieldRequirement(path, equal, value.strip()))
    return tuple(out)


@dataclass(frozen=True)
class Filter:
    """Which objects a list or watch sees."""

    namespace: str | None = None
    labels: tuple[Requirement, ...] = ()
    fields: tuple[FieldRequirement, ...] = ()

    def matches(self, obj: Obj) -> bool:
        meta = obj.get("metadata") or {}
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        lbls = meta.get("labels") or {}
        return all(r.matches(lbls) for r in self.labels) and all(
            f.matches(obj) for f in self.fields
        )


# ---------------------------------------------------------------- patching


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (null deletes, maps merge, anything else replaces)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = merge_patch(result.get(k), v)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ValueError(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _index(container: list[Any], token: str, *, allow_end: bool) -> int:
    if token == "-" and allow_end:
        return len(container)
    if not token.isdigit():
        raise ValueError(f"invalid array index {token!r}")
    i = int(token)
    if i > len(container) or (i == len(container) and not allow_end):
        raise ValueError(f"array index {i} out of bounds")
    return i


def _parent(doc: Any, parts: list[str]) -> Any:
    cur = doc
    for p in parts[:-1]:
        if isinstance(cur, dict):
            if p not in cur:
                raise ValueError(f"missing path component {p!r}")
            cur = cur[p]
        elif isinstance(cur, list):
            cur = cur[_index(cur, p, allow_end=False)]
        else:
            raise ValueError(f"cannot traverse into {type(cur).__name__} at {p!r}")
    return cur


def _get(doc: Any, parts: list[str]) -> Any:
    if not parts:
        return doc
    parent = _parent(doc, parts)
    last = parts[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise ValueError(f"missing key {last!r}")
        return parent[last]
    if isinstance(parent, list):
        return parent[_index(parent, last, allow_end=False)]
    raise ValueError("cannot index a scalar")


def _remove(doc: Any, parts: list[str]) -> Any:
    parent = _parent(doc, parts)
    last = parts[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise ValueError(f"missing key {last!r}")
        return parent.pop(last)
    if isinstance(parent, list):
        return parent.pop(_index(parent, last, allow_end=False))
    raise ValueError("cannot remove from a scalar")


def _add(doc: Any, parts: list[str], value: Any, *, replace: bool) -> Any:
    if not parts:
        return value
    parent = _parent(doc, parts)
    last = parts[-1]
    if isinstance(parent, dict):
        if replace and last not in parent:
            raise ValueError(f"missing key {last!r}")
        parent[last] = value
    elif isinstance(parent, list):
        if replace:
            parent[_index(parent, last, allow_end=False)] = value
        else:
            parent.insert(_index(parent, last, allow_end=True), value)
    else:
        raise ValueError("cannot add to a scalar")
    return doc


def json_patch(target: Obj, ops: Any) -> Any:
    """RFC 6902 JSON patch; raises ValueError on a failing operation."""
    if not isinstance(ops, list):
        raise TypeError("json: cannot unmarshal object into Go value of type jsonpatch.Patch")
    doc: Any = copy.deepcopy(target)
    for i, op in enumerate(ops):
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise ValueError(f"operation {i}: needs op and path")
        kind, parts = op["op"], _pointer(op["path"])
        if kind == "add":
            doc = _add(doc, parts, copy.deepcopy(op.get("value")), replace=False)
        elif kind == "replace":
            doc = _add(doc, parts, copy.deepcopy(op.get("value")), replace=True)
        elif kind == "remove":
            _remove(doc, parts)
        elif kind == "move":
            value = _remove(doc, _pointer(op["from"]))
            doc = _add(doc, parts, value, replace=False)
        elif kind == "copy":
            value = copy.deepcopy(_get(doc, _pointer(op["from"])))
            doc = _add(doc, parts, value, replace=False)
        elif kind == "test":
            if _get(doc, parts) != op.get("value"):
                raise ValueError(f"operation {i}: test failed at {op['path']}")
        else:
            raise ValueError(f"operation {i}: unknown op {kind!r}")
    return doc


class PatchType(Enum):
    JSON = "application/json-patch+json"
    MERGE = "application/merge-patch+json"
    STRATEGIC = "application/strategic-merge-patch+json"
    APPLY = "application/apply-patch+yaml"


# -------------------------------------------------------------------- store


class EventType(Enum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"


@dataclass(frozen=True)
class LogEntry:
    rv: int
    resource: str  # ResourceType.key
    type: EventType
    obj: Obj
    old: Obj | None = None  # previous version, for selector transitions


_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_LABEL_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_GEN_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
_TOP_META = ("kind", "apiVersion", "metadata", "status")


def _now() -> datetime:
    return datetime.now(UTC)


def _ts(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _body_of(obj: Obj) -> Obj:
    """What `metadata.generation` tracks: everything but metadata and status."""
    return {k: v for k, v in obj.items() if k not in _TOP_META}


def _same(a: Obj, b: Obj) -> bool:
    def norm(o: Obj) -> Obj:
        meta = dict(o.get("metadata") or {})
        meta.pop("resourceVersion", None)
        return {**o, "metadata": meta}

    return norm(a) == norm(b)


@dataclass
class _Watch:
    """One open watch: its filter and its cursor into the log."""

    rt: ResourceType
    filt: Filter
    next_rv: int
    pending: list[Obj] = field(default_factory=list)


class Store:
    """Thread-safe object store with resourceVersions and a bounded event log.

    `strict_status=True` applies the apiserver's write strategies: status set on
    create or sent to the main resource is ignored for kinds with a status
    subresource (Pod create resets it to Pending); use the /status subresource.
    """

    def __init__(
        self,
        *,
        max_events: int = 1000,
        strict_status: bool = True,
        initial_namespaces: Iterable[str] = ("default", "kube-system"),
        clock: Callable[[], datetime] = _now,
    ) -> None:
        if max_events < 1:
            raise ValueError("max_events must be >= 1")
        self.max_events = max_events
        self.strict_status = strict_status
        self._clock = clock
        self._lock = threading.RLock()
        self._conds: dict[str, threading.Condition] = {
            rt.key: threading.Condition(self._lock) for rt in RESOURCES
        }
        self._objects: dict[str, dict[tuple[str, str], Obj]] = {rt.key: {} for rt in RESOURCES}
        self._rv = 0
        self._log: list[LogEntry] = []
        self._compacted_rv = 0  # every event with rv <= this is gone from the log
        self._dirty = threading.Event()
        self._rand = random.Random()
        for ns in initial_namespaces:
            self.create(resource("namespaces"), None, {"metadata": {"name": ns}})

    # ---------------------------------------------------------------- state

    @property
    def resource_version(self) -> int:
        with self._lock:
            return self._rv

    @property
    def oldest_watchable_rv(self) -> int:
        """The smallest resourceVersion a watch can start from without a 410."""
        with self._lock:
            return self._compacted_rv

    def compact(self) -> None:
        """Drop the whole event log: any watch from an older version now gets 410."""
        with self._lock:
            self._log.clear()
            self._compacted_rv = self._rv
            log.info("apiserver.compact rv=%d", self._rv)
            self._wake_all()

    def _wake_all(self) -> None:
        with self._lock:
            for c in self._conds.values():
                c.notify_all()

    # --------------------------------------------------------------- reads

    def _bucket(self, rt: ResourceType) -> dict[tuple[str, str], Obj]:
        return self._objects[rt.key]

    @staticmethod
    def _ns(rt: ResourceType, namespace: str | None) -> str:
        return (namespace or "") if rt.namespaced else ""

    def get(self, rt: ResourceType, namespace: str | None, name: str, *, copy_: bool = True) -> Obj:
        with self._lock:
            obj = self._bucket(rt).get((self._ns(rt, namespace), name))
        if obj is None:
            raise _not_found(rt, name)
        return copy.deepcopy(obj) if copy_ else obj

    def list(
        self,
        rt: ResourceType,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        copy_: bool = True,
    ) -> tuple[builtins.list[Obj], int]:
        """Matching objects sorted by (namespace, name), and the current resourceVersion."""
        filt = Filter(
            namespace if rt.namespaced else None,
            parse_label_selector(label_selector),
            parse_field_selector(rt, field_selector),
        )
        with self._lock:
            items = [o for _, o in sorted(self._bucket(rt).items()) if filt.matches(o)]
            rv = self._rv
        return (copy.deepcopy(items) if copy_ else items), rv

    # -------------------------------------------------------------- writes

    def _append(self, rt: ResourceType, etype: EventType, obj: Obj, old: Obj | None) -> None:
        self._log.append(LogEntry(self._rv, rt.key, etype, obj, old))
        if len(self._log) >= 2 * self.max_events:
            drop = len(self._log) - self.max_events
            self._compacted_rv = self._log[drop - 1].rv
            del self._log[:drop]
        self._dirty.set()
        self._conds[rt.key].notify_all()

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def _check_kind(self, rt: ResourceType, obj: Obj) -> None:
        kind, api_version = obj.get("kind"), obj.get("apiVersion")
        if kind not in (None, "", rt.kind) or api_version not in (None, "", rt.api_version):
            raise _bad_request(
                f"the API version in the data ({api_version}) does not match the expected "
                f"API version ({rt.api_version})"
                if api_version not in (None, "", rt.api_version)
                else f"the kind in the data ({kind}) does not match the expected kind ({rt.kind})"
            )

    def _apply_defaults(self, rt: ResourceType, obj: Obj) -> None:
        """The few apiserver defaults that consumers of these kinds rely on."""
        meta = obj["metadata"]
        if rt.key == "namespaces":
            meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
            obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
            if not obj.get("status"):
                obj["status"] = {"phase": "Active"}
        elif rt.key == "networkpolicies.networking.k8s.io":
            spec = obj.setdefault("spec", {})
            if spec.get("podSelector") is None:
                spec["podSelector"] = {}
            if not spec.get("policyTypes"):
                spec["policyTypes"] = ["Ingress"] + (["Egress"] if spec.get("egress") else [])
            for direction in ("ingress", "egress"):
                for rule in spec.get(direction) or []:
                    for port in (rule or {}).get("ports") or []:
                        if isinstance(port, dict):
                            port.setdefault("protocol", "TCP")
        elif rt.key == "pods":
            spec = obj.get("spec") or {}
            for ctr in (spec.get("containers") or []) + (spec.get("initContainers") or []):
                for port in (ctr or {}).get("ports") or []:
                    if isinstance(port, dict):
                        port.setdefault("protocol", "TCP")
        elif rt.key == "secrets":
            string_data = obj.pop("stringData", None) or {}
            if string_data:
                data = dict(obj.get("data") or {})
                for k, v in string_data.items():
                    data[k] = base64.b64encode(str(v).encode()).decode()
                obj["data"] = data
            obj.setdefault("type", "Opaque")

    def _validate(self, rt: ResourceType, obj: Obj) -> None:
        name = obj["metadata"]["name"]
        regex = _LABEL_NAME_RE if rt.key == "namespaces" else _NAME_RE
        limit = 63 if rt.key == "namespaces" else 253
        if not regex.match(name) or len(name) > limit:
            raise _invalid(
                rt,
                name,
                "metadata.name",
                f'Invalid value: "{name}": a lowercase RFC 1123 '
                f"{'label' if rt.key == 'namespaces' else 'subdomain'} must consist of lower "
                "case alphanumeric characters, '-' or '.', and must start and end with an "
                "alphanumeric character",
            )
        for k, v in ((obj["metadata"].get("labels")) or {}).items():
            if not isinstance(v, str) or not _KEY_RE.match(k) or not _VALUE_RE.match(v):
                raise _invalid(rt, name, f"metadata.labels[{k}]", f"Invalid value: {v!r}")

    def create(
        self, rt: ResourceType, namespace: str | None, body: Obj, *, dry_run: bool = False
    ) -> Obj:
        if not isinstance(body, dict):
            raise _bad_request("the body of the request was not a JSON object")
        self._check_kind(rt, body)
        obj = copy.deepcopy(body)
        obj["kind"], obj["apiVersion"] = rt.kind, rt.api_version
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise _bad_request("metadata must be an object")
        ns = self._ns(rt, namespace)
        if rt.namespaced:
            if meta.get("namespace") not in (None, "", ns):
                raise _bad_request(
                    "the namespace of the provided object does not match the namespace "
                    "sent on the request"
                )
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        with self._lock:
            if not meta.get("name"):
                gen = meta.get("generateName")
                if not gen:
                    raise _invalid(
                        rt, "", "metadata.name", "Required value: name or generateName is required"
                    )
                while True:
                    name = gen + "".join(self._rand.choice(_GEN_ALPHABET) for _ in range(5))
                    if (ns, name) not in self._bucket(rt):
                        break
                meta["name"] = name
            name = meta["name"]
            self._apply_defaults(rt, obj)
            self._validate(rt, obj)
            if rt.namespaced and ("", ns) not in self._objects["namespaces"]:
                raise ApiError(
                    404,
                    "NotFound",
                    f'namespaces "{ns}" not found',
                    details={"name": ns, "kind": "namespaces"},
                )
            if (ns, name) in self._bucket(rt):
                raise ApiError(
                    409,
                    "AlreadyExists",
                    f'{rt.qualified} "{name}" already exists',
                    details={"name": name, "group": rt.group, "kind": rt.plural},
                )
            if self.strict_status and rt.status_subresource and rt.key != "namespaces":
                obj.pop("status", None)
                if rt.key == "pods":
                    obj["status"] = {"phase": "Pending"}
            for k in ("resourceVersion", "deletionTimestamp", "selfLink"):
                meta.pop(k, None)
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = _ts(self._clock())
            if rt.has_generation:
                meta["generation"] = 1
            else:
                meta.pop("generation", None)
            if dry_run:
                return obj
            meta["resourceVersion"] = str(self._next_rv())
            self._bucket(rt)[(ns, name)] = obj
            self._append(rt, EventType.ADDED, obj, None)
            log.debug(
                "apiserver.created resource=%s ns=%s name=%s rv=%s",
                rt.key,
                ns,
                name,
                meta["resourceVersion"],
            )
            return copy.deepcopy(obj)

    def _write(
        self,
        rt: ResourceType,
        ns: str,
        name: str,
        old: Obj,
        new: Obj,
        *,
        subresource: str | None,
        require_rv: bool,
    ) -> Obj:
        """Validate `new` against `old` and store it; the caller holds the lock."""
        if not isinstance(new, dict):
            raise _bad_request("the body of the request was not a JSON object")
        self._check_kind(rt, new)
        new = copy.deepcopy(new)
        new["kind"], new["apiVersion"] = rt.kind, rt.api_version
        meta = new.get("metadata")
        if not isinstance(meta, dict):
            meta = new["metadata"] = {}
        body_name = meta.get("name") or name
        if body_name != name:
            raise _bad_request(
                f"the name of the object ({body_name}) does not match the name on the URL ({name})"
            )
        if rt.namespaced and meta.get("namespace") not in (None, "", ns):
            raise _bad_request(
                "the namespace of the provided object does not match the "
                "namespace sent on the request"
            )
        sent_rv = meta.get("resourceVersion")
        if sent_rv:
            if str(sent_rv) != old["metadata"]["resourceVersion"]:
                raise _conflict(rt, name)
        elif require_rv:
            raise _invalid(
                rt,
                name,
                "metadata.resourceVersion",
                "Invalid value: 0x0: must be specified for an update",
            )
        old_meta = old["metadata"]
        if subresource == "status":
            merged = dict(old)
            if "status" in new:
                merged["status"] = new["status"]
            else:
                merged.pop("status", None)
            new = copy.deepcopy(merged)
            meta = new["metadata"] = dict(old_meta)
        else:
            for k in ("uid", "creationTimestamp", "name", "namespace", "generation"):
                if k in old_meta:
                    meta[k] = old_meta[k]
                else:
                    meta.pop(k, None)
            meta.pop("deletionTimestamp", None)
            self._apply_defaults(rt, new)
            if self.strict_status and rt.status_subresource:
                if "status" in old:
                    new["status"] = old["status"]
                else:
                    new.pop("status", None)
            self._validate(rt, new)
            if rt.has_generation and _body_of(new) != _body_of(old):
                meta["generation"] = int(old_meta.get("generation", 0)) + 1
        meta["resourceVersion"] = old_meta["resourceVersion"]
        if _same(new, old):
            return copy.deepcopy(old)  # a no-op write: no new version, no event
        meta["resourceVersion"] = str(self._next_rv())
        self._bucket(rt)[(ns, name)] = new
        self._append(rt, EventType.MODIFIED, new, old)
        return copy.deepcopy(new)

    def update(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        body: Obj,
        *,
        subresource: str | None = None,
    ) -> Obj:
        """PUT: 409 Conflict when body's resourceVersion is stale; custom resources need one."""
        ns = self._ns(rt, namespace)
        with self._lock:
            old = self._bucket(rt).get((ns, name))
            if old is None:
                raise _not_found(rt, name)
            return self._write(
                rt, ns, name, old, body, subresource=subresource, require_rv=rt.custom
            )

    def patch(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        patch: Any,
        *,
        patch_type: PatchType,
        subresource: str | None = None,
    ) -> Obj:
        ns = self._ns(rt, namespace)
        with self._lock:
            old = self._bucket(rt).get((ns, name))
            if old is None:
                if patch_type is PatchType.APPLY and subresource is None:
                    return self.create(rt, namespace, patch)
                raise _not_found(rt, name)
            if patch_type is PatchType.JSON:
                try:
                    new = json_patch(old, patch)
                except TypeError as e:
                    raise _bad_request(str(e)) from e
                except (ValueError, IndexError, KeyError) as e:
                    raise ApiError(
                        422,
                        "Invalid",
                        f"the server rejected our request due to an error in our request: {e}",
                    ) from e
            else:
                if not isinstance(patch, dict):
                    raise _bad_request(
                        "json: cannot unmarshal array into Go value of type map[string]interface {}"
                    )
                new = merge_patch(old, patch)
            # A patch that sets metadata.resourceVersion is a precondition, like PUT.
            new_meta = new.get("metadata") if isinstance(new, dict) else None
            if isinstance(new_meta, dict) and new_meta.get("resourceVersion") in (None, ""):
                new_meta["resourceVersion"] = old["metadata"]["resourceVersion"]
            return self._write(rt, ns, name, old, new, subresource=subresource, require_rv=False)

    def delete(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        *,
        preconditions: Obj | None = None,
    ) -> Obj:
        """Immediate deletion (no grace period, no finalizers); namespaces cascade."""
        ns = self._ns(rt, namespace)
        with self._lock:
            old = self._bucket(rt).get((ns, name))
            if old is None:
                raise _not_found(rt, name)
            pre = preconditions or {}
            if pre.get("uid") and pre["uid"] != old["metadata"].get("uid"):
                raise ApiError(
                    409,
                    "Conflict",
                    f"Precondition failed: UID in precondition: "
                    f"{pre['uid']}, UID in object meta: {old['metadata'].get('uid')}",
                )
            if (
                pre.get("resourceVersion")
                and pre["resourceVersion"] != old["metadata"]["resourceVersion"]
            ):
                raise _conflict(rt, name)
            if rt.key == "namespaces":
                for other in RESOURCES:
                    if other.namespaced:
                        for key in sorted(k for k in self._bucket(other) if k[0] == name):
                            self._delete_locked(other, key)
            return self._delete_locked(rt, (ns, name))

    def _delete_locked(self, rt: ResourceType, key: tuple[str, str]) -> Obj:
        old = self._bucket(rt).pop(key)
        gone = dict(old)
        gone["metadata"] = {**old["metadata"], "resourceVersion": str(self._next_rv())}
        self._append(rt, EventType.DELETED, gone, old)
        log.debug("apiserver.deleted resource=%s ns=%s name=%s", rt.key, key[0], key[1])
        return copy.deepcopy(gone)

    def delete_collection(
        self,
        rt: ResourceType,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> builtins.list[Obj]:
        with self._lock:
            items, _ = self.list(
                rt,
                namespace=namespace,
                label_selector=label_selector,
                field_selector=field_selector,
                copy_=False,
            )
            return [
                self.delete(rt, o["metadata"].get("namespace"), o["metadata"]["name"])
                for o in items
            ]

    # --------------------------------------------------------------- watch

    def watch(
        self,
        rt: ResourceType,
        *,
        namespace: str | None = None,
        resource_version: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        timeout: float = 1800.0,
        bookmarks: bool = False,
        bookmark_interval: float = 60.0,
        send_initial_events: bool = False,
        stop: threading.Event | None = None,
    ) -> Iterator[Obj]:
        """Watch events as dicts `{"type", "object"}`; parses selectors eagerly (400s raise here).

        No resourceVersion (or "0"): synthetic ADDED for current objects, then live
        events. resourceVersion N: the logged events after N, or one ERROR 410.
        """
        filt = Filter(
            namespace if rt.namespaced else None,
            parse_label_selector(label_selector),
            parse_field_selector(rt, field_selector),
        )
        if resource_version not in (None, "", "0"):
            try:
                start = int(str(resource_version))
            except ValueError as e:
                raise _bad_request(f"invalid resource version: {resource_version}") from e
        else:
            start = None
        return self._watch_iter(
            rt,
            filt,
            start,
            timeout=timeout,
            bookmarks=bookmarks,
            bookmark_interval=bookmark_interval,
            send_initial_events=send_initial_events,
            stop=stop or threading.Event(),
        )

    def _expired(self, start: int) -> Obj:
        return {
            "type": "ERROR",
            "object": ApiError(
                410,
                "Expired",
                f"too old resource version: {start} ({self._compacted_rv + 1})",
            ).status(),
        }

    def _bookmark(self, rt: ResourceType, rv: int, *, initial_end: bool = False) -> Obj:
        meta: Obj = {"resourceVersion": str(rv)}
        if initial_end:
            meta["annotations"] = {"k8s.io/initial-events-end": "true"}
        return {
            "type": "BOOKMARK",
            "object": {"kind": rt.kind, "apiVersion": rt.api_version, "metadata": meta},
        }

    def _watch_iter(
        self,
        rt: ResourceType,
        filt: Filter,
        start: int | None,
        *,
        timeout: float,
        bookmarks: bool,
        bookmark_interval: float,
        send_initial_events: bool,
        stop: threading.Event,
    ) -> Iterator[Obj]:
        deadline = time.monotonic() + timeout
        cond = self._conds[rt.key]
        with self._lock:
            if start is not None and start < self._compacted_rv:
                yield self._expired(start)
                return
            if start is None or send_initial_events:
                snapshot = [o for _, o in sorted(self._bucket(rt).items()) if filt.matches(o)]
                cursor = self._rv
            else:
                snapshot, cursor = [], start
        for obj in snapshot:
            yield {"type": "ADDED", "object": obj}
        if send_initial_events and bookmarks:
            yield self._bookmark(rt, cursor, initial_end=True)
        next_bookmark = time.monotonic() + bookmark_interval
        while True:
            batch: builtins.list[Obj] = []
            with self._lock:
                while not stop.is_set():
                    if cursor < self._compacted_rv:
                        # The log was trimmed past this watcher: it must relist.
                        batch = [self._expired(cursor)]
                        break
                    if cursor < self._rv:
                        first = self._log[0].rv if self._log else self._rv + 1
                        for entry in self._log[cursor + 1 - first :]:
                            if entry.resource == rt.key:
                                ev = self._event_for(entry, filt)
                                if ev is not None:
                                    batch.append(ev)
                        cursor = self._rv
                        if batch:
                            break
                    now = time.monotonic()
                    if now >= deadline or (bookmarks and now >= next_bookmark):
                        break
                    wake = min(deadline, next_bookmark) if bookmarks else deadline
                    cond.wait(max(0.0, wake - now))
                rv_now = cursor
            if stop.is_set():
                return
            yield from batch
            if batch and batch[-1]["type"] == "ERROR":
                return
            now = time.monotonic()
            if now >= deadline:
                if bookmarks:
                    yield self._bookmark(rt, rv_now)
                return
            if bookmarks and now >= next_bookmark:
                yield self._bookmark(rt, rv_now)
                next_bookmark = now + bookmark_interval

    @staticmethod
    def _event_for(entry: LogEntry, filt: Filter) -> Obj | None:
        new_match = filt.matches(entry.obj)
        if entry.type is EventType.MODIFIED:
            old_match = entry.old is not None and filt.matches(entry.old)
            if new_match and old_match:
                return {"type": "MODIFIED", "object": entry.obj}
            if new_match:
                return {"type": "ADDED", "object": entry.obj}
            if old_match:
                return {"type": "DELETED", "object": entry.obj}
            return None
        if entry.type is EventType.DELETED:
            return (
                {"type": "DELETED", "object": entry.obj}
                if (entry.old is not None and filt.matches(entry.old))
                else None
            )
        return {"type": entry.type.value, "object": entry.obj} if new_match else None

    def wake_watchers(self) -> None:
        """Make every waiting watcher re-check its stop flag."""
        self._wake_all()

    # --------------------------------------------------------- persistence

    @property
    def dirty(self) -> threading.Event:
        """Set by every write; a saver clears it."""
        return self._dirty

    def snapshot(self) -> Obj:
        with self._lock:
            return {
                "format": _STATE_FORMAT,
                "resourceVersion": self._rv,
                "compactedResourceVersion": self._compacted_rv,
                "objects": {
                    key: [o for _, o in sorted(bucket.items())]
                    for key, bucket in self._objects.items()
                    if bucket
                },
                "events": [
                    {
                        "rv": e.rv,
                        "resource": e.resource,
                        "type": e.type.value,
                        "object": e.obj,
                        "old": e.old,
                    }
                    for e in self._log
                ],
            }

    def save(self, path: str | Path) -> None:
        """Write the state atomically (temp file + rename)."""
        p = Path(path)
        self._dirty.clear()
        data = json.dumps(self.snapshot(), separators=(",", ":"))
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(data)
        os.replace(tmp, p)

    def restore(self, data: Obj, *, source: str = "state") -> None:
        """Replace the whole state with a `snapshot()`; keeps the resourceVersion line."""
        if data.get("format") != _STATE_FORMAT:
            raise ValueError(f"{source}: format: unsupported state format {data.get('format')!r}")
        objects: dict[str, dict[tuple[str, str], Obj]] = {rt.key: {} for rt in RESOURCES}
        for key, items in (data.get("objects") or {}).items():
            if key not in objects:
                raise ValueError(f"{source}: objects.{key}: unknown resource")
            for obj in items:
                meta = obj["metadata"]
                objects[key][(meta.get("namespace", ""), meta["name"])] = obj
        events = [
            LogEntry(int(e["rv"]), e["resource"], EventType(e["type"]), e["object"], e.get("old"))
            for e in data.get("events") or []
        ]
        with self._lock:
            self._objects = objects
            self._rv = int(data["resourceVersion"])
            self._log = events
            self._compacted_rv = int(data.get("compactedResourceVersion", self._rv))
            if events and events[0].rv - 1 > self._compacted_rv:
                self._compacted_rv = events[0].rv - 1
            if not events:
                self._compacted_rv = self._rv
            self._wake_all()

    @classmethod
    def load(cls, path: str | Path, **kwargs: Any) -> Store:
        """A store with the state saved at `path` (no initial namespaces added)."""
        p = Path(path)
        store = cls(initial_namespaces=(), **kwargs)
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON: {e}") from e
        store.restore(data, source=str(p))
        return store
