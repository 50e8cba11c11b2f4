"""Pure rendering of ExaBGP 5.0.15 API commands from desired vs announced prefixes.

Bulk `announce attributes next-hop self nlri P1 P2 ...` lines carry many
prefixes per command: ExaBGP's single thread is the throughput limit and one
prefix per command was measured 2.5x slower (LAB-NOTES). New announcements go
out before withdrawals so that switching to or from aggregation never leaves a
window where neither the block nor the /32 is announced.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet

DEFAULT_BATCH = 500

EOR = "announce eor ipv4 unicast"
ROUTE_REFRESH = "announce route-refresh ipv4 unicast"


def _net(prefix: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(prefix, strict=True)


def normalize_prefix(prefix: str) -> str:
    """`10.0.0.1` -> `10.0.0.1/32`; rejects host bits set (`10.0.0.1/24`)."""
    return str(_net(prefix if "/" in prefix else prefix + "/32"))


def sort_prefixes(prefixes: Iterable[str]) -> list[str]:
    """Numeric order, so command output is deterministic (golden tests)."""
    return sorted(prefixes, key=lambda p: (int(_net(p).network_address), _net(p).prefixlen))


def desired_prefixes(
    local_pod_ips: Iterable[str], node_block: str | None, aggregate: bool
) -> frozenset[str]:
    """What this node exports: every local pod /32, or with aggregation the node
    block plus /32s only for pods outside it (exceptions)."""
    pods = {normalize_prefix(ip) for ip in local_pod_ips}
    if not aggregate or node_block is None:
        return frozenset(pods)
    block = _net(node_block)
    outside = {p for p in pods if not _net(p).subnet_of(block)}
    return frozenset({str(block)} | outside)


def _prefix_selector(neighbor: str | None) -> str:
    return f"neighbor {neighbor} " if neighbor else ""


def _chunks(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def announce_lines(
    prefixes: Iterable[str], *, batch: int = DEFAULT_BATCH, neighbor: str | None = None
) -> list[str]:
    if batch < 1:
        raise ValueError(f"batch: must be >= 1, got {batch}")
    sel = _prefix_selector(neighbor)
    return [
        f"{sel}announce attributes next-hop self nlri {' '.join(chunk)}"
        for chunk in _chunks(sort_prefixes(prefixes), batch)
    ]


def withdraw_lines(
    prefixes: Iterable[str], *, batch: int = DEFAULT_BATCH, neighbor: str | None = None
) -> list[str]:
    if batch < 1:
        raise ValueError(f"batch: must be >= 1, got {batch}")
    sel = _prefix_selector(neighbor)
    return [
        f"{sel}withdraw attributes next-hop self nlri {' '.join(chunk)}"
        for chunk in _chunks(sort_prefixes(prefixes), batch)
    ]


def eor_line(neighbor: str | None = None) -> str:
    return _prefix_selector(neighbor) + EOR


def route_refresh_line(neighbor: str | None = None) -> str:
    return _prefix_selector(neighbor) + ROUTE_REFRESH


def diff_commands(
    desired: AbstractSet[str],
    announced: AbstractSet[str],
    *,
    batch: int = DEFAULT_BATCH,
) -> list[str]:
    """Commands that take ExaBGP from `announced` to `desired` (announces first)."""
    return announce_lines(desired - announced, batch=batch) + withdraw_lines(
        announced - desired, batch=batch
    )


def resync_commands(
    desired: AbstractSet[str],
    maybe_announced: AbstractSet[str],
    *,
    batch: int = DEFAULT_BATCH,
    neighbor: str | None = None,
) -> list[str]:
    """After a sidecar restart or a peer coming up: everything desired, withdraws
    of what we may have announced before and no longer want, then End-of-RIB
    (the config sets manual-eor, so the peer keeps stale routes until this)."""
    return (
        announce_lines(desired, batch=batch, neighbor=neighbor)
        + withdraw_lines(maybe_announced - desired, batch=batch, neighbor=neighbor)
        + [eor_line(neighbor)]
    )
