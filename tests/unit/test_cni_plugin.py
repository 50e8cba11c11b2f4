"""Plugin command logic with a fake kernel side: results, errors, rollback, DEL/GC/STATUS."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest

from felix_lite.cni import plugin
from felix_lite.cni.ipam import Ipam
from felix_lite.cni.netconf import CniError, ErrorCode
from felix_lite.cni.wiring import Macs, PodLink
from policy.names import pod_interface


class FakeWiring:
    """Records links like the kernel would; can be told to fail."""

    def __init__(self) -> None:
        self.links: dict[str, PodLink] = {}
        self.removed: list[tuple[str, ipaddress.IPv4Address | None]] = []
        self.fail_add: Exception | None = None

    def add(self, link: PodLink) -> Macs:
        self.links[link.host_ifname] = link
        if self.fail_add is not None:
            raise self.fail_add
        return Macs(host="ee:ee:ee:ee:ee:ee", container="02:00:00:00:00:01")

    def remove(self, *, host_ifname: str, address: ipaddress.IPv4Address | None) -> None:
        self.removed.append((host_ifname, address))
        self.links.pop(host_ifname, None)

    def check(self, link: PodLink) -> None:
        have = self.links.get(link.host_ifname)
        if have != link:
            raise CniError(ErrorCode.CHECK_FAILED, f"check {link.host_ifname}: missing")

    def macs(self, link: PodLink) -> Macs:
        return Macs(host="ee:ee:ee:ee:ee:ee", container="02:00:00:00:00:01")


@pytest.fixture
def netns(tmp_path: Path) -> str:
    path = tmp_path / "netns-p"
    path.write_text("")  # stands in for /var/run/netns/<pod>
    return str(path)


def stdin(
    tmp_path: Path, version: Any = "1.0.0", cidr: Any = "10.244.1.0/24", **extra: Any
) -> bytes:
    doc = {
        "cniVersion": version,
        "name": "k8s",
        "type": "felix-lite",
        "ipam": {"podCIDR": cidr, "dataDir": str(tmp_path / "ipam")},
        **extra,
    }
    return json.dumps(doc).encode()


def env(command: str, netns: str, cid: str = "cid1", pod: str = "a") -> dict[str, str]:
    return {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": cid,
        "CNI_NETNS": netns,
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": f"K8S_POD_NAMESPACE=x;K8S_POD_NAME={pod}",
        "CNI_PATH": "/usr/lib/cni",
    }


def ipam(tmp_path: Path, cidr: str = "10.244.1.0/24") -> Ipam:
    return Ipam(tmp_path / "ipam" / "k8s", ipaddress.IPv4Network(cidr))


def test_add_result_and_allocation(tmp_path: Path, netns: str) -> None:
    fake = FakeWiring()
    code, out = plugin.run(env("ADD", netns), stdin(tmp_path), wiring=fake)
    assert code == 0 and out is not None
    host = pod_interface("x", "a")
    assert out["interfaces"][0]["name"] == host
    assert out["interfaces"][1]["sandbox"] == netns
    addr = out["ips"][0]["address"]
    link = fake.links[host]
    assert f"{link.address}/32" == addr and link.container_ifname == "eth0" and link.netns == netns
    rec = ipam(tmp_path).find("cid1", "eth0")
    assert rec is not None and rec.host_ifname == host and rec.pod == "x/a"


def test_add_twice_same_attachment_returns_same_result(tmp_path: Path, netns: str) -> None:
    fake = FakeWiring()
    _, first = plugin.run(env("ADD", netns), stdin(tmp_path), wiring=fake)
    _, second = plugin.run(env("ADD", netns), stdin(tmp_path), wiring=fake)
    assert first == second
    assert len(ipam(tmp_path).list()) == 1


def test_add_missing_netns_is_unknown_container_and_allocates_nothing(tmp_path: Path) -> None:
    code, out = plugin.run(env("ADD", str(tmp_path / "gone")), stdin(tmp_path), wiring=FakeWiring())
    assert code == 1 and out is not None and out["code"] == ErrorCode.UNKNOWN_CONTAINER
    assert ipam(tmp_path).list() == []


def test_add_failure_rolls_back(tmp_path: Path, netns: str) -> None:
    fake = FakeWiring()
    fake.fail_add = CniError(ErrorCode.IO_FAILURE, "wiring host.link.add_veth: failed", "EEXIST")
    code, out = plugin.run(env("ADD", netns), stdin(tmp_path), wiring=fake)
    assert code == 1 and out is not None
    assert out == {
        "cniVersion": "1.0.0",
        "code": 5,
        "msg": "wiring host.link.add_veth: failed",
        "details": "EEXIST",
    }
    assert fake.removed and fake.removed[0][0] == pod_interface("x", "a")
    assert ipam(tmp_path).list() == []


def test_unexpected_exception_is_internal_error_and_rolls_back(tmp_path: Path, netns: str) -> None:
    fake = FakeWiring()
    fake.fail_add = RuntimeError("boom")
    code, out = plugin.run(env("ADD", netns), stdin(tmp_path), wiring=fake)
    assert code == 1 and out is not None and out["code"] == ErrorCode.INTERNAL
    assert ipam(tmp_path).list() == []


def test_exhaustion_error(tmp_path: Path, netns: str) -> None:
    fake = FakeWiring()
    for i in range(2):
        assert (
            plugin.run(
                env("ADD", netns, cid=f"c{i}", pod=f"p{i}"),
                stdin(tmp_path, cidr="10.9.0.0/30"),
                wiring=fake,
            )[0]
            == 0
        )
    code, out = plugin.run(
        env("ADD", netns, cid="c9", pod="p9"), stdin(tmp_path, cidr="10.9.0.0/30"), wiring=fake
    )
    assert code == 1 and out is not None
    assert out["code"] == ErrorCode.IP_EXHAUSTED and "10.9.0.0/30" in out["msg"]
    assert "p9" not in {link.host_ifname for link in fake.links.values()}


def test_bad_stdin_is_decode_error_and_touches_nothing(tmp_path: Path, netns: str) -> None:
    fake = FakeWiring()
    code, out = plugin.run(env("ADD", netns), b"{oops", wiring=fake)
    assert code == 1 and out is not None and out["code"] == ErrorCode.DECODE_FAILURE
    assert set(out) <= {"cniVersion", "code", "msg", "details"}
    assert fake.links == {} and not (tmp_path / "ipam").exists()


def test_del_releases_and_is_idempotent(tmp_path: Path, netns: str) -> None:
    fake = FakeWiring()
    _, out = plugin.run(env("ADD", netns), stdin(tmp_path), wiring=fake)
    assert out is not None
    assert plugin.run(env("DEL", netns), stdin(tmp_path), wiring=fake) == (0, None)
    assert fake.removed[-1] == (
        pod_interface("x", "a"),
        ipaddress.IPv4Address(out["ips"][0]["address"][:-3]),
    )
    assert ipam(tmp_path).list() == []
    removed = len(fake.removed)
    assert plugin.run(env("DEL", netns), stdin(tmp_path), wiring=fake) == (0, None)
    assert len(fake.removed) == removed  # unknown container: nothing touched


def test_del_without_netns(tmp_path: Path, netns: str) -> None:
    fake = FakeWiring()
    plugin.run(env("ADD", netns), stdin(tmp_path), wiring=fake)
    e = env("DEL", netns)
    del e["CNI_NETNS"]
    assert plugin.run(e, stdin(tmp_path), wiring=fake) == (0, None)
    assert ipam(tmp_path).list() == []


def test_del_of_old_sandbox_keeps_new_sandboxes_interface(tmp_path: Path, netns: str) -> None:
    fake = FakeWiring()
    plugin.run(env("ADD", netns, cid="old"), stdin(tmp_path), wiring=fake)
    plugin.run(env("ADD", netns, cid="new"), stdin(tmp_path), wiring=fake)
    plugin.run(env("DEL", netns, cid="old"), stdin(tmp_path), wiring=fake)
    assert fake.removed[-1][0] == ""  # the shared host-side name was not deleted
    assert [r.container_id for r in ipam(tmp_path).list()] == ["new"]


def test_check(tmp_path: Path, netns: str) -> None:
    fake = FakeWiring()
    _, out = plugin.run(env("ADD", netns), stdin(tmp_path), wiring=fake)
    assert plugin.run(env("CHECK", netns), stdin(tmp_path, prevResult=out), wiring=fake) == (
        0,
        None,
    )
    wrong = dict(out or {}, ips=[{"address": "10.0.0.1/32", "interface": 1}])
    code, err = plugin.run(env("CHECK", netns), stdin(tmp_path, prevResult=wrong), wiring=fake)
    assert code == 1 and err is not None and err["code"] == ErrorCode.CHECK_FAILED
    fake.links.clear()
    code, err = plugin.run(env("CHECK", netns), stdin(tmp_path), wiring=fake)
    assert err is not None and err["code"] == ErrorCode.CHECK_FAILED
    code, err = plugin.run(env("CHECK", netns, cid="nope"), stdin(tmp_path), wiring=fake)
    assert err is not None and err["code"] == ErrorCode.UNKNOWN_CONTAINER
    code, err = plugin.run(env("CHECK", netns), stdin(tmp_path, version="0.3.1"), wiring=fake)
    assert (
        err is not None
        and err["code"] == ErrorCode.INCOMPATIBLE_VERSION
        and err["cniVersion"] == "0.3.1"
    )


def test_version_command() -> None:
    code, out = plugin.run({"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "0.4.0"}')
    assert code == 0 and out is not None
    assert out["cniVersion"] == "0.4.0" and "1.0.0" in out["supportedVersions"]
    assert plugin.run({"CNI_COMMAND": "VERSION"}, b"")[1] is not None


def test_gc_releases_stale_attachments(tmp_path: Path, netns: str) -> None:
    fake = FakeWiring()
    for cid, pod in (("keep", "a"), ("stale", "b")):
        plugin.run(
            env("ADD", netns, cid=cid, pod=pod), stdin(tmp_path, version="1.1.0"), wiring=fake
        )
    valid = [{"containerID": "keep", "ifname": "eth0"}]
    gc = stdin(tmp_path, version="1.1.0", **{"cni.dev/valid-attachments": valid})
    assert plugin.run({"CNI_COMMAND": "GC"}, gc, wiring=fake) == (0, None)
    assert [r.container_id for r in ipam(tmp_path).list()] == ["keep"]
    assert fake.removed[-1][0] == pod_interface("x", "b")
    code, out = plugin.run({"CNI_COMMAND": "GC"}, stdin(tmp_path), wiring=fake)
    assert code == 1 and out is not None and out["code"] == ErrorCode.INCOMPATIBLE_VERSION


def test_status(tmp_path: Path, netns: str) -> None:
    fake = FakeWiring()
    conf = stdin(tmp_path, version="1.1.0", cidr="10.9.0.0/30")
    assert plugin.run({"CNI_COMMAND": "STATUS"}, conf, wiring=fake) == (0, None)
    for i in range(2):
        plugin.run(env("ADD", netns, cid=f"c{i}", pod=f"p{i}"), conf, wiring=fake)
    code, out = plugin.run({"CNI_COMMAND": "STATUS"}, conf, wiring=fake)
    assert code == 1 and out is not None and out["code"] == ErrorCode.PLUGIN_NOT_AVAILABLE
