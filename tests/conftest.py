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


# The VM tests' disks, roots and caches take tens of GB at their peak; a full disk shows up as
# odd errors far from the cause (mke2fs "Operation not permitted", fixtures failing at setup).
FREE_GB_NEEDED = 30


def pytest_report_header(config):
    import tempfile

    lines = []
    for where in (tempfile.gettempdir(), os.environ.get("BOOTIMG_CACHE") or "/var/cache/bootimg"):
        probe = Path(where)
        while not probe.exists():
            probe = probe.parent
        free = shutil.disk_usage(probe).free / 1e9
        lines.append(f"free space under {where}: {free:.1f} GB")
        if free < FREE_GB_NEEDED:
            lines.append(f"WARNING: the full suite needs about {FREE_GB_NEEDED} GB free under {where}; "
                         "failures below may be a full disk")
    return lines


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


def board_rootfs_yaml(hostname: str) -> str:
    """The ``rootfs:`` of a test system on the QEMU board's Debian root (``build/board/rootfs``,
    made by bootimg.board's ensure_tree): what it leaves out, its hostname and the ssh key the
    VM sessions log in with."""
    return f"""rootfs:
  source: {{type: directory, path: build/board/rootfs}}
  exclude:
    - /var/cache/**
    - /usr/share/doc/**
    - /usr/share/man/**
    - /usr/share/locale/**
    - /usr/share/zoneinfo/right/**
    - /usr/lib/modules/*/kernel/drivers/media/**
    - /usr/lib/modules/*/kernel/drivers/net/wireless/**
    - /usr/lib/modules/*/kernel/drivers/net/ethernet/**
    - /usr/lib/modules/*/kernel/drivers/infiniband/**
    - /usr/lib/modules/*/kernel/sound/**
  add_files:
    - {{path: /etc/hostname, text: "{hostname}\\n"}}
    - {{path: /root/.ssh/authorized_keys, source_path: build/board/authorized_keys, mode: "0600"}}
"""


def nspawn_report(ns: Path, usr: Path, report: str, args: tuple[str, ...] = ()) -> tuple[list[str], str]:
    """Boot systemd in ``systemd-nspawn`` from the directory ``ns`` (whose etc/systemd/system
    the caller filled) with ``usr`` over the host's /usr, the usual /bin, /lib links, only root
    in passwd and group, an empty machine-id and no login prompt; ``report`` is a oneshot unit,
    wanted by multi-user.target, that prints ==REPORT== ... ==END== to the console and powers
    off. Returns the report's lines and its text."""
    units = ns / "etc/systemd/system"
    (units / "multi-user.target.wants").mkdir(parents=True, exist_ok=True)
    (units / "report.service").write_text(report)
    (units / "multi-user.target.wants/report.service").symlink_to("../report.service")
    for getty in ("console-getty.service", "getty@.service"):
        (units / getty).symlink_to("/dev/null")
    for d in ("usr", "var"):
        (ns / d).mkdir(parents=True, exist_ok=True)
    for link, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")):
        (ns / link).symlink_to(target)
    (ns / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (ns / "etc/group").write_text("root:x:0:\n")
    (ns / "etc/machine-id").write_text("")
    subprocess.run(["mount", "-t", "overlay", "nsusr", "-o", f"ro,lowerdir={usr}:/usr", str(ns / "usr")], check=True)
    try:
        res = subprocess.run(["systemd-nspawn", "--register=no", "--keep-unit", "-q", "-b", "-D", str(ns), *args],
                             capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL,
                             env={**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"})
    finally:
        subprocess.run(["umount", str(ns / "usr")], check=True)
    console = res.stdout + res.stderr
    assert "==END==" in console, console[-4000:]
    text = console[console.index("==REPORT=="):console.index("==END==")]
    return [x.rstrip("\r") for x in text.splitlines()], text


def example_workspace(top: Path) -> Path:
    """A copy of manifests/ next to a build/ made by tools/example_inputs.py."""
    import shutil

    sys.path.insert(0, str(REPO / "tools"))
    import example_inputs

    shutil.copytree(REPO / "manifests", top / "manifests")
    example_inputs.main(top / "build")
    return top
