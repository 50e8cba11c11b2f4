"""Which iptables backend (legacy or nft) the node uses.

Detected the way kube-proxy's iptables-wrapper and Calico do: the backend that
already holds kubelet's hint chains, else the one holding more Kubernetes (or
our own) rules, else more rules at all, else what `iptables --version` says
the system default is. Writing to the wrong backend would leave both rulesets
evaluated, so an explicit override (`legacy`/`nft`) wins over detection.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from felix_lite.dataplane.runner import CommandError, CommandRunner

log = logging.getLogger(__name__)

HINT_CHAINS = ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY")
_OURS_OR_KUBE = re.compile(r"^-A \S+ .*\b(KUBE-|FL-|cali-)|^-A (KUBE-|FL-|cali-)", re.MULTILINE)


class BackendMode(StrEnum):
    AUTO = "auto"
    LEGACY = "legacy"
    NFT = "nft"


@dataclass(frozen=True)
class Backend:
    mode: BackendMode
    iptables: str
    save: str
    restore: str

    @classmethod
    def of(cls, mode: BackendMode) -> Backend:
        if mode is BackendMode.AUTO:
            raise ValueError("backend: mode: auto must be resolved by detect_backend")
        suffix = mode.value
        return cls(
            mode=mode,
            iptables=f"iptables-{suffix}",
            save=f"iptables-{suffix}-save",
            restore=f"iptables-{suffix}-restore",
        )


def _save(runner: CommandRunner, mode: BackendMode, table: str | None = None) -> str:
    argv = [f"iptables-{mode.value}-save", *(["-t", table] if table else [])]
    try:
        return runner.run(argv)
    except (CommandError, OSError) as exc:
        log.debug("backend.save.failed mode=%s error=%s", mode.value, exc)
        return ""


def _has_hint(save_text: str) -> bool:
    return any(f":{c} " in save_text for c in HINT_CHAINS)


def detect_backend(runner: CommandRunner, mode: BackendMode = BackendMode.AUTO) -> Backend:
    if mode is not BackendMode.AUTO:
        return Backend.of(mode)
    modes = (BackendMode.LEGACY, BackendMode.NFT)
    hints = {m: _has_hint(_save(runner, m, "mangle")) for m in modes}
    if hints[BackendMode.NFT] != hints[BackendMode.LEGACY]:
        chosen = BackendMode.NFT if hints[BackendMode.NFT] else BackendMode.LEGACY
        log.info("backend.detected mode=%s reason=kubelet-hint", chosen.value)
        return Backend.of(chosen)
    saves = {m: _save(runner, m) for m in modes}
    counters: tuple[tuple[str, Callable[[str], int]], ...] = (
        ("kube-or-ours-rules", lambda t: len(_OURS_OR_KUBE.findall(t))),
        ("rules", lambda t: sum(1 for ln in t.splitlines() if ln.startswith("-A "))),
    )
    for reason, count in counters:
        n = {m: count(saves[m]) for m in modes}
        if n[BackendMode.LEGACY] != n[BackendMode.NFT]:
            chosen = max(modes, key=lambda m: n[m])
            log.info(
                "backend.detected mode=%s reason=%s legacy=%d nft=%d",
                chosen.value,
                reason,
                n[BackendMode.LEGACY],
                n[BackendMode.NFT],
            )
            return Backend.of(chosen)
    try:
        version = runner.run(["iptables", "--version"])
    except (CommandError, OSError):
        version = ""
    chosen = BackendMode.NFT if "nf_tables" in version else BackendMode.LEGACY
    log.info("backend.detected mode=%s reason=system-default", chosen.value)
    return Backend.of(chosen)
