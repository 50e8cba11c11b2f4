"""HTTP front of the emulator: the Kubernetes REST protocol over a `Store`.

A stdlib ThreadingHTTPServer speaking HTTP/1.1 with keep-alive; watches are
chunked JSON lines, one event per chunk, flushed as they happen. `stop()`
closes the listener and every open connection (so clients see what an
apiserver restart looks like); `start()` again binds the same port.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import random
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

from felix_lite.apiserver.store import (
    RESOURCES,
    ApiError,
    Obj,
    PatchType,
    ResourceType,
    Store,
    resource_for,
)

log = logging.getLogger(__name__)

KUBE_VERSION = {
    "major": "1",
    "minor": "31",
    "gitVersion": "v1.31.0-felixlite",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2024-08-13T00:00:00Z",
    "goVersion": "go1.22.5",
    "compiler": "gc",
    "platform": "linux/amd64",
}

_VERBS_ALL = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
_FAIL_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    410: "Gone",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


def write_kubeconfig(path: str | Path, server_url: str, *, namespace: str = "default") -> Path:
    """A kubeconfig for `server_url` over plain http with no credentials."""
    p = Path(path)
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "felix-lite", "cluster": {"server": server_url}}],
        "users": [{"name": "felix-lite", "user": {}}],
        "contexts": [
            {
                "name": "felix-lite",
                "context": {"cluster": "felix-lite", "user": "felix-lite", "namespace": namespace},
            }
        ],
        "current-context": "felix-lite",
    }
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


# ------------------------------------------------------------------ discovery


def _groups() -> dict[str, list[ResourceType]]:
    out: dict[str, list[ResourceType]] = {}
    for rt in RESOURCES:
        out.setdefault(rt.api_version, []).append(rt)
    return out


def _resource_list(api_version: str) -> Obj:
    resources: list[Obj] = []
    for rt in _groups()[api_version]:
        entry: Obj = {
            "name": rt.plural,
            "singularName": rt.singular,
            "namespaced": rt.namespaced,
            "kind": rt.kind,
            "verbs": _VERBS_ALL,
        }
        if rt.short_names:
            entry["shortNames"] = list(rt.short_names)
        resources.append(entry)
        if rt.status_subresource:
            resources.append(
                {
                    "name": f"{rt.plural}/status",
                    "singularName": "",
                    "namespaced": rt.namespaced,
                    "kind": rt.kind,
                    "verbs": ["get", "patch", "update"],
                }
            )
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": api_version,
        "resources": resources,
    }


def _group_list() -> Obj:
    groups: dict[str, list[str]] = {}
    for rt in RESOURCES:
        if rt.group and rt.version not in groups.setdefault(rt.group, []):
            groups[rt.group].append(rt.version)
    return {
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [_group(g, vs) for g, vs in groups.items()],
    }


def _group(group: str, versions: list[str]) -> Obj:
    vs = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": group,
        "versions": vs,
        "preferredVersion": vs[0],
    }


# -------------------------------------------------------------------- server


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], api: ApiServer) -> None:
        self.api = api
        self.connections: set[socket.socket] = set()
        self.conn_lock = threading.Lock()
        super().__init__(addr, _Handler)


class ApiServer:
    """The emulator: a Store served on host:port, with test hooks.

    `state_path`: load the store from this JSON file if it exists, save to it
    (at most every `save_interval` seconds after a write) and on `stop()`.
    """

    def __init__(
        self,
        store: Store | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        state_path: str | Path | None = None,
        bookmark_interval: float = 60.0,
        default_watch_timeout: float = 1800.0,
        save_interval: float = 0.5,
    ) -> None:
        self.state_path = Path(state_path) if state_path else None
        if store is None:
            if self.state_path is not None and self.state_path.exists():
                store = Store.load(self.state_path)
            else:
                store = Store()
        self.store = store
        self.host = host
        self.port = port
        self.bookmark_interval = bookmark_interval
        self.default_watch_timeout = default_watch_timeout
        self.save_interval = save_interval
        self._httpd: _HTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._fail_lock = threading.Lock()
        self._fail: list[tuple[int, str | None, int | None]] = []
        self.requests = 0  # served API requests, for tests and logs

    # ---------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ApiServer:
        if self._httpd is not None:
            raise RuntimeError("apiserver already running")
        self._stop = threading.Event()
        self._httpd = _HTTPServer((self.host, self.port), self)
        self.port = self._httpd.server_address[1]
        serve = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"apiserver-{self.port}",
            daemon=True,
        )
        serve.start()
        self._threads = [serve]
        if self.state_path is not None:
            saver = threading.Thread(target=self._save_loop, name="apiserver-save", daemon=True)
            saver.start()
            self._threads.append(saver)
        log.info("apiserver.started url=%s rv=%d", self.url, self.store.resource_version)
        return self

    def stop(self) -> None:
        """Close the listener and every connection (watches end abruptly, as in a crash)."""
        httpd = self._httpd
        if httpd is None:
            return
        self._stop.set()
        self.store.wake_watchers()
        httpd.shutdown()
        httpd.server_close()
        with httpd.conn_lock:
            conns = list(httpd.connections)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(timeout=5)
        self._httpd = None
        if self.state_path is not None:
            self.save()
        log.info("apiserver.stopped url=%s", self.url)

    def restart(self, *, keep_state: bool = True) -> None:
        """Stop and start on the same port; without `keep_state` the cluster is empty again."""
        self.stop()
        if not keep_state:
            self.store = Store()
        self.start()

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def save(self) -> None:
        if self.state_path is not None:
            self.store.save(self.state_path)

    def _save_loop(self) -> None:
        dirty = self.store.dirty
        while not self._stop.is_set():
            if dirty.wait(timeout=0.2) and not self._stop.is_set():
                try:
                    self.save()
                except OSError as e:
                    log.error("apiserver.save.failed path=%s error=%s", self.state_path, e)
                self._stop.wait(self.save_interval)

    # -------------------------------------------------------------- hooks

    def set_fail(
        self,
        n: int,
        code: int = 500,
        *,
        path_contains: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        """Answer the next `n` API requests (optionally only those whose path contains
        `path_contains`) with a Status error `code`; discovery and health are spared.

        With `retry_after` the reply carries a Retry-After header, which makes the
        kubernetes client (like client-go) retry GETs by itself.
        """
        with self._fail_lock:
            self._fail = [(code, path_contains, retry_after)] * n

    def compact(self) -> None:
        self.store.compact()

    def _take_failure(self, path: str) -> ApiError | None:
        with self._fail_lock:
            for i, (code, needle, retry_after) in enumerate(self._fail):
                if needle is None or needle in path:
                    del self._fail[i]
                    err = ApiError(
                        code, _FAIL_REASONS.get(code, "InternalError"), f"injected failure ({code})"
                    )
                    err.retry_after = retry_after
                    return err
        return None

    @property
    def stopping(self) -> threading.Event:
        return self._stop


# ------------------------------------------------------------------- handler


class _Route:
    """A parsed resource URL."""

    def __init__(
        self, rt: ResourceType, namespace: str | None, name: str | None, subresource: str | None
    ) -> None:
        self.rt, self.namespace, self.name, self.subresource = rt, namespace, name, subresource


def _parse_route(parts: list[str]) -> _Route | None:
    """parts after /api/v1 or /apis/G/V, plus the group and version in front."""
    group, version, rest = parts[0], parts[1], parts[2:]
    if rest and rest[0] == "watch":  # legacy /watch/ paths
        rest = rest[1:]
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        candidate = resource_for(group, version, rest[2])
        if candidate is not None and candidate.namespaced:
            namespace, rest = rest[1], rest[2:]
    if not rest:
        return None
    rt = resource_for(group, version, rest[0])
    if rt is None or len(rest) > 3:
        return None
    if namespace is None and rt.namespaced and len(rest) > 1:
        return None  # a namespaced object needs /namespaces/NS/
    name = rest[1] if len(rest) > 1 else None
    sub = rest[2] if len(rest) > 2 else None
    if sub is not None and (sub != "status" or not rt.status_subresource):
        return None
    return _Route(rt, namespace, name, sub)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer
    server_version = "felix-lite-apiserver"

    def setup(self) -> None:
        super().setup()
        # Headers and body go out as separate writes: without NODELAY, Nagle plus the
        # client's delayed ACK add ~40 ms to every keep-alive request.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.conn_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        with self.server.conn_lock:
            self.server.connections.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("apiserver.http %s", format % args)

    # ------------------------------------------------------------ replies

    def _send_json(self, code: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body, separators=(",", ":")).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache, private")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_error(self, err: ApiError) -> None:
        headers = {"Retry-After": str(err.retry_after)} if err.retry_after is not None else None
        self._send_json(err.code, err.status(), headers)

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json_body(self) -> Any:
        raw = self._read_body()
        if not raw:
            raise ApiError(400, "BadRequest", "the request body is empty")
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise ApiError(400, "BadRequest", f"invalid JSON in request body: {e}") from e

    # ------------------------------------------------------------ dispatch

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        parts = [p for p in url.path.split("/") if p]
        try:
            if self.command == "GET" and self._discovery(parts):
                return
            api = self.server.api
            failure = api._take_failure(url.path)
            if failure is not None:
                self._read_body()
                raise failure
            with api._fail_lock:
                api.requests += 1
            route = self._route(parts)
            if route is None:
                self._read_body()
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            self._serve(route, query)
        except ApiError as e:
            self._send_error(e)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:
            log.exception("apiserver.request.failed method=%s path=%s", self.command, self.path)
            self._send_error(ApiError(500, "InternalError", f"internal error: {e}"))

    def _discovery(self, parts: list[str]) -> bool:
        body: Obj | None = None
        if parts in (["healthz"], ["readyz"], ["livez"]):
            data = b"ok"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return True
        if parts == ["version"]:
            body = KUBE_VERSION
        elif parts == ["api"]:
            body = {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {
                        "clientCIDR": "0.0.0.0/0",
                        "serverAddress": f"{self.server.api.host}:{self.server.api.port}",
                    }
                ],
            }
        elif parts == ["api", "v1"]:
            body = _resource_list("v1")
        elif parts == ["apis"]:
            body = _group_list()
        elif len(parts) == 2 and parts[0] == "apis":
            versions = sorted({rt.version for rt in RESOURCES if rt.group == parts[1]})
            if versions:
                body = _group(parts[1], versions)
        elif len(parts) == 3 and parts[0] == "apis" and f"{parts[1]}/{parts[2]}" in _groups():
            body = _resource_list(f"{parts[1]}/{parts[2]}")
        if body is None:
            return False
        self._send_json(200, body)
        return True

    @staticmethod
    def _route(parts: list[str]) -> _Route | None:
        if len(parts) >= 3 and parts[:2] == ["api", "v1"]:
            return _parse_route(["", "v1", *parts[2:]])
        if len(parts) >= 4 and parts[0] == "apis":
            return _parse_route(parts[1:])
        return None

    def _serve(self, r: _Route, q: dict[str, str]) -> None:
        store = self.server.api.store
        rt, cmd = r.rt, self.command
        dry_run = "dryRun" in q and q["dryRun"] == "All"
        if r.name is None:
            if (cmd == "GET" and q.get("watch") in ("1", "true", "True")) or (
                cmd == "GET" and "/watch/" in self.path
            ):
                self._watch(r, q)
            elif cmd == "GET":
                self._list(r, q)
            elif cmd == "POST":
                obj = self._json_body()
                self._send_json(201, store.create(rt, r.namespace, obj, dry_run=dry_run))
            elif cmd == "DELETE":
                self._read_body()
                gone = store.delete_collection(
                    rt,
                    namespace=r.namespace,
                    label_selector=q.get("labelSelector"),
                    field_selector=q.get("fieldSelector"),
                )
                self._send_json(
                    200,
                    {
                        "kind": rt.list_kind,
                        "apiVersion": rt.api_version,
                        "metadata": {"resourceVersion": str(store.resource_version)},
                        "items": gone,
                    },
                )
            else:
                raise ApiError(
                    405,
                    "MethodNotAllowed",
                    "the server does not allow this method on the requested resource",
                )
            return
        if cmd == "GET":
            self._send_json(200, store.get(rt, r.namespace, r.name, copy_=False))
        elif cmd == "PUT":
            obj = self._json_body()
            self._send_json(
                200, store.update(rt, r.namespace, r.name, obj, subresource=r.subresource)
            )
        elif cmd == "PATCH":
            self._patch(r)
        elif cmd == "DELETE" and r.subresource is None:
            raw = self._read_body()
            opts = json.loads(raw) if raw else {}
            self._send_json(
                200,
                store.delete(
                    rt, r.namespace, r.name, preconditions=(opts or {}).get("preconditions")
                ),
            )
        else:
            raise ApiError(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            )

    def _patch(self, r: _Route) -> None:
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        try:
            ptype = PatchType(ctype)
        except ValueError as e:
            self._read_body()
            raise ApiError(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format - accepted media "
                f"types include: {', '.join(p.value for p in PatchType)}",
            ) from e
        if ptype is PatchType.STRATEGIC and r.rt.custom:
            self._read_body()
            raise ApiError(
                415,
                "UnsupportedMediaType",
                "the body of the request was in an unknown format - accepted media "
                "types include: application/json-patch+json, "
                "application/merge-patch+json, application/apply-patch+yaml",
            )
        if ptype is PatchType.APPLY:
            try:
                body = yaml.safe_load(self._read_body() or b"{}")
            except yaml.YAMLError as e:
                raise ApiError(400, "BadRequest", f"invalid YAML in request body: {e}") from e
        else:
            body = self._json_body()
        obj = self.server.api.store.patch(
            r.rt, r.namespace, r.name or "", body, patch_type=ptype, subresource=r.subresource
        )
        self._send_json(200, obj)

    def _list(self, r: _Route, q: dict[str, str]) -> None:
        rt = r.rt
        items, rv = self.server.api.store.list(
            rt,
            namespace=r.namespace,
            label_selector=q.get("labelSelector"),
            field_selector=q.get("fieldSelector"),
            copy_=False,
        )
        meta: Obj = {"resourceVersion": str(rv)}
        cont = q.get("continue")
        if cont:
            try:
                token = json.loads(base64.urlsafe_b64decode(cont.encode()))
                after, meta["resourceVersion"] = tuple(token["after"]), token["rv"]
            except (ValueError, KeyError, TypeError) as e:
                raise ApiError(400, "BadRequest", "continue key is not valid") from e
            items = [
                o
                for o in items
                if (o["metadata"].get("namespace", ""), o["metadata"]["name"]) > after
            ]
        limit = int(q.get("limit") or 0)
        if limit > 0 and len(items) > limit:
            last = items[limit - 1]["metadata"]
            token = {
                "rv": meta["resourceVersion"],
                "after": [last.get("namespace", ""), last["name"]],
            }
            meta["continue"] = base64.urlsafe_b64encode(json.dumps(token).encode()).decode()
            meta["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        if not rt.custom:  # the apiserver omits kind/apiVersion on built-in list items
            items = [{k: v for k, v in o.items() if k not in ("kind", "apiVersion")} for o in items]
        self._send_json(
            200,
            {"kind": rt.list_kind, "apiVersion": rt.api_version, "metadata": meta, "items": items},
        )

    def _watch(self, r: _Route, q: dict[str, str]) -> None:
        api = self.server.api
        timeout = (
            float(q["timeoutSeconds"])
            if q.get("timeoutSeconds")
            else (api.default_watch_timeout * (1 + random.random()))
        )
        events: Iterator[Obj] = api.store.watch(
            r.rt,
            namespace=r.namespace,
            resource_version=q.get("resourceVersion"),
            label_selector=q.get("labelSelector"),
            field_selector=q.get("fieldSelector"),
            timeout=timeout,
            bookmarks=q.get("allowWatchBookmarks") in ("1", "true", "True"),
            bookmark_interval=api.bookmark_interval,
            send_initial_events=q.get("sendInitialEvents") in ("1", "true", "True"),
            stop=api.stopping,
        )
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        self.wfile.flush()
        try:
            for ev in events:
                line = json.dumps(ev, separators=(",", ":")).encode() + b"\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
            if api.stopping.is_set():
                self.close_connection = True
                return
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            self.close_connection = True
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()
