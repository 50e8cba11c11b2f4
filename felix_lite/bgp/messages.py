"""Pure parsing of ExaBGP 5 JSON API messages and the import filter.

ExaBGP never programs the kernel and does no AS-path loop detection (LAB-NOTES:
FRR sent a node its own prefixes back), so every learned route passes through
`AdjRibIn` before the route installer sees it: only prefixes inside the
configured pod CIDRs, never this node's own pods, no AS path containing our own
ASN, and at most `max_prefix` routes per peer.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

log = logging.getLogger(__name__)


class MessageError(ValueError):
    """A line from ExaBGP that is not a message we understand."""


class PeerState(StrEnum):
    IDLE = "idle"
    CONNECTED = "connected"
    UP = "up"
    DOWN = "down"


class RefreshPhase(StrEnum):
    BEGIN = "begin"
    END = "end"
    REQUEST = "request"


class RejectReason(StrEnum):
    OUTSIDE_POD_CIDRS = "outside-pod-cidrs"
    OWN_POD = "own-pod"
    AS_LOOP = "as-path-contains-local-asn"
    MAX_PREFIX = "max-prefix"
    NODE_BLOCK = "inside-own-node-block"
    BAD_NEXTHOP = "bad-next-hop"


@dataclass(frozen=True, slots=True)
class Ack:
    ok: bool


@dataclass(frozen=True, slots=True)
class StateEvent:
    peer: str
    peer_asn: int
    state: PeerState
    reason: str = ""


@dataclass(frozen=True, slots=True)
class UpdateEvent:
    peer: str
    peer_asn: int
    announced: Mapping[str, str]
    """prefix -> next hop"""
    withdrawn: frozenset[str]
    as_path: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class EorEvent:
    peer: str
    afi: str
    safi: str


@dataclass(frozen=True, slots=True)
class RefreshEvent:
    peer: str
    phase: RefreshPhase


@dataclass(frozen=True, slots=True)
class NotificationEvent:
    peer: str
    direction: str
    code: int
    subcode: int
    message: str = ""


Event = Ack | StateEvent | UpdateEvent | EorEvent | RefreshEvent | NotificationEvent


def parse_line(line: str) -> Event | None:
    """One line from the API stream -> event; None for messages we ignore
    (keepalives, sent-direction updates, other families)."""
    text = line.strip()
    if text == "done":
        return Ack(ok=True)
    if text == "error":
        return Ack(ok=False)
    if not text.startswith("{"):
        raise MessageError(f"exabgp line: not JSON nor an ack: {text[:80]!r}")
    try:
        msg = json.loads(text)
    except json.JSONDecodeError as e:
        raise MessageError(f"exabgp line: invalid JSON: {e}") from None
    if not isinstance(msg, dict):
        raise MessageError("exabgp message: top level is not an object")
    return parse_message(msg)


def _neighbor(msg: Mapping[str, Any]) -> tuple[Mapping[str, Any], str, int]:
    n = msg.get("neighbor")
    if not isinstance(n, dict):
        raise MessageError(f"exabgp {msg.get('type')} message: neighbor: missing")
    try:
        peer = str(n["address"]["peer"])
        asn = int(n.get("asn", {}).get("peer", 0))
    except (KeyError, TypeError, ValueError):
        raise MessageError(
            f"exabgp {msg.get('type')} message: neighbor.address.peer: missing"
        ) from None
    return n, peer, asn


def parse_message(msg: Mapping[str, Any]) -> Event | None:
    kind = msg.get("type")
    if kind not in {"state", "update", "notification", "refresh"}:
        return None
    n, peer, asn = _neighbor(msg)
    if kind == "state":
        raw = str(n.get("state", ""))
        try:
            state = PeerState(raw)
        except ValueError:
            log.debug("bgp.message.unknown_state peer=%s state=%s", peer, raw)
            return None
        return StateEvent(peer=peer, peer_asn=asn, state=state, reason=str(n.get("reason", "")))
    if kind == "notification":
        note = n.get("notification") or msg.get("notification") or {}
        return NotificationEvent(
            peer=peer,
            direction=str(n.get("direction", "")),
            code=int(note.get("code", 0)),
            subcode=int(note.get("subcode", 0)),
            message=str(note.get("message", "")),
        )
    if kind == "refresh":
        rr = n.get("route-refresh") or {}
        if rr.get("afi") != "ipv4" or rr.get("safi") != "unicast":
            return None
        try:
            return RefreshEvent(peer=peer, phase=RefreshPhase(str(rr.get("subtype", ""))))
        except ValueError:
            return None
    # update
    if n.get("direction", "receive") != "receive":
        return None
    message = n.get("message") or {}
    if "eor" in message:
        eor = message["eor"] or {}
        return EorEvent(peer=peer, afi=str(eor.get("afi", "")), safi=str(eor.get("safi", "")))
    update = message.get("update")
    if not isinstance(update, dict):
        return None
    announced: dict[str, str] = {}
    for nexthop, nlris in (update.get("announce", {}).get("ipv4 unicast") or {}).items():
        for item in nlris:
            announced[_nlri(item, peer)] = str(nexthop)
    withdrawn = frozenset(
        _nlri(item, peer) for item in (update.get("withdraw", {}).get("ipv4 unicast") or [])
    )
    if not announced and not withdrawn:
        return None
    as_path = _as_path((update.get("attribute") or {}).get("as-path"), peer)
    return UpdateEvent(
        peer=peer, peer_asn=asn, announced=announced, withdrawn=withdrawn, as_path=as_path
    )


def _nlri(item: Any, peer: str) -> str:
    raw = item.get("nlri") if isinstance(item, dict) else item
    try:
        return str(ipaddress.IPv4Network(str(raw), strict=False))
    except ValueError:
        raise MessageError(f"exabgp update from {peer}: nlri: {raw!r} is not IPv4") from None


def _as_path(raw: Any, peer: str) -> tuple[int, ...]:
    """ExaBGP 5 gives {"0": {"element": "as-sequence", "value": [...]}, ...};
    older encoders give a flat list. Sets and confed segments are flattened:
    loop detection only asks whether an ASN occurs."""
    if raw is None:
        return ()
    try:
        if isinstance(raw, list):
            return tuple(int(a) for a in raw)
        out: list[int] = []
        for key in sorted(raw, key=int):
            seg = raw[key]
            out.extend(int(a) for a in seg.get("value", []))
        return tuple(out)
    except (TypeError, ValueError, AttributeError):
        raise MessageError(f"exabgp update from {peer}: as-path: cannot parse {raw!r}") from None


@dataclass(frozen=True, slots=True)
class RibDelta:
    """Change of accepted routes for one peer, in the route installer's terms."""

    announced: Mapping[str, str] = field(default_factory=dict)
    withdrawn: frozenset[str] = frozenset()
    rejected: Mapping[str, RejectReason] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.announced or self.withdrawn)


def merge_deltas(first: RibDelta, second: RibDelta) -> RibDelta:
    """`first` then `second`, as one delta (lets a slow consumer catch up in one call)."""
    announced = {p: nh for p, nh in first.announced.items() if p not in second.withdrawn}
    announced.update(second.announced)
    withdrawn = (first.withdrawn - second.announced.keys()) | second.withdrawn
    return RibDelta(announced=announced, withdrawn=frozenset(withdrawn))


class AdjRibIn:
    """Routes received from one peer that pass the static filters, and the subset
    accepted right now (own pods can change, so they are excluded on output).

    Not thread-safe; the speaker serialises access.
    """

    def __init__(
        self,
        peer: str,
        *,
        local_asn: int,
        pod_cidrs: Iterable[str],
        max_prefix: int,
        own_prefixes: AbstractSet[str] = frozenset(),
        node_block: str | None = None,
    ) -> None:
        self.peer = peer
        self.local_asn = local_asn
        self.pod_cidrs = tuple(ipaddress.IPv4Network(c) for c in pod_cidrs)
        self.max_prefix = max_prefix
        self.node_block = ipaddress.IPv4Network(node_block) if node_block else None
        self._own: frozenset[str] = frozenset(own_prefixes)
        self._routes: dict[str, str] = {}
        self._stale: set[str] = set()
        self.received = 0
        self.rejected: dict[RejectReason, int] = {r: 0 for r in RejectReason}
        self.limit_hit = False

    # --- views -----------------------------------------------------------
    def accepted(self) -> dict[str, str]:
        return {p: nh for p, nh in self._routes.items() if p not in self._own}

    @property
    def accepted_count(self) -> int:
        return sum(1 for p in self._routes if p not in self._own)

    # --- filter ----------------------------------------------------------
    def _static_reason(self, prefix: str, nexthop: str) -> RejectReason | None:
        net = ipaddress.IPv4Network(prefix)
        if not any(net.subnet_of(c) for c in self.pod_cidrs):
            return RejectReason.OUTSIDE_POD_CIDRS
        if self.node_block is not None and net.subnet_of(self.node_block):
            return RejectReason.NODE_BLOCK
        try:
            ipaddress.IPv4Address(nexthop)
        except ValueError:
            return RejectReason.BAD_NEXTHOP
        return None

    def apply(self, update: UpdateEvent) -> RibDelta:
        """Apply one UPDATE; returns the change in accepted routes."""
        withdrawn: set[str] = set()
        for p in update.withdrawn:
            if p in self._routes:
                del self._routes[p]
                self._stale.discard(p)
                if p not in self._own:
                    withdrawn.add(p)
        rejected: dict[str, RejectReason] = {}
        announced: dict[str, str] = {}
        loop = self.local_asn in update.as_path
        for p, nh in update.announced.items():
            self.received += 1
            reason = RejectReason.AS_LOOP if loop else self._static_reason(p, nh)
            if reason is None and p not in self._routes and len(self._routes) >= self.max_prefix:
                reason = RejectReason.MAX_PREFIX
            if reason is not None:
                rejected[p] = reason
                self.rejected[reason] += 1
                # an implicit withdraw: a rejected re-announcement replaces the old route
                if p in self._routes:
                    del self._routes[p]
                    self._stale.discard(p)
                    if p not in self._own:
                        withdrawn.add(p)
                continue
            self._stale.discard(p)
            if self._routes.get(p) == nh:
                continue
            self._routes[p] = nh
            if p in self._own:
                rejected[p] = RejectReason.OWN_POD
                self.rejected[RejectReason.OWN_POD] += 1
            else:
                announced[p] = nh
                withdrawn.discard(p)
        if rejected:
            self._log_rejects(rejected)
        elif self.limit_hit and len(self._routes) < self.max_prefix:
            self.limit_hit = False
        return RibDelta(announced=announced, withdrawn=frozenset(withdrawn), rejected=rejected)

    def _log_rejects(self, rejected: Mapping[str, RejectReason]) -> None:
        counts: dict[RejectReason, int] = {}
        for r in rejected.values():
            counts[r] = counts.get(r, 0) + 1
        if RejectReason.MAX_PREFIX in counts and not self.limit_hit:
            self.limit_hit = True
            log.warning(
                "bgp.import.max_prefix_reached peer=%s max_prefix=%d dropped=%d "
                "(further routes from this peer are dropped until it withdraws some)",
                self.peer,
                self.max_prefix,
                counts[RejectReason.MAX_PREFIX],
            )
        for reason, n in counts.items():
            if reason is RejectReason.MAX_PREFIX:
                continue
            example = next(p for p, r in rejected.items() if r is reason)
            log.info(
                "bgp.import.rejected peer=%s reason=%s count=%d example=%s",
                self.peer,
                reason.value,
                n,
                example,
            )
        if self.limit_hit and len(self._routes) < self.max_prefix:
            self.limit_hit = False

    def set_own_prefixes(self, own: AbstractSet[str]) -> RibDelta:
        """This node's pods changed: routes for them are hidden or revealed."""
        old, new = self._own, frozenset(own)
        self._own = new
        hidden = frozenset(p for p in new - old if p in self._routes)
        revealed = {p: self._routes[p] for p in old - new if p in self._routes}
        return RibDelta(announced=revealed, withdrawn=hidden)

    # --- graceful restart / enhanced route refresh -----------------------
    def mark_stale(self) -> None:
        """Keep routes but expect them to be re-announced (GR, route refresh)."""
        self._stale = set(self._routes)

    @property
    def stale_count(self) -> int:
        return len(self._stale)

    def sweep_stale(self) -> RibDelta:
        """End-of-RIB or refresh end (or GR timer): drop what was not re-announced."""
        gone = self._stale
        self._stale = set()
        for p in gone:
            self._routes.pop(p, None)
        if len(self._routes) < self.max_prefix:
            self.limit_hit = False
        return RibDelta(withdrawn=frozenset(p for p in gone if p not in self._own))

    def clear(self) -> RibDelta:
        """Peer gone without graceful restart: withdraw everything."""
        gone = frozenset(p for p in self._routes if p not in self._own)
        self._routes.clear()
        self._stale.clear()
        self.limit_hit = False
        return RibDelta(withdrawn=gone)
