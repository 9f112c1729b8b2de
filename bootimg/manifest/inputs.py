"""Optional check that the build-host inputs a manifest names exist.

Off by default: a manifest is often validated before its inputs are built
(the examples point into build/). A build runs it first so a missing rootfs or
key is reported at its line, like any other manifest error, not deep inside
the build.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

from .diagnostics import Diagnostic, Path
from .document import Document


def _sources(data: dict[str, Any]) -> Iterator[tuple[Path, dict[str, Any]]]:
    rootfs = data.get("rootfs")
    if isinstance(rootfs, dict) and isinstance(rootfs.get("source"), dict):
        yield ("rootfs", "source"), rootfs["source"]
    containers = data.get("containers")
    for i, c in enumerate(containers if isinstance(containers, list) else []):
        if isinstance(c, dict) and isinstance(c.get("image"), dict):
            yield ("containers", i, "image"), c["image"]


def _files(data: dict[str, Any]) -> Iterator[tuple[Path, Any]]:
    rootfs = data.get("rootfs")
    add_files = rootfs.get("add_files") if isinstance(rootfs, dict) else None
    for j, item in enumerate(add_files if isinstance(add_files, list) else []):
        if isinstance(item, dict) and "source_path" in item:
            yield ("rootfs", "add_files", j, "source_path"), item["source_path"]
    integrity = data.get("integrity")
    keys = integrity.get("trusted_keys") if isinstance(integrity, dict) else None
    for j, key in enumerate(keys if isinstance(keys, list) else []):
        yield ("integrity", "trusted_keys", j), key


def check(doc: Document, normalized: Any) -> list[Diagnostic]:
    """Missing or mistyped inputs of the normalized manifest (absolute paths), at their lines."""
    if not isinstance(normalized, dict):
        return []
    out: list[Diagnostic] = []
    for path, source in _sources(normalized):
        location, kind = source.get("path"), source.get("type")
        if not isinstance(location, str):
            continue
        where = path + ("path",)
        if kind == "directory" and not os.path.isdir(location):
            out.append(doc.at_value(where, f"no such directory: {location}"))
        elif kind == "tar" and not os.path.isfile(location):
            out.append(doc.at_value(where, f"no such file: {location}"))
        elif kind == "oci" and not os.path.isfile(os.path.join(location, "index.json")):
            out.append(doc.at_value(where, f"not an OCI image layout (no index.json): {location}"))
    for path, location in _files(normalized):
        if isinstance(location, str) and not os.path.isfile(location):
            out.append(doc.at_value(path, f"no such file: {location}"))
    return out
