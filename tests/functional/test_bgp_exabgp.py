"""Real ExaBGP 5 sidecars + the bridge + Speaker against a real BIRD 2 ToR.

Topology (all inside namespaces created here, no link to the root namespace):
ToR `flbt` has a Linux bridge br0 (10.99.0.1/24); nodes `flb1`, `flb2`, `flb3`
each have eth0 (10.99.0.1N/24) on it. eBGP, one AS per node, ToR AS 65000.
node-1 uses an MD5 password, node-3 a wrong one.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from felix_lite.bgp.config import BgpPeer, BgpSettings
from felix_lite.bgp.messages import PeerState
from felix_lite.bgp.process import ExabgpProcess, write_files
from felix_lite.bgp.speaker import Speaker
from felix_lite.procs import stop_procs
from felix_lite.waiting import wait_until

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(
        not (shutil.which("bird") and shutil.which("exabgp")), reason="needs bird and exabgp"
    ),
]

log = logging.getLogger(__name__)

TOR = "flbt"
TOR_IP = "10.99.0.1"
TOR_ASN = 65000
POD_CIDR = "10.244.0.0/16"
PASSWORD = "s3cret"
NODES = {1: "flb1", 2: "flb2", 3: "flb3"}

BIRD_CONF = """
router id 10.99.0.1;
log "{log}" all;
protocol device {{}}
protocol static tor_routes {{
  ipv4;
  route 10.200.0.0/24 blackhole;   # outside the pod CIDRs: must be filtered
  route 10.244.2.9/32 blackhole;   # node-2's own pod, in its block: filtered
  route 10.244.9.9/32 blackhole;   # node-2's own pod outside its block: filtered
  route 10.244.3.7/32 blackhole;   # a legitimate remote pod: accepted
}}
template bgp node {{
  local 10.99.0.1 as 65000;
  hold time 30;
  graceful restart on;
  ipv4 {{ import all; export all; }};
}}
protocol bgp n1 from node {{ neighbor 10.99.0.11 as 65001; password "s3cret"; }}
protocol bgp n2 from node {{ neighbor 10.99.0.12 as 65002; }}
protocol bgp n3 from node {{ neighbor 10.99.0.13 as 65003; password "s3cret"; }}
"""


def sh(*args: str, check: bool = True) -> str:
    r = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: rc={r.returncode} {r.stderr.strip()}")
    return r.stdout


@dataclass
class Recorder:
    """The route installer's side of on_routes: a RIB plus a log of every call."""

    routes: dict[str, dict[str, str]] = field(default_factory=dict)
    withdrawn_log: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(
        self, peer: str, announced: Mapping[str, str], withdrawn: AbstractSet[str]
    ) -> None:
        with self.lock:
            rib = self.routes.setdefault(peer, {})
            for p in withdrawn:
                rib.pop(p, None)
            self.withdrawn_log.extend(withdrawn)
            rib.update(announced)

    def get(self, prefix: str) -> str | None:
        with self.lock:
            for rib in self.routes.values():
                if prefix in rib:
                    return rib[prefix]
        return None

    def count(self, prefixes: AbstractSet[str]) -> int:
        with self.lock:
            have: set[str] = set()
            for rib in self.routes.values():
                have |= rib.keys() & prefixes
            return len(have)


@dataclass
class Node:
    index: int
    netns: str
    settings: BgpSettings
    socket_path: str
    workdir: Path
    recorder: Recorder
    speaker: Speaker
    exabgp: ExabgpProcess

    @property
    def address(self) -> str:
        return self.settings.local_address

    def new_speaker(self) -> None:
        self.recorder = Recorder()
        self.speaker = Speaker(self.settings, self.socket_path, on_routes=self.recorder)
        self.speaker.start()

    def peer_state(self) -> PeerState:
        return self.speaker.status().peers[0].state


@dataclass
class Fabric:
    workdir: Path
    bird: subprocess.Popen[bytes]
    bird_ctl: str
    nodes: dict[int, Node]

    def birdc(self, *args: str) -> str:
        return sh("birdc", "-s", self.bird_ctl, *args)

    def bird_prefixes(self, protocol: str) -> set[str]:
        out = self.birdc("show", "route", "protocol", protocol)
        return set(re.findall(r"^(\d+\.\d+\.\d+\.\d+/\d+)", out, re.M))

    def bird_count(self, protocol: str) -> int:
        out = self.birdc("show", "route", "protocol", protocol, "count")
        m = re.search(r"(\d+) of \d+ routes", out)
        return int(m.group(1)) if m else 0

    def established(self, protocol: str) -> bool:
        return "Established" in self.birdc("show", "protocols", protocol)


def _node_settings(i: int, password: str | None) -> BgpSettings:
    return BgpSettings(
        node_name=f"node-{i}",
        router_id=f"10.99.0.1{i}",
        local_asn=65000 + i,
        local_address=f"10.99.0.1{i}",
        peers=(
            BgpPeer(
                address=TOR_IP, asn=TOR_ASN, password=password, hold_time=30, graceful_restart=60
            ),
        ),
        pod_cidrs=(POD_CIDR,),
        node_block=f"10.244.{i}.0/24",
        # the bridge runs as root here so it can reach a socket under pytest's
        # 0700 tmp dir; see docs/bgp.md for the unprivileged set-up
        env={"exabgp.daemon.user": "root", "exabgp.log.level": "INFO"},
    )


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fabric]:
    workdir = tmp_path_factory.mktemp("flb")
    made: list[str] = []
    procs: list[ExabgpProcess] = []
    speakers: list[Speaker] = []
    bird: subprocess.Popen[bytes] | None = None
    nodes: dict[int, Node] = {}
    try:
        for ns in (TOR, *NODES.values()):
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", TOR, "link", "add", "br0", "type", "bridge")
        for i, ns in NODES.items():
            sh(
                "ip",
                "-n",
                ns,
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                f"n{i}",
                "netns",
                TOR,
            )
            sh("ip", "-n", TOR, "link", "set", f"n{i}", "master", "br0")
            sh("ip", "-n", TOR, "link", "set", f"n{i}", "up")
            sh("ip", "-n", ns, "addr", "add", f"10.99.0.1{i}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", TOR, "addr", "add", f"{TOR_IP}/24", "dev", "br0")
        sh("ip", "-n", TOR, "link", "set", "br0", "up")

        conf = workdir / "bird.conf"
        conf.write_text(BIRD_CONF.format(log=workdir / "bird.log"))
        ctl = str(workdir / "bird.ctl")
        bird = subprocess.Popen(
            ["ip", "netns", "exec", TOR, "bird", "-f", "-c", str(conf), "-s", ctl],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_until(lambda: os.path.exists(ctl), 10, "bird control socket")

        for i, ns in NODES.items():
            settings = _node_settings(i, {1: PASSWORD, 2: None, 3: "wrong-password"}[i])
            ndir = workdir / f"node{i}"
            sock = str(ndir / "bgp.sock")
            files = write_files(settings, ndir, socket_path=sock)
            rec = Recorder()
            speaker = Speaker(settings, sock, on_routes=rec)
            speaker.start()
            speakers.append(speaker)
            proc = ExabgpProcess(files, netns=ns)
            proc.start()
            procs.append(proc)
            nodes[i] = Node(i, ns, settings, sock, ndir, rec, speaker, proc)
        fab = Fabric(workdir, bird, ctl, nodes)
        wait_until(lambda: fab.established("n1") and fab.established("n2"), 30, "sessions")
        yield fab
    finally:
        for node in nodes.values():
            node.speaker.stop()
            node.exabgp.stop()
        for p in procs:
            p.stop()
        for s in speakers:
            s.stop()
        if bird is not None:
            stop_procs([bird])
        for ns in made:
            sh("ip", "netns", "del", ns, check=False)


def test_sessions_established_and_status(fabric: Fabric) -> None:
    n1, n2 = fabric.nodes[1], fabric.nodes[2]
    wait_until(
        lambda: n1.peer_state() is PeerState.UP and n2.peer_state() is PeerState.UP, 15, "up"
    )
    st = n1.speaker.status()
    assert st.bridge_connected
    assert st.peers[0].address == TOR_IP and st.peers[0].asn == TOR_ASN
    assert st.peers[0].uptime is not None and st.peers[0].uptime >= 0


def test_announce_reaches_bird_and_other_node(fabric: Fabric) -> None:
    n1, n2 = fabric.nodes[1], fabric.nodes[2]
    pods = ["10.244.1.2", "10.244.1.3", "10.244.1.4"]
    n1.speaker.set_local_pods(pods)
    assert n1.speaker.wait_synced(20)
    want = {p + "/32" for p in pods}
    wait_until(lambda: want <= fabric.bird_prefixes("n1"), 15, "routes in BIRD")
    wait_until(lambda: n2.recorder.count(want) == 3, 15, "routes at node-2")
    for p in want:
        # third-party next hop: node-1 and node-2 share the ToR's segment
        assert n2.recorder.get(p) == n1.address


def test_withdraw_reaches_bird_and_other_node(fabric: Fabric) -> None:
    n1, n2 = fabric.nodes[1], fabric.nodes[2]
    n1.speaker.set_local_pods(["10.244.1.2", "10.244.1.3", "10.244.1.4"])
    wait_until(lambda: n2.recorder.get("10.244.1.4/32") is not None, 15, "announce")
    n1.speaker.set_local_pods(["10.244.1.2"])
    assert n1.speaker.wait_synced(20)
    wait_until(lambda: "10.244.1.4/32" not in fabric.bird_prefixes("n1"), 15, "BIRD withdraw")
    assert "10.244.1.2/32" in fabric.bird_prefixes("n1")
    wait_until(lambda: n2.recorder.get("10.244.1.3/32") is None, 15, "node-2 withdraw")
    assert n2.recorder.get("10.244.1.2/32") == n1.address


def test_import_filter_drops_foreign_and_own(fabric: Fabric) -> None:
    n2 = fabric.nodes[2]
    n2.speaker.set_local_pods(["10.244.2.9", "10.244.9.9"])
    # the legitimate remote pod proves the ToR's routes did arrive
    wait_until(lambda: n2.recorder.get("10.244.3.7/32") == TOR_IP, 15, "accepted route")
    n2.speaker.wait_synced(20)
    assert n2.recorder.get("10.200.0.0/24") is None  # outside pod CIDRs
    assert n2.recorder.get("10.244.2.9/32") is None  # own pod, own block
    assert n2.recorder.get("10.244.9.9/32") is None  # own pod outside the block
    st = n2.speaker.status().peers[0]
    assert st.rejected >= 2
    assert st.accepted >= 1


def test_md5_wrong_password_gives_no_session(fabric: Fabric) -> None:
    n1, n3 = fabric.nodes[1], fabric.nodes[3]
    assert fabric.established("n1")  # right password: up
    assert n1.peer_state() is PeerState.UP

    def md5_failures() -> int:
        out = sh("ip", "netns", "exec", TOR, "nstat", "-az", "TcpExtTCPMD5Failure")
        m = re.search(r"TcpExtTCPMD5Failure\s+(\d+)", out)
        return int(m.group(1)) if m else 0

    wait_until(lambda: md5_failures() > 0, 20, "MD5 failures on the ToR")
    assert not fabric.established("n3")
    assert n3.peer_state() is not PeerState.UP


def test_agent_restart_relearns_routes(fabric: Fabric) -> None:
    """A new Speaker on the same socket (agent restart): the bridge reconnects,
    the speaker re-announces and asks for a route refresh."""
    n1 = fabric.nodes[1]
    n1.speaker.set_local_pods(["10.244.1.2"])
    assert n1.speaker.wait_synced(20)
    n1.speaker.stop()
    n1.new_speaker()
    n1.speaker.set_local_pods(["10.244.1.2"])
    wait_until(lambda: n1.recorder.get("10.244.3.7/32") == TOR_IP, 20, "relearned route")
    assert n1.speaker.wait_synced(20)
    assert "10.244.1.2/32" in fabric.bird_prefixes("n1")


def test_exabgp_restart_keeps_routes_graceful_restart(fabric: Fabric) -> None:
    n1, n2 = fabric.nodes[1], fabric.nodes[2]
    n1.speaker.set_local_pods(["10.244.1.2", "10.244.1.3"])
    assert n1.speaker.wait_synced(20)
    wait_until(lambda: n2.recorder.get("10.244.1.3/32") is not None, 15, "announce")
    n2.recorder.withdrawn_log.clear()
    n1_learned_withdrawn = len(n1.recorder.withdrawn_log)

    n1.exabgp.kill()
    wait_until(lambda: not fabric.established("n1"), 15, "session down on the ToR")
    # graceful restart: the ToR keeps node-1's routes as stale
    assert {"10.244.1.2/32", "10.244.1.3/32"} <= fabric.bird_prefixes("n1")
    # meanwhile a pod goes and one comes; only End-of-RIB can flush the old one
    n1.speaker.set_local_pods(["10.244.1.3", "10.244.1.6"])
    n1.exabgp.start()
    wait_until(lambda: fabric.established("n1"), 30, "session back")
    wait_until(
        lambda: fabric.bird_prefixes("n1") == {"10.244.1.3/32", "10.244.1.6/32"},
        30,
        "re-announce + EOR flushing the stale route",
    )
    assert n1.speaker.wait_synced(20)
    wait_until(lambda: n2.recorder.get("10.244.1.2/32") is None, 15, "node-2 drops it")
    assert n2.recorder.get("10.244.1.6/32") == n1.address
    # the unchanged route never flapped at node-2, learned routes stayed at node-1
    assert "10.244.1.3/32" not in n2.recorder.withdrawn_log
    assert n1.recorder.get("10.244.3.7/32") == TOR_IP
    assert "10.244.3.7/32" not in n1.recorder.withdrawn_log[n1_learned_withdrawn:]


@pytest.mark.slow
def test_bulk_10k(fabric: Fabric, capsys: pytest.CaptureFixture[str]) -> None:
    n1, n2 = fabric.nodes[1], fabric.nodes[2]
    n1.speaker.set_local_pods([])
    assert n1.speaker.wait_synced(30)
    pods = [f"10.244.{64 + i // 250}.{1 + i % 250}" for i in range(10_000)]
    want = {p + "/32" for p in pods}
    t0 = time.monotonic()
    n1.speaker.set_local_pods(pods)
    wait_until(lambda: n2.recorder.count(want) == len(want), 120, "10k at node-2")
    announce = time.monotonic() - t0
    assert all(n2.recorder.get(p) == n1.address for p in list(want)[:100])
    assert fabric.bird_count("n1") >= 10_000
    t1 = time.monotonic()
    n1.speaker.set_local_pods([])
    wait_until(lambda: n2.recorder.count(want) == 0, 120, "10k withdrawn at node-2")
    withdraw = time.monotonic() - t1
    with capsys.disabled():
        print(
            f"\nbgp.bulk10k announce_to_node2_s={announce:.2f} withdraw_s={withdraw:.2f}",
            file=sys.stderr,
        )
