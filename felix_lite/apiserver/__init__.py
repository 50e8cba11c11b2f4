"""Kubernetes API emulator for the lab and for informer tests.

No kube-apiserver can run on the lab machine, so this package serves enough
of the Kubernetes REST protocol (discovery, list/watch with resourceVersions,
410 Expired, bookmarks, CRUD, patches, selectors) for the official
`kubernetes` client to run unmodified against it over real HTTP. The lab runs
it as its own process (`python -m felix_lite.apiserver`); tests embed
`ApiServer` on 127.0.0.1. See docs/apiserver.md for what is and is not emulated.
"""

from felix_lite.apiserver.server import ApiServer, write_kubeconfig
from felix_lite.apiserver.store import RESOURCES, ApiError, ResourceType, Store, resource

__all__ = [
    "RESOURCES",
    "ApiError",
    "ApiServer",
    "ResourceType",
    "Store",
    "resource",
    "write_kubeconfig",
]
