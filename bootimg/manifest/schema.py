"""The manifest's JSON Schema: loading it, walking it, and deriving osbuild's copy.

``schema.json`` is the single source of truth for the manifest's shape, defaults
and documentation. It stays inside the Draft-4 subset because osbuild validates
stage options with ``Draft4Validator``; everything here therefore only needs to
understand ``$ref`` to local ``#/definitions/...`` (or ``#``), ``properties``,
``patternProperties``, ``items`` and ``oneOf`` with a discriminator key.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any, Iterator

import jsonschema

API_VERSION = "bootimg/v1"
STAGE_NAME = "org.bootimg.build"

Schema = dict[str, Any]


@functools.lru_cache(maxsize=1)
def _schema_text() -> str:
    return resources.files(__package__).joinpath("schema.json").read_text(encoding="utf-8")


def load_schema() -> Schema:
    """A fresh copy of the manifest schema (callers may modify it)."""
    return json.loads(_schema_text())


@functools.lru_cache(maxsize=1)
def _shared_schema() -> Schema:
    return load_schema()


def schema() -> Schema:
    """The shared, read-only manifest schema (do not modify; use load_schema() for a copy)."""
    return _shared_schema()


@functools.lru_cache(maxsize=1)
def validator() -> jsonschema.Draft4Validator:
    """The validator the CLI uses: Draft 4, the same semantics osbuild applies."""
    return jsonschema.Draft4Validator(schema())


@functools.lru_cache(maxsize=None)
def definition_validator(name: str) -> jsonschema.Draft4Validator:
    """A validator of one of the schema's definitions, for what a release records of its
    manifest (e.g. ``initramfs``, the profile in release.json's ``boot``)."""
    return jsonschema.Draft4Validator({"$ref": f"#/definitions/{name}", "definitions": schema()["definitions"]})


def resolve(fragment: Schema, root: Schema | None = None) -> Schema:
    """Follow local ``$ref``s ('#' or '#/definitions/NAME') until a concrete fragment."""
    root = schema() if root is None else root
    seen = 0
    while isinstance(fragment, dict) and "$ref" in fragment:
        ref = fragment["$ref"]
        if ref == "#":
            fragment = root
        elif ref.startswith("#/definitions/"):
            fragment = root["definitions"][ref[len("#/definitions/"):]]
        else:
            raise ValueError(f"schema.json: non-local $ref {ref!r} (osbuild cannot resolve it)")
        seen += 1
        if seen > 32:
            raise ValueError(f"schema.json: $ref loop at {ref!r}")
    return fragment


def discriminator(branches: list[Schema], root: Schema | None = None) -> str | None:
    """The key that selects a ``oneOf`` branch: required in every branch, an ``enum`` in each.

    ``source.type``, ``integrity.trust`` and ``kpi.measure`` work this way; a
    branch is then chosen by value instead of reporting every branch's errors.
    """
    branches = [resolve(b, root) for b in branches]
    if not branches or not all("properties" in b for b in branches):
        return None
    common = set.intersection(*(set(b.get("required", ())) for b in branches))
    for key in sorted(common):
        if all("enum" in resolve(b["properties"].get(key, {}), root) for b in branches):
            return key
    return None


def select_branch(fragment: Schema, instance: Any, root: Schema | None = None) -> tuple[int, Schema] | None:
    """The ``oneOf`` branch whose discriminator value matches ``instance``, if any."""
    branches = fragment.get("oneOf")
    if not branches or not isinstance(instance, dict):
        return None
    key = discriminator(branches, root)
    if key is None or key not in instance:
        return None
    for index, branch in enumerate(branches):
        branch = resolve(branch, root)
        if _in_enum(instance[key], resolve(branch["properties"][key], root)["enum"]):
            return index, branch
    return None


def _in_enum(value: Any, enum: list[Any]) -> bool:
    # JSON Schema equality: True is not 1, unlike Python's.
    return any(type(value) is type(v) and value == v for v in enum)


def property_schemas(fragment: Schema, instance: Any, root: Schema | None = None) -> Schema:
    """The ``properties`` that apply to ``instance`` (merging a selected oneOf branch)."""
    fragment = resolve(fragment, root)
    props = dict(fragment.get("properties", {}))
    chosen = select_branch(fragment, instance, root)
    if chosen is not None:
        props.update(chosen[1].get("properties", {}))
    return props


def walk_refs(node: Any) -> Iterator[str]:
    """Every ``$ref`` value in a schema fragment."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from walk_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk_refs(item)


def patterns(node: Any) -> Iterator[str]:
    """Every regular expression in a schema fragment (``pattern`` and ``patternProperties``)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "pattern" and isinstance(value, str):
                yield value
            elif key == "patternProperties" and isinstance(value, dict):
                yield from value
                for sub in value.values():
                    yield from patterns(sub)
            else:
                yield from patterns(value)
    elif isinstance(node, list):
        for item in node:
            yield from patterns(item)


def _rewrite_refs(node: Any, old: str, new: str) -> Any:
    if isinstance(node, dict):
        return {k: (new if k == "$ref" and v == old else _rewrite_refs(v, old, new)) for k, v in node.items()}
    if isinstance(node, list):
        return [_rewrite_refs(item, old, new) for item in node]
    return node


INPUT_NAME = r"[a-zA-Z][a-zA-Z0-9_.-]{0,254}"   # osbuild's pattern for a stage's input names
INPUT_LOCATION = {
    "description": "A file or directory of one of the stage's inputs (never a host path): input://NAME is the "
                   "input's one file, container archive or tree; input://NAME/PATH is PATH inside the input "
                   "(e.g. input://keys/sha256:<hex> for one file of an org.osbuild.files input).",
    "type": "string",
    "pattern": rf"^input://{INPUT_NAME}(/((?!\.\.?(/|$))[^/]+(/(?!\.\.?(/|$))[^/]+)*)?)?$",
}


def osbuild_options_schema() -> Schema:
    """A self-contained Draft-4 schema for the options of the osbuild stage ``org.bootimg.build``.

    osbuild wraps a stage's ``schema_2.options`` into its own document and hoists
    ``options.definitions`` to that document's root, so only ``#/definitions/...``
    refs survive. The manifest (the root of schema.json, referenced as ``#``) is
    therefore moved to ``definitions.manifest``. Inside osbuild's sandbox no host
    path exists: every ``host_path`` of the manifest is an ``input://`` location
    (``input_location``) naming one of the stage's inputs instead.
    """
    full = load_schema()
    defs = full.pop("definitions")
    stage = defs.pop("osbuild_stage_options")
    for meta in ("$schema", "id", "title"):
        full.pop(meta, None)
    defs["manifest"] = full
    del defs["host_path"]
    defs["input_location"] = INPUT_LOCATION
    stage = _rewrite_refs(stage, "#", "#/definitions/manifest")
    defs = _rewrite_refs(defs, "#", "#/definitions/manifest")
    defs = _rewrite_refs(defs, "#/definitions/host_path", "#/definitions/input_location")

    # Keep only the definitions the stage reaches, so the .meta.json stays small.
    reachable: set[str] = set()
    pending = list(walk_refs(stage))
    while pending:
        name = pending.pop().removeprefix("#/definitions/")
        if name not in reachable:
            reachable.add(name)
            pending.extend(walk_refs(defs[name]))
    stage["definitions"] = {name: defs[name] for name in sorted(reachable)}
    return stage
