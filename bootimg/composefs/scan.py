"""Build a tree from a directory, with mkcomposefs 1.0.8's directory-scan semantics.

What the reference reads, and so what we read: ``lstat`` (mode, uid, gid, rdev, size,
mtime with nanoseconds; *not* nlink, every non-directory gets nlink 1 and hardlinks are
not detected), all xattrs (or only ``user.*``, or none), symlink targets, the content of
regular files of 1..64 bytes (stored inline) and the fs-verity digest of larger ones
(stored in the object store, named by digest). The image therefore depends only on
names, metadata, xattrs and content: a ``cp -a`` copy gives the same bytes.

The walk is single-threaded (it is syscall-bound); digests are computed in a thread pool
while the walk goes on, since hashlib releases the GIL on every 4 KiB block.
"""

from __future__ import annotations

import os
import stat
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from .._perf import gc_paused
from ..errors import BootimgError
from . import fsverity
from .tree import SCAN_INLINE_MAX, Node


@dataclass(frozen=True)
class ScanOptions:
    use_epoch: bool = False       # all mtimes 0 (every inode can be compact)
    skip_devices: bool = False    # leave out block and character devices
    skip_xattrs: bool = False     # no xattrs at all
    user_xattrs: bool = False     # only user.* xattrs
    threads: int = 0              # hashing threads (0 = CPUs available to this process)


@dataclass
class ScanResult:
    root: Node
    # (source path, node) of every external file, in walk order: what a store fill copies.
    external: list[tuple[bytes, Node]]
    n_files: int = 0
    bytes_hashed: int = 0


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _read_xattrs(path: bytes, options: ScanOptions) -> dict[bytes, bytes]:
    if options.skip_xattrs:
        return {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as err:
        if err.errno in (95, 61):        # EOPNOTSUPP, ENODATA: no xattrs here
            return {}
        raise
    if not names:
        return {}
    out = {}
    for name in names:
        if options.user_xattrs and not name.startswith("user."):
            continue
        key = os.fsencode(name)
        out[key] = os.getxattr(path, name, follow_symlinks=False)
    return out


def _hash_file(path: bytes, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return fsverity.digest_fd(fd, size)
    finally:
        os.close(fd)


def scan_directory(source: str | bytes, options: ScanOptions = ScanOptions(),
                   progress: Callable[[str, int, int], None] | None = None) -> ScanResult:
    """Walk ``source`` and return its tree, every external file's digest already set."""
    with gc_paused():
        return _scan(source, options, progress)


def _scan(source: str | bytes, options: ScanOptions, progress: Callable[[str, int, int], None] | None) -> ScanResult:
    top = os.fsencode(source)
    try:
        st = os.lstat(top)
    except OSError as err:
        raise BootimgError(f"cannot read source directory: {err.strerror}", file=os.fsdecode(top)) from None
    if not stat.S_ISDIR(st.st_mode):
        raise BootimgError("source is not a directory", file=os.fsdecode(top))

    threads = options.threads or default_threads()
    pending: list[tuple[Node, Future, bytes]] = []
    external: list[tuple[bytes, Node]] = []
    result = ScanResult(root=None, external=external)  # type: ignore[arg-type]
    lock = threading.Lock()
    done_bytes = [0]

    def on_done(fut: Future, size: int) -> None:
        with lock:
            done_bytes[0] += size

    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bootimg-hash")
    try:
        root = _make_node(top, st, options)
        result.root = root
        stack: list[tuple[bytes, Node]] = [(top, root)]
        n_files = 1
        total_bytes = 0
        while stack:
            dir_path, dir_node = stack.pop()
            try:
                entries = list(os.scandir(dir_path))
            except OSError as err:
                raise BootimgError(f"cannot list directory: {err.strerror}", file=os.fsdecode(dir_path)) from None
            for entry in entries:
                path = entry.path
                try:
                    est = entry.stat(follow_symlinks=False)
                except OSError as err:
                    raise BootimgError(f"cannot stat: {err.strerror}", file=os.fsdecode(path)) from None
                fmt = stat.S_IFMT(est.st_mode)
                if options.skip_devices and fmt in (stat.S_IFCHR, stat.S_IFBLK):
                    continue
                try:
                    node = _make_node(path, est, options)
                except OSError as err:
                    raise BootimgError(f"cannot read: {err.strerror}", file=os.fsdecode(path)) from None
                dir_node.add_child(entry.name, node)
                n_files += 1
                if fmt == stat.S_IFDIR:
                    stack.append((path, node))
                elif fmt == stat.S_IFREG and node.size > SCAN_INLINE_MAX:
                    fut = pool.submit(_hash_file, path, node.size)
                    size = node.size
                    fut.add_done_callback(lambda f, s=size: on_done(f, s))
                    pending.append((node, fut, path))
                    external.append((path, node))
                    total_bytes += size
                if progress is not None and n_files % 4096 == 0:
                    progress("scan", n_files, 0)
        for i, (node, fut, path) in enumerate(pending):
            try:
                node.digest = fut.result()
            except OSError as err:
                raise BootimgError(f"cannot read: {err.strerror}", file=os.fsdecode(path)) from None
            node.payload = fsverity.object_name(node.digest).encode()
            if progress is not None and i % 1024 == 0:
                progress("hash", done_bytes[0], total_bytes)
        result.n_files = n_files
        result.bytes_hashed = total_bytes
        return result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _make_node(path: bytes, st: os.stat_result, options: ScanOptions) -> Node:
    mode = st.st_mode
    fmt = stat.S_IFMT(mode)
    node = Node(mode, nlink=1, uid=st.st_uid, gid=st.st_gid,
                rdev=st.st_rdev if fmt in (stat.S_IFCHR, stat.S_IFBLK) else 0)
    if not options.use_epoch:
        sec, node.mtime_nsec = divmod(st.st_mtime_ns, 1_000_000_000)
        node.mtime_sec = sec % (1 << 64)     # pre-1970 times wrap like the C u64
    node.xattrs = _read_xattrs(path, options)
    if fmt == stat.S_IFREG:
        node.size = st.st_size
        if 0 < st.st_size <= SCAN_INLINE_MAX:
            with open(path, "rb", buffering=0) as f:
                content = f.read(st.st_size + 1)
            if len(content) != st.st_size:
                raise OSError(5, "file changed size while being read")
            node.content = content
    elif fmt == stat.S_IFLNK:
        node.payload = os.readlink(path)
        node.size = len(node.payload)
    return node
