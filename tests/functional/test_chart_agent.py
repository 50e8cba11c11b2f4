"""One source of truth: the settings document the Helm chart renders into its
ConfigMap starts the same agent the lab runs, and that agent renders the ExaBGP
configuration the chart's sidecar reads.

The chart is rendered with the real Helm engine (helm-python-sdk); only the
settings that are paths on the pod's volumes are pointed at a temporary
directory (this test has no pod), every other setting is used as rendered.
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from felix_lite.config import parse_config
from tests.functional.test_agent import NODE, AgentLab, _populate, wait_for

pytestmark = [pytest.mark.kernel]

helm = pytest.importorskip("helm_python", reason="helm-python-sdk not installed (test extra)")

CHART = Path(__file__).resolve().parents[2] / "charts" / "felix-lite"
VALUES: dict[str, Any] = {
    # A realistic set: nft backend, our own ports, a ToR peer; ports chosen to be free.
    "iptablesBackend": "nft",
    "healthPort": 19199,
    "metricsPort": 19191,
    "podCIDRs": ["10.244.0.0/16"],
    "bgp": {"asNumber": 64512, "peers": [{"name": "tor", "peerIP": "10.0.0.1", "asNumber": 65000}]},
}
PATH_KEYS = {("bgp", "socket"), ("bgp", "exabgpConfigDir"), ("stateDir",)}


def chart_manifests() -> list[dict[str, Any]]:
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values=copy.deepcopy(VALUES), name="felix-lite",
                           namespace="kube-system", is_install=True)  # fmt: skip
    return [
        d
        for path, text in out.items()
        if not path.endswith("NOTES.txt")
        for d in yaml.safe_load_all(text)
        if isinstance(d, dict)
    ]


def chart_config_document() -> dict[str, Any]:
    [cm] = [d for d in chart_manifests() if d.get("kind") == "ConfigMap"]
    doc: dict[str, Any] = yaml.safe_load(cm["data"]["config.yaml"])
    return doc


@pytest.fixture
def lab(tmp_path: Path) -> Any:
    if subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() != "0":
        pytest.skip("needs root (network namespaces)")
    lab = AgentLab(tmp_path)
    try:
        lab.start_api()
        yield lab
    finally:
        lab.close()


def test_agent_runs_from_the_chart_rendered_settings(lab: AgentLab) -> None:
    doc = chart_config_document()
    rendered = parse_config(doc, source="chart ConfigMap")  # the agent's own parser
    assert rendered.iptables_backend == "nft" and rendered.health_port == 19199
    run = lab.tmp / "run"
    doc["stateDir"] = str(run)
    doc["bgp"]["socket"] = str(run / "bgp.sock")
    doc["bgp"]["exabgpConfigDir"] = str(run / "exabgp")
    # The chart leaves nodeName empty ($NODE_NAME per pod); the test passes --node.
    lab.config.write_text(yaml.safe_dump(doc))

    def node_and_peers(a: client.ApiClient) -> None:
        core = client.CoreV1Api(a)
        core.create_node({"metadata": {"name": NODE}, "spec": {"podCIDR": "10.244.1.0/24"}})
        core.patch_node_status(
            NODE, {"status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.11"}]}}
        )
        custom = client.CustomObjectsApi(a)
        # The chart's own BGPConfiguration/BGPPeer objects, applied as rendered.
        plural = {"BGPPeer": "bgppeers", "BGPConfiguration": "bgpconfigurations"}
        for d in chart_manifests():
            if d.get("apiVersion") == "felixlite.io/v1alpha1":
                custom.create_cluster_custom_object(
                    "felixlite.io", "v1alpha1", plural[d["kind"]], d
                )

    lab.k8s(node_and_peers)
    _populate(lab)
    lab.start_agent("--node", NODE, routing=True)

    code = 0

    def ready() -> bool:
        nonlocal code
        code, _ = lab.http("/readyz", port=19199)
        return code == 200

    wait_for(ready, 60, "agent ready on the chart's healthPort")
    code, metrics = lab.http("/metrics", port=19191)
    assert code == 200 and "felix_lite" in metrics
    assert "FL-FORWARD" in lab.iptables()  # the chart's backend (nft) holds our chains
    conf = (run / "exabgp" / "exabgp.conf").read_text()
    assert "neighbor 10.0.0.1 {" in conf and "peer-as 65000;" in conf
    assert "local-as 64512;" in conf  # the chart's bgp.asNumber, via BGPConfiguration
    assert (run / "exabgp" / "exabgp.env").is_file()
