#!/usr/bin/env python3
"""Write the .meta.json of bootimg's osbuild stages (osbuild/org.bootimg.*): org.bootimg.build's
options come from the manifest schema (the single source of truth), with every host path an
input:// location; tests/test_osbuild_stage.py checks the committed files are what this writes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bootimg.manifest.schema import INPUT_LOCATION, osbuild_options_schema

STAGES = Path(__file__).resolve().parent.parent / "osbuild"
UUID = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
ONE_FILE = {"type": "object", "additionalProperties": True,
            "description": "An org.osbuild.files input of one file."}


def build_meta() -> dict:
    return {
        "summary": "Build a bootimg release: composefs images, shared object store, signed release.json",
        "description": [
            "A bootimg manifest whose every path is an input location: input://NAME (the input's",
            "one file, container archive or tree) or input://NAME/PATH. The root is typically an",
            "org.osbuild.tree input, each container an org.osbuild.files input (OCI archive or",
            "tar) or an org.osbuild.containers input (OCI archive from a pipeline), the trusted",
            "keys and add_files org.osbuild.files inputs. The input 'signing-key' (one minisign",
            "secret key) signs release.json; 'verity-key' + 'verity-cert' (PEM) add fs-verity",
            "PKCS#7 signatures. The release (release.json, images/, objects/) is written to",
            "output.repository inside the tree, the same bytes `bootimg build` writes.",
            "Buildhost commands used: systemd-analyze, when the build root has it, to score the",
            "container units' sandboxes (sandbox.json, a report); the rest is the bootimg Python",
            "package in the build root.",
        ],
        "schema_2": {
            "options": osbuild_options_schema(),
            "inputs": {
                "type": "object",
                "additionalProperties": True,
                "properties": {"signing-key": ONE_FILE, "verity-key": ONE_FILE, "verity-cert": ONE_FILE},
            },
        },
    }


def disk_tree_meta() -> dict:
    return {
        "summary": "The ESP image and the data partition's files of a bootimg release's disk",
        "description": [
            "Writes /esp.img (the ESP: a FAT file system of esp-size bytes with systemd-boot,",
            "loader.conf and the release's Type #1 boot entry with its kernel and initramfs,",
            "as `bootimg disk` makes it) and /data (/bootimg/release and /bootimg/state/var, with",
            "owners, modes and xattrs) into the tree, for org.osbuild.write-device and",
            "org.osbuild.copy onto the partitions that org.osbuild.truncate, org.osbuild.sfdisk",
            "and org.osbuild.mkfs.ext4 (verity) make. data-partuuid is the data partition's GPT",
            "UUID (the sfdisk stage's): the kernel command line finds the data partition by it.",
            "Buildhost commands used: mkfs.vfat, mcopy (and the bootimg Python package).",
        ],
        "capabilities": ["CAP_MAC_ADMIN"],
        "schema_2": {
            "options": {
                "type": "object",
                "additionalProperties": False,
                "required": ["release", "kernel", "initrd", "data-partuuid", "esp-size"],
                "properties": {
                    "release": {"$ref": "#/definitions/input_location",
                                "description": "The release directory (org.bootimg.build's output.repository), "
                                               "e.g. input://release/composefs."},
                    "kernel": {"$ref": "#/definitions/input_location",
                               "description": "The kernel (vmlinuz) of the release's root."},
                    "initrd": {"$ref": "#/definitions/input_location",
                               "description": "The initramfs `bootimg initramfs` makes for the release."},
                    "data-partuuid": {"type": "string", "pattern": UUID,
                                      "description": "GPT partition UUID of the data partition."},
                    "esp-size": {"type": "integer", "minimum": 8 << 20, "multipleOf": 512,
                                 "description": "Bytes of the ESP image: the ESP partition's size (FAT32 "
                                                "from 64 MiB)."},
                },
                "definitions": {"input_location": INPUT_LOCATION},
            },
            "inputs": {"type": "object", "additionalProperties": True},
        },
    }


METAS = {"org.bootimg.build": build_meta, "org.bootimg.disk-tree": disk_tree_meta}


def render(stage: str) -> str:
    return json.dumps(METAS[stage](), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    for name in METAS:
        (STAGES / f"{name}.meta.json").write_text(render(name))
    sys.exit(0)
