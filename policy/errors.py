"""The one error type of the policy front end.

Every rejection names the object and the field path the way the apiserver
does (`spec.ingress[0].from[1].ipBlock.except[0]`), so an operator can find
the offending line without reading our code.
"""

from __future__ import annotations

from typing import Literal

ObjectKind = Literal["networkpolicy", "pod", "namespace"]
"""Kinds of objects the front end parses (lower case, as in `kubectl get`)."""


class PolicyError(ValueError):
    """A malformed or invalid Kubernetes object.

    `kind` stays a plain string (not an Enum) so callers can compare and hash
    it together with kinds read straight from YAML.
    """

    kind: ObjectKind
    namespace: str | None
    name: str
    field: str
    message: str

    def __init__(
        self,
        kind: ObjectKind,
        namespace: str | None,
        name: str,
        *,
        field: str,
        message: str,
    ) -> None:
        self.kind = kind
        self.namespace = namespace
        self.name = name
        self.field = field
        self.message = message
        super().__init__(str(self))

    @property
    def object_ref(self) -> str:
        """`ns/name` for namespaced objects, `name` for cluster-scoped ones."""
        return f"{self.namespace}/{self.name}" if self.namespace is not None else self.name

    def __str__(self) -> str:
        if self.field:
            return f"{self.kind} {self.object_ref}: {self.field}: {self.message}"
        return f"{self.kind} {self.object_ref}: {self.message}"

    def __repr__(self) -> str:
        return (
            f"PolicyError(kind={self.kind!r}, namespace={self.namespace!r}, "
            f"name={self.name!r}, field={self.field!r}, message={self.message!r})"
        )

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only args break the default exception pickling.
        return (_rebuild, (self.kind, self.namespace, self.name, self.field, self.message))


def _rebuild(
    kind: ObjectKind, namespace: str | None, name: str, field: str, message: str
) -> PolicyError:
    return PolicyError(kind, namespace, name, field=field, message=message)
