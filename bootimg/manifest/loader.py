"""Reading a manifest file: parse, validate, check, normalize, build the model.

This is the one place that turns a file into a ``Manifest``; everything else
(the CLI, the build, the osbuild stage generator) calls ``load_manifest`` or,
to report problems without raising, ``validate_file``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import inputs, messages, model, normalize, semantic
from . import schema as schema_mod
from .diagnostics import Diagnostic, ManifestError, ManifestUnreadable, format_path, sort_unique
from .document import parse


@dataclass
class Result:
    """Everything known about one manifest file after validation."""

    file: str  # as given by the caller, used in every message
    diagnostics: list[Diagnostic] = field(default_factory=list)
    normalized: Any = None  # the normalized data, set even when invalid (best effort)
    manifest: model.Manifest | None = None  # set only when valid

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "error"]

    @property
    def warnings(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "warning"]

    @property
    def valid(self) -> bool:
        return not self.errors

    def lines(self) -> list[str]:
        return [d.format(self.file) for d in self.diagnostics]


def read_text(path: str | os.PathLike[str]) -> str:
    """The file's text; ManifestUnreadable (exit 2) if it cannot be read as UTF-8 text."""
    name = os.fspath(path)
    try:
        raw = Path(path).read_bytes()
    except IsADirectoryError:
        raise ManifestUnreadable("cannot read: is a directory", file=name) from None
    except OSError as err:
        raise ManifestUnreadable(f"cannot read: {err.strerror or err}", file=name) from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ManifestUnreadable(f"cannot read: not UTF-8 text (byte {err.start})", file=name) from None


def validate_text(text: str, file: str, base_dir: str | os.PathLike[str], *, check_inputs: bool = False) -> Result:
    """Validate manifest text; relative host paths resolve against ``base_dir``.

    ``check_inputs`` also requires the build-host inputs (sources, files, keys) to exist.
    """
    result = Result(file)
    doc = parse(text)
    result.diagnostics.extend(doc.problems)
    if doc.data is None and doc.problems:
        return result  # a YAML syntax error: nothing more can be checked
    root = schema_mod.schema()
    rewriter = messages.Rewriter(doc, root)
    # A value YAML could not read is already reported; its schema errors would only add noise.
    result.diagnostics.extend(d for d in rewriter.diagnostics(schema_mod.validator().iter_errors(doc.data))
                              if d.path not in doc.unreadable)
    result.normalized = normalize.normalize(doc.data, os.path.abspath(base_dir), root)
    result.diagnostics.extend(semantic.check(doc, result.normalized))
    if check_inputs:
        result.diagnostics.extend(inputs.check(doc, result.normalized))
    result.diagnostics = sort_unique(result.diagnostics)
    if result.valid:
        result.manifest = model.from_dict(model.Manifest, result.normalized)
    return result


def validate_file(path: str | os.PathLike[str], *, check_inputs: bool = False) -> Result:
    """Validate a manifest file, collecting every problem; raises only ManifestUnreadable.

    Relative paths in it resolve against the directory the file is in, as named
    (a symlinked manifest's paths are relative to the link, not its target).
    """
    text = read_text(path)
    absolute = Path(os.path.abspath(path))
    result = validate_text(text, os.fspath(path), absolute.parent, check_inputs=check_inputs)
    if result.manifest is not None:
        result.manifest = dataclasses.replace(result.manifest, source_file=absolute)
    return result


def _print_warning(line: str) -> None:
    print(line, file=sys.stderr)


def load_manifest(path: str | os.PathLike[str], *, check_inputs: bool = False,
                  on_warning: Callable[[str], None] | None = _print_warning) -> model.Manifest:
    """The validated, normalized, typed manifest at ``path``.

    Raises ManifestError (exit 1) listing every problem, or ManifestUnreadable
    (exit 2). Warnings (e.g. fs-verity optional) go to ``on_warning``, stderr by
    default, because they must be loud in every command that uses a manifest.
    """
    result = validate_file(path, check_inputs=check_inputs)
    if not result.valid:
        raise ManifestError(result.file, result.diagnostics)
    if on_warning is not None:
        for d in result.warnings:
            on_warning(d.format(result.file))
    assert result.manifest is not None
    return result.manifest


def placer(path: str | os.PathLike[str] | None, prefix: tuple[str | int, ...] = ()) -> Callable[[tuple, str], str]:
    """A formatter of problems that checks after loading find (the build's boot check of the
    initramfs profile): ``(json path under prefix, message) -> "FILE:LINE:COL: path: message"``,
    with the positions of the manifest file, parsed again; without a file (a manifest made in
    memory) or when it no longer parses, ``"manifest: path: message"``."""
    doc = None
    if path is not None:
        try:
            doc = parse(read_text(path))
        except ManifestUnreadable:
            doc = None
    name = os.fspath(path) if path is not None else "manifest"

    def place(where: tuple, message: str) -> str:
        full = (*prefix, *where)
        if doc is None or doc.data is None:
            return f"{name}: {format_path(full)}: {message}"
        return doc.at_value(full, message).format(name)

    return place
