"""LearnedRoutes / LocalPodRoutes against a fake kernel that enforces the rtnetlink rules
we rely on: exclusive create fails on any route with the same prefix and metric whatever
its protocol, replace takes over such a route, delete only matches our protocol, a gateway
must sit in a connected subnet unless onlink."""

from __future__ import annotations

import errno
import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import replace

import pytest

from felix_lite.routes import LearnedRoutes, LocalPodRoutes
from felix_lite.routes.netlink import OpResult
from felix_lite.routes.table import KernelRoute, RouteAction, RouteKind, RouteOp


class FakeKernel:
    def __init__(
        self, *, links: dict[str, int] | None = None, connected: dict[str, int] | None = None
    ) -> None:
        self.links = links if links is not None else {"lo": 1, "uplink": 2}
        self.connected = connected if connected is not None else {"192.0.2.0/24": 2}
        self.routes: list[KernelRoute] = []
        self.writes = 0
        self.dumps = 0

    # RouteNetlink
    def dump_routes(self, *, table: int, proto: int | None = None) -> list[KernelRoute]:
        self.dumps += 1
        return [r for r in self.routes if r.table == table and (proto is None or r.proto == proto)]

    def link_indexes(self) -> dict[str, int]:
        return dict(self.links)

    def apply(
        self, ops: Sequence[RouteOp], *, proto: int, table: int, metric: int = 0
    ) -> list[OpResult]:
        self.writes += len(ops)
        return [self._one(op, proto, table, metric) for op in ops]

    def close(self) -> None:
        pass

    def _one(self, op: RouteOp, proto: int, table: int, metric: int) -> OpResult:
        r = op.route
        same = [
            i
            for i, k in enumerate(self.routes)
            if k.dst == r.dst and k.table == table and k.metric == metric
        ]
        if op.action is RouteAction.DELETE:
            for i in same:
                if self.routes[i].proto == proto:
                    del self.routes[i]
                    return OpResult()
            return OpResult(errno.ESRCH, "No such process")
        if op.action is RouteAction.ADD and same:
            return OpResult(errno.EEXIST, "File exists")
        oif = r.oif
        if oif is not None and oif not in self.links.values():
            return OpResult(errno.ENODEV, "No such device")
        if r.kind is RouteKind.UNICAST and r.gateway is not None and not r.onlink:
            gw = ipaddress.IPv4Address(r.gateway)
            hits = [i for n, i in self.connected.items() if gw in ipaddress.IPv4Network(n)]
            if not hits:
                return OpResult(errno.ENETUNREACH, "Nexthop has invalid gateway")
            oif = oif or hits[0]
        new = KernelRoute(
            dst=r.dst,
            proto=proto,
            table=table,
            kind=r.kind,
            gateway=r.gateway,
            oif=oif,
            metric=metric,
            onlink=r.onlink,
        )
        if same:
            self.routes[same[0]] = new
        else:
            self.routes.append(new)
        return OpResult()

    def by_dst(self) -> dict[str, list[KernelRoute]]:
        out: dict[str, list[KernelRoute]] = {}
        for r in self.routes:
            out.setdefault(r.dst, []).append(r)
        return out

    def add_foreign(self, dst: str, proto: int, **kw: object) -> KernelRoute:
        r = KernelRoute(dst=dst, proto=proto, **kw)  # type: ignore[arg-type]
        self.routes.append(r)
        return r


def test_set_desired_install_replace_withdraw() -> None:
    k = FakeKernel()
    lr = LearnedRoutes(k)
    res = lr.set_desired({"10.1.0.0/24": "192.0.2.10", "10.2.0.5/32": "192.0.2.11"})
    assert res.ok and sorted(res.added) == ["10.1.0.0/24", "10.2.0.5/32"]
    assert {r.dst: (r.gateway, r.proto) for r in k.routes} == {
        "10.1.0.0/24": ("192.0.2.10", 202),
        "10.2.0.5/32": ("192.0.2.11", 202),
    }
    res = lr.set_desired({"10.1.0.0/24": "192.0.2.12"})
    assert res.replaced == ("10.1.0.0/24",) and res.removed == ("10.2.0.5/32",)
    assert [(r.dst, r.gateway) for r in k.routes] == [("10.1.0.0/24", "192.0.2.12")]
    writes = k.writes
    assert lr.set_desired({"10.1.0.0/24": "192.0.2.12"}).changed == 0
    assert k.writes == writes  # nothing to do, nothing written


def test_update_touches_only_named_prefixes() -> None:
    k = FakeKernel()
    lr = LearnedRoutes(k)
    lr.set_desired({"10.0.0.1/32": "192.0.2.2", "10.0.0.2/32": "192.0.2.2"})
    res = lr.update({"10.0.0.3/32": "192.0.2.2", "10.0.0.1/32": "192.0.2.3"}, ["10.0.0.2/32"])
    assert res.added == ("10.0.0.3/32",)
    assert res.replaced == ("10.0.0.1/32",)
    assert res.removed == ("10.0.0.2/32",)
    assert {r.dst: r.gateway for r in k.routes} == {
        "10.0.0.1/32": "192.0.2.3",
        "10.0.0.3/32": "192.0.2.2",
    }
    assert lr.desired() == {"10.0.0.1/32": "192.0.2.3", "10.0.0.3/32": "192.0.2.2"}
    # withdrawing an unknown prefix is a no-op, not an error
    assert lr.update({}, ["10.9.9.9/32"]).ok


def test_reconcile_after_restart_sweeps_only_ours() -> None:
    k = FakeKernel()
    LearnedRoutes(k).set_desired({"10.0.0.1/32": "192.0.2.2", "10.0.0.2/32": "192.0.2.2"})
    pod = k.add_foreign("10.0.0.9/32", 201, oif=5)
    static = k.add_foreign("10.7.0.0/16", 4, gateway="192.0.2.1", oif=2)
    fresh = LearnedRoutes(k)
    # updates before reconcile (peers re-announcing after a restart) keep the rest in place
    assert fresh.update({"10.0.0.2/32": "192.0.2.3"}).replaced == ("10.0.0.2/32",)
    assert "10.0.0.1/32" in k.by_dst()
    res = fresh.reconcile()
    assert res.removed == ("10.0.0.1/32",)
    assert pod in k.routes and static in k.routes
    assert {r.dst: r.gateway for r in k.routes if r.proto == 202} == {"10.0.0.2/32": "192.0.2.3"}


def test_conflict_with_foreign_route_is_skipped_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    k = FakeKernel()
    pod = k.add_foreign("10.244.1.5/32", 201, oif=5)
    lr = LearnedRoutes(k)
    lr.reconcile()
    with caplog.at_level(logging.WARNING, logger="felix_lite.routes"):
        res = lr.set_desired({"10.244.1.5/32": "192.0.2.2", "10.244.2.5/32": "192.0.2.2"})
    assert res.added == ("10.244.2.5/32",)
    assert [(c.prefix, c.proto) for c in res.conflicts] == [("10.244.1.5/32", 201)]
    assert res.ok
    assert pod in k.routes and len(k.by_dst()["10.244.1.5/32"]) == 1
    assert "routes.conflict prefix=10.244.1.5/32 proto=201" in caplog.text


def test_conflict_discovered_at_write_time_via_eexist() -> None:
    k = FakeKernel()
    lr = LearnedRoutes(k)
    lr.reconcile()  # empty cache of foreign prefixes
    foreign = k.add_foreign("10.0.0.1/32", 4, gateway="192.0.2.1", oif=2)  # appears later
    res = lr.update({"10.0.0.1/32": "192.0.2.2"})
    assert res.conflicts[0].prefix == "10.0.0.1/32" and res.conflicts[0].proto == 4
    assert res.added == () and res.ok
    assert k.routes == [foreign]


def test_eexist_on_our_own_route_replaces_it() -> None:
    k = FakeKernel()
    lr = LearnedRoutes(k)
    lr.reconcile()
    k.add_foreign("10.0.0.1/32", 202, gateway="192.0.2.7", oif=2)  # ours, unknown to cache
    res = lr.update({"10.0.0.1/32": "192.0.2.2"})
    assert res.replaced == ("10.0.0.1/32",) and not res.conflicts
    assert [(r.gateway, r.proto) for r in k.routes] == [("192.0.2.2", 202)]


def test_foreign_route_with_other_metric_blocks_ours_and_wins_on_reconcile() -> None:
    k = FakeKernel()
    lr = LearnedRoutes(k)
    lr.set_desired({"10.0.0.1/32": "192.0.2.2"})
    other = k.add_foreign("10.0.0.1/32", 4, gateway="192.0.2.1", oif=2, metric=100)
    res = lr.reconcile()
    assert res.removed == ("10.0.0.1/32",) and res.conflicts[0].proto == 4
    assert k.routes == [other]


def test_unreachable_nexthop_is_a_per_route_error_rest_go_in() -> None:
    k = FakeKernel()
    lr = LearnedRoutes(k)
    res = lr.set_desired({"10.0.0.1/32": "198.51.100.1", "10.0.0.2/32": "192.0.2.2"})
    assert res.added == ("10.0.0.2/32",)
    (err,) = res.errors
    assert err.prefix == "10.0.0.1/32" and err.errno == errno.ENETUNREACH
    assert "10.0.0.1/32 via 198.51.100.1" in err.message and "invalid gateway" in err.message
    # fixed later (uplink gets the subnet): the still-desired route goes in on the next apply
    k.connected["198.51.100.0/24"] = 2
    assert lr.update({}).added == ()  # update touches nothing
    assert lr.set_desired(lr.desired()).added == ("10.0.0.1/32",)


def test_bad_input_names_route_and_field_and_rest_go_in() -> None:
    k = FakeKernel()
    res = LearnedRoutes(k).set_desired(
        {"10.0.0.1/24": "192.0.2.2", "10.0.0.2/32": "nope", "10.0.0.3/32": "192.0.2.2"}
    )
    assert res.added == ("10.0.0.3/32",)
    msgs = sorted(e.message for e in res.errors)
    assert msgs[0].startswith("learned route '10.0.0.1/24': prefix:")
    assert msgs[1] == "learned route 10.0.0.2/32: nexthop: 'nope' is not an IP address"


def test_onlink_dev() -> None:
    k = FakeKernel()
    lr = LearnedRoutes(k, onlink_dev="uplink")
    res = lr.set_desired({"10.0.0.1/32": "198.51.100.1"})  # not in a connected subnet
    assert res.ok and k.routes[0].onlink and k.routes[0].oif == 2
    missing = LearnedRoutes(FakeKernel(), onlink_dev="nope")
    (err,) = missing.set_desired({"10.0.0.1/32": "1.2.3.4"}).errors
    assert err.errno == errno.ENODEV and "'nope' not found" in err.message


def test_custom_protocol_table_metric() -> None:
    k = FakeKernel()
    lr = LearnedRoutes(k, protocol=210, table=100, metric=20)
    lr.set_desired({"10.0.0.1/32": "192.0.2.2"})
    assert [(r.proto, r.table, r.metric) for r in k.routes] == [(210, 100, 20)]
    assert lr.set_desired({}).removed == ("10.0.0.1/32",) and k.routes == []


def test_local_pod_routes_and_blackhole() -> None:
    k = FakeKernel(links={"lo": 1, "uplink": 2, "fl0123456789a": 7, "fl0123456789b": 8})
    bgp = k.add_foreign("10.244.1.9/32", 202, gateway="192.0.2.2", oif=2)
    lp = LocalPodRoutes(k, node_block="10.244.1.0/24")
    res = lp.set_desired(
        {
            "10.244.1.2": "fl0123456789a",
            "10.244.1.3": "fl0123456789b",
            "10.244.1.4": "flmissing",
            "10.244.1.9": "fl0123456789a",
        }
    )
    assert sorted(res.added) == ["10.244.1.0/24", "10.244.1.2/32", "10.244.1.3/32"]
    assert [(e.prefix, e.errno) for e in res.errors] == [("10.244.1.4/32", errno.ENODEV)]
    assert [c.prefix for c in res.conflicts] == ["10.244.1.9/32"]
    assert bgp in k.routes
    ours = {r.dst: r for r in k.routes if r.proto == 201}
    assert ours["10.244.1.0/24"].kind is RouteKind.BLACKHOLE
    assert ours["10.244.1.2/32"].oif == 7 and ours["10.244.1.2/32"].gateway is None
    # the veth was recreated with a new index: the route follows it
    k.links["fl0123456789a"] = 9
    res = lp.set_desired({"10.244.1.2": "fl0123456789a"})
    assert res.replaced == ("10.244.1.2/32",) and res.removed == ("10.244.1.3/32",)
    assert lp.set_node_block(None).removed == ("10.244.1.0/24",)
    assert {r.dst for r in k.routes if r.proto == 201} == {"10.244.1.2/32"}


def test_local_pod_reconcile_on_restart_keeps_learned_routes() -> None:
    k = FakeKernel(links={"lo": 1, "fl0000000000a": 3})
    LocalPodRoutes(k).set_desired({"10.244.1.2": "fl0000000000a", "10.244.1.3": "fl0000000000a"})
    learned = LearnedRoutes(k)
    learned.set_desired({"10.244.2.0/24": "192.0.2.2"})
    lp = LocalPodRoutes(k, node_block="10.244.1.0/24")
    lp.set_desired({"10.244.1.2": "fl0000000000a"})  # first apply dumps: sweeps 10.244.1.3
    assert sorted(r.dst for r in k.routes) == ["10.244.1.0/24", "10.244.1.2/32", "10.244.2.0/24"]
    assert lp.reconcile().changed == 0
    assert learned.reconcile().changed == 0


def test_first_apply_dumps_once_then_uses_cache() -> None:
    k = FakeKernel()
    lr = LearnedRoutes(k)
    for i in range(5):
        lr.update({f"10.0.0.{i}/32": "192.0.2.2"})
    assert k.dumps == 1
    assert len(lr.installed()) == 5
    k.routes = [replace(r, gateway="192.0.2.99") for r in k.routes]  # drift behind our back
    assert lr.reconcile().replaced == tuple(f"10.0.0.{i}/32" for i in range(5))
