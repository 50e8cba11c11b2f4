"""AgentLoop with a real Cache and NodeState, fake dataplane/routing/clock (no I/O)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import pytest

from controller.cache import Cache, Key, Kind
from controller.coalesce import Batch
from controller.nodestate import NodeDesired, NodeState, converters
from felix_lite.agent.loop import (
    AgentLoop,
    LoopExit,
    RulesetCounts,
    TooManyFailures,
)
from felix_lite.dataplane.applier import ApplyResult
from policy.ruleset import Ruleset

NODE = "node-1"


def pod(name: str, ip: str, *, node: str = NODE, rv: str = "1", **labels: str) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "x", "name": name, "labels": labels, "resourceVersion": rv},
        "spec": {"nodeName": node, "containers": [{"name": "c"}]},
        "status": {"podIP": ip},
    }


def policy(name: str, *, end_port: int | None = None) -> dict[str, Any]:
    port: dict[str, Any] = {"protocol": "TCP", "port": 80}
    if end_port is not None:
        port["endPort"] = end_port
    return {
        "metadata": {"namespace": "x", "name": name},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"ports": [port]}]},
    }


class FakePolicy:
    def __init__(self) -> None:
        self.applied: list[Ruleset] = []
        self.fail = 0  # fail this many next applies

    def apply(self, ruleset: Ruleset) -> ApplyResult:
        if self.fail:
            self.fail -= 1
            raise RuntimeError("iptables-restore: exit 1")
        self.applied.append(ruleset)
        return ApplyResult(backend="fake", chains_written=tuple(ruleset.chains))


class FakeRouting:
    def __init__(self, *, ready: bool = True) -> None:
        self.updates: list[NodeDesired] = []
        self.ready = ready
        self.stopped = False

    def update(self, desired: NodeDesired) -> None:
        self.updates.append(desired)

    def status(self) -> dict[str, Any]:
        return {"peers": [], "routes": {}}

    def stop(self) -> None:
        self.stopped = True


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class OrderedCache(Cache):
    """Records when the loop takes changes, to check the RV is read first."""

    def __init__(self, log: list[str]) -> None:
        super().__init__(converters())
        self.log = log

    def take_changes(self) -> dict[Key, object | None]:
        self.log.append("take")
        return super().take_changes()


class Harness:
    def __init__(
        self,
        *,
        routing: FakeRouting | None = None,
        max_failures: int = 3,
        resync: float = 60.0,
        batches: Any = None,
        metrics: Any = None,
    ) -> None:
        self.order: list[str] = []
        self.cache = OrderedCache(self.order)
        self.rvs: dict[str, str] = {}
        self.policy = FakePolicy()
        self.clock = Clock()
        self.routing = routing

        def rv_source() -> Mapping[str, str]:
            self.order.append("rv")
            return dict(self.rvs)

        self.loop = AgentLoop(
            NODE,
            cache=self.cache,
            state=NodeState(NODE, secret_namespace="kube-system"),
            batches=batches if batches is not None else _NoBatches(),
            policy=self.policy,
            rv_source=rv_source,
            routing=routing,
            metrics=metrics,
            max_failures=max_failures,
            backoff_initial=1.0,
            backoff_max=4.0,
            resync_seconds=resync,
            clock=self.clock,
            wall_clock=lambda: 1.7e9,
        )

    def sync_all(self) -> None:
        for kind in self.cache.kinds:
            self.cache.synced(kind)
        self.cache.upsert(Kind.POD, pod("local", "10.244.1.9"))  # policies select it


class _NoBatches:
    def next_batch(
        self, *, stop: threading.Event | None = None, timeout: float | None = None
    ) -> Batch | None:
        raise AssertionError("step() tests do not use the batch source")


def test_nothing_is_programmed_before_in_sync_then_rvs_are_published() -> None:
    h = Harness()
    h.cache.upsert(Kind.POD, pod("a", "10.244.1.2"))
    h.rvs = {"pod": "7"}
    h.loop.step()
    assert h.policy.applied == []
    assert not h.loop.status.ready and h.loop.status.programmed_resource_versions == {}
    h.sync_all()
    h.rvs = {"pod": "9", "networkpolicy": "9"}
    h.loop.step()
    assert len(h.policy.applied) == 1
    st = h.loop.status
    assert st.ready and st.in_sync and st.generation >= 1 and st.local_pods == 2
    assert st.programmed_resource_versions == {"pod": "9", "networkpolicy": "9"}
    assert st.last_apply is not None and st.last_apply.chains_written == st.ruleset.chains
    assert h.order[-2:] == ["rv", "take"]  # RVs are read before the changes are taken


def test_unchanged_state_is_not_reapplied_but_rvs_advance() -> None:
    h = Harness()
    h.sync_all()
    h.cache.upsert(Kind.NETWORK_POLICY, policy("p"))
    h.loop.step()
    gen = h.loop.status.generation
    # An invalid edit: the cache keeps the last good value, nothing to program.
    h.cache.upsert(Kind.NETWORK_POLICY, policy("p", end_port=10))
    h.rvs = {"networkpolicy": "42"}
    h.loop.step()
    assert len(h.policy.applied) == 1
    assert h.loop.status.generation == gen
    assert h.loop.status.programmed_resource_versions["networkpolicy"] == "42"


def test_a_change_is_applied_and_its_rv_published_only_after_success() -> None:
    h = Harness(max_failures=3)
    h.sync_all()
    h.loop.step()
    h.rvs = {"networkpolicy": "5"}
    h.loop.step()
    h.cache.upsert(Kind.NETWORK_POLICY, policy("p"))
    h.rvs = {"networkpolicy": "6"}
    h.policy.fail = 1
    h.loop.step()
    st = h.loop.status
    assert st.programmed_resource_versions["networkpolicy"] == "5"
    assert st.consecutive_failures == 1 and "iptables-restore" in st.last_error
    h.loop.step()  # still inside the backoff: no attempt
    assert st.consecutive_failures == h.loop.status.consecutive_failures
    h.clock.t += 1.0
    h.loop.step()
    st = h.loop.status
    assert st.programmed_resource_versions["networkpolicy"] == "6"
    assert st.consecutive_failures == 0 and st.last_error == "" and st.apply_failures == 1
    assert any(n.startswith("FL-PI-") for n in h.policy.applied[-1].chains)


def test_too_many_consecutive_failures_end_the_loop() -> None:
    h = Harness(max_failures=3)
    h.sync_all()
    h.policy.fail = 100
    h.loop.step()
    h.clock.t += 1.0
    h.loop.step()
    h.clock.t += 2.0
    with pytest.raises(TooManyFailures):
        h.loop.step()
    assert h.loop.status.consecutive_failures == 3 and not h.loop.status.ready


def test_run_returns_failed_after_max_failures() -> None:
    calls = 0

    class Ticks:
        def next_batch(
            self, *, stop: threading.Event | None = None, timeout: float | None = None
        ) -> Batch | None:
            nonlocal calls
            calls += 1
            h.clock.t += 10.0  # past any backoff
            return None

    h = Harness(max_failures=2, batches=Ticks())
    h.sync_all()
    h.policy.fail = 100
    assert h.loop.run(threading.Event()) is LoopExit.FAILED
    assert calls == 2


def test_run_stops_on_event_without_touching_the_kernel_again() -> None:
    stop = threading.Event()

    class StopAfterOne:
        def next_batch(
            self, *, stop: threading.Event | None = None, timeout: float | None = None
        ) -> Batch | None:
            assert stop is not None
            stop.set()
            return None

    h = Harness(batches=StopAfterOne())
    assert h.loop.run(stop) is LoopExit.STOPPED
    assert h.policy.applied == []


def test_periodic_resync_reapplies_unchanged_state() -> None:
    h = Harness(resync=30.0)
    h.sync_all()
    h.loop.step()
    h.clock.t += 10
    h.loop.step()
    assert len(h.policy.applied) == 1
    h.clock.t += 25
    h.loop.step()
    assert len(h.policy.applied) == 2
    assert h.loop.status.applies == 2


def test_routing_gets_every_programmed_state_and_gates_readiness() -> None:
    routing = FakeRouting(ready=False)
    h = Harness(routing=routing)
    h.sync_all()
    h.cache.upsert(Kind.POD, pod("a", "10.244.1.2"))
    h.cache.upsert(Kind.POD, pod("b", "10.244.2.2", node="node-2"))
    h.loop.step()
    assert [p.name for p in routing.updates[-1].local_pods] == ["a", "local"]
    assert not h.loop.status.ready
    routing.ready = True
    h.rvs = {"pod": "3"}
    h.loop.step()
    assert h.loop.status.ready
    assert len(routing.updates) == 1  # readiness flip alone reprograms nothing


def test_latency_is_observed_for_changes_not_for_the_initial_sync() -> None:
    seen: list[float | None] = []

    class Metrics:
        def applied(
            self, *, seconds: float, latency: float | None, counts: RulesetCounts, local_pods: int
        ) -> None:
            seen.append(latency)

        def apply_failed(self) -> None: ...

        def programmed(self, *, generation: int, rvs: Mapping[str, str], ready: bool) -> None: ...

    stop = threading.Event()
    script: list[Any] = []

    class Scripted:
        """Each call: run the next action, then hand the loop a batch whose
        first change was seen 250 ms before it closed."""

        def next_batch(
            self, *, stop: threading.Event | None = None, timeout: float | None = None
        ) -> Batch | None:
            if not script:
                assert stop is not None
                stop.set()
                return None
            script.pop(0)()
            return Batch(seq=1, wakeups=1, waited=0.25, hit_max_delay=False)

    h = Harness(batches=Scripted(), metrics=Metrics())
    script += [h.sync_all, lambda: h.cache.upsert(Kind.NETWORK_POLICY, policy("p"))]
    assert h.loop.run(stop) is LoopExit.STOPPED
    assert seen[0] is None  # the initial sync is not a change
    assert seen[1] == pytest.approx(0.25)  # fake clock: only the coalescing wait counts


def test_cache_wakes_on_deliveries_that_change_nothing() -> None:
    cache = Cache(converters())
    obj = pod("a", "10.244.1.2")
    cache.upsert(Kind.POD, obj)
    assert set(cache.take_changes()) == {Key(Kind.POD, "x", "a")}
    seq = cache.seq
    cache.upsert(Kind.POD, obj)  # same value: nothing to take, but the loop wakes
    assert cache.take_changes() == {}
    assert cache.seq == seq + 1
    assert cache.wait_for_change(seq, 0) == seq + 1
