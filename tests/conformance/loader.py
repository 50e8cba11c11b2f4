"""Load the NetworkPolicy conformance cases ported from the upstream e2e suite.

The cases are data (`cases/*.yaml`, one per upstream `It()`), so one set of
truth tables drives both the pure oracle test (tests/unit) and the kernel
runner (tests/functional/test_conformance.py). The loader is strict: a typo in
a case must fail loudly with the file and field, never silently widen or narrow
what a test checks.

Model (upstream `model.go`): namespaces x, y, z labelled `ns=<name>` and
`kubernetes.io/metadata.name=<name>`; pods a, b, c in each, labelled
`pod=<name>`, each serving ports 80 and 81 over TCP, UDP and SCTP with
container ports named `serve-<port>-<protocol>`.
"""

from __future__ import annotations

import copy
import ipaddress
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CASES_DIR = Path(__file__).resolve().parent / "cases"

NAMESPACES: tuple[str, ...] = ("x", "y", "z")
POD_NAMES: tuple[str, ...] = ("a", "b", "c")
PODS: list[str] = [f"{ns}/{pod}" for ns in NAMESPACES for pod in POD_NAMES]
PORTS: tuple[int, ...] = (80, 81)
PROTOCOLS: tuple[str, ...] = ("TCP", "UDP", "SCTP")

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"

IGNORE_LOOPBACK = True
"""Upstream (`ignoreLoopback` in network_policy.go) never fails a test on a
pod-to-itself cell: CNIs disagree on whether policy applies to loopback. The
expected matrices still carry upstream's value for those cells (they agree with
the spec); a runner probing real traffic should skip them when comparing."""

Cell = tuple[str, str]


class CaseFormatError(ValueError):
    """A malformed case file; the message names the file and the field path."""

    def __init__(self, path: Path | str, field: str, message: str) -> None:
        self.path = Path(path)
        self.field = field
        self.message = message
        where = f"{self.path.name}: {field}" if field else self.path.name
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Probe:
    """One upstream `ValidateOrFail`: every pod to every pod on one port."""

    port: int
    protocol: str
    expected: dict[Cell, bool]


@dataclass(frozen=True)
class Step:
    """Changes to make (in this order: apply, then delete), then probes."""

    apply: list[dict[str, Any]]
    delete: list[dict[str, Any]]
    probes: list[Probe]


@dataclass(frozen=True)
class Case:
    name: str
    upstream: str
    steps: list[Step]
    path: Path


# --------------------------------------------------------------------------
# The model


def default_ips() -> dict[str, str]:
    """Deterministic addresses for the nine pods (10.244.1.2 .. 10.244.1.10)."""
    return {pod: f"10.244.1.{i + 2}" for i, pod in enumerate(PODS)}


def namespace_labels(ns: str) -> dict[str, str]:
    return {"ns": ns, NAMESPACE_NAME_LABEL: ns}


def pod_labels(name: str) -> dict[str, str]:
    return {"pod": name}


def _container(port: int, protocol: str) -> dict[str, Any]:
    proto = protocol.lower()
    return {
        "name": f"cont-{port}-{proto}",
        "image": "registry.k8s.io/e2e-test-images/agnhost:2.53",
        "ports": [{"containerPort": port, "name": f"serve-{port}-{proto}", "protocol": protocol}],
    }


def model_objects(
    ips: Mapping[str, str], node: str | Mapping[str, str] = "node-1"
) -> list[dict[str, Any]]:
    """The Namespace and Pod objects of the x/y/z model, as API dicts.

    `node` is one node name for every pod, or a mapping `"ns/pod" -> node`
    (a runner spreading pods over several nodes).
    """
    missing = [pod for pod in PODS if pod not in ips]
    if missing:
        raise ValueError(f"model_objects: ips: no address for {', '.join(missing)}")
    objects: list[dict[str, Any]] = []
    for ns in NAMESPACES:
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": ns, "labels": namespace_labels(ns)},
            }
        )
    for key in PODS:
        ns, name = key.split("/")
        node_name = node if isinstance(node, str) else node[key]
        ip = ips[key]
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": ns, "labels": pod_labels(name)},
                "spec": {
                    "nodeName": node_name,
                    "containers": [_container(p, proto) for p in PORTS for proto in PROTOCOLS],
                },
                "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
            }
        )
    return objects


def state_objects(
    case: Case,
    upto: int,
    ips: Mapping[str, str],
    node: str | Mapping[str, str] = "node-1",
) -> list[dict[str, Any]]:
    """The whole cluster (model + policies) after steps `0..upto` of `case`.

    Label changes replace the object's labels; an applied policy with an
    existing namespace/name replaces it (upstream `UpdatePolicy`).
    """
    objects = model_objects(ips, node)
    by_ref: dict[tuple[str, str, str], dict[str, Any]] = {}
    for obj in objects:
        meta = obj["metadata"]
        by_ref[(obj["kind"], meta.get("namespace", ""), meta["name"])] = obj
    policies: dict[tuple[str, str], dict[str, Any]] = {}
    for step in case.steps[: upto + 1]:
        for change in step.apply:
            kind = change["kind"]
            if kind == "NetworkPolicy":
                meta = change["metadata"]
                policies[(meta["namespace"], meta["name"])] = copy.deepcopy(change)
            else:
                target = by_ref[(kind, change.get("namespace", ""), change["name"])]
                target["metadata"]["labels"] = dict(change["labels"])
        for gone in step.delete:
            policies.pop((gone["namespace"], gone["name"]))
    return objects + list(policies.values())


def step_objects(
    step: Step, ips: Mapping[str, str], node: str | Mapping[str, str] = "node-1"
) -> list[dict[str, Any]]:
    """`step.apply` as full API objects (for `felix-lite lab apply`): a label
    change becomes the whole model Pod/Namespace carrying the new labels."""
    model = {
        (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]): o
        for o in model_objects(ips, node)
    }
    out = []
    for change in step.apply:
        if change["kind"] == "NetworkPolicy":
            out.append(copy.deepcopy(change))
            continue
        obj = copy.deepcopy(model[(change["kind"], change.get("namespace", ""), change["name"])])
        obj["metadata"]["labels"] = dict(change["labels"])
        out.append(obj)
    return out


def delete_objects(step: Step) -> list[dict[str, Any]]:
    """`step.delete` as API objects (for `felix-lite lab delete`)."""
    return [
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": ref["name"], "namespace": ref["namespace"]},
        }
        for ref in step.delete
    ]


# --------------------------------------------------------------------------
# Matrices


def _matches(selector: str, pod: str) -> bool:
    if selector == "*":
        return True
    if "/" in selector:
        return selector == pod
    return pod.split("/")[0] == selector


def build_matrix(default: bool, ops: Iterable[tuple[str, str, bool]]) -> dict[Cell, bool]:
    """Upstream `Reachability`: a default, then ExpectPeer-style overrides in order."""
    cells = {(src, dst): default for src in PODS for dst in PODS}
    for src_sel, dst_sel, allow in ops:
        for src in PODS:
            if not _matches(src_sel, src):
                continue
            for dst in PODS:
                if _matches(dst_sel, dst):
                    cells[(src, dst)] = allow
    return cells


def render_matrix(cells: Mapping[Cell, bool]) -> str:
    """Upstream `TruthTable.PrettyPrint`: rows are sources, `.` allowed, `X`
    denied, `?` missing."""
    lines = ["\t".join(["-", *PODS])]
    for src in PODS:
        row = [src]
        for dst in PODS:
            value = cells.get((src, dst))
            row.append("?" if value is None else "." if value else "X")
        lines.append("\t".join(row))
    return "\n".join(lines)


def mismatches(
    expected: Mapping[Cell, bool],
    observed: Mapping[Cell, bool],
    *,
    ignore_loopback: bool = IGNORE_LOOPBACK,
) -> list[Cell]:
    """Cells where `observed` differs from (or lacks) the expected value."""
    out = []
    for cell, want in expected.items():
        if ignore_loopback and cell[0] == cell[1]:
            continue
        if observed.get(cell) is not want:
            out.append(cell)
    return out


# --------------------------------------------------------------------------
# Loading and validation


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML keeps the last)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    out: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in out:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        out[key] = loader.construct_object(value_node, deep=True)
    return out


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

_PLACEHOLDER = re.compile(r"\{([A-Za-z]+):([^{}]*)\}")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class _Reader:
    """Validates one parsed case file; every error carries the field path."""

    def __init__(self, path: Path, ips: Mapping[str, str]) -> None:
        self.path = path
        self.ips = ips

    def fail(self, field: str, message: str) -> CaseFormatError:
        return CaseFormatError(self.path, field, message)

    def mapping(
        self,
        value: object,
        field: str,
        *,
        required: Iterable[str],
        optional: Iterable[str] = (),
    ) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(field, f"must be a mapping, got {type(value).__name__}")
        req = list(required)
        allowed = set(req) | set(optional)
        for key in value:
            if key not in allowed:
                raise self.fail(
                    _join(field, str(key)), f"unknown field (allowed: {_list(allowed)})"
                )
        for key in req:
            if key not in value:
                raise self.fail(_join(field, key), "required field missing")
        return value

    def string(self, value: object, field: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(field, f"must be a non-empty string, got {value!r}")
        return value

    def boolean(self, value: object, field: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(field, f"must be true or false, got {value!r}")
        return value

    def seq(self, value: object, field: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(field, f"must be a list, got {type(value).__name__}")
        return value

    def labels(self, value: object, field: str) -> dict[str, str]:
        if not isinstance(value, dict):
            raise self.fail(field, "must be a mapping of strings to strings")
        for key, val in value.items():
            if not isinstance(key, str) or not isinstance(val, str):
                raise self.fail(
                    _join(field, str(key)), f"label must be string: string, got {val!r}"
                )
        return dict(value)

    def selector(self, value: object, field: str) -> str:
        sel = self.string(value, field)
        if sel == "*" or sel in NAMESPACES or sel in PODS:
            return sel
        raise self.fail(
            field,
            f'must be "*", a namespace ({_list(NAMESPACES)}) or a pod ns/name '
            f"of the model, got {sel!r}",
        )

    # placeholders ------------------------------------------------------

    def substitute(self, value: Any, field: str) -> Any:
        if isinstance(value, dict):
            return {k: self.substitute(v, _join(field, str(k))) for k, v in value.items()}
        if isinstance(value, list):
            return [self.substitute(v, f"{field}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, str):
            return _PLACEHOLDER.sub(lambda m: self._expand(m, field), value)
        return value

    def _expand(self, match: re.Match[str], field: str) -> str:
        kind, arg = match.group(1), match.group(2)
        if kind == "ip":
            return self._ip(arg, field)
        if kind == "net":
            pod, _, length = arg.rpartition("/")
            if not length.isdigit() or not 0 <= int(length) <= 32:
                raise self.fail(field, f"placeholder {match.group(0)!r}: want {{net:ns/pod/LEN}}")
            net = ipaddress.ip_network(f"{self._ip(pod, field)}/{length}", strict=False)
            return str(net)
        raise self.fail(field, f"unknown placeholder {match.group(0)!r} (known: ip, net)")

    def _ip(self, pod: str, field: str) -> str:
        if pod not in PODS:
            raise self.fail(field, f"placeholder names unknown pod {pod!r}")
        if pod not in self.ips:
            raise self.fail(field, f"no IP given for pod {pod!r}")
        return self.ips[pod]

    # objects -----------------------------------------------------------

    def apply_object(self, value: object, field: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(field, "must be a mapping")
        kind = value.get("kind")
        if kind == "NetworkPolicy":
            obj = self.mapping(value, field, required=("apiVersion", "kind", "metadata", "spec"))
            if obj["apiVersion"] != "networking.k8s.io/v1":
                raise self.fail(_join(field, "apiVersion"), "must be networking.k8s.io/v1")
            meta = self.mapping(
                obj["metadata"], _join(field, "metadata"), required=("name", "namespace")
            )
            self.dns_name(meta["name"], _join(field, "metadata.name"))
            if meta["namespace"] not in NAMESPACES:
                raise self.fail(
                    _join(field, "metadata.namespace"),
                    f"must be one of {_list(NAMESPACES)}, got {meta['namespace']!r}",
                )
            if not isinstance(obj["spec"], dict):
                raise self.fail(_join(field, "spec"), "must be a mapping")
            out: dict[str, Any] = self.substitute(obj, field)
            return out
        if kind == "Pod":
            obj = self.mapping(value, field, required=("kind", "namespace", "name", "labels"))
            ref = f"{obj['namespace']}/{obj['name']}"
            if ref not in PODS:
                raise self.fail(_join(field, "name"), f"pod {ref!r} is not in the model")
            return {
                "kind": "Pod",
                "namespace": obj["namespace"],
                "name": obj["name"],
                "labels": self.labels(obj["labels"], _join(field, "labels")),
            }
        if kind == "Namespace":
            obj = self.mapping(value, field, required=("kind", "name", "labels"))
            if obj["name"] not in NAMESPACES:
                raise self.fail(
                    _join(field, "name"), f"namespace {obj['name']!r} is not in the model"
                )
            return {
                "kind": "Namespace",
                "name": obj["name"],
                "labels": self.labels(obj["labels"], _join(field, "labels")),
            }
        raise self.fail(
            _join(field, "kind"), f"must be NetworkPolicy, Pod or Namespace, got {kind!r}"
        )

    def dns_name(self, value: object, field: str) -> str:
        name = self.string(value, field)
        if len(name) > 253 or not _NAME.match(name):
            raise self.fail(field, f"not a valid object name: {name!r}")
        return name

    def delete_ref(self, value: object, field: str, live: set[tuple[str, str]]) -> dict[str, Any]:
        obj = self.mapping(value, field, required=("kind", "namespace", "name"))
        if obj["kind"] != "NetworkPolicy":
            raise self.fail(_join(field, "kind"), "only NetworkPolicy objects can be deleted")
        ref = (obj["namespace"], obj["name"])
        if ref not in live:
            raise self.fail(field, f"no NetworkPolicy {ref[0]}/{ref[1]} exists at this step")
        live.discard(ref)
        return {"kind": "NetworkPolicy", "namespace": ref[0], "name": ref[1]}

    def probe(self, value: object, field: str) -> Probe:
        obj = self.mapping(value, field, required=("port", "protocol", "expect"))
        port = obj["port"]
        if isinstance(port, bool) or port not in PORTS:
            raise self.fail(
                _join(field, "port"),
                f"must be a served port ({_list(map(str, PORTS))}), got {port!r}",
            )
        protocol = obj["protocol"]
        if protocol not in PROTOCOLS:
            raise self.fail(
                _join(field, "protocol"), f"must be one of {_list(PROTOCOLS)}, got {protocol!r}"
            )
        efield = _join(field, "expect")
        expect = self.mapping(obj["expect"], efield, required=("default",), optional=("ops",))
        default = self.boolean(expect["default"], _join(efield, "default"))
        ops = []
        for i, op in enumerate(self.seq(expect.get("ops", []), _join(efield, "ops"))):
            ofield = f"{_join(efield, 'ops')}[{i}]"
            entry = self.mapping(op, ofield, required=("from", "to", "allow"))
            ops.append(
                (
                    self.selector(entry["from"], _join(ofield, "from")),
                    self.selector(entry["to"], _join(ofield, "to")),
                    self.boolean(entry["allow"], _join(ofield, "allow")),
                )
            )
        return Probe(port=port, protocol=protocol, expected=build_matrix(default, ops))

    def case(self, data: object) -> Case:
        doc = self.mapping(data, "", required=("name", "upstream", "steps"))
        name = self.dns_name(doc["name"], "name")
        if self.path.suffix == ".yaml" and self.path.stem != name:
            raise self.fail("name", f"must match the file name {self.path.stem!r}")
        upstream = self.string(doc["upstream"], "upstream")
        raw_steps = self.seq(doc["steps"], "steps")
        if not raw_steps:
            raise self.fail("steps", "must not be empty")
        live: set[tuple[str, str]] = set()
        steps = []
        for i, raw in enumerate(raw_steps):
            field = f"steps[{i}]"
            step = self.mapping(raw, field, required=("probes",), optional=("apply", "delete"))
            applied = [
                self.apply_object(obj, f"{field}.apply[{j}]")
                for j, obj in enumerate(self.seq(step.get("apply", []), f"{field}.apply"))
            ]
            for obj in applied:
                if obj["kind"] == "NetworkPolicy":
                    live.add((obj["metadata"]["namespace"], obj["metadata"]["name"]))
            deleted = [
                self.delete_ref(obj, f"{field}.delete[{j}]", live)
                for j, obj in enumerate(self.seq(step.get("delete", []), f"{field}.delete"))
            ]
            probes = [
                self.probe(p, f"{field}.probes[{j}]")
                for j, p in enumerate(self.seq(step["probes"], f"{field}.probes"))
            ]
            if not probes:
                raise self.fail(f"{field}.probes", "must not be empty")
            steps.append(Step(apply=applied, delete=deleted, probes=probes))
        return Case(name=name, upstream=upstream, steps=steps, path=self.path)


def _join(field: str, key: str) -> str:
    return f"{field}.{key}" if field else key


def _list(items: Iterable[str]) -> str:
    return ", ".join(sorted(items))


def load_case(path: Path, ips: Mapping[str, str] | None = None) -> Case:
    """Load and validate one case file; placeholders use `ips` (default: `default_ips()`)."""
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise CaseFormatError(path, "", f"invalid YAML: {exc}") from exc
    return _Reader(path, default_ips() if ips is None else ips).case(data)


def load_cases(ips: Mapping[str, str] | None = None, *, directory: Path = CASES_DIR) -> list[Case]:
    """Every case in `directory`, sorted by name.

    `ips` maps "ns/pod" to the pod's address and fills the `{ip:ns/pod}` and
    `{net:ns/pod/LEN}` placeholders of ipBlock cases; None uses `default_ips()`.
    """
    cases = [load_case(path, ips) for path in sorted(directory.glob("*.yaml"))]
    seen: dict[str, Path] = {}
    for case in cases:
        if case.name in seen:
            raise CaseFormatError(case.path, "name", f"duplicate of {seen[case.name].name}")
        seen[case.name] = case.path
    return cases


def iter_probes(case: Case) -> Iterator[tuple[int, int, Probe]]:
    """(step index, probe index, probe) over a case, for parametrised tests."""
    for i, step in enumerate(case.steps):
        for j, probe in enumerate(step.probes):
            yield i, j, probe
