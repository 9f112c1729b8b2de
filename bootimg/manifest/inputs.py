"""Optional check of the build-host inputs a manifest names: they exist, and the root source
does not clash with what the manifest adds to it.

Off by default: a manifest is often validated before its inputs are built
(the examples point into build/). A build runs it first so a missing rootfs or
key is reported at its line, like any other manifest error, not deep inside
the build. Where the root source is a directory or a tar archive, it is also
looked into (rootview.py) for what the build would refuse or silently lose: an
added file under a symlink or a file of the root, or where the root has a
directory; a container whose unit the root already has (NAME.service, or any
other NAME.* unit or quadlet, which NAME.service would replace or shadow); a
root without room for bootimg's own files (a non-empty /sysroot, a symlink
where bootimg writes).
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterator

from . import reserved, rootview
from .diagnostics import Diagnostic, Path
from .document import Document
from .semantic import CONTAINER_NAME, IMAGE_PATH, image_path_problem, shown

_EXCLUDE = re.compile(r"^/.*[^/]")  # schema.json's exclude pattern: others are reported there


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
        elif kind == "oci" and not (os.path.isfile(location) or os.path.isfile(os.path.join(location, "index.json"))):
            out.append(doc.at_value(where, f"not an OCI image layout (no index.json) or archive: {location}"))
    for path, location in _files(normalized):
        if not isinstance(location, str):
            continue
        if not os.path.isfile(location):
            what = "not a regular file" if os.path.exists(location) else "no such file"
            out.append(doc.at_value(path, f"{what}: {location}"))
            continue
        try:
            with open(location, "rb") as f:
                data = f.read() if path[0] == "integrity" else b""
        except OSError as err:
            out.append(doc.at_value(path, f"cannot read {location}: {err.strerror or err}"))
            continue
        if path[0] == "integrity":
            problem = _key_problem(data, location)
            if problem is not None:
                out.append(doc.at_value(path, problem))
    out.extend(RootChecks(doc, normalized).run())
    return out


def _key_problem(data: bytes, location: str) -> str | None:
    """Why a trusted key file is not a minisign public key the build can put in the root, or None."""
    from ..errors import BootimgError
    from ..signing import PublicKey

    try:
        PublicKey.from_bytes(data, file=location)
    except BootimgError as err:
        return f"{err.message}: {location}"
    return None


def _what(kind: str) -> str:
    return "a symlink" if kind == "symlink" else "a directory" if kind == "dir" else "a file"


class RootChecks:
    """What the manifest adds to the root, against what the root source already holds."""

    def __init__(self, doc: Document, data: dict[str, Any]):
        self.doc = doc
        rootfs = data.get("rootfs") if isinstance(data.get("rootfs"), dict) else {}
        self.source = rootfs.get("source") if isinstance(rootfs.get("source"), dict) else {}
        excludes = rootfs.get("exclude")
        self.excludes = [g for g in (excludes if isinstance(excludes, list) else [])
                         if isinstance(g, str) and _EXCLUDE.match(g)]
        add_files = rootfs.get("add_files")
        self.adds = [(j, item["path"]) for j, item in enumerate(add_files if isinstance(add_files, list) else [])
                     if isinstance(item, dict) and isinstance(item.get("path"), str) and IMAGE_PATH.match(item["path"])
                     and image_path_problem(item["path"]) is None]
        containers = data.get("containers")
        self.names = [(i, c["name"]) for i, c in enumerate(containers if isinstance(containers, list) else [])
                      if isinstance(c, dict) and isinstance(c.get("name"), str) and CONTAINER_NAME.match(c["name"])]
        self.owned = reserved.root_paths(name for _, name in self.names)
        self.out: list[Diagnostic] = []

    @staticmethod
    def units(name: str) -> list[str]:
        """Where a unit or quadlet that NAME.service would replace or shadow can be in a root."""
        return ([f"{d}/{name}.{suffix}" for d in reserved.UNIT_SEARCH_DIRS for suffix in reserved.UNIT_SUFFIXES]
                + [f"{d}/{name}.{suffix}" for d in reserved.QUADLET_SEARCH_DIRS
                   for suffix in reserved.QUADLET_SERVICE_SUFFIXES])

    def run(self) -> list[Diagnostic]:
        kind, location = self.source.get("type"), self.source.get("path")
        if not isinstance(kind, str) or not isinstance(location, str):
            return []
        wanted = [p for _, p in self.adds] + [e.path for e in self.owned]
        wanted += [u for _, name in self.names for u in self.units(name)]
        view = rootview.open_view(kind, location, wanted, listed=[reserved.SYSROOT], excludes=self.excludes)
        if view is None:
            return []
        self.added_files(view)
        self.container_units(view)
        self.bootimg_paths(view)
        return self.out

    def added_files(self, view: rootview.RootView) -> None:
        for j, path in self.adds:
            found = view.walk(path)
            if found is None:
                continue
            where, kind = found
            if where != path:
                self.out.append(self.doc.at_value(
                    ("rootfs", "add_files", j, "path"),
                    f"'{shown(path)}' is under {shown(where)}, which is {_what(kind)} in the root source "
                    + ("(the build never writes through symlinks)" if kind == "symlink" else "(not a directory)")))
            elif kind == "dir":
                self.out.append(self.doc.at_value(("rootfs", "add_files", j, "path"),
                                                  f"'{shown(path)}' is a directory in the root source; a file cannot "
                                                  "replace it"))

    def container_units(self, view: rootview.RootView) -> None:
        for i, name in self.names:
            for unit in self.units(name):
                found = view.walk(unit)
                if found is not None and found[0] == unit:
                    self.out.append(self.doc.at_value(
                        ("containers", i, "name"),
                        f"the root source already has {unit}, which this container's {reserved.service_unit(name)} "
                        "would replace or shadow; rename the container"))
                    break

    def bootimg_paths(self, view: rootview.RootView) -> None:
        where_source = ("rootfs", "source", "path")
        static = {e.path for e in reserved.root_paths()}
        seen: set[str] = set()
        for entry in self.owned:
            found = view.walk(entry.path)
            if found is None:
                continue
            where, kind = found
            if where != entry.path:
                if where not in seen:
                    seen.add(where)
                    self.out.append(self.doc.at_value(where_source, f"the root source's {where} is {_what(kind)}; "
                                                                    f"bootimg writes {entry.path} below it ({entry.what})"))
            elif entry.path == reserved.SYSROOT:
                inside = view.children(entry.path) if kind == "dir" else []
                if kind != "dir" or inside:
                    held = f"it holds: {', '.join(inside[:5])}{', ...' if len(inside) > 5 else ''}" if inside \
                        else f"it is {_what(kind)}"
                    self.out.append(self.doc.at_value(where_source, f"the root source's {reserved.SYSROOT} must be an empty "
                                                                    f"directory (the physical root is mounted on it at boot); {held}"))
            elif entry.path in static and (kind == "dir") != entry.tree:
                need = "a directory" if entry.tree else "a file"
                self.out.append(self.doc.at_value(where_source, f"the root source's {entry.path} is {_what(kind)}; bootimg "
                                                                f"writes {need} there ({entry.what})"))
