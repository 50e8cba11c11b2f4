"""The policy dataplane driver: converge the kernel to a `Ruleset`.

Every apply reads the kernel's filter table (one `iptables-save`) and the list
of our sets, so it converges from any start: an empty namespace, a previous
felix-lite, a restart with no memory, or drift. Set *members* are read (one
`ipset save`) only when this process does not know them (first apply, after
an error); after that the sets this process wrote are trusted, since reading
large sets is the expensive part. A set of ours that appears in the kernel
unknown to a process that has synced is rewritten. Call `invalidate()` to force a full re-read.

A long-running caller (the agent, the benchmark) passes `trust_for=N`: for N
seconds after a full read, the next applies trust what this process itself
programmed and skip the `iptables-save`/`ipset list` reads (about 0.15 s on a
5,000-rule table), the way Calico's Felix trusts its own writes between
refreshes (IptablesRefreshInterval). Drift by others is then repaired at the
next full read; any failure drops the trust at once. The default (0) reads
every time, which is what a one-shot `felix-lite policy apply` wants.

One apply writes, in this order (docs/policy-dataplane.md):
1. `ipset restore`: create new sets, swap in new members of changed ones;
2. ONE `iptables-restore --noflush`: rewrite changed/new `FL-` chains, fix
   hook rules (exactly one copy each, at the top of FORWARD/INPUT), `-X` the
   `FL-` chains no longer wanted;
3. `ipset destroy` of `fl-` sets no longer wanted (now unreferenced).

Only `FL-` chains, `fl-` sets and rules carrying `felix-lite:hook` are ever
touched. Retrying is the caller's business: a failure raises after logging.

SCTP: when an iptables-restore that contains `-p sctp` rules fails, the
kernel's sctp match is probed once per process (a throwaway `FL-PROBE-SCTP`
chain). If it cannot be loaded, SCTP rules are dropped with a warning from
then on and the apply is retried, instead of failing every transaction;
policy rules only allow, so this fails closed for SCTP alone. No probe runs
while writes succeed (on the measured kernel the sctp match loads on both
backends).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from felix_lite.dataplane import ipsets, iptables
from felix_lite.dataplane.backend import Backend, BackendMode, detect_backend
from felix_lite.dataplane.runner import CommandError, CommandRunner, SubprocessRunner
from policy.names import ChainName, SetName, is_ours_chain, is_ours_set
from policy.render import (
    SetContent,
    drop_protocol_rules,
    hook_rule_spec,
    is_protocol_rule,
    iter_ipset_restore,
    render_ipset_destroy,
    render_iptables_restore,
    rule_hashes,
    set_content,
)
from policy.ruleset import Chain, HookRule, IpSetSpec, Ruleset

log = logging.getLogger(__name__)

PROBE_CHAIN = "FL-PROBE-SCTP"


@dataclass(frozen=True)
class ApplyResult:
    backend: str
    chains_written: tuple[str, ...] = ()
    chains_removed: tuple[str, ...] = ()
    hooks_rewritten: tuple[str, ...] = ()  # kernel chains whose hook rules were fixed
    sets_written: tuple[str, ...] = ()
    sets_removed: tuple[str, ...] = ()
    sctp_rules_dropped: int = 0
    iptables_restore_lines: int = 0
    timings: Mapping[str, float] = field(default_factory=dict)  # seconds per phase

    @property
    def changed(self) -> bool:
        return bool(
            self.chains_written
            or self.chains_removed
            or self.hooks_rewritten
            or self.sets_written
            or self.sets_removed
        )


@dataclass(frozen=True)
class ProgrammedState:
    """What the kernel holds of ours, for verification and `policy` CLI views."""

    chains: Mapping[str, tuple[str, ...]]  # FL- chain -> rule specs as iptables-save prints
    sets: Mapping[str, SetContent | None]  # fl- set -> content (None: unknown type)
    hooks: tuple[tuple[str, str], ...]  # (kernel chain, rule spec) in kernel order


class Dataplane:
    def __init__(
        self,
        *,
        backend: BackendMode | Backend = BackendMode.AUTO,
        runner: CommandRunner | None = None,
        clock: Callable[[], float] = time.perf_counter,
        trust_for: float = 0.0,
    ) -> None:
        self._runner: CommandRunner = runner if runner is not None else SubprocessRunner()
        self._backend_choice = backend
        self._backend: Backend | None = backend if isinstance(backend, Backend) else None
        self._clock = clock
        # Sets this process last wrote (or read): name -> normalised content.
        self._set_cache: dict[str, SetContent | None] = {}
        self._set_cache_valid = False
        self._sctp_supported: bool | None = None
        self._trust_for = trust_for
        # What this process last programmed, trusted until `_trusted_until`.
        self._trusted_until = float("-inf")
        self._chain_cache: dict[str, tuple[str, ...]] = {}
        self._kernel_sets_cache: set[str] = set()
        self._hash_memo: dict[object, tuple[str, ...]] = {}
        self._content_memo: dict[object, SetContent] = {}

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            choice = self._backend_choice
            assert isinstance(choice, BackendMode)
            self._backend = detect_backend(self._runner, choice)
        return self._backend

    def invalidate(self) -> None:
        """Forget cached set contents and trusted state; the next apply re-reads."""
        self._set_cache.clear()
        self._set_cache_valid = False
        self._trusted_until = float("-inf")

    def _hashes(self, chain: Chain) -> tuple[str, ...]:
        """rule_hashes(), memoised on the (immutable) Chain value: the compiler
        hands back the same Chain objects for what did not change."""
        got = self._hash_memo.get(chain)
        if got is None:
            if len(self._hash_memo) > 65536:
                self._hash_memo.clear()
            got = self._hash_memo[chain] = rule_hashes(chain)
        return got

    def _content(self, spec: IpSetSpec) -> SetContent:
        got = self._content_memo.get(spec)
        if got is None:
            if len(self._content_memo) > 65536:
                self._content_memo.clear()
            got = self._content_memo[spec] = set_content(spec)
        return got

    # ---- reads -------------------------------------------------------------

    def _read_table(self) -> iptables.SavedTable:
        return iptables.parse_save(self._runner.run([self.backend.save, "-t", "filter"]))

    def _read_set_names(self) -> set[str]:
        return ipsets.parse_list_names(self._runner.run(["ipset", "list", "-n"]))

    def _read_sets(self) -> dict[str, SetContent | None]:
        return ipsets.parse_save(self._runner.run(["ipset", "save"]))

    def programmed(self) -> ProgrammedState:
        table = self._read_table()
        return ProgrammedState(
            chains={n: tuple(r.spec for r in rules) for n, rules in table.our_chains().items()},
            sets=self._read_sets(),
            hooks=tuple((r.chain, r.spec) for r in table.hook_rules()),
        )

    # ---- apply -------------------------------------------------------------

    def apply(self, ruleset: Ruleset) -> ApplyResult:
        t0 = self._clock()
        _check_names(ruleset)
        try:
            try:
                return self._apply(ruleset, t0)
            except CommandError as exc:
                if not self._sctp_unsupported_now(ruleset, exc):
                    raise
                return self._apply(ruleset, t0)  # again, without the SCTP rules
        except Exception:
            self.invalidate()
            raise

    def _apply(self, ruleset: Ruleset, t0: float) -> ApplyResult:
        backend = self.backend
        ruleset, sctp_dropped = self._sctp_filter(ruleset)
        timings: dict[str, float] = {}

        trusted = t0 < self._trusted_until
        if trusted:
            current = dict(self._chain_cache)
            kernel_sets = set(self._kernel_sets_cache)
            hook_deletes: list[tuple[str, str]] = []
            hook_inserts: list[HookRule] = []
            hooks_fixed: list[str] = []
        else:
            table = self._read_table()
            kernel_sets = self._read_set_names()
            current = {
                n: tuple(r.rule_hash for r in rules) for n, rules in table.our_chains().items()
            }
            hook_deletes, hook_inserts, hooks_fixed = _hook_changes(table, ruleset.hooks)
            timings["read"] = self._clock() - t0

        # Sets: new ones, and existing ones whose members differ from what we know.
        for stale in set(self._set_cache) - kernel_sets:
            del self._set_cache[stale]
        wanted = {name: self._content(spec) for name, spec in ruleset.sets.items()}
        unknown = (kernel_sets & set(wanted)) - set(self._set_cache)
        if unknown and not self._set_cache_valid:
            t = self._clock()
            self._set_cache = {n: c for n, c in self._read_sets().items() if n in kernel_sets}
            self._set_cache_valid = True
            timings["read_sets"] = self._clock() - t
        sets_write = sorted(
            n for n, c in wanted.items() if n not in kernel_sets or self._set_cache.get(n) != c
        )
        sets_remove = sorted(kernel_sets - set(wanted))

        # Chains: by hash list.
        wanted_hashes = {n: self._hashes(c) for n, c in ruleset.chains.items()}
        chains_write = sorted(n for n, h in wanted_hashes.items() if current.get(n) != h)
        chains_remove = sorted(set(current) - set(ruleset.chains))

        restore_lines = 0
        ipset_job: _Job | None = None
        if sets_write:
            t = self._clock()
            delta = {
                n: self._set_cache[n]
                for n in sets_write
                if n in kernel_sets and _delta_ok(self._set_cache.get(n), wanted[n])
            }
            full = [SetName(n) for n in sets_write if n not in delta]
            fresh = [n for n in full if n not in kernel_sets]
            deltas = sorted(delta.items())

            def chunks() -> Iterator[str]:
                yield from iter_ipset_restore(ruleset, sets=full, fresh=fresh)
                for n, old in deltas:
                    yield _delta_lines(n, old, wanted[n])

            # `ipset restore` runs while this thread renders the iptables payload
            # (kernel tool and Python overlap on two cores); the iptables
            # transaction still starts only after the sets exist. Whole sets
            # (a first program, a resync) are big: they are streamed, so the tool
            # consumes them while they are still being rendered. Member deltas
            # (the steady state) are small: rendered here, so the two threads do
            # not contend for the interpreter on the latency-sensitive path.
            payload: str | Iterator[str] = chunks() if full else "".join(chunks())
            ipset_job = _Job(lambda: self._ipset_restore(payload))
        ipt_text = ""
        if chains_write or chains_remove or hooks_fixed:
            ipt_text = render_iptables_restore(
                ruleset,
                chains=[ChainName(n) for n in chains_write],
                remove=[ChainName(n) for n in chains_remove],
                hook_inserts=hook_inserts,
                hook_deletes=hook_deletes,
            )
        if ipset_job is not None:
            ipset_job.wait()
            self._set_cache.update({n: wanted[n] for n in sets_write})
            timings["ipset"] = self._clock() - t
        if ipt_text:
            t = self._clock()
            restore_lines = ipt_text.count("\n")
            self._iptables_restore(ipt_text)
            timings["iptables"] = self._clock() - t
        if sets_remove:
            t = self._clock()
            sets_remove = self._destroy_sets(sets_remove)
            timings["destroy"] = self._clock() - t
        self._set_cache_valid = True
        self._chain_cache = wanted_hashes
        self._kernel_sets_cache = (kernel_sets | set(sets_write)) - (
            set(sets_remove) if sets_remove else set()
        )
        if not trusted:
            self._trusted_until = t0 + self._trust_for
        timings["total"] = self._clock() - t0

        result = ApplyResult(
            backend=backend.mode.value,
            chains_written=tuple(chains_write),
            chains_removed=tuple(chains_remove),
            hooks_rewritten=tuple(hooks_fixed),
            sets_written=tuple(sets_write),
            sets_removed=tuple(sets_remove),
            sctp_rules_dropped=sctp_dropped,
            iptables_restore_lines=restore_lines,
            timings=timings,
        )
        log.info(
            "dataplane.apply backend=%s chains_written=%d chains_removed=%d hooks_fixed=%d "
            "sets_written=%d sets_removed=%d total_s=%.3f",
            result.backend,
            len(chains_write),
            len(chains_remove),
            len(hooks_fixed),
            len(sets_write),
            len(sets_remove),
            timings["total"],
        )
        return result

    def flush(self) -> None:
        """Remove every felix-lite hook rule, chain and set; leave others' alone."""
        table = self._read_table()
        ours = sorted(table.our_chains())
        hooks = [(r.chain, r.spec) for r in table.hook_rules()]
        if ours or hooks:
            self._iptables_restore(
                render_iptables_restore(
                    Ruleset(),
                    chains=[],
                    remove=[ChainName(n) for n in ours],
                    hook_deletes=hooks,
                )
            )
        sets = sorted(self._read_set_names())
        if sets:
            left = set(sets) - set(self._destroy_sets(sets))
            if left:
                raise RuntimeError(f"ipset: could not destroy {sorted(left)}")
        self.invalidate()
        log.info("dataplane.flush chains=%d hooks=%d sets=%d", len(ours), len(hooks), len(sets))

    # ---- writes ------------------------------------------------------------

    def _iptables_restore(self, text: str) -> None:
        argv = [self.backend.restore, "--noflush"]
        try:
            self._runner.run(argv, input=text)
        except CommandError as exc:
            log.error(
                "iptables.restore.failed backend=%s rc=%d stderr=%s input=\n%s",
                self.backend.mode.value,
                exc.rc,
                exc.stderr.strip(),
                iptables.numbered(text),
            )
            raise

    def _ipset_restore(self, payload: str | Iterable[str]) -> None:
        sent: list[str] = []

        def tee(parts: Iterable[str]) -> Iterator[str]:
            for part in parts:
                sent.append(part)
                yield part

        try:
            if isinstance(payload, str):
                sent.append(payload)
                self._runner.run(["ipset", "restore"], input=payload)
            elif hasattr(self._runner, "run_stream"):
                self._runner.run_stream(["ipset", "restore"], tee(payload))
            else:
                self._runner.run(["ipset", "restore"], input="".join(tee(payload)))
        except CommandError as exc:
            text = "".join(sent)
            log.error(
                "ipset.restore.failed rc=%d stderr=%s input=\n%s",
                exc.rc,
                exc.stderr.strip(),
                iptables.numbered(text),
            )
            raise

    def _destroy_sets(self, names: list[str]) -> list[str]:
        """Destroy sets; returns those destroyed. A set still referenced (by
        someone else's rule) is left with a warning and retried next apply."""
        try:
            self._runner.run(["ipset", "restore"], input=render_ipset_destroy(names))
            done = list(names)
        except CommandError:
            done = []
            for name in names:
                try:
                    self._runner.run(["ipset", "destroy", name])
                    done.append(name)
                except CommandError as exc:
                    log.warning("ipset.destroy.failed set=%s stderr=%s", name, exc.stderr.strip())
        for name in done:
            self._set_cache.pop(name, None)
        return done

    # ---- SCTP ----------------------------------------------------------------

    def _sctp_unsupported_now(self, ruleset: Ruleset, exc: CommandError) -> bool:
        """After a failed iptables-restore of a ruleset with SCTP rules, probe
        (once per process) whether the sctp match loads at all."""
        if self._sctp_supported is not None or self.backend.restore not in exc.argv:
            return False
        if not any(is_protocol_rule(r, "sctp") for c in ruleset.chains.values() for r in c.rules):
            return False
        self._sctp_supported = self._probe_sctp()
        return not self._sctp_supported

    def _sctp_filter(self, ruleset: Ruleset) -> tuple[Ruleset, int]:
        if self._sctp_supported is not False:
            return ruleset, 0
        filtered, dropped = drop_protocol_rules(ruleset, "sctp")
        for chain, rule in dropped:
            log.warning("dataplane.sctp.unsupported chain=%s rule=%r action=dropped", chain, rule)
        return filtered, len(dropped)

    def _probe_sctp(self) -> bool:
        probe = (
            f"*filter\n:{PROBE_CHAIN} - [0:0]\n"
            f"-A {PROBE_CHAIN} -p sctp -m sctp --dport 9 -j RETURN\nCOMMIT\n"
        )
        cleanup = f"*filter\n:{PROBE_CHAIN} - [0:0]\n-X {PROBE_CHAIN}\nCOMMIT\n"
        argv = [self.backend.restore, "--noflush"]
        try:
            self._runner.run(argv, input=probe)
            supported = True
        except CommandError as exc:
            log.warning("dataplane.sctp.probe supported=false stderr=%s", exc.stderr.strip())
            supported = False
        # If it was never created this fails; a leftover FL- chain is swept by apply anyway.
        with contextlib.suppress(CommandError):
            self._runner.run(argv, input=cleanup)
        log.info("dataplane.sctp.probe supported=%s", supported)
        return supported


def _check_names(ruleset: Ruleset) -> None:
    for name in ruleset.chains:
        if not is_ours_chain(name) or len(name) > 28:
            raise ValueError(f"chain {name}: name: must start with FL- and be <= 28 characters")
    for set_name in ruleset.sets:
        if not is_ours_set(set_name) or len(set_name) > 29:
            raise ValueError(f"ipset {set_name}: name: must start with fl- and be <= 29 characters")
    for h in ruleset.hooks:
        if h.table != "filter" or is_ours_chain(h.chain):
            raise ValueError(f"hook {h.table}/{h.chain}: chain: must be a kernel filter chain")


class _Job:
    """Runs `fn` on a thread; `wait()` joins it and re-raises its exception."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self._exc: BaseException | None = None

        def body() -> None:
            try:
                fn()
            except BaseException as e:  # re-raised in wait()
                self._exc = e

        self._thread = threading.Thread(target=body, name="ipset-restore", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        self._thread.join()
        if self._exc is not None:
            raise self._exc


def _delta_ok(old: SetContent | None, new: SetContent) -> bool:
    """Member changes can go as add/del lines (each atomic in the kernel) when
    the type is the same and no `nomatch` entry changes; a changed ipBlock
    except goes through temp-set + swap so no half-updated block is seen."""
    return old is not None and old.type == new.type and old.nomatch == new.nomatch


def _delta_lines(name: str, old: SetContent, new: SetContent) -> str:
    """Adds before deletes, so a member moving between entries is never absent."""
    adds = "".join(f"add {name} {m} -exist\n" for m in sorted(new.members - old.members))
    dels = "".join(f"del {name} {m} -exist\n" for m in sorted(old.members - new.members))
    return adds + dels


def _hook_changes(
    table: iptables.SavedTable, hooks: tuple[HookRule, ...]
) -> tuple[list[tuple[str, str]], list[HookRule], list[str]]:
    """Per kernel chain: keep our hooks if they are exactly the desired ones at
    the top in order; else delete every copy and insert the desired ones."""
    existing = table.hook_rules()
    chains = sorted({h.chain for h in hooks} | {r.chain for r in existing})
    deletes: list[tuple[str, str]] = []
    inserts: list[HookRule] = []
    fixed: list[str] = []
    for chain in chains:
        want = [h for h in hooks if h.chain == chain]
        have = [r for r in existing if r.chain == chain]
        top = table.chains.get(chain, ())[: len(want)]
        ok = len(have) == len(want) == len(top) and all(
            r.is_hook and _same_rule(r.spec, hook_rule_spec(h))
            for r, h in zip(top, want, strict=True)
        )
        if not ok:
            deletes += [(r.chain, r.spec) for r in have]
            inserts += want
            fixed.append(chain)
    return deletes, inserts, fixed


def _same_rule(saved_spec: str, rendered_spec: str) -> bool:
    return iptables.normalize_spec(saved_spec) == iptables.normalize_spec(rendered_spec)
