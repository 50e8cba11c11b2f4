"""The lab cluster: build it, be its kubelet, wait for its agents, tear it down.

Layout (prefix `P`, node k = 1..N):

    P-a  "control plane"  eth0 10.10.254.2/24 -> API emulator :6443
     |
    Pt   ToR (BIRD | FRR | GoBGP), AS 65000; api 10.10.254.1, n<k> 10.10.k.1
     |
    Pn<k> node-k  eth0 10.10.k.2/24, AS 65000+k, pod CIDR 10.244.k.0/24,
          runs `felix-lite agent` and `felix-lite bgp sidecar` (ExaBGP)
     |
    Pp<j> pods    wired by the real `felix-lite-cni ADD` run in the node's netns

Every process is started detached (own session, output to a log under the
state directory) and recorded in the state file the moment it exists; every
namespace likewise. The agents learn everything through the API, as in a
cluster: Node objects (InternalIP, podCIDR, AS annotation), the
BGPConfiguration `default` and one BGPPeer per node for its ToR link.

The lab is the kubelet: a Pod applied with a new name gets a node (when it
has no `spec.nodeName`), a namespace, `CNI ADD`, a server process and its
status (`podIP`, `phase: Running`) patched through `pods/status`; a label
change only patches labels; a deleted Pod gets `CNI DEL`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from felix_lite.config import AgentConfig, BgpAgentSettings, CniSettings, to_yaml_dict
from felix_lite.lab.kube import (
    ApiError,
    KubeClient,
    Obj,
    netns_socket_factory,
    resource_version,
)
from felix_lite.lab.state import (
    STATE_FILE,
    LabError,
    LabState,
    NodeRecord,
    PodRecord,
    ProcRecord,
    locked,
    pids_in_netns,
    proc_start_time,
    stop_process,
)
from felix_lite.netlab.nsutil import netns_exists, write_sysctls
from felix_lite.netlab.probe import Endpoint, ProbeResult, probe_matrix
from felix_lite.netlab.runtime import PluginFailed, network_config, run_plugin
from felix_lite.rtproto import PROTO_BGP
from felix_lite.waiting import wait_until

log = logging.getLogger(__name__)

TOR_ASN = 65000
CLUSTER_ASN = 64512
CLUSTER_CIDR = "10.244.0.0/16"
API_ADDR = "10.10.254.2"
API_GW = "10.10.254.1"
API_PORT = 6443
HEALTH_PORT = 9099
METRICS_PORT = 9091
CNI_NETWORK = "k8s-pod-network"
AS_ANNOTATION = "felixlite.io/as-number"
SECRET_NAMESPACE = "kube-system"  # where BGPPeer password Secrets go (the agent reads only there)
APPLY_KINDS = ("Namespace", "BGPConfiguration", "BGPPeer", "Secret", "NetworkPolicy", "Pod")
CRD_DIR = Path(__file__).resolve().parents[2] / "controller" / "crds"
TORS = ("bird", "frr", "gobgp")

_SYSCTLS = {
    "net.ipv4.ip_forward": "1",
    "net.ipv4.conf.all.rp_filter": "0",
    "net.ipv4.conf.default.rp_filter": "0",
}

Out = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


@dataclass(frozen=True)
class LabSpec:
    nodes: int = 2
    tor: str = "bird"
    state_dir: str = "/run/felix-lite-lab"
    prefix: str = ""
    """Namespace name prefix; empty: derived from the state directory."""
    model: bool = True
    """Create the upstream x/y/z a/b/c model."""
    timeout: float = 90.0
    hold_time: int = 30


@dataclass
class ApplyReport:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    rvs: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def default_prefix(state_dir: str) -> str:
    """`fll` for the default state dir, `fll` + 4 hex of the path otherwise (<= 7 chars)."""
    import hashlib

    resolved = str(Path(state_dir).resolve())
    if resolved == str(Path("/run/felix-lite-lab").resolve()):
        return "fll"
    return "fll" + hashlib.sha1(resolved.encode()).hexdigest()[:4]


def _ref(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{obj.get('kind')} {ns + '/' if ns else ''}{meta.get('name')}"


def _ip_batch(netns: str, batch: str) -> None:
    r = subprocess.run(
        ["ip", "-n", netns, "-batch", "-"],
        input=batch,
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        raise LabError(f"ip -n {netns} -batch: {r.stderr.strip()}")


def kernel_routes(netns: str, *, proto: int | None = None) -> set[str]:
    argv = ["ip", "-n", netns, "-4", "-j", "route", "show", "table", "main"]
    if proto is not None:
        argv += ["proto", str(proto)]
    r = subprocess.run(argv, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        return set()
    out = set()
    for route in json.loads(r.stdout or "[]"):
        dst = route.get("dst", "")
        if dst and dst != "default":
            out.add(dst if "/" in dst else dst + "/32")
    return out


def _served_ports(pod: Obj) -> tuple[list[int], list[int]]:
    tcp: set[int] = set()
    udp: set[int] = set()
    for c in (pod.get("spec") or {}).get("containers") or []:
        for p in c.get("ports") or []:
            port = p.get("containerPort")
            if not isinstance(port, int):
                continue
            proto = str(p.get("protocol") or "TCP").upper()
            if proto == "TCP":
                tcp.add(port)
            elif proto == "UDP":
                udp.add(port)
    if not tcp and not udp:
        return [80, 81], [80, 81]
    return sorted(tcp), sorted(udp)


def _strip_for_create(obj: Obj) -> Obj:
    out: Obj = json.loads(json.dumps(obj))
    out.pop("status", None)
    meta = out.setdefault("metadata", {})
    for k in ("resourceVersion", "uid", "creationTimestamp", "generation", "managedFields"):
        meta.pop(k, None)
    return out


class Lab:
    """One lab, found through its state directory."""

    def __init__(self, state: LabState, *, out: Out = _quiet) -> None:
        self.state = state
        self.out = out
        self._children: list[subprocess.Popen[bytes]] = []

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, state_dir: str, *, out: Out = _quiet) -> Lab:
        state = LabState.load(state_dir)
        if state.phase not in ("up",):
            raise LabError(
                f"lab in {state_dir} is {state.phase!r}, not up: run `felix-lite lab down"
                f" --state-dir {state_dir}` and `lab up` again"
            )
        return cls(state, out=out)

    @property
    def dir(self) -> Path:
        return Path(self.state.state_dir)

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    def client(self, *, timeout: float = 10.0) -> KubeClient:
        return KubeClient(
            self.state.api_host,
            self.state.api_port,
            socket_factory=netns_socket_factory(self.state.api_netns),
            timeout=timeout,
        )

    # ------------------------------------------------------------------ processes
    def _spawn(
        self, role: str, argv: Sequence[str], *, log_name: str, netns: str = ""
    ) -> ProcRecord:
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / log_name
        full = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(
                full,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                cwd=str(self.dir),
                env=env,
            )
        self._children.append(proc)
        rec = ProcRecord(
            role=role,
            pid=proc.pid,
            start=proc_start_time(proc.pid),
            log=str(log_path),
            netns=netns,
        )
        self.state.add_process(rec)
        log.debug("lab.process.started role=%s pid=%d netns=%s", role, proc.pid, netns)
        return rec

    def _record_pid(self, role: str, netns: str) -> Callable[[int], None]:
        def on_pid(pid: int) -> None:
            self.state.add_process(
                ProcRecord(role=role, pid=pid, start=proc_start_time(pid), netns=netns)
            )

        return on_pid

    def _new_netns(self, name: str) -> None:
        if netns_exists(name):
            raise LabError(f"netns {name}: already exists (another lab with the same prefix?)")
        r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
        if r.returncode != 0:
            raise LabError(f"ip netns add {name}: {r.stderr.strip()}")
        self.state.add_netns(name)
        write_sysctls(name, _SYSCTLS)
        _ip_batch(name, "link set lo up\n")

    # ------------------------------------------------------------------ up
    @classmethod
    def up(cls, spec: LabSpec, *, out: Out = _quiet) -> Lab:
        if spec.tor not in TORS:
            raise LabError(f"lab up: --tor: {spec.tor!r}: must be one of {', '.join(TORS)}")
        if not 1 <= spec.nodes <= 50:
            raise LabError(f"lab up: --nodes: {spec.nodes}: must be 1..50")
        if os.geteuid() != 0:
            raise LabError("lab up: needs root (network namespaces)")
        from felix_lite.fabric.routers import router_available

        why = router_available(spec.tor)
        if why:
            raise LabError(f"lab up: --tor {spec.tor}: {why}")
        for tool in ("ip", "exabgp", "felix-lite-cni"):
            if shutil.which(tool) is None:
                raise LabError(f"lab up: {tool}: not installed")
        state_dir = str(Path(spec.state_dir).resolve())
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        with locked(state_dir):
            if (Path(state_dir) / STATE_FILE).exists():
                old = LabState.load(state_dir)
                alive = [p for p in old.processes if p.alive()]
                live_ns = [n for n in old.netns if netns_exists(n)]
                if alive or live_ns:
                    raise LabError(
                        f"a lab is already running in {state_dir} (phase {old.phase}, "
                        f"{len(alive)} processes, {len(live_ns)} namespaces): run "
                        f"`felix-lite lab down --state-dir {state_dir}` first"
                    )
                Lab(old).down()
            prefix = spec.prefix or default_prefix(state_dir)
            if len(prefix) > 8:
                raise LabError(f"lab up: prefix {prefix!r}: at most 8 characters")
            state = LabState(state_dir=state_dir, prefix=prefix, tor=spec.tor)
            state.save()
            lab = cls(state, out=out)
            t0 = time.monotonic()
            try:
                lab._build(spec)
            except BaseException as e:
                out(f"lab up failed: {e}")
                out(f"logs: {lab.logs}  (state {state.path})")
                out("cleaning up everything the lab made ...")
                state.phase = "failed"
                state.save()
                lab.down()
                if isinstance(e, LabError):
                    raise
                if isinstance(e, KeyboardInterrupt | SystemExit):
                    raise
                raise LabError(f"lab up: {type(e).__name__}: {e}") from e
            state.phase = "up"
            state.save()
            out(f"lab up in {time.monotonic() - t0:.1f}s")
            return lab

    def _build(self, spec: LabSpec) -> None:
        st = self.state
        p = st.prefix
        st.tor_netns, st.api_netns = f"{p}t", f"{p}a"
        st.tor_asn = TOR_ASN
        st.api_host, st.api_port = API_ADDR, API_PORT
        self.out(
            f"namespaces: ToR {st.tor_netns}, control plane {st.api_netns}, "
            f"nodes {p}n1..{p}n{spec.nodes}"
        )
        self._new_netns(st.tor_netns)
        self._new_netns(st.api_netns)
        _ip_batch(
            st.tor_netns,
            f"link add api type veth peer name eth0 netns {st.api_netns}\n"
            f"addr add {API_GW}/24 dev api\nlink set api up\n",
        )
        _ip_batch(
            st.api_netns,
            f"addr add {API_ADDR}/24 dev eth0\nlink set eth0 up\nroute add default via {API_GW}\n",
        )
        for k in range(1, spec.nodes + 1):
            ns = f"{p}n{k}"
            self._new_netns(ns)
            _ip_batch(
                st.tor_netns,
                f"link add n{k} type veth peer name eth0 netns {ns}\n"
                f"addr add 10.10.{k}.1/24 dev n{k}\nlink set n{k} up\n",
            )
            _ip_batch(
                ns,
                f"addr add 10.10.{k}.2/24 dev eth0\nlink set eth0 up\n"
                f"route add default via 10.10.{k}.1\n",
            )
            workdir = self.dir / f"node-{k}"
            workdir.mkdir(parents=True, exist_ok=True)
            st.nodes.append(
                NodeRecord(
                    name=f"node-{k}",
                    index=k,
                    netns=ns,
                    address=f"10.10.{k}.2",
                    gateway=f"10.10.{k}.1",
                    asn=TOR_ASN + k,
                    pod_cidr=f"10.244.{k}.0/24",
                    workdir=str(workdir),
                    health_port=HEALTH_PORT,
                )
            )
        st.save()
        self._start_api()
        self._start_tor(spec)
        self._seed_api()
        for node in st.nodes:
            self._start_node(node)
        rep = ApplyReport()
        if spec.model:
            self.out("pods: the upstream model (namespaces x y z, pods a b c), spread over nodes")
            rep = self.apply_objects(self.model_objects(), timeout=spec.timeout, wait=False)
        self.out("waiting: BGP sessions established, agents programmed, pods routable ...")
        self.wait_established(timeout=spec.timeout)
        self.wait_ready(timeout=spec.timeout)
        self.wait_routes(present=list(st.pods.values()), absent=[], timeout=spec.timeout)
        self.wait_programmed(rep.rvs, timeout=spec.timeout)
        self.out(f"pods: {len(st.pods)} running and routable from every node")

    def _start_api(self) -> None:
        st = self.state
        apidir = self.dir / "api"
        apidir.mkdir(parents=True, exist_ok=True)
        # A new lab is a new cluster: the API state of an earlier lab in this
        # state dir (kept after `down`, for post-mortem) must not be loaded.
        (apidir / "state.json").unlink(missing_ok=True)
        st.kubeconfig = str(self.dir / "kubeconfig")
        st.api_url = f"http://{API_ADDR}:{API_PORT}"
        self._spawn(
            "apiserver",
            [
                sys.executable,
                "-m",
                "felix_lite.apiserver",
                "--host",
                API_ADDR,
                "--port",
                str(API_PORT),
                "--state",
                str(apidir / "state.json"),
                "--kubeconfig",
                st.kubeconfig,
                "--bookmark-interval",
                "1",
            ],
            log_name="apiserver.log",
            netns=st.api_netns,
        )
        st.save()
        client = self.client(timeout=2)
        self._wait(client.healthy, 20, "the API emulator answering /healthz")
        self.out(f"API emulator: {st.api_url} in netns {st.api_netns}")

    def tor_config(self) -> Any:
        from felix_lite.fabric.routers import TorConfig, TorPeer

        return TorConfig(
            router_id="10.10.254.1",
            asn=self.state.tor_asn,
            peers=tuple(
                TorPeer(name=f"n{n.index}", address=n.address, asn=n.asn, local_address=n.gateway)
                for n in self.state.nodes
            ),
            hold_time=30,
            graceful_restart=120,
            install_routes=self.state.tor != "gobgp",
        )

    def router(self) -> Any:
        """A handle on the running ToR for queries (never started from here)."""
        from felix_lite.fabric.routers import FrrRouter, make_router

        r = make_router(
            self.state.tor,
            netns=self.state.tor_netns,
            config=self.tor_config(),
            workdir=self.dir / "tor",
        )
        if self.state.tor_rundir and isinstance(r, FrrRouter):
            r.rundir = Path(self.state.tor_rundir)
        return r

    def _start_tor(self, spec: LabSpec) -> None:
        from felix_lite.fabric.routers import FrrRouter, make_router

        st = self.state
        router = make_router(
            st.tor,
            netns=st.tor_netns,
            config=self.tor_config(),
            workdir=self.dir / "tor",
            on_pid=self._record_pid(f"tor {st.tor}", st.tor_netns),
        )
        router.start()
        if isinstance(router, FrrRouter):  # its private run dir under /tmp: down removes it
            st.tor_rundir = str(router.rundir)
            st.save()
        if st.tor == "gobgp":
            self._spawn(
                "tor gobgp feeder",
                [
                    sys.executable,
                    "-m",
                    "felix_lite.lab.gobgpfeed",
                    "--api-port",
                    str(getattr(router, "api_port", 50051)),
                ],
                log_name="gobgpfeed.log",
                netns=st.tor_netns,
            )
        self.out(f"ToR: {st.tor} in {st.tor_netns}, AS {st.tor_asn}")

    def _seed_api(self) -> None:
        """CRDs, BGPConfiguration `default`, Node objects and their ToR BGPPeers."""
        c = self.client()
        for f in sorted(CRD_DIR.glob("*.yaml")):
            crd = yaml.safe_load(f.read_text())
            with contextlib.suppress(ApiError):
                c.create(crd)
        c.create(
            {
                "apiVersion": "felixlite.io/v1alpha1",
                "kind": "BGPConfiguration",
                "metadata": {"name": "default"},
                "spec": {
                    "asNumber": CLUSTER_ASN,
                    "nodeToNodeMesh": False,
                    "podCIDRs": [CLUSTER_CIDR],
                },
            }
        )
        for n in self.state.nodes:
            c.create(
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": n.name,
                        "labels": {
                            "kubernetes.io/hostname": n.name,
                            "kubernetes.io/os": "linux",
                            "topology.felixlite.io/rack": "rack1",
                        },
                        "annotations": {AS_ANNOTATION: str(n.asn)},
                    },
                    "spec": {"podCIDR": n.pod_cidr, "podCIDRs": [n.pod_cidr]},
                }
            )
            c.patch(
                "Node",
                n.name,
                {
                    "status": {
                        "addresses": [
                            {"type": "InternalIP", "address": n.address},
                            {"type": "Hostname", "address": n.name},
                        ],
                        "conditions": [{"type": "Ready", "status": "True"}],
                    }
                },
                sub="status",
            )
            c.create(
                {
                    "apiVersion": "felixlite.io/v1alpha1",
                    "kind": "BGPPeer",
                    "metadata": {"name": f"tor-{n.name}"},
                    "spec": {
                        "peerIP": n.gateway,
                        "asNumber": self.state.tor_asn,
                        "node": n.name,
                        "holdTime": 30,
                        "gracefulRestartSeconds": 120,
                    },
                }
            )
        self.out(
            f"API objects: CRDs, BGPConfiguration default (AS {CLUSTER_ASN}, mesh off, "
            f"{CLUSTER_CIDR}), {len(self.state.nodes)} Nodes, "
            f"{len(self.state.nodes)} BGPPeers (ToR, AS {self.state.tor_asn})"
        )

    def agent_config(self, node: NodeRecord) -> AgentConfig:
        w = Path(node.workdir)
        return AgentConfig(
            node_name=node.name,
            kubeconfig=self.state.kubeconfig,
            log_level="info",
            health_port=node.health_port,
            metrics_port=METRICS_PORT,
            pod_cidrs=(CLUSTER_CIDR,),
            node_pod_cidr=node.pod_cidr,
            state_dir=str(w / "run"),
            cni=CniSettings(
                bin_dir=str(w / "cni" / "bin"),
                conf_dir=str(w / "cni" / "net.d"),
                ipam_data_dir=str(w / "ipam"),
            ),
            bgp=BgpAgentSettings(
                socket=str(w / "run" / "bgp.sock"),
                exabgp_config_dir=str(w / "exabgp"),
            ),
        )

    def _start_node(self, node: NodeRecord) -> None:
        cfg = self.agent_config(node)
        w = Path(node.workdir)
        for d in (w / "run", w / "ipam", w / "exabgp"):
            d.mkdir(parents=True, exist_ok=True)
        cfg_path = w / "config.yaml"
        cfg_path.write_text(yaml.safe_dump(to_yaml_dict(cfg), sort_keys=False))
        py = sys.executable
        self._spawn(
            f"agent {node.name}",
            [
                py,
                "-m",
                "felix_lite",
                "agent",
                "--config",
                str(cfg_path),
                "--node",
                node.name,
                "--kubeconfig",
                self.state.kubeconfig,
                "--secret-namespace",
                SECRET_NAMESPACE,
            ],
            log_name=f"{node.name}-agent.log",
            netns=node.netns,
        )
        self._spawn(
            f"sidecar {node.name}",
            sidecar_argv(cfg.bgp.exabgp_config_dir),
            log_name=f"{node.name}-exabgp.log",
            netns=node.netns,
        )
        self.out(
            f"{node.name}: netns {node.netns}, {node.address}, AS {node.asn}, "
            f"pods {node.pod_cidr}: agent + ExaBGP sidecar started"
        )

    def model_objects(self) -> list[Obj]:
        from felix_lite.netlab.e2e import model_docs, upstream_model

        names = [n.name for n in self.state.nodes]
        return model_docs(upstream_model(nodes=names))

    # ------------------------------------------------------------------ waiting
    def _wait(
        self,
        pred: Callable[[], bool],
        timeout: float,
        what: str,
        *,
        step: float = 0.1,
        detail: Callable[[], str] | None = None,
    ) -> float:
        """Seconds until pred() held; LabError (with the logs' place) on timeout."""
        t0 = time.monotonic()
        wait_until(
            pred,
            timeout,
            what,
            step=step,
            error=lambda msg: LabError(f"{msg} (logs: {self.logs})"),
            detail=detail,
            check=self._check_alive,
        )
        return time.monotonic() - t0

    def _check_alive(self) -> None:
        dead = [
            p for p in self.state.processes if not p.alive() and not p.role.startswith("tor frr")
        ]  # FRR's launcher exits by design
        if dead:
            p = dead[0]
            tail = ""
            if p.log:
                with contextlib.suppress(OSError):
                    tail = Path(p.log).read_text(errors="replace").strip().splitlines()[-1][-300:]
            raise LabError(
                f"{p.role} (pid {p.pid}) exited; log {p.log or self.logs}"
                + (f": {tail}" if tail else "")
            )

    def sessions(self) -> dict[str, bool]:
        r = self.router()
        out = {}
        for n in self.state.nodes:
            try:
                out[n.name] = bool(r.established(n.address))
            except Exception as e:  # a router still starting answers errors
                log.debug("lab.session.query node=%s error=%s", n.name, e)
                out[n.name] = False
        return out

    def wait_established(self, *, timeout: float) -> None:
        self._wait(
            lambda: all(self.sessions().values()),
            timeout,
            "BGP sessions established",
            step=0.3,
            detail=lambda: "down: " + ", ".join(k for k, v in self.sessions().items() if not v),
        )
        self.out(f"BGP: {len(self.state.nodes)} sessions established with the ToR")

    def agent_status(self, node: NodeRecord, path: str = "/status") -> Obj | None:
        c = KubeClient(
            "127.0.0.1",
            node.health_port,
            socket_factory=netns_socket_factory(node.netns),
            timeout=3,
        )
        try:
            return c.request("GET", path)
        except Exception as e:
            log.debug("lab.agent.status node=%s path=%s error=%s", node.name, path, e)
            return None

    def agent_ready(self, node: NodeRecord) -> bool:
        return self.agent_status(node, "/readyz") is not None

    def wait_ready(self, *, timeout: float) -> None:
        self._wait(
            lambda: all(self.agent_ready(n) for n in self.state.nodes),
            timeout,
            "every agent ready (/readyz)",
            step=0.2,
            detail=lambda: (
                "not ready: "
                + ", ".join(n.name for n in self.state.nodes if not self.agent_ready(n))
            ),
        )
        self.out(f"agents: {len(self.state.nodes)} ready")

    def programmed(self) -> dict[str, dict[str, int]]:
        out = {}
        for n in self.state.nodes:
            st = self.agent_status(n)
            out[n.name] = programmed_rvs(st) if st else {}
        return out

    def wait_programmed(self, rvs: Mapping[str, int], *, timeout: float) -> float:
        """Until every node's programmed RV of each kind >= the write's RV."""
        if not rvs:
            return 0.0
        lag: list[str] = []

        def done() -> bool:
            lag.clear()
            for node, have in self.programmed().items():
                for kind, want in rvs.items():
                    if kind == "Secret":
                        continue  # the agent watches Secrets of one namespace only
                    got = have.get(kind.lower(), -1)
                    if got < want:
                        lag.append(f"{node} {kind} programmed rv={got} < {want}")
            return not lag

        return self._wait(
            done,
            timeout,
            "every agent to program the change",
            step=0.02,
            detail=lambda: "; ".join(lag),
        )

    def wait_routes(
        self, *, present: Sequence[PodRecord], absent: Sequence[str], timeout: float
    ) -> float:
        """Pods in `present` learned over BGP on every other node; IPs in `absent` nowhere."""
        missing: list[str] = []

        def done() -> bool:
            missing.clear()
            for n in self.state.nodes:
                learned = kernel_routes(n.netns, proto=PROTO_BGP)
                for p in present:
                    if p.node != n.name and p.ip and f"{p.ip}/32" not in learned:
                        missing.append(f"{n.name} lacks {p.key} {p.ip}/32")
                for ip in absent:
                    if f"{ip}/32" in learned:
                        missing.append(f"{n.name} still routes {ip}/32")
            return not missing

        return self._wait(
            done,
            timeout,
            "pod routes on every node",
            step=0.05,
            detail=lambda: "; ".join(missing[:6]),
        )

    # ------------------------------------------------------------------ kubelet
    def _pick_node(self, pending: Mapping[str, int]) -> str:
        load = {n.name: 0 for n in self.state.nodes}
        for p in self.state.pods.values():
            load[p.node] = load.get(p.node, 0) + 1
        for name, extra in pending.items():
            load[name] = load.get(name, 0) + extra
        return min(self.state.nodes, key=lambda n: (load[n.name], n.index)).name

    def _cni(self, node: NodeRecord, command: str, pod: PodRecord) -> Obj:
        conf = network_config(CNI_NETWORK, node.pod_cidr, str(Path(node.workdir) / "ipam"))
        try:
            return run_plugin(
                ["felix-lite-cni"],
                node.netns,
                command,
                conf,
                container_id=pod.container_id,
                pod_netns=pod.netns,
                namespace=pod.namespace,
                name=pod.name,
            )
        except PluginFailed as e:
            raise LabError(f"pod {pod.key}: CNI {command} on {node.name} failed {e}") from e

    def _realise_pod(self, obj: Obj, node_name: str) -> PodRecord:
        """Namespace + CNI ADD + server for one pod (the 'container runtime' half)."""
        meta = obj["metadata"]
        st = self.state
        pod = PodRecord(
            namespace=meta["namespace"],
            name=meta["name"],
            node=node_name,
            netns=st.next_pod_netns(),
            container_id=re.sub(r"[^A-Za-z0-9_.-]", "-", f"{meta['namespace']}_{meta['name']}"),
        )
        pod.tcp_ports, pod.udp_ports = _served_ports(obj)
        st.put_pod(pod)
        self._new_netns(pod.netns)
        node = st.node(node_name)
        result = self._cni(node, "ADD", pod)
        try:
            pod.ip = str(result["ips"][0]["address"]).split("/")[0]
            pod.host_ifname = str(result["interfaces"][0]["name"])
        except (KeyError, IndexError, TypeError):
            raise LabError(
                f"pod {pod.key}: CNI ADD result without ips/interfaces: {result}"
            ) from None
        st.save()
        pod.server = self._spawn(
            f"pod {pod.key}",
            [
                sys.executable,
                "-m",
                "felix_lite.lab.podserver",
                "--tcp",
                ",".join(map(str, pod.tcp_ports)),
                "--udp",
                ",".join(map(str, pod.udp_ports)),
            ],
            log_name=f"pod-{pod.namespace}-{pod.name}.log",
            netns=pod.netns,
        )
        st.save()
        return pod

    def _unrealise_pod(self, key: str) -> PodRecord | None:
        pod = self.state.pods.get(key)
        if pod is None:
            return None
        if pod.server is not None:
            stop_process(pod.server, timeout=2)
            with contextlib.suppress(ValueError):
                self.state.processes.remove(pod.server)
        try:
            self._cni(self.state.node(pod.node), "DEL", pod)
        except LabError as e:
            self.out(f"warning: {e}")
        self._kill_netns_procs(pod.netns)
        subprocess.run(["ip", "netns", "delete", pod.netns], capture_output=True, check=False)
        with contextlib.suppress(ValueError):
            self.state.netns.remove(pod.netns)
        del self.state.pods[key]
        self.state.save()
        return pod

    def _wait_servers(self, pods: Iterable[PodRecord], timeout: float = 10.0) -> None:
        def ready(p: PodRecord) -> bool:
            if p.server is None or not p.server.log:
                return True
            with contextlib.suppress(OSError):
                return "podserver.ready" in Path(p.server.log).read_text(errors="replace")
            return False

        todo = list(pods)
        self._wait(lambda: all(ready(p) for p in todo), timeout, "pod servers listening", step=0.02)

    # ------------------------------------------------------------------ apply / delete
    def apply_objects(
        self, objs: Sequence[Obj], *, timeout: float = 30.0, wait: bool = True
    ) -> ApplyReport:
        t0 = time.monotonic()
        rep = ApplyReport()
        for i, obj in enumerate(objs):
            kind = obj.get("kind")
            if kind not in APPLY_KINDS:
                raise LabError(
                    f"object {i} ({_ref(obj)}): kind: the lab applies {', '.join(APPLY_KINDS)}"
                )
            if not (obj.get("metadata") or {}).get("name"):
                raise LabError(f"object {i} ({_ref(obj)}): metadata.name: required")
            if kind in ("Pod", "NetworkPolicy", "Secret"):
                obj.setdefault("metadata", {}).setdefault("namespace", "default")
        ordered = sorted(objs, key=lambda o: APPLY_KINDS.index(o["kind"]))
        c = self.client()
        new_pods: list[tuple[Obj, str]] = []
        pending: dict[str, int] = {}

        def bump(kind: str, obj: Obj) -> None:
            rep.rvs[kind] = max(rep.rvs.get(kind, 0), resource_version(obj))

        for obj in ordered:
            kind, meta = obj["kind"], obj["metadata"]
            ns = meta.get("namespace")
            ref = _ref(obj)
            if kind == "Pod":
                try:
                    cur = c.get("Pod", meta["name"], namespace=ns)
                except ApiError as e:
                    if e.code != 404:
                        raise LabError(f"{ref}: {e}") from None
                    cur = None
                if cur is not None and f"{ns}/{meta['name']}" in self.state.pods:
                    want = meta.get("labels") or {}
                    if (cur["metadata"].get("labels") or {}) != want:
                        res = c.patch(
                            "Pod",
                            meta["name"],
                            [{"op": "add", "path": "/metadata/labels", "value": want}],
                            namespace=ns,
                            json_patch=True,
                        )
                        bump("Pod", res)
                        rep.updated.append(ref)
                    else:
                        rep.unchanged.append(ref)
                    continue
                body = _strip_for_create(obj)
                node = (body.get("spec") or {}).get("nodeName")
                if not node:
                    node = self._pick_node(pending)
                    body.setdefault("spec", {})["nodeName"] = node
                self.state.node(node)  # a clear error for an unknown node
                pending[node] = pending.get(node, 0) + 1
                if cur is None:
                    try:
                        created = c.create(body)
                    except ApiError as e:
                        raise LabError(f"{ref}: {e}") from None
                    bump("Pod", created)
                    rep.created.append(ref)
                new_pods.append((body, node))
                continue
            try:
                res = c.create(_strip_for_create(obj))
                rep.created.append(ref)
            except ApiError as e:
                if e.code != 409:
                    raise LabError(f"{ref}: {e}") from None
                try:
                    cur = c.get(kind, meta["name"], namespace=ns)
                    body = _strip_for_create(obj)
                    body["metadata"]["resourceVersion"] = cur["metadata"]["resourceVersion"]
                    res = c.replace(body)
                except ApiError as e2:
                    raise LabError(f"{ref}: {e2}") from None
                if resource_version(res) != resource_version(cur):
                    rep.updated.append(ref)
                else:
                    rep.unchanged.append(ref)
            bump(kind, res)
        realised = self._realise_pods(new_pods, c, rep)
        if wait:
            self.wait_programmed(rep.rvs, timeout=timeout)
            if realised:
                self.wait_routes(present=realised, absent=[], timeout=timeout)
        rep.seconds = time.monotonic() - t0
        return rep

    def _realise_pods(
        self, new_pods: Sequence[tuple[Obj, str]], c: KubeClient, rep: ApplyReport
    ) -> list[PodRecord]:
        if not new_pods:
            return []
        # one worker per node: CNI ADDs of a node serialise on its IPAM lock anyway
        by_node: dict[str, list[Obj]] = {}
        for body, node in new_pods:
            by_node.setdefault(node, []).append(body)
        done: list[PodRecord] = []
        errors: list[BaseException] = []

        def work(node: str, bodies: list[Obj]) -> None:
            for b in bodies:
                try:
                    done.append(self._realise_pod(b, node))
                except BaseException as e:
                    errors.append(e)
                    return

        with concurrent.futures.ThreadPoolExecutor(max_workers=len(by_node)) as ex:
            list(ex.map(lambda kv: work(*kv), by_node.items()))
        self.state.save()
        if errors:
            raise errors[0]
        self._wait_servers(done)
        for pod in done:
            host = self.state.node(pod.node)
            res = c.patch(
                "Pod",
                pod.name,
                {
                    "status": {
                        "phase": "Running",
                        "podIP": pod.ip,
                        "podIPs": [{"ip": pod.ip}],
                        "hostIP": host.address,
                        "conditions": [{"type": "Ready", "status": "True"}],
                    }
                },
                namespace=pod.namespace,
                sub="status",
            )
            rep.rvs["Pod"] = max(rep.rvs.get("Pod", 0), resource_version(res))
        return done

    def delete_objects(self, objs: Sequence[Obj], *, timeout: float = 30.0) -> ApplyReport:
        t0 = time.monotonic()
        rep = ApplyReport()
        c = self.client()
        gone_ips: list[str] = []

        def bump(kind: str, obj: Obj) -> None:
            rep.rvs[kind] = max(rep.rvs.get(kind, 0), resource_version(obj))

        def delete_pod(ns: str, name: str) -> None:
            ref = f"Pod {ns}/{name}"
            try:
                bump("Pod", c.delete("Pod", name, namespace=ns))
                rep.deleted.append(ref)
            except ApiError as e:
                if e.code != 404:
                    raise LabError(f"{ref}: {e}") from None
                rep.missing.append(ref)
            pod = self._unrealise_pod(f"{ns}/{name}")
            if pod is not None and pod.ip:
                gone_ips.append(pod.ip)

        # reverse apply order: pods first, namespaces last
        for obj in sorted(
            objs,
            key=lambda o: (
                -APPLY_KINDS.index(o.get("kind", "Pod")) if o.get("kind") in APPLY_KINDS else 0
            ),
        ):
            kind, meta = obj.get("kind"), obj.get("metadata") or {}
            if kind not in APPLY_KINDS:
                raise LabError(f"{_ref(obj)}: kind: the lab deletes {', '.join(APPLY_KINDS)}")
            name = meta.get("name")
            ns = meta.get("namespace") or (
                "default" if kind in ("Pod", "NetworkPolicy", "Secret") else None
            )
            if kind == "Pod":
                delete_pod(str(ns), str(name))
                continue
            if kind == "Namespace":
                # delete contents one by one, so every write has a known RV to wait for
                for key in [k for k, p in self.state.pods.items() if p.namespace == name]:
                    delete_pod(str(name), key.split("/", 1)[1])
                with contextlib.suppress(ApiError):
                    for item in c.list("Pod", namespace=str(name)).get("items", []):
                        delete_pod(str(name), item["metadata"]["name"])
                    for item in c.list("NetworkPolicy", namespace=str(name)).get("items", []):
                        bump(
                            "NetworkPolicy",
                            c.delete(
                                "NetworkPolicy", item["metadata"]["name"], namespace=str(name)
                            ),
                        )
            ref = _ref({"kind": kind, "metadata": {"name": name, "namespace": ns}})
            try:
                bump(str(kind), c.delete(str(kind), str(name), namespace=ns))
                rep.deleted.append(ref)
            except ApiError as e:
                if e.code != 404:
                    raise LabError(f"{ref}: {e}") from None
                rep.missing.append(ref)
        self.wait_programmed(rep.rvs, timeout=timeout)
        if gone_ips:
            self.wait_routes(present=[], absent=gone_ips, timeout=timeout)
        rep.seconds = time.monotonic() - t0
        return rep

    # ------------------------------------------------------------------ queries
    def pods(self) -> list[dict[str, str]]:
        return [
            {"namespace": p.namespace, "name": p.name, "node": p.node, "ip": p.ip}
            for p in sorted(self.state.pods.values(), key=lambda p: (p.namespace, p.name))
        ]

    def endpoints(self) -> list[Endpoint]:
        return [
            Endpoint(name=p.key, netns=p.netns, ip=p.ip)
            for p in sorted(self.state.pods.values(), key=lambda p: (p.namespace, p.name))
            if p.ip
        ]

    def probe(
        self, *, port: int = 80, protocol: str = "TCP", timeout: float = 1.0
    ) -> list[ProbeResult]:
        eps = self.endpoints()
        if not eps:
            return []
        return probe_matrix(eps, port=port, protocol=protocol.upper(), timeout=timeout)

    def status(self) -> dict[str, Any]:
        nodes = []
        sessions = {}
        with contextlib.suppress(Exception):
            sessions = self.sessions()
        for n in self.state.nodes:
            st = self.agent_status(n)
            ready = self.agent_ready(n)
            installed = len(kernel_routes(n.netns, proto=PROTO_BGP))
            nodes.append(
                node_status(
                    n, st, ready=ready, installed=installed, tor_established=sessions.get(n.name)
                )
            )
        return {"nodes": nodes}

    # ------------------------------------------------------------------ down
    def _kill_netns_procs(self, netns: str) -> None:
        """Anything still running inside a namespace the lab made (e.g. ExaBGP's
        API child) is the lab's: stop it by PID before the namespace goes."""
        for pid in pids_in_netns(netns):
            start = proc_start_time(pid)
            if start is None:
                continue
            stop_process(ProcRecord(role=f"in {netns}", pid=pid, start=start), timeout=2)

    def down(self) -> list[str]:
        """Stop every recorded process (by PID), then delete every namespace. Never raises;
        returns the problems it met."""
        st = self.state
        problems: list[str] = []
        order = ("agent", "sidecar", "pod", "tor", "apiserver")

        def rank(p: ProcRecord) -> int:
            for i, prefix in enumerate(order):
                if p.role.startswith(prefix):
                    return i
            return len(order)

        for rec in sorted(st.processes, key=rank):
            try:
                if not stop_process(rec):
                    problems.append(f"{rec.role} pid {rec.pid}: still alive")
            except Exception as e:
                problems.append(f"{rec.role} pid {rec.pid}: {e}")
        for proc in self._children:
            with contextlib.suppress(Exception):
                proc.wait(timeout=0.1)
        rundir = Path(st.tor_rundir) if st.tor_rundir else None
        if rundir is not None and rundir.name.startswith(f"{st.tor_netns}-frr-"):
            (self.dir / "tor").mkdir(parents=True, exist_ok=True)
            for f in rundir.glob("*.log"):
                with contextlib.suppress(OSError):
                    shutil.copy(f, self.dir / "tor" / f.name)
            shutil.rmtree(rundir, ignore_errors=True)
            st.tor_rundir = ""
        for name in reversed(st.netns):
            if not netns_exists(name):
                continue
            with contextlib.suppress(Exception):
                self._kill_netns_procs(name)
            r = subprocess.run(
                ["ip", "netns", "delete", name], capture_output=True, text=True, check=False
            )
            if r.returncode != 0:
                problems.append(f"netns {name}: {r.stderr.strip()}")
        st.processes = [p for p in st.processes if p.alive()]
        st.netns = [n for n in st.netns if netns_exists(n)]
        for p in st.pods.values():
            p.server = None
        st.pods = {}
        st.phase = "down" if not problems else "failed"
        with contextlib.suppress(OSError):
            st.save()
        if not problems:
            with contextlib.suppress(OSError):
                st.path.unlink()
        return problems


def sidecar_argv(config_dir: str) -> list[str]:
    """`felix-lite bgp sidecar --config-dir DIR`, as the chart's exabgp container runs it."""
    return [sys.executable, "-m", "felix_lite", "bgp", "sidecar", "--config-dir", config_dir]


def programmed_rvs(status: Mapping[str, Any]) -> dict[str, int]:
    """Per kind (lower-case, singular) the resourceVersion the agent has programmed.

    Accepts the kind names as the agent publishes them: `NetworkPolicy`,
    `networkpolicy` or `networkpolicies`.
    """
    raw = status.get("programmed_resource_versions") or {}
    out: dict[str, int] = {}
    if not isinstance(raw, Mapping):
        return out
    plural = {
        "networkpolicies": "networkpolicy",
        "pods": "pod",
        "namespaces": "namespace",
        "nodes": "node",
        "bgppeers": "bgppeer",
        "bgpconfigurations": "bgpconfiguration",
        "secrets": "secret",
    }
    for k, v in raw.items():
        key = str(k).lower().split(".")[0]
        key = plural.get(key, key)
        try:
            out[key] = int(v)
        except (TypeError, ValueError):
            continue
    return out


def _first(d: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if k in d and d[k] is not None:
            return d[k]
    return default


def node_status(
    node: NodeRecord,
    st: Mapping[str, Any] | None,
    *,
    ready: bool,
    installed: int,
    tor_established: bool | None = None,
) -> dict[str, Any]:
    """One entry of `lab status --json`, from the agent's /status (tolerant of its shape)."""
    st = st or {}
    raw_bgp = st.get("bgp")
    bgp: Mapping[str, Any] = raw_bgp if isinstance(raw_bgp, Mapping) else {}
    raw_peers = _first(bgp, "peers", default=None)
    if raw_peers is None:
        raw_peers = st.get("peers") or []
    peers = []
    for p in raw_peers if isinstance(raw_peers, list) else []:
        if not isinstance(p, Mapping):
            continue
        entry = dict(p)
        entry["address"] = _first(p, "address", "peer_ip", "peerIP", "ip", default="")
        entry["asn"] = _first(p, "asn", "peer_asn", "as", "remote_as", default=None)
        entry["state"] = _first(p, "state", "session_state", default="unknown")
        since = _first(p, "since", "state_since", default=None)
        uptime = p.get("uptime")
        if since is None and isinstance(uptime, int | float):
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - uptime))
        entry["since"] = since
        peers.append(entry)
    if not peers and tor_established is not None:
        peers.append(
            {
                "address": node.gateway,
                "asn": TOR_ASN,
                "state": "established" if tor_established else "down",
                "since": None,
                "source": "tor",
            }
        )
    raw_routes = st.get("routes") if isinstance(st.get("routes"), Mapping) else bgp.get("routes")
    routes: Mapping[str, Any] = raw_routes if isinstance(raw_routes, Mapping) else {}
    learned = _first(routes, "learned", default=None)
    if learned is None:
        learned = _first(bgp, "routes_learned", "learned", default=installed)
    if isinstance(learned, list | dict):
        learned = len(learned)
    return {
        "name": node.name,
        "netns": node.netns,
        "address": node.address,
        "asn": node.asn,
        "ready": bool(ready),
        "generation": _first(st, "programmed_generation", "generation", default=None),
        "programmed_resource_versions": dict(st.get("programmed_resource_versions") or {}),
        "bgp": {"peers": peers},
        "routes": {"learned": learned, "installed": installed},
    }
