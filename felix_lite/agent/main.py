"""`felix-lite agent`: one node's agent process, as the DaemonSet runs it.

Wiring (docs/agent.md): informers -> Cache (last good kept,
Warning Events) -> Coalescer -> AgentLoop -> NodeState -> Dataplane (policy)
and NodeRoutingDriver (routes + BGP). Health and metrics servers read what
the loop publishes. SIGTERM/SIGINT stop informers and servers and leave the
kernel as it is (traffic keeps flowing; the next agent converges from it);
too many consecutive apply failures exit 1 so the kubelet restarts us.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from dataclasses import replace
from types import FrameType
from typing import Any

from controller.cache import Cache
from controller.coalesce import Coalescer
from controller.events import EventRecorder, core_v1_poster
from controller.informer import InformerGroup, agent_informers
from controller.kube import api_client
from controller.nodestate import NodeState, converters
from felix_lite.agent.health import HttpEndpoint, health_routes, metrics_routes, serve
from felix_lite.agent.loop import AgentLoop, LoopExit, RoutingDriver
from felix_lite.agent.metrics import AgentMetrics
from felix_lite.agent.routing import NodeRoutingDriver
from felix_lite.config import AgentConfig, ConfigError, load_config
from felix_lite.dataplane.applier import Dataplane
from felix_lite.dataplane.backend import BackendMode

log = logging.getLogger(__name__)

LIVE_MAX_AGE = 30.0
"""/livez fails when the main loop has not heartbeaten for this long."""
DEFAULT_SECRET_NAMESPACE = "kube-system"
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def secret_namespace(explicit: str | None) -> str:
    """Where BGP password Secrets live: the flag, $POD_NAMESPACE, the service
    account's namespace, else kube-system."""
    if explicit:
        return explicit
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        with open(SA_NAMESPACE_FILE) as f:
            ns = f.read().strip()
        if ns:
            return ns
    except OSError:
        pass
    return DEFAULT_SECRET_NAMESPACE


class Agent:
    """Everything one node runs; `run()` blocks until stopped or failed."""

    def __init__(
        self,
        cfg: AgentConfig,
        *,
        secret_ns: str,
        routing_enabled: bool = True,
        health_bind: str = "127.0.0.1",
        api: Any = None,
        max_failures: int = 10,
        coalesce_quiet: float = 0.02,
        coalesce_max_delay: float = 0.2,
    ) -> None:
        if not cfg.node_name:
            raise ConfigError("agent: nodeName: not set (config nodeName, --node or $NODE_NAME)")
        self.cfg = cfg
        self.node = cfg.node_name
        self.stop_event = threading.Event()
        self.api = api if api is not None else api_client(cfg.kubeconfig or None)
        from kubernetes import client

        self.recorder = EventRecorder(core_v1_poster(client.CoreV1Api(self.api)), host=self.node)
        self.cache = Cache(converters(), events=self.recorder)
        self.informers: InformerGroup = agent_informers(
            self.api, self.cache, secret_namespace=secret_ns, stop=threading.Event()
        )
        self.state = NodeState(self.node, secret_namespace=secret_ns)
        self.dataplane = Dataplane(
            backend=BackendMode(cfg.iptables_backend), trust_for=cfg.resync_seconds
        )
        self.routing: RoutingDriver | None = NodeRoutingDriver(cfg) if routing_enabled else None
        self.metrics = AgentMetrics(
            informers=self._informer_counters,
            invalid=lambda: len(self.cache.invalid()),
            invalid_total=lambda: self.cache.invalid_total,
            routing=self.routing.status if self.routing is not None else None,
        )
        self.loop = AgentLoop(
            self.node,
            cache=self.cache,
            state=self.state,
            batches=Coalescer(self.cache, quiet=coalesce_quiet, max_delay=coalesce_max_delay),
            policy=self.dataplane,
            rv_source=self._rvs,
            routing=self.routing,
            metrics=self.metrics,
            max_failures=max_failures,
            resync_seconds=cfg.resync_seconds,
        )
        self.health_bind = health_bind
        self.endpoints: list[HttpEndpoint] = []
        self.started_at = time.time()

    # ---- sources for the loop and the endpoints

    def _rvs(self) -> dict[str, str]:
        return {
            inf.kind.value: inf.resource_version
            for inf in self.informers.informers
            if inf.resource_version
        }

    def _informer_counters(self) -> dict[str, dict[str, int]]:
        return {
            inf.kind.value: {"restarts": inf.restarts, "relists": inf.relists}
            for inf in self.informers.informers
        }

    def live(self) -> bool:
        return self.loop.live(LIVE_MAX_AGE)

    def ready(self) -> bool:
        return self.loop.status.ready and self.live()

    def status_document(self) -> dict[str, Any]:
        """The /status JSON (shape in docs/agent.md)."""
        st = self.loop.status
        la = st.last_apply
        errors = [st.last_error] if st.last_error else []
        bgp: dict[str, Any] = {"enabled": self.routing is not None, "peers": [], "routes": {}}
        if self.routing is not None:
            rs = self.routing.status()
            errors += list(rs.get("errors") or [])
            bgp.update(rs)
            bgp.pop("errors", None)
        return {
            "node": self.node,
            "ready": st.ready and self.live(),
            "live": self.live(),
            "in_sync": st.in_sync,
            "generation": st.generation,
            "programmed_resource_versions": dict(st.programmed_resource_versions),
            "last_apply": None
            if la is None
            else {
                "at": round(la.at, 3),
                "seconds": round(la.seconds, 4),
                "chains_written": la.chains_written,
                "sets_written": la.sets_written,
                "chains_removed": la.chains_removed,
                "sets_removed": la.sets_removed,
            },
            "applies": st.applies,
            "apply_failures": st.apply_failures,
            "consecutive_failures": st.consecutive_failures,
            "ruleset": {
                "chains": st.ruleset.chains,
                "rules": st.ruleset.rules,
                "sets": st.ruleset.sets,
                "members": st.ruleset.members,
            },
            "local_pods": st.local_pods,
            "bgp": bgp,
            "invalid_objects": [
                {"object": str(k), "error": e} for k, e in sorted(self.cache.invalid().items())
            ],
            "watch": self._informer_counters(),
            "started_at": round(self.started_at, 3),
            "pid": os.getpid(),
            "errors": errors,
        }

    # ---- lifecycle

    def start_servers(self) -> None:
        by_port: dict[int, dict[str, Any]] = {}
        by_port.setdefault(self.cfg.health_port, {}).update(
            health_routes(live=self.live, ready=self.ready, status=self.status_document)
        )
        by_port.setdefault(self.cfg.metrics_port, {}).update(
            metrics_routes(self.metrics.render, self.metrics.content_type)
        )
        self.endpoints = serve(by_port, host=self.health_bind)

    def run(self) -> int:
        log.info(
            "agent.starting node=%s backend=%s routing=%s health=%s:%d metrics=%s:%d",
            self.node,
            self.cfg.iptables_backend,
            self.routing is not None,
            self.health_bind,
            self.cfg.health_port,
            self.health_bind,
            self.cfg.metrics_port,
        )
        self.start_servers()
        self.recorder.start()
        self.informers.start()
        try:
            outcome = self.loop.run(self.stop_event)
        finally:
            self.shutdown()
        if outcome is LoopExit.FAILED:
            log.error(
                "agent.exit node=%s code=1 reason=apply-failures last_error=%s",
                self.node,
                self.loop.status.last_error,
            )
            return 1
        log.info("agent.exit node=%s code=0 reason=signal", self.node)
        return 0

    def shutdown(self) -> None:
        """Stop threads and servers; the kernel state stays as programmed."""
        t0 = time.monotonic()
        self.informers.stop(timeout=3.0)
        self.recorder.stop(timeout=1.0)
        for ep in self.endpoints:
            ep.stop()
        self.endpoints = []
        if self.routing is not None:
            self.routing.stop()
        log.info("agent.shutdown node=%s seconds=%.3f", self.node, time.monotonic() - t0)


def _config(args: argparse.Namespace) -> AgentConfig:
    cfg = load_config(args.config)
    changes: dict[str, Any] = {}
    if args.node:
        changes["node_name"] = args.node
    if args.kubeconfig:
        changes["kubeconfig"] = args.kubeconfig
    if args.health_port is not None:
        changes["health_port"] = args.health_port
    if args.metrics_port is not None:
        changes["metrics_port"] = args.metrics_port
    return replace(cfg, **changes) if changes else cfg


def run(args: argparse.Namespace) -> int:
    """Entry of `felix-lite agent` (argparse namespace from `register`)."""
    cfg = _config(args)
    if getattr(args, "log_level", "INFO").upper() == "INFO" and cfg.log_level != "info":
        logging.getLogger().setLevel(cfg.log_level.upper())
    agent = Agent(
        cfg,
        secret_ns=secret_namespace(args.secret_namespace),
        routing_enabled=not args.no_routing,
        health_bind=args.health_bind,
        max_failures=args.max_failures,
    )

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("agent.signal node=%s signum=%d", agent.node, signum)
        agent.stop_event.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return agent.run()
