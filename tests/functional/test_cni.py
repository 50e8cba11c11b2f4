"""felix-lite-cni against the real kernel, inside throwaway network namespaces.

Topology per test: a node namespace (the plugin runs there, as a runtime would
run it on a node) with an uplink veth to an `up` namespace that serves as its
default route (proxy ARP needs one), and pod namespaces wired by the plugin.
Nothing is linked to the root namespace. Names start with `flc`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from felix_lite.rtproto import PROTO_LOCAL_POD
from policy.names import pod_interface

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(
        os.geteuid() != 0 or not shutil.which("ip"), reason="needs root and iproute2"
    ),
]

CNI_BIN = Path("/usr/lib/cni")
NODE_UPLINK_IP = "10.99.0.1"
UP_IP = "10.99.0.2"


def sh(*cmd: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True, **kw)


def ns_exec(ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", ns, *cmd, check=check)


@dataclass
class Lab:
    tag: str
    tmp: Path
    node: str = ""
    up: str = ""
    pods: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    bin_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.node = f"flcn{self.tag}"
        self.up = f"flcu{self.tag}"
        self.bin_dir = self.tmp / "bin"
        self.bin_dir.mkdir()
        wrapper = self.bin_dir / "felix-lite"
        # What the `felix-lite-cni` console script does, without the pyenv shim.
        wrapper.write_text(f"#!{sys.executable}\nfrom felix_lite.cni.plugin import main\nmain()\n")
        wrapper.chmod(0o755)

    @property
    def data_dir(self) -> Path:
        return self.tmp / "ipam"

    def build(self) -> None:
        for ns in (self.node, self.up):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        for key in ("all", "default"):
            ns_exec(self.node, "sysctl", "-qw", f"net.ipv4.conf.{key}.rp_filter=0")
        ns_exec(self.node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        sh(
            "ip",
            "-n",
            self.node,
            "link",
            "add",
            "up0",
            "type",
            "veth",
            "peer",
            "name",
            "dn0",
            "netns",
            self.up,
        )
        sh("ip", "-n", self.node, "addr", "add", f"{NODE_UPLINK_IP}/30", "dev", "up0")
        sh("ip", "-n", self.up, "addr", "add", f"{UP_IP}/30", "dev", "dn0")
        sh("ip", "-n", self.node, "link", "set", "up0", "up")
        sh("ip", "-n", self.up, "link", "set", "dn0", "up")
        sh("ip", "-n", self.node, "route", "add", "default", "via", UP_IP)

    def pod_ns(self) -> str:
        name = f"flcp{self.tag}{len(self.pods)}"
        sh("ip", "netns", "add", name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        self.pods.append(name)
        return name

    def start(self, ns: str, *cmd: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.procs.append(proc)
        return proc

    def teardown(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)
        for ns in [*self.pods, self.node, self.up]:
            sh("ip", "netns", "del", ns, check=False)

    def conf(
        self, cidr: str = "10.244.1.0/24", version: str = "1.0.0", **extra: Any
    ) -> dict[str, Any]:
        return {
            "cniVersion": version,
            "name": "k8s-pod-network",
            "type": "felix-lite",
            "ipam": {"podCIDR": cidr, "dataDir": str(self.data_dir)},
            **extra,
        }

    def env(self, command: str, *, cid: str, pod_ns: str | None, pod: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            CNI_COMMAND=command,
            CNI_CONTAINERID=cid,
            CNI_NETNS=f"/var/run/netns/{pod_ns}" if pod_ns else "",
            CNI_IFNAME="eth0",
            CNI_ARGS=f"IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME={pod}",
            CNI_PATH=f"{self.bin_dir}:{CNI_BIN}",
        )
        return env

    def plugin(
        self,
        command: str,
        conf: dict[str, Any] | bytes,
        *,
        cid: str,
        pod_ns: str | None,
        pod: str,
        binary: str = "felix-lite",
    ) -> tuple[int, dict[str, Any] | None]:
        data = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
        exe = self.bin_dir / binary if binary == "felix-lite" else CNI_BIN / binary
        proc = subprocess.run(
            ["ip", "netns", "exec", self.node, str(exe)],
            input=data,
            capture_output=True,
            env=self.env(command, cid=cid, pod_ns=pod_ns, pod=pod),
            timeout=60,
        )
        out = json.loads(proc.stdout) if proc.stdout.strip() else None
        return proc.returncode, out

    def add(self, pod_ns: str, pod: str, **kw: Any) -> dict[str, Any]:
        rc, out = self.plugin("ADD", self.conf(**kw), cid=f"cid-{pod}", pod_ns=pod_ns, pod=pod)
        assert rc == 0, out
        assert out is not None
        return out

    def allocations(self) -> list[str]:
        d = self.data_dir / "k8s-pod-network"
        return sorted(p.name for p in d.iterdir() if p.name[0].isdigit()) if d.exists() else []

    def node_links(self) -> list[str]:
        out = sh("ip", "-n", self.node, "-j", "link", "show").stdout
        return [link["ifname"] for link in json.loads(out)]

    def node_routes(self, proto: int = PROTO_LOCAL_POD) -> list[dict[str, Any]]:
        out = sh("ip", "-n", self.node, "-j", "-d", "route", "show", "proto", str(proto)).stdout
        return list(json.loads(out))


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    tag = f"{os.getpid() % 0xFFFF:04x}"
    lab = Lab(tag=tag, tmp=tmp_path)
    try:
        lab.build()
        yield lab
    finally:
        lab.teardown()


def ip_of(result: dict[str, Any]) -> str:
    return str(result["ips"][0]["address"]).split("/")[0]


def test_add_check_del_round_trip(lab: Lab) -> None:
    pod = lab.pod_ns()
    result = lab.add(pod, "a")
    host = pod_interface("x", "a")
    ip = ip_of(result)
    assert ipaddress.IPv4Address(ip) in ipaddress.IPv4Network("10.244.1.0/24")
    assert result["interfaces"][0]["name"] == host

    # Host side: up, proxy ARP, no delay, no address; /32 scope link, our protocol.
    link = json.loads(sh("ip", "-n", lab.node, "-j", "-d", "addr", "show", "dev", host).stdout)[0]
    assert "UP" in link["flags"] and link["linkinfo"]["info_kind"] == "veth"
    assert [a for a in link["addr_info"] if a["family"] == "inet"] == []
    assert (
        ns_exec(lab.node, "sysctl", "-n", f"net.ipv4.conf.{host}.proxy_arp").stdout.strip() == "1"
    )
    assert (
        ns_exec(lab.node, "sysctl", "-n", f"net.ipv4.neigh.{host}.proxy_delay").stdout.strip()
        == "0"
    )
    routes = lab.node_routes()
    assert [(r["dst"], r["dev"], r["scope"]) for r in routes] == [(ip, host, "link")]

    # Pod side: eth0 with the /32, default via 169.254.1.1 onlink.
    addrs = json.loads(sh("ip", "-n", pod, "-j", "addr", "show", "dev", "eth0").stdout)[0][
        "addr_info"
    ]
    assert [(a["local"], a["prefixlen"]) for a in addrs if a["family"] == "inet"] == [(ip, 32)]
    pod_routes = json.loads(sh("ip", "-n", pod, "-j", "route", "show").stdout)
    default = [r for r in pod_routes if r["dst"] == "default"]
    assert default and default[0]["gateway"] == "169.254.1.1" and "onlink" in default[0]["flags"]
    assert any(r["dst"] == "169.254.1.1" and r.get("scope") == "link" for r in pod_routes)
    assert lab.allocations() == [ip]

    rc, out = lab.plugin("CHECK", lab.conf(prevResult=result), cid="cid-a", pod_ns=pod, pod="a")
    assert (rc, out) == (0, None)
    # CHECK notices a missing route.
    sh("ip", "-n", lab.node, "route", "del", f"{ip}/32")
    rc, out = lab.plugin("CHECK", lab.conf(prevResult=result), cid="cid-a", pod_ns=pod, pod="a")
    assert rc == 1 and out is not None and out["code"] == 103 and "route" in out["msg"]

    rc, out = lab.plugin("DEL", lab.conf(prevResult=result), cid="cid-a", pod_ns=pod, pod="a")
    assert (rc, out) == (0, None)
    assert host not in lab.node_links()
    assert lab.node_routes() == []
    assert lab.allocations() == []
    assert "eth0" not in sh("ip", "-n", pod, "link").stdout
    # Idempotent.
    assert lab.plugin("DEL", lab.conf(), cid="cid-a", pod_ns=pod, pod="a") == (0, None)


def test_del_with_netns_gone(lab: Lab) -> None:
    pod = lab.pod_ns()
    lab.add(pod, "a")
    sh("ip", "netns", "del", pod)
    assert lab.plugin("DEL", lab.conf(), cid="cid-a", pod_ns=pod, pod="a") == (0, None)
    assert lab.allocations() == []
    assert pod_interface("x", "a") not in lab.node_links()
    assert lab.node_routes() == []


def test_add_into_missing_netns_is_unknown_container(lab: Lab) -> None:
    rc, out = lab.plugin("ADD", lab.conf(), cid="cid-z", pod_ns="flcnosuch", pod="z")
    assert rc == 1 and out is not None and out["code"] == 3
    assert lab.allocations() == []
    assert not Path("/var/run/netns/flcnosuch").exists()


def test_concurrent_adds_get_distinct_addresses(lab: Lab) -> None:
    pods = [lab.pod_ns() for _ in range(20)]
    data = json.dumps(lab.conf()).encode()
    procs = []
    for i, ns in enumerate(pods):
        proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.node, str(lab.bin_dir / "felix-lite")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=lab.env("ADD", cid=f"cid-{i}", pod_ns=ns, pod=f"p{i}"),
        )
        procs.append(proc)
    outs = []
    for proc in procs:
        stdout, stderr = proc.communicate(data, timeout=120)
        assert proc.returncode == 0, (stdout, stderr)
        outs.append(json.loads(stdout))
    ips = [ip_of(o) for o in outs]
    assert len(set(ips)) == 20
    assert lab.allocations() == sorted(ips)
    assert sorted(r["dst"] for r in lab.node_routes()) == sorted(ips)
    for i, ns in enumerate(pods):
        assert lab.plugin("DEL", lab.conf(), cid=f"cid-{i}", pod_ns=ns, pod=f"p{i}") == (0, None)
    assert lab.allocations() == [] and lab.node_routes() == []


def test_exhaustion_on_a_slash_29(lab: Lab) -> None:
    pods = [lab.pod_ns() for _ in range(7)]
    ips = [ip_of(lab.add(ns, f"p{i}", cidr="10.244.7.0/29")) for i, ns in enumerate(pods[:6])]
    assert sorted(ips) == [f"10.244.7.{i}" for i in range(1, 7)]
    rc, out = lab.plugin(
        "ADD", lab.conf(cidr="10.244.7.0/29"), cid="cid-p6", pod_ns=pods[6], pod="p6"
    )
    assert rc == 1 and out is not None
    assert out["code"] == 100 and "10.244.7.0/29" in out["msg"]
    assert len(lab.allocations()) == 6
    assert pod_interface("x", "p6") not in lab.node_links()
    assert "eth0" not in sh("ip", "-n", pods[6], "link").stdout


def test_bad_input_gives_cni_error_and_leaks_nothing(lab: Lab) -> None:
    pod = lab.pod_ns()
    rc, out = lab.plugin("ADD", b"{not json", cid="cid-a", pod_ns=pod, pod="a")
    assert (
        rc == 1
        and out is not None
        and out["code"] == 6
        and set(out) <= {"cniVersion", "code", "msg", "details"}
    )
    bad = lab.conf(cidr="10.244.1.0/24")
    bad["ipam"]["podCIDR"] = "10.244.1.5/24"
    rc, out = lab.plugin("ADD", bad, cid="cid-a", pod_ns=pod, pod="a")
    assert rc == 1 and out is not None and out["code"] == 7 and "ipam.podCIDR" in out["msg"]
    # A failure half way (eth0 already taken in the pod) is rolled back.
    sh("ip", "-n", pod, "link", "add", "eth0", "type", "veth", "peer", "name", "eth9")
    rc, out = lab.plugin("ADD", lab.conf(), cid="cid-a", pod_ns=pod, pod="a")
    assert rc == 1 and out is not None and out["code"] == 102
    assert pod_interface("x", "a") not in lab.node_links()
    assert lab.node_routes() == [] and lab.allocations() == []


def wait_listening(ns: str, port: int, *, udp: bool = False) -> None:
    for _ in range(100):
        if f":{port} " in ns_exec(ns, "ss", "-lunH" if udp else "-ltnH").stdout:
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listening on {port} in {ns}")


def serve(lab: Lab, ns: str, port: int, reply: str, *, udp: bool = False) -> None:
    """A one-line server in `ns` that answers every connection (or datagram)."""
    proto = "UDP-RECVFROM" if udp else "TCP-LISTEN"
    # The shell drains its input: a client write after `echo` exited would
    # otherwise hit EPIPE and the reply could be lost.
    lab.start(
        ns,
        "socat",
        "-t5",
        "-T5",
        f"{proto}:{port},reuseaddr,fork",
        f"SYSTEM:echo {reply}; cat >/dev/null",
    )
    wait_listening(ns, port, udp=udp)


def ask(ns: str, ip: str, port: int, *, udp: bool = False) -> str:
    proto = "UDP" if udp else "TCP"
    # UDP has no end of stream: stop waiting 2 s after our datagram went out.
    wait = "-t2" if udp else "-t5"
    got = ns_exec(ns, "sh", "-c", f"echo hi | socat {wait} -T5 - {proto}:{ip}:{port}", check=False)
    return got.stdout.strip()


def test_two_pods_reach_each_other(lab: Lab) -> None:
    p1, p2 = lab.pod_ns(), lab.pod_ns()
    ip1, ip2 = ip_of(lab.add(p1, "a")), ip_of(lab.add(p2, "b"))
    serve(lab, p1, 80, "from-a")
    serve(lab, p2, 80, "from-b")
    serve(lab, p2, 81, "udp-b", udp=True)
    assert ask(p1, ip2, 80) == "from-b"
    assert ask(p2, ip1, 80) == "from-a"
    assert ask(p1, ip2, 81, udp=True) == "udp-b"
    assert ask(lab.node, ip1, 80) == "from-a"  # node -> pod (kubelet probes)


def run_chain(
    lab: Lab,
    command: str,
    conflist: dict[str, Any],
    runtime: dict[str, Any],
    *,
    cid: str,
    pod_ns: str,
    pod: str,
    prev: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """A minimal libcni: run each plugin in order (reverse for DEL), passing prevResult."""
    plugins = conflist["plugins"] if command == "ADD" else list(reversed(conflist["plugins"]))
    result = prev
    for plugin in plugins:
        conf = {"cniVersion": conflist["cniVersion"], "name": conflist["name"], **plugin}
        caps = {
            k: runtime[k] for k, on in plugin.get("capabilities", {}).items() if on and k in runtime
        }
        if caps:
            conf["runtimeConfig"] = caps
        if result is not None:
            conf["prevResult"] = result
        rc, out = lab.plugin(command, conf, cid=cid, pod_ns=pod_ns, pod=pod, binary=plugin["type"])
        assert rc == 0, (plugin["type"], out)
        if command == "ADD":
            assert out is not None, plugin["type"]
            result = out
    return result


def test_chained_with_standard_plugins(lab: Lab) -> None:
    for binary in ("tuning", "portmap", "bandwidth"):
        if not (CNI_BIN / binary).exists():
            pytest.skip(f"{binary} plugin not installed")
    pod = lab.pod_ns()
    conflist = {
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "plugins": [
            {
                "type": "felix-lite",
                "ipam": {"podCIDR": "10.244.3.0/24", "dataDir": str(lab.data_dir)},
            },
            {"type": "tuning", "sysctl": {"net.core.somaxconn": "777"}},
            {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
            {"type": "bandwidth", "capabilities": {"bandwidth": True}},
        ],
    }
    runtime = {
        "portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}],
        "bandwidth": {
            "ingressRate": 100_000_000,
            "ingressBurst": 1_000_000,
            "egressRate": 100_000_000,
            "egressBurst": 1_000_000,
        },
    }
    result = run_chain(lab, "ADD", conflist, runtime, cid="cid-a", pod_ns=pod, pod="a")
    assert result is not None
    ip = ip_of(result)
    host = pod_interface("x", "a")
    assert ns_exec(pod, "sysctl", "-n", "net.core.somaxconn").stdout.strip() == "777"
    nat = ns_exec(lab.node, "iptables-save", "-t", "nat").stdout
    assert f"--to-destination {ip}:80" in nat
    qdisc = sh("ip", "netns", "exec", lab.node, "tc", "qdisc", "show", "dev", host).stdout
    assert "tbf" in qdisc

    # The host port really forwards: from the uplink namespace to the node's address.
    serve(lab, pod, 80, "via-portmap")
    assert ask(lab.up, NODE_UPLINK_IP, 8080) == "via-portmap"

    run_chain(lab, "DEL", conflist, runtime, cid="cid-a", pod_ns=pod, pod="a", prev=result)
    assert f"{ip}:80" not in ns_exec(lab.node, "iptables-save", "-t", "nat").stdout
    assert host not in lab.node_links()
    assert not [n for n in lab.node_links() if n.startswith("bwp")]
    assert lab.allocations() == [] and lab.node_routes() == []
    # A second DEL of the whole chain is fine too.
    run_chain(lab, "DEL", conflist, runtime, cid="cid-a", pod_ns=pod, pod="a", prev=result)


def test_blackhole_for_pod_cidr(lab: Lab) -> None:
    code = (
        "from felix_lite.cni.wiring import ensure_blackhole, remove_blackhole\n"
        "print(ensure_blackhole('10.244.1.0/24'), ensure_blackhole('10.244.1.0/24'))\n"
    )
    out = ns_exec(lab.node, sys.executable, "-c", code).stdout.split()
    assert out == ["True", "False"]
    routes = json.loads(sh("ip", "-n", lab.node, "-j", "route", "show", "type", "blackhole").stdout)
    assert [(r["dst"], r["protocol"]) for r in routes] == [("10.244.1.0/24", str(PROTO_LOCAL_POD))]
    # A pod /32 inside the block still wins by longest match.
    pod = lab.pod_ns()
    ip = ip_of(lab.add(pod, "a"))
    serve(lab, pod, 80, "pod-a")
    assert ask(lab.node, ip, 80) == "pod-a"
    got = ns_exec(lab.node, "ip", "route", "get", "10.244.1.200", check=False)
    assert "blackhole" in got.stdout or got.returncode != 0
