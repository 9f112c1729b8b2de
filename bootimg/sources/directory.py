"""A directory on the build host, scanned with mkcomposefs' semantics (bootimg.composefs.scan:
lstat metadata with nanosecond mtimes, all xattrs, nlink 1 and hardlinks not detected, 1..64
byte files inline), then checked against the policy and its large files copied into the store."""

from __future__ import annotations

import os
import stat

from ..composefs import fsverity
from ..composefs.scan import ScanOptions, default_threads, scan_directory
from ..composefs.store import ObjectStore
from ..composefs.tree import SCAN_INLINE_MAX, Node
from ..errors import BootimgError
from .common import LoadedSource, SourceError, SourcePolicy, SourceStats
from .treeops import tree_stats

_SPECIAL = {stat.S_IFCHR: "character device", stat.S_IFBLK: "block device", stat.S_IFIFO: "FIFO",
            stat.S_IFSOCK: "socket"}


def load_directory(path: str | os.PathLike[str], store: ObjectStore, policy: SourcePolicy = SourcePolicy(),
                   label: str = "rootfs") -> LoadedSource:
    policy.check()
    top = os.fspath(path)
    try:
        scan = scan_directory(top, ScanOptions())
    except SourceError:
        raise
    except BootimgError as e:
        raise SourceError(e.message, file=e.file or top, label=label) from None
    root = scan.root
    allow_devices = policy.devices_allowed(label)

    def fail(problem: str, node: Node | None = None) -> SourceError:
        where = top if node is None else os.path.join(top, os.fsdecode(node.path()).lstrip("/"))
        return SourceError(problem, file=where, label=label)

    entries = total = 0
    for node in root.walk():
        entries += 1
        if entries > policy.max_entries:
            raise fail(f"more than {policy.max_entries} entries (policy max_entries)")
        fmt = stat.S_IFMT(node.mode)
        if fmt in _SPECIAL and not allow_devices:
            raise fail(f"{_SPECIAL[fmt]} not allowed in this source (policy allow_devices)", node)
        if fmt == stat.S_IFREG:
            if node.size > policy.max_file_size:
                raise fail(f"file of {node.size} bytes exceeds the limit of {policy.max_file_size} "
                           "(policy max_file_size)", node)
            total += node.size
            if total > policy.max_total_size:
                raise fail(f"more than {policy.max_total_size} bytes of file data (policy max_total_size)", node)

    paths = {id(node): p for p, node in scan.external}
    created = nbytes = 0
    if policy.inline_max != SCAN_INLINE_MAX:
        created, nbytes = _reinline(root, paths, store, policy.inline_max)
    to_copy = [(p, node.digest) for p, node in scan.external if node.content is None]
    try:
        c, b = store.fill(to_copy, threads=min(8, default_threads()))
    except SourceError:
        raise
    except BootimgError as e:
        raise SourceError(e.message, file=e.file or top, label=label) from None
    t = tree_stats(root)
    return LoadedSource(root=root, stats=SourceStats(entries=t.entries, files=t.files, bytes=t.bytes,
                                                     objects_added=created + c, bytes_added=nbytes + b))


def _reinline(root: Node, paths: dict[int, bytes], store: ObjectStore, inline_max: int) -> tuple[int, int]:
    """Apply a non-default inline limit to a scan (which inlines 1..64 bytes)."""
    created = nbytes = 0
    for node in root.walk():
        if not node.is_reg() or node.size == 0:
            continue
        if node.content is not None and node.size > inline_max:
            data = node.content
            new = not store.has(fsverity.digest(data))
            node.digest = store.add_bytes(data)
            node.payload = fsverity.object_name(node.digest).encode()
            node.content = None
            created += new
            nbytes += len(data) if new else 0
        elif node.content is None and node.size <= inline_max:
            with open(paths[id(node)], "rb") as f:
                data = f.read(node.size + 1)
            if len(data) != node.size:
                raise BootimgError("file changed size while being read", file=os.fsdecode(paths[id(node)]))
            node.content = data
            node.digest = node.payload = None
    return created, nbytes
