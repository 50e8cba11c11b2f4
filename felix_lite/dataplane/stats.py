"""Per-rule counters of our chains (`felix-lite policy stats`) and verification.

Reads only. On legacy hosts the counters come from python-iptables (libip4tc,
in-process, no fork per read); it cannot see iptables-nft rules, so nft hosts
parse `iptables-nft-save -c`. Both give the same `RuleCounter` list, and
`verify` checks a ruleset against that same read path, so what the stats view
shows is what was verified.

python-iptables works on the calling thread's network namespace; to read a
namespace (tests, the lab) the read runs on a short-lived thread that
`setns`es into it, leaving the rest of the process where it was.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from felix_lite.dataplane import ipsets
from felix_lite.dataplane.backend import Backend, BackendMode, detect_backend
from felix_lite.dataplane.iptables import normalize_spec, parse_save, strip_comment
from felix_lite.dataplane.runner import CommandRunner, SubprocessRunner
from felix_lite.nsenter import call_in_netns
from policy.names import HOOK_COMMENT, RULE_COMMENT_PREFIX, is_ours_chain
from policy.render import hook_rule_spec, rule_hashes
from policy.ruleset import Ruleset

T = TypeVar("T")


@dataclass(frozen=True)
class RuleCounter:
    chain: str
    rule: str  # rule text without the `-A CHAIN` prefix
    comment: str  # `fl:<hash>` in our chains, `felix-lite:hook` for hooks, "" if none
    packets: int
    bytes: int


def _iptc_rule_text(rule: Any) -> tuple[str, str]:
    """(rule text, comment) of a python-iptables Rule, close to iptables-save."""
    parts: list[str] = []

    def addr(flag: str, value: str) -> None:
        if value in ("0.0.0.0/0.0.0.0", "!0.0.0.0/0.0.0.0"):
            return
        neg = value.startswith("!")
        ip, _, mask = value.lstrip("!").partition("/")
        bits = bin(int.from_bytes(bytes(int(o) for o in mask.split(".")), "big")).count("1")
        parts.append(f"{'! ' if neg else ''}{flag} {ip}/{bits}")

    addr("-s", rule.src)
    addr("-d", rule.dst)
    for flag, value in (("-i", rule.in_interface), ("-o", rule.out_interface)):
        if value:
            neg = value.startswith("!")
            parts.append(f"{'! ' if neg else ''}{flag} {value.lstrip('!')}")
    if rule.protocol and rule.protocol != "ip":
        parts.append(f"-p {rule.protocol}")
    comment = ""
    for match in rule.matches:
        params: dict[str, list[str]] = match.get_all_parameters()
        if match.name == "comment":
            comment = " ".join(params.get("comment", []))
            continue
        parts.append(f"-m {match.name}")
        for key, values in params.items():
            neg = bool(values) and values[0] == "!"
            vals = values[1:] if neg else values
            parts.append(" ".join([*(["!"] if neg else []), f"--{key}", *vals]))
    target = rule.target
    if target is not None and target.name:
        parts.append(f"{'-g' if target.goto else '-j'} {target.name}")
        for key, values in target.get_all_parameters().items():
            parts.append(" ".join([f"--{key}", *values]))
    return " ".join(parts), comment


def _read_iptc() -> list[RuleCounter]:
    import iptc  # legacy-only; imported lazily so nft hosts never load libip4tc

    table = iptc.Table(iptc.Table.FILTER, autocommit=False)
    table.refresh()
    out: list[RuleCounter] = []
    for chain in table.chains:
        ours = is_ours_chain(chain.name)
        for rule in chain.rules:
            text, comment = _iptc_rule_text(rule)
            if not ours and comment != HOOK_COMMENT:
                continue
            packets, nbytes = rule.get_counters()
            out.append(RuleCounter(chain.name, text, comment, int(packets), int(nbytes)))
    return out


class Stats:
    def __init__(
        self,
        backend: Backend,
        *,
        runner: CommandRunner,
        netns: str | None = None,
    ) -> None:
        self._backend = backend
        self._runner = runner
        self._netns = netns

    @classmethod
    def detect(
        cls,
        mode: BackendMode = BackendMode.AUTO,
        *,
        runner: CommandRunner | None = None,
        netns: str | None = None,
    ) -> Stats:
        """Stats for the node's backend (detected like the applier does)."""
        real = runner if runner is not None else SubprocessRunner(netns=netns)
        return cls(detect_backend(real, mode), runner=real, netns=netns)

    def counters(self) -> list[RuleCounter]:
        """Our chains' rules and our hook rules, with packet/byte counters."""
        if self._backend.mode is BackendMode.LEGACY:
            return call_in_netns(self._netns, _read_iptc)
        table = parse_save(self._runner.run([self._backend.save, "-c", "-t", "filter"]))
        return [
            RuleCounter(
                chain=r.chain,
                rule=_without_our_comments(r.spec, r.comments),
                comment=next(
                    (c for c in r.comments if c.startswith(RULE_COMMENT_PREFIX)),
                    HOOK_COMMENT if r.is_hook else "",
                ),
                packets=r.packets,
                bytes=r.bytes,
            )
            for name, rules in table.chains.items()
            for r in rules
            if is_ours_chain(name) or r.is_hook
        ]

    def verify(self, ruleset: Ruleset) -> list[str]:
        """Differences between the kernel and `ruleset`; empty when in sync."""
        rows = self.counters()
        problems: list[str] = []
        got: dict[str, list[str]] = {}
        hooks: dict[str, list[str]] = {}
        for row in rows:
            if is_ours_chain(row.chain):
                got.setdefault(row.chain, []).append(row.comment)
            else:
                hooks.setdefault(row.chain, []).append(normalize_spec(row.rule))
        for chain_name, chain in sorted(ruleset.chains.items()):
            want = [f"{RULE_COMMENT_PREFIX}{h}" for h in rule_hashes(chain)]
            have = got.get(chain_name)
            if have is None and want:
                problems.append(f"chain {chain_name}: missing")
            elif have is not None and have != want:
                problems.append(
                    f"chain {chain_name}: rules differ (kernel {len(have)}, wanted {len(want)})"
                )
        for extra in sorted(set(got) - set(ruleset.chains)):
            problems.append(f"chain {extra}: not wanted")
        want_hooks: dict[str, list[str]] = {}
        for h in ruleset.hooks:
            want_hooks.setdefault(h.chain, []).append(normalize_spec(hook_rule_spec(h)))
        for kchain in sorted(set(want_hooks) | set(hooks)):
            have_hooks, wanted_hooks = hooks.get(kchain, []), want_hooks.get(kchain, [])
            if have_hooks != wanted_hooks:
                problems.append(f"hooks {kchain}: kernel {have_hooks}, wanted {wanted_hooks}")
        kernel_sets = ipsets.parse_list_names(self._runner.run(["ipset", "list", "-n"]))
        problems += [f"ipset {n}: missing" for n in sorted(set(ruleset.sets) - kernel_sets)]
        problems += [f"ipset {n}: not wanted" for n in sorted(kernel_sets - set(ruleset.sets))]
        return problems


def _without_our_comments(spec: str, comments: tuple[str, ...]) -> str:
    for c in comments:
        if c == HOOK_COMMENT or c.startswith(RULE_COMMENT_PREFIX):
            spec = strip_comment(spec, c)
    return " ".join(spec.split())


def format_counters(rows: Iterable[RuleCounter]) -> str:
    lines = [f"{'PACKETS':>10} {'BYTES':>12}  CHAIN / RULE"]
    lines += [f"{r.packets:>10} {r.bytes:>12}  {r.chain} {r.rule}" for r in rows]
    return "\n".join(lines) + "\n"
