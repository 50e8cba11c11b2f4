"""List+watch of one kind over the official `kubernetes` client.

The loop (after kopf's watching.py and client-go's reflector): list (paged),
emit every object, then `synced` once; watch from the list's resourceVersion
with bookmarks, a server-side `timeoutSeconds` and a client-side read
timeout (so a silently dead connection is noticed); a watch that ends
normally is simply reopened from the last resourceVersion seen. On 410 Gone
(an ERROR event or an ApiException) it relists and diffs against what it
had: changed objects are emitted as upserts, vanished ones as deletes, the
unchanged are not re-emitted, so enforced state is never dropped wholesale.
Any other error reconnects after a capped, jittered exponential backoff and
counts a restart. An optional periodic resync is the same relist-and-diff.

Objects are handled as plain dicts (`_preload_content=False`): the policy
parser takes dicts, and skipping model deserialization matters at 10k pods.
`stop()` sets one Event and shuts the open response's socket, so the thread
ends promptly (tens of milliseconds) and is joined.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from controller.cache import Kind

log = logging.getLogger(__name__)

Obj = dict[str, Any]


class InformerSink(Protocol):
    """Where an informer delivers (`controller.cache.Cache` implements it)."""

    def upsert(self, kind: Kind, obj: Mapping[str, Any]) -> None: ...

    def delete(self, kind: Kind, obj: Mapping[str, Any]) -> None: ...

    def synced(self, kind: Kind) -> None: ...


@dataclass(frozen=True)
class Resource:
    """Where a kind lives in the API."""

    kind: Kind
    group: str  # "" for the core group
    version: str
    plural: str
    namespaced: bool


RESOURCES: Mapping[Kind, Resource] = {
    Kind.NAMESPACE: Resource(Kind.NAMESPACE, "", "v1", "namespaces", False),
    Kind.POD: Resource(Kind.POD, "", "v1", "pods", True),
    Kind.NODE: Resource(Kind.NODE, "", "v1", "nodes", False),
    Kind.SECRET: Resource(Kind.SECRET, "", "v1", "secrets", True),
    Kind.NETWORK_POLICY: Resource(
        Kind.NETWORK_POLICY, "networking.k8s.io", "v1", "networkpolicies", True
    ),
    Kind.BGP_PEER: Resource(Kind.BGP_PEER, "felixlite.io", "v1alpha1", "bgppeers", False),
    Kind.BGP_CONFIGURATION: Resource(
        Kind.BGP_CONFIGURATION, "felixlite.io", "v1alpha1", "bgpconfigurations", False
    ),
}

ListCall = Callable[..., Any]
"""A generated client list method (accepts watch=, resource_version=, ...)."""


def list_call(api_client: client.ApiClient, kind: Kind, namespace: str | None) -> ListCall:
    """The typed client method that lists (and watches) `kind`."""
    core = client.CoreV1Api(api_client)
    net = client.NetworkingV1Api(api_client)
    if kind is Kind.NAMESPACE:
        return core.list_namespace
    if kind is Kind.NODE:
        return core.list_node
    if kind is Kind.POD:
        if namespace:
            return lambda **kw: core.list_namespaced_pod(namespace, **kw)
        return core.list_pod_for_all_namespaces
    if kind is Kind.SECRET:
        if namespace:
            return lambda **kw: core.list_namespaced_secret(namespace, **kw)
        return core.list_secret_for_all_namespaces
    if kind is Kind.NETWORK_POLICY:
        if namespace:
            return lambda **kw: net.list_namespaced_network_policy(namespace, **kw)
        return net.list_network_policy_for_all_namespaces
    res = RESOURCES[kind]
    custom = client.CustomObjectsApi(api_client)
    return lambda **kw: custom.list_cluster_custom_object(res.group, res.version, res.plural, **kw)


class _Gone(Exception):
    """410: our resourceVersion is too old; relist."""


class _WatchError(Exception):
    """An ERROR event other than 410."""


def _lines(resp: Any) -> Iterator[bytes]:
    """Complete lines of a chunked watch body, whatever the chunk boundaries."""
    buf = b""
    for chunk in resp.stream(amt=None, decode_content=False):
        buf += chunk
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                break
            line, buf = buf[:nl], buf[nl + 1 :]
            if line.strip():
                yield line
    if buf.strip():
        yield buf


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _obj_key(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = _meta(obj)
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))


class Informer:
    """One kind's list+watch loop on its own thread, delivering to a sink."""

    def __init__(
        self,
        api_client: client.ApiClient,
        kind: Kind,
        sink: InformerSink,
        *,
        namespace: str | None = None,
        field_selector: str | None = None,
        label_selector: str | None = None,
        watch_timeout: int = 300,
        read_slack: float = 30.0,
        connect_timeout: float = 5.0,
        list_timeout: float = 60.0,
        page_size: int = 500,
        resync_period: float | None = None,
        backoff_initial: float = 0.2,
        backoff_max: float = 30.0,
        stop: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        call: ListCall | None = None,
    ) -> None:
        self.kind = kind
        self._sink = sink
        self._call = call if call is not None else list_call(api_client, kind, namespace)
        self._selectors: dict[str, str] = {}
        if field_selector:
            self._selectors["field_selector"] = field_selector
        if label_selector:
            self._selectors["label_selector"] = label_selector
        self._watch_timeout = int(watch_timeout)
        self._read_slack = read_slack
        self._connect_timeout = connect_timeout
        self._list_timeout = list_timeout
        self._page_size = page_size
        self._resync_period = resync_period
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._stop = stop if stop is not None else threading.Event()
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._known: dict[tuple[str, str], str] = {}  # (ns, name) -> resourceVersion
        self._resp_lock = threading.Lock()
        self._resp: Any = None
        self._thread: threading.Thread | None = None
        self._backoff = backoff_initial
        self.has_synced = threading.Event()
        self.resource_version: str | None = None
        self.restarts = 0  # reconnects after errors (the watch-restarts metric)
        self.relists = 0  # lists after the first (410, resync)
        self.bookmarks = 0
        self.events = 0

    # ---- lifecycle

    def start(self) -> Informer:
        if self._thread is not None:
            raise RuntimeError(f"informer {self.kind.value} already started")
        self._thread = threading.Thread(
            target=self._run, name=f"informer-{self.kind.value}", daemon=True
        )
        self._thread.start()
        return self

    def signal_stop(self) -> None:
        """Ask the loop to end and unblock its read; does not wait."""
        self._stop.set()
        with self._resp_lock:
            resp = self._resp
        if resp is not None:
            try:
                resp.shutdown()
            except Exception as e:  # already closed, or a response type without shutdown
                log.debug("informer.shutdown.ignored kind=%s error=%r", self.kind.value, e)

    def stop(self, timeout: float = 5.0) -> None:
        self.signal_stop()
        self.join(timeout)

    def join(self, timeout: float = 5.0) -> None:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("informer.stop.timeout kind=%s", self.kind.value)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- the loop

    def _run(self) -> None:
        need_list = True
        next_resync = self._next_resync()
        while not self._stop.is_set():
            try:
                if need_list:
                    self._list_and_diff()
                    need_list = False
                    next_resync = self._next_resync()
                started = self._clock()
                lines = self._watch_once(next_resync)
                if lines == 0 and self._clock() - started < 1.0 and not self._stop.is_set():
                    self._stop.wait(self._backoff_initial)  # never spin on empty watches
                if next_resync is not None and self._clock() >= next_resync:
                    log.info("informer.resync kind=%s", self.kind.value)
                    need_list = True
                    self.relists += 1
            except _Gone as e:
                log.info(
                    "informer.gone kind=%s rv=%s detail=%s",
                    self.kind.value,
                    self.resource_version,
                    e,
                )
                need_list = True
                self.relists += 1
            except Exception as e:
                if self._stop.is_set():
                    break
                if isinstance(e, ApiException) and e.status == 410:
                    log.info("informer.gone kind=%s rv=%s", self.kind.value, self.resource_version)
                    need_list = True
                    self.relists += 1
                    continue
                self.restarts += 1
                delay = self._backoff * (0.8 + 0.4 * self._rng.random())
                self._backoff = min(self._backoff * 2, self._backoff_max)
                log.warning(
                    "informer.error kind=%s restarts=%d retry_in=%.2fs error=%s",
                    self.kind.value,
                    self.restarts,
                    delay,
                    _describe(e),
                )
                self._stop.wait(delay)
        log.info("informer.stopped kind=%s rv=%s", self.kind.value, self.resource_version)

    def _next_resync(self) -> float | None:
        return None if self._resync_period is None else self._clock() + self._resync_period

    def _open(self, **kwargs: Any) -> Any:
        resp = self._call(_preload_content=False, **self._selectors, **kwargs)
        with self._resp_lock:
            self._resp = resp
        if self._stop.is_set():  # stop() ran between the call and the registration
            self._release(resp)
            raise _Stopped
        return resp

    def _release(self, resp: Any) -> None:
        with self._resp_lock:
            if self._resp is resp:
                self._resp = None
        try:
            resp.release_conn()
        finally:
            resp.close()

    def _list_and_diff(self) -> None:
        items: list[Obj] = []
        cont: str | None = None
        rv = ""
        while True:
            kwargs: dict[str, Any] = {
                "limit": self._page_size,
                "_request_timeout": (self._connect_timeout, self._list_timeout),
            }
            if cont:
                kwargs["_continue"] = cont
            resp = self._open(**kwargs)
            try:
                body = json.loads(resp.data)
            finally:
                self._release(resp)
            items.extend(body.get("items") or [])
            meta = body.get("metadata") or {}
            rv = str(meta.get("resourceVersion") or rv)
            cont = meta.get("continue") or None
            if not cont:
                break
        self._apply_list(items)
        self.resource_version = rv
        self._backoff = self._backoff_initial
        if not self.has_synced.is_set():
            self.has_synced.set()
            self._deliver(self._sink.synced, self.kind)
        log.info("informer.listed kind=%s objects=%d rv=%s", self.kind.value, len(items), rv)

    def _apply_list(self, items: Iterable[Obj]) -> None:
        """Emit what differs from what we had: upserts for new/changed, deletes for gone."""
        fresh: dict[tuple[str, str], str] = {}
        upserts = deletes = 0
        for obj in items:
            key = _obj_key(obj)
            rv = str(_meta(obj).get("resourceVersion") or "")
            fresh[key] = rv
            if self._known.get(key) != rv or not rv:
                upserts += 1
                self._deliver(self._sink.upsert, self.kind, obj)
        for key in self._known.keys() - fresh.keys():
            deletes += 1
            ns, name = key
            meta = {"name": name, **({"namespace": ns} if ns else {})}
            self._deliver(self._sink.delete, self.kind, {"metadata": meta})
        if self.has_synced.is_set():
            log.info(
                "informer.relist.diff kind=%s upserts=%d deletes=%d unchanged=%d",
                self.kind.value,
                upserts,
                deletes,
                len(fresh) - upserts,
            )
        self._known = fresh

    def _watch_once(self, deadline: float | None) -> int:
        """One watch request until it ends; the number of lines received."""
        timeout = self._watch_timeout
        if deadline is not None:
            timeout = max(1, min(timeout, int(deadline - self._clock()) + 1))
        resp = self._open(
            watch=True,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout,
            _request_timeout=(self._connect_timeout, timeout + self._read_slack),
        )
        n = 0
        try:
            if not 200 <= resp.status <= 299:
                raise ApiException(status=resp.status, reason=resp.reason)
            for line in _lines(resp):
                if self._stop.is_set():
                    break
                n += 1
                self._handle(json.loads(line))
        finally:
            self._release(resp)
        return n

    def _handle(self, event: Mapping[str, Any]) -> None:
        etype = event.get("type")
        obj = event.get("object") or {}
        if etype == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise _Gone(obj.get("message", "gone"))
            raise _WatchError(f"{code} {obj.get('reason')}: {obj.get('message')}")
        rv = str(_meta(obj).get("resourceVersion") or "")
        if etype == "BOOKMARK":
            self.bookmarks += 1
            if rv:
                self.resource_version = rv
            return
        key = _obj_key(obj)
        if etype in ("ADDED", "MODIFIED"):
            self._known[key] = rv
            self._deliver(self._sink.upsert, self.kind, obj)
        elif etype == "DELETED":
            self._known.pop(key, None)
            self._deliver(self._sink.delete, self.kind, obj)
        else:
            log.warning("informer.unknown-event kind=%s type=%s", self.kind.value, etype)
            return
        self.events += 1
        if rv:
            self.resource_version = rv
        self._backoff = self._backoff_initial

    def _deliver(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # a consumer bug must not stop the watch
            log.exception("informer.sink.failed kind=%s", self.kind.value)


class _Stopped(Exception):
    """Raised inside the loop when stop() raced a request."""


def _describe(e: BaseException) -> str:
    if isinstance(e, ApiException):
        return f"ApiException({e.status} {e.reason})"
    return f"{type(e).__name__}({str(e)[:200]!r})"


class InformerGroup:
    """The informers of one agent: one stop, one sync barrier, summed counters."""

    def __init__(self, informers: Iterable[Informer], stop: threading.Event) -> None:
        self.informers = tuple(informers)
        self._stop = stop

    def start(self) -> InformerGroup:
        for inf in self.informers:
            inf.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for inf in self.informers:
            inf.signal_stop()
        deadline = time.monotonic() + timeout
        for inf in self.informers:
            inf.join(max(0.0, deadline - time.monotonic()))

    def wait_synced(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        for inf in self.informers:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not inf.has_synced.wait(left):
                return False
        return True

    @property
    def restarts(self) -> dict[Kind, int]:
        return {inf.kind: inf.restarts for inf in self.informers}


AGENT_KINDS: tuple[Kind, ...] = (
    Kind.NAMESPACE,
    Kind.POD,
    Kind.NETWORK_POLICY,
    Kind.NODE,
    Kind.BGP_PEER,
    Kind.BGP_CONFIGURATION,
    Kind.SECRET,
)


def agent_informers(
    api_client: client.ApiClient,
    sink: InformerSink,
    *,
    secret_namespace: str,
    kinds: Iterable[Kind] = AGENT_KINDS,
    stop: threading.Event | None = None,
    **options: Any,
) -> InformerGroup:
    """The agent's informers (not started): Secrets only from `secret_namespace`."""
    stop = stop if stop is not None else threading.Event()
    informers = [
        Informer(
            api_client,
            kind,
            sink,
            namespace=secret_namespace if kind is Kind.SECRET else None,
            stop=stop,
            **options,
        )
        for kind in kinds
    ]
    return InformerGroup(informers, stop)
