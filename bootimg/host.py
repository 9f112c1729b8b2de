"""Running things on the build host: tool checks, logged sub-processes, chroots in private
namespaces, caches keyed by their inputs, locks and scratch directories.

Used by every step that drives host tools (dracut, mkfs, sfdisk, QEMU, debootstrap); a failure
is one ``HostError`` line naming the step, its exit status and the last line of its log.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from .arch import Arch
from .errors import BootimgError

DEFAULT_CACHE_ROOT = "/var/cache/bootimg"
SETUP_HINT = "run `sh tools/setup-host.sh` (or `make setup`)"

Log = Callable[[str], None]


class HostError(BootimgError):
    """A build-host step failed: a missing tool, a failed sub-process, a bad input path."""


def stderr_log(message: str) -> None:
    print(f"bootimg: {message}", file=sys.stderr, flush=True)


def quiet_log(message: str) -> None:
    pass


def cache_dir(cache: str | os.PathLike[str] | None = None, kind: str = "board") -> Path:
    """A cache directory: ``cache`` if given, else ``$BOOTIMG_CACHE/KIND``, else
    ``/var/cache/bootimg/KIND``. Created if missing."""
    if cache is None:
        cache = Path(os.environ.get("BOOTIMG_CACHE") or DEFAULT_CACHE_ROOT) / kind
    path = Path(cache)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise HostError(f"cannot create the cache directory: {err.strerror}", file=str(path)) from None
    return path


# A cache keeps the entries of the last runs: the newest ``keep`` of a kind, and every entry
# used within ``CACHE_MIN_AGE`` seconds (one test run's or one build's whole working set).
CACHE_MIN_AGE = 6 * 3600


def cache_used(entry: Path) -> None:
    """Mark a cache entry as used now (its mtime orders ``prune_cache``)."""
    with contextlib.suppress(OSError):
        os.utime(entry)


def prune_cache(cdir: Path, prefix: str, suffix: str = "", *, keep: int, min_age: float = CACHE_MIN_AGE,
                log: Log = quiet_log) -> list[Path]:
    """Remove the least recently used entries named ``PREFIX<key>SUFFIX`` (key: 16 hex digits)
    beyond the newest ``keep``, with their companions (``PREFIX<key>.*``, ``logs/PREFIX<key>.log``).
    An entry used within ``min_age`` seconds, or whose lock ``.PREFIX<key>.lock`` another process
    holds, stays; lock files stay (a process may be waiting on one). Returns the removed entries."""
    entries = []
    for path in cdir.iterdir():
        name = path.name
        if not (name.startswith(prefix) and name.endswith(suffix)):
            continue
        key = name[len(prefix):len(name) - len(suffix)]
        if len(key) != 16 or any(c not in "0123456789abcdef" for c in key):
            continue
        with contextlib.suppress(OSError):
            entries.append((path.stat().st_mtime, path, key))
    entries.sort(reverse=True)
    now = time.time()
    removed = []
    for mtime, path, key in entries[keep:]:
        if now - mtime < min_age:
            continue
        lock = cdir / f".{prefix}{key}.lock"
        try:
            lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue
            for part in [*cdir.glob(f"{prefix}{key}*"), cdir / "logs" / f"{prefix}{key}.log"]:
                if part.is_dir() and not part.is_symlink():
                    remove_tree(part)
                else:
                    part.unlink(missing_ok=True)
            removed.append(path)
            log(f"cache: removed {path.name} (unused for {(now - mtime) / 3600:.0f} h)")
        finally:
            os.close(lock_fd)
    return removed


def need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise HostError(f"{what} needs root (chroot, mounts)")


def need_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        raise HostError(f"missing host tool(s): {', '.join(missing)}; {SETUP_HINT}")


def digest(*parts: object) -> str:
    """A short stable hash of JSON-able parts (the cache keys)."""
    h = hashlib.sha256()
    for part in parts:
        data = part if isinstance(part, bytes) else json.dumps(part, sort_keys=True).encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:16]


def tree_digest(path: Path) -> str:
    """Hash of a directory's (or file's) names, modes, link targets and contents."""
    h = hashlib.sha256()
    path = Path(path)
    entries = [path] if not path.is_dir() else sorted(path.rglob("*"))
    for p in entries:
        rel = p.name if p == path else str(p.relative_to(path))
        st = p.lstat()
        h.update(f"{rel}\0{st.st_mode:o}\0".encode())
        if p.is_symlink():
            h.update(os.readlink(p).encode())
        elif p.is_file():
            h.update(p.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _tail(path: Path | None, text: str = "", lines: int = 1) -> str:
    if path is not None:
        try:
            with open(path, "rb") as f:
                f.seek(max(0, f.seek(0, 2) - 8192))
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
    kept = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(kept[-lines:])


def run(argv: Sequence[str], *, what: str, log_file: Path | None = None,
        env: Mapping[str, str] | None = None, cwd: str | os.PathLike[str] | None = None,
        timeout: float | None = None, capture: bool = False) -> str:
    """Run a command; its output goes to ``log_file`` (appended) or is captured. A failure
    becomes a one-line HostError naming the step, the exit code, the log and its last line."""
    full_env = None if env is None else {**os.environ, **env}
    try:
        if log_file is not None and not capture:
            with open(log_file, "ab") as log:
                log.write(f"\n$ {' '.join(argv)}\n".encode())
                log.flush()
                proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log,
                                      stderr=subprocess.STDOUT, env=full_env, cwd=cwd, timeout=timeout)
            out = ""
        else:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, env=full_env, cwd=cwd, timeout=timeout)
            out = proc.stdout.decode(errors="replace")
            if log_file is not None:
                with open(log_file, "ab") as log:
                    log.write(f"\n$ {' '.join(argv)}\n".encode() + proc.stdout)
    except FileNotFoundError:
        raise HostError(f"{what}: {argv[0]} not found; {SETUP_HINT}") from None
    except subprocess.TimeoutExpired:
        raise HostError(f"{what}: timed out after {timeout:.0f} s") from None
    if proc.returncode != 0:
        where = f"; log: {log_file}" if log_file is not None else ""
        last = _tail(log_file if not capture else None, out)
        raise HostError(f"{what} failed (exit {proc.returncode}){where}: {last}")
    return out


# The chroot runs in new mount and PID namespaces: /proc, /sys and /dev are mounted there only,
# so they vanish with the namespace on any exit (error, kill -9) and never show on the host, and
# no daemon a maintainer script starts can outlive the step (PID 1 of the namespace exits).
_CHROOT_SH = r'''
root=$1; shift
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount --rbind /dev "$root/dev"
mount -t tmpfs -o mode=0755 tmpfs "$root/run"
exec chroot "$root" "$@"
'''

CHROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C.UTF-8",
    "LANG": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
    "HOME": "/root",
    "TMPDIR": "/tmp",
}


def chroot_run(root: Path, argv: Sequence[str], *, what: str, log_file: Path | None = None,
               env: Mapping[str, str] | None = None, timeout: float | None = None,
               capture: bool = False) -> str:
    """Run ``argv`` chrooted into ``root`` with /proc, /sys, /dev and /run mounted in private
    namespaces (nothing to unmount afterwards, whatever happens)."""
    need_tools("unshare", "chroot")
    full = ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child",
            "sh", "-euc", _CHROOT_SH, "bootimg-chroot", str(root), *argv]
    # env -i: nothing of the caller's environment (proxies aside) leaks into the chroot.
    chroot_env = dict(CHROOT_ENV)
    for var in ("http_proxy", "https_proxy", "no_proxy", "SOURCE_DATE_EPOCH"):
        if var in os.environ:
            chroot_env[var] = os.environ[var]
    chroot_env.update(env or {})
    full = ["env", "-i", *(f"{k}={v}" for k, v in chroot_env.items()), *full]
    return run(full, what=what, log_file=log_file, timeout=timeout, capture=capture)


BINFMT_MISC = Path("/proc/sys/fs/binfmt_misc")
BINFMT_CONFS = (Path("/usr/lib/binfmt.d"), Path("/etc/binfmt.d"))


def binfmt_rule(arch: Arch, confs: Sequence[Path] = BINFMT_CONFS) -> tuple[str, str]:
    """qemu-user's binfmt_misc registration line for ``arch`` as the installed package ships it
    (``/usr/lib/binfmt.d/qemu-aarch64.conf``): ``(name, line)``."""
    name = f"qemu-{arch.uname}"
    for d in confs:
        conf = d / f"{name}.conf"
        try:
            lines = conf.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            fields = line.split(line[:1]) if line[:1] and not line.startswith("#") else []
            if len(fields) >= 8 and fields[1] == name:
                return name, line.strip()
        raise HostError(f"no binfmt_misc rule for {name} in it", file=str(conf))
    raise HostError(f"running {arch.name} programs here needs qemu-user's binfmt_misc rule ({name}.conf): "
                    f"install qemu-user-static; {SETUP_HINT}")


def binfmt_entry(name: str, where: Path = BINFMT_MISC) -> dict[str, str] | None:
    """A registered binfmt_misc entry (``enabled``, ``interpreter``, ``flags``), or None."""
    try:
        text = (where / name).read_text()
    except FileNotFoundError:
        return None
    entry = {"enabled": "no"}
    for line in text.splitlines():
        if line in ("enabled", "disabled"):
            entry["enabled"] = "yes" if line == "enabled" else "no"
        else:  # "flags: POF", "interpreter /usr/libexec/...", "offset 0"
            key, _, value = line.replace(":", " ", 1).partition(" ")
            entry[key] = value.strip()
    return entry


def enable_foreign(arch: Arch) -> None:
    """Make programs of ``arch`` run on this host, for chroots into a root of that architecture:
    nothing for the host's own; else qemu-user through binfmt_misc, mounted and registered from
    the qemu-user-static package's rule when the host has not done it (systemd-binfmt does it at
    boot where systemd runs). The rule must have the F flag: the kernel opens the interpreter at
    registration, so it works inside a chroot that has no qemu."""
    if arch.native:
        return
    name, line = binfmt_rule(arch)
    if not (BINFMT_MISC / "register").exists():
        need_root(f"running {arch.name} programs (mounting binfmt_misc)")
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_MISC)], what="mounting binfmt_misc")
    entry = binfmt_entry(name)
    if entry is None:
        need_root(f"running {arch.name} programs (registering {name} with binfmt_misc)")
        try:
            (BINFMT_MISC / "register").write_text(line)
        except OSError as err:
            if binfmt_entry(name) is None:  # another build may have registered it meanwhile
                raise HostError(f"cannot register {name} with binfmt_misc: {err.strerror}",
                                file=str(BINFMT_MISC / "register")) from None
        entry = binfmt_entry(name)
    if entry is None or entry["enabled"] != "yes":
        raise HostError(f"the binfmt_misc entry {name} is disabled: echo 1 > {BINFMT_MISC / name}",
                        file=str(BINFMT_MISC / name))
    if "F" not in entry.get("flags", ""):
        raise HostError(f"the binfmt_misc entry {name} lacks the F flag, so its interpreter "
                        f"({entry.get('interpreter', '?')}) is not found inside a chroot: replace it with "
                        f"qemu-user-static's rule (echo -1 > {BINFMT_MISC / name}, then rerun)",
                        file=str(BINFMT_MISC / name))


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below ``root`` in this mount namespace (should always be empty)."""
    root_s = os.path.realpath(root)
    found = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                point = line.split()[4].replace("\\040", " ")
                if point == root_s or point.startswith(root_s + "/"):
                    found.append(point)
    except OSError:
        pass
    return found


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path`` (two builds of the same artifact wait for each other)."""
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def scratch_dir(parent: Path, prefix: str, *, keep: bool = False) -> Iterator[Path]:
    """A temporary directory under ``parent`` (same filesystem as the cache, so renames are
    atomic), removed afterwards unless ``keep``."""
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield path
    finally:
        if not keep:
            remove_tree(path)


def remove_tree(path: Path) -> None:
    leftover = mounts_under(path)
    if leftover:  # never rm -rf through a mount (it would reach the host's /dev)
        raise HostError(f"refusing to remove a tree with mounts below it: {', '.join(leftover)}")
    # chattr +i files or odd permissions are not expected in a Debian tree; rm is faster than
    # shutil.rmtree on ~20k files.
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


def write_json_atomically(path: Path, data: object) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
