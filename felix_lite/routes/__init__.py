"""Kernel route installers: BGP-learned routes (proto 202) and local pod routes (proto 201).

Each manager owns exactly the routes carrying its protocol number in one table, so after a
restart it finds them again with a dump and sweeps the stale ones. Routes of any other
protocol are never written over or deleted: a desired prefix already held by one is
skipped and logged as `routes.conflict` (LAB-NOTES: overwriting a local pod route
black-holed the pod). Writes go through hand-packed rtnetlink batches (netlink.py), so 10k
routes install or withdraw in a few tens of milliseconds. Wired by the node agent: the BGP
bridge feeds LearnedRoutes, the pod watcher/CNI side feeds LocalPodRoutes. See docs/routes.md.
"""

from __future__ import annotations

import errno as errno_mod
import logging
from collections.abc import Iterable, Mapping

from felix_lite.routes.netlink import NetlinkRoutes, OpResult, RouteNetlink, open_netlink_socket
from felix_lite.routes.table import (
    PROTO_BGP,
    PROTO_LOCAL_POD,
    RT_TABLE_MAIN,
    ApplyResult,
    Conflict,
    KernelRoute,
    RouteAction,
    RouteDiff,
    RouteError,
    RouteInputError,
    RouteKind,
    RouteOp,
    RouteSpec,
    diff_routes,
    normalize_address,
    normalize_prefix,
    split_by_owner,
)

__all__ = [
    "PROTO_BGP",
    "PROTO_LOCAL_POD",
    "RT_TABLE_MAIN",
    "ApplyResult",
    "Conflict",
    "KernelRoute",
    "LearnedRoutes",
    "LocalPodRoutes",
    "NetlinkRoutes",
    "OpResult",
    "RouteAction",
    "RouteDiff",
    "RouteError",
    "RouteInputError",
    "RouteKind",
    "RouteNetlink",
    "RouteOp",
    "RouteSpec",
    "diff_routes",
    "open_netlink_socket",
]

log = logging.getLogger(__name__)

_GONE = frozenset({errno_mod.ESRCH, errno_mod.ENOENT})
_MAX_ERROR_LOGS = 20


class _ProtoRouteTable:
    """Routes of one protocol in one table: desired state, a cache of what is programmed,
    and the foreign prefixes seen at the last dump.

    The cache lets set_desired/update write only the difference without dumping the table;
    reconcile() re-reads the kernel (on start, and on a timer to catch drift).
    """

    def __init__(self, netlink: RouteNetlink, *, proto: int, table: int, metric: int) -> None:
        self._nl = netlink
        self.proto = proto
        self.table = table
        self.metric = metric
        self._ours: dict[str, KernelRoute] | None = None
        self._foreign: dict[str, int] = {}
        self._logged_conflicts: set[Conflict] = set()

    def installed(self) -> dict[str, KernelRoute]:
        """Our routes as last known to be in the kernel (prefix -> route)."""
        return dict(self._ours or {})

    def _dump(self) -> None:
        routes = self._nl.dump_routes(table=self.table)
        self._ours, self._foreign = split_by_owner(routes, proto=self.proto)

    def _sync(
        self,
        desired: Mapping[str, RouteSpec],
        *,
        touched: Iterable[str] | None,
        errors: list[RouteError],
        full_dump: bool = False,
    ) -> ApplyResult:
        if full_dump or self._ours is None:
            # Learn ours/foreign, but an incremental update stays incremental: after a
            # restart, routes not yet re-announced must survive until reconcile().
            self._dump()
        assert self._ours is not None
        ours = self._ours
        if touched is None:
            want: Mapping[str, RouteSpec] = desired
            have: Mapping[str, KernelRoute] = ours
            foreign: Mapping[str, int] = self._foreign
        else:
            keys = set(touched)
            want = {p: desired[p] for p in keys if p in desired}
            have = {p: ours[p] for p in keys if p in ours}
            foreign = {p: self._foreign[p] for p in keys if p in self._foreign}
        diff = diff_routes(want, have, foreign)
        conflicts = list(diff.conflicts)
        added: list[str] = []
        replaced: list[str] = []
        removed: list[str] = []
        taken: list[RouteSpec] = []
        ops = diff.ops()
        for op, res in zip(ops, self._write(ops), strict=True):
            self._record(op, res, ours, added, replaced, removed, taken, errors)
        if taken:
            # Exclusive create said the prefix exists: find who holds it. Ours (the cache was
            # stale) is replaced; anyone else's is a conflict and stays untouched.
            self._dump()
            ours = self._ours
            retry: list[RouteSpec] = []
            for spec in taken:
                owner = self._foreign.get(spec.dst)
                if owner is not None:
                    conflicts.append(Conflict(spec.dst, owner))
                elif spec.dst in ours:
                    retry.append(spec)
                else:
                    errors.append(
                        RouteError(
                            spec.dst,
                            RouteAction.ADD,
                            errno_mod.EEXIST,
                            "route exists but was not found in the table dump",
                        )
                    )
            rops = [RouteOp(RouteAction.REPLACE, s) for s in retry]
            for op, res in zip(rops, self._write(rops), strict=True):
                self._record(op, res, ours, added, replaced, removed, [], errors)
        self._log_outcome(conflicts, errors, added, replaced, removed)
        return ApplyResult(
            added=tuple(added),
            replaced=tuple(replaced),
            removed=tuple(removed),
            conflicts=tuple(sorted(set(conflicts), key=lambda c: c.prefix)),
            errors=tuple(errors),
        )

    def _write(self, ops: list[RouteOp]) -> list[OpResult]:
        if not ops:
            return []
        return self._nl.apply(ops, proto=self.proto, table=self.table, metric=self.metric)

    def _record(
        self,
        op: RouteOp,
        res: OpResult,
        ours: dict[str, KernelRoute],
        added: list[str],
        replaced: list[str],
        removed: list[str],
        taken: list[RouteSpec],
        errors: list[RouteError],
    ) -> None:
        dst = op.route.dst
        if op.action is RouteAction.DELETE:
            if res.ok or res.errno in _GONE:
                ours.pop(dst, None)
                if res.ok:
                    removed.append(dst)
                return
        elif res.ok:
            r = op.route
            ours[dst] = KernelRoute(
                dst=dst,
                proto=self.proto,
                table=self.table,
                kind=r.kind,
                gateway=r.gateway,
                oif=r.oif,
                metric=self.metric,
                onlink=r.onlink and r.gateway is not None,
            )
            (added if op.action is RouteAction.ADD else replaced).append(dst)
            return
        elif op.action is RouteAction.ADD and res.errno == errno_mod.EEXIST:
            taken.append(op.route)
            return
        errors.append(RouteError(dst, op.action, res.errno, _describe(op, res)))

    def _log_outcome(
        self,
        conflicts: list[Conflict],
        errors: list[RouteError],
        added: list[str],
        replaced: list[str],
        removed: list[str],
    ) -> None:
        for c in conflicts:
            if c not in self._logged_conflicts:
                self._logged_conflicts.add(c)
                log.warning(
                    "routes.conflict prefix=%s proto=%s ours=%s", c.prefix, c.proto, self.proto
                )
        for e in errors[:_MAX_ERROR_LOGS]:
            log.warning(
                "routes.error prefix=%s action=%s errno=%s msg=%s",
                e.prefix,
                e.action.value,
                e.errno,
                e.message,
            )
        if len(errors) > _MAX_ERROR_LOGS:
            log.warning(
                "routes.error.more proto=%s count=%s", self.proto, len(errors) - _MAX_ERROR_LOGS
            )
        if added or replaced or removed or errors:
            log.info(
                "routes.apply proto=%s table=%s added=%s replaced=%s removed=%s "
                "conflicts=%s errors=%s",
                self.proto,
                self.table,
                len(added),
                len(replaced),
                len(removed),
                len(conflicts),
                len(errors),
            )


def _describe(op: RouteOp, res: OpResult) -> str:
    r = op.route
    what = f"route {r.dst}"
    if r.gateway is not None:
        what += f" via {r.gateway}"
    if r.oif is not None:
        what += f" oif {r.oif}"
    return f"{op.action.value} {what}: {res.message} (errno {res.errno})"


class LearnedRoutes:
    """BGP-learned routes (prefix -> next hop) in the kernel with protocol `protocol`.

    The next hop must be reachable through a connected route (the kernel resolves the
    device, normally the uplink); with `onlink_dev` every route is installed
    `via NH dev <onlink_dev> onlink` instead.
    """

    def __init__(
        self,
        netlink: RouteNetlink | None = None,
        *,
        protocol: int = PROTO_BGP,
        table: int = RT_TABLE_MAIN,
        metric: int = 0,
        onlink_dev: str | None = None,
    ) -> None:
        self._table = _ProtoRouteTable(
            netlink if netlink is not None else NetlinkRoutes(),
            proto=protocol,
            table=table,
            metric=metric,
        )
        self._nl = self._table._nl
        self._onlink_dev = onlink_dev
        self._desired: dict[str, RouteSpec] = {}

    @property
    def protocol(self) -> int:
        return self._table.proto

    def desired(self) -> dict[str, str]:
        return {p: s.gateway or "" for p, s in self._desired.items()}

    def installed(self) -> dict[str, KernelRoute]:
        return self._table.installed()

    def set_desired(self, routes: Mapping[str, str]) -> ApplyResult:
        """Make our routes exactly `routes`: add missing, replace changed next hops, remove
        the rest (only ours)."""
        errors: list[RouteError] = []
        specs = self._specs(routes.items(), errors)
        self._desired = specs
        return self._table._sync(self._desired, touched=None, errors=errors)

    def update(self, announced: Mapping[str, str], withdrawn: Iterable[str] = ()) -> ApplyResult:
        """Apply one batch of BGP updates; only the prefixes named are looked at."""
        errors: list[RouteError] = []
        touched: set[str] = set()
        for raw in withdrawn:
            try:
                prefix = normalize_prefix(raw, what="withdrawn route")
            except RouteInputError as exc:
                errors.append(RouteError(str(raw), RouteAction.DELETE, errno_mod.EINVAL, str(exc)))
                continue
            self._desired.pop(prefix, None)
            touched.add(prefix)
        specs = self._specs(announced.items(), errors)
        self._desired.update(specs)
        touched.update(specs)
        return self._table._sync(self._desired, touched=touched, errors=errors)

    def reconcile(self) -> ApplyResult:
        """Re-read the table and converge: stale routes of ours go, missing ones come,
        foreign ones stay. Call on start (before the first update) and periodically."""
        return self._table._sync(self._desired, touched=None, errors=[], full_dump=True)

    def _specs(
        self, items: Iterable[tuple[str, str]], errors: list[RouteError]
    ) -> dict[str, RouteSpec]:
        oif: int | None = None
        if self._onlink_dev is not None:
            oif = self._nl.link_indexes().get(self._onlink_dev)
        out: dict[str, RouteSpec] = {}
        for raw_prefix, raw_nh in items:
            try:
                prefix = normalize_prefix(raw_prefix, what="learned route")
                nh = normalize_address(raw_nh, what=f"learned route {prefix}", fieldname="nexthop")
            except RouteInputError as exc:
                errors.append(
                    RouteError(str(raw_prefix), RouteAction.ADD, errno_mod.EINVAL, str(exc))
                )
                continue
            if self._onlink_dev is not None and oif is None:
                errors.append(
                    RouteError(
                        prefix,
                        RouteAction.ADD,
                        errno_mod.ENODEV,
                        f"learned route {prefix}: onlink device {self._onlink_dev!r} not found",
                    )
                )
                continue
            out[prefix] = RouteSpec(
                dst=prefix, gateway=nh, oif=oif, onlink=self._onlink_dev is not None
            )
        return out


class LocalPodRoutes:
    """Scope-link /32 routes to local pods' host-side veths, plus the blackhole for the
    node's own pod block, all with protocol `protocol` (201)."""

    def __init__(
        self,
        netlink: RouteNetlink | None = None,
        *,
        node_block: str | None = None,
        protocol: int = PROTO_LOCAL_POD,
        table: int = RT_TABLE_MAIN,
    ) -> None:
        self._table = _ProtoRouteTable(
            netlink if netlink is not None else NetlinkRoutes(),
            proto=protocol,
            table=table,
            metric=0,
        )
        self._nl = self._table._nl
        self._block = normalize_prefix(node_block, what="node block") if node_block else None
        self._pods: dict[str, str] = {}

    @property
    def protocol(self) -> int:
        return self._table.proto

    def installed(self) -> dict[str, KernelRoute]:
        return self._table.installed()

    def set_node_block(self, node_block: str | None) -> ApplyResult:
        """Change the blackhole prefix (None removes it)."""
        self._block = normalize_prefix(node_block, what="node block") if node_block else None
        return self.set_desired(self._pods)

    def set_desired(self, pods: Mapping[str, str]) -> ApplyResult:
        """Make our routes exactly: one `pod_ip/32 dev host_ifname scope link` per pod and
        the node block blackhole."""
        errors: list[RouteError] = []
        desired = self._resolve(pods, errors)
        return self._table._sync(desired, touched=None, errors=errors)

    def reconcile(self) -> ApplyResult:
        """Re-read the table and converge (on start and periodically)."""
        errors: list[RouteError] = []
        desired = self._resolve(self._pods, errors)
        return self._table._sync(desired, touched=None, errors=errors, full_dump=True)

    def _resolve(self, pods: Mapping[str, str], errors: list[RouteError]) -> dict[str, RouteSpec]:
        self._pods = dict(pods)
        links = self._nl.link_indexes() if pods else {}
        desired: dict[str, RouteSpec] = {}
        if self._block is not None:
            desired[self._block] = RouteSpec(dst=self._block, kind=RouteKind.BLACKHOLE)
        for raw_ip, ifname in pods.items():
            try:
                ip = normalize_address(
                    raw_ip.split("/")[0], what=f"pod route {raw_ip}", fieldname="pod_ip"
                )
            except RouteInputError as exc:
                errors.append(RouteError(str(raw_ip), RouteAction.ADD, errno_mod.EINVAL, str(exc)))
                continue
            prefix = f"{ip}/32"
            index = links.get(ifname)
            if index is None:
                errors.append(
                    RouteError(
                        prefix,
                        RouteAction.ADD,
                        errno_mod.ENODEV,
                        f"pod route {prefix}: interface {ifname!r} not found",
                    )
                )
                continue
            desired[prefix] = RouteSpec(dst=prefix, oif=index)
        return desired
