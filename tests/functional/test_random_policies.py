"""Random NetworkPolicies on the real kernel, checked cell by cell against the spec oracle.

Hypothesis draws 1-4 NetworkPolicies over the x/y/z model (as YAML-shaped
dicts, so apiserver defaulting of policyTypes is exercised too), random extra
labels on pods and namespaces, and a per-pod named container port `web` that
maps to 80 on some pods and 81 on others (a name resolving differently per
destination). The whole state goes through the real `felix-lite policy apply`
in ONE shared node namespace per backend (apply is declarative, so each
example simply applies the next state), then TCP/80, TCP/81 and UDP/80 are
probed from every pod and the outside host to every pod, the outside host and
the node itself (INPUT path), and each cell is compared with `policy.evaluate`.

Not compared: a pod to itself (its own IP never leaves its netns), and the
node as a source (the node may always reach its pods: kubelet probes).

Reproducible: `derandomize=True`, no example database. On a mismatch the
failure prints the whole applied YAML, the wrong cells and the oracle's
explanation of each. Shrinking is off by default (each example costs a few
seconds of real traffic); `FLQ_SHRINK=1` turns it on. `FLQ_EXAMPLES=N`
changes the number of examples per backend (default 30).

The deterministic tests at the end pin specific corners (named port per
destination, identical selectors sharing a set then one removed, namespace
relabelled, pod IP change, unprogrammed interface, UDP replies under egress
deny, 0.0.0.0/0 and excepts covering a whole cidr).
"""

from __future__ import annotations

import copy
import itertools
import os
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from felix_lite.netlab import NodeLab, ProbeResult, probe_pairs, upstream_model
from felix_lite.netlab.e2e import pod_doc
from felix_lite.netlab.probe import Endpoint as NetEndpoint
from policy.evaluate import Endpoint, endpoint_for, evaluate, explain_text
from policy.model import ClusterState, Protocol
from policy.parse import build_cluster
from tests.functional.conftest import backend_unavailable, cli_command

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

NETNS_PREFIX = "flq"
MODEL = upstream_model()
POD_KEYS = MODEL.pod_keys
POD_IPS = {p.key: p.ip for p in MODEL.pods}
NAMESPACES = ("x", "y", "z")
PODS = ("a", "b", "c")
NS_NAME = "kubernetes.io/metadata.name"
PROBES = ((80, Protocol.TCP), (81, Protocol.TCP), (80, Protocol.UDP))
PROBE_TIMEOUT = float(os.environ.get("FLQ_PROBE_TIMEOUT", "1.0"))
EXAMPLES = int(os.environ.get("FLQ_EXAMPLES", "30"))
_seq = itertools.count(1)


def _prefix(role: str) -> str:
    return f"{NETNS_PREFIX}{role}{os.getpid() % 100:02d}{next(_seq)}"


# --------------------------------------------------------------------------
# The lab


@pytest.fixture(scope="module", params=("legacy", "nft"))
def rlab(request: pytest.FixtureRequest) -> Iterator[NodeLab]:
    backend = str(request.param)
    reason = backend_unavailable(backend)
    if reason:
        pytest.skip(reason)
    lab = NodeLab(
        _prefix("l" if backend == "legacy" else "n"), MODEL, backend=backend, cli=cli_command()
    )
    try:
        yield lab
    finally:
        lab.close()


# --------------------------------------------------------------------------
# Strategies (YAML-shaped, so parse + defaulting are part of what is tested)

SEL_KEYS = ("pod", "ns", "app", "tier", NS_NAME)
SEL_VALUES = ("a", "b", "c", "x", "y", "z", "web", "db")
EXTRA_LABELS = st.dictionaries(
    st.sampled_from(("app", "tier")), st.sampled_from(("web", "db")), max_size=1
)


@st.composite
def selectors(draw: st.DrawFn) -> dict[str, Any]:
    out: dict[str, Any] = {}
    ml = draw(st.dictionaries(st.sampled_from(SEL_KEYS), st.sampled_from(SEL_VALUES), max_size=2))
    if ml:
        out["matchLabels"] = ml
    exprs = []
    for _ in range(draw(st.integers(0, 2))):
        op = draw(st.sampled_from(("In", "NotIn", "Exists", "DoesNotExist")))
        e: dict[str, Any] = {"key": draw(st.sampled_from(SEL_KEYS)), "operator": op}
        if op in ("In", "NotIn"):
            e["values"] = sorted(draw(st.sets(st.sampled_from(SEL_VALUES), min_size=1, max_size=3)))
        exprs.append(e)
    if exprs:
        out["matchExpressions"] = exprs
    return out


def _pod_cidr(key: str, plen: int = 32) -> str:
    return f"{POD_IPS[key]}/{plen}"


FIXED_BLOCKS: tuple[dict[str, Any], ...] = (
    {"cidr": "0.0.0.0/0"},
    {"cidr": "0.0.0.0/0", "except": ["10.244.0.0/16"]},
    {"cidr": "0.0.0.0/0", "except": ["0.0.0.0/1", "128.0.0.0/1"]},  # covers it all
    {"cidr": "10.244.1.0/24", "except": ["10.244.1.0/25", "10.244.1.128/25"]},
    {"cidr": "10.244.1.0/28", "except": ["10.244.1.4/30"]},  # .4-.7 out
    {"cidr": "10.244.1.8/29"},  # .8-.15: z/a, z/b, z/c
    {"cidr": "10.244.1.5/24"},  # host bits set: the apiserver accepts it as /24
    {"cidr": "198.51.100.10/32"},  # the outside host
    {"cidr": "172.31.1.0/24"},  # the node's uplink network
    {"cidr": "10.244.0.0/16", "except": ["10.244.1.0/24"]},
)


@st.composite
def ip_blocks(draw: st.DrawFn) -> dict[str, Any]:
    if draw(st.booleans()):
        return dict(draw(st.sampled_from(FIXED_BLOCKS)))
    if draw(st.booleans()):
        return {"cidr": _pod_cidr(draw(st.sampled_from(POD_KEYS)))}
    excepts = draw(st.lists(st.sampled_from(POD_KEYS), max_size=3, unique=True))
    block: dict[str, Any] = {"cidr": "10.244.1.0/24"}
    if excepts:
        block["except"] = [_pod_cidr(k) for k in excepts]
    return block


@st.composite
def peers(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(("pod", "ns", "both", "block")))
    if kind == "block":
        return {"ipBlock": draw(ip_blocks())}
    out: dict[str, Any] = {}
    if kind in ("pod", "both"):
        out["podSelector"] = draw(selectors())
    if kind in ("ns", "both"):
        out["namespaceSelector"] = draw(selectors())
    return out


PORTS: tuple[dict[str, Any], ...] = (
    {},
    {"port": 80},
    {"port": 81},
    {"port": 80, "protocol": "UDP"},
    {"protocol": "UDP"},
    {"protocol": "TCP"},
    {"port": 80, "endPort": 81},
    {"port": 79, "endPort": 80},
    {"port": 81, "endPort": 81},
    {"port": 81, "endPort": 90, "protocol": "UDP"},
    {"port": "serve-80-tcp"},
    {"port": "serve-81-tcp", "protocol": "TCP"},
    {"port": "serve-80-udp", "protocol": "UDP"},
    {"port": "web"},
    {"port": "web", "protocol": "UDP"},
    {"protocol": "SCTP"},
    {"port": 80, "protocol": "SCTP"},
)


@st.composite
def rules(draw: st.DrawFn, peers_field: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    shape = draw(st.sampled_from(("absent", "empty", "some")))
    if shape == "empty":
        out[peers_field] = []
    elif shape == "some":
        out[peers_field] = draw(st.lists(peers(), min_size=1, max_size=2))
    if draw(st.booleans()):
        out["ports"] = [dict(p) for p in draw(st.lists(st.sampled_from(PORTS), max_size=2))]
    return out


POLICY_TYPES = (None, ["Ingress"], ["Egress"], ["Ingress", "Egress"], ["Egress", "Ingress"])


@st.composite
def policies(draw: st.DrawFn) -> dict[str, Any]:
    # Biased towards selecting something: a random selector often selects no pod.
    subject = draw(
        st.one_of(
            st.just({}),
            st.builds(lambda p: {"matchLabels": {"pod": p}}, st.sampled_from(PODS)),
            selectors(),
        )
    )
    spec: dict[str, Any] = {"podSelector": subject}
    types = draw(st.sampled_from(POLICY_TYPES))
    if types is not None:
        spec["policyTypes"] = list(types)
    for field, peers_field in (("ingress", "from"), ("egress", "to")):
        if draw(st.booleans()):
            spec[field] = draw(st.lists(rules(peers_field), max_size=2))
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "namespace": draw(st.sampled_from(NAMESPACES)),
            # A small pool: identical names across namespaces, and policies
            # with equal selectors, share sets.
            "name": draw(st.sampled_from(("p1", "p2", "p3"))),
        },
        "spec": spec,
    }


@st.composite
def worlds(draw: st.DrawFn) -> list[dict[str, Any]]:
    """The whole desired state: namespaces, pods, 1-4 policies."""
    docs: list[dict[str, Any]] = []
    for ns in NAMESPACES:
        labels = {**draw(EXTRA_LABELS), "ns": ns, NS_NAME: ns}
        docs.append(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}}
        )
    for mp in MODEL.pods:
        doc = pod_doc(mp)
        doc["metadata"]["labels"] = {**draw(EXTRA_LABELS), "pod": mp.name}
        web = draw(st.sampled_from((None, (80, "TCP"), (81, "TCP"), (80, "UDP"), (81, "UDP"))))
        if web is not None:
            doc["spec"]["containers"].append(
                {
                    "name": "web",
                    "ports": [{"containerPort": web[0], "protocol": web[1], "name": "web"}],
                }
            )
        docs.append(doc)
    pols = draw(
        st.lists(
            policies(),
            min_size=1,
            max_size=4,
            unique_by=lambda d: (d["metadata"]["namespace"], d["metadata"]["name"]),
        )
    )
    return docs + pols


# --------------------------------------------------------------------------
# Probing and comparing


def _cells(lab: NodeLab) -> list[tuple[NetEndpoint, NetEndpoint]]:
    pods = lab.pod_endpoints
    sources = [*pods, lab.outside]
    targets = [*pods, lab.outside, lab.node]
    return [(s, d) for s in sources for d in targets if s.name != d.name]


def _oracle_endpoint(state: ClusterState, lab: NodeLab, ep: NetEndpoint) -> Endpoint:
    if ep.name in lab.pods:
        return endpoint_for(state, ep.name)
    return Endpoint(pod=None, ip=ep.ip)


def compare(
    lab: NodeLab,
    docs: Sequence[dict[str, Any]],
    *,
    probes: Sequence[tuple[int, Protocol]] = PROBES,
    pairs: Sequence[tuple[NetEndpoint, NetEndpoint]] | None = None,
) -> list[str]:
    """Probe `pairs` (default: every compared cell) and report cells that
    differ from the oracle, each with its explanation."""
    state, errors = build_cluster(docs)
    assert not errors, errors
    pairs = list(pairs) if pairs is not None else _cells(lab)
    wrong: list[str] = []
    for port, proto in probes:
        results: list[ProbeResult] = probe_pairs(
            pairs, port=port, protocol=proto, timeout=PROBE_TIMEOUT
        )
        for (src, dst), res in zip(pairs, results, strict=True):
            verdict = evaluate(
                state,
                _oracle_endpoint(state, lab, src),
                _oracle_endpoint(state, lab, dst),
                port=port,
                protocol=proto,
            )
            if verdict.allowed != res.connected:
                wrong.append(
                    f"{proto.value}/{port} {src.name} -> {dst.name}: expected "
                    f"{'connected' if verdict.allowed else 'blocked'}, observed "
                    f"{'connected' if res.connected else 'blocked'} ({res.detail})\n"
                    + explain_text(verdict, state)
                )
    return wrong


def _failure(lab: NodeLab, docs: Sequence[dict[str, Any]], wrong: list[str]) -> str:
    pols = [d for d in docs if d["kind"] == "NetworkPolicy"]
    others = [d for d in docs if d["kind"] != "NetworkPolicy"]
    labels = {
        (d["metadata"].get("namespace", "") + "/" + d["metadata"]["name"]).lstrip("/"): d[
            "metadata"
        ].get("labels", {})
        for d in others
    }
    webs = {
        f"{d['metadata']['namespace']}/{d['metadata']['name']}": c["ports"][0]
        for d in others
        if d["kind"] == "Pod"
        for c in d["spec"]["containers"]
        if c["name"] == "web"
    }
    return (
        f"[{lab.policy.backend}] {len(wrong)} cell(s) differ from policy.evaluate\n"
        f"--- policies (YAML):\n{yaml.safe_dump_all(pols, sort_keys=False)}"
        f"--- labels: {labels}\n--- 'web' ports: {webs}\n--- wrong cells:\n" + "\n".join(wrong[:12])
    )


_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    phases=(
        (Phase.explicit, Phase.generate, Phase.shrink)
        if os.environ.get("FLQ_SHRINK")
        else (Phase.explicit, Phase.generate)
    ),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)


@pytest.mark.timeout(900)
def test_random_policies_match_the_oracle(rlab: NodeLab) -> None:
    @_SETTINGS
    @given(docs=worlds())
    def run(docs: list[dict[str, Any]]) -> None:
        rlab.policy.apply(docs)
        wrong = compare(rlab, docs)
        assert not wrong, _failure(rlab, docs, wrong)

    run()


# --------------------------------------------------------------------------
# Deterministic corners


def netpol(ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"namespace": ns, "name": name},
        "spec": spec,
    }


def model_docs_with(
    *,
    ns_labels: dict[str, dict[str, str]] | None = None,
    pod_changes: dict[str, dict[str, Any]] | None = None,
    drop: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Model Namespaces + Pods; `pod_changes[key]` may set "ip", "labels",
    "web" (containerPort, protocol)."""
    docs: list[dict[str, Any]] = []
    for ns in NAMESPACES:
        labels = {**(ns_labels or {}).get(ns, {}), "ns": ns, NS_NAME: ns}
        docs.append(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}}
        )
    for mp in MODEL.pods:
        if mp.key in drop:
            continue
        doc = copy.deepcopy(pod_doc(mp))
        ch = (pod_changes or {}).get(mp.key, {})
        if "ip" in ch:
            doc["status"] = {"phase": "Running", "podIP": ch["ip"], "podIPs": [{"ip": ch["ip"]}]}
        if "labels" in ch:
            doc["metadata"]["labels"] = {**ch["labels"], "pod": mp.name}
        if "web" in ch:
            port, proto = ch["web"]
            doc["spec"]["containers"].append(
                {
                    "name": "web",
                    "ports": [{"containerPort": port, "protocol": proto, "name": "web"}],
                }
            )
        docs.append(doc)
    return docs


def apply_and_compare(lab: NodeLab, docs: list[dict[str, Any]], **kw: Any) -> None:
    lab.policy.apply(docs)
    wrong = compare(lab, docs, **kw)
    assert not wrong, _failure(lab, docs, wrong)


def test_named_port_resolves_per_destination_pod(rlab: NodeLab) -> None:
    # x/a maps "web" to 80, x/b to 81, x/c has no "web" at all.
    docs = model_docs_with(pod_changes={"x/a": {"web": (80, "TCP")}, "x/b": {"web": (81, "TCP")}})
    pol = netpol("x", "web-only", {"podSelector": {}, "ingress": [{"ports": [{"port": "web"}]}]})
    egress = netpol(
        "y",
        "web-out",
        {"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"ports": [{"port": "web"}]}]},
    )
    apply_and_compare(rlab, [*docs, pol, egress], probes=((80, Protocol.TCP), (81, Protocol.TCP)))
    ya, xa, xb, xc = (rlab.pods[k] for k in ("y/a", "x/a", "x/b", "x/c"))
    # Spelled out, so the test does not only trust the oracle.
    got = {
        (d.name, port): probe_pairs([(ya, d)], port=port, protocol="TCP")[0].connected
        for d in (xa, xb, xc)
        for port in (80, 81)
    }
    assert got == {
        ("x/a", 80): True,
        ("x/a", 81): False,
        ("x/b", 80): False,
        ("x/b", 81): True,
        ("x/c", 80): False,
        ("x/c", 81): False,
    }


def test_identical_selectors_share_a_set_then_one_is_removed(rlab: NodeLab) -> None:
    docs = model_docs_with()
    peer = {
        "from": [
            {
                "namespaceSelector": {"matchLabels": {"ns": "y"}},
                "podSelector": {
                    "matchExpressions": [{"key": "pod", "operator": "In", "values": ["a", "b"]}]
                },
            }
        ]
    }
    p1 = netpol("x", "one", {"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [peer]})
    p2 = netpol("z", "two", {"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [peer]})
    apply_and_compare(rlab, [*docs, p1, p2], probes=((80, Protocol.TCP),))
    apply_and_compare(rlab, [*docs, p2], probes=((80, Protocol.TCP),))
    apply_and_compare(rlab, [*docs, p1], probes=((80, Protocol.TCP),))


def test_policy_selecting_no_local_pod(rlab: NodeLab) -> None:
    docs = model_docs_with()
    nothing = netpol(
        "x",
        "nothing",
        {"podSelector": {"matchLabels": {"pod": "nope"}}, "policyTypes": ["Ingress", "Egress"]},
    )
    apply_and_compare(rlab, [*docs, nothing], probes=((80, Protocol.TCP),))


def test_namespace_relabel_moves_namespace_selector_peers(rlab: NodeLab) -> None:
    pol = netpol(
        "x",
        "from-team",
        {
            "podSelector": {},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}}]}],
        },
    )
    for blue in ("y", "z", "y"):
        docs = model_docs_with(ns_labels={blue: {"team": "blue"}})
        apply_and_compare(rlab, [*docs, pol], probes=((80, Protocol.TCP),))


def test_pod_ip_change_follows_in_sets_and_antispoof(rlab: NodeLab) -> None:
    new_ip = "10.244.1.50"
    pol = netpol(
        "x",
        "from-ya",
        {
            "podSelector": {"matchLabels": {"pod": "b"}},
            "ingress": [
                {
                    "from": [
                        {
                            "namespaceSelector": {"matchLabels": {"ns": "y"}},
                            "podSelector": {"matchLabels": {"pod": "a"}},
                        }
                    ]
                }
            ],
        },
    )
    ya, xb = rlab.pods["y/a"], rlab.pods["x/b"]
    rlab.policy.apply([*model_docs_with(), pol])
    assert probe_pairs([(ya, xb)], port=80, protocol="TCP")[0].connected
    rlab.topology.add_pod_address("y/a", new_ip)
    try:
        rlab.policy.apply([*model_docs_with(pod_changes={"y/a": {"ip": new_ip}}), pol])
        from felix_lite.netlab import probe_one

        assert probe_one(ya, xb, port=80, source_ip=new_ip).connected
        assert not probe_one(ya, xb, port=80).connected  # old address: now a spoof
        rlab.policy.apply([*model_docs_with(), pol])
        assert not probe_one(ya, xb, port=80, source_ip=new_ip).connected
        assert probe_one(ya, xb, port=80).connected
    finally:
        rlab.topology.remove_pod_address("y/a", new_ip)


def test_unprogrammed_interface_fails_closed_and_catches_up(rlab: NodeLab) -> None:
    # z/c's Pod object is missing: its fl interface exists but is not programmed.
    docs = model_docs_with(drop=["z/c"])
    rlab.policy.apply(docs)
    zc, za = rlab.pods["z/c"], rlab.pods["z/a"]
    pairs = [(zc, za), (za, zc), (zc, rlab.node), (zc, rlab.outside), (rlab.outside, zc)]
    res = probe_pairs(pairs, port=80, protocol="TCP")
    assert [r.connected for r in res] == [False] * len(pairs)
    res = probe_pairs(pairs, port=80, protocol="UDP")
    assert [r.connected for r in res] == [False] * len(pairs)
    rlab.policy.apply(model_docs_with())
    res = probe_pairs(pairs, port=80, protocol="TCP")
    assert [r.connected for r in res] == [True] * len(pairs)


def test_udp_replies_pass_under_egress_deny_on_the_server(rlab: NodeLab) -> None:
    docs = model_docs_with()
    deny = netpol("x", "no-egress", {"podSelector": {}, "policyTypes": ["Egress"]})
    apply_and_compare(rlab, [*docs, deny], probes=((80, Protocol.UDP), (81, Protocol.TCP)))
    xa, ya = rlab.pods["x/a"], rlab.pods["y/a"]
    assert probe_pairs([(ya, xa)], port=80, protocol="UDP")[0].connected
    assert not probe_pairs([(xa, ya)], port=80, protocol="UDP")[0].connected


def test_world_wide_blocks_and_node_and_outside(rlab: NodeLab) -> None:
    docs = model_docs_with()
    pols = [
        netpol(
            "x",
            "egress-world-but-pods",
            {
                "podSelector": {},
                "policyTypes": ["Egress"],
                "egress": [
                    {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.244.0.0/16"]}}]}
                ],
            },
        ),
        netpol(
            "y",
            "egress-nothing-really",
            {
                "podSelector": {},
                "policyTypes": ["Egress"],
                "egress": [
                    {
                        "to": [
                            {
                                "ipBlock": {
                                    "cidr": "10.244.1.0/24",
                                    "except": ["10.244.1.0/25", "10.244.1.128/25"],
                                }
                            }
                        ]
                    }
                ],
            },
        ),
        netpol(
            "z",
            "ingress-world",
            {
                "podSelector": {},
                "ingress": [{"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}],
            },
        ),
    ]
    apply_and_compare(rlab, [*docs, *pols], probes=((80, Protocol.TCP), (80, Protocol.UDP)))
