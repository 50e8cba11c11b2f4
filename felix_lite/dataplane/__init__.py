"""The policy dataplane driver: programs a `policy.ruleset.Ruleset` into the
kernel with `ipset restore` and one `iptables-restore --noflush` per update.

Wired by the agent's main loop (one thread) and by `felix-lite policy
apply|flush|stats`. Layout contract: docs/policy-dataplane.md.
"""

from felix_lite.dataplane.applier import ApplyResult, Dataplane, ProgrammedState
from felix_lite.dataplane.backend import Backend, BackendMode, detect_backend
from felix_lite.dataplane.runner import CommandError, CommandRunner, SubprocessRunner
from felix_lite.dataplane.stats import RuleCounter, Stats, format_counters

__all__ = [
    "ApplyResult",
    "Backend",
    "BackendMode",
    "CommandError",
    "CommandRunner",
    "Dataplane",
    "ProgrammedState",
    "RuleCounter",
    "Stats",
    "SubprocessRunner",
    "detect_backend",
    "format_counters",
]
