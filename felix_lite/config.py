"""The agent's settings file: one schema for the Helm chart's ConfigMap, the
lab and a hand-run agent (the chart renders exactly this YAML).

BGP peers, ASNs and the mesh are cluster objects (BGPPeer/BGPConfiguration),
not settings: they can change while the agent runs.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

BACKENDS = ("auto", "legacy", "nft")
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """`config FILE: field.path: message`."""


@dataclass(frozen=True)
class CniSettings:
    bin_dir: str = "/opt/cni/bin"
    conf_dir: str = "/etc/cni/net.d"
    conf_name: str = "10-felix-lite.conflist"
    ipam_data_dir: str = "/var/lib/felix-lite/ipam"
    chain_portmap: bool = False
    chain_bandwidth: bool = False


@dataclass(frozen=True)
class BgpAgentSettings:
    socket: str = "/var/run/felix-lite/bgp.sock"
    exabgp_config_dir: str = "/var/run/felix-lite/exabgp"
    router_id: str = ""  # empty: the node's InternalIP
    local_address: str = ""  # empty: the node's InternalIP


@dataclass(frozen=True)
class AgentConfig:
    node_name: str = ""  # empty: $NODE_NAME
    kubeconfig: str = ""  # empty: in-cluster service account
    iptables_backend: str = "auto"
    log_level: str = "info"
    health_port: int = 9099
    metrics_port: int = 9091
    resync_seconds: float = 60.0  # full kernel re-read period (trust window of our own writes)
    pod_cidrs: tuple[str, ...] = ("10.244.0.0/16",)  # the cluster's pod network (BGP import filter)
    node_pod_cidr: str = ""  # empty: Node.spec.podCIDR
    state_dir: str = "/var/run/felix-lite"
    cni: CniSettings = field(default_factory=CniSettings)
    bgp: BgpAgentSettings = field(default_factory=BgpAgentSettings)


# YAML (camelCase, like the chart's values) -> dataclass field names.
_KEYS: dict[str, str] = {
    "nodeName": "node_name",
    "kubeconfig": "kubeconfig",
    "iptablesBackend": "iptables_backend",
    "logLevel": "log_level",
    "healthPort": "health_port",
    "metricsPort": "metrics_port",
    "resyncSeconds": "resync_seconds",
    "podCIDRs": "pod_cidrs",
    "nodePodCIDR": "node_pod_cidr",
    "stateDir": "state_dir",
    "cni": "cni",
    "bgp": "bgp",
}
_CNI_KEYS = {
    "binDir": "bin_dir",
    "confDir": "conf_dir",
    "confName": "conf_name",
    "ipamDataDir": "ipam_data_dir",
    "chainPortmap": "chain_portmap",
    "chainBandwidth": "chain_bandwidth",
}
_BGP_KEYS = {
    "socket": "socket",
    "exabgpConfigDir": "exabgp_config_dir",
    "routerID": "router_id",
    "localAddress": "local_address",
}


def _sub(src: str, path: str, raw: Any, keys: Mapping[str, str], cls: type) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{src}: {path}: must be a mapping")
    kwargs: dict[str, Any] = {}
    types = {f.name: f.type for f in fields(cls)}
    for k, v in raw.items():
        if k not in keys:
            raise ConfigError(f"{src}: {path}.{k}: unknown setting")
        name = keys[k]
        want = types[name]
        if want == "bool" and not isinstance(v, bool):
            raise ConfigError(f"{src}: {path}.{k}: must be true or false")
        if want == "str" and not isinstance(v, str):
            raise ConfigError(f"{src}: {path}.{k}: must be a string")
        kwargs[name] = v
    return cls(**kwargs)


def _port(src: str, key: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
        raise ConfigError(f"{src}: {key}: must be a port number 1..65535, got {v!r}")
    return v


def _cidr(src: str, key: str, v: Any) -> str:
    try:
        return str(ipaddress.IPv4Network(str(v), strict=False))
    except ValueError as e:
        raise ConfigError(f"{src}: {key}: not an IPv4 CIDR: {e}") from None


def parse_config(raw: Mapping[str, Any] | None, *, source: str = "config") -> AgentConfig:
    raw = raw or {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: top level must be a mapping")
    kw: dict[str, Any] = {}
    for k, v in raw.items():
        if k not in _KEYS:
            raise ConfigError(f"{source}: {k}: unknown setting")
        kw[_KEYS[k]] = v
    if "cni" in kw:
        kw["cni"] = _sub(source, "cni", kw["cni"], _CNI_KEYS, CniSettings)
    if "bgp" in kw:
        kw["bgp"] = _sub(source, "bgp", kw["bgp"], _BGP_KEYS, BgpAgentSettings)
    if kw.get("iptables_backend", "auto") not in BACKENDS:
        raise ConfigError(
            f"{source}: iptablesBackend: must be one of {', '.join(BACKENDS)},"
            f" got {kw['iptables_backend']!r}"
        )
    level = str(kw.get("log_level", "info")).lower()
    if level not in LOG_LEVELS:
        raise ConfigError(f"{source}: logLevel: must be one of {', '.join(LOG_LEVELS)}")
    kw["log_level"] = level
    for key, name in (("healthPort", "health_port"), ("metricsPort", "metrics_port")):
        if name in kw:
            kw[name] = _port(source, key, kw[name])
    if "resync_seconds" in kw:
        v = kw["resync_seconds"]
        if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
            raise ConfigError(f"{source}: resyncSeconds: must be a number >= 0")
        kw["resync_seconds"] = float(v)
    if "pod_cidrs" in kw:
        v = kw["pod_cidrs"]
        if not isinstance(v, list) or not v:
            raise ConfigError(f"{source}: podCIDRs: must be a non-empty list of CIDRs")
        kw["pod_cidrs"] = tuple(_cidr(source, f"podCIDRs[{i}]", c) for i, c in enumerate(v))
    if kw.get("node_pod_cidr"):
        kw["node_pod_cidr"] = _cidr(source, "nodePodCIDR", kw["node_pod_cidr"])
    for name in ("node_name", "kubeconfig", "state_dir"):
        if name in kw and not isinstance(kw[name], str):
            raise ConfigError(f"{source}: {name}: must be a string")
    return AgentConfig(**kw)


def load_config(path: str | Path | None, env: Mapping[str, str] | None = None) -> AgentConfig:
    """The settings file (None: all defaults), then $NODE_NAME if nodeName is empty."""
    env = os.environ if env is None else env
    if path is None:
        cfg = AgentConfig()
    else:
        p = Path(path)
        try:
            raw = yaml.safe_load(p.read_text())
        except OSError as e:
            raise ConfigError(f"config {p}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config {p}: not valid YAML: {e}") from None
        cfg = parse_config(raw, source=f"config {p}")
    if not cfg.node_name and env.get("NODE_NAME"):
        from dataclasses import replace

        cfg = replace(cfg, node_name=env["NODE_NAME"])
    return cfg


def to_yaml_dict(cfg: AgentConfig) -> dict[str, Any]:
    """The camelCase document `parse_config` reads (for the lab and golden tests)."""
    inv = {v: k for k, v in _KEYS.items()}
    out: dict[str, Any] = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if f.name == "cni":
            v = {k: getattr(v, n) for k, n in _CNI_KEYS.items()}
        elif f.name == "bgp":
            v = {k: getattr(v, n) for k, n in _BGP_KEYS.items()}
        elif isinstance(v, tuple):
            v = list(v)
        out[inv[f.name]] = v
    return out
