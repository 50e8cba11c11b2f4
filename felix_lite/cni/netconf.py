"""The CNI protocol surface: environment, network configuration, results, errors.

Everything here is pure parsing and shaping, so the whole contract with the
container runtime can be unit-tested without a kernel. Field names and error
codes follow the CNI spec (SPEC.md, versions 0.3.0 to 1.1.0).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum, IntEnum
from pathlib import Path
from typing import Any, Final

from policy.names import pod_interface

PLUGIN_TYPE: Final = "felix-lite"
SUPPORTED_VERSIONS: Final = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
CURRENT_VERSION: Final = "1.1.0"
GATEWAY: Final = ipaddress.IPv4Address("169.254.1.1")
DEFAULT_DATA_DIR: Final = Path("/var/lib/felix-lite/ipam")
MAX_IFNAME: Final = 15
_CONTAINER_ID_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_NET_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_IPAM_TYPES: Final = (None, "felix-lite", "felix-lite-ipam")


class Command(Enum):
    ADD = "ADD"
    DEL = "DEL"
    CHECK = "CHECK"
    VERSION = "VERSION"
    STATUS = "STATUS"
    GC = "GC"


class ErrorCode(IntEnum):
    """Spec'd codes (1-99) and felix-lite's own (100+)."""

    INCOMPATIBLE_VERSION = 1
    UNSUPPORTED_FIELD = 2
    UNKNOWN_CONTAINER = 3
    INVALID_ENV = 4
    IO_FAILURE = 5
    DECODE_FAILURE = 6
    INVALID_CONFIG = 7
    TRY_AGAIN = 11
    PLUGIN_NOT_AVAILABLE = 50
    IP_EXHAUSTED = 100
    ROUTE_CONFLICT = 101
    INTERFACE_CONFLICT = 102
    CHECK_FAILED = 103
    INTERNAL = 199


class CniError(Exception):
    """A failure reported to the runtime as the spec's error JSON."""

    def __init__(self, code: ErrorCode, msg: str, details: str = "") -> None:
        super().__init__(f"{msg}: {details}" if details else msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str = CURRENT_VERSION) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": cni_version, "code": int(self.code), "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


@dataclass(frozen=True)
class IpamConf:
    pod_cidr: ipaddress.IPv4Network
    data_dir: Path


@dataclass(frozen=True)
class Attachment:
    container_id: str
    ifname: str


@dataclass(frozen=True)
class NetConf:
    cni_version: str
    name: str
    ipam: IpamConf
    mtu: int | None = None
    prev_result: Mapping[str, Any] | None = None
    log_level: str = "WARNING"
    valid_attachments: tuple[Attachment, ...] | None = None

    @property
    def ipam_dir(self) -> Path:
        return self.ipam.data_dir / self.name


@dataclass(frozen=True)
class CniEnv:
    command: Command
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: Mapping[str, str] | None = None
    path: str = ""

    @property
    def pod_namespace(self) -> str:
        return (self.args or {}).get("K8S_POD_NAMESPACE", "")

    @property
    def pod_name(self) -> str:
        return (self.args or {}).get("K8S_POD_NAME", "")

    @property
    def host_ifname(self) -> str:
        """`names.pod_interface(ns, pod)`; without Kubernetes args, keyed by container id."""
        if self.pod_namespace and self.pod_name:
            return pod_interface(self.pod_namespace, self.pod_name)
        return pod_interface("", self.container_id)


@dataclass(frozen=True)
class AddResult:
    """What ADD built; rendered per the requested cniVersion."""

    host_ifname: str
    host_mac: str
    container_ifname: str
    container_mac: str
    sandbox: str
    address: ipaddress.IPv4Address


def _bad(net: str, field: str, problem: str) -> CniError:
    return CniError(ErrorCode.INVALID_CONFIG, f"netconf {net}: {field}: {problem}")


def parse_env(env: Mapping[str, str]) -> CniEnv:
    """Read the CNI_* variables; which are required depends on the command."""
    raw = env.get("CNI_COMMAND", "")
    try:
        command = Command(raw)
    except ValueError:
        raise CniError(ErrorCode.INVALID_ENV, f"env CNI_COMMAND: unknown command {raw!r}") from None
    if command in (Command.VERSION, Command.STATUS, Command.GC):
        return CniEnv(command=command, path=env.get("CNI_PATH", ""))
    need = ["CNI_CONTAINERID", "CNI_IFNAME"]
    if command in (Command.ADD, Command.CHECK):
        need.append("CNI_NETNS")
    for var in need:
        if not env.get(var):
            raise CniError(ErrorCode.INVALID_ENV, f"env {var}: required for {command.value}")
    cid = env["CNI_CONTAINERID"]
    if not _CONTAINER_ID_RE.match(cid):
        raise CniError(ErrorCode.INVALID_ENV, f"env CNI_CONTAINERID: invalid id {cid!r}")
    ifname = env["CNI_IFNAME"]
    if len(ifname) > MAX_IFNAME or ifname in (".", "..") or re.search(r"[/:\s]", ifname):
        raise CniError(ErrorCode.INVALID_ENV, f"env CNI_IFNAME: invalid interface name {ifname!r}")
    return CniEnv(
        command=command,
        container_id=cid,
        netns=env.get("CNI_NETNS", ""),
        ifname=ifname,
        args=parse_cni_args(env.get("CNI_ARGS", "")),
        path=env.get("CNI_PATH", ""),
    )


def parse_cni_args(text: str) -> dict[str, str]:
    """`K=V;K=V` as in CNI_ARGS; a malformed pair is an invalid environment."""
    out: dict[str, str] = {}
    for i, pair in enumerate(p for p in text.split(";") if p):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CniError(
                ErrorCode.INVALID_ENV, f"env CNI_ARGS[{i}]: expected KEY=VALUE, got {pair!r}"
            )
        out[key] = value
    return out


def decode_json(data: bytes, what: str = "stdin") -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CniError(ErrorCode.DECODE_FAILURE, f"{what}: invalid JSON", str(exc)) from None
    if not isinstance(doc, dict):
        raise CniError(ErrorCode.DECODE_FAILURE, f"{what}: expected a JSON object")
    return doc


def check_version(version: str) -> None:
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            ErrorCode.INCOMPATIBLE_VERSION,
            f"cniVersion {version!r} is not supported",
            "supported: " + ", ".join(SUPPORTED_VERSIONS),
        )


def parse_netconf(data: bytes) -> NetConf:
    """Parse and validate the network configuration given on stdin."""
    doc = decode_json(data)
    name = doc.get("name")
    if not isinstance(name, str) or not _NET_NAME_RE.match(name):
        raise _bad(repr(name), "name", "must be a non-empty name of [A-Za-z0-9_.-]")
    version = doc.get("cniVersion")
    if not isinstance(version, str):
        raise _bad(name, "cniVersion", "required string")
    check_version(version)
    if doc.get("type") != PLUGIN_TYPE:
        raise _bad(name, "type", f"expected {PLUGIN_TYPE!r}, got {doc.get('type')!r}")
    ipam = _parse_ipam(name, doc.get("ipam"))
    mtu = doc.get("mtu")
    if mtu is not None and (
        not isinstance(mtu, int) or isinstance(mtu, bool) or not 576 <= mtu <= 65535
    ):
        raise _bad(name, "mtu", f"must be an integer in 576..65535, got {mtu!r}")
    prev = doc.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise _bad(name, "prevResult", "must be an object")
    level = doc.get("logLevel", "WARNING")
    if not isinstance(level, str) or level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise _bad(name, "logLevel", f"must be debug, info, warning or error, got {level!r}")
    return NetConf(
        cni_version=version,
        name=name,
        ipam=ipam,
        mtu=mtu,
        prev_result=prev,
        log_level=level.upper(),
        valid_attachments=_parse_attachments(name, doc.get("cni.dev/valid-attachments")),
    )


def _parse_ipam(net: str, raw: object) -> IpamConf:
    if not isinstance(raw, dict):
        raise _bad(net, "ipam", "required object with podCIDR")
    kind = raw.get("type")
    if kind not in _IPAM_TYPES:
        raise CniError(
            ErrorCode.UNSUPPORTED_FIELD,
            f"netconf {net}: ipam.type: only the built-in IPAM is supported, got {kind!r}",
        )
    field = "podCIDR" if "podCIDR" in raw else "subnet"
    text = raw.get(field)
    if not isinstance(text, str):
        raise _bad(net, "ipam.podCIDR", 'required (or ipam.subnet), e.g. "10.244.1.0/24"')
    try:
        cidr = ipaddress.IPv4Network(text, strict=True)
    except ValueError as exc:
        raise _bad(net, f"ipam.{field}", f"{text!r} is not an IPv4 network ({exc})") from None
    if cidr.prefixlen > 30:
        raise _bad(net, f"ipam.{field}", f"{cidr} is too small: prefix must be /30 or shorter")
    data_dir = raw.get("dataDir", str(DEFAULT_DATA_DIR))
    if not isinstance(data_dir, str) or not data_dir.startswith("/"):
        raise _bad(net, "ipam.dataDir", f"must be an absolute path, got {data_dir!r}")
    return IpamConf(pod_cidr=cidr, data_dir=Path(data_dir))


def _parse_attachments(net: str, raw: object) -> tuple[Attachment, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise _bad(net, "cni.dev/valid-attachments", "must be a list")
    out = []
    for i, item in enumerate(raw):
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("containerID"), str)
            or not isinstance(item.get("ifname"), str)
        ):
            raise _bad(
                net, f"cni.dev/valid-attachments[{i}]", "needs containerID and ifname strings"
            )
        out.append(Attachment(container_id=item["containerID"], ifname=item["ifname"]))
    return tuple(out)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def render_result(result: AddResult, cni_version: str) -> dict[str, Any]:
    """The ADD result; 0.3.x/0.4.0 results carry `version: "4"` on each IP."""
    ip: dict[str, Any] = {
        "address": f"{result.address}/32",
        "gateway": str(GATEWAY),
        "interface": 1,
    }
    if _version_tuple(cni_version) < (1, 0, 0):
        ip = {"version": "4", **ip}
    return {
        "cniVersion": cni_version,
        "interfaces": [
            {"name": result.host_ifname, "mac": result.host_mac},
            {
                "name": result.container_ifname,
                "mac": result.container_mac,
                "sandbox": result.sandbox,
            },
        ],
        "ips": [ip],
        "routes": [{"dst": "0.0.0.0/0", "gw": str(GATEWAY)}],
        "dns": {},
    }


def version_result(cni_version: str = CURRENT_VERSION) -> dict[str, Any]:
    return {"cniVersion": cni_version, "supportedVersions": list(SUPPORTED_VERSIONS)}


def supports_check(cni_version: str) -> bool:
    return _version_tuple(cni_version) >= (0, 4, 0)


def supports_status_gc(cni_version: str) -> bool:
    return _version_tuple(cni_version) >= (1, 1, 0)
