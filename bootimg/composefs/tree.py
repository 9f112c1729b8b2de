"""The in-memory file tree a composefs image is made from (and read back into).

It mirrors libcomposefs' node model so that the writer can reproduce mkcomposefs byte for
byte: names are raw bytes, children are looked up by name and serialized in ``strcmp``
order, hardlinks are aliases (``link_to``) that never become inodes of their own, and
xattrs are a key->value map sorted at write time.
"""

from __future__ import annotations

import stat
from typing import Iterator

from ..errors import FormatError

# Limits the reference writer enforces (lcfs-writer.h, linux/limits.h).
NAME_MAX = 255
PATH_MAX = 4096
SYMLINK_MAX = PATH_MAX - 1
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65535
XATTR_BUDGET = 32767          # per inode: 12 + sum(7 + len(k) + len(v))
INLINE_CONTENT_MAX = 5000     # largest inline content a dump may carry
SCAN_INLINE_MAX = 64          # directory scans inline files up to this size
MAX_CHUNKS = 1024             # external files must fit this many chunks
MAX_CHUNK_BITS = 43           # chunks of at most 2^43 bytes


def chunk_bits(size: int) -> int:
    """erofs_compute_chunk_bitsize: the smallest chunk (one block .. 2^43) that needs fewest chunks."""
    bits = (size - 1).bit_length()
    return 12 if bits < 12 else MAX_CHUNK_BITS if bits > MAX_CHUNK_BITS else bits


def chunk_count(size: int) -> int:
    """Chunks of an external file of this size, computed in u64 as the reference does: a size
    within 2^43 of 2^64 wraps around to 0 chunks."""
    bits = chunk_bits(size)
    return ((size + (1 << bits) - 1) & 0xFFFFFFFFFFFFFFFF) >> bits

_VALID_TYPES = frozenset(
    (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFBLK, stat.S_IFCHR, stat.S_IFSOCK, stat.S_IFIFO)
)


class Node:
    """One file of the tree. A hardlink alias has ``link_to`` set and nothing else of note."""

    __slots__ = (
        "name", "parent", "children", "link_to",
        "mode", "nlink", "uid", "gid", "rdev", "mtime_sec", "mtime_nsec", "size",
        "payload", "content", "digest", "xattrs",
    )

    def __init__(self, mode: int = 0, *, nlink: int = 1, uid: int = 0, gid: int = 0, rdev: int = 0,
                 mtime_sec: int = 0, mtime_nsec: int = 0, size: int = 0):
        self.name: bytes = b""
        self.parent: Node | None = None
        self.children: dict[bytes, Node] | None = {} if stat.S_ISDIR(mode) else None
        self.link_to: Node | None = None
        self.mode = mode
        self.nlink = nlink
        self.uid = uid
        self.gid = gid
        self.rdev = rdev
        self.mtime_sec = mtime_sec
        self.mtime_nsec = mtime_nsec
        self.size = size
        self.payload: bytes | None = None
        self.content: bytes | None = None
        self.digest: bytes | None = None
        self.xattrs: dict[bytes, bytes] = {}

    # -- type helpers -------------------------------------------------------------------
    @property
    def type(self) -> int:
        return stat.S_IFMT(self.mode)

    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    def is_whiteout(self) -> bool:
        """A 0:0 character device: overlayfs' whiteout."""
        return stat.S_ISCHR(self.mode) and self.rdev == 0

    def is_external(self) -> bool:
        """A regular file whose data lives in the object store, not in the image."""
        return stat.S_ISREG(self.mode) and self.size > 0 and self.content is None

    def target(self) -> Node:
        """The inode this entry stands for (itself unless it is a hardlink alias)."""
        return self.link_to if self.link_to is not None else self

    # -- structure ------------------------------------------------------------------------
    def add_child(self, name: bytes, child: Node) -> Node:
        if self.children is None:
            raise FormatError(f"cannot add {name!r}: parent is not a directory")
        if not name or len(name) > NAME_MAX or b"/" in name or b"\0" in name:
            raise FormatError(f"invalid file name {name!r}")
        if name in (b".", b".."):
            raise FormatError("invalid '.' or '..' in path")
        if name in self.children:
            raise FormatError(f"duplicate entry {name.decode('utf-8', 'backslashreplace')!r}")
        child.name = name
        child.parent = self
        self.children[name] = child
        return child

    def sorted_children(self) -> list[tuple[bytes, Node]]:
        """Children in strcmp order (bytes compare as unsigned, like strcmp)."""
        return sorted(self.children.items()) if self.children else []

    def lookup(self, path: bytes) -> Node | None:
        """Resolve a '/'-separated path relative to this directory (no symlinks, no '..')."""
        node: Node | None = self
        for part in path.split(b"/"):
            if not part:
                continue
            if node is None or node.children is None:
                return None
            node = node.children.get(part)
        return node

    def path(self) -> bytes:
        parts = []
        node: Node | None = self
        while node is not None and node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return b"/" + b"/".join(reversed(parts))

    def walk(self) -> Iterator[Node]:
        """Depth-first, children in sorted order, self first (what composefs-info prints)."""
        stack = [self]
        while stack:
            node = stack.pop()
            yield node
            if node.children:
                stack.extend(child for _, child in sorted(node.children.items(), reverse=True))

    # -- attributes -----------------------------------------------------------------------
    def set_xattr(self, key: bytes, value: bytes) -> None:
        """Set an xattr with the reference writer's limits (which also cover the ones the
        writer adds itself, so the budget is checked here, on every insertion)."""
        if not key or len(key) > XATTR_NAME_MAX:
            raise FormatError(f"invalid xattr name length {len(key)} (must be 1..{XATTR_NAME_MAX})")
        if len(value) > XATTR_SIZE_MAX:
            raise FormatError(f"xattr value of {len(value)} bytes exceeds {XATTR_SIZE_MAX}")
        old = self.xattrs.get(key)
        budget = xattr_budget(self.xattrs)
        if old is not None:
            budget -= 7 + len(key) + len(old)
        elif not self.xattrs:
            budget = 12
        if budget + 7 + len(key) + len(value) > XATTR_BUDGET:
            raise FormatError("too many xattrs (per-file xattr space exhausted)")
        self.xattrs[key] = value

    def validate_mode(self) -> None:
        if stat.S_IFMT(self.mode) not in _VALID_TYPES:
            raise FormatError(f"invalid mode {self.mode:o}")


def xattr_budget(xattrs: dict[bytes, bytes]) -> int:
    if not xattrs:
        return 0
    return 12 + sum(7 + len(k) + len(v) for k, v in xattrs.items())


def count_nodes(root: Node) -> int:
    return sum(1 for _ in root.walk())
