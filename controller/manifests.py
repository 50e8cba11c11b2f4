"""Load Kubernetes objects from YAML files, the way `kubectl apply -f` reads them.

`-f` takes a file or a directory (its *.yaml, *.yml and *.json files, sorted,
not recursive); each file may hold several `---`-separated documents.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

_SUFFIXES = (".yaml", ".yml", ".json")


class ManifestError(ValueError):
    """A file that cannot be read or is not YAML: names the file and document."""


def manifest_files(path: str | Path) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        return sorted(f for f in p.iterdir() if f.is_file() and f.suffix in _SUFFIXES)
    if p.is_file():
        return [p]
    raise ManifestError(f"{p}: no such file or directory")


def _documents(path: Path) -> Iterator[dict[str, Any]]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ManifestError(f"{path}: {e.strerror}") from e
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        raise ManifestError(f"{path}: not valid YAML: {e}") from e
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise ManifestError(
                f"{path}: document {i}: expected a mapping, got {type(doc).__name__}"
            )
        if doc.get("kind") == "List" or (
            isinstance(doc.get("kind"), str) and doc["kind"].endswith("List") and "items" in doc
        ):
            for item in doc.get("items") or []:
                if isinstance(item, dict):
                    yield item
            continue
        yield doc


def load_objects(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """All objects of all files under `paths`, in order."""
    objs: list[dict[str, Any]] = []
    for path in paths:
        for f in manifest_files(path):
            objs.extend(_documents(f))
    log.debug("manifests.loaded count=%d", len(objs))
    return objs
