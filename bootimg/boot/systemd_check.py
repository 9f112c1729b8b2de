"""``systemd-analyze verify`` over generated unit files, in a scratch root.

The real check of what bootimg writes for systemd (the tests of the container units and of
the boot assessment run it); the build does not call it, so it sits apart from the generators.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..manifest.reserved import UNIT_DIR


def systemd_verify(files: Mapping[str, bytes | tuple[bytes, int]], *, executables: Iterable[str] = (),
                   units: Iterable[str] | None = None, system_units: str | os.PathLike = "/usr/lib/systemd/system",
                   systemd_analyze: str = "systemd-analyze") -> subprocess.CompletedProcess:
    """Run ``systemd-analyze verify --root=TMP`` on generated units.

    TMP is a scratch root holding a copy of ``system_units`` (the stock targets and services
    the units order against), ``files`` ({absolute path: content or (content, mode)}) and,
    as empty scripts, ``executables``. systemd 252 checks each ExecStart= path inside --root
    and ignores RootDirectory=, so a container's command must be given here at its path in
    the image. ``units`` defaults to every unit file among ``files`` plus the targets they
    have drop-ins for. Returns the finished process (text stdout/stderr)."""
    with tempfile.TemporaryDirectory(prefix="bootimg-verify-") as tmp:
        root = Path(tmp)
        unit_dir = root / UNIT_DIR.lstrip("/")
        shutil.copytree(system_units, unit_dir, symlinks=True)
        names: list[str] = []
        for path, item in files.items():
            data, mode = item if isinstance(item, tuple) else (item, 0o644)
            dest = root / path.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.is_symlink():
                dest.unlink()
            dest.write_bytes(data)
            os.chmod(dest, mode)
            parent = os.path.dirname(path)
            if parent == UNIT_DIR:
                names.append(os.path.basename(path))
            elif os.path.dirname(parent) == UNIT_DIR and parent.endswith(".d"):
                # a drop-in for a unit the root may lack (systemd-bless-boot without systemd-boot)
                if (unit_dir / os.path.basename(parent)[:-2]).exists() or os.path.basename(parent)[:-2] in names:
                    names.append(os.path.basename(parent)[:-2])
        for exe in executables:
            dest = root / exe.lstrip("/")
            if not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_text("#!/bin/sh\n")
                os.chmod(dest, 0o755)
        wanted = sorted(set(units if units is not None else names))
        return subprocess.run([systemd_analyze, "verify", f"--root={root}", *wanted],
                              capture_output=True, text=True, timeout=120)
