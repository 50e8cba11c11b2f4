"""The Helm chart, checked with the real Helm engine (helm-python-sdk, no helm
binary): lint, render for realistic value sets, every manifest validated against
a current Kubernetes release's OpenAPI schemas (kubernetes-validate) or our own
CRD schema, the values schema rejecting bad input by field, and one source of
truth with the package (ConfigMap == felix_lite.config, crds/ == controller/crds,
versions)."""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from felix_lite import __version__
from felix_lite.cni import install
from felix_lite.config import AgentConfig, parse_config

helm = pytest.importorskip("helm_python", reason="helm-python-sdk not installed (test extra)")
kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")
jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "felix-lite"
NAMESPACE = "kube-system"
RELEASE = "felix-lite"
K8S_VERSION = kv.utils.latest_version()

TOR = {
    "peerIP": "192.168.10.1",
    "asNumber": 65001,
    "nodeSelector": {"matchLabels": {"topology.felixlite.io/rack": "r1"}},
    "gracefulRestartSeconds": 120,
    "holdTime": 90,
    "maxPrefix": 5000,
}
SCENARIOS: dict[str, dict[str, Any]] = {
    "default": {},
    "tor-only": {
        "bgp": {"asNumber": 64600, "nodeToNodeMesh": False, "peers": [TOR]},
    },
    "mesh-only": {"bgp": {"asNumber": 64512, "nodeToNodeMesh": True, "peers": []}},
    "tor-and-mesh": {
        "podCIDRs": ["10.42.0.0/16"],
        "bgp": {
            "asNumber": 4200000000,
            "nodeToNodeMesh": True,
            "aggregate": True,
            "peers": [
                {**TOR, "name": "tor-r1"},
                {
                    "name": "tor-r2",
                    "peerIP": "192.168.20.1",
                    "asNumber": 4294967295,
                    "nodeSelector": {
                        "matchExpressions": [
                            {
                                "key": "topology.felixlite.io/rack",
                                "operator": "In",
                                "values": ["r2"],
                            }
                        ]
                    },
                },
            ],
        },
    },
    "md5-from-secret": {
        "bgp": {
            "peers": [
                {
                    "peerIP": "10.0.0.254",
                    "asNumber": 65010,
                    "passwordSecretRef": {"name": "bgp-passwords", "key": "tor"},
                    "multihop": {"ttl": 2},
                },
                {"peerIP": "10.0.1.254", "asNumber": 65011, "node": "worker-1"},
            ]
        },
    },
    "nft-backend": {"iptablesBackend": "nft", "logLevel": "debug", "resyncSeconds": 30},
    "service-monitor": {
        "serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prom"}},
        "metricsPort": 9500,
        "healthPort": 9600,
    },
    "chained-cni": {
        "cni": {"chainPortmap": True, "chainBandwidth": True, "mtu": 1450},
        "nodePodCIDR": "10.244.7.0/24",
        "image": {"repository": "registry.local/fl", "tag": "dev", "pullPolicy": "Always"},
        "bgp": {"configuration": {"create": False}},
    },
}


@pytest.fixture(scope="module")
def chart() -> Iterator[Any]:
    with helm.Chart.load(str(CHART)) as c:
        yield c


def render(chart: Any, values: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Template path -> its manifests (NOTES.txt kept as a one-item list of text)."""
    out = chart.render(
        values=copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE, is_install=True
    )
    docs: dict[str, list[dict[str, Any]]] = {}
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            docs[path] = [{"notes": text}]
            continue
        docs[path] = [d for d in yaml.safe_load_all(text) if d]
    return docs


def manifests(chart: Any, values: dict[str, Any]) -> list[dict[str, Any]]:
    return [d for p, ds in render(chart, values).items() if not p.endswith("NOTES.txt") for d in ds]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{kind}: expected one, got {len(found)}"
    return found[0]


def containers(ds: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = ds["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec["initContainers"] + spec["containers"]}


def rendered_config(docs: list[dict[str, Any]]) -> AgentConfig:
    cm = one(docs, "ConfigMap")
    raw = yaml.safe_load(cm["data"]["config.yaml"])
    return parse_config(raw, source="chart ConfigMap")


def _crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for f in sorted((ROOT / "controller" / "crds").glob("*.yaml")):
        crd = yaml.safe_load(f.read_text())
        for v in crd["spec"]["versions"]:
            api = f"{crd['spec']['group']}/{v['name']}"
            out[(api, crd["spec"]["names"]["kind"])] = v["schema"]["openAPIV3Schema"]
    return out


CRD_SCHEMAS = _crd_schemas()


# --- lint, render, schema validation -------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_lint_clean(name: str) -> None:
    report = helm.lint(str(CHART), copy.deepcopy(SCENARIOS[name]), strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_manifest_validates(chart: Any, name: str) -> None:
    docs = manifests(chart, SCENARIOS[name])
    assert docs
    for doc in docs:
        api, kind = doc["apiVersion"], doc["kind"]
        if (api, kind) in CRD_SCHEMAS:
            validator = jsonschema.Draft7Validator(
                CRD_SCHEMAS[(api, kind)], format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER
            )
            errors = [e.message for e in validator.iter_errors(doc)]
            assert errors == [], f"{kind} {doc['metadata']['name']}: {errors}"
        elif api == "monitoring.coreos.com/v1":
            continue  # Prometheus operator CRD: no schema here; shape checked below
        else:
            kv.validate(doc, K8S_VERSION, strict=True)


def test_validation_catches_a_broken_manifest(chart: Any) -> None:
    """The validator used above does reject a wrong field (the checks can fail)."""
    ds = copy.deepcopy(one(manifests(chart, {}), "DaemonSet"))
    ds["spec"]["template"]["spec"]["hostNetwrk"] = True
    with pytest.raises(kv.utils.ValidationError):
        kv.validate(ds, K8S_VERSION, strict=True)
    peer = {
        "apiVersion": "felixlite.io/v1alpha1",
        "kind": "BGPPeer",
        "metadata": {"name": "x"},
        "spec": {"peerIP": "1.2.3", "asNumber": 0},
    }
    v = jsonschema.Draft7Validator(
        CRD_SCHEMAS[("felixlite.io/v1alpha1", "BGPPeer")],
        format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER,
    )
    assert len(list(v.iter_errors(peer))) == 2


BAD_VALUES = [
    ({"bgp": {"asNumber": 0}}, "/bgp/asNumber"),
    ({"bgp": {"asNumber": 4294967296}}, "/bgp/asNumber"),
    ({"bgp": {"peers": [{"peerIP": "10.0.0.1", "asNumber": 0}]}}, "/bgp/peers/0/asNumber"),
    ({"bgp": {"peers": [{"peerIP": "10.0.0.1", "asNumber": 2**32}]}}, "/bgp/peers/0/asNumber"),
    ({"bgp": {"peers": [{"peerIP": "300.1.1.1", "asNumber": 65001}]}}, "/bgp/peers/0/peerIP"),
    ({"bgp": {"peers": [{"peerIP": "10.0.0", "asNumber": 65001}]}}, "/bgp/peers/0/peerIP"),
    ({"bgp": {"peers": [{"peerIP": "10.0.0.1"}]}}, "/bgp/peers/0"),
    (
        {"bgp": {"peers": [{"peerIP": "10.0.0.1", "asNumber": 1, "holdTime": 2}]}},
        "/bgp/peers/0/holdTime",
    ),
    (
        {"bgp": {"peers": [{"peerIP": "10.0.0.1", "asNumber": 1, "passwordSecretRef": {}}]}},
        "/bgp/peers/0/passwordSecretRef",
    ),
    ({"iptablesBackend": "nftables"}, "/iptablesBackend"),
    ({"logLevel": "verbose"}, "/logLevel"),
    ({"podCIDRs": ["10.244.0.0/33"]}, "/podCIDRs/0"),
    ({"podCIDRs": []}, "/podCIDRs"),
    ({"metricsPort": 70000}, "/metricsPort"),
    ({"daemonset": {"maxUnavailable": 0}}, "/daemonset/maxUnavailable"),
    ({"cni": {"mtu": 100}}, "/cni/mtu"),
    ({"bgp": {"asNumbr": 65000}}, "/bgp"),
]


@pytest.mark.parametrize(("values", "field"), BAD_VALUES, ids=[f for _, f in BAD_VALUES])
def test_bad_values_are_rejected_naming_the_field(
    chart: Any, values: dict[str, Any], field: str
) -> None:
    with pytest.raises(helm.HelmValuesError) as err:
        chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    assert f"at '{field}'" in str(err.value)


@pytest.mark.parametrize("asn", [1, 65535, 4294967295])
def test_as_number_edges_are_accepted_and_rendered_as_integers(chart: Any, asn: int) -> None:
    docs = manifests(
        chart, {"bgp": {"asNumber": asn, "peers": [{"peerIP": "10.0.0.1", "asNumber": asn}]}}
    )
    assert one(docs, "BGPConfiguration")["spec"]["asNumber"] == asn
    assert one(docs, "BGPPeer")["spec"]["asNumber"] == asn


# --- one source of truth with the package --------------------------------------------


def test_versions_match_the_package() -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["version"] == __version__ == project["version"]
    assert str(meta["appVersion"]) == __version__


def test_crds_are_identical_to_the_controllers() -> None:
    ours = {p.name: p.read_bytes() for p in (ROOT / "controller" / "crds").glob("*.yaml")}
    chart = {p.name: p.read_bytes() for p in (CHART / "crds").iterdir()}
    assert ours and chart == ours


def test_helm_loads_both_crds(chart: Any) -> None:
    names = {yaml.safe_load(c["data"])["metadata"]["name"] for c in chart.crds}
    assert names == {"bgppeers.felixlite.io", "bgpconfigurations.felixlite.io"}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_configmap_is_the_agent_settings_document(chart: Any, name: str) -> None:
    values = chart.merge_values(copy.deepcopy(SCENARIOS[name]))
    cfg = rendered_config(manifests(chart, SCENARIOS[name]))
    assert cfg.iptables_backend == values["iptablesBackend"]
    assert cfg.log_level == values["logLevel"]
    assert cfg.health_port == values["healthPort"]
    assert cfg.metrics_port == values["metricsPort"]
    assert cfg.resync_seconds == values["resyncSeconds"]
    assert list(cfg.pod_cidrs) == values["podCIDRs"]
    assert cfg.node_pod_cidr == values["nodePodCIDR"]
    assert cfg.cni.chain_portmap == values["cni"]["chainPortmap"]
    assert cfg.cni.chain_bandwidth == values["cni"]["chainBandwidth"]
    assert cfg.cni.conf_name == values["cni"]["confName"]
    assert cfg.node_name == ""  # from $NODE_NAME, per pod


def test_configmap_paths_match_the_pod(chart: Any) -> None:
    """Socket, exabgp dir and state dir sit on the emptyDir both containers share."""
    docs = manifests(chart, {})
    cfg = rendered_config(docs)
    ds = one(docs, "DaemonSet")
    c = containers(ds)
    vols = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    for name in ("felix-lite", "exabgp"):
        mounts = {m["mountPath"]: m["name"] for m in c[name]["volumeMounts"]}
        shared = [p for p, v in mounts.items() if "emptyDir" in vols[v]]
        assert len(shared) == 1, name
        for path in (cfg.bgp.socket, cfg.bgp.exabgp_config_dir):
            assert path.startswith(shared[0] + "/"), (name, path)
    assert cfg.state_dir == shared[0]
    ports = {p["name"]: p["containerPort"] for p in c["felix-lite"]["ports"]}
    assert ports == {"health": cfg.health_port, "metrics": cfg.metrics_port}


def test_install_cni_command_is_one_our_installer_accepts(chart: Any) -> None:
    ds = one(manifests(chart, {"cni": {"mtu": 1400}}), "DaemonSet")
    init = containers(ds)["install-cni"]
    cmd = init["command"]
    assert cmd[:3] == ["python", "-m", "felix_lite.cni.install"]
    args = install.build_parser().parse_args(cmd[3:])
    assert args.mtu == 1400
    mounts = {m["mountPath"] for m in init["volumeMounts"]}
    assert args.bin_dir in mounts and args.conf_dir in mounts
    assert Path(args.config).parent.as_posix() in mounts
    # The runtime dir is mounted at its host path: the launcher execs it from the host.
    hostpaths = {
        v["name"]: v["hostPath"]["path"]
        for v in ds["spec"]["template"]["spec"]["volumes"]
        if "hostPath" in v
    }
    by_path = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
    root = next(p for p in by_path if str(args.runtime_dir).startswith(p + "/"))
    assert hostpaths[by_path[root]] == root


# --- the DaemonSet contract -----------------------------------------------------------


def test_daemonset_runs_everywhere_safely(chart: Any) -> None:
    ds = one(manifests(chart, {}), "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1},
    }
    assert pod["terminationGracePeriodSeconds"] > 0
    assert (
        pod["serviceAccountName"] == one(manifests(chart, {}), "ServiceAccount")["metadata"]["name"]
    )
    hostpaths = {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert hostpaths == {
        "/opt/cni/bin",
        "/etc/cni/net.d",
        "/var/lib/felix-lite",
        "/run/xtables.lock",
        "/lib/modules",
    }
    for c in pod["initContainers"] + pod["containers"]:
        env = {e["name"]: e for e in c.get("env", [])}
        assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
        sc = c["securityContext"]
        assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert "SYS_ADMIN" not in sc["capabilities"].get("add", [])
    c = containers(ds)
    assert c["felix-lite"]["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW"]
    lib_modules = [m for m in c["felix-lite"]["volumeMounts"] if m["mountPath"] == "/lib/modules"]
    assert lib_modules[0]["readOnly"] is True


def test_containers_run_the_agreed_commands(chart: Any) -> None:
    c = containers(one(manifests(chart, {}), "DaemonSet"))
    cfg = "/etc/felix-lite/config.yaml"
    assert c["felix-lite"]["command"] == ["felix-lite", "agent", "--config", cfg]
    assert c["exabgp"]["command"] == ["felix-lite", "bgp", "sidecar", "--config", cfg]
    assert list(c) == ["install-cni", "felix-lite", "exabgp"]
    agent = c["felix-lite"]
    assert agent["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert agent["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert agent["livenessProbe"]["httpGet"]["port"] == "health"
    assert agent["readinessProbe"]["httpGet"]["port"] == "health"


def test_image_values(chart: Any) -> None:
    c = containers(one(manifests(chart, SCENARIOS["chained-cni"]), "DaemonSet"))
    assert {x["image"] for x in c.values()} == {"registry.local/fl:dev"}
    assert {x["imagePullPolicy"] for x in c.values()} == {"Always"}
    c = containers(one(manifests(chart, {}), "DaemonSet"))
    assert {x["image"].rsplit(":", 1)[1] for x in c.values()} == {__version__}


def test_settings_change_rolls_the_pods(chart: Any) -> None:
    def checksum(values: dict[str, Any]) -> str:
        ds = one(manifests(chart, values), "DaemonSet")
        return str(ds["spec"]["template"]["metadata"]["annotations"]["checksum/config"])

    assert checksum({}) == checksum({})
    assert checksum({}) != checksum({"iptablesBackend": "legacy"})


# --- BGP objects and RBAC ---------------------------------------------------------------


def test_peers_map_to_the_crd_fields_unchanged(chart: Any) -> None:
    values = SCENARIOS["tor-and-mesh"]
    docs = manifests(chart, values)
    peers = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "BGPPeer"}
    want = {p["name"]: {k: v for k, v in p.items() if k != "name"} for p in values["bgp"]["peers"]}
    assert peers == want
    conf = one(docs, "BGPConfiguration")
    assert conf["metadata"]["name"] == "default"
    assert conf["spec"] == {
        "asNumber": 4200000000,
        "nodeToNodeMesh": True,
        "podCIDRs": ["10.42.0.0/16"],
        "aggregate": True,
    }


def test_peer_default_names_and_no_configuration(chart: Any) -> None:
    docs = manifests(chart, {**SCENARIOS["tor-only"], "bgp": {"peers": [TOR]}})
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "BGPPeer"] == [
        "felix-lite-192-168-10-1"
    ]
    docs = manifests(chart, SCENARIOS["chained-cni"])
    assert not [d for d in docs if d["kind"] in ("BGPConfiguration", "BGPPeer")]


def test_mesh_only_has_no_peers(chart: Any) -> None:
    docs = manifests(chart, SCENARIOS["mesh-only"])
    assert one(docs, "BGPConfiguration")["spec"]["nodeToNodeMesh"] is True
    assert not [d for d in docs if d["kind"] == "BGPPeer"]


WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection", "*"}


def test_cluster_role_is_least_privilege(chart: Any) -> None:
    role = one(manifests(chart, {}), "ClusterRole")
    reads: dict[tuple[str, str], set[str]] = {}
    writes: set[tuple[str, str]] = set()
    for rule in role["rules"]:
        assert "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        for g in rule["apiGroups"]:
            for r in rule["resources"]:
                reads.setdefault((g, r), set()).update(set(rule["verbs"]) - WRITE_VERBS)
                if set(rule["verbs"]) & WRITE_VERBS:
                    writes.add((g, r))
                    assert not set(rule["verbs"]) & {"delete", "deletecollection", "*"}
    for watched in [
        ("", "namespaces"),
        ("", "pods"),
        ("", "nodes"),
        ("networking.k8s.io", "networkpolicies"),
        ("felixlite.io", "bgppeers"),
        ("felixlite.io", "bgpconfigurations"),
    ]:
        assert reads[watched] == {"get", "list", "watch"}, watched
    assert writes == {
        ("", "events"),
        ("events.k8s.io", "events"),
        ("felixlite.io", "bgppeers/status"),
    }
    assert not any(r == "secrets" for _, r in reads)


def test_secrets_only_in_the_release_namespace(chart: Any) -> None:
    # BGPPeers applied after install may name any Secret of the release namespace,
    # and the agent watches that namespace's Secrets: a Role there, never a ClusterRole.
    for values in ({}, SCENARIOS["md5-from-secret"]):
        docs = manifests(chart, values)
        role = one(docs, "Role")
        assert role["metadata"]["namespace"] == NAMESPACE
        assert role["rules"] == [
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch"]}
        ]
        cluster_role = one(docs, "ClusterRole")
        assert all("secrets" not in r["resources"] for r in cluster_role["rules"])
    binding = one(docs, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["namespace"] == NAMESPACE


def test_service_monitor_toggle(chart: Any) -> None:
    assert not [d for d in manifests(chart, {}) if d["kind"] in ("Service", "ServiceMonitor")]
    docs = manifests(chart, SCENARIOS["service-monitor"])
    svc, sm = one(docs, "Service"), one(docs, "ServiceMonitor")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"
    assert svc["spec"]["ports"][0]["port"] == 9500
    labels = svc["metadata"]["labels"]
    assert all(labels[k] == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert sm["spec"]["endpoints"][0]["interval"] == "15s"
    ds = one(docs, "DaemonSet")
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels[k] == v for k, v in svc["spec"]["selector"].items())


def test_notes_tell_how_to_check_peers_and_the_tor(chart: Any) -> None:
    notes = next(
        d[0]["notes"]
        for p, d in render(chart, SCENARIOS["md5-from-secret"]).items()
        if p.endswith("NOTES.txt")
    )
    assert f"kubectl -n {NAMESPACE} exec ds/felix-lite -c felix-lite -- felix-lite status" in notes
    assert "10.0.0.254" in notes and "bgp-passwords" in notes and "ebgp-multihop 2" in notes
