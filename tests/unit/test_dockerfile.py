"""The image cannot be built here (no container engine), so check what it refers
to: the base, the packages, the sources it copies, the console scripts and
modules its commands and the chart's commands run, and that the install-cni
entry works with the chart's arguments against temp dirs."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from felix_lite import cli
from felix_lite.cni import install

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        buf += " " + stripped[:-1] if stripped.endswith("\\") else " " + stripped
        if not stripped.endswith("\\"):
            op, _, rest = buf.strip().partition(" ")
            out.append((op.upper(), rest.strip()))
            buf = ""
    assert buf == "", "Dockerfile ends inside a continuation"
    return out


def of(op: str) -> list[str]:
    return [args for o, args in instructions() if o == op]


def exec_form(args: str) -> list[str]:
    parsed = json.loads(args)
    assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed)
    return parsed


def parses_as_cli(argv: list[str]) -> bool:
    """argv (after `felix-lite`) is accepted by the real CLI parser."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            cli.build_parser().parse_args(argv)
    except SystemExit:
        return False
    return True


def test_base_image_is_python_311_slim() -> None:
    froms = of("FROM")
    assert len(froms) == 1
    assert re.fullmatch(r"python:3\.11-slim(-[a-z]+)?", froms[0])
    assert sys.version_info[:2] == (3, 11) or PYPROJECT["project"]["requires-python"] == ">=3.11"


def test_dataplane_packages_are_installed() -> None:
    runs = " ".join(of("RUN"))
    m = re.search(r"apt-get install -y --no-install-recommends ([^&]+)", runs)
    assert m, "apt-get install line"
    pkgs = set(m.group(1).split())
    # iptables carries both backends (iptables-legacy-restore, iptables-nft-restore).
    assert {"iptables", "ipset", "iproute2", "conntrack"} <= pkgs
    assert "containernetworking-plugins" in pkgs  # /usr/lib/cni/{portmap,bandwidth}
    assert "rm -rf /var/lib/apt/lists/*" in runs


def test_copied_sources_exist_and_are_not_ignored() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    copied = []
    for args in of("COPY"):
        *srcs, _dst = args.split()
        copied += srcs
    assert copied
    for src in copied:
        assert (ROOT / src).exists(), src
        assert src not in ignored, src
    # Every top-level package setuptools installs is copied in.
    for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert pattern.rstrip("*") in copied


def test_project_is_installed_into_the_system_prefix() -> None:
    """Not editable, not a venv: install-cni copies /usr/local (python image's prefix)."""
    runs = " ".join(of("RUN"))
    assert re.search(r"pip install --no-cache-dir \.(\s|$)", runs)
    assert "-e " not in runs and "venv" not in runs
    deps = " ".join(PYPROJECT["project"]["dependencies"])
    assert "exabgp" in deps  # the sidecar's daemon comes with the package


def test_modules_the_image_imports_exist() -> None:
    runs = " ".join(of("RUN"))
    m = re.search(r'python -c "import ([^"]+)"', runs)
    assert m
    for mod in (x.strip() for x in m.group(1).split(",")):
        assert importlib.util.find_spec(mod) is not None, mod


def test_default_command_is_a_console_script() -> None:
    (cmd,) = of("CMD")
    argv = exec_form(cmd)
    assert argv[0] in SCRIPTS
    assert SCRIPTS[argv[0]] == "felix_lite.cli:main"
    assert argv[1:] == ["agent", "--config", "/etc/felix-lite/config.yaml"]


def test_console_scripts_resolve() -> None:
    for name, target in SCRIPTS.items():
        module, _, func = target.partition(":")
        spec = importlib.util.find_spec(module)
        assert spec is not None, name
        mod = importlib.import_module(module)
        assert callable(getattr(mod, func)), name


def _chart_commands() -> dict[str, list[str]]:
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk not installed")
    with helm.Chart.load(str(ROOT / "charts" / "felix-lite")) as chart:
        out = chart.render(values={}, name="felix-lite", namespace="kube-system")
    ds = next(
        d
        for path, text in out.items()
        if not path.endswith("NOTES.txt")
        for d in yaml.safe_load_all(text)
        if isinstance(d, dict) and d.get("kind") == "DaemonSet"
    )
    pod: dict[str, Any] = ds["spec"]["template"]["spec"]
    return {c["name"]: c["command"] for c in pod["initContainers"] + pod["containers"]}


def test_chart_commands_exist_in_the_package() -> None:
    """Each container runs a console script with verbs the CLI has, or a real module."""
    for name, argv in _chart_commands().items():
        if argv[0] == "python":
            assert argv[1] == "-m"
            assert importlib.util.find_spec(argv[2]) is not None, name
        else:
            assert argv[0] in SCRIPTS, name
            assert parses_as_cli(argv[1:]), f"{name}: `{shlex.join(argv)}` not accepted by the CLI"


def test_operator_commands_in_notes_and_docs_exist() -> None:
    for argv in (["status"], ["policy", "stats"]):
        assert parses_as_cli(argv), shlex.join(["felix-lite", *argv])


def test_chart_sources_for_install_cni_match_the_image() -> None:
    argv = _chart_commands()["install-cni"]
    args = install.build_parser().parse_args(argv[3:])
    # python:*-slim installs Python (and, via `pip install .`, felix-lite) in /usr/local;
    # Debian's containernetworking-plugins puts its binaries in /usr/lib/cni.
    assert str(args.runtime_src) == "/usr/local"
    assert str(args.plugins_src) == "/usr/lib/cni"
    assert str(args.runtime_dir).startswith("/var/lib/felix-lite/")


def test_install_cni_entry_runs_with_the_chart_arguments(tmp_path: Path) -> None:
    """The chart's argv, host paths mapped into tmp_path, the runtime a symlinked
    interpreter: the installed launcher must answer CNI VERSION."""
    argv = _chart_commands()["install-cni"]
    args = install.build_parser().parse_args(argv[3:])
    prefix = tmp_path / "usr-local"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin" / "python3").symlink_to(sys.executable)
    mapped = {
        args.bin_dir: tmp_path / "opt-cni-bin",
        args.conf_dir: tmp_path / "etc-cni-net.d",
        str(args.runtime_src): prefix,
        str(args.runtime_dir): tmp_path / "runtime",
        str(args.plugins_src): Path("/nonexistent"),
    }
    for key in (args.bin_dir, args.conf_dir):
        mapped[key].mkdir()
    run = [mapped.get(a, a) for a in argv]
    cfg = run.index("--config")
    run[cfg + 1] = str(tmp_path / "config.yaml")
    (tmp_path / "config.yaml").write_text("logLevel: info\n")
    run = [sys.executable if a == "python" else str(a) for a in run]
    done = subprocess.run(
        [*run, "--node-pod-cidr", "10.244.4.0/24"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    launcher = mapped[args.bin_dir] / "felix-lite"
    assert str(tmp_path / "runtime") in launcher.read_text()
    out = subprocess.run(
        [str(launcher)],
        input=b"{}",
        env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "supportedVersions" in json.loads(out.stdout)
    conflist = json.loads((mapped[args.conf_dir] / "10-felix-lite.conflist").read_text())
    assert conflist["plugins"][0]["ipam"]["podCIDR"] == "10.244.4.0/24"
