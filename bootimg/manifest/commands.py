"""What `bootimg validate FILE [--json]` prints about a manifest (the command itself is
registered by ``bootimg.pipeline.commands``, which adds ``--root``: checking the root needs the
layers above this one).

Prints every problem as ``FILE:LINE:COL: json.path: message`` on stderr (the
format compilers use, so editors and CI annotate the right line) and exits 0
when valid, 1 when invalid (including YAML syntax errors), 2 when the file
cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:                  # the loader (jsonschema) loads only when a command runs
    from .model import Manifest


def summary(m: Manifest) -> str:
    """One line saying what the manifest describes."""
    phases = [p for p in ("early", "basic", "default") if any(c.phase == p for c in m.containers)]
    counts = ", ".join(f"{sum(c.phase == p for c in m.containers)} {p}" for p in phases)
    containers = f"{len(m.containers)} container{'s' if len(m.containers) != 1 else ''}"
    if counts:
        containers += f" ({counts})"
    deadlines = len(m.deadline_budgets())
    kpis = f"{len(m.kpis)} KPI budget{'s' if len(m.kpis) != 1 else ''}"
    if deadlines:
        kpis += f" + {deadlines} deadline{'s' if deadlines != 1 else ''}"
    trust = f"trust {m.integrity.trust}"
    if m.integrity.trust == "signed":
        n = len(m.integrity.trusted_keys)
        trust += f" ({n} key{'s' if n != 1 else ''})"
    return (f"{m.identity.name} {m.identity.version}, {containers}, {kpis}, {trust}, "
            f"fs-verity {m.integrity.fsverity}")


def validate_command(args: argparse.Namespace) -> tuple[int, Manifest | None]:
    """Validate ``args.file`` and print the result; (exit code, the manifest when valid)."""
    from .diagnostics import ManifestUnreadable
    from .loader import validate_file

    try:
        result = validate_file(args.file, check_inputs=args.check_inputs)
    except ManifestUnreadable as err:
        print(str(err), file=sys.stderr)
        return err.exit_code, None
    for line in result.lines():
        print(line, file=sys.stderr)
    if result.manifest is None:
        n = len(result.errors)
        print(f"{args.file}: invalid: {n} error{'s' if n != 1 else ''}", file=sys.stderr)
        return 1, None
    if args.json:
        json.dump(result.manifest.to_dict(), sys.stdout, indent=2, sort_keys=True, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        print(f"{args.file}: valid: {summary(result.manifest)}")
    return 0, result.manifest


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="manifest YAML file")
    p.add_argument("--check-inputs", action="store_true",
                   help="also require the sources, files and keys it names to exist on this host")
    p.add_argument("--json", action="store_true",
                   help="print the normalized manifest (defaults filled in, absolute paths) as JSON")
