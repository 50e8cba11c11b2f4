"""`felix-lite bgp sidecar` and `felix-lite bgp render`.

The chart's `exabgp` container runs `felix-lite bgp sidecar --config FILE`
(the agent's settings: `bgp.exabgpConfigDir`) or `--config-dir DIR`: the agent
renders `exabgp.conf` and `exabgp.env` into DIR (a shared emptyDir) from
BGPPeer/BGPConfiguration; the sidecar waits for both, starts ExaBGP and
supervises it: when the agent re-renders the files (a peer added, removed or
changed) it sends ExaBGP SIGUSR1, ExaBGP's own configuration reload, so
sessions that did not change stay up; when ExaBGP dies it is started again
(graceful restart keeps the peers' routes meanwhile), and after too many deaths
in a row the sidecar exits non-zero so the kubelet restarts the container.
SIGTERM is passed on. ExaBGP never runs inside the agent: a stuck ExaBGP cannot
stall the dataplane, and vice versa.

`felix-lite bgp render` does the agent's rendering from a small YAML/JSON
settings file, for operators and for the lab.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
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


def _fingerprint(paths: Sequence[Path]) -> bytes:
    out = b""
    for p in paths:
        try:
            out += p.read_bytes() + b"\0"
        except OSError:
            out += b"missing\0"
    return out


class Supervisor:
    """Runs ExaBGP as a child: reload on config change, restart on death."""

    def __init__(
        self,
        config_dir: Path,
        *,
        exabgp: str = "exabgp",
        poll: float = 1.0,
        max_deaths: int = 5,
        death_window: float = 60.0,
        popen: Callable[..., subprocess.Popen[bytes]] = subprocess.Popen,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config_dir = config_dir
        self.exabgp = exabgp
        self.poll = poll
        self.max_deaths = max_deaths
        self.death_window = death_window
        self._popen = popen
        self._clock = clock
        self._stop = threading.Event()
        self.proc: subprocess.Popen[bytes] | None = None
        self.reloads = 0
        self.starts = 0

    def stop(self) -> None:
        self._stop.set()

    def _start(self, conf: Path, env: Path) -> None:
        argv = sidecar_argv(conf, env, exabgp=self.exabgp)
        log.info("fabric.sidecar.start argv=%s", " ".join(argv))
        self.proc = self._popen(argv)
        self.starts += 1

    def run(self, *, timeout: float = 300.0) -> int:
        conf, env = wait_for_config(self.config_dir, timeout=timeout)
        seen = _fingerprint((conf, env))
        self._start(conf, env)
        deaths: list[float] = []
        try:
            while not self._stop.wait(self.poll):
                assert self.proc is not None
                rc = self.proc.poll()
                if rc is not None:
                    now = self._clock()
                    deaths = [t for t in deaths if now - t < self.death_window] + [now]
                    log.warning("fabric.sidecar.exabgp.died rc=%s deaths=%d", rc, len(deaths))
                    if len(deaths) >= self.max_deaths:
                        log.error(
                            "fabric.sidecar.giving-up deaths=%d window_s=%.0f",
                            len(deaths),
                            self.death_window,
                        )
                        return 1
                    seen = _fingerprint((conf, env))
                    self._start(conf, env)
                    continue
                now_fp = _fingerprint((conf, env))
                if now_fp != seen:
                    seen = now_fp
                    self.reloads += 1
                    log.info("fabric.sidecar.reload pid=%d", self.proc.pid)
                    self.proc.send_signal(signal.SIGUSR1)
            return 0
        finally:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()


def _config_dir(args: argparse.Namespace) -> Path:
    if args.config:
        from felix_lite.config import load_config

        return Path(load_config(args.config).bgp.exabgp_config_dir)
    return Path(args.config_dir)


def _cmd_sidecar(args: argparse.Namespace) -> int:
    sup = Supervisor(_config_dir(args), exabgp=args.exabgp)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sup.stop())
    try:
        return sup.run(timeout=args.timeout)
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
    bgp = subparsers.add_parser("bgp", help="ExaBGP sidecar: run and reload it, render its config")
    sub = bgp.add_subparsers(dest="bgp_command", required=True)
    p = sub.add_parser(
        "sidecar", help="wait for the agent-rendered exabgp.conf, run and supervise exabgp"
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="the agent settings file (its bgp.exabgpConfigDir)",
    )
    p.add_argument("--config-dir", default="/var/run/felix-lite/exabgp")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the config")
    p.add_argument("--exabgp", default="exabgp", help="the exabgp executable")
    p.set_defaults(handler=_cmd_sidecar)
    p = sub.add_parser("render", help="render exabgp.conf/env from a settings YAML/JSON")
    p.add_argument("--settings", required=True, metavar="FILE")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--socket", default="/var/run/felix-lite/bgp.sock")
    p.set_defaults(handler=_cmd_render)
