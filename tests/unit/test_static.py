"""The code rules CI enforces: ruff lint and format everywhere, mypy --strict on policy/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, check=False
    )


def test_ruff_clean() -> None:
    r = _run("ruff", "check", "policy", "controller", "felix_lite", "tests", "bench")
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_formatted() -> None:
    r = _run("ruff", "format", "--check", "policy", "controller", "felix_lite", "tests", "bench")
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_strict_policy() -> None:
    r = _run("mypy", "--strict", "policy")
    assert r.returncode == 0, r.stdout + r.stderr
