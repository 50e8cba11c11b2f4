"""Restore text for a `Ruleset`: `iptables-restore --noflush` and `ipset restore`.

Pure functions; `felix_lite.dataplane` decides *what* to write (by diffing
the kernel against the ruleset) and calls these for *how*. Every rule in our
own chains carries `-m comment --comment "fl:<hash>"`, the hash covering the
chain, the rule's position and its text, so the applier can tell from
`iptables-save` which chains differ without comparing iptables' normalised
rule text with ours.

ipset scheme (correct whether or not the set exists, and after a crash that
left a temporary set behind):

    create NAME <type> family inet hashsize 1024 maxelem 1048576 -exist
    create TMP  <type> family inet hashsize 1024 maxelem 1048576 -exist
    flush TMP
    add TMP <member>            (`add TMP <cidr> nomatch` for excepts)
    swap TMP NAME
    destroy TMP

The set referenced by iptables never changes identity and is never empty in
between: the swap is atomic. TMP is NAME + `-t` (at most 31 characters,
starting `fl-`), so a leftover temporary set is recognised as ours and swept.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Final

from policy.names import (
    HOOK_COMMENT,
    RULE_COMMENT_PREFIX,
    SET_PREFIX,
    ChainName,
    SetName,
)
from policy.ruleset import Chain, HookRule, IpSetSpec, Ruleset, SetType

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_CANONICAL_IP: Final = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")
_CANONICAL_IP_PORT: Final = re.compile(
    rf"{_OCTET}(?:\.{_OCTET}){{3}},(?:tcp|udp|sctp):[1-9][0-9]{{0,4}}"
)

RULE_HASH_LEN: Final = 16
IPSET_MAX_NAME: Final = 31
TEMP_SET_SUFFIX: Final = "-t"
IPSET_CREATE_OPTIONS: Final = "family inet hashsize 1024 maxelem 1048576"


@functools.lru_cache(maxsize=1 << 17)
def rule_hash(chain: ChainName, index: int, rule: str) -> str:
    """Stable id of a rule at a position of a chain (16 hex)."""
    digest = hashlib.sha256(f"{chain}\x00{index}\x00{rule}".encode()).hexdigest()
    return digest[:RULE_HASH_LEN]


def rule_hashes(chain: Chain) -> tuple[str, ...]:
    return tuple(rule_hash(chain.name, i, r) for i, r in enumerate(chain.rules))


def chain_rule_lines(chain: Chain) -> list[str]:
    return [
        f'-A {chain.name} {rule} -m comment --comment "{RULE_COMMENT_PREFIX}{h}"'
        for rule, h in zip(chain.rules, rule_hashes(chain), strict=True)
    ]


def hook_rule_spec(hook: HookRule) -> str:
    """The hook's rule with our comment first, as it appears after `-A CHAIN`."""
    return f'-m comment --comment "{HOOK_COMMENT}" {hook.rule}'


def render_iptables_restore(
    ruleset: Ruleset,
    *,
    chains: Iterable[ChainName] | None = None,
    remove: Iterable[ChainName] = (),
    hook_inserts: Iterable[HookRule] = (),
    hook_deletes: Iterable[tuple[str, str]] = (),
) -> str:
    """One `*filter` transaction for `iptables-restore --noflush`.

    `chains` (default: all of the ruleset's) are declared, which flushes them,
    and refilled; `remove` chains are declared (flushed) and deleted last, so
    references from other removed chains are gone by then. `hook_deletes` are
    `(chain, rule spec as iptables-save prints it)` pairs of our hook rules to
    delete; `hook_inserts` go to the top of their kernel chain in the given
    order.
    """
    write = sorted(set(ruleset.chains if chains is None else chains))
    gone = sorted(set(remove) - set(write))
    inserts = list(hook_inserts)
    for h in inserts:
        if h.table != "filter":
            raise ValueError(f"hook {h.chain} {h.rule!r}: table: only 'filter' is supported")
    lines = ["*filter"]
    lines += [f":{name} - [0:0]" for name in [*write, *gone]]
    lines += [f"-D {chain} {spec}" for chain, spec in hook_deletes]
    for name in write:
        try:
            lines += chain_rule_lines(ruleset.chains[name])
        except KeyError:
            raise ValueError(f"chain {name}: not in the ruleset") from None
    position: dict[str, int] = {}
    for h in inserts:
        position[h.chain] = position.get(h.chain, 0) + 1
        lines.append(f"-I {h.chain} {position[h.chain]} {hook_rule_spec(h)}")
    lines += [f"-X {name}" for name in gone]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def temp_set_name(name: SetName) -> SetName:
    tmp = SetName(f"{name}{TEMP_SET_SUFFIX}")
    if len(tmp) > IPSET_MAX_NAME or not tmp.startswith(SET_PREFIX):
        raise ValueError(f"ipset {name}: name: temporary name {tmp} is not a valid fl- name")
    return tmp


def normalize_member(set_type: SetType, member: str) -> str:
    """The member as `ipset save` prints it, so sets can be compared and
    duplicates that the kernel would reject (`10.0.0.5/8` vs `10.0.0.0/8`) merged."""
    text = member.strip()
    if set_type is SetType.HASH_IP and _CANONICAL_IP.fullmatch(text):
        return text  # fast path: most members are plain pod IPs
    if set_type is SetType.HASH_IP_PORT and _CANONICAL_IP_PORT.fullmatch(text):
        return text  # fast path: named-port members as the compiler writes them
    if set_type is SetType.HASH_NET_IFACE:
        net_text, _, iface = text.partition(",")
        try:
            net = ipaddress.IPv4Network(net_text, strict=False)
        except ValueError:
            return text
        addr = str(net.network_address) if net.prefixlen == 32 else str(net)
        return f"{addr},{iface}"
    try:
        if set_type is SetType.HASH_NET:
            net = ipaddress.IPv4Network(text, strict=False)
            return str(net.network_address) if net.prefixlen == 32 else str(net)
        if set_type is SetType.HASH_IP:
            return str(ipaddress.IPv4Address(text.removesuffix("/32")))
        ip, _, port = text.partition(",")
        if port and ":" not in port:
            port = f"tcp:{port}"
        return f"{ipaddress.IPv4Address(ip)},{port.lower()}"
    except ValueError:
        return text


@dataclass(frozen=True)
class SetContent:
    """Normalised content of a set, comparable with what `ipset save` shows."""

    type: SetType
    members: frozenset[str]
    nomatch: frozenset[str]


_ALL_CANONICAL: Final = {
    SetType.HASH_IP: re.compile(rf"(?:{_CANONICAL_IP.pattern}\n)*"),
    SetType.HASH_IP_PORT: re.compile(rf"(?:{_CANONICAL_IP_PORT.pattern}\n)*"),
}


def _normalized(set_type: SetType, members: frozenset[str]) -> frozenset[str]:
    """Members as `ipset save` prints them. One regex pass over the joined text
    first: the compiler's pod-IP and named-port members are already canonical,
    and 30,000 per-member calls would cost more than the kernel's restore."""
    whole = _ALL_CANONICAL.get(set_type)
    if whole is not None and whole.fullmatch("".join(m + "\n" for m in members)):
        return members
    return frozenset(normalize_member(set_type, m) for m in members)


@functools.lru_cache(maxsize=16384)
def set_content(spec: IpSetSpec) -> SetContent:
    nomatch = _normalized(spec.type, spec.nomatch)
    members = _normalized(spec.type, spec.members) - nomatch
    return SetContent(type=spec.type, members=members, nomatch=nomatch)


def _create(name: str, set_type: SetType) -> str:
    return f"create {name} {set_type.value} {IPSET_CREATE_OPTIONS} -exist"


def iter_ipset_restore(
    ruleset: Ruleset,
    *,
    sets: Iterable[SetName] | None = None,
    fresh: Iterable[SetName] = (),
) -> Iterator[str]:
    """`render_ipset_restore`, one set's text at a time, so a caller can stream
    it to `ipset restore` while the rest is still being rendered."""
    names = sorted(set(ruleset.sets if sets is None else sets))
    direct = set(fresh)
    for name in names:
        try:
            spec = ruleset.sets[name]
        except KeyError:
            raise ValueError(f"ipset {name}: not in the ruleset") from None
        content = set_content(spec)
        target = name if name in direct else temp_set_name(name)
        lines = [_create(name, spec.type)]
        if target != name:
            lines.append(_create(target, spec.type))
        lines.append(f"flush {target}")
        lines += [f"add {target} {m}" for m in sorted(content.members)]
        lines += [f"add {target} {m} nomatch" for m in sorted(content.nomatch)]
        if target != name:
            lines.append(f"swap {target} {name}")
            lines.append(f"destroy {target}")
        yield "".join(line + "\n" for line in lines)


def render_ipset_restore(
    ruleset: Ruleset,
    *,
    sets: Iterable[SetName] | None = None,
    fresh: Iterable[SetName] = (),
) -> str:
    """`ipset restore` input that makes each of `sets` (default: all) hold
    exactly its members, whether it exists or not (see module docstring).

    Sets in `fresh` are known not to exist yet (nothing can reference them):
    they are filled in place (`create -exist`, `flush`, `add`), half the work
    of the swap. Still correct if one does exist, only not atomic."""
    return "".join(iter_ipset_restore(ruleset, sets=sets, fresh=fresh))


def render_ipset_destroy(names: Iterable[str]) -> str:
    return "".join(f"destroy {n}\n" for n in sorted(set(names)))


def is_protocol_rule(rule: str, protocol: str) -> bool:
    tokens = rule.split()
    return any(
        t in ("-p", "--protocol") and i + 1 < len(tokens) and tokens[i + 1].lower() == protocol
        for i, t in enumerate(tokens)
    )


def drop_protocol_rules(
    ruleset: Ruleset, protocol: str
) -> tuple[Ruleset, Sequence[tuple[ChainName, str]]]:
    """The ruleset without rules matching `-p <protocol>`, and what was dropped.

    Used when the kernel cannot load a protocol's match: policy rules only
    allow, so dropping one fails closed for that protocol instead of making the
    whole transaction fail.
    """
    dropped: list[tuple[ChainName, str]] = []
    chains: dict[ChainName, Chain] = {}
    for name, chain in ruleset.chains.items():
        keep = tuple(r for r in chain.rules if not is_protocol_rule(r, protocol))
        dropped += [(name, r) for r in chain.rules if is_protocol_rule(r, protocol)]
        chains[name] = chain if len(keep) == len(chain.rules) else replace(chain, rules=keep)
    return replace(ruleset, chains=chains), dropped


def render_human(ruleset: Ruleset) -> str:
    """Readable dump for `felix-lite policy render`."""
    out: list[str] = []
    out.append(f"# {len(ruleset.sets)} ipsets, {len(ruleset.chains)} chains")
    for h in ruleset.hooks:
        out.append(f"hook {h.table}/{h.chain}: {h.rule}")
    for set_name in sorted(ruleset.sets):
        spec = ruleset.sets[set_name]
        content = set_content(spec)
        desc = f"  # {spec.description}" if spec.description else ""
        out.append("")
        out.append(f"ipset {set_name} {spec.type.value} ({len(content.members)} members){desc}")
        out += [f"    {m}" for m in sorted(content.members)]
        out += [f"    {m} nomatch" for m in sorted(content.nomatch)]
    for name in sorted(ruleset.chains):
        chain = ruleset.chains[name]
        desc = f"  # {chain.description}" if chain.description else ""
        out.append("")
        out.append(f"chain {name} ({len(chain.rules)} rules){desc}")
        out += [f"  {i:>3}  {r}" for i, r in enumerate(chain.rules, start=1)]
    return "\n".join(out) + "\n"
