"""The update contract between the informers and the node's calculation.

Every object is addressed by a typed `Key` (kind, namespace, name) and has a
current value: a converted model value, or None when it is gone (or was never
valid). Consumers take the keys that changed since they last looked, with
their current values, and reconcile against those values, never against
watch event types (a relist after 410 and a live MODIFIED look the same).
`in_sync` turns true once every kind has completed its first list; nothing
should touch the kernel before that.

Invalid objects: the conversion error is logged once per distinct error
(`controller.invalid kind=... object=... error="..."`), a Warning Event is
posted on the object (through an `EventSink`), and the last good value of
that object stays current, so a broken edit never opens or cuts traffic
that the previous version decided; a brand-new invalid object is absent.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from controller.events import EventSink, ObjectRef

log = logging.getLogger(__name__)


class Kind(StrEnum):
    """The kinds the agent watches (lower case, as `kubectl get` names them)."""

    NAMESPACE = "namespace"
    POD = "pod"
    NETWORK_POLICY = "networkpolicy"
    NODE = "node"
    BGP_PEER = "bgppeer"
    BGP_CONFIGURATION = "bgpconfiguration"
    SECRET = "secret"


API_KIND: Mapping[Kind, tuple[str, str]] = {
    Kind.NAMESPACE: ("Namespace", "v1"),
    Kind.POD: ("Pod", "v1"),
    Kind.NETWORK_POLICY: ("NetworkPolicy", "networking.k8s.io/v1"),
    Kind.NODE: ("Node", "v1"),
    Kind.BGP_PEER: ("BGPPeer", "felixlite.io/v1alpha1"),
    Kind.BGP_CONFIGURATION: ("BGPConfiguration", "felixlite.io/v1alpha1"),
    Kind.SECRET: ("Secret", "v1"),
}
"""(kind, apiVersion) of each Kind, for Events and for objects that omit them."""

NAMESPACED: frozenset[Kind] = frozenset({Kind.POD, Kind.NETWORK_POLICY, Kind.SECRET})


@dataclass(frozen=True, order=True)
class Key:
    kind: Kind
    namespace: str | None
    name: str

    def __str__(self) -> str:
        ref = f"{self.namespace}/{self.name}" if self.namespace else self.name
        return f"{self.kind.value} {ref}"


def key_of(kind: Kind, obj: Mapping[str, Any]) -> Key:
    """The Key of a raw API object (namespace dropped for cluster-scoped kinds)."""
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace") or None
    return Key(kind, ns if kind in NAMESPACED else None, str(meta.get("name") or ""))


Converter = Callable[[Mapping[str, Any]], object]
"""Raw API object -> frozen model value; raises ValueError (with the object and
field in its message) when the object is invalid."""


def invalid_reason(kind: Kind) -> str:
    """`InvalidNetworkPolicy`, `InvalidBGPPeer`, ... (the Event reason)."""
    return "Invalid" + API_KIND[kind][0]


class Cache:
    """Thread-safe current values by Key, plus the set of keys changed since
    the consumer last took them (coalesced: many updates of one key are one
    change, and an update back to the same value is none).

    Informers call `upsert`, `delete` and `synced` (the `InformerSink`
    protocol); the agent's loop waits with `wait_for_change` and takes with
    `take_changes`.
    """

    def __init__(
        self,
        converters: Mapping[Kind, Converter],
        *,
        events: EventSink | None = None,
    ) -> None:
        self._converters = dict(converters)
        self._events = events
        self._cond = threading.Condition()
        self._values: dict[Key, object] = {}
        self._bad: dict[Key, str] = {}  # key -> error text of its current (invalid) version
        self._pending: set[Key] = set()
        self._synced: set[Kind] = set()
        self._seq = 0
        self.invalid_total = 0

    # ---- informer side

    @property
    def kinds(self) -> frozenset[Kind]:
        return frozenset(self._converters)

    def upsert(self, kind: Kind, obj: Mapping[str, Any]) -> None:
        key = key_of(kind, obj)
        try:
            value = self._converters[kind](obj)
        except ValueError as e:
            self._invalid(key, obj, e)
            self._wake()
            return
        with self._cond:
            if self._bad.pop(key, None) is not None:
                log.info("controller.valid-again kind=%s object=%s", kind.value, _ref(key))
            if not (key in self._values and self._values[key] == value):
                self._values[key] = value
                self._pending.add(key)
            self._wake()

    def delete(self, kind: Kind, obj: Mapping[str, Any]) -> None:
        key = key_of(kind, obj)
        with self._cond:
            self._bad.pop(key, None)
            if self._values.pop(key, None) is not None:
                self._pending.add(key)
            self._wake()

    def synced(self, kind: Kind) -> None:
        with self._cond:
            if kind in self._synced:
                return
            self._synced.add(kind)
            log.info(
                "controller.synced kind=%s objects=%d",
                kind.value,
                sum(1 for k in self._values if k.kind is kind),
            )
            self._wake()

    def _wake(self) -> None:
        """Every delivery wakes the consumer, also one that changes no cached
        value (a status-only update, an invalid edit): its resourceVersion must
        still be published as programmed."""
        with self._cond:
            self._seq += 1
            self._cond.notify_all()

    def _invalid(self, key: Key, obj: Mapping[str, Any], error: ValueError) -> None:
        text = str(error)
        with self._cond:
            if self._bad.get(key) == text:
                return  # the same broken version again (resync, relist)
            self._bad[key] = text
            kept = key in self._values
            self.invalid_total += 1
        log.warning(
            'controller.invalid kind=%s object=%s kept_last_good=%s error="%s"',
            key.kind.value,
            _ref(key),
            kept,
            text.replace('"', "'"),
        )
        if self._events is None:
            return
        meta = obj.get("metadata") or {}
        api_kind, api_version = API_KIND[key.kind]
        ref = ObjectRef(
            kind=api_kind,
            api_version=api_version,
            namespace=key.namespace,
            name=key.name,
            uid=meta.get("uid"),
            resource_version=meta.get("resourceVersion"),
        )
        suffix = (
            "; the previous valid version stays in force"
            if kept
            else "; the object is ignored until fixed"
        )
        try:
            self._events.warn(ref, reason=invalid_reason(key.kind), message=text + suffix)
        except Exception:  # an event sink must never break the informer
            log.exception("controller.event.failed object=%s", _ref(key))

    # ---- consumer side

    @property
    def in_sync(self) -> bool:
        with self._cond:
            return self._synced >= set(self._converters)

    @property
    def seq(self) -> int:
        """Counts deliveries (and syncs); a consumer remembers the last it saw."""
        with self._cond:
            return self._seq

    def wait_for_change(self, after: int, timeout: float | None) -> int:
        """Block until `seq` passes `after` or `timeout` elapses; the current seq."""
        with self._cond:
            self._cond.wait_for(lambda: self._seq != after, timeout)
            return self._seq

    def take_changes(self) -> dict[Key, object | None]:
        """Keys changed since the last call, with their current values (None: gone)."""
        with self._cond:
            pending, self._pending = self._pending, set()
            return {k: self._values.get(k) for k in sorted(pending)}

    def get(self, key: Key) -> object | None:
        with self._cond:
            return self._values.get(key)

    def values(self, kind: Kind) -> dict[Key, object]:
        with self._cond:
            return {k: v for k, v in self._values.items() if k.kind is kind}

    def invalid(self) -> dict[Key, str]:
        """Objects whose current version is invalid, with the error."""
        with self._cond:
            return dict(self._bad)

    def snapshot(self) -> dict[Key, object]:
        with self._cond:
            return dict(self._values)


def _ref(key: Key) -> str:
    return f"{key.namespace}/{key.name}" if key.namespace else key.name
