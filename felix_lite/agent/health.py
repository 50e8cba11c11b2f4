"""The agent's HTTP endpoints: /livez, /readyz, /status (JSON) and /metrics.

A small threaded stdlib server per port: the chart probes healthPort on
127.0.0.1 and Prometheus scrapes metricsPort; when both ports are equal one
server serves every path. Handlers only read snapshots the loop publishes,
so a probe never waits on a kernel write. `stop()` closes the socket and
joins the thread, so SIGTERM is prompt.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = TEXT


Handler = Callable[[], Response]


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(status, (json.dumps(obj, indent=2) + "\n").encode(), JSON)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    routes: Mapping[str, Handler] = {}


class _RequestHandler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        handler = self.server.routes.get(path)
        if handler is None:
            resp = Response(404, f"no such path: {path}\n".encode())
        else:
            try:
                resp = handler()
            except Exception as e:  # a probe must get an answer, the agent must not die
                log.exception("health.handler.failed path=%s", path)
                resp = Response(500, f"internal error: {e}\n".encode())
        self.send_response(resp.status)
        self.send_header("Content-Type", resp.content_type)
        self.send_header("Content-Length", str(len(resp.body)))
        self.end_headers()
        self.wfile.write(resp.body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("health.request client=%s %s", self.client_address[0], format % args)


class HttpEndpoint:
    """Serves `routes` (path -> handler) on host:port (0: any free port)."""

    def __init__(
        self, routes: Mapping[str, Handler], *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self._routes = dict(routes)
        self._host = host
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> HttpEndpoint:
        server = _Server((self._host, self._port), _RequestHandler)
        server.routes = self._routes
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name=f"http-{self.port}",
            daemon=True,
        )
        self._thread.start()
        log.info(
            "health.listening address=%s port=%d paths=%s",
            self._host,
            self.port,
            ",".join(sorted(self._routes)),
        )
        return self

    @property
    def port(self) -> int:
        if self._server is None:
            return self._port
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}"

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def health_routes(
    *,
    live: Callable[[], bool],
    ready: Callable[[], bool],
    status: Callable[[], Mapping[str, Any]],
) -> dict[str, Handler]:
    """/livez (main loop heartbeat), /readyz (first full sync programmed), /status."""

    def livez() -> Response:
        return Response(200, b"ok\n") if live() else Response(503, b"main loop stalled\n")

    def readyz() -> Response:
        return Response(200, b"ok\n") if ready() else Response(503, b"not ready\n")

    return {
        "/livez": livez,
        "/healthz": livez,
        "/readyz": readyz,
        "/status": lambda: json_response(status()),
    }


def metrics_routes(render: Callable[[], bytes], content_type: str) -> dict[str, Handler]:
    return {"/metrics": lambda: Response(200, render(), content_type)}


def serve(routes_by_port: Mapping[int, Mapping[str, Handler]], *, host: str) -> list[HttpEndpoint]:
    """One endpoint per distinct port (routes of equal ports merged), started."""
    started: list[HttpEndpoint] = []
    try:
        for port, routes in routes_by_port.items():
            started.append(HttpEndpoint(routes, host=host, port=port).start())
    except BaseException:
        for ep in started:
            ep.stop()
        raise
    return started
