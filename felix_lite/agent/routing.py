"""The agent's routing half: `NodeDesired` -> `felix_lite.fabric.NodeRouting`.

`NodeRouting` takes fixed `BgpSettings` (peers, ASN, router id). This adapter
derives them from `NodeDesired.bgp` plus the agent's settings file, renders
the ExaBGP sidecar's `exabgp.conf`/`exabgp.env` into `bgp.exabgpConfigDir`
(atomically: the sidecar waits for them), and (re)builds the `NodeRouting`
when they change; every update then hands it the full local pod set
(pod IP -> host-side `fl…` interface). Kernel routes survive a rebuild and an
agent restart: `NodeRouting.stop()` leaves them, the next one reconciles.

Until the node's InternalIP is known (no router id), routing waits and the
agent is not ready. Settings that cannot be rendered (e.g. a password ExaBGP
cannot quote) keep the last good ones and are reported in `status()`, not
raised: retrying would not fix them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from controller.nodestate import NodeDesired
from felix_lite.bgp.config import (
    DEFAULT_MAX_PREFIX,
    BgpConfigError,
    BgpPeer,
    BgpSettings,
    validate,
)
from felix_lite.config import AgentConfig
from policy.names import pod_interface

log = logging.getLogger(__name__)

DEFAULT_HOLD_TIME = 90
DEFAULT_GRACEFUL_RESTART = 120
EXABGP_ENV = {"exabgp.daemon.user": "root"}
"""The API process is a thin relay to the agent's socket; dropping to nobody
would need SETUID and could not open the socket (LAB-NOTES)."""


class RoutingNode(Protocol):
    """What the adapter uses of `NodeRouting`."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def set_local_pods(self, pods: Mapping[str, str]) -> object: ...

    def status(self) -> Any: ...  # RoutingStatus

    def learned(self) -> dict[str, str]: ...


RoutingFactory = Callable[[BgpSettings, str], RoutingNode]
Renderer = Callable[[BgpSettings, Path, str], object]


def _default_factory(settings: BgpSettings, socket_path: str) -> RoutingNode:
    from felix_lite.fabric.node import NodeRouting

    return NodeRouting(settings, socket_path)


def _default_renderer(settings: BgpSettings, out_dir: Path, socket_path: str) -> object:
    from felix_lite.fabric.sidecar import render_to

    return render_to(settings, out_dir, socket_path=socket_path)


def bgp_settings(desired: NodeDesired, cfg: AgentConfig) -> BgpSettings | None:
    """This node's BgpSettings, or None while its router id is unknown."""
    bgp = desired.bgp
    router_id = cfg.bgp.router_id or bgp.router_id
    if not router_id:
        return None
    peers = tuple(
        BgpPeer(
            address=p.address,
            asn=p.asn,
            password=p.password,
            multihop_ttl=p.multihop,
            hold_time=p.hold_time if p.hold_time is not None else DEFAULT_HOLD_TIME,
            graceful_restart=(
                p.graceful_restart if p.graceful_restart is not None else DEFAULT_GRACEFUL_RESTART
            ),
            max_prefix=p.max_prefix if p.max_prefix is not None else DEFAULT_MAX_PREFIX,
        )
        for p in bgp.peers
    )
    return BgpSettings(
        node_name=desired.node,
        router_id=router_id,
        local_asn=bgp.local_asn,
        local_address=cfg.bgp.local_address or router_id,
        peers=peers,
        pod_cidrs=tuple(bgp.import_cidrs or bgp.pod_cidrs or cfg.pod_cidrs),
        node_block=cfg.node_pod_cidr or bgp.node_block,
        aggregate=bgp.aggregate,
        env=dict(EXABGP_ENV),
    )


def local_pod_routes(desired: NodeDesired) -> dict[str, str]:
    """pod IPv4 -> host-side interface (the name the CNI plugin gives it)."""
    out: dict[str, str] = {}
    for pod in desired.local_pods:
        if pod.ip and ":" not in pod.ip:
            out[pod.ip] = pod_interface(pod.namespace, pod.name)
    return out


class NodeRoutingDriver:
    """`loop.RoutingDriver` over `NodeRouting`."""

    def __init__(
        self,
        cfg: AgentConfig,
        *,
        factory: RoutingFactory = _default_factory,
        render: Renderer = _default_renderer,
    ) -> None:
        self._cfg = cfg
        self._factory = factory
        self._render = render
        self._lock = threading.Lock()
        self._node: RoutingNode | None = None
        self._settings: BgpSettings | None = None
        self._problem = ""
        self._waiting_logged = False
        self.rebuilds = 0

    @property
    def ready(self) -> bool:
        return self._node is not None

    def update(self, desired: NodeDesired) -> None:
        settings = bgp_settings(desired, self._cfg)
        with self._lock:
            if settings is None:
                self._problem = (
                    f"node {desired.node}: status.addresses: no InternalIP (BGP router id);"
                    " routing waits"
                )
                if not self._waiting_logged:
                    log.warning("agent.routing.waiting node=%s reason=no-router-id", desired.node)
                    self._waiting_logged = True
                return
            if settings != self._settings:
                try:
                    validate(settings)
                except BgpConfigError as e:
                    self._problem = str(e)
                    log.error(
                        "agent.routing.invalid node=%s error=%s kept_last_good=%s",
                        desired.node,
                        e,
                        self._settings is not None,
                    )
                    if self._node is None:
                        return
                else:
                    self._rebuild(settings)
            pods = local_pod_routes(desired)
            assert self._node is not None
            self._node.set_local_pods(pods)

    def _rebuild(self, settings: BgpSettings) -> None:
        socket_path = self._cfg.bgp.socket
        Path(socket_path).parent.mkdir(parents=True, exist_ok=True)
        self._render(settings, Path(self._cfg.bgp.exabgp_config_dir), socket_path)
        old, self._node = self._node, None
        if old is not None:
            old.stop()  # kernel routes stay; the new one reconciles them
        node = self._factory(settings, socket_path)
        node.start()
        self._node = node
        self._settings = settings
        self._problem = ""
        self.rebuilds += 1
        log.info(
            "agent.routing.started node=%s router_id=%s asn=%d peers=%d config_dir=%s rebuild=%d",
            settings.node_name,
            settings.router_id,
            settings.local_asn,
            len(settings.peers),
            self._cfg.bgp.exabgp_config_dir,
            self.rebuilds,
        )

    def status(self) -> dict[str, Any]:
        with self._lock:
            node, problem = self._node, self._problem
        if node is None:
            return {
                "started": False,
                "peers": [],
                "routes": {},
                "errors": [problem] if problem else [],
            }
        st = node.status()
        learned = len(node.learned())
        peers = [p.as_dict() for p in st.peers]
        return {
            "started": True,
            "bridge_connected": st.bridge_connected,
            "synced": st.synced,
            "peers": peers,
            "routes": {
                "local_pods": st.local_pods,
                "exported": st.exported,
                "announced": st.announced,
                "learned": learned,
                "installed": st.learned_installed,
                "conflicts": st.conflicts,
            },
            "errors": [problem] if problem else [],
        }

    def stop(self) -> None:
        with self._lock:
            node, self._node = self._node, None
        if node is not None:
            node.stop()
