"""Client construction: a kubeconfig file (the lab, a laptop) or in-cluster config
(the DaemonSet's service account). Each call builds its own `ApiClient`, never
the library's global default, so several agents can share one process (tests).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from kubernetes import client, config

log = logging.getLogger(__name__)

SERVICE_HOST_ENV = "KUBERNETES_SERVICE_HOST"


class KubeConfigError(RuntimeError):
    """No usable configuration: names what was tried."""


def api_client(
    kubeconfig: str | Path | None = None,
    *,
    context: str | None = None,
    in_cluster: bool | None = None,
) -> client.ApiClient:
    """An ApiClient from `kubeconfig`, else in-cluster, else ~/.kube/config ($KUBECONFIG).

    `in_cluster=True` forces the service-account config, `False` forbids it.
    """
    if kubeconfig is not None:
        path = Path(kubeconfig)
        if not path.is_file():
            raise KubeConfigError(f"kubeconfig {path}: no such file")
        log.info("kube.config source=kubeconfig path=%s context=%s", path, context)
        made: client.ApiClient = config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(path), context=context
        )
        return made
    use_cluster = in_cluster if in_cluster is not None else bool(os.environ.get(SERVICE_HOST_ENV))
    if use_cluster:
        cfg = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        except config.ConfigException as e:
            raise KubeConfigError(f"in-cluster config: {e}") from e
        log.info("kube.config source=in-cluster host=%s", cfg.host)
        return client.ApiClient(configuration=cfg)
    try:
        log.info("kube.config source=default-kubeconfig context=%s", context)
        default: client.ApiClient = config.new_client_from_config(  # type: ignore[no-untyped-call]
            context=context
        )
        return default
    except (config.ConfigException, OSError) as e:
        raise KubeConfigError(
            f"no kubeconfig given, not in a cluster (${SERVICE_HOST_ENV} unset), "
            f"and the default kubeconfig failed: {e}"
        ) from e
