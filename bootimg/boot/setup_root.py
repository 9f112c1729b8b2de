"""Build ``bootimg-setup-root`` (the C program in ``setup_root/``) for a root's architecture.

The program is the whole boot path of a release (root setup in the initramfs, provisioning,
container image mounts), so it must run on the *target*: its architecture is read from the ELF
header of a binary in the root tree (``/usr/lib/systemd/systemd``, ``/usr/bin/sh``, ...) and it is
compiled with that architecture's compiler (host ``gcc`` for the host's own architecture, Debian's
cross compilers otherwise) through the source's own Makefile, the one a distribution would use.

Builds are reproducible (same sources, compiler and flags: same bytes) and cached outside the
repository in ``$BOOTIMG_CACHE/setup-root/<key>/`` (default ``/var/cache/bootimg/setup-root``),
keyed by the sources, the variant, the architecture and the compiler's identity. Variants:
``release`` (what goes into roots), ``test`` (compile-time test hooks: paths from the environment
and an fs-verity simulation, for hosts without fs-verity) and ``test-asan`` (the same under
AddressSanitizer and UndefinedBehaviorSanitizer).
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath

from ..errors import BootimgError

PROGRAM = "bootimg-setup-root"
DEFAULT_CACHE_ROOT = "/var/cache/bootimg"
# Binaries whose ELF header names the root's architecture, in order of preference.
ARCH_PROBES = ("/usr/lib/systemd/systemd", "/usr/bin/sh", "/bin/sh", "/usr/bin/bash", "/usr/lib/systemd/systemd-udevd")
LIBC_PATHS = ("/usr/lib/{triplet}/libc.so.6", "/lib/{triplet}/libc.so.6", "/usr/lib64/libc.so.6", "/lib64/libc.so.6")
SYMLINK_HOPS = 40


@dataclass(frozen=True)
class Arch:
    name: str              # uname -m
    e_machine: int         # ELF e_machine
    triplet: str           # Debian multiarch triplet
    package: str           # the Debian package with the cross compiler

    @property
    def compilers(self) -> tuple[str, ...]:
        host = _host_arch()
        native = ("gcc", "cc") if host is not None and host.name == self.name else ()
        return (*native, f"{self.triplet}-gcc")


ARCHES = {
    62: Arch("x86_64", 62, "x86_64-linux-gnu", "gcc-x86-64-linux-gnu"),
    183: Arch("aarch64", 183, "aarch64-linux-gnu", "gcc-aarch64-linux-gnu"),
}
VARIANTS = {
    "release": [],
    "test": ["TEST_HOOKS=1"],
    "test-asan": ["TEST_HOOKS=1", "NOSTRIP=1", "OPT=-O1 -g -fno-omit-frame-pointer",
                  "CFLAGS=-fsanitize=address,undefined -fno-sanitize-recover=undefined",
                  "LDFLAGS=-fsanitize=address,undefined"],
}


def source_dir() -> Path:
    return Path(str(resources.files(__package__).joinpath("setup_root")))


def source_files() -> list[Path]:
    """Every file of the source (what the cache key and a distribution's package cover)."""
    top = source_dir()
    return sorted(p for p in top.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def _host_arch() -> Arch | None:
    machine = platform.machine()
    return next((a for a in ARCHES.values() if a.name == machine), None)


def arch_by_name(name: str) -> Arch:
    for a in ARCHES.values():
        if a.name == name:
            return a
    raise BootimgError(f"unsupported architecture {name!r} for {PROGRAM} (supported: "
                       f"{', '.join(a.name for a in ARCHES.values())})")


def elf_machine(header: bytes, what: str) -> Arch:
    """The architecture named by an ELF header (64-bit little-endian only)."""
    if header[:4] != b"\x7fELF":
        raise BootimgError(f"{what} is not an ELF binary")
    if header[4] != 2 or header[5] != 1:
        raise BootimgError(f"{what} is not a 64-bit little-endian ELF binary; {PROGRAM} supports "
                           f"{', '.join(a.name for a in ARCHES.values())}")
    machine = int.from_bytes(header[18:20], "little")
    if machine not in ARCHES:
        raise BootimgError(f"{what} is for ELF machine {machine}; {PROGRAM} supports "
                           f"{', '.join(a.name for a in ARCHES.values())}")
    return ARCHES[machine]


def cache_root() -> Path:
    return Path(os.environ.get("BOOTIMG_CACHE") or DEFAULT_CACHE_ROOT) / "setup-root"


def find_compiler(arch: Arch) -> str:
    for cc in arch.compilers:
        path = shutil.which(cc)
        if path:
            return path
    host = _host_arch()
    package = "gcc" if host is not None and host.name == arch.name else arch.package
    raise BootimgError(f"no C compiler for {arch.name} to build {PROGRAM} for this root: "
                       f"install the Debian package {package} (apt-get install {package})")


def _compiler_identity(cc: str) -> str:
    res = subprocess.run([cc, "-v"], capture_output=True, text=True, timeout=60)
    return f"{os.path.realpath(cc)}\n{res.stderr.strip().splitlines()[-1] if res.stderr.strip() else ''}"


def cache_key(arch: Arch, variant: str, cc: str) -> str:
    h = hashlib.sha256()
    top = source_dir()
    for p in source_files():
        h.update(str(p.relative_to(top)).encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(f"{arch.name}\0{variant}\0{' '.join(VARIANTS[variant])}\0{_compiler_identity(cc)}".encode())
    return h.hexdigest()[:32]


def build(arch: Arch | str | None = None, *, variant: str = "release", cache: Path | None = None) -> Path:
    """The program for ``arch`` (default: the host's), built once per key and cached."""
    if isinstance(arch, str):
        arch = arch_by_name(arch)
    arch = arch or _host_arch()
    if arch is None:
        raise BootimgError(f"unsupported host architecture {platform.machine()!r} for {PROGRAM}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}")
    cc = find_compiler(arch)
    make = shutil.which("make")
    if make is None:
        raise BootimgError(f"`make` is needed to build {PROGRAM}: install the Debian package make")
    top = (cache or cache_root())
    key = cache_key(arch, variant, cc)
    out = top / key / PROGRAM
    if out.is_file():
        return out
    top.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=top))
    try:
        src = source_dir()
        strip = cc[:-3] + "strip" if cc.endswith("gcc") and shutil.which(cc[:-3] + "strip") else "strip"
        argv = [make, "-s", "-f", str(src / "Makefile"), f"SRCDIR={src}", f"CC={cc}", f"STRIP={strip}",
                *VARIANTS[variant]]
        res = subprocess.run(argv, cwd=tmp, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "LC_ALL": "C", "SOURCE_DATE_EPOCH": "0"})
        if res.returncode != 0:
            first = next((ln for ln in (res.stderr + res.stdout).splitlines() if "error" in ln),
                         (res.stderr + res.stdout).strip().splitlines()[-1:] or ["?"])
            raise BootimgError(f"building {PROGRAM} for {arch.name} with {cc} failed: {first}", file=str(src))
        (tmp / PROGRAM).chmod(0o755)
        try:
            os.rename(tmp, top / key)
        except OSError:          # a concurrent build got there first: same key, same bytes
            pass
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# -- the root's side: architecture and glibc --------------------------------------------------------

_GLIBC_VERSION = re.compile(rb"GLIBC_2\.([0-9]+)(?:\.[0-9]+)?\0")


def glibc_needed(binary: bytes) -> int:
    """The highest GLIBC_2.N symbol version a binary needs (its version strings), as N."""
    return max((int(m.group(1)) for m in _GLIBC_VERSION.finditer(binary)), default=0)


def check_glibc(binary: bytes, libc: bytes | None, arch: Arch, where: str) -> None:
    """Refuse a binary that needs a newer glibc than the root's libc.so.6 provides."""
    if libc is None:
        return
    provided = glibc_needed(libc)
    needed = glibc_needed(binary)
    if provided and needed > provided:
        raise BootimgError(f"the root's glibc is 2.{provided} but {PROGRAM} built here for {arch.name} needs "
                           f"GLIBC_2.{needed}: build with a toolchain for glibc 2.{provided} or older", file=where)


class RootFiles:
    """Reading files of a root tree (symlinks resolved inside the tree) given a reader for
    regular files' bytes."""

    def __init__(self, root, read):
        self.root = root
        self.read = read

    def lookup(self, path: str):
        parts = [p for p in PurePosixPath(path).parts if p != "/"]
        node = self.root
        hops = 0
        i = 0
        while i < len(parts):
            if node is None or node.children is None:
                return None
            part = parts[i]
            if part == "..":
                node = node.parent or self.root
                i += 1
                continue
            child = node.children.get(part.encode())
            if child is not None and child.is_symlink():
                hops += 1
                if hops > SYMLINK_HOPS or child.payload is None:
                    return None
                target = child.payload.decode("utf-8", "replace")
                rest = [p for p in PurePosixPath(target).parts if p != "/"]
                parts = rest + parts[i + 1:]
                i = 0
                node = self.root if target.startswith("/") else node
                continue
            node = child
            i += 1
        return node

    def head(self, path: str, size: int = 64) -> bytes | None:
        node = self.lookup(path)
        if node is None or not node.target().is_reg():
            return None
        data = self.read(node)
        return data[:size] if data is not None else None


def root_arch(files: RootFiles) -> Arch | None:
    """The root's architecture from the first probe binary it has, None if it has none."""
    for probe in ARCH_PROBES:
        head = files.head(probe)
        if head:
            return elf_machine(head, f"the root's {probe}")
    return None


def for_root(files: RootFiles, where: str) -> tuple[bytes, Arch]:
    """The release program for this root: its bytes and architecture, glibc checked. A root
    without any probe binary (a test tree) gets the host's architecture."""
    arch = root_arch(files) or _host_arch()
    if arch is None:
        raise BootimgError(f"cannot tell the root's architecture (none of {', '.join(ARCH_PROBES)})", file=where)
    binary = build(arch).read_bytes()
    libc = None
    for pattern in LIBC_PATHS:
        node = files.lookup(pattern.format(triplet=arch.triplet))
        if node is not None and node.target().is_reg():
            libc = files.read(node)
            break
    check_glibc(binary, libc, arch, where)
    return binary, arch
