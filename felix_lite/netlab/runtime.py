"""The container runtime's half of CNI, for the labs: run the plugin for one pod
in its node's namespace with the environment and network config kubelet's
runtime would give it. FabricLab and the lab's kubelet both wire pods this way."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from typing import Any


class PluginFailed(Exception):
    """The plugin exited non-zero; str() carries its exit code, result and stderr tail."""

    def __init__(self, rc: int, stdout: str, stderr: str) -> None:
        super().__init__(f"rc={rc}: {stdout.strip()} {stderr.strip()[-400:]}")
        self.rc = rc


def network_config(network: str, pod_cidr: str, ipam_dir: str) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": network,
        "type": "felix-lite",
        "ipam": {"podCIDR": pod_cidr, "dataDir": ipam_dir},
    }


def run_plugin(
    argv: Sequence[str],
    node_netns: str,
    command: str,
    conf: dict[str, Any],
    *,
    container_id: str,
    pod_netns: str,
    namespace: str,
    name: str,
    timeout: float = 30,
) -> dict[str, Any]:
    """The plugin's JSON result ({} for DEL/CHECK); PluginFailed when it fails."""
    env = dict(os.environ)
    env.update(
        {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": f"/var/run/netns/{pod_netns}",
            "CNI_IFNAME": "eth0",
            "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}",
            "CNI_PATH": "/usr/lib/cni",
        }
    )
    r = subprocess.run(
        ["ip", "netns", "exec", node_netns, *argv],
        input=json.dumps(conf),
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    if r.returncode != 0:
        raise PluginFailed(r.returncode, r.stdout, r.stderr)
    result: dict[str, Any] = json.loads(r.stdout) if r.stdout.strip() else {}
    return result
