"""The bootimg manifest: a YAML description of the system, validated by one JSON Schema.

Typical use::

    from bootimg.manifest import load_manifest
    m = load_manifest("manifests/ivi-demo.yaml")   # raises ManifestError listing every problem
    for c in m.containers: ...

``validate_file`` reports problems without raising; ``osbuild_options_schema``
gives the Draft-4 schema of the ``org.bootimg.build`` stage's options.
"""

from __future__ import annotations

import importlib

from .diagnostics import Diagnostic, ManifestError, ManifestUnreadable
from .model import (
                    AddFile,
                    Bind,
                    Boot,
                    Container,
                    Identity,
                    Initramfs,
                    Integrity,
                    KpiBudget,
                    Manifest,
                    Ordering,
                    Resources,
                    Rootfs,
                    Source,
)

# Loading and validating need PyYAML and jsonschema; the model and the reserved names do not
# (a device's `bootimg install` uses those alone), so these come on first use.
_LAZY = {"Result": "loader", "load_manifest": "loader", "validate_file": "loader", "validate_text": "loader",
         "API_VERSION": "schema", "STAGE_NAME": "schema", "load_schema": "schema", "osbuild_options_schema": "schema"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)

__all__ = [
    "API_VERSION", "STAGE_NAME", "AddFile", "Bind", "Boot", "Container", "Diagnostic", "Identity", "Initramfs", "Integrity",
    "KpiBudget", "Manifest", "ManifestError", "ManifestUnreadable", "Ordering", "Resources", "Result", "Rootfs",
    "Source", "load_manifest", "load_schema", "osbuild_options_schema", "validate_file", "validate_text",
]
