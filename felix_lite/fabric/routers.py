"""Real ToR routers in a network namespace: BIRD 2, FRR 8.4 (zebra + bgpd), GoBGP 3.

Config rendering is pure (`render_bird`, `render_frr`, `render_gobgp` from one
`TorConfig`), so the same peering model -- eBGP with an AS per node, or iBGP
with the ToR as route reflector for an AS per rack -- is expressed once for
all three. Each router class starts its daemons inside the namespace through
`ip netns exec` (which execs, so the PIDs we hold or read from pid files are
the daemons' own), stops them by PID only, and answers the few questions the
tests and benchmarks ask: is a session established, which prefixes are in the
RIB, which are in the ToR's kernel.

GoBGP does not install routes (and its zebra client crashed against FRR 8.4's
zebra, LAB-NOTES), so `GobgpRouter` runs a feeder: `gobgp monitor global rib
--current -j` piped into a long-lived `ip -force -batch -` in the namespace.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import IO, Protocol

from felix_lite.procs import kill_pid
from felix_lite.waiting import wait_until

log = logging.getLogger(__name__)

FRR_DIR = Path("/usr/lib/frr")


class RouterKind(Enum):
    BIRD = "bird"
    FRR = "frr"
    GOBGP = "gobgp"


class RouterError(RuntimeError):
    """A router could not be started or queried; the message names the router."""


@dataclass(frozen=True, slots=True)
class TorPeer:
    """One node seen from the ToR."""

    name: str
    """Short identifier (BIRD protocol name): letters, digits, underscore."""
    address: str
    asn: int
    local_address: str
    """The ToR's own address on the link to this peer."""
    password: str | None = None
    rr_client: bool = False
    """iBGP route-reflector client (AS per rack); needs asn == the ToR's asn."""


@dataclass(frozen=True, slots=True)
class StaticRoute:
    """A route the ToR originates itself (tests: what the nodes must not import)."""

    prefix: str
    via: str | None = None
    """Next hop; None makes it a blackhole."""


@dataclass(frozen=True, slots=True)
class TorConfig:
    router_id: str
    asn: int
    peers: tuple[TorPeer, ...]
    hold_time: int = 30
    graceful_restart: int = 120
    static: tuple[StaticRoute, ...] = ()
    install_routes: bool = True
    """Program learned routes into the ToR's kernel (so it forwards)."""


def _check(cfg: TorConfig) -> None:
    names = set()
    for i, p in enumerate(cfg.peers):
        where = f"torconfig {cfg.router_id}: peers[{i}]"
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", p.name):
            raise RouterError(f"{where}.name: {p.name!r} must be a plain identifier")
        if p.name in names:
            raise RouterError(f"{where}.name: duplicate {p.name!r}")
        names.add(p.name)
        ipaddress.IPv4Address(p.address)
        ipaddress.IPv4Address(p.local_address)
        if p.rr_client and p.asn != cfg.asn:
            raise RouterError(f"{where}.rr_client: a route-reflector client must be iBGP")
        if p.password is not None and any(c in p.password for c in "\"'\\ \n"):
            raise RouterError(f"{where}.password: no quotes, backslash or blanks")


# --- rendering (pure) -----------------------------------------------------------------


def render_bird(cfg: TorConfig, *, log_path: str) -> str:
    _check(cfg)
    out = [
        f"router id {cfg.router_id};",
        f'log "{log_path}" all;',
        "protocol device { scan time 10; }",
    ]
    if cfg.install_routes:
        out.append("protocol kernel { ipv4 { import none; export all; }; merge paths on; }")
    if cfg.static:
        out.append("protocol static tor_static {")
        out.append("  ipv4;")
        for r in cfg.static:
            out.append(f"  route {r.prefix} {'via ' + r.via if r.via else 'blackhole'};")
        out.append("}")
    for p in cfg.peers:
        out.append(f"protocol bgp {p.name} {{")
        out.append(f"  local {p.local_address} as {cfg.asn};")
        out.append(f"  neighbor {p.address} as {p.asn};")
        out.append(f"  hold time {cfg.hold_time};")
        out.append("  graceful restart on;")
        out.append(f"  graceful restart time {cfg.graceful_restart};")
        if p.password is not None:
            out.append(f'  password "{p.password}";')
        if p.rr_client:
            out.append("  rr client;")
            out.append("  direct;")
            out.append("  ipv4 { import all; export all; next hop self; gateway direct; };")
        else:
            out.append("  ipv4 { import all; export all; };")
        out.append("}")
    return "\n".join(out) + "\n"


def render_frr(cfg: TorConfig, *, log_path: str) -> str:
    """bgpd.conf. Extra routes come from the ToR's kernel (`redistribute kernel`)."""
    _check(cfg)
    keep = max(1, cfg.hold_time // 3)
    out = [
        "frr defaults traditional",
        "hostname tor",
        f"log file {log_path} informational",
        "!",
        f"router bgp {cfg.asn}",
        f" bgp router-id {cfg.router_id}",
        " no bgp ebgp-requires-policy",
        " no bgp network import-check",
        " bgp graceful-restart",
        f" bgp graceful-restart restart-time {cfg.graceful_restart}",
        f" timers bgp {keep} {cfg.hold_time}",
    ]
    if any(p.rr_client for p in cfg.peers):
        out.append(f" bgp cluster-id {cfg.router_id}")
    for p in cfg.peers:
        out.append(f" neighbor {p.address} remote-as {p.asn}")
        out.append(f" neighbor {p.address} update-source {p.local_address}")
        if p.password is not None:
            out.append(f" neighbor {p.address} password {p.password}")
        if not p.rr_client:
            # ExaBGP does no loop detection: never send a node its own routes back
            out.append(f" neighbor {p.address} solo")
    out.append(" address-family ipv4 unicast")
    if cfg.static:
        out.append("  redistribute kernel")
    for p in cfg.peers:
        if p.rr_client:
            out.append(f"  neighbor {p.address} route-reflector-client")
            out.append(f"  neighbor {p.address} next-hop-self force")
    out += [" exit-address-family", "!", ""]
    return "\n".join(out)


def render_gobgp(cfg: TorConfig) -> str:
    _check(cfg)
    out = [
        "[global.config]",
        f"  as = {cfg.asn}",
        f'  router-id = "{cfg.router_id}"',
        "  port = 179",
        "",
    ]
    for p in cfg.peers:
        out += [
            "[[neighbors]]",
            "  [neighbors.config]",
            f'    neighbor-address = "{p.address}"',
            f"    peer-as = {p.asn}",
        ]
        if p.password is not None:
            out.append(f'    auth-password = "{p.password}"')
        out += [
            "  [neighbors.transport.config]",
            f'    local-address = "{p.local_address}"',
            "  [neighbors.timers.config]",
            f"    hold-time = {cfg.hold_time}",
            f"    keepalive-interval = {max(1, cfg.hold_time // 3)}",
            "  [neighbors.graceful-restart.config]",
            "    enabled = true",
            f"    restart-time = {cfg.graceful_restart}",
            "  [[neighbors.afi-safis]]",
            "    [neighbors.afi-safis.config]",
            '      afi-safi-name = "ipv4-unicast"',
            "    [neighbors.afi-safis.mp-graceful-restart.config]",
            "      enabled = true",
        ]
        if p.rr_client:
            out += [
                "  [neighbors.route-reflector.config]",
                "    route-reflector-client = true",
                f'    route-reflector-cluster-id = "{cfg.router_id}"',
            ]
        out.append("")
    return "\n".join(out)


# --- running ----------------------------------------------------------------------------


def _run(argv: list[str], *, timeout: float = 20.0, check: bool = True) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and r.returncode != 0:
        raise RouterError(f"{' '.join(argv)}: rc={r.returncode} {(r.stderr or r.stdout).strip()}")
    return r.stdout


def _wait(pred: Callable[[], bool], timeout: float, what: str) -> None:
    wait_until(pred, timeout, what, error=RouterError)


_PREFIX_RE = re.compile(r"^(\d+\.\d+\.\d+\.\d+/\d+)", re.M)


def kernel_prefixes(netns: str, *, proto: str | None = None) -> set[str]:
    """IPv4 prefixes in netns' main table (optionally of one protocol)."""
    argv = ["ip", "-n", netns, "-4", "route", "show", "table", "main"]
    if proto is not None:
        argv += ["proto", proto]
    out = _run(argv)
    prefixes = set()
    for line in out.splitlines():
        parts = line.split()
        if not parts:
            continue
        dst = parts[1] if parts[0] in ("blackhole", "unreachable", "prohibit") else parts[0]
        if dst == "default":
            continue
        prefixes.add(dst if "/" in dst else dst + "/32")
    return prefixes


class TorRouter(Protocol):
    kind: RouterKind
    netns: str
    config: TorConfig

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def pids(self) -> list[int]: ...

    def established(self, peer_address: str) -> bool: ...

    def rib_prefixes(self) -> set[str]: ...


@dataclass
class _Base:
    netns: str
    config: TorConfig
    workdir: Path
    on_pid: Callable[[int], None] | None = None
    _pids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        """Subclasses set up their paths here (the generated __init__ calls it)."""

    def pids(self) -> list[int]:
        return list(self._pids)

    def _register(self, pid: int) -> None:
        self._pids.append(pid)
        if self.on_pid is not None:
            self.on_pid(pid)

    def _stop_pids(self) -> None:
        for pid in reversed(self._pids):
            kill_pid(pid)
        self._pids.clear()

    def _install_static_in_kernel(self) -> None:
        """FRR/GoBGP variants: the ToR's own extra routes live in its kernel."""
        lines = [
            (
                f"route replace {r.prefix} via {r.via}\n"
                if r.via
                else f"route replace blackhole {r.prefix}\n"
            )
            for r in self.config.static
        ]
        if lines:
            subprocess.run(
                ["ip", "-n", self.netns, "-batch", "-"],
                input="".join(lines),
                text=True,
                check=True,
                capture_output=True,
            )


class BirdRouter(_Base):
    kind = RouterKind.BIRD

    def __post_init__(self) -> None:
        self.ctl = str(self.workdir / "bird.ctl")
        self.conf = self.workdir / "bird.conf"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(render_bird(self.config, log_path=str(self.workdir / "bird.log")))
        self._proc = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, "bird", "-f", "-c", str(self.conf), "-s", self.ctl],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "bird.stderr", "ab"),  # noqa: SIM115 - child owns it
            start_new_session=True,
        )
        self._register(self._proc.pid)
        _wait(lambda: os.path.exists(self.ctl), 10, f"bird {self.netns} control socket")

    def stop(self) -> None:
        self._stop_pids()
        self._proc = None

    def birdc(self, *args: str) -> str:
        return _run(["birdc", "-s", self.ctl, *args])

    def reconfigure(self, config: TorConfig) -> None:
        self.config = config
        self.conf.write_text(render_bird(config, log_path=str(self.workdir / "bird.log")))
        self.birdc("configure")

    def established(self, peer_address: str) -> bool:
        for p in self.config.peers:
            if p.address == peer_address:
                return "Established" in self.birdc("show", "protocols", p.name)
        raise RouterError(f"bird {self.netns}: no peer {peer_address}")

    def rib_prefixes(self) -> set[str]:
        return set(_PREFIX_RE.findall(self.birdc("show", "route")))

    def route_count(self) -> int:
        m = re.search(r"(\d+) of \d+ routes", self.birdc("show", "route", "count"))
        return int(m.group(1)) if m else 0


class FrrRouter(_Base):
    """zebra + bgpd. They run as user `frr`, which cannot enter a 0700 test
    directory, so their files live in a private run directory under /tmp owned
    by `frr` (logs are copied to `workdir` on stop)."""

    kind = RouterKind.FRR

    def __post_init__(self) -> None:
        self.rundir = Path("/nonexistent")

    @property
    def vty_dir(self) -> Path:
        return self.rundir / "vty"

    @property
    def zsock(self) -> str:
        return str(self.rundir / "zserv.api")

    def _daemon(self, name: str, conf: Path) -> int:
        pidfile = self.rundir / f"{name}.pid"
        _run(
            [
                "ip", "netns", "exec", self.netns, str(FRR_DIR / name), "-d",
                "-f", str(conf), "-i", str(pidfile), "-z", self.zsock,
                "--vty_socket", str(self.vty_dir), "-P", "0",
                "--log", f"file:{self.rundir / (name + '.log')}",
            ]
        )  # fmt: skip
        _wait(
            lambda: pidfile.exists() and pidfile.read_text().strip() != "",
            10,
            f"frr {name} pid file",
        )
        pid = int(pidfile.read_text().strip())
        self._register(pid)
        return pid

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.rundir = Path(tempfile.mkdtemp(prefix=f"{self.netns}-frr-"))
        self.vty_dir.mkdir()
        for d in (self.rundir, self.vty_dir):
            shutil.chown(d, "frr", "frr")
        self._install_static_in_kernel()
        zconf = self.rundir / "zebra.conf"
        zconf.write_text("hostname tor\n!\n")
        bconf = self.rundir / "bgpd.conf"
        bconf.write_text(render_frr(self.config, log_path=str(self.rundir / "bgpd.log")))
        for f in (zconf, bconf):
            shutil.chown(f, "frr", "frr")
        self._daemon("zebra", zconf)
        _wait(lambda: os.path.exists(self.zsock), 10, "zebra socket")
        self._daemon("bgpd", bconf)

    def stop(self) -> None:
        self._stop_pids()
        if self.rundir.is_dir():
            for f in self.rundir.glob("*.log"):
                with contextlib.suppress(OSError):
                    shutil.copy(f, self.workdir / f.name)
            shutil.rmtree(self.rundir, ignore_errors=True)

    def vtysh(self, command: str) -> str:
        return _run(["vtysh", "--vty_socket", str(self.vty_dir), "-c", command])

    def _summary(self) -> dict[str, object]:
        raw = json.loads(self.vtysh("show bgp ipv4 unicast summary json") or "{}")
        peers = raw.get("peers", {}) if isinstance(raw, dict) else {}
        return peers if isinstance(peers, dict) else {}

    def established(self, peer_address: str) -> bool:
        info = self._summary().get(peer_address)
        return isinstance(info, dict) and info.get("state") == "Established"

    def rib_prefixes(self) -> set[str]:
        raw = json.loads(self.vtysh("show bgp ipv4 unicast json") or "{}")
        routes = raw.get("routes", {}) if isinstance(raw, dict) else {}
        return set(routes)


class GobgpRouter(_Base):
    kind = RouterKind.GOBGP

    def __post_init__(self) -> None:
        self.api_port = 50051
        self._feed_thread: threading.Thread | None = None
        self._monitor: subprocess.Popen[str] | None = None
        self._ip: subprocess.Popen[str] | None = None
        self.fed = 0

    def gobgp(self, *args: str) -> str:
        return _run(["ip", "netns", "exec", self.netns, "gobgp", "-p", str(self.api_port), *args])

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "gobgpd.toml"
        conf.write_text(render_gobgp(self.config))
        proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.netns,
                "gobgpd",
                "-f",
                str(conf),
                "-p",
                f"--api-hosts=127.0.0.1:{self.api_port}",
                "--pprof-disable",
            ],
            stdin=subprocess.DEVNULL,
            stdout=open(self.workdir / "gobgpd.log", "ab"),  # noqa: SIM115 - child owns it
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._register(proc.pid)
        _wait(self._api_up, 15, f"gobgpd {self.netns} api")
        self._install_static_in_kernel()
        for r in self.config.static:
            # next hop self: the kernel route above forwards; a third-party next hop
            # (r.via) would be passed on to nodes that cannot reach it
            self.gobgp("global", "rib", "add", r.prefix, "nexthop", "0.0.0.0")
        if self.config.install_routes:
            self._start_feed()

    def _api_up(self) -> bool:
        try:
            self.gobgp("global")
            return True
        except RouterError:
            return False

    def _start_feed(self) -> None:
        # a long-lived `ip -batch` in the namespace applies each line as it arrives
        self._ip = subprocess.Popen(
            ["ip", "-n", self.netns, "-force", "-batch", "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        self._register(self._ip.pid)
        self._monitor = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.netns,
                "gobgp",
                "-p",
                str(self.api_port),
                "monitor",
                "global",
                "rib",
                "--current",
                "-j",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        self._register(self._monitor.pid)
        assert self._monitor.stdout is not None and self._ip.stdin is not None
        self._feed_thread = threading.Thread(
            target=self._feed,
            args=(self._monitor.stdout, self._ip.stdin),
            name=f"gobgp-feed-{self.netns}",
            daemon=True,
        )
        self._feed_thread.start()

    def _feed(self, inp: IO[str], out: IO[str]) -> None:
        """Best-path changes -> `route replace/del PREFIX ... proto GOBGP_FEED_PROTO`."""
        own = {r.prefix for r in self.config.static}
        for line in inp:
            try:
                paths = json.loads(line)
            except json.JSONDecodeError:
                continue
            cmds: list[str] = []
            for path in paths if isinstance(paths, list) else []:
                prefix = path.get("nlri", {}).get("prefix")
                if not prefix or prefix in own:
                    continue
                nh = next(
                    (a.get("nexthop") for a in path.get("attrs", []) if a.get("type") == 3),
                    None,
                )
                if path.get("withdrawal"):
                    cmds.append(f"route del {prefix} proto {GOBGP_FEED_PROTO}\n")
                elif nh and nh != "0.0.0.0":
                    cmds.append(f"route replace {prefix} via {nh} proto {GOBGP_FEED_PROTO}\n")
            if cmds:
                try:
                    out.write("".join(cmds))
                    out.flush()
                except (BrokenPipeError, ValueError):
                    return
                self.fed += len(cmds)

    def stop(self) -> None:
        self._stop_pids()
        if self._feed_thread is not None:
            self._feed_thread.join(timeout=5)
        for p in (self._monitor, self._ip):
            if p is not None:
                for s in (p.stdin, p.stdout):
                    if s is not None:
                        with contextlib.suppress(OSError, ValueError):
                            s.close()

    def _neighbors(self) -> list[dict[str, object]]:
        raw = json.loads(self.gobgp("neighbor", "-j") or "[]")
        return raw if isinstance(raw, list) else []

    def established(self, peer_address: str) -> bool:
        for n in self._neighbors():
            conf = n.get("conf", {})
            state = n.get("state", {})
            if isinstance(conf, dict) and conf.get("neighbor_address") == peer_address:
                return isinstance(state, dict) and state.get("session_state") == 6
        return False

    def rib_prefixes(self) -> set[str]:
        raw = json.loads(self.gobgp("global", "rib", "-j") or "{}")
        return set(raw) if isinstance(raw, dict) else set()


GOBGP_FEED_PROTO = 17
"""rtnetlink protocol of the routes the GoBGP feeder installs on the ToR (not 186/201/202)."""


def make_router(
    kind: RouterKind | str,
    *,
    netns: str,
    config: TorConfig,
    workdir: Path,
    on_pid: Callable[[int], None] | None = None,
) -> BirdRouter | FrrRouter | GobgpRouter:
    k = RouterKind(kind)
    if k is RouterKind.BIRD:
        return BirdRouter(netns=netns, config=config, workdir=workdir, on_pid=on_pid)
    if k is RouterKind.FRR:
        return FrrRouter(netns=netns, config=config, workdir=workdir, on_pid=on_pid)
    return GobgpRouter(netns=netns, config=config, workdir=workdir, on_pid=on_pid)


def router_available(kind: RouterKind | str) -> str | None:
    """Why this router cannot run here, or None."""
    k = RouterKind(kind)
    need = {
        RouterKind.BIRD: ["bird", "birdc"],
        RouterKind.FRR: [str(FRR_DIR / "zebra"), str(FRR_DIR / "bgpd"), "vtysh"],
        RouterKind.GOBGP: ["gobgpd", "gobgp"],
    }[k]
    for tool in need:
        if shutil.which(tool) is None and not os.access(tool, os.X_OK):
            return f"{k.value}: {tool} not installed"
    return None
