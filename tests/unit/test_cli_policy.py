"""`felix-lite policy render|explain`: output formats, exit codes, file handling.

In-process (`felix_lite.cli.main` with captured stdio): render and explain
touch no kernel state. Expectations are spelled out for hand-picked cases and
checked against `policy.evaluate` / `compile_ruleset` for random ones, so both
the CLI's plumbing (endpoint lookup by IP, protocol case, JSON shape, exit
codes) and its agreement with the library are covered.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from felix_lite.cli import main
from felix_lite.netlab.e2e import model_docs, upstream_model
from policy import render
from policy.compiler import compile_ruleset
from policy.evaluate import endpoint_for, evaluate
from policy.model import Protocol
from policy.parse import build_cluster
from tests.unit import strategies as S

MODEL = upstream_model()
NODE = "node-1"
IPS = {p.key: p.ip for p in MODEL.pods}


def netpol(ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"namespace": ns, "name": name},
        "spec": spec,
    }


DENY_X = netpol("x", "deny", {"podSelector": {}})
ALLOW_YB_TO_XA = netpol(
    "x",
    "allow-yb",
    {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [
            {
                "from": [
                    {
                        "namespaceSelector": {"matchLabels": {"ns": "y"}},
                        "podSelector": {"matchLabels": {"pod": "b"}},
                    }
                ],
                "ports": [{"port": 80}, {"port": "serve-81-udp", "protocol": "UDP"}],
            }
        ],
    },
)
BAD = netpol("x", "bad", {"podSelector": {}, "ingress": [{"ports": [{"port": 90, "endPort": 80}]}]})


def write(path: Path, docs: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    return write(tmp_path / "model.yaml", model_docs(MODEL))


def _render(capsys: pytest.CaptureFixture[str], *files: Path, fmt: str) -> tuple[int, str, str]:
    args = ["policy", "render", "--node", NODE, "--format", fmt]
    for f in files:
        args += ["-f", str(f)]
    return run(capsys, *args)


# --------------------------------------------------------------------------
# render


def test_render_json_is_the_compiled_ruleset(
    capsys: pytest.CaptureFixture[str], model_file: Path, tmp_path: Path
) -> None:
    pols = write(tmp_path / "pols.yaml", [DENY_X, ALLOW_YB_TO_XA])
    rc, out, err = _render(capsys, model_file, pols, fmt="json")
    assert (rc, err) == (0, "")
    got = json.loads(out)
    state, errors = build_cluster([*model_docs(MODEL), DENY_X, ALLOW_YB_TO_XA])
    assert errors == []
    want = compile_ruleset(state, NODE)
    assert set(got) == {"sets", "chains", "hooks"}
    assert {n: c["rules"] for n, c in got["chains"].items()} == {
        n: list(c.rules) for n, c in want.chains.items()
    }
    assert {
        n: (s["type"], sorted(s["members"]), sorted(s["nomatch"])) for n, s in got["sets"].items()
    } == {n: (s.type.value, sorted(s.members), sorted(s.nomatch)) for n, s in want.sets.items()}
    assert got["hooks"] == [
        {"table": "filter", "chain": "FORWARD", "rule": "-j FL-FORWARD"},
        {"table": "filter", "chain": "INPUT", "rule": "-j FL-INPUT"},
    ]
    descriptions = {c["description"] for c in got["chains"].values()}
    assert {"policy x/deny ingress", "policy x/allow-yb ingress"} <= descriptions
    # The peer set holds exactly y/b, the named-port set every pod's UDP/81.
    by_desc = {s["description"]: s for s in got["sets"].values()}
    assert by_desc["pods pod=b in namespaces ns=y"]["members"] == [IPS["y/b"]]
    assert sorted(by_desc["named port UDP/serve-81-udp"]["members"]) == sorted(
        f"{ip},udp:81" for ip in IPS.values()
    )


def test_render_restore_declares_every_chain_and_set(
    capsys: pytest.CaptureFixture[str], model_file: Path, tmp_path: Path
) -> None:
    pols = write(tmp_path / "pols.yaml", [DENY_X, ALLOW_YB_TO_XA])
    rc, out, _ = _render(capsys, model_file, pols, fmt="restore")
    assert rc == 0
    ipset_part, _, ipt_part = out.partition("# iptables-restore --noflush\n")
    assert ipset_part.startswith("# ipset restore\n")
    state, _ = build_cluster([*model_docs(MODEL), DENY_X, ALLOW_YB_TO_XA])
    rs = compile_ruleset(state, NODE)
    assert ipt_part == render.render_iptables_restore(rs, hook_inserts=rs.hooks)
    lines = ipt_part.splitlines()
    assert lines[0] == "*filter" and lines[-1] == "COMMIT"
    assert {ln[1:].split()[0] for ln in lines if ln.startswith(":")} == set(rs.chains)
    assert '-I FORWARD 1 -m comment --comment "felix-lite:hook" -j FL-FORWARD' in lines
    created = {ln.split()[1] for ln in ipset_part.splitlines() if ln.startswith("create ")}
    assert set(rs.sets) <= created


def test_render_human_counts(
    capsys: pytest.CaptureFixture[str], model_file: Path, tmp_path: Path
) -> None:
    pols = write(tmp_path / "pols.yaml", [DENY_X])
    rc, out, _ = _render(capsys, model_file, pols, fmt="human")
    assert rc == 0
    m = re.match(r"# (\d+) ipsets, (\d+) chains\n", out)
    assert m is not None
    assert int(m.group(2)) == out.count("\nchain FL-")
    assert int(m.group(1)) == out.count("\nipset fl-")
    assert "# policy x/deny ingress" in out


def test_render_rejects_one_object_and_renders_the_rest(
    capsys: pytest.CaptureFixture[str], model_file: Path, tmp_path: Path
) -> None:
    pols = write(tmp_path / "pols.yaml", [BAD, DENY_X])
    for fmt in ("json", "human", "restore"):
        rc, out, err = _render(capsys, model_file, pols, fmt=fmt)
        assert rc == 1
        assert err.splitlines() == [
            "rejected: networkpolicy x/bad: spec.ingress[0].ports[0].endPort: must be >= port"
        ]
        assert "policy x/deny" in out or fmt == "restore"
        assert "x/bad" not in out
    rc, out, _ = _render(capsys, model_file, pols, fmt="json")
    chains = json.loads(out)["chains"].values()
    assert [c["description"] for c in chains if c["description"].startswith("policy")] == [
        "policy x/deny ingress"
    ]


def test_render_of_other_node_has_no_pod_chains(
    capsys: pytest.CaptureFixture[str], model_file: Path, tmp_path: Path
) -> None:
    pols = write(tmp_path / "pols.yaml", [DENY_X])
    rc, out, _ = run(
        capsys,
        "policy",
        "render",
        "--node",
        "elsewhere",
        "-f",
        str(model_file),
        "-f",
        str(pols),
        "--format",
        "json",
    )
    assert rc == 0
    chains = json.loads(out)["chains"]
    assert not [n for n in chains if n.startswith(("FL-TW-", "FL-FW-", "FL-PI-", "FL-PE-"))]
    assert chains["FL-FROM-PODS"]["rules"] == ["-j DROP"]


# --------------------------------------------------------------------------
# -f handling


def _policy_descs(out: str) -> list[str]:
    return sorted(
        c["description"]
        for c in json.loads(out)["chains"].values()
        if c["description"].startswith("policy ")
    )


def test_f_directory_several_f_and_lists(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    d = tmp_path / "dir"
    d.mkdir()
    write(d / "a-model.yaml", model_docs(MODEL))
    write(d / "b-pol.yml", [DENY_X])
    (d / "ignored.txt").write_text("not: [yaml")  # not a manifest suffix
    extra = write(
        tmp_path / "list.yaml",
        [
            {
                "apiVersion": "v1",
                "kind": "List",
                "items": [netpol("y", "in-list", {"podSelector": {}})],
            },
            {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicyList",
                "items": [
                    {
                        "metadata": {"namespace": "z", "name": "typed-item"},
                        "spec": {"podSelector": {}},
                    }
                ],
            },
        ],
    )
    rc, out, err = run(
        capsys,
        "policy",
        "render",
        "--node",
        NODE,
        "-f",
        str(d),
        "-f",
        str(extra),
        "--format",
        "json",
    )
    assert (rc, err) == (0, "")
    assert _policy_descs(out) == [
        "policy x/deny ingress",
        "policy y/in-list ingress",
        "policy z/typed-item ingress",
    ]


def test_json_file_is_accepted(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    f = tmp_path / "objs.json"
    f.write_text(
        json.dumps({"apiVersion": "v1", "kind": "List", "items": [*model_docs(MODEL), DENY_X]})
    )
    rc, out, _ = run(capsys, "policy", "render", "--node", NODE, "-f", str(f), "--format", "json")
    assert rc == 0
    assert _policy_descs(out) == ["policy x/deny ingress"]


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"kind: [unclosed", "not valid YAML"),
        (b"\xff\xfe\x00binary\x00\x9c", "not valid YAML"),
        (b"- just\n- a list\n", "expected a mapping"),
        (b"42\n", "expected a mapping"),
    ],
    ids=["broken-yaml", "binary", "list-document", "scalar-document"],
)
def test_unreadable_file_is_one_clear_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: bytes, why: str
) -> None:
    f = tmp_path / "bad.yaml"
    f.write_bytes(content)
    rc, out, err = run(capsys, "policy", "render", "--node", NODE, "-f", str(f))
    assert rc == 1 and out == ""
    assert err.startswith(f"felix-lite: error: {f}: ")
    assert why in err


def test_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, _, err = run(capsys, "policy", "render", "--node", NODE, "-f", str(tmp_path / "nope"))
    assert rc == 1
    assert err == f"felix-lite: error: {tmp_path / 'nope'}: no such file or directory\n"


def test_object_without_kind_is_reported(
    capsys: pytest.CaptureFixture[str], model_file: Path, tmp_path: Path
) -> None:
    kindless = {k: v for k, v in DENY_X.items() if k != "kind"}
    f = write(tmp_path / "k.yaml", [kindless, netpol("y", "ok", {"podSelector": {}})])
    rc, out, err = run(
        capsys,
        "policy",
        "render",
        "--node",
        NODE,
        "-f",
        str(model_file),
        "-f",
        str(f),
        "--format",
        "json",
    )
    assert rc == 1
    assert err == "rejected: object x/deny: kind: required\n"
    assert _policy_descs(out) == ["policy y/ok ingress"]


# --------------------------------------------------------------------------
# explain


def _explain(
    capsys: pytest.CaptureFixture[str], files: list[Path], src: str, dst: str, *extra: str
) -> tuple[int, str, str]:
    args = ["policy", "explain", "--from", src, "--to", dst, *extra]
    for f in files:
        args += ["-f", str(f)]
    return run(capsys, *args)


@pytest.fixture
def pol_file(tmp_path: Path) -> Path:
    return write(tmp_path / "pols.yaml", [DENY_X, ALLOW_YB_TO_XA])


def test_explain_text_denied_and_allowed(
    capsys: pytest.CaptureFixture[str], model_file: Path, pol_file: Path
) -> None:
    rc, out, err = _explain(capsys, [model_file, pol_file], "y/a", "x/a", "--port", "80")
    assert (rc, err) == (0, "")
    assert out.splitlines() == [
        "y/a -> x/a TCP/80: DENIED",
        "  egress of y/a: allowed (not isolated: no Egress policy selects it)",
        "  ingress of x/a: DENIED (isolated by x/allow-yb, x/deny)",
        "    no ingress rule of these policies matches",
    ]
    rc, out, _ = _explain(capsys, [model_file, pol_file], "y/b", "x/a", "--port", "80")
    assert rc == 0
    assert out.splitlines()[0] == "y/b -> x/a TCP/80: ALLOWED"
    assert (
        "    allowed by x/allow-yb ingress rule 0: from pods [pod=b] in namespaces [ns=y]; "
        "ports TCP/80, UDP/serve-81-udp" in out.splitlines()
    )


def test_explain_json_shape(
    capsys: pytest.CaptureFixture[str], model_file: Path, pol_file: Path
) -> None:
    rc, out, _ = _explain(
        capsys, [model_file, pol_file], "y/b", "x/a", "--port", "81", "--protocol", "UDP", "--json"
    )
    assert rc == 0
    assert json.loads(out) == {
        "from": "y/b",
        "to": "x/a",
        "port": 81,
        "protocol": "UDP",
        "allowed": True,
        "egress": {"allowed": True, "isolated": False, "policies": [], "allowed_by": []},
        "ingress": {
            "allowed": True,
            "isolated": True,
            "policies": ["x/allow-yb", "x/deny"],
            "allowed_by": [{"policy": "x/allow-yb", "direction": "Ingress", "rule": 0}],
        },
    }
    # TCP/81 is not in the rule: denied.
    rc, out, _ = _explain(capsys, [model_file, pol_file], "y/b", "x/a", "--port", "81", "--json")
    assert json.loads(out)["allowed"] is False


def test_explain_pods_given_by_ip(
    capsys: pytest.CaptureFixture[str], model_file: Path, pol_file: Path
) -> None:
    rc, out, _ = _explain(capsys, [model_file, pol_file], IPS["y/b"], IPS["x/a"], "--port", "80")
    assert rc == 0
    assert out.splitlines()[0] == "y/b -> x/a TCP/80: ALLOWED"
    rc, out, _ = _explain(capsys, [model_file, pol_file], "203.0.113.9", "x/a", "--port", "80")
    assert rc == 0
    assert out.splitlines()[:2] == [
        "203.0.113.9 -> x/a TCP/80: DENIED",
        "  egress of 203.0.113.9: not checked (not a pod network endpoint)",
    ]


@pytest.mark.parametrize(
    ("src", "why"),
    [
        ("x/nope", "endpoint 'x/nope': no such pod"),
        ("nope", "endpoint 'nope': expected <namespace>/<pod> or an IP address"),
        ("x/a/b", "endpoint 'x/a/b': expected <namespace>/<pod> or an IP address"),
        ("", "endpoint '': expected <namespace>/<pod> or an IP address"),
        ("10.1.2.300", "endpoint '10.1.2.300': expected <namespace>/<pod> or an IP address"),
    ],
)
def test_explain_unknown_endpoint(
    capsys: pytest.CaptureFixture[str], model_file: Path, src: str, why: str
) -> None:
    rc, out, err = _explain(capsys, [model_file], src, "x/a", "--port", "80")
    assert (rc, out) == (1, "")
    assert err == f"felix-lite: error: {why}\n"


@pytest.mark.parametrize("port", ["0", "65536", "-1"])
def test_explain_port_out_of_range(
    capsys: pytest.CaptureFixture[str], model_file: Path, port: str
) -> None:
    rc, out, err = _explain(capsys, [model_file], "x/a", "x/b", f"--port={port}")
    assert (rc, out) == (2, "")
    assert f"--port {port}: must be between 1 and 65535" in err


def test_explain_exit_1_when_an_object_was_rejected(
    capsys: pytest.CaptureFixture[str], model_file: Path, tmp_path: Path
) -> None:
    pols = write(tmp_path / "p.yaml", [BAD, DENY_X])
    rc, out, err = _explain(capsys, [model_file, pols], "y/a", "x/a", "--port", "80")
    assert rc == 1
    assert err.startswith("rejected: networkpolicy x/bad: spec.ingress[0].ports[0].endPort:")
    assert out.startswith("y/a -> x/a TCP/80: DENIED")


def _endpoint_refs(state: Any) -> list[str]:
    refs = sorted(state.pods)
    refs += [p.ip for p in state.pods.values() if p.ip]
    return [*refs, "198.51.100.7"]


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(state=S.e2e_cluster(max_policies=4), data=st.data())
def test_explain_json_agrees_with_the_oracle(
    capsys: pytest.CaptureFixture[str],
    tmp_path_factory: pytest.TempPathFactory,
    state: Any,
    data: st.DataObject,
) -> None:
    f = write(tmp_path_factory.mktemp("ex") / "c.yaml", S.cluster_to_objs(state))
    parsed, errors = build_cluster(S.cluster_to_objs(state))
    assert errors == []
    refs = _endpoint_refs(parsed)
    src = data.draw(st.sampled_from(refs), label="src")
    dst = data.draw(st.sampled_from(refs), label="dst")
    port = data.draw(st.sampled_from([80, 81, 443]), label="port")
    proto = data.draw(st.sampled_from(["tcp", "UDP", "sctp"]), label="protocol")
    rc, out, err = _explain(
        capsys, [f], src, dst, "--port", str(port), "--protocol", proto, "--json"
    )
    assert (rc, err) == (0, "")
    got = json.loads(out)
    v = evaluate(
        parsed,
        endpoint_for(parsed, src),
        endpoint_for(parsed, dst),
        port=port,
        protocol=Protocol(proto.upper()),
    )
    assert got["allowed"] == v.allowed
    for side, d in (("egress", v.egress), ("ingress", v.ingress)):
        assert got[side]["allowed"] == d.allowed
        assert got[side]["isolated"] == d.isolated
        assert got[side]["policies"] == list(d.selecting)
        assert [(a["policy"], a["rule"]) for a in got[side]["allowed_by"]] == [
            (r.policy, r.rule_index) for r in d.allowed_by
        ]
    # The text form states the same verdict.
    rc, text, _ = _explain(capsys, [f], src, dst, "--port", str(port), "--protocol", proto)
    assert rc == 0
    assert text.splitlines()[0].endswith("ALLOWED" if v.allowed else "DENIED")
