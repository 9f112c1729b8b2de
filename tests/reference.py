"""The reference composefs 1.0.8 tools (mkcomposefs, composefs-info), built from source once.

Tests and benchmarks compare bootimg against the real C implementation, so it is built from
``../shared/composefs-1.0.8`` (its BUILD.md: gcc, a hand-written config.h, -lcrypto) into a
cache outside the repository, keyed by a hash of every source file, config.h, the compiler
flags and the compiler version: ``${BOOTIMG_CACHE:-/var/cache/bootimg}/composefs-ref/<key>/``.
The build happens in a temp directory that is renamed into place, under a lock, so concurrent
test runs build it once and never see half a build. Not part of the bootimg package.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCE = Path(os.environ.get("BOOTIMG_COMPOSEFS_SRC", REPO.parent / "shared" / "composefs-1.0.8"))

CONFIG_H = """\
#define HAVE_OPENSSL 1
#define HAVE_ENDIAN_H 1
#define HAVE_REALLOCARRAY 1
#define HAVE_FSCONFIG_CMD_CREATE_SYS_MOUNT_H 1
#define LCFS_EXTERN extern
"""
CC = "gcc"
CFLAGS = ["-O2", "-I.", "-Ilibcomposefs"]
# tool -> (main source, libraries), as in BUILD.md
TOOLS = {
    "mkcomposefs": ("tools/mkcomposefs.c", ["-lcrypto", "-lpthread"]),
    "composefs-info": ("tools/composefs-info.c", ["-lcrypto"]),
}


GUARDMAP = Path(__file__).resolve().parent / "guardmap.c"   # ours, not the reference's: see its comment


@dataclass(frozen=True)
class ReferenceTools:
    mkcomposefs: Path
    composefs_info: Path
    guardmap: Path          # LD_PRELOAD this to make composefs-info's reads outside an image fault


def cache_root() -> Path:
    return Path(os.environ.get("BOOTIMG_CACHE") or "/var/cache/bootimg") / "composefs-ref"


def _sources(src: Path) -> list[Path]:
    files = sorted((src / "libcomposefs").glob("*.[ch]"))
    return files + [src / main for main, _ in TOOLS.values()]


def build_key(src: Path = SOURCE) -> str:
    """Hash of what decides the binaries: sources, config.h, flags, compiler version."""
    h = hashlib.sha256()
    for path in _sources(src):
        h.update(str(path.relative_to(src)).encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(GUARDMAP.read_bytes())
    h.update(CONFIG_H.encode())
    h.update(repr((CC, CFLAGS, TOOLS)).encode())
    version = subprocess.run([CC, "--version"], capture_output=True, text=True, check=True).stdout
    h.update(version.encode())
    return h.hexdigest()[:24]


def _build_into(src: Path, out: Path) -> None:
    """Compile both tools in a copy of the sources (the shared folder may be read-only)."""
    work = out / "src"
    shutil.copytree(src / "libcomposefs", work / "libcomposefs")
    shutil.copytree(src / "tools", work / "tools")
    (work / "config.h").write_text(CONFIG_H)
    for tool, (main, libs) in TOOLS.items():
        cmd = [CC, *CFLAGS, "-o", str(out / tool), main, *sorted(str(p.relative_to(work))
                                                                   for p in (work / "libcomposefs").glob("*.c")), *libs]
        res = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"building the reference {tool} failed:\n{' '.join(cmd)}\n{res.stderr}")
    shutil.rmtree(work)
    cmd = [CC, "-O2", "-shared", "-fPIC", "-o", str(out / "guardmap.so"), str(GUARDMAP), "-ldl"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"building guardmap.so failed:\n{' '.join(cmd)}\n{res.stderr}")


def reference_tools(src: Path = SOURCE) -> ReferenceTools:
    """The built tools, building them first if this source/compiler has no cache entry."""
    if not (src / "tools" / "mkcomposefs.c").is_file():
        raise FileNotFoundError(f"composefs 1.0.8 sources not found at {src}")
    root = cache_root()
    final = root / build_key(src)
    tools = ReferenceTools(final / "mkcomposefs", final / "composefs-info", final / "guardmap.so")
    if all(p.is_file() for p in (tools.mkcomposefs, tools.composefs_info, tools.guardmap)):
        return tools
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".lock-{final.name}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not final.is_dir():              # another process may have built it meanwhile
            tmp = Path(tempfile.mkdtemp(prefix=f".build-{final.name}-", dir=root))
            os.chmod(tmp, 0o755)
            try:
                _build_into(src, tmp)
                tmp.rename(final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return tools


def composefs_info(tools: ReferenceTools, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the reference composefs-info with guardmap.so preloaded (reads outside the image
    fault instead of reading other memory); a crash shows as a negative returncode."""
    env = dict(os.environ, LD_PRELOAD=str(tools.guardmap))
    return subprocess.run([str(tools.composefs_info), *args], capture_output=True, env=env, timeout=timeout)


def mkcomposefs(tools: ReferenceTools, *args: str, input: bytes | None = None, strict: bool = False,
                timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the reference mkcomposefs (CFS_PARSE_STRICT set only when strict)."""
    env = {k: v for k, v in os.environ.items() if k != "CFS_PARSE_STRICT"}
    if strict:
        env["CFS_PARSE_STRICT"] = "1"
    return subprocess.run([str(tools.mkcomposefs), *args], input=input, capture_output=True, env=env,
                          timeout=timeout)


if __name__ == "__main__":
    t = reference_tools()
    print(t.mkcomposefs)
    print(t.composefs_info)
    print(t.guardmap)
