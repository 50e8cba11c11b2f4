"""The dataplane driver against the real kernel, on both iptables backends.

Each test gets a fresh network namespace (prefix `fldp`) with no link to the
root namespace; every command runs through `ip netns exec`.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import pytest

from felix_lite.dataplane.applier import Dataplane
from felix_lite.dataplane.backend import Backend, BackendMode
from felix_lite.dataplane.runner import SubprocessRunner
from felix_lite.dataplane.stats import Stats
from policy import names
from policy.names import ChainName, SetName
from policy.render import rule_hashes
from policy.ruleset import Chain, HookRule, IpSetSpec, Ruleset, SetType

pytestmark = pytest.mark.kernel

log = logging.getLogger(__name__)


def _have_root() -> bool:
    return os.geteuid() == 0 and os.path.isdir("/run") and _which("ip") and _which("ipset")


def _which(tool: str) -> bool:
    return subprocess.run(["which", tool], capture_output=True, check=False).returncode == 0


if not _have_root():
    pytest.skip("needs root, ip and ipset", allow_module_level=True)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"fldp{secrets.token_hex(4)}"
    _ip("netns", "add", name)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


@dataclass
class Recorder:
    """Real runner that remembers what it was asked to run."""

    inner: SubprocessRunner
    calls: list[tuple[tuple[str, ...], str | None]]

    def run(self, argv: Sequence[str], *, input: str | None = None) -> str:
        self.calls.append((tuple(argv), input))
        return self.inner.run(argv, input=input)

    def writes(self) -> list[tuple[str, ...]]:
        return [argv for argv, inp in self.calls if inp is not None or "destroy" in argv]


@pytest.fixture(params=[BackendMode.LEGACY, BackendMode.NFT], ids=["legacy", "nft"])
def backend(request: pytest.FixtureRequest) -> Backend:
    return Backend.of(request.param)


def recorder(ns: str) -> Recorder:
    return Recorder(SubprocessRunner(netns=ns), [])


def sh(ns: str, *argv: str, input: str | None = None) -> str:
    return SubprocessRunner(netns=ns).run(list(argv), input=input)


# ---- rulesets built by hand, following docs/policy-dataplane.md

ALLOW = "-j MARK --set-xmark 0x40000/0x40000"
RET = "-m mark --mark 0x40000/0x40000 -j RETURN"
HOOKS = (
    HookRule("filter", "FORWARD", f"-j {names.CHAIN_FORWARD}"),
    HookRule("filter", "INPUT", f"-j {names.CHAIN_INPUT}"),
)


def policy_ruleset(policies: dict[str, int], *, extra_member: str | None = None) -> Ruleset:
    """One pod ingress chain using one policy chain (and one set) per entry of
    `policies` (name -> allowed TCP port), plus the fixed chains and hooks."""
    pod_chain = names.chain_name(names.KIND_POD_INGRESS, "x/server")
    iface = names.pod_interface("x", "server")
    chains: dict[ChainName, Chain] = {
        names.CHAIN_FORWARD: Chain(
            names.CHAIN_FORWARD,
            (
                "-o fl+ -m conntrack --ctstate INVALID -j DROP",
                "-o fl+ -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                "-j MARK --set-xmark 0x0/0x40000",
                f"-o fl+ -j {names.CHAIN_TO_PODS}",
                "-o fl+ -j ACCEPT",
            ),
        ),
        names.CHAIN_INPUT: Chain(names.CHAIN_INPUT, ("-i fl+ -j ACCEPT",)),
        names.CHAIN_TO_PODS: Chain(names.CHAIN_TO_PODS, (f"-o {iface} -g {pod_chain}", "-j DROP")),
    }
    sets: dict[SetName, IpSetSpec] = {}
    pod_rules: list[str] = []
    for i, (pol, port) in enumerate(sorted(policies.items())):
        chain = names.chain_name(names.KIND_POLICY_INGRESS, f"x/{pol}")
        peer = names.set_name(names.KIND_SET_PODS, f"x/{pol}")
        members = {f"10.1.{i}.1", f"10.1.{i}.2"} | ({extra_member} if extra_member else set())
        sets[peer] = IpSetSpec(peer, SetType.HASH_IP, frozenset(members), description=pol)
        chains[chain] = Chain(
            chain, (f"-m set --match-set {peer} src -p tcp --dport {port} {ALLOW}", RET)
        )
        pod_rules += [f"-j {chain}", RET]
    net = names.set_name(names.KIND_SET_NET, "10.0.0.0/8 except 10.9.0.0/16")
    sets[net] = IpSetSpec(
        net, SetType.HASH_NET, frozenset({"10.0.0.0/8"}), frozenset({"10.9.0.0/16"})
    )
    sctp = names.chain_name(names.KIND_POLICY_INGRESS, "x/sctp")
    chains[sctp] = Chain(sctp, (f"-m set --match-set {net} src -p sctp --dport 80 {ALLOW}", RET))
    pod_rules += [f"-j {sctp}", RET, "-j DROP"]
    chains[pod_chain] = Chain(pod_chain, tuple(pod_rules))
    return Ruleset(sets=sets, chains=chains, hooks=HOOKS)


def kernel_chains(ns: str, backend: Backend) -> dict[str, list[str]]:
    chains: dict[str, list[str]] = {}
    for line in sh(ns, backend.save, "-t", "filter").splitlines():
        if line.startswith(":"):
            chains.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            _, chain, spec = line.split(" ", 2)
            chains.setdefault(chain, []).append(spec)
    return chains


def kernel_sets(ns: str) -> dict[str, set[str]]:
    sets: dict[str, set[str]] = {}
    for line in sh(ns, "ipset", "save").splitlines():
        parts = line.split()
        if parts[0] == "create":
            sets[parts[1]] = set()
        elif parts[0] == "add":
            sets[parts[1]].add(" ".join(parts[2:]))
    return sets


def assert_matches(ns: str, backend: Backend, rs: Ruleset) -> None:
    chains = kernel_chains(ns, backend)
    ours = {c for c in chains if c.startswith("FL-")}
    assert ours == set(rs.chains)
    for name, chain in rs.chains.items():
        got = [s.split('--comment "fl:')[1].split('"')[0] for s in chains[name]]
        assert got == list(rule_hashes(chain)), name
    for hook in rs.hooks:
        assert chains[hook.chain][0] == f'-m comment --comment "felix-lite:hook" {hook.rule}'
        assert sum("felix-lite:hook" in r for r in chains[hook.chain]) == 1
    sets = kernel_sets(ns)
    assert {s for s in sets if s.startswith("fl-")} == set(rs.sets)
    for name, spec in rs.sets.items():
        assert sets[name] == set(spec.members) | {f"{m} nomatch" for m in spec.nomatch}


def add_foreign(ns: str, backend: Backend) -> None:
    sh(ns, backend.iptables, "-N", "KUBE-FOO")
    sh(ns, backend.iptables, "-A", "KUBE-FOO", "-s", "192.0.2.1/32", "-j", "DROP")
    sh(
        ns,
        backend.iptables,
        "-A",
        "FORWARD",
        "-m",
        "comment",
        "--comment",
        "kube",
        "-j",
        "KUBE-FOO",
    )
    sh(ns, "ipset", "create", "KUBE-SET", "hash:ip")
    sh(ns, "ipset", "add", "KUBE-SET", "192.0.2.7")


def assert_foreign_intact(ns: str, backend: Backend) -> None:
    chains = kernel_chains(ns, backend)
    assert chains["KUBE-FOO"] == ["-s 192.0.2.1/32 -j DROP"]
    assert [r for r in chains["FORWARD"] if "KUBE-FOO" in r] in (
        ['-m comment --comment "kube" -j KUBE-FOO'],
        ["-m comment --comment kube -j KUBE-FOO"],
    )
    assert kernel_sets(ns)["KUBE-SET"] == {"192.0.2.7"}


BASE = {"allow-a": 80, "allow-b": 81}


# ---- tests


def test_apply_from_empty_then_verify(netns: str, backend: Backend) -> None:
    rs = policy_ruleset(BASE)
    runner = recorder(netns)
    result = Dataplane(backend=backend, runner=runner).apply(rs)
    assert set(result.chains_written) == set(rs.chains)
    assert set(result.sets_written) == set(rs.sets)
    assert result.sctp_rules_dropped == 0  # the sctp match loads on this kernel
    assert_matches(netns, backend, rs)
    assert any(
        "-p sctp " in r and "-m sctp --dport 80 " in r
        for rules in kernel_chains(netns, backend).values()
        for r in rules
    )
    assert Stats(backend, runner=runner, netns=netns).verify(rs) == []


def test_reapply_is_noop(netns: str, backend: Backend) -> None:
    rs = policy_ruleset(BASE)
    runner = recorder(netns)
    dp = Dataplane(backend=backend, runner=runner)
    dp.apply(rs)
    runner.calls.clear()
    result = dp.apply(rs)
    assert not result.changed
    assert runner.writes() == []
    assert [argv for argv, _ in runner.calls] == [
        (backend.save, "-t", "filter"),
        ("ipset", "list", "-n"),
    ]


def test_change_one_chain_and_one_set(netns: str, backend: Backend) -> None:
    runner = recorder(netns)
    dp = Dataplane(backend=backend, runner=runner)
    dp.apply(policy_ruleset(BASE))
    runner.calls.clear()
    new = policy_ruleset({"allow-a": 80, "allow-b": 8081})
    result = dp.apply(new)
    changed = names.chain_name(names.KIND_POLICY_INGRESS, "x/allow-b")
    assert result.chains_written == (changed,)
    assert result.sets_written == ()
    [restore] = [inp for argv, inp in runner.calls if argv[0] == backend.restore]
    assert restore is not None
    assert [ln for ln in restore.splitlines() if ln.startswith(":")] == [f":{changed} - [0:0]"]
    assert_matches(netns, backend, new)
    assert "--dport 8081" in kernel_chains(netns, backend)[changed][0]

    runner.calls.clear()
    newer = policy_ruleset({"allow-a": 80, "allow-b": 8081}, extra_member="10.7.7.7")
    result = dp.apply(newer)
    assert result.chains_written == () and len(result.sets_written) == 2
    assert all(argv[0] != backend.restore for argv, _ in runner.calls)
    assert_matches(netns, backend, newer)


def test_remove_policy_removes_stale_chain_and_set(netns: str, backend: Backend) -> None:
    dp = Dataplane(backend=backend, runner=recorder(netns))
    dp.apply(policy_ruleset(BASE))
    result = dp.apply(policy_ruleset({"allow-a": 80}))
    gone_chain = names.chain_name(names.KIND_POLICY_INGRESS, "x/allow-b")
    gone_set = names.set_name(names.KIND_SET_PODS, "x/allow-b")
    assert result.chains_removed == (gone_chain,)
    assert result.sets_removed == (gone_set,)
    assert gone_chain not in kernel_chains(netns, backend)
    assert gone_set not in kernel_sets(netns)
    assert_matches(netns, backend, policy_ruleset({"allow-a": 80}))


def test_foreign_state_survives_apply_and_flush(netns: str, backend: Backend) -> None:
    add_foreign(netns, backend)
    dp = Dataplane(backend=backend, runner=recorder(netns))
    dp.apply(policy_ruleset(BASE))
    assert_foreign_intact(netns, backend)
    dp.apply(policy_ruleset({"allow-a": 80}))
    assert_foreign_intact(netns, backend)
    dp.flush()
    assert_foreign_intact(netns, backend)
    chains = kernel_chains(netns, backend)
    assert not [c for c in chains if c.startswith("FL-")]
    assert not any("felix-lite" in r for rules in chains.values() for r in rules)
    assert not [s for s in kernel_sets(netns) if s.startswith("fl-")]


def test_restart_converges_without_flushing(netns: str, backend: Backend) -> None:
    Dataplane(backend=backend, runner=recorder(netns)).apply(policy_ruleset(BASE))
    runner = recorder(netns)
    result = Dataplane(backend=backend, runner=runner).apply(policy_ruleset(BASE))
    assert not result.changed
    assert runner.writes() == []
    # A restart with a different desired state changes only the difference.
    runner.calls.clear()
    result = Dataplane(backend=backend, runner=runner).apply(policy_ruleset({"allow-a": 80}))
    assert len(result.chains_written) == 1 and len(result.chains_removed) == 1
    assert_matches(netns, backend, policy_ruleset({"allow-a": 80}))


def test_duplicate_hooks_from_a_crash_are_cleaned(netns: str, backend: Backend) -> None:
    dp = Dataplane(backend=backend, runner=recorder(netns))
    dp.apply(policy_ruleset(BASE))
    ipt = backend.iptables
    sh(netns, ipt, "-I", "FORWARD", "1", "-s", "192.0.2.9/32", "-j", "ACCEPT")
    sh(
        netns,
        ipt,
        "-A",
        "FORWARD",
        "-m",
        "comment",
        "--comment",
        "felix-lite:hook",
        "-j",
        "FL-FORWARD",
    )
    result = dp.apply(policy_ruleset(BASE))
    assert result.hooks_rewritten == ("FORWARD",)
    assert kernel_chains(netns, backend)["FORWARD"] == [
        '-m comment --comment "felix-lite:hook" -j FL-FORWARD',
        "-s 192.0.2.9/32 -j ACCEPT",
    ]


def test_flush_removes_all_ours(netns: str, backend: Backend) -> None:
    dp = Dataplane(backend=backend, runner=recorder(netns))
    dp.apply(policy_ruleset(BASE))
    dp.flush()
    chains = kernel_chains(netns, backend)
    assert set(chains) == {"INPUT", "FORWARD", "OUTPUT"}
    assert all(rules == [] for rules in chains.values())
    assert kernel_sets(netns) == {}
    dp.flush()  # idempotent


@pytest.fixture
def pod_pair(netns: str) -> Iterator[tuple[str, str, str]]:
    """`netns` as a node with one `fl…` veth to a pod namespace; returns
    (node ns, pod ns, node address)."""
    pod = f"{netns}p"
    _ip("netns", "add", pod)
    try:
        iface = names.pod_interface("x", "server")
        _ip("-n", netns, "link", "add", iface, "type", "veth", "peer", "name", "eth0", "netns", pod)
        _ip("-n", netns, "addr", "add", "10.99.0.1/24", "dev", iface)
        _ip("-n", pod, "addr", "add", "10.99.0.2/24", "dev", "eth0")
        for ns, dev in ((netns, iface), (pod, "eth0"), (netns, "lo"), (pod, "lo")):
            _ip("-n", ns, "link", "set", dev, "up")
        yield netns, pod, "10.99.0.1"
    finally:
        subprocess.run(["ip", "netns", "del", pod], check=False, capture_output=True)


def test_stats_counters_and_verify(pod_pair: tuple[str, str, str], backend: Backend) -> None:
    node, pod, node_ip = pod_pair
    rs = policy_ruleset(BASE)
    runner = recorder(node)
    Dataplane(backend=backend, runner=runner).apply(rs)
    stats = Stats(backend, runner=runner, netns=node)
    assert Stats.detect(netns=node).counters() == stats.counters()  # detection finds our rules
    before = stats.counters()
    ours = [r for r in before if r.chain.startswith("FL-")]
    assert len(ours) == sum(len(c.rules) for c in rs.chains.values())
    assert all(r.comment.startswith("fl:") for r in ours)
    assert {r.chain for r in before if r.comment == "felix-lite:hook"} == {"FORWARD", "INPUT"}
    assert all(r.packets == 0 and r.bytes == 0 for r in before)
    # Three TCP connects to a closed port: each SYN enters through FL-INPUT's
    # accept and is answered with a RST, so connect() returns only after it.
    connect = (
        "import socket\n"
        "for _ in range(3):\n"
        "    s = socket.socket(); s.settimeout(5)\n"
        f"    assert s.connect_ex(('{node_ip}', 9)) != 0\n"
        "    s.close()\n"
    )
    subprocess.run(["ip", "netns", "exec", pod, sys.executable, "-c", connect], check=True)
    after = stats.counters()
    accept = next(r for r in after if r.chain == names.CHAIN_INPUT)
    assert accept.rule.endswith("-j ACCEPT") and "fl+" in accept.rule
    assert accept.packets >= 3 and accept.bytes >= 3 * 40
    assert stats.verify(rs) == []
    # verify sees drift through the same read path.
    sh(node, backend.iptables, "-D", names.CHAIN_TO_PODS, "2")
    problems = stats.verify(rs)
    assert problems == [f"chain {names.CHAIN_TO_PODS}: rules differ (kernel 1, wanted 2)"]


def test_backend_override_and_detection(netns: str) -> None:
    from felix_lite.dataplane.backend import detect_backend

    runner = SubprocessRunner(netns=netns)
    sh(netns, "iptables-legacy", "-N", "KUBE-FOO")
    sh(netns, "iptables-legacy", "-A", "FORWARD", "-j", "KUBE-FOO")
    assert detect_backend(runner).mode is BackendMode.LEGACY
    assert detect_backend(runner, BackendMode.NFT).mode is BackendMode.NFT


# ---- scale (prints timings; no timed assertions)


def scale_ruleset(
    *, n_sets: int = 1000, n_policies: int = 200, rules_per_policy: int = 20
) -> Ruleset:
    """~5,000 rules / 1,000 sets: 200 policy chains x 20 rules, 100 pod chains,
    dispatch chains; each set holds 8 pod IPs."""
    sets = {}
    for i in range(n_sets):
        name = names.set_name(names.KIND_SET_PODS, f"sel-{i}")
        sets[name] = IpSetSpec(
            name, SetType.HASH_IP, frozenset(f"10.{i // 250}.{i % 250}.{j}" for j in range(1, 9))
        )
    set_names = list(sets)
    chains: dict[ChainName, Chain] = {}
    policy_chains = []
    for p in range(n_policies):
        chain = names.chain_name(names.KIND_POLICY_INGRESS, f"ns/pol-{p}")
        rules = []
        for r in range(rules_per_policy // 2):
            peer = set_names[(p * 5 + r) % n_sets]
            rules += [f"-m set --match-set {peer} src -p tcp --dport {80 + r} {ALLOW}", RET]
        chains[chain] = Chain(chain, tuple(rules))
        policy_chains.append(chain)
    dispatch: list[str] = []
    for pod in range(100):
        chain = names.chain_name(names.KIND_POD_INGRESS, f"ns/pod-{pod}")
        rules = []
        for k in range(4):
            rules += [f"-j {policy_chains[(pod * 2 + k) % n_policies]}", RET]
        chains[chain] = Chain(chain, (*rules, "-j DROP"))
        dispatch.append(f"-o {names.pod_interface('ns', f'pod-{pod}')} -g {chain}")
    chains[names.CHAIN_TO_PODS] = Chain(names.CHAIN_TO_PODS, (*dispatch, "-j DROP"))
    chains[names.CHAIN_FORWARD] = Chain(names.CHAIN_FORWARD, (f"-o fl+ -j {names.CHAIN_TO_PODS}",))
    chains[names.CHAIN_INPUT] = Chain(names.CHAIN_INPUT, ("-i fl+ -j ACCEPT",))
    return Ruleset(sets=sets, chains=chains, hooks=HOOKS)


@pytest.mark.slow
def test_scale_first_apply_and_one_chain_update(netns: str, backend: Backend) -> None:
    rs = scale_ruleset()
    n_rules = sum(len(c.rules) for c in rs.chains.values())
    dp = Dataplane(backend=backend, runner=recorder(netns))
    t = time.perf_counter()
    first = dp.apply(rs)
    first_s = time.perf_counter() - t
    assert len(first.sets_written) == len(rs.sets)
    t = time.perf_counter()
    noop = dp.apply(rs)
    noop_s = time.perf_counter() - t
    assert not noop.changed
    victim = next(c for c in rs.chains if c.startswith("FL-PI-"))
    changed = replace(rs.chains[victim], rules=(*rs.chains[victim].rules, "-j RETURN"))
    rs2 = replace(rs, chains={**rs.chains, victim: changed})
    t = time.perf_counter()
    upd = dp.apply(rs2)
    upd_s = time.perf_counter() - t
    assert upd.chains_written == (victim,)
    restart = Dataplane(backend=backend, runner=recorder(netns))
    t = time.perf_counter()
    assert not restart.apply(rs2).changed
    restart_s = time.perf_counter() - t
    first_phases = {k: round(v, 3) for k, v in first.timings.items()}
    upd_phases = {k: round(v, 3) for k, v in upd.timings.items()}
    report = (
        f"scale backend={backend.mode.value} rules={n_rules} sets={len(rs.sets)} "
        f"first_apply_s={first_s:.3f} phases={first_phases} noop_s={noop_s:.3f} "
        f"one_chain_update_s={upd_s:.3f} phases={upd_phases} restart_noop_s={restart_s:.3f}"
    )
    print(report)
    log.warning(report)
    assert Stats(backend, runner=SubprocessRunner(netns=netns), netns=netns).verify(rs2) == []
