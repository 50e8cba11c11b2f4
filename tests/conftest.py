"""Shared test set-up: make the installed console scripts (felix-lite,
felix-lite-cni) callable from subprocesses, whichever venv runs pytest."""

from __future__ import annotations

import os
import sys
from pathlib import Path

_bin = str(Path(sys.executable).parent)
if _bin not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = _bin + os.pathsep + os.environ.get("PATH", "")
