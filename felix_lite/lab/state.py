"""The lab's state file: every namespace and process the lab made, written as soon as it exists.

`lab up` runs once and exits, the agents, routers and pod servers live on, and
every later verb (`apply`, `probe`, `down`, ...) is another process: the state
file under the state directory is the only memory. It is rewritten atomically
(temp + rename) after each namespace or process is created, so `down` can
remove everything even after `up` crashed half way.

Processes are recorded with their kernel start time (field 22 of
/proc/PID/stat), so a PID reused by an unrelated process is never signalled.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = "/run/felix-lite-lab"
STATE_FILE = "lab.json"
LOCK_FILE = "lock"
STATE_VERSION = 1
_SAVE_LOCK = threading.Lock()  # pods are realised from one thread per node


class LabError(RuntimeError):
    """A lab operation failed; the message says what and where to look."""


def proc_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'
    rest = raw[raw.rfind(")") + 2 :].split()
    if rest and rest[0] == "Z":
        return None  # a zombie is as good as gone
    try:
        return int(rest[19])
    except (IndexError, ValueError):
        return None


@dataclass
class ProcRecord:
    role: str
    pid: int
    start: int | None
    log: str = ""
    netns: str = ""

    def alive(self) -> bool:
        now = proc_start_time(self.pid)
        return now is not None and (self.start is None or now == self.start)


@dataclass
class PodRecord:
    namespace: str
    name: str
    node: str
    netns: str
    ip: str = ""
    host_ifname: str = ""
    container_id: str = ""
    server: ProcRecord | None = None
    tcp_ports: list[int] = field(default_factory=list)
    udp_ports: list[int] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass
class NodeRecord:
    name: str
    index: int
    netns: str
    address: str
    gateway: str
    asn: int
    pod_cidr: str
    workdir: str
    health_port: int


@dataclass
class LabState:
    """Everything `down` needs, and what the other verbs look up."""

    state_dir: str
    prefix: str
    tor: str = "bird"
    phase: str = "building"  # building | up | failed | down
    tor_netns: str = ""
    tor_asn: int = 65000
    tor_rundir: str = ""  # FRR's private run directory (owned by user frr, outside state_dir)
    api_netns: str = ""
    api_url: str = ""
    api_host: str = ""
    api_port: int = 6443
    kubeconfig: str = ""
    netns: list[str] = field(default_factory=list)
    processes: list[ProcRecord] = field(default_factory=list)
    nodes: list[NodeRecord] = field(default_factory=list)
    pods: dict[str, PodRecord] = field(default_factory=dict)
    pod_seq: int = 0
    version: int = STATE_VERSION

    @property
    def path(self) -> Path:
        return Path(self.state_dir) / STATE_FILE

    def node(self, name: str) -> NodeRecord:
        for n in self.nodes:
            if n.name == name:
                return n
        raise LabError(f"lab {self.state_dir}: no node {name!r}")

    def save(self) -> None:
        d = Path(self.state_dir)
        with _SAVE_LOCK:
            d.mkdir(parents=True, exist_ok=True)
            tmp = d / f".{STATE_FILE}.{os.getpid()}"
            tmp.write_text(json.dumps(asdict(self), indent=1, sort_keys=True))
            os.replace(tmp, self.path)

    def add_netns(self, name: str) -> None:
        with _SAVE_LOCK:
            if name in self.netns:
                return
            self.netns.append(name)
        self.save()

    def next_pod_netns(self) -> str:
        with _SAVE_LOCK:
            self.pod_seq += 1
            return f"{self.prefix}p{self.pod_seq}"

    def put_pod(self, pod: PodRecord) -> None:
        with _SAVE_LOCK:
            self.pods[pod.key] = pod
        self.save()

    def add_process(self, rec: ProcRecord) -> None:
        with _SAVE_LOCK:
            self.processes.append(rec)
        self.save()

    @classmethod
    def load(cls, state_dir: str | Path) -> LabState:
        path = Path(state_dir) / STATE_FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise LabError(
                f"no lab in {state_dir} (no {STATE_FILE}): run `felix-lite lab up"
                f" --state-dir {state_dir}` first"
            ) from None
        except (OSError, ValueError) as e:
            raise LabError(f"lab state {path}: unreadable: {e}") from None
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LabState:
        raw = dict(raw)
        raw["processes"] = [ProcRecord(**p) for p in raw.get("processes", [])]
        raw["nodes"] = [NodeRecord(**n) for n in raw.get("nodes", [])]
        pods = {}
        for key, p in raw.get("pods", {}).items():
            p = dict(p)
            if p.get("server"):
                p["server"] = ProcRecord(**p["server"])
            pods[key] = PodRecord(**p)
        raw["pods"] = pods
        return cls(**raw)


@contextlib.contextmanager
def locked(state_dir: str | Path) -> Iterator[None]:
    """Serialise verbs that change the lab (two `apply`s must not race on pods)."""
    d = Path(state_dir)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / LOCK_FILE, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def stop_process(rec: ProcRecord, *, timeout: float = 5.0) -> bool:
    """SIGTERM, then SIGKILL after `timeout`; only if PID and start time still match.

    Returns True if the process is gone afterwards. Our own children are
    reaped; orphans are reaped by init.
    """
    if not rec.alive():
        _reap(rec.pid)
        return True
    with contextlib.suppress(ProcessLookupError):
        os.kill(rec.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(rec.pid)
        if not rec.alive():
            return True
        time.sleep(0.02)
    log.warning("lab.process.kill role=%s pid=%d", rec.role, rec.pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(rec.pid, signal.SIGKILL)
    for _ in range(100):
        _reap(rec.pid)
        if not rec.alive():
            return True
        time.sleep(0.02)
    return not rec.alive()


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def pids_in_netns(name: str) -> list[int]:
    """PIDs whose network namespace is netns `name` (by inode), excluding ourselves."""
    try:
        target = os.stat(f"/run/netns/{name}")
    except OSError:
        return []
    out = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_ino, st.st_dev) == (target.st_ino, target.st_dev):
            out.append(int(entry))
    return out
