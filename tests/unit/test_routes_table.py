"""Pure route diffing and input normalization."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from felix_lite.routes.table import (
    Conflict,
    KernelRoute,
    RouteAction,
    RouteInputError,
    RouteKind,
    RouteSpec,
    diff_routes,
    normalize_address,
    normalize_prefix,
    route_matches,
    split_by_owner,
)

OURS = 202


def kr(
    dst: str,
    gw: str | None = "192.0.2.2",
    *,
    proto: int = OURS,
    oif: int | None = 2,
    kind: RouteKind = RouteKind.UNICAST,
    onlink: bool = False,
) -> KernelRoute:
    return KernelRoute(dst=dst, proto=proto, gateway=gw, oif=oif, kind=kind, onlink=onlink)


def spec(dst: str, gw: str | None = "192.0.2.2", **kw: object) -> RouteSpec:
    return RouteSpec(dst=dst, gateway=gw, **kw)  # type: ignore[arg-type]


def test_diff_adds_replaces_deletes_and_keeps_equal() -> None:
    desired = {
        "10.0.0.1/32": spec("10.0.0.1/32"),
        "10.0.0.2/32": spec("10.0.0.2/32", "192.0.2.3"),
        "10.0.0.3/32": spec("10.0.0.3/32"),
    }
    ours = {
        "10.0.0.2/32": kr("10.0.0.2/32"),
        "10.0.0.3/32": kr("10.0.0.3/32"),
        "10.0.0.9/32": kr("10.0.0.9/32"),
    }
    d = diff_routes(desired, ours, {})
    assert [r.dst for r in d.adds] == ["10.0.0.1/32"]
    assert [r.dst for r in d.replaces] == ["10.0.0.2/32"]
    assert d.deletes == ("10.0.0.9/32",)
    assert d.conflicts == ()
    assert [op.action for op in d.ops()] == [
        RouteAction.DELETE,
        RouteAction.REPLACE,
        RouteAction.ADD,
    ]


def test_diff_foreign_prefix_is_conflict_never_written() -> None:
    desired = {"10.0.0.1/32": spec("10.0.0.1/32"), "10.0.0.2/32": spec("10.0.0.2/32")}
    d = diff_routes(desired, {}, {"10.0.0.1/32": 201})
    assert [r.dst for r in d.adds] == ["10.0.0.2/32"]
    assert d.conflicts == (Conflict("10.0.0.1/32", 201),)


def test_diff_foreign_and_ours_on_same_prefix_removes_ours() -> None:
    d = diff_routes(
        {"10.0.0.1/32": spec("10.0.0.1/32")}, {"10.0.0.1/32": kr("10.0.0.1/32")}, {"10.0.0.1/32": 4}
    )
    assert d.deletes == ("10.0.0.1/32",)
    assert d.adds == () and d.replaces == ()
    assert d.conflicts == (Conflict("10.0.0.1/32", 4),)


def test_foreign_not_desired_is_not_deleted() -> None:
    d = diff_routes({}, {}, {"10.0.0.1/32": 4})
    assert d.empty and d.conflicts == ()


def test_route_matches_rules() -> None:
    assert route_matches(spec("10.0.0.1/32"), kr("10.0.0.1/32"))  # kernel-resolved oif ok
    assert not route_matches(spec("10.0.0.1/32", "192.0.2.9"), kr("10.0.0.1/32"))
    assert not route_matches(spec("10.0.0.1/32", oif=3), kr("10.0.0.1/32", oif=2))
    assert not route_matches(spec("10.0.0.1/32", oif=2, onlink=True), kr("10.0.0.1/32"))
    assert route_matches(spec("10.0.0.1/32", oif=2, onlink=True), kr("10.0.0.1/32", onlink=True))
    bh = RouteSpec(dst="10.244.1.0/24", kind=RouteKind.BLACKHOLE)
    assert route_matches(bh, kr("10.244.1.0/24", None, oif=None, kind=RouteKind.BLACKHOLE))
    assert not route_matches(bh, kr("10.244.1.0/24"))
    dev = RouteSpec(dst="10.244.1.5/32", oif=7)
    assert route_matches(dev, kr("10.244.1.5/32", None, oif=7))
    assert not route_matches(dev, kr("10.244.1.5/32", None, oif=8))


def test_split_by_owner() -> None:
    ours, foreign = split_by_owner(
        [kr("10.0.0.1/32"), kr("10.0.0.2/32", proto=201), kr("0.0.0.0/0", proto=4)], proto=OURS
    )
    assert set(ours) == {"10.0.0.1/32"}
    assert foreign == {"10.0.0.2/32": 201, "0.0.0.0/0": 4}


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("10.0.0.1", "10.0.0.1/32"),
        ("10.1.0.0/16", "10.1.0.0/16"),
        (" 0.0.0.0/0 ", "0.0.0.0/0"),
        ("10.0.0.1/32", "10.0.0.1/32"),
    ],
)
def test_normalize_prefix_ok(raw: str, want: str) -> None:
    assert normalize_prefix(raw) == want


@pytest.mark.parametrize(
    "raw", ["10.0.0.1/24", "10.0.0.256/32", "10.0.0.1/33", "nope", "2001:db8::/64", "10.0.0/24", ""]
)
def test_normalize_prefix_rejects_and_names_route(raw: str) -> None:
    with pytest.raises(RouteInputError, match=r"learned route .*: prefix: "):
        normalize_prefix(raw, what="learned route")


def test_normalize_address() -> None:
    assert normalize_address("192.0.2.1", what="r", fieldname="nexthop") == "192.0.2.1"
    with pytest.raises(RouteInputError, match="r: nexthop: 'x' is not an IP address"):
        normalize_address("x", what="r", fieldname="nexthop")
    with pytest.raises(RouteInputError, match="only IPv4"):
        normalize_address("2001:db8::1", what="r", fieldname="nexthop")


@given(st.integers(0, 2**32 - 1), st.integers(0, 32))
def test_normalize_prefix_agrees_with_ipaddress(addr: int, plen: int) -> None:
    text = f"{ipaddress.IPv4Address(addr)}/{plen}"
    try:
        expected: str | None = str(ipaddress.IPv4Network(text, strict=True))
    except ValueError:
        expected = None
    if expected is None:
        with pytest.raises(RouteInputError):
            normalize_prefix(text)
    else:
        assert normalize_prefix(text) == expected


keys = st.integers(0, 30).map(lambda i: f"10.0.0.{i}/32")
gws = st.sampled_from(["192.0.2.2", "192.0.2.3"])


@given(st.dictionaries(keys, gws), st.dictionaries(keys, gws), st.dictionaries(keys, st.just(201)))
def test_diff_then_apply_reaches_desired_minus_foreign(
    desired_gw: dict[str, str], ours_gw: dict[str, str], foreign: dict[str, int]
) -> None:
    desired = {p: spec(p, g) for p, g in desired_gw.items()}
    ours = {p: kr(p, g) for p, g in ours_gw.items()}
    d = diff_routes(desired, ours, foreign)
    state = {p: r.gateway for p, r in ours.items()}
    for op in d.ops():
        if op.action is RouteAction.DELETE:
            del state[op.route.dst]
        elif op.action is RouteAction.ADD:
            assert op.route.dst not in state and op.route.dst not in foreign
            state[op.route.dst] = op.route.gateway
        else:
            assert op.route.dst in state and op.route.dst not in foreign
            state[op.route.dst] = op.route.gateway
    assert state == {p: g for p, g in desired_gw.items() if p not in foreign}
    assert {c.prefix for c in d.conflicts} == set(desired) & set(foreign)
