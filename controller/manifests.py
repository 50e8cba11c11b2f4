"""Load Kubernetes objects from YAML files, the way `kubectl apply -f` reads them.

`-f` takes a file or a directory (its *.yaml, *.yml and *.json files, sorted,
not recursive); each file may hold several `---`-separated documents.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

_SUFFIXES = (".yaml", ".yml", ".json")
# libyaml's safe loader when PyYAML has it: the pure-Python one spends ~20 s
# parsing a 10k-policy file, libyaml a fraction of that. Same safe
# constructors. But libyaml's composer recurses without a depth check and
# segfaults on ~30k nested flow brackets, so deeply nested text goes to the
# pure-Python loader, which raises RecursionError instead.
_FAST_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MAX_FAST_DEPTH = 1000
_FLOW = re.compile(r"[\[\]{}]")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def _loader_for(text: str) -> Any:
    """An upper bound of the flow nesting (brackets inside strings count too:
    a false alarm only costs speed) decides which loader is safe."""
    depth = deepest = 0
    for m in _FLOW.finditer(text):
        depth += _STEP[m.group()]
        if depth > deepest:
            deepest = depth
            if deepest > _MAX_FAST_DEPTH:
                return yaml.SafeLoader
    return _FAST_LOADER


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
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ManifestError(f"{path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not valid YAML: not UTF-8 text (byte {e.start})") from e
    docs: list[Any] | None = None
    if text.lstrip()[:1] in ("{", "["):
        # JSON is YAML; json parses it ~20x faster than any YAML loader.
        try:
            docs = [json.loads(text)]
        except (ValueError, RecursionError):
            docs = None
    try:
        if docs is None:
            docs = list(yaml.load_all(text, Loader=_loader_for(text)))
    except yaml.YAMLError as e:
        raise ManifestError(f"{path}: not valid YAML: {e}") from e
    except RecursionError as e:
        raise ManifestError(f"{path}: not valid YAML: nested too deeply") from e
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
            # Items of typed lists (`NetworkPolicyList`) may omit kind and
            # apiVersion: they inherit them from the list.
            item_kind = doc["kind"][: -len("List")]
            items = doc.get("items")
            for item in items if isinstance(items, list) else []:
                if isinstance(item, dict):
                    if item_kind and "kind" not in item:
                        item = {"kind": item_kind, "apiVersion": doc.get("apiVersion"), **item}
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
