#!/usr/bin/env python3
"""Write osbuild/org.bootimg.build.meta.json from the manifest schema (the single source of
truth); tests/test_osbuild_stage.py checks the committed file is what this writes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bootimg.manifest import osbuild_options_schema

META = Path(__file__).resolve().parent.parent / "osbuild" / "org.bootimg.build.meta.json"


def meta() -> dict:
    return {
        "summary": "Build a bootimg release: composefs images, shared object store, signed release.json",
        "description": [
            "The input tree becomes the root filesystem; the manifest's boot-time containers are",
            "built from their paths. The release (release.json, images/, objects/) is written to",
            "output.repository inside the tree. An optional 'signing-key' input signs release.json.",
            "Buildhost commands used: systemd-analyze, when the build root has it, to score the",
            "container units' sandboxes (sandbox.json); the rest is the bootimg Python library.",
        ],
        "schema_2": {
            "options": osbuild_options_schema(),
            "inputs": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "tree": {"type": "object", "additionalProperties": True},
                    "signing-key": {"type": "object", "additionalProperties": True},
                },
            },
        },
    }


def render() -> str:
    return json.dumps(meta(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    META.write_text(render())
    sys.exit(0)
