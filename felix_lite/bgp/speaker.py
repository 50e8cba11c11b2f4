"""The agent side of the ExaBGP sidecar: serves the bridge's unix socket.

Keeps the desired announcements, sends them as acked ExaBGP commands, and on
every new bridge connection (sidecar or API-process restart) re-announces
everything, withdraws leftovers, sends End-of-RIB (the config sets manual-eor,
so peers hold our stale routes until then) and asks the peers for a route
refresh. Learned routes go through the import filter (`messages.AdjRibIn`) and
reach the route installer through `on_routes(peer, announced, withdrawn)`,
called on one delivery thread so a slow installer never stalls the socket
reader (a slow reader lets ExaBGP's hold timers expire).

Threads: accept, one reader per connection, a sender (the only writer), and a
delivery thread for the callback. Shared state is guarded by one condition.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from felix_lite.bgp import commands
from felix_lite.bgp.config import DEFAULT_MAX_PREFIX, BgpSettings
from felix_lite.bgp.messages import (
    Ack,
    AdjRibIn,
    EorEvent,
    MessageError,
    NotificationEvent,
    PeerState,
    RefreshEvent,
    RefreshPhase,
    RibDelta,
    StateEvent,
    UpdateEvent,
    merge_deltas,
    parse_line,
)

log = logging.getLogger(__name__)

RoutesCallback = Callable[[str, Mapping[str, str], AbstractSet[str]], None]
"""on_routes(peer, announced: {prefix: nexthop}, withdrawn: {prefix})"""

SyncedCallback = Callable[[str, str], None]
"""on_synced(peer, reason): the peer's table is complete ("eor" or "refresh-end");
called on the delivery thread after every route received before it was delivered."""

DEFAULT_STALE_TIME = 120.0
"""How long learned routes survive a lost sidecar or a peer without GR settings."""


class ConnectionLost(Exception):
    """The bridge went away while commands were in flight."""


@dataclass(frozen=True, slots=True)
class PeerStatus:
    address: str
    asn: int
    state: PeerState
    uptime: float | None
    """Seconds since the session came up; None unless up."""
    received: int
    accepted: int
    rejected: int
    stale: int
    max_prefix: int
    max_prefix_hit: bool
    last_error: str


@dataclass(frozen=True, slots=True)
class SpeakerStatus:
    node_name: str
    bridge_connected: bool
    desired: int
    announced: int
    peers: tuple[PeerStatus, ...]


class _Peer:
    def __init__(self, address: str, asn: int, rib: AdjRibIn, stale_time: float) -> None:
        self.address = address
        self.asn = asn
        self.rib = rib
        self.stale_time = stale_time
        self.state = PeerState.IDLE
        self.up_since: float | None = None
        self.stale_deadline: float | None = None
        self.last_error = ""


class _Conn:
    def __init__(self, sock: socket.socket, generation: int) -> None:
        self.sock = sock
        self.generation = generation
        self.pending: deque[str] = deque()
        self.closed = False
        self.needs_resync = True


class Speaker:
    """Serves the bridge socket; see the module docstring."""

    def __init__(
        self,
        settings: BgpSettings,
        socket_path: str,
        *,
        on_routes: RoutesCallback,
        clock: Callable[[], float] = time.monotonic,
        batch: int = commands.DEFAULT_BATCH,
        window: int = 8,
        ack_timeout: float = 30.0,
        socket_mode: int = 0o660,
        on_synced: SyncedCallback | None = None,
    ) -> None:
        self._settings = settings
        self._on_synced = on_synced
        self._synced: list[tuple[str, str]] = []
        self._path = socket_path
        self._on_routes = on_routes
        self._clock = clock
        self._batch = batch
        self._window = window
        self._ack_timeout = ack_timeout
        self._socket_mode = socket_mode
        self._cv = threading.Condition()
        self._stop = False
        self._listener: socket.socket | None = None
        self._conn: _Conn | None = None
        self._generation = 0
        self._desired: frozenset[str] = frozenset()
        self._own: frozenset[str] = frozenset()
        self._announced: set[str] = set()
        """What ExaBGP may hold from us (kept across connections, so a
        reconnect can withdraw leftovers)."""
        self._dirty = False
        self._sending = False
        self._peers_up: list[str] = []
        self._peers: dict[str, _Peer] = {}
        self._deliveries: deque[tuple[str, RibDelta]] = deque()
        self._threads: list[threading.Thread] = []
        self.generations_synced = 0
        for p in settings.peers:
            self._peer(p.address, p.asn)

    @property
    def socket_path(self) -> str:
        return self._path

    # --- lifecycle -------------------------------------------------------
    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self._path)
        os.chmod(self._path, self._socket_mode)
        listener.listen(4)
        self._listener = listener
        for target, name in (
            (self._accept_loop, "bgp-accept"),
            (self._send_loop, "bgp-send"),
            (self._deliver_loop, "bgp-deliver"),
        ):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("bgp.speaker.started socket=%s node=%s", self._path, self._settings.node_name)

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            conn = self._conn
            self._cv.notify_all()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        if conn is not None:
            self._close(conn)
        for t in self._threads:
            t.join(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)

    # --- desired state ---------------------------------------------------
    def set_local_pods(self, pod_ips: Iterable[str]) -> None:
        """The full set of this node's pod IPs (announced, and never imported)."""
        ips = [commands.normalize_prefix(ip) for ip in pod_ips]
        desired = commands.desired_prefixes(
            ips, self._settings.node_block, self._settings.aggregate
        )
        own = frozenset(ips)
        with self._cv:
            self._desired = desired
            if own != self._own:
                self._own = own
                for peer in self._peers.values():
                    self._deliver(peer.address, peer.rib.set_own_prefixes(own))
            self._dirty = True
            self._cv.notify_all()

    def wait_synced(self, timeout: float) -> bool:
        """True once a connected bridge has acked everything desired."""
        with self._cv:
            return self._cv.wait_for(self._is_synced, timeout=timeout)

    def _is_synced(self) -> bool:
        c = self._conn
        return (
            c is not None
            and not c.closed
            and not c.needs_resync
            and not self._dirty
            and not self._sending
            and self._announced == self._desired
        )

    def status(self) -> SpeakerStatus:
        now = self._clock()
        with self._cv:
            peers = tuple(
                PeerStatus(
                    address=p.address,
                    asn=p.asn,
                    state=p.state,
                    uptime=None if p.up_since is None else now - p.up_since,
                    received=p.rib.received,
                    accepted=p.rib.accepted_count,
                    rejected=sum(p.rib.rejected.values()),
                    stale=p.rib.stale_count,
                    max_prefix=p.rib.max_prefix,
                    max_prefix_hit=p.rib.limit_hit,
                    last_error=p.last_error,
                )
                for p in sorted(self._peers.values(), key=lambda x: x.address)
            )
            return SpeakerStatus(
                node_name=self._settings.node_name,
                bridge_connected=self._conn is not None and not self._conn.closed,
                desired=len(self._desired),
                announced=len(self._announced),
                peers=peers,
            )

    # --- peers -----------------------------------------------------------
    def _peer(self, address: str, asn: int) -> _Peer:
        peer = self._peers.get(address)
        if peer is None:
            cfg = self._settings.peer(address)
            if cfg is None:
                log.warning("bgp.peer.unconfigured peer=%s asn=%d", address, asn)
            gr = cfg.graceful_restart if cfg is not None else None
            rib = AdjRibIn(
                address,
                local_asn=self._settings.local_asn,
                pod_cidrs=self._settings.pod_cidrs,
                max_prefix=cfg.max_prefix if cfg is not None else DEFAULT_MAX_PREFIX,
                own_prefixes=self._own,
                node_block=self._settings.node_block,
            )
            peer = _Peer(
                address,
                cfg.asn if cfg is not None else asn,
                rib,
                float(gr) if gr else DEFAULT_STALE_TIME,
            )
            self._peers[address] = peer
        return peer

    def _deliver(self, peer: str, delta: RibDelta) -> None:
        """Queue a delta for the delivery thread (caller holds the lock)."""
        if delta:
            self._deliveries.append((peer, delta))
            self._cv.notify_all()

    def _set_up(self, peer: _Peer) -> None:
        if peer.state is not PeerState.UP:
            peer.state = PeerState.UP
            peer.up_since = self._clock()
            log.info("bgp.peer.up peer=%s asn=%d", peer.address, peer.asn)

    def _handle(self, conn: _Conn, line: str) -> None:
        try:
            event = parse_line(line)
        except MessageError as e:
            log.warning("bgp.message.unparsed error=%s", e)
            return
        if event is None:
            return
        with self._cv:
            if isinstance(event, Ack):
                if not conn.pending:
                    log.debug("bgp.ack.unexpected ok=%s", event.ok)
                    return
                command = conn.pending.popleft()
                if not event.ok:
                    # a global End-of-RIB or route refresh with no session up has
                    # nobody to go to; each peer gets its own when it comes up
                    idle = command in (commands.EOR, commands.ROUTE_REFRESH) and not any(
                        p.state is PeerState.UP for p in self._peers.values()
                    )
                    (log.debug if idle else log.warning)(
                        "bgp.command.error command=%.120s", command
                    )
                self._cv.notify_all()
                return
            peer = self._peer(event.peer, getattr(event, "peer_asn", 0))
            if isinstance(event, StateEvent):
                if event.state is PeerState.UP:
                    self._set_up(peer)  # stale routes stay until its End-of-RIB
                    self._peers_up.append(peer.address)
                    self._cv.notify_all()
                elif event.state is PeerState.DOWN:
                    was_up = peer.state is PeerState.UP
                    peer.state = PeerState.DOWN
                    peer.up_since = None
                    peer.last_error = event.reason
                    if was_up:
                        log.info("bgp.peer.down peer=%s reason=%s", peer.address, event.reason)
                    self._peer_lost(peer)
                else:
                    if peer.state is not PeerState.UP:
                        peer.state = event.state
            elif isinstance(event, UpdateEvent):
                self._set_up(peer)
                self._deliver(peer.address, peer.rib.apply(event))
            elif isinstance(event, EorEvent):
                self._set_up(peer)
                if event.afi == "ipv4" and event.safi == "unicast":
                    self._sweep(peer, "eor")
            elif isinstance(event, RefreshEvent):
                if event.phase is RefreshPhase.BEGIN:
                    peer.rib.mark_stale()
                elif event.phase is RefreshPhase.END:
                    self._sweep(peer, "refresh-end")
            elif isinstance(event, NotificationEvent):
                peer.last_error = (
                    f"notification {event.direction} code={event.code} "
                    f"subcode={event.subcode} {event.message}".strip()
                )
                log.warning("bgp.peer.notification peer=%s %s", peer.address, peer.last_error)

    def _peer_lost(self, peer: _Peer) -> None:
        """Keep the peer's routes as stale until it comes back and sends EOR,
        or the stale time passes (graceful restart); without GR drop them now."""
        cfg = self._settings.peer(peer.address)
        if cfg is not None and cfg.graceful_restart is None:
            self._deliver(peer.address, peer.rib.clear())
            peer.stale_deadline = None
            return
        if peer.stale_deadline is None:
            peer.rib.mark_stale()
            peer.stale_deadline = self._clock() + peer.stale_time
            self._cv.notify_all()

    def _sweep(self, peer: _Peer, why: str) -> None:
        n = peer.rib.stale_count
        delta = peer.rib.sweep_stale()
        peer.stale_deadline = None
        if n:
            log.info("bgp.routes.stale_swept peer=%s reason=%s count=%d", peer.address, why, n)
        self._deliver(peer.address, delta)
        if why in ("eor", "refresh-end") and self._on_synced is not None:
            self._synced.append((peer.address, why))
            self._cv.notify_all()

    # --- threads ---------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._cv:
                if self._stop:
                    sock.close()
                    return
                old = self._conn
                self._generation += 1
                conn = _Conn(sock, self._generation)
                self._conn = conn
                self._cv.notify_all()
            if old is not None:
                self._close(old)
            log.info("bgp.bridge.connected generation=%d", conn.generation)
            t = threading.Thread(target=self._read_loop, args=(conn,), name="bgp-read", daemon=True)
            t.start()

    def _read_loop(self, conn: _Conn) -> None:
        f = conn.sock.makefile("r", encoding="utf-8", errors="replace")
        try:
            for line in f:
                self._handle(conn, line)
        except OSError as e:
            log.info("bgp.bridge.read_error error=%s", e)
        finally:
            f.close()
            self._close(conn)
            with self._cv:
                if self._conn is conn:
                    self._conn = None
                    # the sidecar may be restarting: routes are kept as stale
                    for peer in self._peers.values():
                        peer.state = PeerState.IDLE
                        peer.up_since = None
                        self._peer_lost(peer)
                self._cv.notify_all()
            log.info("bgp.bridge.disconnected generation=%d", conn.generation)

    def _close(self, conn: _Conn) -> None:
        with self._cv:
            conn.closed = True
            self._cv.notify_all()
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_RDWR)
        conn.sock.close()

    def _next_deadline(self) -> float | None:
        ds = [p.stale_deadline for p in self._peers.values() if p.stale_deadline is not None]
        return min(ds) if ds else None

    def _send_loop(self) -> None:
        while True:
            with self._cv:
                while True:
                    if self._stop:
                        return
                    now = self._clock()
                    for peer in self._peers.values():
                        if peer.stale_deadline is not None and peer.stale_deadline <= now:
                            self._sweep(peer, "stale-timer")
                    conn = self._conn
                    if (
                        conn is not None
                        and not conn.closed
                        and (conn.needs_resync or self._dirty or self._peers_up)
                    ):
                        break
                    deadline = self._next_deadline()
                    # bounded, because the clock is injectable and need not be real time
                    self._cv.wait(
                        timeout=None if deadline is None else min(1.0, max(0.0, deadline - now))
                    )
                resync = conn.needs_resync
                conn.needs_resync = False
                self._dirty = False
                peers_up = [] if resync else list(dict.fromkeys(self._peers_up))
                self._peers_up.clear()
                desired = self._desired
                previous = set(self._announced)
                self._announced |= desired
                self._sending = True
            try:
                if resync:
                    lines = commands.resync_commands(desired, previous, batch=self._batch)
                    lines.append(commands.route_refresh_line())
                    self._send(conn, lines)
                    log.info(
                        "bgp.resync.done generation=%d announced=%d",
                        conn.generation,
                        len(desired),
                    )
                else:
                    self._send(conn, commands.diff_commands(desired, previous, batch=self._batch))
                for address in peers_up:
                    self._send(
                        conn,
                        commands.resync_commands(
                            desired, frozenset(), batch=self._batch, neighbor=address
                        ),
                    )
                with self._cv:
                    self._announced = set(desired)
                    self.generations_synced += 1
            except ConnectionLost:
                log.info("bgp.send.interrupted generation=%d", conn.generation)
            finally:
                with self._cv:
                    self._sending = False
                    self._cv.notify_all()

    def _send(self, conn: _Conn, lines: list[str]) -> None:
        """Write lines with at most `window` unacked; return when all are acked."""
        for line in lines:
            with self._cv:
                if not self._cv.wait_for(
                    lambda: conn.closed or len(conn.pending) < self._window,
                    timeout=self._ack_timeout,
                ):
                    self._ack_timed_out(conn)
                if conn.closed:
                    raise ConnectionLost
                conn.pending.append(line)
            try:
                conn.sock.sendall(line.encode() + b"\n")
            except OSError:
                self._close(conn)
                raise ConnectionLost from None
        with self._cv:
            if not self._cv.wait_for(
                lambda: conn.closed or not conn.pending, timeout=self._ack_timeout
            ):
                self._ack_timed_out(conn)
            if conn.closed:
                raise ConnectionLost

    def _ack_timed_out(self, conn: _Conn) -> None:
        log.error(
            "bgp.ack.timeout generation=%d pending=%d timeout=%s",
            conn.generation,
            len(conn.pending),
            self._ack_timeout,
        )
        conn.closed = True
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_RDWR)
        raise ConnectionLost

    def _deliver_loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(
                    lambda: self._stop or bool(self._deliveries) or bool(self._synced)
                )
                if self._stop and not self._deliveries:
                    return
                batch = list(self._deliveries)
                self._deliveries.clear()
                synced = list(self._synced)
                self._synced.clear()
            merged: dict[str, RibDelta] = {}
            for peer, delta in batch:
                merged[peer] = merge_deltas(merged[peer], delta) if peer in merged else delta
            for peer, delta in merged.items():
                try:
                    self._on_routes(peer, dict(delta.announced), set(delta.withdrawn))
                except Exception:
                    log.exception("bgp.on_routes.failed peer=%s", peer)
            if self._on_synced is not None:
                for peer, why in synced:
                    try:
                        self._on_synced(peer, why)
                    except Exception:
                        log.exception("bgp.on_synced.failed peer=%s", peer)
