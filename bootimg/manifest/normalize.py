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
from typing import Any

from . import schema as schema_mod

HOST_PATH_REF = "#/definitions/host_path"


def normalize(data: Any, base_dir: str | os.PathLike[str], root: schema_mod.Schema | None = None) -> Any:
    """A deep copy of ``data`` with defaults applied and host paths absolute (against ``base_dir``)."""
    root = schema_mod.schema() if root is None else root
    return _walk(copy.deepcopy(data), root, FsPath(base_dir), root)


def _walk(value: Any, fragment: schema_mod.Schema, base: FsPath, root: schema_mod.Schema) -> Any:
    if fragment.get("$ref") == HOST_PATH_REF:
        if isinstance(value, str) and value:
            return os.path.normpath(os.path.join(base, value))
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
            value[key] = _walk(value[key], sub, base, root)
        for pattern_sub in fragment.get("patternProperties", {}).values():
            for key in value:
                if key not in props:
                    value[key] = _walk(value[key], pattern_sub, base, root)
    elif isinstance(value, list) and "items" in fragment:
        value = [_walk(item, fragment["items"], base, root) for item in value]
    return value
