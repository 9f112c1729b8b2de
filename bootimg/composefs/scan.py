"""Build a tree from a directory, with mkcomposefs 1.0.8's directory-scan semantics.

What the reference reads, and so what we read: ``lstat`` (mode, uid, gid, rdev, size,
mtime with nanoseconds; *not* nlink, every non-directory gets nlink 1 and hardlinks are
not detected), all xattrs (or only ``user.*``, or none), symlink targets, the content of
regular files of 1..64 bytes (stored inline) and the fs-verity digest of larger ones
(stored in the object store, named by digest). The image therefore depends only on
names, metadata, xattrs and content: a ``cp -a`` copy gives the same bytes.

The walk is single-threaded (it is syscall-bound); digests are computed by workers (threads
with the C accelerator, else processes) while the walk goes on.
"""

from __future__ import annotations

import multiprocessing
import os
import stat
import threading
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from .._perf import gc_paused
from ..errors import BootimgError
from . import fsverity
from .tree import SCAN_INLINE_MAX, Node

try:
    from . import _scandir
except ImportError:  # not built: the walk stays pure Python (os.scandir), ~3x slower
    _scandir = None
# Flags of _scandir.scandir_into.
_SKIP_XATTRS, _USER_XATTRS, _SKIP_DEVICES = 1, 2, 4


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
    _pending: "_Hasher | None" = None

    def wait_digests(self, progress: Callable[[str, int, int], None] | None = None) -> None:
        """With ``defer_digests``: block until every external file's digest is set."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            with gc_paused():
                pending.finish(progress)


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


class _Hasher:
    """Digests of external files, computed by workers while the walk goes on.

    With the C accelerator a whole batch is hashed with the GIL released, so the workers are
    threads. Without it they are processes: hashlib drops and retakes the GIL for every 4 KiB
    block, and two threads measured only 1.15x one (2 processes: 1.7x). Files go in batches
    (few futures, little IPC); the pool starts only once a second batch exists, so small trees
    are hashed in the calling thread with no start-up cost."""

    BATCH_FILES = 128
    BATCH_BYTES = 64 << 20

    def __init__(self, workers: int):
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None
        # While the walk runs it needs a core of its own (it is the longest serial step); so
        # until walk_done() only one batch is hashed at a time, then all workers run.
        self._gate = threading.Semaphore(1)
        self._held = max(0, workers - 1)
        self.batches: list[tuple[list[Node], list[bytes], Future | None]] = []
        self._nodes: list[Node] = []
        self._paths: list[bytes] = []
        self._bytes = 0
        self.total_bytes = 0

    def add(self, path: bytes, node: Node) -> None:
        self._nodes.append(node)
        self._paths.append(path)
        self._bytes += node.size
        self.total_bytes += node.size
        if len(self._nodes) >= self.BATCH_FILES or self._bytes >= self.BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self._nodes:
            return
        future = None
        if self.workers > 1 and (self.batches or self.pool is not None):
            if self.pool is None:
                if fsverity.ACCELERATED:     # C hashing releases the GIL: threads scale
                    self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="bootimg-hash")
                else:
                    self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
                # The first batch was held back in case the tree was small: send it now.
                first_nodes, first_paths, _ = self.batches[0]
                self.batches[0] = (first_nodes, first_paths, self._submit(first_paths, first_nodes))
            future = self._submit(self._paths, self._nodes)
        self.batches.append((self._nodes, self._paths, future))
        self._nodes, self._paths, self._bytes = [], [], 0

    def _submit(self, paths: list[bytes], nodes: list[Node]) -> Future:
        sizes = [n.size for n in nodes]
        if fsverity.ACCELERATED:
            return self.pool.submit(self._gated, paths, sizes)
        return self.pool.submit(fsverity.digest_paths, paths, sizes)

    def _gated(self, paths: list[bytes], sizes: list[int]) -> list[bytes]:
        with self._gate:
            return fsverity.digest_paths(paths, sizes)

    def walk_done(self) -> None:
        """Let every worker hash from now on."""
        for _ in range(self._held):
            self._gate.release()
        self._held = 0

    def finish(self, progress: Callable[[str, int, int], None] | None) -> None:
        """Wait for every digest and set each node's digest and payload."""
        self.flush()
        done = 0
        try:
            for nodes, paths, future in self.batches:
                try:
                    digests = (future.result() if future is not None
                               else fsverity.digest_paths(paths, [n.size for n in nodes]))
                except OSError as err:
                    raise BootimgError(f"cannot read: {err.strerror}", file=os.fsdecode(err.filename or b"?")) from None
                for node, digest in zip(nodes, digests):
                    node.digest = digest
                    node.payload = fsverity.object_name(digest).encode()
                    done += node.size
                if progress is not None:
                    progress("hashing", done, self.total_bytes)
        finally:
            self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


def scan_directory(source: str | bytes, options: ScanOptions = ScanOptions(),
                   progress: Callable[[str, int, int], None] | None = None,
                   defer_digests: bool = False) -> ScanResult:
    """Walk ``source`` and return its tree, every external file's digest set; or, with
    ``defer_digests``, return as soon as the walk is done while digests are still being
    computed (call ``result.wait_digests()`` before using them)."""
    with gc_paused():
        return _scan(source, options, progress, defer_digests)


def _scan(source: str | bytes, options: ScanOptions, progress: Callable[[str, int, int], None] | None,
          defer_digests: bool) -> ScanResult:
    top = os.fsencode(source)
    try:
        st = os.lstat(top)
    except OSError as err:
        raise BootimgError(f"cannot read source directory: {err.strerror}", file=os.fsdecode(top)) from None
    if not stat.S_ISDIR(st.st_mode):
        raise BootimgError("source is not a directory", file=os.fsdecode(top))

    hasher = _Hasher(options.threads or default_threads())
    external: list[tuple[bytes, Node]] = []
    ok = False
    try:
        root = _make_node(top, st, options)
        walk = _walk_c if _scandir is not None else _walk_py
        n_files = walk(top, root, options, hasher, external, progress)
        hasher.flush()
        hasher.walk_done()
        result = ScanResult(root=root, external=external, n_files=n_files, bytes_hashed=hasher.total_bytes,
                            _pending=hasher)
        if not defer_digests:
            result.wait_digests(progress)
        ok = True
        return result
    finally:
        if not ok:
            hasher.close()


def _walk_py(top: bytes, root: Node, options: ScanOptions, hasher: _Hasher,
             external: list[tuple[bytes, Node]], progress: Callable[[str, int, int], None] | None) -> int:
    """The walk without the C reader: os.scandir, then lstat, xattrs and content per entry."""
    stack: list[tuple[bytes, Node]] = [(top, root)]
    n_files = 1
    while stack:
        dir_path, dir_node = stack.pop()
        try:
            entries = list(os.scandir(dir_path))
        except OSError as err:
            raise BootimgError(f"cannot list directory: {err.strerror}", file=os.fsdecode(dir_path)) from None
        children = dir_node.children
        for entry in entries:
            path = entry.path
            try:
                est = entry.stat(follow_symlinks=False)
                fmt = stat.S_IFMT(est.st_mode)
                if options.skip_devices and (fmt == stat.S_IFCHR or fmt == stat.S_IFBLK):
                    continue
                node = _make_node(path, est, options)
            except OSError as err:
                raise BootimgError(f"cannot read: {err.strerror}", file=os.fsdecode(path)) from None
            # Names from the kernel are valid and unique: link directly (add_child's
            # checks cost ~1 us per entry, 0.15 s on /usr).
            node.name = name = entry.name
            node.parent = dir_node
            children[name] = node
            n_files += 1
            if fmt == stat.S_IFDIR:
                stack.append((path, node))
            elif fmt == stat.S_IFREG and node.size > SCAN_INLINE_MAX:
                hasher.add(path, node)
                external.append((path, node))
            if progress is not None and n_files % 4096 == 0:
                progress("scanning", n_files, 0)
    return n_files


def _walk_c(top: bytes, root: Node, options: ScanOptions, hasher: _Hasher,
            external: list[tuple[bytes, Node]], progress: Callable[[str, int, int], None] | None) -> int:
    """The walk with the C reader: one call per directory does its system calls (GIL
    released), makes its Nodes and links them in; here only the queues are kept."""
    flags = ((_SKIP_XATTRS if options.skip_xattrs else 0) | (_USER_XATTRS if options.user_xattrs else 0)
             | (_SKIP_DEVICES if options.skip_devices else 0))
    scandir_into = _scandir.scandir_into
    use_epoch = options.use_epoch
    add = hasher.add
    stack: list[tuple[bytes, Node]] = [(top, root)]
    n_files = 1
    while stack:
        dir_path, dir_node = stack.pop()
        found: list[tuple[bytes, Node]] = []
        try:
            n_files += scandir_into(dir_path, flags, SCAN_INLINE_MAX, Node, dir_node, use_epoch, stack, found)
        except OSError as err:
            where = err.filename if isinstance(err.filename, bytes) else dir_path
            what = "cannot list directory" if where == dir_path else "cannot read"
            raise BootimgError(f"{what}: {err.strerror}", file=os.fsdecode(where)) from None
        for path, node in found:
            add(path, node)
        external += found
        if progress is not None:
            progress("scanning", n_files, 0)
    return n_files


def _make_node(path: bytes, st: os.stat_result, options: ScanOptions) -> Node:
    mode = st.st_mode
    fmt = mode & 0o170000
    node = Node(mode, nlink=1, uid=st.st_uid, gid=st.st_gid,
                rdev=st.st_rdev if fmt == stat.S_IFCHR or fmt == stat.S_IFBLK else 0)
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
