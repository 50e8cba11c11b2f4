"""Reading `iptables-save` output: our chains, their hash comments, our hooks.

The kernel (via iptables-save) prints rules normalised (`-p tcp --dport 80`
comes back as `-p tcp -m tcp --dport 80`), so our chains are compared by the
`fl:<hash>` comment on each rule, never by text. Hook rules in kernel chains
are found by the `felix-lite:hook` comment and compared by normalised text.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field

from policy.names import HOOK_COMMENT, RULE_COMMENT_PREFIX, is_ours_chain

_COUNTERS = re.compile(r"^\[(\d+):(\d+)\]\s+")
_COMMENT = re.compile(r'-m comment --comment (?:"((?:[^"\\]|\\.)*)"|(\S+))')
_IMPLICIT_PROTO_MATCH = re.compile(r"-p (tcp|udp|sctp|icmp) -m \1\b")


@dataclass(frozen=True)
class SavedRule:
    chain: str
    spec: str  # the text after `-A CHAIN `, as iptables-save prints it
    comments: tuple[str, ...] = ()
    packets: int = 0
    bytes: int = 0

    @property
    def rule_hash(self) -> str | None:
        for c in self.comments:
            if c.startswith(RULE_COMMENT_PREFIX):
                return c[len(RULE_COMMENT_PREFIX) :]
        return None

    @property
    def is_hook(self) -> bool:
        return HOOK_COMMENT in self.comments


@dataclass(frozen=True)
class SavedTable:
    """One table of an iptables-save dump; chains in declaration order."""

    name: str
    chains: Mapping[str, tuple[SavedRule, ...]] = field(default_factory=dict)

    def our_chains(self) -> dict[str, tuple[SavedRule, ...]]:
        return {n: rules for n, rules in self.chains.items() if is_ours_chain(n)}

    def hook_rules(self) -> list[SavedRule]:
        """Our hook rules in chains we do not own, in kernel order."""
        return [
            r
            for n, rules in self.chains.items()
            if not is_ours_chain(n)
            for r in rules
            if r.is_hook
        ]


def _comments(spec: str) -> tuple[str, ...]:
    out = []
    for m in _COMMENT.finditer(spec):
        quoted, bare = m.group(1), m.group(2)
        out.append(quoted.replace('\\"', '"') if quoted is not None else bare)
    return tuple(out)


def parse_save(text: str, table: str = "filter") -> SavedTable:
    """Parse `iptables-save [-c]` output, keeping only `table`."""
    chains: dict[str, list[SavedRule]] = {}
    current: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            current = line[1:]
            continue
        if current != table:
            continue
        if line.startswith(":"):
            chains.setdefault(line[1:].split()[0], [])
            continue
        packets = nbytes = 0
        m = _COUNTERS.match(line)
        if m:
            packets, nbytes = int(m.group(1)), int(m.group(2))
            line = line[m.end() :]
        if line.startswith("-A "):
            _, chain, *rest = line.split(" ", 2)
            spec = rest[0] if rest else ""
            rule = SavedRule(
                chain=chain, spec=spec, comments=_comments(spec), packets=packets, bytes=nbytes
            )
            chains.setdefault(chain, []).append(rule)
    return SavedTable(name=table, chains={n: tuple(r) for n, r in chains.items()})


def strip_comment(spec: str, comment: str) -> str:
    for form in (f'-m comment --comment "{comment}"', f"-m comment --comment {comment}"):
        spec = spec.replace(form, " ")
    return spec


def normalize_spec(spec: str) -> str:
    """Comparable form of a rule: our hook comment removed, the implicit
    `-m tcp|udp|sctp` iptables adds after `-p` removed, tokens re-joined."""
    text = _IMPLICIT_PROTO_MATCH.sub(r"-p \1", strip_comment(spec, HOOK_COMMENT))
    try:
        tokens = shlex.split(text)
    except ValueError:
        tokens = text.split()
    return " ".join(tokens)


def numbered(text: str) -> str:
    """Restore input with line numbers, matching iptables-restore's error messages."""
    return "\n".join(f"{i:>6}  {ln}" for i, ln in enumerate(text.splitlines(), start=1))
