"""Shared fixtures: the reference test vectors and a way to run the real CLI."""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("BOOTIMG_COMPOSEFS_ASSETS", REPO.parent / "shared" / "composefs-assets"))

# Upstream's tests/test-checksums.sh parses these three without CFS_PARSE_STRICT.
NON_STRICT_ASSETS = {"no-newline.dump", "longlink.dump", "honggfuzz-longlink-unterminated.dump"}


@dataclass(frozen=True)
class Vector:
    name: str
    path: Path
    sha256: str
    version: int | None
    strict: bool

    def dump(self) -> bytes:
        data = self.path.read_bytes()
        return gzip.decompress(data) if self.name.endswith(".gz") else data

    def version_args(self) -> list[str]:
        if self.version is None:
            return []
        return [f"--min-version={self.version}", f"--max-version={self.version}"]


def checksummed_vectors() -> list[Vector]:
    """Every asset that has both a dump and a .sha256 (orphan checksums are skipped upstream too)."""
    vectors = []
    for sha in sorted(ASSETS.glob("*.sha256")):
        dump = sha.with_suffix("")
        if not dump.exists():
            continue
        version_file = Path(str(dump) + ".version")
        version = int(version_file.read_text()) if version_file.exists() else None
        vectors.append(Vector(dump.name, dump, sha.read_text().split()[0], version,
                              dump.name not in NON_STRICT_ASSETS))
    return vectors


def should_fail_dumps() -> list[Path]:
    return sorted(ASSETS.glob("should-fail-*.dump"))


@pytest.fixture(scope="session")
def reference():
    """The reference mkcomposefs / composefs-info 1.0.8, built once into the cache."""
    from reference import reference_tools

    return reference_tools()


@pytest.fixture(scope="session")
def assets() -> Path:
    if not ASSETS.is_dir():
        pytest.fail(f"composefs test vectors not found at {ASSETS}")
    return ASSETS


def run_cli(*args: str, input: bytes | None = None, env: dict | None = None,
            cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run `python -m bootimg ARGS` as a user would, capturing bytes."""
    full_env = dict(os.environ)
    full_env.pop("CFS_PARSE_STRICT", None)
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, "-m", "bootimg", *args], input=input, env=full_env,
                          cwd=cwd, capture_output=True, timeout=600)


def is_root() -> bool:
    return os.geteuid() == 0


requires_root = pytest.mark.skipif(not is_root(), reason="needs root for kernel mounts")


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


@contextlib.contextmanager
def composefs_mount(image: Path, store: Path, where: Path, verity: bool = False):
    """Mount an image the way composefs does: EROFS (loop) + overlayfs with the object store
    as a data-only lower layer; unmounted again whatever happens."""
    erofs, mnt = where / "erofs", where / "mnt"
    erofs.mkdir(parents=True)
    mnt.mkdir()
    subprocess.run(["mount", "-t", "erofs", "-o", "loop,ro", str(image), str(erofs)], check=True)
    try:
        opts = "ro,metacopy=on,redirect_dir=on" + (",verity=require" if verity else "")
        subprocess.run(["mount", "-t", "overlay", "composefs", "-o", f"{opts},lowerdir={erofs}::{store}", str(mnt)],
                       check=True)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        subprocess.run(["umount", str(erofs)], check=True)


def example_workspace(top: Path) -> Path:
    """A copy of manifests/ next to a build/ made by tools/example_inputs.py."""
    import shutil

    sys.path.insert(0, str(REPO / "tools"))
    import example_inputs

    shutil.copytree(REPO / "manifests", top / "manifests")
    example_inputs.main(top / "build")
    return top
