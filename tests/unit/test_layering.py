"""The layering rule: felix_lite -> controller -> policy, and policy does no I/O."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

FORBIDDEN = {
    "policy": {
        "controller",
        "felix_lite",
        "kubernetes",
        "pyroute2",
        "iptc",
        "subprocess",
        "socket",
        "time",
        "os",
        "pathlib",
        "threading",
        "asyncio",
        "shutil",
        "yaml",
    },
    "controller": {"felix_lite", "pyroute2", "iptc", "subprocess"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_import_direction() -> None:
    problems = []
    for package, forbidden in FORBIDDEN.items():
        files = sorted((ROOT / package).rglob("*.py"))
        assert files, f"{package}/ has no modules"
        for f in files:
            bad = _imports(f) & forbidden
            if bad:
                problems.append(f"{f.relative_to(ROOT)} imports {sorted(bad)}")
    assert not problems, "\n".join(problems)


def test_builtins_open_not_used_in_policy() -> None:
    for f in sorted((ROOT / "policy").rglob("*.py")):
        tree = ast.parse(f.read_text())
        calls = [
            n
            for n in ast.walk(tree)
            if isinstance(n, ast.Call)
            and isinstance(n.func, ast.Name)
            and n.func.id in {"open", "print", "input", "exec", "eval"}
        ]
        assert not calls, f"{f}: I/O builtin used"
