"""The compiler's output: ipsets and iptables chains for one node.

A `Ruleset` is a plain value. Rules are iptables argument strings as they
follow `-A <chain>` in iptables-restore input, without the hash comment (the
renderer adds it). `diff` tells which chains and sets an update must rewrite.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from policy.names import ChainName, SetName


class SetType(StrEnum):
    HASH_IP = "hash:ip"
    HASH_NET = "hash:net"
    HASH_IP_PORT = "hash:ip,port"
    HASH_NET_IFACE = "hash:net,iface"


@dataclass(frozen=True)
class IpSetSpec:
    name: SetName
    type: SetType
    members: frozenset[str] = frozenset()
    # hash:net entries added with `nomatch` (ipBlock excepts).
    nomatch: frozenset[str] = frozenset()
    # Human-readable identity for `policy render` output and debugging.
    description: str = ""


@dataclass(frozen=True)
class Chain:
    name: ChainName
    rules: tuple[str, ...] = ()
    description: str = ""


@dataclass(frozen=True)
class HookRule:
    """A rule we insert into a kernel chain (FORWARD, INPUT), found again by
    its comment (`names.HOOK_COMMENT`)."""

    table: str
    chain: str
    rule: str


@dataclass(frozen=True)
class Ruleset:
    sets: Mapping[SetName, IpSetSpec] = field(default_factory=dict)
    chains: Mapping[ChainName, Chain] = field(default_factory=dict)
    hooks: tuple[HookRule, ...] = ()


@dataclass(frozen=True)
class RulesetDiff:
    chains_added: frozenset[ChainName] = frozenset()
    chains_changed: frozenset[ChainName] = frozenset()
    chains_removed: frozenset[ChainName] = frozenset()
    sets_added: frozenset[SetName] = frozenset()
    sets_changed: frozenset[SetName] = frozenset()
    sets_removed: frozenset[SetName] = frozenset()

    @property
    def empty(self) -> bool:
        return not (
            self.chains_added
            or self.chains_changed
            or self.chains_removed
            or self.sets_added
            or self.sets_changed
            or self.sets_removed
        )


def diff(old: Ruleset | None, new: Ruleset) -> RulesetDiff:
    """What changed from `old` (None: nothing programmed) to `new`."""
    old_chains: Mapping[ChainName, Chain] = old.chains if old else {}
    old_sets: Mapping[SetName, IpSetSpec] = old.sets if old else {}
    return RulesetDiff(
        chains_added=frozenset(n for n in new.chains if n not in old_chains),
        chains_changed=frozenset(
            n for n, c in new.chains.items() if n in old_chains and old_chains[n] != c
        ),
        chains_removed=frozenset(n for n in old_chains if n not in new.chains),
        sets_added=frozenset(n for n in new.sets if n not in old_sets),
        sets_changed=frozenset(
            n for n, s in new.sets.items() if n in old_sets and old_sets[n] != s
        ),
        sets_removed=frozenset(n for n in old_sets if n not in new.sets),
    )
