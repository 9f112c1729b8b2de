"""The bootimg manifest: a YAML description of the system, validated by one JSON Schema.

Typical use::

    from bootimg.manifest import load_manifest
    m = load_manifest("manifests/ivi-demo.yaml")   # raises ManifestError listing every problem
    for c in m.containers: ...

``validate_file`` reports problems without raising; ``osbuild_options_schema``
gives the Draft-4 schema of the ``org.bootimg.build`` stage's options.
"""

from __future__ import annotations

from .diagnostics import Diagnostic, ManifestError, ManifestUnreadable
from .loader import Result, load_manifest, validate_file, validate_text
from .model import (
                    AddFile,
                    Bind,
                    Boot,
                    Container,
                    Identity,
                    Integrity,
                    KpiBudget,
                    Manifest,
                    Ordering,
                    Resources,
                    Rootfs,
                    Source,
)
from .schema import API_VERSION, STAGE_NAME, load_schema, osbuild_options_schema

__all__ = [
    "API_VERSION", "STAGE_NAME", "AddFile", "Bind", "Boot", "Container", "Diagnostic", "Identity", "Integrity",
    "KpiBudget", "Manifest", "ManifestError", "ManifestUnreadable", "Ordering", "Resources", "Result", "Rootfs",
    "Source", "load_manifest", "load_schema", "osbuild_options_schema", "validate_file", "validate_text",
]
