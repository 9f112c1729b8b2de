"""The normalized manifest: schema defaults filled in, build-host paths made absolute.

The osbuild stage, ``bootimg validate --json`` and the typed model all consume
this form, so nothing downstream re-implements defaults or path rules. Both
come from schema.json: a ``default`` keyword fills an absent key, and a value
described by ``#/definitions/host_path`` is resolved against the manifest's
directory. The walk is defensive (wrong types are left alone) because the
semantic checks also run on manifests that failed schema validation.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path as FsPath
from typing import Any, Callable

from . import schema as schema_mod

HOST_PATH_REF = "#/definitions/host_path"


def normalize(data: Any, base_dir: str | os.PathLike[str], root: schema_mod.Schema | None = None) -> Any:
    """A deep copy of ``data`` with defaults applied and host paths absolute (against ``base_dir``)."""
    base = FsPath(base_dir)
    return map_host_paths(data, lambda value, _path: os.path.normpath(os.path.join(base, value)), root)


def map_host_paths(data: Any, fix: Callable[[str, tuple[str | int, ...]], str],
                   root: schema_mod.Schema | None = None) -> Any:
    """A deep copy of ``data`` with defaults applied and every host path (a non-empty string
    where the schema has ``host_path``) replaced by ``fix(value, json_path)``."""
    root = schema_mod.schema() if root is None else root
    return _walk(copy.deepcopy(data), root, fix, root, ())


def _walk(value: Any, fragment: schema_mod.Schema, fix: Callable[[str, tuple[str | int, ...]], str],
          root: schema_mod.Schema, path: tuple[str | int, ...]) -> Any:
    if fragment.get("$ref") == HOST_PATH_REF:
        if isinstance(value, str) and value:
            return fix(value, path)
        return value
    fragment = schema_mod.resolve(fragment, root)
    if isinstance(value, dict):
        props = schema_mod.property_schemas(fragment, value, root)
        for key, sub in props.items():
            if key not in value:
                default = schema_mod.resolve(sub, root).get("default")
                if default is None:
                    continue
                value[key] = copy.deepcopy(default)
            value[key] = _walk(value[key], sub, fix, root, path + (key,))
        for pattern_sub in fragment.get("patternProperties", {}).values():
            for key in value:
                if key not in props:
                    value[key] = _walk(value[key], pattern_sub, fix, root, path + (key,))
    elif isinstance(value, list) and "items" in fragment:
        value = [_walk(item, fragment["items"], fix, root, path + (i,)) for i, item in enumerate(value)]
    return value
