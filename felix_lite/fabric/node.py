"""The node agent's routing half: local pods out over BGP, learned routes into the kernel.

`NodeRouting` owns one `Speaker` (the agent side of the ExaBGP sidecar), one
`LocalPodRoutes` (pod /32s + the node block's blackhole, proto 201) and one
`LearnedRoutes` (proto 202). It is what the real agent wires, and what the lab
and the e2e tests run per node.

Restart without a cut: a fresh `NodeRouting` never removes a learned route
before it knows the full picture. Updates only touch the prefixes they name;
the sweep (`LearnedRoutes.reconcile`) runs once every configured peer has sent
End-of-RIB (or ended an enhanced route refresh), or, for peers that cannot
signal it (a plain route refresh after an agent restart has no end marker),
after `settle` seconds without any route change while every peer is up, or
at the latest `sync_timeout` seconds after start. Afterwards it runs again on
every later End-of-RIB (peer restarts) and on `reconcile()`.

Threads: the speaker delivers routes on its own thread; pod updates come from
the caller; one small timer thread decides the sweep. Each route manager has
its own netlink socket and lock (NetlinkRoutes is not thread-safe).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

from felix_lite.bgp.config import BgpSettings, validate
from felix_lite.bgp.messages import PeerState
from felix_lite.bgp.speaker import Speaker, SpeakerStatus
from felix_lite.routes import (
    ApplyResult,
    LearnedRoutes,
    LocalPodRoutes,
    NetlinkRoutes,
    RouteNetlink,
)

log = logging.getLogger(__name__)

NetlinkFactory = Callable[[str | None], RouteNetlink]
DEFAULT_SETTLE = 3.0
DEFAULT_SYNC_TIMEOUT = 30.0


def _default_netlink(netns: str | None) -> RouteNetlink:
    return NetlinkRoutes(netns)


@dataclass(frozen=True, slots=True)
class PeerRoutingStatus:
    address: str
    asn: int
    state: str
    uptime: float | None
    received: int
    accepted: int
    rejected: int
    stale: int
    installed: int
    """Routes from this peer that are in the kernel (selected and installed)."""
    max_prefix_hit: bool
    last_error: str

    def as_dict(self) -> dict[str, Any]:
        """The peer entry of the agent's /status (and so of `lab status`)."""
        return {
            "address": self.address,
            "asn": self.asn,
            "state": self.state,
            "uptime": None if self.uptime is None else round(self.uptime, 1),
            "received": self.received,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "stale": self.stale,
            "installed": self.installed,
            "max_prefix_hit": self.max_prefix_hit,
            "last_error": self.last_error,
        }


@dataclass(frozen=True, slots=True)
class RoutingStatus:
    """What `felix-lite status` / `lab status` shows for the routing half."""

    node_name: str
    bridge_connected: bool
    synced: bool
    local_pods: int
    exported: int
    announced: int
    learned_installed: int
    conflicts: int
    peers: tuple[PeerRoutingStatus, ...]


class NodeRouting:
    """Routing of one node; see the module docstring.

    `manage_pod_routes=False` leaves pod /32s and the blackhole to someone else
    (the CNI plugin writes the /32s anyway) and only exports the pods: the
    benchmark announces 10k fake pods that have no interfaces.
    """

    def __init__(
        self,
        settings: BgpSettings,
        socket_path: str,
        *,
        netns: str | None = None,
        netlink_factory: NetlinkFactory = _default_netlink,
        manage_pod_routes: bool = True,
        onlink_dev: str | None = None,
        settle: float = DEFAULT_SETTLE,
        sync_timeout: float = DEFAULT_SYNC_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        validate(settings)
        self.settings = settings
        self._netns = netns
        self._clock = clock
        self._settle = settle
        self._sync_timeout = sync_timeout
        self._peer_order = {p.address: i for i, p in enumerate(settings.peers)}
        self._learned_lock = threading.Lock()
        self._pods_lock = threading.Lock()
        self._learned = LearnedRoutes(netlink_factory(netns), onlink_dev=onlink_dev)
        self._pod_routes = (
            LocalPodRoutes(netlink_factory(netns), node_block=settings.node_block)
            if manage_pod_routes
            else None
        )
        self._ribs: dict[str, dict[str, str]] = {}
        """peer -> accepted routes (prefix -> next hop), as delivered by the speaker."""
        self._selected: dict[str, tuple[str, str]] = {}
        """prefix -> (peer, next hop) chosen for the kernel."""
        self._pods: dict[str, str] = {}
        self._conflicts = 0
        self._synced_peers: set[str] = set()
        self._synced = False
        self._started_at = clock()
        self._last_change = self._started_at
        self._bridge_since: float | None = None
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._timer: threading.Thread | None = None
        self.reconciles = 0
        self.speaker = Speaker(
            settings, socket_path, on_routes=self._on_routes, on_synced=self._on_synced
        )

    # --- lifecycle -------------------------------------------------------
    def start(self) -> None:
        """Serve the sidecar socket. No learned route is touched until in-sync."""
        self._started_at = self._last_change = self._clock()
        self.speaker.start()
        self._timer = threading.Thread(target=self._sync_loop, name="fabric-sync", daemon=True)
        self._timer.start()
        log.info(
            "fabric.node.started node=%s peers=%d netns=%s",
            self.settings.node_name,
            len(self.settings.peers),
            self._netns,
        )

    def stop(self) -> None:
        """Stop serving; kernel routes stay (the next agent reconciles them)."""
        self._stop.set()
        self._kick.set()
        self.speaker.stop()
        if self._timer is not None:
            self._timer.join(timeout=5)
        log.info("fabric.node.stopped node=%s", self.settings.node_name)

    def __enter__(self) -> NodeRouting:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # --- local pods ------------------------------------------------------
    def set_local_pods(self, pods: Mapping[str, str]) -> ApplyResult | None:
        """The full set of this node's pods (pod IP -> host-side interface).

        Call it once the pod list is in sync: it is a full set, and pod routes
        not in it are removed. Exported prefixes follow (aggregate per settings).
        """
        with self._pods_lock:
            self._pods = dict(pods)
            result = None
            if self._pod_routes is not None:
                result = self._pod_routes.set_desired(self._pods)
                if not result.ok:
                    log.warning(
                        "fabric.pods.errors node=%s errors=%d first=%s",
                        self.settings.node_name,
                        len(result.errors),
                        result.errors[0].message if result.errors else "",
                    )
            self.speaker.set_local_pods(self._pods.keys())
        return result

    def wait_announced(self, timeout: float) -> bool:
        """True once ExaBGP has acked every desired announce/withdraw."""
        return self.speaker.wait_synced(timeout)

    # --- learned routes ----------------------------------------------------
    def _choose(self, prefix: str) -> tuple[str, str] | None:
        best: tuple[int, str, str] | None = None
        for peer, rib in self._ribs.items():
            nh = rib.get(prefix)
            if nh is None:
                continue
            rank = self._peer_order.get(peer, len(self._peer_order))
            if best is None or (rank, peer) < (best[0], best[1]):
                best = (rank, peer, nh)
        return None if best is None else (best[1], best[2])

    def _on_routes(
        self, peer: str, announced: Mapping[str, str], withdrawn: AbstractSet[str]
    ) -> None:
        with self._learned_lock:
            rib = self._ribs.setdefault(peer, {})
            for p in withdrawn:
                rib.pop(p, None)
            rib.update(announced)
            add: dict[str, str] = {}
            gone: list[str] = []
            for prefix in set(announced) | set(withdrawn):
                choice = self._choose(prefix)
                if choice is None:
                    if self._selected.pop(prefix, None) is not None or not self._synced:
                        # before the first sweep a withdraw may hit a kept route
                        gone.append(prefix)
                elif self._selected.get(prefix) != choice:
                    self._selected[prefix] = choice
                    add[prefix] = choice[1]
            if add or gone:
                result = self._learned.update(add, withdrawn=gone)
                self._note(result, "update")
            self._last_change = self._clock()
        self._kick.set()

    def _on_synced(self, peer: str, why: str) -> None:
        log.info("fabric.peer.synced node=%s peer=%s reason=%s", self.settings.node_name, peer, why)
        with self._learned_lock:
            self._synced_peers.add(peer)
            if self._synced:
                # a peer came back (graceful restart): sweep what it did not re-announce
                self._reconcile_locked(f"eor peer={peer}")
        self._kick.set()

    def _note(self, result: ApplyResult, what: str) -> None:
        self._conflicts = len(result.conflicts)
        if not result.ok:
            log.warning(
                "fabric.routes.errors node=%s op=%s errors=%d first=%s",
                self.settings.node_name,
                what,
                len(result.errors),
                result.errors[0].message if result.errors else "",
            )

    def _reconcile_locked(self, why: str) -> ApplyResult:
        result = self._learned.reconcile()
        self._note(result, "reconcile")
        self.reconciles += 1
        log.info(
            "fabric.routes.reconciled node=%s reason=%s added=%d removed=%d replaced=%d",
            self.settings.node_name,
            why,
            len(result.added),
            len(result.removed),
            len(result.replaced),
        )
        return result

    def reconcile(self) -> ApplyResult:
        """Re-read the kernel and converge learned routes (also pod routes)."""
        with self._pods_lock:
            if self._pod_routes is not None:
                self._pod_routes.reconcile()
        with self._learned_lock:
            return self._reconcile_locked("requested")

    def _sync_due(self, now: float) -> str | None:
        """Why the first sweep may run now, or None (see the module docstring)."""
        peers = {p.address for p in self.settings.peers}
        if peers <= self._synced_peers:
            return "eor"
        if now - self._started_at >= self._sync_timeout:
            return "timeout"
        status = self.speaker.status()
        if not status.bridge_connected:
            self._bridge_since = None
            return None
        if self._bridge_since is None:
            self._bridge_since = now
        up = all(
            p.state is PeerState.UP or p.address in self._synced_peers
            for p in status.peers
            if p.address in peers
        )
        quiet = min(now - self._last_change, now - self._bridge_since)
        if up and quiet >= self._settle:
            return "settled"
        return None

    def _sync_loop(self) -> None:
        while not self._stop.is_set():
            self._kick.wait(timeout=0.2)
            self._kick.clear()
            if self._stop.is_set():
                return
            with self._learned_lock:
                if self._synced:
                    continue
                why = self._sync_due(self._clock())
                if why is None:
                    continue
                self._synced = True
                self._reconcile_locked(f"in-sync:{why}")

    @property
    def synced(self) -> bool:
        return self._synced

    def learned(self) -> dict[str, str]:
        """prefix -> next hop selected for the kernel."""
        with self._learned_lock:
            return {p: nh for p, (_, nh) in self._selected.items()}

    # --- status ----------------------------------------------------------
    def status(self) -> RoutingStatus:
        sp: SpeakerStatus = self.speaker.status()
        with self._learned_lock:
            installed = self._learned.installed()
            per_peer: dict[str, int] = {}
            for prefix, (peer, nh) in self._selected.items():
                route = installed.get(prefix)
                if route is not None and route.gateway == nh:
                    per_peer[peer] = per_peer.get(peer, 0) + 1
            n_installed = len(installed)
        return RoutingStatus(
            node_name=self.settings.node_name,
            bridge_connected=sp.bridge_connected,
            synced=self._synced,
            local_pods=len(self._pods),
            exported=sp.desired,
            announced=sp.announced,
            learned_installed=n_installed,
            conflicts=self._conflicts,
            peers=tuple(
                PeerRoutingStatus(
                    address=p.address,
                    asn=p.asn,
                    state=p.state.value,
                    uptime=p.uptime,
                    received=p.received,
                    accepted=p.accepted,
                    rejected=p.rejected,
                    stale=p.stale,
                    installed=per_peer.get(p.address, 0),
                    max_prefix_hit=p.max_prefix_hit,
                    last_error=p.last_error,
                )
                for p in sp.peers
            ),
        )


def pods_from_cni(results: Iterable[tuple[str, str]]) -> dict[str, str]:
    """(pod IP, host interface) pairs -> the mapping `set_local_pods` takes."""
    return {ip.split("/")[0]: ifname for ip, ifname in results}
