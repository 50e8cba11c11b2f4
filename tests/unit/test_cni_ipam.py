"""IPAM: address choice, persistence, exhaustion, release, cross-process locking."""

from __future__ import annotations

import ipaddress
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from felix_lite.cni.ipam import Ipam, pick_free, usable
from felix_lite.cni.netconf import CniError, ErrorCode

NET29 = ipaddress.IPv4Network("10.244.9.0/29")


def test_usable_skips_network_and_broadcast() -> None:
    addrs = list(usable(NET29))
    assert len(addrs) == 6
    assert NET29.network_address not in addrs
    assert NET29.broadcast_address not in addrs


def test_pick_free_is_round_robin_and_wraps() -> None:
    a = ipaddress.IPv4Address
    assert pick_free(NET29, [], None) == a("10.244.9.1")
    assert pick_free(NET29, [], a("10.244.9.3")) == a("10.244.9.4")
    assert pick_free(NET29, [a("10.244.9.1")], a("10.244.9.6")) == a("10.244.9.2")
    assert pick_free(NET29, list(usable(NET29)), None) is None


@given(
    prefix=st.integers(min_value=24, max_value=30),
    data=st.data(),
)
def test_pick_free_property(prefix: int, data: st.DataObject) -> None:
    cidr = ipaddress.IPv4Network(f"10.9.8.0/{prefix}")
    pool = list(usable(cidr))
    used = data.draw(st.sets(st.sampled_from(pool)))
    last = data.draw(st.none() | st.sampled_from(pool))
    got = pick_free(cidr, used, last)
    if len(used) == len(pool):
        assert got is None
    else:
        assert got is not None
        assert got in pool and got not in used
        assert got not in (cidr.network_address, cidr.broadcast_address)


def test_allocate_persist_release(tmp_path: Path) -> None:
    ipam = Ipam(tmp_path / "net", NET29)
    a = ipam.allocate("c1", "eth0", host_ifname="flaaa", pod="x/a")
    b = ipam.allocate("c2", "eth0")
    assert a.address != b.address
    # Same attachment again: same address (ADD retried).
    assert ipam.allocate("c1", "eth0").address == a.address
    # A fresh instance reads what is on disk.
    again = Ipam(tmp_path / "net", NET29)
    rec = again.find("c1", "eth0")
    assert rec is not None and rec.host_ifname == "flaaa" and rec.pod == "x/a"
    assert again.release("c1", "eth0") == rec
    assert again.release("c1", "eth0") is None  # idempotent
    assert again.find("c1", "eth0") is None
    assert [r.container_id for r in again.list()] == ["c2"]


def test_released_address_is_not_reused_immediately(tmp_path: Path) -> None:
    ipam = Ipam(tmp_path, NET29)
    first = ipam.allocate("c1", "eth0").address
    ipam.release("c1", "eth0")
    assert ipam.allocate("c2", "eth0").address != first


def test_exhaustion_names_the_cidr(tmp_path: Path) -> None:
    ipam = Ipam(tmp_path, NET29)
    got = {ipam.allocate(f"c{i}", "eth0").address for i in range(6)}
    assert got == set(usable(NET29))
    with pytest.raises(CniError) as info:
        ipam.allocate("c7", "eth0")
    assert info.value.code == ErrorCode.IP_EXHAUSTED
    assert "10.244.9.0/29" in info.value.msg
    freed = ipam.release("c3", "eth0")
    assert freed is not None
    assert ipam.allocate("c7", "eth0").address == freed.address


def test_unreadable_record_keeps_address_taken(tmp_path: Path) -> None:
    ipam = Ipam(tmp_path, ipaddress.IPv4Network("10.0.0.0/30"))
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "10.0.0.1").write_text("{garbage")
    assert ipam.allocate("c1", "eth0").address == ipaddress.IPv4Address("10.0.0.2")
    with pytest.raises(CniError):
        ipam.allocate("c2", "eth0")


def _allocate_in_child(args: tuple[str, str]) -> str:
    directory, cid = args
    return str(
        Ipam(Path(directory), ipaddress.IPv4Network("10.50.0.0/24")).allocate(cid, "eth0").address
    )


def test_concurrent_processes_get_distinct_addresses(tmp_path: Path) -> None:
    jobs = [(str(tmp_path), f"c{i}") for i in range(40)]
    with ProcessPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(_allocate_in_child, jobs))
    assert len(set(got)) == 40
    assert len(Ipam(tmp_path, ipaddress.IPv4Network("10.50.0.0/24")).list()) == 40
