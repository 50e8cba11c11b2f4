"""`felix-lite bgp sidecar` and `felix-lite bgp render`.

The chart's `exabgp` container runs `felix-lite bgp sidecar --config-dir DIR`:
the agent renders `exabgp.conf` and `exabgp.env` into DIR (a shared emptyDir)
from BGPPeer/BGPConfiguration, and the sidecar waits for both, then *execs*
ExaBGP, so ExaBGP is PID 1 of the container and the kubelet restarts it when
it dies (graceful restart keeps the routes meanwhile). It never runs inside
the agent: a stuck ExaBGP cannot stall the dataplane, and vice versa.

`felix-lite bgp render` does the agent's rendering from a small YAML/JSON
settings file, for operators and for the lab.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml

from felix_lite.bgp.config import BgpConfigError, BgpPeer, BgpSettings
from felix_lite.bgp.process import write_files

log = logging.getLogger(__name__)

CONFIG_NAME = "exabgp.conf"
ENV_NAME = "exabgp.env"

ExecFn = Callable[[str, Sequence[str], Mapping[str, str]], NoReturn]


def _exec(path: str, argv: Sequence[str], env: Mapping[str, str]) -> NoReturn:
    os.execvpe(path, list(argv), dict(env))


class SidecarTimeout(RuntimeError):
    pass


def wait_for_config(
    config_dir: Path,
    *,
    timeout: float,
    poll: float = 0.2,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[Path, Path]:
    """Both rendered files, once present and non-empty (the agent writes them
    by rename, so a present file is complete)."""
    conf, env = config_dir / CONFIG_NAME, config_dir / ENV_NAME
    deadline = clock() + timeout
    logged = False
    while True:
        if all(p.is_file() and p.stat().st_size > 0 for p in (conf, env)):
            return conf, env
        if clock() >= deadline:
            raise SidecarTimeout(
                f"sidecar {config_dir}: {CONFIG_NAME}/{ENV_NAME} not rendered within {timeout}s"
            )
        if not logged:
            log.info("fabric.sidecar.waiting dir=%s", config_dir)
            logged = True
        sleep(poll)


def sidecar_argv(conf: Path, env: Path, *, exabgp: str = "exabgp") -> list[str]:
    return [exabgp, "--env-file", str(env), "server", str(conf)]


def run_sidecar(
    config_dir: Path,
    *,
    timeout: float = 300.0,
    exabgp: str = "exabgp",
    environ: Mapping[str, str] | None = None,
    exec_fn: ExecFn = _exec,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> NoReturn:
    conf, env = wait_for_config(config_dir, timeout=timeout, clock=clock, sleep=sleep)
    argv = sidecar_argv(conf, env, exabgp=exabgp)
    log.info("fabric.sidecar.exec argv=%s", " ".join(argv))
    exec_fn(exabgp, argv, dict(os.environ if environ is None else environ))


def settings_from_dict(raw: Mapping[str, Any], *, source: str = "settings") -> BgpSettings:
    """camelCase settings (as in BGPConfiguration/BGPPeer) -> BgpSettings."""
    try:
        peers = tuple(
            BgpPeer(
                address=str(p["address"]),
                asn=int(p["asn"]),
                password=p.get("password"),
                multihop_ttl=p.get("multihopTTL"),
                hold_time=int(p.get("holdTime", 90)),
                graceful_restart=p.get("gracefulRestart", 120),
                passive=bool(p.get("passive", False)),
                max_prefix=int(p.get("maxPrefix", 100_000)),
            )
            for p in raw.get("peers", [])
        )
        return BgpSettings(
            node_name=str(raw["nodeName"]),
            router_id=str(raw["routerID"]),
            local_asn=int(raw["asn"]),
            local_address=str(raw["localAddress"]),
            peers=peers,
            pod_cidrs=tuple(raw.get("podCIDRs", ())),
            node_block=raw.get("nodeBlock"),
            aggregate=bool(raw.get("aggregate", False)),
            listen=bool(raw.get("listen", False)),
            env={str(k): str(v) for k, v in raw.get("env", {}).items()},
        )
    except KeyError as e:
        raise BgpConfigError(f"{source}: {e.args[0]}: required") from None
    except (TypeError, ValueError) as e:
        raise BgpConfigError(f"{source}: {e}") from None


def render_to(settings: BgpSettings, out_dir: Path, *, socket_path: str) -> list[Path]:
    """Write exabgp.conf/env atomically (temp + rename) so a waiting sidecar
    never reads half a file."""
    tmp = out_dir / ".render"
    files = write_files(settings, tmp, socket_path=socket_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for src, name in ((files.env, ENV_NAME), (files.config, CONFIG_NAME)):
        dst = out_dir / name
        os.replace(src, dst)
        written.append(dst)
    return written


def _cmd_sidecar(args: argparse.Namespace) -> int:
    try:
        run_sidecar(Path(args.config_dir), timeout=args.timeout, exabgp=args.exabgp)
    except SidecarTimeout as e:
        print(f"felix-lite: error: {e}", file=sys.stderr)
        return 1


def _cmd_render(args: argparse.Namespace) -> int:
    path = Path(args.settings)
    raw = (
        yaml.safe_load(path.read_text())
        if path.suffix in (".yaml", ".yml")
        else json.loads(path.read_text())
    )
    if not isinstance(raw, dict):
        raise BgpConfigError(f"settings {path}: top level must be a mapping")
    settings = settings_from_dict(raw, source=f"settings {path}")
    for p in render_to(settings, Path(args.out), socket_path=args.socket):
        print(p)
    return 0


def register(subparsers: Any) -> None:
    """Add `bgp sidecar` and `bgp render` to felix-lite's CLI (`handler` per command)."""
    bgp = subparsers.add_parser("bgp", help="ExaBGP sidecar: wait+exec, render its config")
    sub = bgp.add_subparsers(dest="bgp_command", required=True)
    p = sub.add_parser("sidecar", help="wait for the agent-rendered exabgp.conf, then exec exabgp")
    p.add_argument("--config-dir", default="/var/run/felix-lite/exabgp")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the config")
    p.add_argument("--exabgp", default="exabgp", help="the exabgp executable")
    p.set_defaults(handler=_cmd_sidecar)
    p = sub.add_parser("render", help="render exabgp.conf/env from a settings YAML/JSON")
    p.add_argument("--settings", required=True, metavar="FILE")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--socket", default="/var/run/felix-lite/bgp.sock")
    p.set_defaults(handler=_cmd_render)
