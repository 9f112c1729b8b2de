"""``input://NAME[/PATH]`` locations: how stage options name the files of a stage's inputs.

The scheme is osbuild's own (org.osbuild.copy's ``input://NAME/PATH``); ``input://NAME`` alone
means the input's one item, whatever its type:

- ``org.osbuild.tree``: the tree (a directory);
- ``org.osbuild.files``: its only file (one reference), else name the file:
  ``input://NAME/sha256:<hex>`` (files are named by their checksum);
- ``org.osbuild.containers``: its only image, an OCI archive (from a pipeline, e.g.
  ``org.osbuild.oci-archive``). Images from the ``org.osbuild.skopeo`` source come in skopeo's
  ``dir`` format, which bootimg does not read.

osbuild hands a stage each input as ``{"path": DIR, "data": {...}}``; the schema already keeps
``..`` out of PATH.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from ..errors import BootimgError
from ..manifest.schema import INPUT_NAME

LOCATION = re.compile(rf"^input://({INPUT_NAME})(/.*)?$")


class LocationError(BootimgError):
    """An ``input://`` location that names no input, or no single item of one."""


def resolve(location: str, inputs: Mapping[str, Any]) -> str:
    """The path inside the sandbox that ``location`` names."""
    m = LOCATION.match(location)
    if not m:
        raise LocationError(f"{location!r} is not an input location (input://NAME or input://NAME/PATH)")
    name, rest = m.group(1), (m.group(2) or "").strip("/")
    given = inputs.get(name)
    if not isinstance(given, Mapping) or not isinstance(given.get("path"), str):
        have = ", ".join(sorted(inputs)) or "none"
        raise LocationError(f"{location}: the stage has no input named {name!r} (its inputs: {have})")
    base = given["path"]
    if rest or (m.group(2) or "").endswith("/"):
        return os.path.join(base, rest) if rest else base
    item = _only_item(location, given.get("data") or {})
    return os.path.join(base, item) if item else base


def _only_item(location: str, data: Mapping[str, Any]) -> str | None:
    """The single file or archive of a files or containers input; None for a tree."""
    if "files" in data:
        files = sorted(data["files"])
        if len(files) != 1:
            raise LocationError(f"{location}: the input holds {len(files)} files; name one: "
                                f"{location}/{files[0] if files else 'FILE'}")
        return files[0]
    if "archives" in data:
        archives = data["archives"]
        if len(archives) != 1:
            raise LocationError(f"{location}: the input holds {len(archives)} container images; give each "
                                "container an input of its own")
        (ref, info), = archives.items()
        if info.get("format") != "oci-archive":
            raise LocationError(f"{location}: a container image in {info.get('format')!r} format (the "
                                "org.osbuild.skopeo source's); bootimg reads OCI archives and layouts")
        return ref
    return None
