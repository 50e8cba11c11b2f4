"""ToR router configurations (BIRD, FRR, GoBGP): what they say, and that each
router's own parser accepts them (`bird -p`, `bgpd --dryrun`, `gobgpd -d`, run in
a throwaway network namespace; skipped where the binary is missing)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from felix_lite.fabric.routers import (
    RouterError,
    StaticRoute,
    TorConfig,
    TorPeer,
    render_bird,
    render_frr,
    render_gobgp,
)

PER_NODE = TorConfig(
    router_id="10.10.254.1",
    asn=65000,
    peers=(
        TorPeer("n1", "10.10.1.2", 65001, "10.10.1.1", password="s3cret"),
        TorPeer("n2", "10.10.2.2", 65002, "10.10.2.1"),
    ),
    static=(StaticRoute("10.200.0.0/24"),),
)
PER_RACK = TorConfig(
    router_id="10.10.254.1",
    asn=65100,
    peers=(
        TorPeer("n1", "10.10.1.2", 65100, "10.10.1.1", rr_client=True),
        TorPeer("n2", "10.10.2.2", 65100, "10.10.2.1", rr_client=True),
    ),
)


def test_bird_says_what_the_fabric_needs() -> None:
    text = render_bird(PER_NODE, log_path="/tmp/x.log")
    assert "router id 10.10.254.1;" in text
    assert "10.10.1.2" in text and "65001" in text and "s3cret" in text
    assert "10.10.2.2" in text and "65002" in text
    rr = render_bird(PER_RACK, log_path="/tmp/x.log")
    assert "rr client" in rr


def test_frr_says_what_the_fabric_needs() -> None:
    text = render_frr(PER_NODE, log_path="/tmp/x.log")
    assert "router bgp 65000" in text
    assert "neighbor 10.10.1.2 remote-as 65001" in text
    assert "neighbor 10.10.1.2 password s3cret" in text
    assert "neighbor 10.10.1.2 solo" in text  # never reflect a node's own prefixes back
    assert "no bgp ebgp-requires-policy" in text
    assert "route-reflector-client" in render_frr(PER_RACK, log_path="/tmp/x.log")


def test_gobgp_says_what_the_fabric_needs() -> None:
    text = render_gobgp(PER_NODE)
    assert "65000" in text and "10.10.1.2" in text and "65001" in text
    assert "s3cret" in text
    assert "route-reflector-client = true" in render_gobgp(PER_RACK)


@pytest.mark.parametrize(
    ("peer", "field"),
    [
        (TorPeer("bad name", "10.0.0.2", 65001, "10.0.0.1"), "name"),
        (TorPeer("n1", "10.0.0.2", 65001, "10.0.0.1", password='a"b'), "password"),
        (TorPeer("n1", "10.0.0.2", 65001, "10.0.0.1", rr_client=True), "rr_client"),
    ],
)
def test_bad_peers_are_refused_naming_the_field(peer: TorPeer, field: str) -> None:
    with pytest.raises(RouterError, match=rf"peers\[0\]\.{field}"):
        render_bird(TorConfig("10.0.0.1", 65000, (peer,)), log_path="/tmp/x.log")


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root (a throwaway network namespace)")
    name = f"flrv{os.getpid() % 10000}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def _check(netns: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    if shutil.which(argv[0]) is None and not Path(argv[0]).exists():
        pytest.skip(f"{argv[0]} not installed")
    return subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True,
                          text=True, timeout=30, check=False)  # fmt: skip


@pytest.mark.kernel
@pytest.mark.parametrize("cfg", [PER_NODE, PER_RACK], ids=["as-per-node", "as-per-rack"])
def test_the_routers_own_parsers_accept_them(netns: str, tmp_path: Path, cfg: TorConfig) -> None:
    tmp_path.chmod(0o777)  # FRR drops to its own user and must open its log file
    bird = tmp_path / "bird.conf"
    bird.write_text(render_bird(cfg, log_path=str(tmp_path / "bird.log")))
    r = _check(netns, ["bird", "-p", "-c", str(bird)])
    assert r.returncode == 0, r.stderr

    frr = tmp_path / "frr.conf"
    frr.write_text(render_frr(cfg, log_path=str(tmp_path / "frr.log")))
    r = _check(netns, ["/usr/lib/frr/bgpd", "--dryrun", "-f", str(frr)])
    # bgpd --dryrun exits 0 even on a bad line; it reports "... on config line N".
    assert r.returncode == 0 and "config line" not in r.stdout + r.stderr, r.stdout + r.stderr

    gobgp = tmp_path / "gobgp.toml"
    gobgp.write_text(render_gobgp(cfg))
    r = _check(netns, ["gobgpd", "-f", str(gobgp), "-d"])
    assert r.returncode == 0 and "Finished reading the config file" in r.stdout + r.stderr, (
        r.stdout + r.stderr
    )
