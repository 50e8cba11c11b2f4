"""Shared test set-up: make the installed console scripts (felix-lite,
felix-lite-cni, exabgp) callable from subprocesses, whichever venv runs pytest,
the same way the felix-lite CLI does for its own children."""

from __future__ import annotations

from felix_lite.cli import own_bin_dir_on_path

own_bin_dir_on_path()
