"""Golden tests of the exabgp.conf / exabgp.env renderer; rendered configs are
also checked by `exabgp validate` (ExaBGP 5.0.15 is a project dependency)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from felix_lite.bgp.config import BgpConfigError, BgpPeer, BgpSettings, render_config, render_env

BRIDGE = ("/usr/bin/python3", "-m", "felix_lite.bgp.bridge", "/run/felix-lite/bgp.sock")


def _settings(**kw: object) -> BgpSettings:
    base: dict[str, object] = {
        "node_name": "node-1",
        "router_id": "10.99.0.11",
        "local_asn": 65001,
        "local_address": "10.99.0.11",
        "peers": (BgpPeer(address="10.99.0.1", asn=65000),),
        "pod_cidrs": ("10.244.0.0/16",),
        "node_block": "10.244.1.0/24",
    }
    base.update(kw)
    return BgpSettings(**base)  # type: ignore[arg-type]


GOLDEN = """\
# rendered by felix-lite for node node-1; do not edit
process felix-lite {
    run /usr/bin/python3 -m felix_lite.bgp.bridge /run/felix-lite/bgp.sock;
    encoder json;
}

neighbor 10.99.0.1 {
    description "node-1";
    router-id 10.99.0.11;
    local-address 10.99.0.11;
    local-as 65001;
    peer-as 65000;
    hold-time 90;
    passive false;
    manual-eor true;
    adj-rib-out true;
    family {
        ipv4 unicast;
    }
    capability {
        graceful-restart 120;
        route-refresh enable;
    }
    api {
        processes [ felix-lite ];
        neighbor-changes;
        receive {
            parsed;
            update;
            notification;
            refresh;
        }
    }
}
"""


def test_golden_single_peer() -> None:
    assert render_config(_settings(), bridge_command=BRIDGE) == GOLDEN


def test_peer_options_rendered() -> None:
    peer = BgpPeer(
        address="192.0.2.1",
        asn=64512,
        password="s3cr3t-key",
        multihop_ttl=4,
        hold_time=30,
        graceful_restart=None,
        passive=True,
        local_address="10.99.0.99",
    )
    out = render_config(_settings(peers=(peer,), listen=True), bridge_command=BRIDGE)
    block = out[out.index("neighbor 192.0.2.1") :]
    for line in (
        "local-address 10.99.0.99;",
        "peer-as 64512;",
        "hold-time 30;",
        "passive true;",
        "outgoing-ttl 4;",
        'md5-password "s3cr3t-key";',
        "graceful-restart disable;",
    ):
        assert f"    {line}" in block


def test_env_golden() -> None:
    out = render_env(_settings(env={"exabgp.daemon.user": "root"}))
    assert out == (
        "[exabgp.api]\nack = true\ncli = false\nencoder = json\nrespawn = true\n\n"
        "[exabgp.daemon]\ndaemonize = false\nuser = root\n\n"
        "[exabgp.log]\ndestination = stderr\nlevel = INFO\nprocesses = false\n"
        "statistics = false\n\n"
        "[exabgp.tcp]\nbind = ''\nport = 179\n"
    )
    assert "bind = 10.99.0.11" in render_env(_settings(listen=True))


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"router_id": "x"}, "bgpsettings node-1: router_id: 'x' is not an IPv4 address"),
        ({"local_asn": 0}, "bgpsettings node-1: local_asn: 0 is not an ASN"),
        ({"pod_cidrs": ("10.0.0.1/8",)}, "bgpsettings node-1: pod_cidrs[0]: "),
        (
            {"peers": (BgpPeer("10.0.0.1", 1), BgpPeer("10.0.0.1", 2))},
            "bgpsettings node-1: peers[1].address: duplicate peer 10.0.0.1",
        ),
        ({"peers": (BgpPeer("10.0.0.1", 1, hold_time=2),)}, "peers[0].hold_time: must be 0"),
        ({"peers": (BgpPeer("10.0.0.1", 1, password='a"b'),)}, "peers[0].password: must be"),
        ({"peers": (BgpPeer("10.0.0.1", 1, multihop_ttl=0),)}, "peers[0].multihop_ttl"),
        ({"peers": (BgpPeer("10.0.0.1", 1, max_prefix=0),)}, "peers[0].max_prefix"),
        ({"peers": (BgpPeer("10.0.0.1", 1, passive=True),)}, "peers[0].passive: a passive"),
        ({"env": {"exabgp.x": "1"}}, "env['exabgp.x']"),
    ],
)
def test_bad_settings_name_the_field(kw: dict[str, object], message: str) -> None:
    with pytest.raises(BgpConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        s = _settings(**kw)
        render_config(s, bridge_command=BRIDGE)
        render_env(s)


def test_relative_bridge_path_rejected() -> None:
    with pytest.raises(BgpConfigError, match="absolute path"):
        render_config(_settings(), bridge_command=("python3", "-m", "x"))


VALIDATE_CASES = {
    "single": _settings(),
    "md5-multihop-two-peers": _settings(
        peers=(
            BgpPeer("10.99.0.1", 65000, password="s3cret", multihop_ttl=2, hold_time=30),
            BgpPeer("10.99.0.12", 65001, graceful_restart=None, hold_time=0),
        )
    ),
    "passive-listen-ibgp": _settings(
        listen=True,
        peers=(BgpPeer("10.99.0.12", 65001, passive=True, local_address="10.99.0.11"),),
    ),
    "no-peers": _settings(peers=()),
}


@pytest.mark.skipif(shutil.which("exabgp") is None, reason="exabgp not installed")
@pytest.mark.parametrize("name", sorted(VALIDATE_CASES))
def test_exabgp_validate_accepts_rendered(name: str, tmp_path: Path) -> None:
    settings = VALIDATE_CASES[name]
    conf = tmp_path / "exabgp.conf"
    env = tmp_path / "exabgp.env"
    conf.write_text(render_config(settings, bridge_command=BRIDGE))
    env.write_text(render_env(settings))
    r = subprocess.run(
        ["exabgp", "--env-file", str(env), "validate", str(conf)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(shutil.which("exabgp") is None, reason="exabgp not installed")
def test_exabgp_validate_rejects_broken(tmp_path: Path) -> None:
    """Guards the test above against a validator that accepts anything."""
    conf = tmp_path / "exabgp.conf"
    conf.write_text(
        render_config(_settings(), bridge_command=BRIDGE).replace("manual-eor", "manual-eorr")
    )
    r = subprocess.run(["exabgp", "validate", str(conf)], capture_output=True, timeout=60)
    assert r.returncode != 0
