"""`felix-lite-cni`: the CNI executable (ADD, DEL, CHECK, VERSION, STATUS, GC).

The runtime runs it with the node's network namespace current, CNI_* in the
environment and the network configuration on stdin; it answers with the spec's
result or error JSON on stdout. `run` holds the logic with its I/O seams as
parameters; `main` binds the real process I/O.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from felix_lite.cni import netconf
from felix_lite.cni.ipam import Allocation, Ipam, usable
from felix_lite.cni.netconf import (
    AddResult,
    CniEnv,
    CniError,
    Command,
    ErrorCode,
    NetConf,
)
from felix_lite.cni.wiring import Macs, PodLink, Wiring

log = logging.getLogger(__name__)

IpamFactory = Callable[[NetConf], Ipam]


class PodWiring(Protocol):
    """What the plugin needs from the kernel side (`wiring.Wiring`, or a fake)."""

    def add(self, link: PodLink) -> Macs: ...

    def remove(self, *, host_ifname: str, address: ipaddress.IPv4Address | None) -> None: ...

    def check(self, link: PodLink) -> None: ...

    def macs(self, link: PodLink) -> Macs: ...


def default_ipam(conf: NetConf) -> Ipam:
    return Ipam(conf.ipam_dir, conf.ipam.pod_cidr)


def _require(conf: NetConf, ok: bool, command: Command) -> None:
    if not ok:
        raise CniError(
            ErrorCode.INCOMPATIBLE_VERSION,
            f"{command.value} is not defined for cniVersion {conf.cni_version}",
        )


def _link(env: CniEnv, alloc: Allocation, conf: NetConf) -> PodLink:
    return PodLink(
        host_ifname=alloc.host_ifname or env.host_ifname,
        container_ifname=env.ifname,
        netns=env.netns,
        address=alloc.address,
        mtu=conf.mtu,
    )


def _cmd_add(env: CniEnv, conf: NetConf, ipam: Ipam, wiring: PodWiring) -> dict[str, Any]:
    if not os.path.exists(env.netns):
        raise CniError(
            ErrorCode.UNKNOWN_CONTAINER,
            f"env CNI_NETNS: network namespace {env.netns} does not exist",
        )
    pod = f"{env.pod_namespace}/{env.pod_name}" if env.pod_name else ""
    before = ipam.find(env.container_id, env.ifname)
    alloc = before or ipam.allocate(
        env.container_id, env.ifname, host_ifname=env.host_ifname, pod=pod
    )
    link = _link(env, alloc, conf)
    if before is not None:
        # A retried ADD of a complete attachment answers the same result.
        try:
            wiring.check(link)
            return _result(conf, link, wiring)
        except CniError:
            log.info("cni.add.retry_rewire container=%s", env.container_id)
    try:
        macs = wiring.add(link)
    except BaseException:
        try:
            wiring.remove(host_ifname=link.host_ifname, address=alloc.address)
        except Exception as exc:  # keep the original error for the runtime
            log.warning("cni.add.rollback_failed container=%s error=%s", env.container_id, exc)
        ipam.release(env.container_id, env.ifname)
        raise
    res = AddResult(
        host_ifname=link.host_ifname,
        host_mac=macs.host,
        container_ifname=link.container_ifname,
        container_mac=macs.container,
        sandbox=env.netns,
        address=alloc.address,
    )
    return netconf.render_result(res, conf.cni_version)


def _result(conf: NetConf, link: PodLink, wiring: PodWiring) -> dict[str, Any]:
    macs = wiring.macs(link)
    res = AddResult(
        host_ifname=link.host_ifname,
        host_mac=macs.host,
        container_ifname=link.container_ifname,
        container_mac=macs.container,
        sandbox=link.netns,
        address=link.address,
    )
    return netconf.render_result(res, conf.cni_version)


def _shared_host_link(ipam: Ipam, alloc: Allocation) -> bool:
    """Another attachment now owns the same host-side name (pod recreated)."""
    return any(
        other.host_ifname == alloc.host_ifname
        and (other.container_id, other.ifname) != (alloc.container_id, alloc.ifname)
        for other in ipam.list()
    )


def _teardown(ipam: Ipam, wiring: PodWiring, alloc: Allocation) -> None:
    host_ifname = "" if _shared_host_link(ipam, alloc) else alloc.host_ifname
    wiring.remove(host_ifname=host_ifname, address=alloc.address)
    ipam.release(alloc.container_id, alloc.ifname)


def _cmd_del(env: CniEnv, ipam: Ipam, wiring: PodWiring) -> None:
    alloc = ipam.find(env.container_id, env.ifname)
    if alloc is None:
        log.info("cni.del.unknown container=%s ifname=%s", env.container_id, env.ifname)
        return
    _teardown(ipam, wiring, alloc)


def _cmd_check(env: CniEnv, conf: NetConf, ipam: Ipam, wiring: PodWiring) -> None:
    _require(conf, netconf.supports_check(conf.cni_version), Command.CHECK)
    alloc = ipam.find(env.container_id, env.ifname)
    if alloc is None:
        raise CniError(
            ErrorCode.UNKNOWN_CONTAINER,
            f"check: no allocation for container {env.container_id} ifname {env.ifname}",
        )
    if conf.prev_result is not None:
        want = f"{alloc.address}/32"
        ips = conf.prev_result.get("ips") or []
        if not any(isinstance(ip, dict) and ip.get("address") == want for ip in ips):
            raise CniError(ErrorCode.CHECK_FAILED, f"check: prevResult.ips does not contain {want}")
    wiring.check(_link(env, alloc, conf))


def _cmd_status(conf: NetConf, ipam: Ipam) -> None:
    _require(conf, netconf.supports_status_gc(conf.cni_version), Command.STATUS)
    used = len(ipam.list())
    free = sum(1 for _ in usable(conf.ipam.pod_cidr)) - used
    if free <= 0:
        raise CniError(
            ErrorCode.PLUGIN_NOT_AVAILABLE, f"status: pod CIDR {conf.ipam.pod_cidr} is exhausted"
        )


def _cmd_gc(conf: NetConf, ipam: Ipam, wiring: PodWiring) -> None:
    _require(conf, netconf.supports_status_gc(conf.cni_version), Command.GC)
    if conf.valid_attachments is None:
        return  # nothing can be proven stale
    valid = {(a.container_id, a.ifname) for a in conf.valid_attachments}
    for alloc in ipam.list():
        if (alloc.container_id, alloc.ifname) not in valid:
            log.info("cni.gc.release container=%s ip=%s", alloc.container_id, alloc.address)
            _teardown(ipam, wiring, alloc)


def run(
    env: Mapping[str, str],
    stdin: bytes,
    *,
    wiring: PodWiring | None = None,
    ipam_factory: IpamFactory = default_ipam,
) -> tuple[int, dict[str, Any] | None]:
    """One plugin invocation: (exit code, JSON to print or None)."""
    version = netconf.CURRENT_VERSION
    try:
        cni_env = netconf.parse_env(env)
        if cni_env.command is Command.VERSION:
            return 0, netconf.version_result(_version_of(stdin))
        conf = netconf.parse_netconf(stdin)
        version = conf.cni_version
        logging.getLogger("felix_lite").setLevel(conf.log_level)
        if wiring is None:
            wiring = Wiring()
        ipam = ipam_factory(conf)
        started = time.monotonic()
        out: dict[str, Any] | None = None
        if cni_env.command is Command.ADD:
            out = _cmd_add(cni_env, conf, ipam, wiring)
        elif cni_env.command is Command.DEL:
            _cmd_del(cni_env, ipam, wiring)
        elif cni_env.command is Command.CHECK:
            _cmd_check(cni_env, conf, ipam, wiring)
        elif cni_env.command is Command.STATUS:
            _cmd_status(conf, ipam)
        elif cni_env.command is Command.GC:
            _cmd_gc(conf, ipam, wiring)
        log.info(
            "cni.%s.done container=%s ms=%.1f",
            cni_env.command.value.lower(),
            cni_env.container_id,
            (time.monotonic() - started) * 1000,
        )
        return 0, out
    except CniError as err:
        log.warning("cni.failed code=%d msg=%s details=%s", err.code, err.msg, err.details)
        return 1, err.to_json(version)
    except Exception as exc:
        log.exception("cni.internal_error")
        return 1, CniError(ErrorCode.INTERNAL, "felix-lite-cni: internal error", repr(exc)).to_json(
            version
        )


def _version_of(stdin: bytes) -> str:
    """VERSION answers in the caller's cniVersion when it sends one we know."""
    try:
        doc = json.loads(stdin) if stdin.strip() else {}
    except ValueError:
        return netconf.CURRENT_VERSION
    v = doc.get("cniVersion") if isinstance(doc, dict) else None
    return v if v in netconf.SUPPORTED_VERSIONS else netconf.CURRENT_VERSION


def main() -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    stdin = sys.stdin.buffer.read() if not sys.stdin.isatty() else b""
    code, out = run(os.environ, stdin)
    if out is not None:
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
    sys.exit(code)


if __name__ == "__main__":
    main()
