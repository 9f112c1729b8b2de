"""The stage ``org.bootimg.build``: ``bootimg build`` inside osbuild.

Options: ``manifest`` (a bootimg manifest whose host paths are ``input://`` locations),
``output.repository`` (where the release goes in the stage's tree, default ``/composefs``) and
``boot-check``. Inputs: whatever the locations name, plus ``signing-key`` (one minisign secret
key, for trust ``signed``) and ``verity-key`` + ``verity-cert`` (PEM, fs-verity PKCS#7
signatures of the images), each an ``org.osbuild.files`` input of one file.

The release is the one ``bootimg build`` makes from the same manifest and files: same bytes.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import BootimgError
from ..manifest import validate_text
from ..manifest.diagnostics import format_path
from ..manifest.normalize import map_host_paths
from ..pipeline import BuildOptions, build
from ..signing import SecretKey
from . import locations

NAME = "org.bootimg.build"
MANIFEST = "options.manifest"
DEFAULT_REPOSITORY = "/composefs"


class StageError(BootimgError):
    """Every problem with the stage's options, one line each."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        super().__init__("\n".join(lines))


def resolve_manifest(manifest: Any, inputs: Mapping[str, Any]) -> tuple[Any, dict[str, str]]:
    """The manifest with every ``input://`` location replaced by its path in the sandbox, and
    the reverse map (path -> location) to put the locations back into messages."""
    problems: list[str] = []
    shown: dict[str, str] = {}

    def fix(value: str, path: tuple[str | int, ...]) -> str:
        try:
            real = locations.resolve(value, inputs)
        except locations.LocationError as err:
            problems.append(f"{MANIFEST}: {format_path(path)}: {err.message}")
            return value
        shown[real] = value
        return real

    resolved = map_host_paths(manifest, fix)
    if problems:
        raise StageError(problems)
    return resolved, shown


def _one_file(inputs: Mapping[str, Any], name: str) -> Path | None:
    if name not in inputs:
        return None
    return Path(locations.resolve(f"input://{name}", inputs))


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise BootimgError(f"cannot read {what}: {err.strerror}", file=str(path)) from None


def _build_kwargs(boot_check: bool) -> dict[str, Any]:
    # A bootimg without the pre-flight boot check builds any root, so there is nothing to turn off.
    if not boot_check and "boot_check" in inspect.signature(build).parameters:
        return {"boot_check": False}
    return {}


def run(args: Mapping[str, Any], metadata: Callable[[dict], None] | None = None) -> dict:
    """Build the release the options describe into the stage's tree; returns the metadata
    (also given to ``metadata``, osbuild's ``api.metadata``). Raises BootimgError."""
    options, inputs = args["options"], args.get("inputs") or {}
    data, shown = resolve_manifest(options["manifest"], inputs)
    result = validate_text(json.dumps(data), MANIFEST, "/", check_inputs=True)
    if not result.valid:
        raise StageError([_shown(f"{MANIFEST}: {format_path(d.path)}: {d.message}", shown) for d in result.errors])
    for d in result.warnings:       # loud, as in every command that reads a manifest
        print(_shown(f"{NAME}: {MANIFEST}: {format_path(d.path)}: warning: {d.message}", shown), file=sys.stderr)
    manifest = dataclasses.replace(result.manifest, source_file=Path(MANIFEST))
    key_file = _one_file(inputs, "signing-key")
    verity_key, verity_cert = _one_file(inputs, "verity-key"), _one_file(inputs, "verity-cert")
    for name, path in (("signing-key", key_file), ("verity-key", verity_key), ("verity-cert", verity_cert)):
        if path is not None:
            shown[str(path)] = f"input://{name}"
    repository = (options.get("output") or {}).get("repository", DEFAULT_REPOSITORY)
    out = Path(args["tree"]) / repository.lstrip("/")
    try:
        built = build(manifest, BuildOptions(
            out=out, signing_key=SecretKey.from_file(key_file) if key_file else None,
            verity_key_pem=_read(verity_key, "fs-verity signing key") if verity_key else None,
            verity_cert_pem=_read(verity_cert, "fs-verity certificate") if verity_cert else None,
            force=True), **_build_kwargs(options.get("boot-check", True)))
    except BootimgError as err:
        raise BootimgError(_shown(str(err), shown)) from None
    info = {"composefs-digest": built.release["root"]["digest"],
            "kernel-argument": built.release["root"]["kernel_argument"],
            "images": {name: e["digest"] for name, e in built.release["images"].items()}}
    if metadata is not None:
        metadata(info)
    return info


def _shown(message: str, shown: Mapping[str, str]) -> str:
    """``message`` with sandbox paths of inputs written as the locations the options gave."""
    for real in sorted(shown, key=len, reverse=True):
        message = message.replace(real, shown[real])
    return message
