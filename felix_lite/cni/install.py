"""`install-cni`: put felix-lite's CNI plugin and conflist on the host (the chart's init container).

The kubelet's container runtime, not our container, executes the plugin, on
the host, with the host's filesystem. A Python plugin therefore needs an
interpreter the host can run: with `--runtime-src` (the image's Python prefix,
`/usr/local` in python:*-slim) the whole prefix, felix-lite included, is copied
into a versioned directory on the host and the launcher in the CNI bin dir
execs it; without it (a host where felix-lite is pip-installed, the lab) the
launcher execs the interpreter running this installer.

Every file is written to a temporary name and renamed, so the runtime never
reads half a conflist or executes half a launcher. Files already identical are
left alone, so re-running on each pod start causes no churn.

    python -m felix_lite.cni.install --config /etc/felix-lite/config.yaml \
        --host-bin-dir /host/opt/cni/bin --host-conf-dir /host/etc/cni/net.d
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from felix_lite import __version__
from felix_lite.cni import netconf
from felix_lite.config import AgentConfig, ConfigError, load_config

log = logging.getLogger(__name__)

NETWORK_NAME = "k8s-pod-network"
CONFLIST_VERSION = "1.0.0"  # containerd 1.6/1.7 (libcni 1.1) accept up to 1.0.0
LAUNCHER_NAME = netconf.PLUGIN_TYPE  # the runtime looks the binary up by `type`
RUNTIME_KEEP = 2  # the current runtime and the previous one (a plugin may still run it)
_RUNTIME_SKIP = ("include", "share")

NodeCidrLookup = Callable[[str], str]
"""Node name -> Node.spec.podCIDR ("" while not yet allocated)."""


class InstallError(RuntimeError):
    """A failure with the setting or path that caused it."""


@dataclass(frozen=True)
class InstallPlan:
    """Everything one install writes; built from settings, then applied."""

    bin_dir: Path
    conf_dir: Path
    conf_name: str
    pod_cidr: str
    ipam_data_dir: str
    log_level: str
    chain_portmap: bool = False
    chain_bandwidth: bool = False
    mtu: int | None = None
    runtime_src: Path | None = None
    runtime_dir: Path | None = None
    plugins_src: Path | None = None


@dataclass(frozen=True)
class InstallResult:
    launcher: Path
    conflist: Path
    runtime: Path | None
    changed: tuple[str, ...]  # paths written this run (empty: already up to date)


def conflist(plan: InstallPlan) -> dict[str, Any]:
    """The network configuration list the runtime reads (felix-lite first, then chained)."""
    main: dict[str, Any] = {
        "type": netconf.PLUGIN_TYPE,
        "logLevel": plan.log_level,
        "ipam": {"podCIDR": plan.pod_cidr, "dataDir": plan.ipam_data_dir},
    }
    if plan.mtu is not None:
        main["mtu"] = plan.mtu
    plugins: list[dict[str, Any]] = [main]
    if plan.chain_portmap:
        plugins.append({"type": "portmap", "snat": True, "capabilities": {"portMappings": True}})
    if plan.chain_bandwidth:
        plugins.append({"type": "bandwidth", "capabilities": {"bandwidth": True}})
    return {"cniVersion": CONFLIST_VERSION, "name": NETWORK_NAME, "plugins": plugins}


def launcher_script(python: str, *, runtime: Path | None) -> str:
    """A POSIX sh launcher; `-I` keeps the host's PYTHONPATH and cwd out of the plugin."""
    lines = [
        "#!/bin/sh",
        f"# felix-lite {__version__} CNI plugin launcher, written by felix-lite install-cni.",
        "# Do not edit: the next install overwrites it.",
    ]
    if runtime is not None:
        lib = runtime / "lib"
        lines.append(f'LD_LIBRARY_PATH="{lib}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}"')
        lines.append("export LD_LIBRARY_PATH")
    lines.append(f'exec "{python}" -I -m felix_lite.cni.plugin "$@"')
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, data: bytes, *, mode: int) -> bool:
    """Write via a hidden temp file + rename; False when the file already holds `data`."""
    try:
        if path.read_bytes() == data and (path.stat().st_mode & 0o777) == mode:
            return False
    except OSError:
        pass
    # A leading dot and a .tmp suffix: no runtime loads it as a config or plugin.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return True


def runtime_digest(src: Path) -> str:
    """Identity of a runtime tree: paths, sizes and mtimes (a new image gives a new digest)."""
    h = hashlib.sha256(__version__.encode())
    for root, dirs, files in os.walk(src):
        dirs.sort()
        rel_root = Path(root).relative_to(src)
        if rel_root == Path("."):
            dirs[:] = [d for d in dirs if d not in _RUNTIME_SKIP]
        for name in sorted(files):
            if name.endswith(".pyc"):
                continue  # written lazily by imports; not part of the image's identity
            st = os.lstat(os.path.join(root, name))
            h.update(f"{rel_root / name}\0{st.st_size}\0{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:16]


def install_runtime(src: Path, runtime_dir: Path) -> tuple[Path, bool]:
    """Copy `src` to `runtime_dir/<version>-<digest>` once; prune older copies."""
    if not (src / "bin").is_dir():
        raise InstallError(f"--runtime-src {src}: not a Python prefix (no bin/)")
    runtime_dir.mkdir(parents=True, exist_ok=True)
    target = runtime_dir / f"{__version__}-{runtime_digest(src)}"
    changed = False
    if not target.is_dir():
        tmp = runtime_dir / f".{target.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(
            src,
            tmp,
            symlinks=True,
            ignore=lambda d, _names: _RUNTIME_SKIP if Path(d) == src else (),
        )
        os.replace(tmp, target)
        changed = True
        log.info("cni.install.runtime_copied src=%s dst=%s", src, target)
    os.utime(target)  # copytree kept the source's mtime; pruning orders by install time
    _prune_runtimes(runtime_dir, keep=target)
    return target, changed


def _prune_runtimes(runtime_dir: Path, *, keep: Path) -> None:
    others = sorted(
        (p for p in runtime_dir.iterdir() if p.is_dir() and p != keep),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for old in others[RUNTIME_KEEP - 1 :]:
        log.info("cni.install.runtime_pruned path=%s", old)
        shutil.rmtree(old, ignore_errors=True)


def _runtime_python(runtime: Path) -> str:
    for name in (f"python{sys.version_info.major}.{sys.version_info.minor}", "python3"):
        if (runtime / "bin" / name).exists():
            return str(runtime / "bin" / name)
    raise InstallError(f"runtime {runtime}: no bin/python3 in it")


def _ensure_chained(plan: InstallPlan) -> list[str]:
    """A chained plugin must exist in the bin dir; copy ours only where the host has none."""
    wanted = [
        name
        for name, on in (("portmap", plan.chain_portmap), ("bandwidth", plan.chain_bandwidth))
        if on
    ]
    written: list[str] = []
    for name in wanted:
        dst = plan.bin_dir / name
        if dst.exists():
            continue  # the host's own plugin (kubernetes-cni) wins: it matches the host
        src = plan.plugins_src / name if plan.plugins_src is not None else None
        if src is None or not src.is_file():
            raise InstallError(
                f"cni.chain{name.capitalize()}: plugin {name!r} is not in {plan.bin_dir}"
                f" and not in --plugins-src {plan.plugins_src}"
            )
        _write_atomic(dst, src.read_bytes(), mode=0o755)
        written.append(str(dst))
    return written


def install(plan: InstallPlan) -> InstallResult:
    """Runtime, launcher, chained plugins, then the conflist last (it makes the node Ready)."""
    for what, d in (("--host-bin-dir", plan.bin_dir), ("--host-conf-dir", plan.conf_dir)):
        if not d.is_dir():
            raise InstallError(f"{what} {d}: not a directory (is the hostPath mounted?)")
    changed: list[str] = []
    runtime: Path | None = None
    if plan.runtime_src is not None:
        if plan.runtime_dir is None:
            raise InstallError("--runtime-dir: required with --runtime-src")
        runtime, copied = install_runtime(plan.runtime_src, plan.runtime_dir)
        if copied:
            changed.append(str(runtime))
        python = _runtime_python(runtime)
    else:
        python = sys.executable
    launcher = plan.bin_dir / LAUNCHER_NAME
    if _write_atomic(launcher, launcher_script(python, runtime=runtime).encode(), mode=0o755):
        changed.append(str(launcher))
    changed += _ensure_chained(plan)
    doc = json.dumps(conflist(plan), indent=2, sort_keys=False) + "\n"
    conf = plan.conf_dir / plan.conf_name
    if _write_atomic(conf, doc.encode(), mode=0o644):
        changed.append(str(conf))
    log.info(
        "cni.install.done launcher=%s conflist=%s pod_cidr=%s changed=%d",
        launcher,
        conf,
        plan.pod_cidr,
        len(changed),
    )
    return InstallResult(launcher=launcher, conflist=conf, runtime=runtime, changed=tuple(changed))


def wait_pod_cidr(
    node: str,
    lookup: NodeCidrLookup,
    *,
    timeout: float,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> str:
    """Node.spec.podCIDR, polling until the controller-manager has allocated it."""
    if not node:
        raise InstallError("nodeName: empty and $NODE_NAME unset (set nodePodCIDR or NODE_NAME)")
    deadline = clock() + timeout
    delay = 1.0
    while True:
        try:
            cidr = lookup(node)
        except Exception as e:  # API not reachable yet: keep trying until the deadline
            log.warning("cni.install.node_lookup_failed node=%s error=%s", node, e)
            cidr = ""
        if cidr:
            try:
                return str(ipaddress.IPv4Network(cidr))
            except ValueError:
                raise InstallError(
                    f"node {node}: spec.podCIDR: {cidr!r} is not an IPv4 CIDR"
                ) from None
        if clock() >= deadline:
            raise InstallError(
                f"node {node}: spec.podCIDR: still empty after {timeout:.0f}s"
                " (does kube-controller-manager run with --allocate-node-cidrs?"
                " or set nodePodCIDR)"
            )
        log.info("cni.install.waiting_pod_cidr node=%s retry_in=%.0fs", node, delay)
        sleep(delay)
        delay = min(delay * 2, 10.0)


def kube_node_cidr_lookup(kubeconfig: str = "") -> NodeCidrLookup:
    """The real lookup: in-cluster service account, or a kubeconfig file."""
    from kubernetes import client, config

    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    else:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    api = client.CoreV1Api()

    def lookup(node: str) -> str:
        spec = api.read_node(node).spec
        return str(spec.pod_cidr or "") if spec is not None else ""

    return lookup


def plan_from_config(
    cfg: AgentConfig,
    *,
    bin_dir: Path,
    conf_dir: Path,
    pod_cidr: str,
    runtime_src: Path | None = None,
    runtime_dir: Path | None = None,
    plugins_src: Path | None = None,
    mtu: int | None = None,
) -> InstallPlan:
    return InstallPlan(
        bin_dir=bin_dir,
        conf_dir=conf_dir,
        conf_name=cfg.cni.conf_name,
        pod_cidr=pod_cidr,
        ipam_data_dir=cfg.cni.ipam_data_dir,
        log_level=cfg.log_level,
        chain_portmap=cfg.cni.chain_portmap,
        chain_bandwidth=cfg.cni.chain_bandwidth,
        mtu=mtu,
        runtime_src=runtime_src,
        runtime_dir=runtime_dir,
        plugins_src=plugins_src,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m felix_lite.cni.install",
        description="install felix-lite's CNI plugin launcher and conflist on the host",
    )
    p.add_argument("--config", default=None, help="agent settings YAML (felix_lite.config)")
    p.add_argument(
        "--host-bin-dir",
        "--bin-dir",
        dest="bin_dir",
        default=None,
        help="host CNI bin dir as mounted here (default: config cni.binDir)",
    )
    p.add_argument(
        "--host-conf-dir",
        "--conf-dir",
        dest="conf_dir",
        default=None,
        help="host CNI conf dir as mounted here (default: config cni.confDir)",
    )
    p.add_argument("--node-pod-cidr", default="", help="skip the Node lookup (default: config)")
    p.add_argument("--runtime-src", type=Path, default=None, help="Python prefix to copy")
    p.add_argument(
        "--runtime-dir",
        type=Path,
        default=Path("/var/lib/felix-lite/cni-runtime"),
        help="where the copied runtime lives; must be the same path on the host",
    )
    p.add_argument("--plugins-src", type=Path, default=None, help="portmap/bandwidth to copy")
    p.add_argument("--mtu", type=int, default=None, help="pod veth MTU (default: kernel's)")
    p.add_argument("--wait-seconds", type=float, default=600.0, help="for Node.spec.podCIDR")
    return p


def main(
    argv: Sequence[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    lookup: NodeCidrLookup | None = None,
) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    try:
        cfg = load_config(args.config, env)
        pod_cidr = args.node_pod_cidr or cfg.node_pod_cidr
        if not pod_cidr:
            pod_cidr = wait_pod_cidr(
                cfg.node_name,
                lookup or kube_node_cidr_lookup(cfg.kubeconfig),
                timeout=args.wait_seconds,
            )
        else:
            try:
                pod_cidr = str(ipaddress.IPv4Network(pod_cidr))
            except ValueError as e:
                raise InstallError(f"--node-pod-cidr: not an IPv4 CIDR: {e}") from None
        if args.mtu is not None and not 576 <= args.mtu <= 65535:
            raise InstallError(f"--mtu: must be 576..65535, got {args.mtu}")
        plan = plan_from_config(
            cfg,
            bin_dir=Path(args.bin_dir or cfg.cni.bin_dir),
            conf_dir=Path(args.conf_dir or cfg.cni.conf_dir),
            pod_cidr=pod_cidr,
            runtime_src=args.runtime_src,
            runtime_dir=args.runtime_dir if args.runtime_src is not None else None,
            plugins_src=args.plugins_src,
            mtu=args.mtu,
        )
        install(plan)
    except (ConfigError, InstallError, OSError) as e:
        print(f"felix-lite install-cni: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
