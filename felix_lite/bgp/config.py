"""Typed BGP settings and the pure renderer of ExaBGP 5.0.15's configuration.

The agent renders the sidecar's `exabgp.conf` and its environment file from
these settings, so a BGPPeer/BGPConfiguration change is a re-render plus a
sidecar restart (graceful restart keeps the routes meanwhile).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

PROCESS_NAME = "felix-lite"
"""Name of the API process block in exabgp.conf."""

DEFAULT_HOLD_TIME = 90
DEFAULT_MAX_PREFIX = 100_000

_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")


class BgpConfigError(ValueError):
    """Settings that cannot be rendered; the message names the object and field."""


@dataclass(frozen=True, slots=True)
class BgpPeer:
    """One BGP neighbour of this node."""

    address: str
    asn: int
    password: str | None = None
    multihop_ttl: int | None = None
    """Outgoing TTL for multihop eBGP; None keeps the kernel default."""
    hold_time: int = DEFAULT_HOLD_TIME
    graceful_restart: int | None = 120
    """Graceful-restart time in seconds advertised to the peer; None disables it."""
    passive: bool = False
    max_prefix: int = DEFAULT_MAX_PREFIX
    local_address: str | None = None
    """Per-peer source address; None uses BgpSettings.local_address."""


@dataclass(frozen=True, slots=True)
class BgpSettings:
    """Everything the sidecar and the speaker need to know about this node's BGP."""

    node_name: str
    router_id: str
    local_asn: int
    local_address: str
    peers: tuple[BgpPeer, ...] = ()
    pod_cidrs: tuple[str, ...] = ()
    """Prefixes that may be imported (and exported)."""
    node_block: str | None = None
    """This node's pod CIDR (announced as one prefix when aggregate is on)."""
    aggregate: bool = False
    listen: bool = False
    """Accept incoming sessions on TCP 179 of local_address (needed for passive peers)."""
    env: Mapping[str, str] = field(default_factory=dict)
    """Extra `exabgp.<section>.<option>` settings, e.g. {"exabgp.daemon.user": "root"}."""

    def peer(self, address: str) -> BgpPeer | None:
        for p in self.peers:
            if p.address == address:
                return p
        return None


def _where(settings: BgpSettings) -> str:
    return f"bgpsettings {settings.node_name}"


def _check_ip(value: str, what: str) -> None:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        raise BgpConfigError(f"{what}: {value!r} is not an IPv4 address") from None


def _check_asn(value: int, what: str) -> None:
    if not 1 <= value <= 4_294_967_295:
        raise BgpConfigError(f"{what}: {value} is not an ASN (1..4294967295)")


def validate(settings: BgpSettings) -> None:
    """Reject settings that ExaBGP would refuse or that make no sense, naming the field."""
    w = _where(settings)
    if not _NAME_RE.match(settings.node_name):
        raise BgpConfigError(f"{w}: node_name: must match {_NAME_RE.pattern}")
    _check_ip(settings.router_id, f"{w}: router_id")
    _check_ip(settings.local_address, f"{w}: local_address")
    _check_asn(settings.local_asn, f"{w}: local_asn")
    for i, cidr in enumerate(settings.pod_cidrs):
        try:
            ipaddress.IPv4Network(cidr)
        except ValueError:
            raise BgpConfigError(f"{w}: pod_cidrs[{i}]: {cidr!r} is not an IPv4 CIDR") from None
    if settings.node_block is not None:
        try:
            ipaddress.IPv4Network(settings.node_block)
        except ValueError:
            raise BgpConfigError(
                f"{w}: node_block: {settings.node_block!r} is not an IPv4 CIDR"
            ) from None
    seen: set[str] = set()
    for i, p in enumerate(settings.peers):
        pw = f"{w}: peers[{i}]"
        _check_ip(p.address, f"{pw}.address")
        if p.address in seen:
            raise BgpConfigError(f"{pw}.address: duplicate peer {p.address}")
        seen.add(p.address)
        _check_asn(p.asn, f"{pw}.asn")
        if p.local_address is not None:
            _check_ip(p.local_address, f"{pw}.local_address")
        if p.hold_time != 0 and not 3 <= p.hold_time <= 65535:
            raise BgpConfigError(f"{pw}.hold_time: must be 0 or 3..65535, got {p.hold_time}")
        if p.multihop_ttl is not None and not 1 <= p.multihop_ttl <= 255:
            raise BgpConfigError(f"{pw}.multihop_ttl: must be 1..255, got {p.multihop_ttl}")
        if p.graceful_restart is not None and not 0 <= p.graceful_restart <= 4095:
            raise BgpConfigError(
                f"{pw}.graceful_restart: must be 0..4095 seconds, got {p.graceful_restart}"
            )
        if p.max_prefix < 1:
            raise BgpConfigError(f"{pw}.max_prefix: must be >= 1, got {p.max_prefix}")
        if p.password is not None:
            if not p.password or len(p.password) > 80:
                raise BgpConfigError(f"{pw}.password: must be 1..80 characters")
            if any(c in p.password for c in '"\\;{}\n\r') or not p.password.isprintable():
                raise BgpConfigError(
                    f"{pw}.password: must be printable without quotes, backslash, ; {{ }}"
                )
        if p.passive and not settings.listen:
            raise BgpConfigError(f"{pw}.passive: a passive peer needs settings.listen=True")


def render_config(settings: BgpSettings, *, bridge_command: tuple[str, ...]) -> str:
    """Render exabgp.conf. `bridge_command` is the API process argv (absolute paths:
    the daemon chdirs to /)."""
    validate(settings)
    if not bridge_command or not bridge_command[0].startswith("/"):
        raise BgpConfigError(
            f"{_where(settings)}: bridge_command: first element must be an absolute path"
        )
    run = " ".join(_quote_arg(a) for a in bridge_command)
    out = [
        f"# rendered by felix-lite for node {settings.node_name}; do not edit",
        f"process {PROCESS_NAME} {{",
        f"    run {run};",
        "    encoder json;",
        "}",
        "",
    ]
    for p in settings.peers:
        out += [
            f"neighbor {p.address} {{",
            f'    description "{settings.node_name}";',
            f"    router-id {settings.router_id};",
            f"    local-address {p.local_address or settings.local_address};",
            f"    local-as {settings.local_asn};",
            f"    peer-as {p.asn};",
            f"    hold-time {p.hold_time};",
            f"    passive {'true' if p.passive else 'false'};",
            "    manual-eor true;",
            "    adj-rib-out true;",
        ]
        if p.multihop_ttl is not None:
            out.append(f"    outgoing-ttl {p.multihop_ttl};")
        if p.password is not None:
            out.append(f'    md5-password "{p.password}";')
        out += [
            "    family {",
            "        ipv4 unicast;",
            "    }",
            "    capability {",
            f"        graceful-restart {p.graceful_restart};"
            if p.graceful_restart is not None
            else "        graceful-restart disable;",
            "        route-refresh enable;",
            "    }",
            "    api {",
            f"        processes [ {PROCESS_NAME} ];",
            "        neighbor-changes;",
            "        receive {",
            "            parsed;",
            "            update;",
            "            notification;",
            "            refresh;",
            "        }",
            "    }",
            "}",
            "",
        ]
    return "\n".join(out)


def _quote_arg(arg: str) -> str:
    if not arg or any(c in arg for c in " \t\"';{}"):
        raise BgpConfigError(f"bridge_command: argument {arg!r} needs quoting; use a plain path")
    return arg


def env_settings(settings: BgpSettings) -> dict[str, str]:
    """The exabgp environment: JSON API with acks, no CLI pipes, logs to stderr."""
    env = {
        "exabgp.api.ack": "true",
        "exabgp.api.encoder": "json",
        "exabgp.api.respawn": "true",
        "exabgp.api.cli": "false",
        "exabgp.daemon.daemonize": "false",
        "exabgp.log.destination": "stderr",
        "exabgp.log.level": "INFO",
        # at INFO these log one line per route sent: 10k routes cost seconds
        "exabgp.log.processes": "false",
        "exabgp.log.statistics": "false",
        "exabgp.tcp.bind": settings.local_address if settings.listen else "",
        "exabgp.tcp.port": "179",
    }
    env.update(settings.env)
    return env


def render_env(settings: BgpSettings) -> str:
    """Render exabgp.env (INI sections, as `exabgp env` prints them)."""
    sections: dict[str, list[str]] = {}
    for key, value in sorted(env_settings(settings).items()):
        parts = key.split(".")
        if len(parts) != 3 or parts[0] != "exabgp":
            raise BgpConfigError(
                f"{_where(settings)}: env[{key!r}]: must be exabgp.<section>.<option>"
            )
        shown = value if value != "" else "''"
        sections.setdefault(f"exabgp.{parts[1]}", []).append(f"{parts[2]} = {shown}")
    lines: list[str] = []
    for name in sorted(sections):
        lines.append(f"[{name}]")
        lines.extend(sections[name])
        lines.append("")
    return "\n".join(lines)
