#!/usr/bin/env python3
"""An osbuild libdir with bootimg's stages: a copy of the upstream osbuild snapshot
(../shared/osbuild, see its SNAPSHOT.md) plus osbuild/org.bootimg.*.

The snapshot keeps upstream's runner aliases (runners/org.osbuild.debian is a symlink to
org.osbuild.ubuntu1804 upstream) as small files holding the target's name; they are made
symlinks again, else osbuild cannot execute the host's runner. An installed osbuild needs none
of this: its libdir is /usr/lib/osbuild, and the stages go to /usr/lib/osbuild/stages.

    .venv/bin/python tools/osbuild_libdir.py DEST [--snapshot DIR]
    sudo PYTHONPATH=DEST python3 -m osbuild --libdir DEST --store STORE \\
        --output-directory OUT --export PIPELINE MANIFEST.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SNAPSHOT = REPO.parent / "shared" / "osbuild"
STAGES = sorted(p for p in (REPO / "osbuild").glob("org.bootimg.*"))
_PARTS = ("osbuild", "stages", "inputs", "sources", "devices", "mounts", "runners", "schemas", "assemblers")


def make_libdir(dest: str | os.PathLike[str], snapshot: str | os.PathLike[str] = SNAPSHOT) -> Path:
    """Write the libdir at ``dest`` (replaced if it exists) and return it."""
    dest, snapshot = Path(dest), Path(snapshot)
    if not (snapshot / "osbuild" / "__init__.py").is_file():
        sys.exit(f"{snapshot}: not an osbuild source tree (no osbuild/__init__.py)")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for part in _PARTS:
        if (snapshot / part).is_dir():
            shutil.copytree(snapshot / part, dest / part, ignore=shutil.ignore_patterns("test", "__pycache__"))
    for path in dest.rglob("*"):
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | 0o200)
    runners = dest / "runners"
    for runner in sorted(runners.iterdir()):
        if runner.is_file() and not os.access(runner, os.X_OK):
            target = runner.read_text().strip()
            if "/" not in target and (runners / target).is_file():
                runner.unlink()
                runner.symlink_to(target)
    for stage in dest.glob("stages/org.bootimg.*"):      # the snapshot may carry an old copy
        stage.unlink()
    for stage in STAGES:
        shutil.copy2(stage, dest / "stages" / stage.name)
    return dest


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", metavar="DEST")
    parser.add_argument("--snapshot", default=str(SNAPSHOT), metavar="DIR")
    args = parser.parse_args()
    print(make_libdir(args.dest, args.snapshot))
