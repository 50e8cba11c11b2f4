"""Prometheus metrics of one agent, on its own registry (several agents may
share a process in tests, and the default registry's process collectors are
not ours to shape).

Pushed by the loop: programming latency (first change of a batch seen ->
kernel programmed), apply duration, applies and failures, ruleset sizes,
the programmed generation and resourceVersions, readiness. Pulled at scrape
time from their owners (so they are never stale): watch restarts and
relists per kind, invalid objects, BGP sessions by state, routes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from felix_lite.agent.loop import RulesetCounts

log = logging.getLogger(__name__)

PREFIX = "felix_lite"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BGP_STATES = ("up", "down", "connecting", "idle")
"""Always exported (0 when none), so dashboards see a stable series set."""

InformerCounters = Callable[[], Mapping[str, Mapping[str, int]]]
"""kind -> {"restarts": n, "relists": n}."""
RoutingStatusFn = Callable[[], Mapping[str, Any] | None]


def _rv_number(rv: str) -> float | None:
    """resourceVersions are opaque strings in Kubernetes, integers in etcd and
    the lab's emulator: export those that are numbers."""
    try:
        return float(int(rv))
    except (TypeError, ValueError):
        return None


class _Pulled(Collector):
    def __init__(
        self,
        *,
        informers: InformerCounters | None,
        invalid: Callable[[], int] | None,
        invalid_total: Callable[[], int] | None,
        routing: RoutingStatusFn | None,
    ) -> None:
        self._informers = informers
        self._invalid = invalid
        self._invalid_total = invalid_total
        self._routing = routing

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._collect()
        except Exception:  # a scrape must never take the agent down
            log.exception("metrics.collect.failed")

    def _collect(self) -> Iterator[Metric]:
        if self._informers is not None:
            restarts = CounterMetricFamily(
                f"{PREFIX}_watch_restarts",
                "Watch reconnects after errors, per kind (informer backoff restarts).",
                labels=["kind"],
            )
            relists = CounterMetricFamily(
                f"{PREFIX}_watch_relists",
                "Relists after the first (410 Gone, periodic resync), per kind.",
                labels=["kind"],
            )
            for kind, counts in sorted(self._informers().items()):
                restarts.add_metric([kind], counts.get("restarts", 0))
                relists.add_metric([kind], counts.get("relists", 0))
            yield restarts
            yield relists
        if self._invalid is not None:
            g = GaugeMetricFamily(
                f"{PREFIX}_invalid_objects",
                "Objects whose current version failed validation (last good kept).",
            )
            g.add_metric([], self._invalid())
            yield g
        if self._invalid_total is not None:
            c = CounterMetricFamily(
                f"{PREFIX}_invalid_object_versions",
                "Distinct invalid object versions seen since start.",
            )
            c.add_metric([], self._invalid_total())
            yield c
        if self._routing is not None:
            st = self._routing()
            if st is None:
                return
            peers = st.get("peers") or []
            by_state = dict.fromkeys(BGP_STATES, 0)
            for p in peers:
                s = str(p.get("state", "unknown")).lower()
                by_state[s] = by_state.get(s, 0) + 1
            g = GaugeMetricFamily(
                f"{PREFIX}_bgp_sessions", "BGP sessions by state.", labels=["state"]
            )
            for s, n in sorted(by_state.items()):
                g.add_metric([s], n)
            yield g
            routes = st.get("routes") or {}
            r = GaugeMetricFamily(
                f"{PREFIX}_bgp_routes",
                "Routes: announced (local pods out), learned (accepted from peers),"
                " installed (learned routes in the kernel).",
                labels=["kind"],
            )
            for k in ("announced", "learned", "installed"):
                r.add_metric([k], float(routes.get(k, 0) or 0))
            yield r


class AgentMetrics:
    """The loop's `LoopMetrics`, plus pulled collectors; `render()` for /metrics."""

    def __init__(
        self,
        *,
        registry: CollectorRegistry | None = None,
        informers: InformerCounters | None = None,
        invalid: Callable[[], int] | None = None,
        invalid_total: Callable[[], int] | None = None,
        routing: RoutingStatusFn | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.latency = Histogram(
            f"{PREFIX}_programming_latency_seconds",
            "From the first change of a batch seen by the agent to the kernel programmed.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.apply_seconds = Histogram(
            f"{PREFIX}_apply_seconds",
            "Duration of one programming pass (policy dataplane + routing).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.applies = Counter(f"{PREFIX}_applies", "Successful programming passes.", registry=r)
        self.apply_failures = Counter(
            f"{PREFIX}_apply_failures", "Failed programming passes (retried).", registry=r
        )
        self.chains = Gauge(
            f"{PREFIX}_iptables_chains", "felix-lite chains programmed.", registry=r
        )
        self.rules = Gauge(f"{PREFIX}_iptables_rules", "Rules in felix-lite chains.", registry=r)
        self.sets = Gauge(f"{PREFIX}_ipsets", "felix-lite ipsets programmed.", registry=r)
        self.members = Gauge(f"{PREFIX}_ipset_members", "Members of felix-lite ipsets.", registry=r)
        self.local_pods = Gauge(f"{PREFIX}_local_pods", "Pods on this node with an IP.", registry=r)
        self.generation = Gauge(
            f"{PREFIX}_programmed_generation",
            "The node's desired-state generation that is in the kernel.",
            registry=r,
        )
        self.rv = Gauge(
            f"{PREFIX}_programmed_resource_version",
            "Per kind: every write up to this resourceVersion is programmed.",
            labelnames=["kind"],
            registry=r,
        )
        self.ready = Gauge(
            f"{PREFIX}_ready", "1 once the first full sync is programmed.", registry=r
        )
        if any(x is not None for x in (informers, invalid, invalid_total, routing)):
            r.register(
                _Pulled(
                    informers=informers,
                    invalid=invalid,
                    invalid_total=invalid_total,
                    routing=routing,
                )
            )

    # ---- LoopMetrics

    def applied(
        self, *, seconds: float, latency: float | None, counts: RulesetCounts, local_pods: int
    ) -> None:
        self.applies.inc()
        self.apply_seconds.observe(seconds)
        if latency is not None:
            self.latency.observe(latency)
        self.chains.set(counts.chains)
        self.rules.set(counts.rules)
        self.sets.set(counts.sets)
        self.members.set(counts.members)
        self.local_pods.set(local_pods)

    def apply_failed(self) -> None:
        self.apply_failures.inc()

    def programmed(self, *, generation: int, rvs: Mapping[str, str], ready: bool) -> None:
        self.generation.set(generation)
        for kind, rv in rvs.items():
            n = _rv_number(rv)
            if n is not None:
                self.rv.labels(kind=kind).set(n)
        self.ready.set(1 if ready else 0)

    # ---- exposition

    content_type = CONTENT_TYPE_LATEST

    def render(self) -> bytes:
        return generate_latest(self.registry)
