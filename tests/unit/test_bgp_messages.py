"""ExaBGP 5 JSON parsing (samples captured from ExaBGP 5.0.15 against BIRD 2 in
the functional test's topology) and the import filter."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from felix_lite.bgp.messages import (
    Ack,
    AdjRibIn,
    EorEvent,
    MessageError,
    NotificationEvent,
    PeerState,
    RefreshEvent,
    RefreshPhase,
    RejectReason,
    RibDelta,
    StateEvent,
    UpdateEvent,
    merge_deltas,
    parse_line,
)

_HDR = '{ "exabgp": "5.0.0", "time": 1795730078.6, "host" : "vm", "pid" : 8310, "ppid" : 1, '
_NB = (
    '"neighbor": { "address": { "local": "10.99.0.12", "peer": "10.99.0.1" }, '
    '"asn": { "local": 65002, "peer": 65000 }, "router-id": "10.99.0.12" , '
)
STATE_CONNECTED = _HDR + '"counter": 1, "type": "state", ' + _NB + '"state": "connected" } }'
STATE_UP = _HDR + '"counter": 2, "type": "state", ' + _NB + '"state": "up" } }'
STATE_DOWN = (
    _HDR
    + '"counter": 10, "type": "state", '
    + _NB
    + '"state": "down", "reason": "notification received (6,2)" } }'
)
UPDATE_ANNOUNCE = (
    _HDR + '"counter": 5, "type": "update", ' + _NB + '"direction": "receive", "message": '
    '{ "update": { "attribute": { "origin": "igp", "as-path": {"0": {"element": '
    '"as-sequence", "value": [65000, 65001]}} }, "announce": { "ipv4 unicast": '
    '{ "10.99.0.11": [ { "nlri": "10.244.1.2/32" }, { "nlri": "10.244.1.3/32" } ] } } } } } }'
)
UPDATE_FROM_TOR = (
    _HDR + '"counter": 15, "type": "update", ' + _NB + '"direction": "receive", "message": '
    '{ "update": { "attribute": { "origin": "igp", "as-path": {"0": {"element": '
    '"as-sequence", "value": [65000]}} }, "announce": { "ipv4 unicast": { "10.99.0.1": '
    '[ { "nlri": "10.244.2.9/32" }, { "nlri": "10.244.1.5/32" }, '
    '{ "nlri": "10.200.0.0/24" } ] } } } } } }'
)
UPDATE_WITHDRAW = (
    _HDR + '"counter": 7, "type": "update", ' + _NB + '"direction": "receive", "message": '
    '{ "update": { "withdraw": { "ipv4 unicast": [ { "nlri": "10.244.1.2/32" }, '
    '{ "nlri": "10.244.1.3/32" } ] } } } } }'
)
EOR = (
    _HDR + '"counter": 4, "type": "update", ' + _NB + '"direction": "receive", "message": '
    '{ "eor": { "afi" : "ipv4", "safi" : "unicast" } } } }'
)
NOTIFICATION = (
    _HDR + '"counter": 9, "type": "notification", ' + _NB + '"direction": "receive", '
    '"notification": { "code": 6, "subcode": 2, "data": "0x", "message": "" }  } }'
)
REFRESH_BEGIN = (
    _HDR + '"counter": 5, "type": "refresh", ' + _NB + '"direction": "receive", '
    '"route-refresh": { "afi": "ipv4", "safi": "unicast", "subtype": "begin" } } }'
)
REFRESH_END = REFRESH_BEGIN.replace('"begin"', '"end"')


def test_acks() -> None:
    assert parse_line("done\n") == Ack(ok=True)
    assert parse_line("error") == Ack(ok=False)


def test_state_messages() -> None:
    assert parse_line(STATE_CONNECTED) == StateEvent("10.99.0.1", 65000, PeerState.CONNECTED)
    assert parse_line(STATE_UP) == StateEvent("10.99.0.1", 65000, PeerState.UP)
    ev = parse_line(STATE_DOWN)
    assert isinstance(ev, StateEvent)
    assert ev.state is PeerState.DOWN and ev.reason == "notification received (6,2)"


def test_update_announce() -> None:
    ev = parse_line(UPDATE_ANNOUNCE)
    assert ev == UpdateEvent(
        peer="10.99.0.1",
        peer_asn=65000,
        announced={"10.244.1.2/32": "10.99.0.11", "10.244.1.3/32": "10.99.0.11"},
        withdrawn=frozenset(),
        as_path=(65000, 65001),
    )


def test_update_withdraw() -> None:
    ev = parse_line(UPDATE_WITHDRAW)
    assert isinstance(ev, UpdateEvent)
    assert ev.announced == {}
    assert ev.withdrawn == {"10.244.1.2/32", "10.244.1.3/32"}


def test_eor_notification_refresh() -> None:
    assert parse_line(EOR) == EorEvent("10.99.0.1", "ipv4", "unicast")
    assert parse_line(NOTIFICATION) == NotificationEvent("10.99.0.1", "receive", 6, 2, "")
    assert parse_line(REFRESH_BEGIN) == RefreshEvent("10.99.0.1", RefreshPhase.BEGIN)
    assert parse_line(REFRESH_END) == RefreshEvent("10.99.0.1", RefreshPhase.END)


def test_ignored_and_bad_lines() -> None:
    assert parse_line('{"type": "keepalive"}') is None
    sent = UPDATE_ANNOUNCE.replace('"direction": "receive"', '"direction": "send"')
    assert parse_line(sent) is None
    with pytest.raises(MessageError, match="not JSON"):
        parse_line("hello")
    with pytest.raises(MessageError, match="invalid JSON"):
        parse_line("{ nope")
    with pytest.raises(MessageError, match="nlri"):
        parse_line(UPDATE_WITHDRAW.replace("10.244.1.2/32", "fe80::1/128"))


def _rib(max_prefix: int = 100, **kw: object) -> AdjRibIn:
    return AdjRibIn(
        "10.99.0.1",
        local_asn=65002,
        pod_cidrs=["10.244.0.0/16"],
        max_prefix=max_prefix,
        node_block="10.244.2.0/24",
        **kw,  # type: ignore[arg-type]
    )


def _upd(
    announced: dict[str, str],
    withdrawn: set[str] | None = None,
    as_path: tuple[int, ...] = (65000,),
) -> UpdateEvent:
    return UpdateEvent("10.99.0.1", 65000, announced, frozenset(withdrawn or ()), as_path)


def test_filter_real_tor_update() -> None:
    ev = parse_line(UPDATE_FROM_TOR)
    assert isinstance(ev, UpdateEvent)
    delta = _rib().apply(ev)
    assert delta.announced == {"10.244.1.5/32": "10.99.0.1"}
    assert delta.rejected == {
        "10.200.0.0/24": RejectReason.OUTSIDE_POD_CIDRS,
        "10.244.2.9/32": RejectReason.NODE_BLOCK,
    }


def test_filter_as_loop() -> None:
    rib = _rib()
    delta = rib.apply(_upd({"10.244.1.2/32": "10.99.0.11"}, as_path=(65000, 65002, 65001)))
    assert not delta
    assert delta.rejected == {"10.244.1.2/32": RejectReason.AS_LOOP}
    assert rib.rejected[RejectReason.AS_LOOP] == 1


def test_filter_own_pod_hidden_and_revealed() -> None:
    rib = _rib(own_prefixes=frozenset({"10.244.9.9/32"}))
    delta = rib.apply(_upd({"10.244.9.9/32": "10.99.0.1", "10.244.1.2/32": "10.99.0.11"}))
    assert delta.announced == {"10.244.1.2/32": "10.99.0.11"}
    assert delta.rejected == {"10.244.9.9/32": RejectReason.OWN_POD}
    # the pod moves away: the learned route becomes usable; and back again
    assert rib.set_own_prefixes(frozenset()).announced == {"10.244.9.9/32": "10.99.0.1"}
    hide = rib.set_own_prefixes(frozenset({"10.244.1.2/32"}))
    assert hide.withdrawn == {"10.244.1.2/32"} and not hide.announced


def test_filter_prefix_equal_to_pod_cidr_is_inside() -> None:
    delta = _rib().apply(_upd({"10.244.0.0/16": "10.99.0.1", "10.0.0.0/8": "10.99.0.1"}))
    assert delta.announced == {"10.244.0.0/16": "10.99.0.1"}
    assert delta.rejected == {"10.0.0.0/8": RejectReason.OUTSIDE_POD_CIDRS}


def test_max_prefix_blocks_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    rib = _rib(max_prefix=2)
    with caplog.at_level(logging.WARNING):
        delta = rib.apply(_upd({f"10.244.1.{i}/32": "10.99.0.11" for i in range(1, 5)}))
    assert len(delta.announced) == 2
    assert sum(1 for r in delta.rejected.values() if r is RejectReason.MAX_PREFIX) == 2
    assert rib.limit_hit
    assert "bgp.import.max_prefix_reached peer=10.99.0.1 max_prefix=2" in caplog.text
    # a re-announcement of an accepted prefix (new next hop) is still taken
    assert rib.apply(_upd({"10.244.1.1/32": "10.99.0.12"})).announced == {
        "10.244.1.1/32": "10.99.0.12"
    }
    # room again after a withdraw
    rib.apply(_upd({}, {"10.244.1.1/32"}))
    assert not rib.limit_hit
    assert rib.apply(_upd({"10.244.1.9/32": "10.99.0.11"})).announced


def test_rejected_reannouncement_withdraws_old_route() -> None:
    rib = _rib()
    rib.apply(_upd({"10.244.1.2/32": "10.99.0.11"}))
    delta = rib.apply(_upd({"10.244.1.2/32": "10.99.0.11"}, as_path=(65002,)))
    assert delta.withdrawn == {"10.244.1.2/32"}
    assert rib.accepted() == {}


def test_unchanged_reannouncement_is_no_delta() -> None:
    rib = _rib()
    rib.apply(_upd({"10.244.1.2/32": "10.99.0.11"}))
    assert not rib.apply(_upd({"10.244.1.2/32": "10.99.0.11"}))


def test_stale_sweep_after_graceful_restart() -> None:
    rib = _rib()
    rib.apply(_upd({"10.244.1.2/32": "10.99.0.11", "10.244.1.3/32": "10.99.0.11"}))
    rib.mark_stale()
    assert rib.stale_count == 2
    rib.apply(_upd({"10.244.1.3/32": "10.99.0.11"}))  # re-announced
    delta = rib.sweep_stale()
    assert delta.withdrawn == {"10.244.1.2/32"}
    assert rib.accepted() == {"10.244.1.3/32": "10.99.0.11"}
    assert rib.clear().withdrawn == {"10.244.1.3/32"}


_prefix = st.integers(1, 20).map(lambda i: f"10.244.1.{i}/32")
_delta = st.builds(
    lambda a, w: RibDelta(announced={p: "10.0.0.1" for p in a}, withdrawn=frozenset(w)),
    st.sets(_prefix),
    st.sets(_prefix),
)


@given(st.dictionaries(_prefix, st.just("10.9.9.9")), _delta, _delta)
def test_merge_deltas_equals_sequential_application(
    start: dict[str, str], d1: RibDelta, d2: RibDelta
) -> None:
    def apply(rib: dict[str, str], d: RibDelta) -> dict[str, str]:
        out = {p: nh for p, nh in rib.items() if p not in d.withdrawn}
        out.update(d.announced)
        return out

    assert apply(start, merge_deltas(d1, d2)) == apply(apply(start, d1), d2)
