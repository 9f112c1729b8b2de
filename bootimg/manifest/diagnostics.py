"""Diagnostics: one error or warning about one place in a manifest file.

Every problem, whether found by the YAML parser, the JSON Schema or the
semantic checks, becomes a ``Diagnostic`` so they can be sorted, deduplicated
and printed the same way: ``FILE:LINE:COL: json.path: message``, which editors
and CI log parsers understand.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

from ..errors import BootimgError

Path = tuple[str | int, ...]

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def format_path(path: Sequence[str | int]) -> str:
    """``('containers', 0, 'name')`` -> ``containers[0].name``; the root is ``$``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENT.match(part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part)}]"
    return out or "$"


@dataclass(frozen=True, order=True)
class Diagnostic:
    """A problem at a 1-based line and column; ``path`` is the JSON path of the offending node."""

    line: int
    column: int
    path: Path
    message: str
    severity: Literal["error", "warning"] = "error"

    def format(self, file: str) -> str:
        label = "warning: " if self.severity == "warning" else ""
        return f"{file}:{self.line}:{self.column}: {format_path(self.path)}: {label}{self.message}"


def sort_unique(diagnostics: Iterable[Diagnostic]) -> list[Diagnostic]:
    """Sorted by position, each distinct (place, message) once."""
    return sorted(set(diagnostics), key=lambda d: (d.line, d.column, format_path(d.path), d.message))


class ManifestError(BootimgError):
    """The manifest is invalid; ``lines`` holds every problem, one formatted line each.

    ``str()`` joins them with newlines so nothing is lost when a caller lets the
    error reach the CLI's generic handler.
    """

    exit_code = 1

    def __init__(self, file: str, diagnostics: Sequence[Diagnostic]):
        self.diagnostics = list(diagnostics)
        self.lines = [d.format(file) for d in self.diagnostics]
        count = sum(d.severity == "error" for d in self.diagnostics)
        super().__init__("\n".join(self.lines) or f"{file}: invalid manifest ({count} errors)")


class ManifestUnreadable(BootimgError):
    """The manifest file cannot be read at all (missing, a directory, not text)."""

    exit_code = 2
