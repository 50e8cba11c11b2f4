"""The upstream NetworkPolicy conformance cases, across two nodes, through `lab apply`/`lab probe`.

One 2-node lab (BIRD ToR) with the model's nine pods spread over both nodes
(x/a, x/c, y/b, z/a, z/c on node-1; the rest on node-2), so most cells of
every matrix cross the fabric. Each case's steps go through the CLI: the
changes as YAML to `felix-lite lab apply -f` / `lab delete -f` (which return
once every agent has programmed them), then `felix-lite lab probe --json`,
compared cell by cell with the case's expected matrix (self cells ignored,
as upstream). Between cases every policy is deleted and model labels are
restored.

Default: all 48 cases (about two minutes here). `FL_LAB_CONFORMANCE=subset`
runs a representative 15 (SUBSET below: ingress, egress, both, namespace and
pod selectors, matchExpressions, named ports, ipBlock with except, UDP,
policy update, pod and namespace label changes, deletion) for a quick loop.
SCTP probes are skipped: this kernel cannot make SCTP sockets (the policies
of SCTP cases are still applied).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conformance.loader import (
    Case,
    delete_objects,
    load_cases,
    mismatches,
    render_matrix,
    step_objects,
)
from tests.e2e.test_lab import LabHandle, _unavailable, write_yaml

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

SUBSET = (
    "should-support-a-default-deny-ingress-policy",
    "should-support-a-default-deny-all-policy",
    "should-enforce-policy-to-allow-traffic-only-from-a-different-namespace-based-on-namespaceselector",
    "should-enforce-policy-based-on-podselector-and-namespaceselector",
    "should-enforce-policy-based-on-namespaceselector-with-matchexpressions",
    "should-allow-ingress-access-on-one-named-port",
    "should-allow-egress-access-on-one-named-port",
    "should-deny-egress-from-pods-based-on-podselector",
    "should-work-with-ingress-egress-specified-together",
    "should-enforce-except-clause-while-egress-access-to-server-in-cidr-block",
    "should-enforce-updated-policy",
    "should-allow-ingress-access-from-updated-pod",
    "should-allow-ingress-access-from-updated-namespace",
    "should-stop-enforcing-policies-after-they-are-deleted",
    "udp-should-support-a-default-deny-ingress-policy",
)


def _selected() -> list[str]:
    if os.environ.get("FL_LAB_CONFORMANCE", "").lower() == "subset":
        return list(SUBSET)
    return sorted(
        p.stem
        for p in (Path(__file__).resolve().parents[1] / "conformance" / "cases").glob("*.yaml")
    )


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHandle]:
    why = _unavailable()
    if why:
        pytest.skip(why)
    handle = LabHandle(tmp_path_factory.mktemp("labconf"), nodes=2)
    try:
        handle.up()
        yield handle
    finally:
        handle.down()


@pytest.fixture(scope="module")
def placement(lab: LabHandle) -> tuple[dict[str, str], dict[str, str]]:
    pods = lab.json("pods")
    ips = {f"{p['namespace']}/{p['name']}": p["ip"] for p in pods}
    nodes = {f"{p['namespace']}/{p['name']}": p["node"] for p in pods}
    assert set(nodes.values()) == {"node-1", "node-2"}
    return ips, nodes


@pytest.fixture(scope="module")
def cases(placement: tuple[dict[str, str], dict[str, str]]) -> dict[str, Case]:
    return {c.name: c for c in load_cases(placement[0])}


def _reset(lab: LabHandle, tmp: Path, ips: dict[str, str], nodes: dict[str, str]) -> None:
    """Delete every policy, restore the model's labels (through the CLI as well)."""
    from felix_lite.lab.cluster import Lab
    from tests.conformance.loader import model_objects

    live = Lab.open(str(lab.dir)).client().list("NetworkPolicy").get("items", [])
    if live:
        docs = [
            {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": {
                    "namespace": p["metadata"]["namespace"],
                    "name": p["metadata"]["name"],
                },
            }
            for p in live
        ]
        lab("delete", "-f", str(write_yaml(tmp / "reset-delete.yaml", docs)))
    lab("apply", "-f", str(write_yaml(tmp / "reset-labels.yaml", model_objects(ips, nodes))))


@pytest.mark.parametrize("name", _selected())
def test_case_across_two_nodes(
    name: str,
    lab: LabHandle,
    cases: dict[str, Case],
    placement: tuple[dict[str, str], dict[str, str]],
    tmp_path: Path,
) -> None:
    ips, nodes = placement
    case = cases[name]
    failures: list[str] = []
    probed = 0
    try:
        for i, step in enumerate(case.steps):
            if step.apply:
                docs = step_objects(step, ips, nodes)
                lab("apply", "-f", str(write_yaml(tmp_path / f"step{i}-apply.yaml", docs)))
            if step.delete:
                docs = delete_objects(step)
                lab("delete", "-f", str(write_yaml(tmp_path / f"step{i}-delete.yaml", docs)))
            for j, probe in enumerate(step.probes):
                if probe.protocol == "SCTP":
                    continue
                doc: dict[str, Any] = json.loads(
                    lab(
                        "probe",
                        "--json",
                        "--port",
                        str(probe.port),
                        "--protocol",
                        probe.protocol.lower(),
                    )
                )
                observed = {(r["from"], r["to"]): r["connected"] for r in doc["results"]}
                probed += 1
                wrong = mismatches(probe.expected, observed)
                if wrong:
                    failures.append(
                        f"step {i} probe {j} ({probe.protocol}/{probe.port}): "
                        f"{len(wrong)} wrong {wrong[:6]}\nexpected:\n"
                        f"{render_matrix(probe.expected)}\nobserved:\n{render_matrix(observed)}"
                    )
    finally:
        _reset(lab, tmp_path, ips, nodes)
    if probed == 0:
        pytest.skip(f"{name}: SCTP only (kernel lacks SCTP)")
    assert not failures, f"{case.upstream}\n" + "\n".join(failures)
