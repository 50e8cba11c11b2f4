"""Hostile input to the real `felix-lite` process: never a traceback, always a
line naming the object and the field.

Each case runs the CLI as a subprocess (as a user or an outside checker
would) on a file next to a valid policy, and checks: no "Traceback" on stderr,
exit code 1, every `rejected:` line has the form `rejected: <kind> <ns/name>:
<field path>: <message>`, the expected field is named, and the valid policy is
still rendered.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from felix_lite.netlab.e2e import model_docs, upstream_model

CLI = [sys.executable, "-m", "felix_lite.cli"]
REJECTED = re.compile(
    r"^rejected: (networkpolicy|pod|namespace) [^ :]*/?[^ :]*: "
    r"(metadata|spec|status|apiVersion)[\w.\[\]/-]*: \S.*$"
)
GOOD = {
    "apiVersion": "networking.k8s.io/v1",
    "kind": "NetworkPolicy",
    "metadata": {"namespace": "y", "name": "good"},
    "spec": {"podSelector": {}},
}


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def render(*files: Path) -> subprocess.CompletedProcess[str]:
    """Render `files` after the x/y/z model (pods, so policies get chains)."""
    model = files[0].parent / "model.yaml"
    if not model.exists():
        model.write_text(yaml.safe_dump_all(model_docs(upstream_model())))
    args = ["policy", "render", "--node", "node-1", "--format", "json", "-f", str(model)]
    for f in files:
        args += ["-f", str(f)]
    return cli(*args)


def np(spec: Any, *, name: str = "h", ns: str = "x", **top: Any) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"namespace": ns, "name": name},
        "spec": spec,
        **top,
    }


def ingress_ports(*ports: Any) -> dict[str, Any]:
    return {"podSelector": {}, "ingress": [{"ports": list(ports)}]}


def ingress_from(*peers: Any) -> dict[str, Any]:
    return {"podSelector": {}, "ingress": [{"from": list(peers)}]}


def selector(sel: Any) -> dict[str, Any]:
    return {"podSelector": sel}


def _recursive() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


# (id, hostile document, field path expected in the rejection)
CASES: list[tuple[str, dict[str, Any], str]] = [
    ("spec-string", np("x"), "spec"),
    ("spec-list", np([1, 2]), "spec"),
    ("podSelector-list", np(selector([])), "spec.podSelector"),
    ("podSelector-string", np(selector("app=web")), "spec.podSelector"),
    ("matchLabels-list", np(selector({"matchLabels": ["a"]})), "spec.podSelector.matchLabels"),
    (
        "matchLabels-int-value",
        np(selector({"matchLabels": {"a": 1}})),
        "spec.podSelector.matchLabels[a]",
    ),
    (
        "matchLabels-null-value",
        np(selector({"matchLabels": {"a": None}})),
        "spec.podSelector.matchLabels[a]",
    ),
    (
        "matchLabels-int-key",
        np(selector({"matchLabels": {1: "a"}})),
        "spec.podSelector.matchLabels",
    ),
    (
        "matchExpressions-map",
        np(selector({"matchExpressions": {"key": "a"}})),
        "spec.podSelector.matchExpressions",
    ),
    (
        "operator-like",
        np(selector({"matchExpressions": [{"key": "a", "operator": "Like", "values": ["b"]}]})),
        "spec.podSelector.matchExpressions[0].operator",
    ),
    (
        "operator-missing",
        np(selector({"matchExpressions": [{"key": "a"}]})),
        "spec.podSelector.matchExpressions[0].operator",
    ),
    (
        "values-on-exists",
        np(selector({"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["b"]}]})),
        "spec.podSelector.matchExpressions[0].values",
    ),
    (
        "in-without-values",
        np(selector({"matchExpressions": [{"key": "a", "operator": "In"}]})),
        "spec.podSelector.matchExpressions[0].values",
    ),
    (
        "values-string",
        np(selector({"matchExpressions": [{"key": "a", "operator": "In", "values": "b"}]})),
        "spec.podSelector.matchExpressions[0].values",
    ),
    ("ports-map", np({"podSelector": {}, "ingress": [{"ports": {}}]}), "spec.ingress[0].ports"),
    ("port-true", np(ingress_ports({"port": True})), "spec.ingress[0].ports[0].port"),
    ("port-70000", np(ingress_ports({"port": 70000})), "spec.ingress[0].ports[0].port"),
    ("port-0", np(ingress_ports({"port": 0})), "spec.ingress[0].ports[0].port"),
    ("port-empty", np(ingress_ports({"port": ""})), "spec.ingress[0].ports[0].port"),
    ("port-float", np(ingress_ports({"port": 80.5})), "spec.ingress[0].ports[0].port"),
    ("port-list", np(ingress_ports({"port": [80]})), "spec.ingress[0].ports[0].port"),
    ("port-name-upper", np(ingress_ports({"port": "HTTP"})), "spec.ingress[0].ports[0].port"),
    ("port-name-long", np(ingress_ports({"port": "a" * 16})), "spec.ingress[0].ports[0].port"),
    ("protocol-icmp", np(ingress_ports({"protocol": "ICMP"})), "spec.ingress[0].ports[0].protocol"),
    ("protocol-lower", np(ingress_ports({"protocol": "tcp"})), "spec.ingress[0].ports[0].protocol"),
    ("protocol-int", np(ingress_ports({"protocol": 6})), "spec.ingress[0].ports[0].protocol"),
    (
        "endport-below",
        np(ingress_ports({"port": 90, "endPort": 80})),
        "spec.ingress[0].ports[0].endPort",
    ),
    ("endport-no-port", np(ingress_ports({"endPort": 80})), "spec.ingress[0].ports[0].endPort"),
    (
        "endport-named",
        np(ingress_ports({"port": "web", "endPort": 80})),
        "spec.ingress[0].ports[0].endPort",
    ),
    (
        "endport-70000",
        np(ingress_ports({"port": 80, "endPort": 70000})),
        "spec.ingress[0].ports[0].endPort",
    ),
    (
        "cidr-prefix-40",
        np(ingress_from({"ipBlock": {"cidr": "1.2.3.4/40"}})),
        "spec.ingress[0].from[0].ipBlock.cidr",
    ),
    (
        "cidr-no-prefix",
        np(ingress_from({"ipBlock": {"cidr": "1.2.3.4"}})),
        "spec.ingress[0].from[0].ipBlock.cidr",
    ),
    (
        "cidr-int",
        np(ingress_from({"ipBlock": {"cidr": 10}})),
        "spec.ingress[0].from[0].ipBlock.cidr",
    ),
    ("cidr-missing", np(ingress_from({"ipBlock": {}})), "spec.ingress[0].from[0].ipBlock.cidr"),
    (
        "except-outside",
        np(ingress_from({"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}})),
        "spec.ingress[0].from[0].ipBlock.except[0]",
    ),
    (
        "except-equal",
        np(ingress_from({"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.0.0/8"]}})),
        "spec.ingress[0].from[0].ipBlock.except[0]",
    ),
    (
        "except-string",
        np(ingress_from({"ipBlock": {"cidr": "10.0.0.0/8", "except": "10.1.0.0/16"}})),
        "spec.ingress[0].from[0].ipBlock.except",
    ),
    (
        "except-v6-in-v4",
        np(ingress_from({"ipBlock": {"cidr": "10.0.0.0/8", "except": ["::/64"]}})),
        "spec.ingress[0].from[0].ipBlock.except[0]",
    ),
    ("peer-empty", np(ingress_from({})), "spec.ingress[0].from[0]"),
    (
        "peer-block-and-selector",
        np(ingress_from({"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}})),
        "spec.ingress[0].from[0]",
    ),
    (
        "from-string",
        np({"podSelector": {}, "ingress": [{"from": "everyone"}]}),
        "spec.ingress[0].from",
    ),
    ("ingress-string", np({"podSelector": {}, "ingress": "all"}), "spec.ingress"),
    ("egress-rule-int", np({"podSelector": {}, "egress": [1]}), "spec.egress[0]"),
    (
        "policyTypes-sideways",
        np({"podSelector": {}, "policyTypes": ["Sideways"]}),
        "spec.policyTypes[0]",
    ),
    ("policyTypes-string", np({"podSelector": {}, "policyTypes": "Ingress"}), "spec.policyTypes"),
    (
        "policyTypes-duplicate",
        np({"podSelector": {}, "policyTypes": ["Ingress", "Ingress"]}),
        "spec.policyTypes[1]",
    ),
    (
        "metadata-missing",
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "spec": {"podSelector": {}},
        },
        "metadata.name",
    ),
    (
        "metadata-string",
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": "x",
            "spec": {"podSelector": {}},
        },
        "metadata",
    ),
    (
        "name-list",
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": ["a"], "namespace": "x"},
            "spec": {},
        },
        "metadata.name",
    ),
    ("unicode-name", np({"podSelector": {}}, name="pölicy-ü"), "metadata.name"),
    ("unicode-namespace", np({"podSelector": {}}, ns="名前"), "metadata.namespace"),
    ("recursive-ingress", np({"podSelector": {}, "ingress": _recursive()}), "spec.ingress[0]"),
    (
        "unicode-label",
        np(selector({"matchLabels": {"ключ": "значение"}})),
        "spec.podSelector.matchLabels[ключ]",
    ),
    (
        "huge-label-value",
        np(selector({"matchLabels": {"app": "v" * 200_000}})),
        "spec.podSelector.matchLabels[app]",
    ),
    (
        "huge-label-key",
        np(selector({"matchLabels": {"k" * 100_000: "v"}})),
        "spec.podSelector.matchLabels[kkkk",
    ),
    ("api-version-wrong", np({"podSelector": {}}, apiVersion="extensions/v1beta1"), "apiVersion"),
    (
        "pod-bad-ip",
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"namespace": "x", "name": "p"},
            "status": {"podIP": "999.1.1.1"},
        },
        "status.podIP",
    ),
    (
        "pod-port-string",
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"namespace": "x", "name": "p"},
            "spec": {"containers": [{"ports": [{"containerPort": "80"}]}]},
        },
        "spec.containers[0].ports[0].containerPort",
    ),
    (
        "pod-hostnetwork-string",
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"namespace": "x", "name": "p"},
            "spec": {"hostNetwork": "yes"},
        },
        "spec.hostNetwork",
    ),
    (
        "namespace-bad-label",
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": "x", "labels": {"ns": "x y"}},
        },
        "metadata.labels[ns]",
    ),
]


@pytest.mark.parametrize(("doc", "field"), [(d, f) for _, d, f in CASES], ids=[c[0] for c in CASES])
def test_hostile_object_is_rejected_by_field(tmp_path: Path, doc: Any, field: str) -> None:
    f = tmp_path / "h.yaml"
    f.write_text(yaml.safe_dump_all([doc, GOOD], allow_unicode=True))
    res = render(f)
    assert "Traceback" not in res.stderr
    assert res.returncode == 1, res.stderr
    lines = res.stderr.splitlines()
    assert lines, "no rejection reported"
    for line in lines:
        assert REJECTED.match(line), line
        assert len(line) < 600, f"error line of {len(line)} characters"
    assert any(f": {field}" in line for line in lines), lines
    chains = json.loads(res.stdout)["chains"]
    assert "policy y/good ingress" in {c["description"] for c in chains.values()}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (bytes(range(256)) * 8, "not valid YAML"),
        (b"\x00\x01\x02", "not valid YAML"),
        (b"just a scalar\n", "document 0: expected a mapping"),
        (b"[1, 2]\n", "document 0: expected a mapping"),
        (b"{{{{", "not valid YAML"),
        (b"- &a [*a]\n", "document 0: expected a mapping"),  # recursive alias
        (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
        (b"[" * 40000 + b"]" * 40000, "nested too deeply"),  # libyaml would segfault
        (
            "kind: NetworkPolicy\nmetadata: {name: \udcff}\n".encode("utf-8", "surrogateescape"),
            "not valid YAML",
        ),
    ],
    ids=[
        "binary",
        "nul-bytes",
        "scalar",
        "top-list",
        "broken",
        "recursive",
        "deep",
        "deeper",
        "bad-utf8",
    ],
)
def test_unreadable_files_give_one_line(tmp_path: Path, content: bytes, expected: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_bytes(content)
    res = render(f)
    assert "Traceback" not in res.stderr
    assert res.returncode == 1
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) >= 1
    first = lines[0]
    assert first.startswith(f"felix-lite: error: {f}: ")
    assert expected in first


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (
            {"apiVersion": "v1", "metadata": {"name": "a", "namespace": "x"}, "spec": {}},
            "rejected: object x/a: kind: required",
        ),
        ({"kind": 5, "metadata": {"name": "a"}}, "rejected: object a: kind: must be a string"),
        ({"kind": ["NetworkPolicy"]}, "rejected: object <unnamed>: kind: must be a string"),
    ],
    ids=["kind-missing", "kind-int", "kind-list"],
)
def test_objects_without_kind_are_reported(tmp_path: Path, doc: Any, expected: str) -> None:
    f = tmp_path / "k.yaml"
    f.write_text(yaml.safe_dump_all([doc, GOOD]))
    res = render(f)
    assert "Traceback" not in res.stderr
    assert res.returncode == 1
    assert res.stderr.splitlines() == [expected]
    assert "policy y/good ingress" in res.stdout


def test_other_kinds_are_ignored_quietly(tmp_path: Path) -> None:
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": "odd"}
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump_all([svc, GOOD]))
    res = render(f)
    assert (res.returncode, res.stderr) == (0, "")


def test_bad_command_line_is_usage_error_not_traceback(tmp_path: Path) -> None:
    for args in (
        ["policy", "render", "--node", "n"],  # -f missing
        ["policy", "render", "--node", "n", "-f", str(tmp_path), "--format", "xml"],
        ["policy", "explain", "--from", "x/a", "--to", "x/b", "--port", "http", "-f", "."],
        [
            "policy",
            "explain",
            "--from",
            "x/a",
            "--to",
            "x/b",
            "--port",
            "80",
            "--protocol",
            "icmp",
            "-f",
            ".",
        ],
        ["policy"],
        ["nonsense"],
    ):
        res = cli(*args)
        assert "Traceback" not in res.stderr, args
        assert res.returncode == 2, (args, res.stderr)
        assert "usage:" in res.stderr


def _many_policies(n: int) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for i in range(n):
        ns = "xyz"[i % 3]
        docs.append(
            np(
                {
                    "podSelector": {"matchLabels": {"pod": "abc"[i % 3]}},
                    "policyTypes": ["Ingress", "Egress"],
                    "ingress": [
                        {
                            "from": [
                                {
                                    "namespaceSelector": {"matchLabels": {"team": f"t{i % 50}"}},
                                    "podSelector": {"matchLabels": {"app": f"a{i % 70}"}},
                                },
                                {
                                    "ipBlock": {
                                        "cidr": f"10.{i % 250}.0.0/16",
                                        "except": [f"10.{i % 250}.1.0/24"],
                                    }
                                },
                            ],
                            "ports": [{"port": 80 + i % 5}, {"port": "serve-80-tcp"}],
                        }
                    ],
                    "egress": [{"to": [{"podSelector": {"matchLabels": {"app": f"a{i % 90}"}}}]}],
                },
                name=f"p{i}",
                ns=ns,
            )
        )
    return docs


@pytest.mark.slow
def test_ten_thousand_policies_render_quickly(tmp_path: Path) -> None:
    f = tmp_path / "many.yaml"
    # JSON is YAML: written and parsed far faster than block YAML.
    f.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "List",
                "items": [*model_docs(upstream_model()), *_many_policies(10_000)],
            }
        )
    )
    t0 = time.monotonic()
    res = render(f)
    elapsed = time.monotonic() - t0
    assert (res.returncode, res.stderr) == (0, "")
    chains = json.loads(res.stdout)["chains"]
    assert sum(1 for c in chains.values() if c["description"].startswith("policy ")) == 20_000
    # A sanity bound, generous for a loaded 2-core machine (measured ~3 s idle).
    assert elapsed < 30, f"render of 10k policies took {elapsed:.1f}s"
