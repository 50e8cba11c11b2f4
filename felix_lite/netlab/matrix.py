"""Reachability matrices, built and printed like the upstream e2e suite's.

Upstream (test/e2e/network/netpol) starts from a default for every cell and
applies expectations in order (`ExpectAllIngress`, `Expect(from, to, ...)`);
cell selectors here are `*` (every pod), `<ns>` (every pod of a namespace) or
`<ns>/<pod>`. Grids print `.` for connected and `X` for blocked; a comparison
grid prints `X` where expected and observed differ.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from felix_lite.netlab.probe import ProbeResult


def _matches(selector: str, name: str) -> bool:
    if selector == "*":
        return True
    if "/" in selector:
        return selector == name
    return name.split("/", 1)[0] == selector


@dataclass(frozen=True)
class Mismatch:
    src: str
    dst: str
    expected: bool
    observed: bool


class Reachability:
    """A from x to truth table over named endpoints (`ns/pod`)."""

    def __init__(self, names: Sequence[str], *, default: bool) -> None:
        self.names = list(names)
        self._cells = {(s, d): default for s in self.names for d in self.names}

    def set(self, frm: str, to: str, allow: bool) -> int:
        """Set every cell whose source matches `frm` and target `to`; returns how many."""
        n = 0
        for s in self.names:
            if not _matches(frm, s):
                continue
            for d in self.names:
                if _matches(to, d):
                    self._cells[(s, d)] = allow
                    n += 1
        return n

    def get(self, src: str, dst: str) -> bool:
        return self._cells[(src, dst)]

    @classmethod
    def from_results(cls, names: Sequence[str], results: Iterable[ProbeResult]) -> Reachability:
        r = cls(names, default=False)
        seen = set()
        for res in results:
            r._cells[(res.src, res.dst)] = res.connected
            seen.add((res.src, res.dst))
        missing = set(r._cells) - seen
        if missing:
            raise ValueError(f"reachability: no probe result for {sorted(missing)[:3]}...")
        return r

    def grid(self) -> str:
        return _grid(self.names, lambda s, d: "." if self.get(s, d) else "X")

    def compare(self, observed: Reachability) -> list[Mismatch]:
        return [
            Mismatch(s, d, self.get(s, d), observed.get(s, d))
            for s in self.names
            for d in self.names
            if self.get(s, d) != observed.get(s, d)
        ]

    def report(self, observed: Reachability, *, title: str = "") -> str:
        """Expected, observed and difference grids, upstream style."""
        wrong = {(m.src, m.dst) for m in self.compare(observed)}
        diff = _grid(self.names, lambda s, d: "X" if (s, d) in wrong else ".")
        head = f"{title}\n" if title else ""
        return (
            f"{head}expected:\n{self.grid()}\nobserved:\n{observed.grid()}\n"
            f"comparison (X = wrong), {len(wrong)} wrong of {len(self._cells)}:\n{diff}"
        )


def _grid(names: Sequence[str], cell: Callable[[str, str], str]) -> str:
    rows = ["\t".join(["-", *names])]
    for s in names:
        rows.append("\t".join([s, *(cell(s, d) for d in names)]))
    return "\n".join(rows)
