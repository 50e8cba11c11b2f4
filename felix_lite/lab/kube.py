"""A small JSON REST client for the lab's API emulator, reached inside its namespace.

The emulator lives in the lab's "control plane" namespace, unreachable from
the root namespace by design. The CLI creates each client socket on a thread
that entered that namespace (`netlab.nsutil`), then speaks plain HTTP/1.1 over
it: no route, no veth into the root namespace, and no `kubernetes` import
(a second of start-up per verb).
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from felix_lite.netlab.nsutil import sockets_in_netns

log = logging.getLogger(__name__)

Obj = dict[str, Any]


@dataclass(frozen=True)
class KindInfo:
    kind: str
    prefix: str  # /api/v1 or /apis/<group>/<version>
    plural: str
    namespaced: bool
    api_version: str


KINDS: dict[str, KindInfo] = {
    k.kind: k
    for k in (
        KindInfo("Namespace", "/api/v1", "namespaces", False, "v1"),
        KindInfo("Pod", "/api/v1", "pods", True, "v1"),
        KindInfo("Node", "/api/v1", "nodes", False, "v1"),
        KindInfo("Secret", "/api/v1", "secrets", True, "v1"),
        KindInfo(
            "NetworkPolicy",
            "/apis/networking.k8s.io/v1",
            "networkpolicies",
            True,
            "networking.k8s.io/v1",
        ),
        KindInfo(
            "BGPPeer", "/apis/felixlite.io/v1alpha1", "bgppeers", False, "felixlite.io/v1alpha1"
        ),
        KindInfo(
            "BGPConfiguration",
            "/apis/felixlite.io/v1alpha1",
            "bgpconfigurations",
            False,
            "felixlite.io/v1alpha1",
        ),
        KindInfo(
            "CustomResourceDefinition",
            "/apis/apiextensions.k8s.io/v1",
            "customresourcedefinitions",
            False,
            "apiextensions.k8s.io/v1",
        ),
    )
}


class ApiError(RuntimeError):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason


def kind_info(kind: str) -> KindInfo:
    try:
        return KINDS[kind]
    except KeyError:
        raise ValueError(f"kind {kind!r}: the lab handles {', '.join(sorted(KINDS))}") from None


def object_path(
    kind: str, name: str | None = None, *, namespace: str | None = None, sub: str = ""
) -> str:
    k = kind_info(kind)
    path = k.prefix
    if k.namespaced:
        if namespace is None and name is not None:
            raise ValueError(f"{kind} {name}: metadata.namespace: required")
        if namespace is not None:
            path += f"/namespaces/{quote(namespace)}"
    path += f"/{k.plural}"
    if name is not None:
        path += f"/{quote(name)}"
    if sub:
        path += f"/{sub}"
    return path


SocketFactory = Callable[[], socket.socket]


def netns_socket_factory(netns: str) -> SocketFactory:
    def make() -> socket.socket:
        return sockets_in_netns(netns, 1, type_=socket.SOCK_STREAM)[0]

    return make


def plain_socket_factory() -> socket.socket:
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM)


class KubeClient:
    """create/get/list/replace/patch/delete against one API server URL."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        socket_factory: SocketFactory = plain_socket_factory,
        timeout: float = 10.0,
    ) -> None:
        self.host = host
        self.port = port
        self._factory = socket_factory
        self._timeout = timeout

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        query: dict[str, str] | None = None,
    ) -> Obj:
        if query:
            path = f"{path}?{urlencode(query)}"
        sock = self._factory()
        sock.setblocking(True)
        sock.settimeout(self._timeout)
        try:
            sock.connect((self.host, self.port))
        except OSError as e:
            sock.close()
            raise ApiError(0, "Unreachable", f"{self.host}:{self.port}: {e}") from None
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self._timeout)
        conn.sock = sock
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = {"Accept": "application/json", "Connection": "close"}
            if data is not None:
                headers["Content-Type"] = content_type
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            out: Obj = json.loads(raw) if raw else {}
        except ValueError:
            out = {"message": raw.decode(errors="replace")}
        if resp.status >= 400:
            raise ApiError(resp.status, str(out.get("reason", "")), str(out.get("message", raw)))
        return out

    # --- verbs ---------------------------------------------------------------
    def create(self, obj: Obj) -> Obj:
        meta = obj.get("metadata") or {}
        return self.request("POST", object_path(obj["kind"], namespace=meta.get("namespace")), obj)

    def get(self, kind: str, name: str, *, namespace: str | None = None) -> Obj:
        return self.request("GET", object_path(kind, name, namespace=namespace))

    def list(self, kind: str, *, namespace: str | None = None, **query: str) -> Obj:
        return self.request("GET", object_path(kind, namespace=namespace), query=query or None)

    def replace(self, obj: Obj) -> Obj:
        meta = obj["metadata"]
        return self.request(
            "PUT",
            object_path(obj["kind"], meta["name"], namespace=meta.get("namespace")),
            obj,
        )

    def patch(
        self,
        kind: str,
        name: str,
        patch: Any,
        *,
        namespace: str | None = None,
        sub: str = "",
        json_patch: bool = False,
    ) -> Obj:
        ctype = "application/json-patch+json" if json_patch else "application/merge-patch+json"
        return self.request(
            "PATCH",
            object_path(kind, name, namespace=namespace, sub=sub),
            patch,
            content_type=ctype,
        )

    def delete(self, kind: str, name: str, *, namespace: str | None = None) -> Obj:
        return self.request("DELETE", object_path(kind, name, namespace=namespace))

    def healthy(self) -> bool:
        try:
            self.request("GET", "/healthz")
            return True
        except (ApiError, OSError, http.client.HTTPException):
            return False


def resource_version(obj: Obj) -> int:
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0
