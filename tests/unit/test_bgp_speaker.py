"""Speaker against a fake bridge on its real unix socket: the fake acks every
command like ExaBGP (`done`/`error`) and feeds ExaBGP 5 JSON messages."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from pathlib import Path

import pytest

from felix_lite.bgp.config import BgpPeer, BgpSettings
from felix_lite.bgp.messages import PeerState
from felix_lite.bgp.speaker import Speaker

TOR = "10.99.0.1"
WAIT = 10.0


def state(st: str, peer: str = TOR) -> str:
    return (
        '{ "exabgp": "5.0.0", "type": "state", "neighbor": { "address": { "local": '
        f'"10.99.0.11", "peer": "{peer}" }}, "asn": {{ "local": 65001, "peer": 65000 }}, '
        f'"state": "{st}" }} }}'
    )


def update(
    announce: Mapping[str, str],
    withdraw: AbstractSet[str] = frozenset(),
    as_path: tuple[int, ...] = (65000,),
) -> str:
    by_nh: dict[str, list[str]] = {}
    for p, nh in announce.items():
        by_nh.setdefault(nh, []).append(f'{{ "nlri": "{p}" }}')
    ann = ", ".join(f'"{nh}": [ {", ".join(v)} ]' for nh, v in by_nh.items())
    wd = ", ".join(f'{{ "nlri": "{p}" }}' for p in sorted(withdraw))
    path = ", ".join(str(a) for a in as_path)
    body = (
        f'"attribute": {{ "origin": "igp", "as-path": {{"0": {{"element": "as-sequence", '
        f'"value": [{path}]}}}} }}'
    )
    if ann:
        body += f', "announce": {{ "ipv4 unicast": {{ {ann} }} }}'
    if wd:
        body += f', "withdraw": {{ "ipv4 unicast": [ {wd} ] }}'
    return (
        '{ "exabgp": "5.0.0", "type": "update", "neighbor": { "address": { "local": '
        f'"10.99.0.11", "peer": "{TOR}" }}, "asn": {{ "local": 65001, "peer": 65000 }}, '
        f'"direction": "receive", "message": {{ "update": {{ {body} }} }} }} }}'
    )


EOR = (
    '{ "exabgp": "5.0.0", "type": "update", "neighbor": { "address": { "local": '
    f'"10.99.0.11", "peer": "{TOR}" }}, "asn": {{ "local": 65001, "peer": 65000 }}, '
    '"direction": "receive", "message": { "eor": { "afi" : "ipv4", "safi" : "unicast" } } } }'
)


class FakeBridge:
    """Plays ExaBGP + bridge: records commands, acks each (error if `fail` matches)."""

    def __init__(self, path: str, fail: Callable[[str], bool] = lambda _c: False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.commands: list[str] = []
        self.cv = threading.Condition()
        self.fail = fail
        self.wlock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        f = self.sock.makefile("r")
        try:
            for line in f:
                cmd = line.strip()
                with self.cv:
                    self.commands.append(cmd)
                    self.cv.notify_all()
                self.send("error" if self.fail(cmd) else "done")
        except OSError:
            pass

    def send(self, line: str) -> None:
        with self.wlock:
            self.sock.sendall(line.encode() + b"\n")

    def wait_commands(self, n: int) -> list[str]:
        with self.cv:
            assert self.cv.wait_for(lambda: len(self.commands) >= n, timeout=WAIT), self.commands
            return list(self.commands)

    def take(self) -> list[str]:
        with self.cv:
            out, self.commands = self.commands, []
            return out

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(timeout=WAIT)


class Routes:
    def __init__(self) -> None:
        self.rib: dict[str, str] = {}
        self.withdrawn: list[str] = []
        self.cv = threading.Condition()

    def __call__(
        self, peer: str, announced: Mapping[str, str], withdrawn: AbstractSet[str]
    ) -> None:
        with self.cv:
            for p in withdrawn:
                self.rib.pop(p, None)
            self.withdrawn.extend(withdrawn)
            self.rib.update(announced)
            self.cv.notify_all()

    def wait(self, pred: Callable[[dict[str, str]], bool]) -> dict[str, str]:
        with self.cv:
            assert self.cv.wait_for(lambda: pred(self.rib), timeout=WAIT), self.rib
            return dict(self.rib)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def settings(gr: int | None = 60, max_prefix: int = 1000, aggregate: bool = False) -> BgpSettings:
    return BgpSettings(
        node_name="node-1",
        router_id="10.99.0.11",
        local_asn=65001,
        local_address="10.99.0.11",
        peers=(BgpPeer(TOR, 65000, graceful_restart=gr, max_prefix=max_prefix),),
        pod_cidrs=("10.244.0.0/16",),
        node_block="10.244.1.0/24",
        aggregate=aggregate,
    )


Make = Callable[..., tuple[Speaker, Routes, Clock]]


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Make]:
    made: list[Speaker] = []

    def _make(s: BgpSettings | None = None) -> tuple[Speaker, Routes, Clock]:
        routes, clock = Routes(), Clock()
        sp = Speaker(
            s or settings(),
            str(tmp_path / "bgp.sock"),
            on_routes=routes,
            clock=clock,
            batch=2,
            window=2,
            ack_timeout=WAIT,
        )
        sp.start()
        made.append(sp)
        return sp, routes, clock

    yield _make
    for sp in made:
        sp.stop()


def sock_of(sp: Speaker) -> str:
    return sp.socket_path


def test_connect_resyncs_everything_then_eor_and_refresh(make: Make) -> None:
    sp, _, _ = make()
    sp.set_local_pods(["10.244.1.3", "10.244.1.2", "10.244.1.4"])
    fb = FakeBridge(sock_of(sp))
    assert sp.wait_synced(WAIT)
    assert fb.take() == [
        "announce attributes next-hop self nlri 10.244.1.2/32 10.244.1.3/32",
        "announce attributes next-hop self nlri 10.244.1.4/32",
        "announce eor ipv4 unicast",
        "announce route-refresh ipv4 unicast",
    ]
    sp.set_local_pods(["10.244.1.2", "10.244.1.5"])
    assert sp.wait_synced(WAIT)
    assert fb.take() == [
        "announce attributes next-hop self nlri 10.244.1.5/32",
        "withdraw attributes next-hop self nlri 10.244.1.3/32 10.244.1.4/32",
    ]
    assert sp.status().announced == 2
    fb.close()


def test_aggregation_setting(make: Make) -> None:
    sp, _, _ = make(settings(aggregate=True))
    sp.set_local_pods(["10.244.1.2", "10.244.1.3", "10.244.7.7"])
    fb = FakeBridge(sock_of(sp))
    assert sp.wait_synced(WAIT)
    assert fb.take()[0] == "announce attributes next-hop self nlri 10.244.1.0/24 10.244.7.7/32"
    fb.close()


def test_error_ack_does_not_stall(make: Make, caplog: pytest.LogCaptureFixture) -> None:
    sp, _, _ = make()
    fb = FakeBridge(sock_of(sp), fail=lambda c: "10.244.1.2/32" in c)
    sp.set_local_pods(["10.244.1.2"])
    assert sp.wait_synced(WAIT)
    sp.set_local_pods(["10.244.1.3"])
    assert sp.wait_synced(WAIT)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("bgp.command.error command=announce attributes") for m in warnings), (
        warnings
    )
    fb.close()


def test_global_eor_with_no_session_up_is_not_a_warning(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="felix_lite.bgp.speaker")
    sp, _, _ = make()
    failing = ("announce eor ipv4 unicast", "announce route-refresh ipv4 unicast")
    fb = FakeBridge(sock_of(sp), fail=lambda c: c in failing)
    sp.set_local_pods(["10.244.1.2"])
    assert sp.wait_synced(WAIT)
    errors = [r for r in caplog.records if r.getMessage().startswith("bgp.command.error")]
    assert {r.getMessage().split("=", 1)[1] for r in errors} == set(failing)
    assert all(r.levelno == logging.DEBUG for r in errors)
    fb.close()


def test_reconnect_withdraws_leftovers(make: Make) -> None:
    sp, _, _ = make()
    sp.set_local_pods(["10.244.1.2", "10.244.1.3"])
    fb = FakeBridge(sock_of(sp))
    assert sp.wait_synced(WAIT)
    fb.close()
    sp.set_local_pods(["10.244.1.2"])  # changes while the sidecar restarts
    fb2 = FakeBridge(sock_of(sp))
    assert sp.wait_synced(WAIT)
    assert fb2.take() == [
        "announce attributes next-hop self nlri 10.244.1.2/32",
        "withdraw attributes next-hop self nlri 10.244.1.3/32",
        "announce eor ipv4 unicast",
        "announce route-refresh ipv4 unicast",
    ]
    fb2.close()


def test_peer_up_reannounces_to_that_neighbor_with_eor(make: Make) -> None:
    sp, _, _ = make()
    sp.set_local_pods(["10.244.1.2"])
    fb = FakeBridge(sock_of(sp))
    assert sp.wait_synced(WAIT)
    fb.take()
    fb.send(state("up"))
    cmds = fb.wait_commands(2)
    assert cmds == [
        f"neighbor {TOR} announce attributes next-hop self nlri 10.244.1.2/32",
        f"neighbor {TOR} announce eor ipv4 unicast",
    ]
    st = sp.status().peers[0]
    assert st.state is PeerState.UP and st.uptime == 0.0
    fb.close()


def test_learned_routes_filtered_and_delivered(make: Make) -> None:
    sp, routes, _ = make()
    sp.set_local_pods(["10.244.9.9"])
    fb = FakeBridge(sock_of(sp))
    fb.send(
        update(
            {
                "10.244.2.5/32": "10.99.0.12",
                "10.244.9.9/32": "10.99.0.1",  # own pod
                "10.200.0.0/24": "10.99.0.1",  # outside pod CIDRs
                "10.244.1.7/32": "10.99.0.1",  # inside our node block
            }
        )
    )
    fb.send(update({"10.244.3.3/32": "10.99.0.13"}, as_path=(65000, 65001)))  # loop
    fb.send(update({"10.244.4.4/32": "10.99.0.14"}))
    routes.wait(lambda r: "10.244.4.4/32" in r)
    assert routes.rib == {"10.244.2.5/32": "10.99.0.12", "10.244.4.4/32": "10.99.0.14"}
    st = sp.status().peers[0]
    assert (st.received, st.accepted, st.rejected) == (6, 2, 4)
    assert st.state is PeerState.UP  # inferred from updates
    fb.send(update({}, {"10.244.2.5/32"}))
    routes.wait(lambda r: "10.244.2.5/32" not in r)
    fb.close()


def test_peer_down_with_gr_keeps_routes_until_stale_time(make: Make) -> None:
    sp, routes, clock = make(settings(gr=60))
    fb = FakeBridge(sock_of(sp))
    fb.send(state("up"))
    fb.send(update({"10.244.2.5/32": "10.99.0.12", "10.244.2.6/32": "10.99.0.12"}))
    routes.wait(lambda r: len(r) == 2)
    fb.send(state("down"))
    fb.send(state("up"))
    fb.send(update({"10.244.2.6/32": "10.99.0.12"}))
    fb.send(EOR)  # End-of-RIB sweeps what was not re-announced
    routes.wait(lambda r: "10.244.2.5/32" not in r)
    assert routes.rib == {"10.244.2.6/32": "10.99.0.12"}
    fb.send(state("down"))
    # an unrelated event proves the down was processed before we move the clock
    fb.send(update({"10.244.2.8/32": "10.99.0.12"}))
    routes.wait(lambda r: "10.244.2.8/32" in r)
    assert sp.status().peers[0].stale == 1
    clock.now += 61
    routes.wait(lambda r: r == {"10.244.2.8/32": "10.99.0.12"})
    fb.close()


def test_peer_down_without_gr_withdraws_at_once(make: Make) -> None:
    sp, routes, _ = make(settings(gr=None))
    fb = FakeBridge(sock_of(sp))
    fb.send(update({"10.244.2.5/32": "10.99.0.12"}))
    routes.wait(lambda r: len(r) == 1)
    fb.send(state("down"))
    routes.wait(lambda r: not r)
    assert sp.status().peers[0].state is PeerState.DOWN
    fb.close()


def test_max_prefix_per_peer(make: Make) -> None:
    sp, routes, _ = make(settings(max_prefix=3))
    fb = FakeBridge(sock_of(sp))
    fb.send(update({f"10.244.2.{i}/32": "10.99.0.12" for i in range(1, 6)}))
    routes.wait(lambda r: len(r) == 3)
    fb.send(update({"10.244.3.3/32": "10.99.0.13"}))
    fb.send(update({}, {"10.244.2.1/32"}))
    fb.send(update({"10.244.4.4/32": "10.99.0.14"}))
    routes.wait(lambda r: "10.244.4.4/32" in r)
    assert len(routes.rib) == 3 and "10.244.3.3/32" not in routes.rib
    fb.close()


def test_own_pod_added_later_hides_learned_route(make: Make) -> None:
    sp, routes, _ = make()
    fb = FakeBridge(sock_of(sp))
    fb.send(update({"10.244.9.9/32": "10.99.0.12"}))
    routes.wait(lambda r: "10.244.9.9/32" in r)
    sp.set_local_pods(["10.244.9.9"])
    routes.wait(lambda r: "10.244.9.9/32" not in r)
    fb.close()
