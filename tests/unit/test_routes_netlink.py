"""rtnetlink message packing and parsing (no socket)."""

from __future__ import annotations

import errno
import struct

from felix_lite.routes.netlink import (
    NLM_F_ACK,
    NLM_F_ACK_TLVS,
    NLM_F_CAPPED,
    NLM_F_CREATE,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    RT_SCOPE_LINK,
    RT_SCOPE_NOWHERE,
    RT_SCOPE_UNIVERSE,
    RTM_DELROUTE,
    RTM_NEWROUTE,
    _parse_ack,
    pack_route_msg,
    parse_route,
)
from felix_lite.routes.table import KernelRoute, RouteAction, RouteKind, RouteOp, RouteSpec


def header(msg: bytes) -> tuple[int, int, int, int, int]:
    a, b, c, d, e = struct.unpack_from("=IHHII", msg)
    return a, b, c, d, e


def rtmsg(msg: bytes) -> tuple[int, ...]:
    return struct.unpack_from("=BBBBBBBBI", msg, 16)


def test_add_is_exclusive_and_roundtrips() -> None:
    op = RouteOp(RouteAction.ADD, RouteSpec(dst="10.1.2.0/24", gateway="192.0.2.2"))
    msg = pack_route_msg(op, seq=7, proto=202, table=254, metric=0)
    length, mtype, flags, seq, _ = header(msg)
    assert (length, mtype, seq) == (len(msg), RTM_NEWROUTE, 7)
    assert flags & NLM_F_EXCL and flags & NLM_F_CREATE and flags & NLM_F_ACK
    assert not flags & NLM_F_REPLACE
    assert rtmsg(msg)[6] == RT_SCOPE_UNIVERSE
    assert parse_route(msg) == KernelRoute(
        dst="10.1.2.0/24", proto=202, table=254, gateway="192.0.2.2"
    )


def test_replace_onlink_with_metric_and_big_table() -> None:
    spec = RouteSpec(dst="10.1.2.3/32", gateway="192.0.2.9", oif=5, onlink=True)
    msg = pack_route_msg(
        RouteOp(RouteAction.REPLACE, spec), seq=1, proto=202, table=1000, metric=50
    )
    _, _, flags, _, _ = header(msg)
    assert flags & NLM_F_REPLACE and flags & NLM_F_CREATE and not flags & NLM_F_EXCL
    assert parse_route(msg) == KernelRoute(
        dst="10.1.2.3/32", proto=202, table=1000, gateway="192.0.2.9", oif=5, metric=50, onlink=True
    )


def test_device_route_is_scope_link_and_blackhole_has_no_nexthop() -> None:
    dev = pack_route_msg(
        RouteOp(RouteAction.ADD, RouteSpec(dst="10.244.1.5/32", oif=9)), seq=1, proto=201, table=254
    )
    assert rtmsg(dev)[6] == RT_SCOPE_LINK
    assert parse_route(dev) == KernelRoute(dst="10.244.1.5/32", proto=201, oif=9)
    bh = pack_route_msg(
        RouteOp(
            RouteAction.ADD,
            RouteSpec(dst="10.244.1.0/24", kind=RouteKind.BLACKHOLE, gateway="1.2.3.4", oif=3),
        ),
        seq=1,
        proto=201,
        table=254,
    )
    assert parse_route(bh) == KernelRoute(dst="10.244.1.0/24", proto=201, kind=RouteKind.BLACKHOLE)


def test_delete_carries_protocol_and_matches_any_scope() -> None:
    msg = pack_route_msg(
        RouteOp(RouteAction.DELETE, RouteSpec(dst="10.0.0.1/32")), seq=3, proto=202, table=254
    )
    _, mtype, flags, _, _ = header(msg)
    assert mtype == RTM_DELROUTE and flags & NLM_F_ACK and not flags & NLM_F_CREATE
    fields = rtmsg(msg)
    assert fields[5] == 202 and fields[6] == RT_SCOPE_NOWHERE and fields[7] == 0


def _ack(err: int, *, text: str | None = None) -> tuple[memoryview, int]:
    orig = struct.pack("=IHHII", 60, RTM_NEWROUTE, 0, 5, 0)
    body = struct.pack("=i", err) + orig
    flags = NLM_F_CAPPED
    if text is not None:
        raw = text.encode() + b"\0"
        attr = struct.pack("=HH", 4 + len(raw), 1) + raw
        body += attr + b"\0" * (-len(attr) % 4)
        flags |= NLM_F_ACK_TLVS
    msg = struct.pack("=IHHII", 16 + len(body), 2, flags, 5, 0) + body
    return memoryview(msg), flags


def test_parse_ack_success_error_and_extack() -> None:
    assert _parse_ack(*_ack(0)).ok
    plain = _parse_ack(*_ack(-errno.EEXIST))
    assert plain.errno == errno.EEXIST and plain.message == "File exists"
    ext = _parse_ack(*_ack(-errno.ENETUNREACH, text="Nexthop has invalid gateway"))
    assert (ext.errno, ext.message) == (errno.ENETUNREACH, "Nexthop has invalid gateway")


class FakeNetlinkSocket:
    """Answers each route message with an ack, a few per recv, like the kernel does after
    a multi-message send; prefixes in `fail` get that errno."""

    def __init__(self, fail: dict[str, int] | None = None, per_recv: int = 7) -> None:
        self.fail = fail or {}
        self.per_recv = per_recv
        self.sends: list[int] = []  # messages per send()
        self.pending: list[bytes] = []

    def settimeout(self, _t: float | None) -> None:
        pass

    def getsockopt(self, _level: int, _opt: int) -> int:
        return 8 << 20

    def send(self, data: bytes) -> int:
        off = count = 0
        while off < len(data):
            length, _mtype, _flags, seq, _ = struct.unpack_from("=IHHII", data, off)
            dst = parse_route(data[off : off + length])
            err = self.fail.get(dst.dst, 0) if dst else 0
            body = struct.pack("=i", -err) + data[off : off + 16]
            self.pending.append(
                struct.pack("=IHHII", 16 + len(body), 2, NLM_F_CAPPED, seq, 0) + body
            )
            off += (length + 3) & ~3
            count += 1
        self.sends.append(count)
        return len(data)

    def recv_into(self, buf: bytearray) -> int:
        chunk = b"".join(self.pending[: self.per_recv])
        del self.pending[: self.per_recv]
        buf[: len(chunk)] = chunk
        return len(chunk)

    def close(self) -> None:
        pass


def test_apply_batches_and_maps_acks_to_ops_in_order() -> None:
    from felix_lite.routes.netlink import NetlinkRoutes

    sock = FakeNetlinkSocket(fail={"10.0.0.7/32": errno.EEXIST, "10.0.0.200/32": errno.ENETUNREACH})
    nl = NetlinkRoutes(batch=100, socket_factory=lambda _ns: sock)  # type: ignore[arg-type,return-value]
    ops = [
        RouteOp(
            RouteAction.ADD, RouteSpec(dst=f"10.0.{i // 256}.{i % 256}/32", gateway="192.0.2.2")
        )
        for i in range(250)
    ]
    res = nl.apply(ops, proto=202, table=254)
    assert sock.sends == [100, 100, 50]
    assert len(res) == 250
    bad = {ops[i].route.dst: r.errno for i, r in enumerate(res) if not r.ok}
    assert bad == {"10.0.0.7/32": errno.EEXIST, "10.0.0.200/32": errno.ENETUNREACH}
    assert sock.pending == []
