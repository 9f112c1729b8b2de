"""The package layout is the data flow; imports only go down it.

manifest -> sources -> composefs -> signing -> release -> boot -> pipeline/disk/... -> kpi: a
layer may import the layers before it, never one after; the composefs format core imports no
other bootimg package. Checked on every ``import`` statement
(function-level ones included) of every module, by parsing the source.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "bootimg"

# package -> the bootimg packages it may import (besides itself and the shared leaf modules).
CORE_SHARED = {"errors", "fsutil", "_perf"}           # what the composefs core may use
SHARED = CORE_SHARED | {"host", "arch"}               # leaf modules every other layer may use
ALLOWED = {
    "composefs": set(),
    "manifest": {"composefs"},
    "signing": {"composefs"},
    "sources": {"composefs", "manifest"},
    "release": {"composefs", "manifest", "signing", "sources"},
    "boot": {"composefs", "manifest", "release", "sources"},
    "pipeline": {"composefs", "manifest", "release", "sources", "signing", "boot", "disk"},
    "disk": {"composefs", "manifest", "release", "boot"},
    "stages": {"composefs", "manifest", "release", "signing", "sources", "boot", "disk", "pipeline"},
    "vm": set(),
    "device": {"composefs", "manifest", "release", "signing", "boot", "disk"},
    "board": {"composefs", "manifest", "release", "signing", "pipeline", "boot", "disk", "vm"},
    "kpi": {"manifest", "vm"},
}


def bootimg_imports(path: Path) -> set[str]:
    """The top-level bootimg packages ``path`` imports (``bootimg.X`` or relative ``..X``)."""
    tree = ast.parse(path.read_text(), str(path))
    depth = len(path.relative_to(PKG).parts) - 1          # 1 for bootimg/X/mod.py
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "bootimg" and len(parts) > 1:
                    out.add(parts[1])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] == "bootimg":
                    out.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
            elif node.level > depth:                          # from .. (the bootimg package)
                if node.module:
                    out.add(node.module.split(".")[0])
                else:
                    out.update(a.name for a in node.names)
    return out

# Modules allowed more than their package, and why.
MODULE_ALLOWED = {
    # `validate --check-inputs` reads the inputs the way the build will (the exclude semantics,
    # tar members, the keys), so that what it accepts the build accepts.
    "manifest/inputs.py": {"signing", "sources"},
    "manifest/rootview.py": {"sources"},
}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_go_down_the_data_flow(package):
    bad = []
    for path in sorted((PKG / package).rglob("*.py")):
        allowed = ALLOWED[package] | MODULE_ALLOWED.get(str(path.relative_to(PKG)), set())
        shared = CORE_SHARED if package == "composefs" else SHARED
        for imported in sorted(bootimg_imports(path) - allowed - shared - {package}):
            bad.append(f"{path.relative_to(PKG.parent)} imports bootimg.{imported}")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_relative_and_absolute_imports(tmp_path):
    mod = PKG / "release" / "build.py"
    assert {"composefs", "manifest", "signing", "sources"} <= bootimg_imports(mod)
