"""Kubernetes Events about objects the agent rejects (core/v1 Event, type Warning).

Events are how an operator learns, with `kubectl describe`, that a policy they
applied is not what is enforced. Posting is best effort: it runs on its own
thread behind a bounded queue, is deduplicated (same object, reason and
message within `dedupe_window`) and rate-limited, and a failure to post is
logged, never raised, so a broken apiserver cannot stall the informers.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

log = logging.getLogger(__name__)

COMPONENT = "felix-lite"
CLUSTER_SCOPED_EVENT_NAMESPACE = "default"
"""Where Events about cluster-scoped objects go (kubectl looks there too)."""


@dataclass(frozen=True)
class ObjectRef:
    """The `involvedObject` of an Event."""

    kind: str  # API kind, e.g. "NetworkPolicy"
    api_version: str
    namespace: str | None
    name: str
    uid: str | None = None
    resource_version: str | None = None

    @property
    def display(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name


class EventPoster(Protocol):
    """The one call made to the API: create an Event in a namespace."""

    def __call__(self, namespace: str, body: dict[str, Any]) -> None: ...


class EventSink(Protocol):
    """What the cache needs: report a warning about an object."""

    def warn(self, ref: ObjectRef, *, reason: str, message: str) -> bool: ...


def core_v1_poster(core_api: Any, *, request_timeout: float = 5.0) -> EventPoster:
    """A poster over `kubernetes.client.CoreV1Api.create_namespaced_event`."""

    def post(namespace: str, body: dict[str, Any]) -> None:
        core_api.create_namespaced_event(namespace, body, _request_timeout=request_timeout)

    return post


def event_body(
    ref: ObjectRef,
    *,
    reason: str,
    message: str,
    component: str,
    host: str | None,
    now: datetime,
) -> dict[str, Any]:
    """A core/v1 Event as `kubectl describe` shows it (legacy fields filled)."""
    ts = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    involved: dict[str, Any] = {"kind": ref.kind, "apiVersion": ref.api_version, "name": ref.name}
    if ref.namespace:
        involved["namespace"] = ref.namespace
    if ref.uid:
        involved["uid"] = ref.uid
    if ref.resource_version:
        involved["resourceVersion"] = ref.resource_version
    source: dict[str, Any] = {"component": component}
    if host:
        source["host"] = host
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            "name": f"{ref.name}.{uuid.uuid4().hex[:16]}",
            "namespace": ref.namespace or CLUSTER_SCOPED_EVENT_NAMESPACE,
        },
        "involvedObject": involved,
        "reason": reason,
        "message": message[:1024],
        "type": "Warning",
        "count": 1,
        "firstTimestamp": ts,
        "lastTimestamp": ts,
        "source": source,
        "reportingComponent": component,
        "reportingInstance": host or "",
    }


def _utcnow() -> datetime:
    return datetime.now(UTC)


class EventRecorder:
    """Deduplicating, rate-limited, asynchronous Warning Event poster.

    `start()` runs the sender thread; without it `warn()` only queues (useful
    in tests that drain with `flush()`).
    """

    def __init__(
        self,
        poster: EventPoster,
        *,
        host: str | None = None,
        component: str = COMPONENT,
        dedupe_window: float = 600.0,
        max_per_minute: int = 30,
        queue_size: int = 256,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._poster = poster
        self._host = host
        self._component = component
        self._dedupe_window = dedupe_window
        self._max_per_minute = max_per_minute
        self._clock = clock
        self._wall_clock = wall_clock
        self._queue: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue(queue_size)
        self._lock = threading.Lock()
        self._recent: dict[tuple[str, str, str, str, str], float] = {}
        self._sent_times: list[float] = []
        self._thread: threading.Thread | None = None
        self.posted = 0
        self.failed = 0
        self.suppressed = 0

    def warn(self, ref: ObjectRef, *, reason: str, message: str) -> bool:
        """Queue a Warning; False when deduplicated, rate-limited or the queue is full."""
        now = self._clock()
        dkey = (ref.kind, ref.namespace or "", ref.name, reason, message)
        with self._lock:
            last = self._recent.get(dkey)
            if last is not None and now - last < self._dedupe_window:
                self.suppressed += 1
                return False
            self._sent_times = [t for t in self._sent_times if now - t < 60.0]
            if len(self._sent_times) >= self._max_per_minute:
                self.suppressed += 1
                log.info("events.rate-limited object=%s reason=%s", ref.display, reason)
                return False
            if len(self._recent) > 4096:
                self._recent = {
                    k: t for k, t in self._recent.items() if now - t < self._dedupe_window
                }
            self._recent[dkey] = now
            self._sent_times.append(now)
        body = event_body(
            ref,
            reason=reason,
            message=message,
            component=self._component,
            host=self._host,
            now=self._wall_clock(),
        )
        try:
            self._queue.put_nowait((body["metadata"]["namespace"], body))
        except queue.Full:
            self.suppressed += 1
            log.warning("events.queue-full object=%s reason=%s", ref.display, reason)
            return False
        return True

    def _send(self, namespace: str, body: dict[str, Any]) -> None:
        involved = body["involvedObject"]
        try:
            self._poster(namespace, body)
        except Exception as e:  # best effort: any client/transport error
            self.failed += 1
            log.warning(
                "events.post.failed object=%s reason=%s error=%r",
                involved.get("name"),
                body["reason"],
                str(e)[:200],
            )
            return
        self.posted += 1
        log.debug("events.posted object=%s reason=%s", involved.get("name"), body["reason"])

    def flush(self) -> int:
        """Post everything queued, on the caller's thread; the number handled."""
        n = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return n
            if item is not None:
                self._send(*item)
                n += 1

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._send(*item)

    def start(self) -> EventRecorder:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="event-recorder", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the sender; what is still queued is dropped after `timeout`."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            log.warning("events.stop.queue-full dropped=%d", self._queue.qsize())
        thread.join(timeout)
