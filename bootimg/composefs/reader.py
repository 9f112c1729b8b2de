"""Read a composefs EROFS image back into a tree of ``Node``s.

The tree is the one ``mkcomposefs --from-file`` would have been given, as the reference
reader (``lcfs_load_node_from_image_ext``) reconstructs it: the overlay xattrs the writer
synthesized become PAYLOAD/DIGEST again, escaped whiteouts become 0:0 character devices,
the 256 root whiteout stubs disappear, and the first dirent that reaches an inode in
depth-first order owns it while later ones become hardlinks. That is what makes
``composefs-info dump IMG | mkcomposefs --from-file - IMG2`` reproduce IMG byte for byte.

Every read is bounds-checked, so a truncated or corrupt image raises ``FormatError`` naming
the problem and where it is, never ``IndexError`` or ``struct.error``.
"""

from __future__ import annotations

import gc
import mmap
import os
import stat
import struct
from dataclasses import dataclass

from ..errors import BootimgError, FormatError
from . import erofs as E
from .tree import NAME_MAX, Node

_S_IFMT = 0o170000
_S_IFDIR = stat.S_IFDIR
_S_IFREG = stat.S_IFREG
_S_IFLNK = stat.S_IFLNK
_S_IFCHR = stat.S_IFCHR
_S_IFBLK = stat.S_IFBLK
_VALID_TYPES = frozenset((_S_IFREG, _S_IFDIR, _S_IFLNK, _S_IFBLK, _S_IFCHR, stat.S_IFSOCK, stat.S_IFIFO))

_BLOCK = E.BLOCK
_FLAT_PLAIN = E.LAYOUT_FLAT_PLAIN
_FLAT_INLINE = E.LAYOUT_FLAT_INLINE
_CHUNK_BASED = E.LAYOUT_CHUNK_BASED
_SLOT = E.SLOT
_COMPACT = E.INODE_COMPACT.unpack_from
_EXTENDED = E.INODE_EXTENDED.unpack_from
_DIRENTS = E.DIRENT.iter_unpack
_ENTRY = E.XATTR_ENTRY.unpack_from
_U16 = struct.Struct("<H").unpack_from
_IDS = E.XATTR_SHARED_ID.iter_unpack
_PREFIXES = E.XATTR_PREFIXES
_N_PREFIXES = len(E.XATTR_PREFIXES)
_OVERLAY_PREFIX = E.OVERLAY_PREFIX
_OVERLAY_PREFIX_LEN = len(E.OVERLAY_PREFIX)
_ESCAPE_PREFIX = E.OVERLAY_ESCAPE_PREFIX
_TRUSTED_PREFIX = E.OVERLAY_TRUSTED_PREFIX
# Keys the reader interprets instead of storing (lcfs_build_node_erofs_xattr).
_STORE, _SKIP, _REDIRECT, _METACOPY, _WHITEOUT = range(5)
_SPECIAL_KEYS = {
    E.OVERLAY_REDIRECT: _REDIRECT,          # -> payload
    E.OVERLAY_METACOPY: _METACOPY,          # -> digest
    E.OVERLAY_ESCAPED_WHITEOUT: _WHITEOUT,  # a regular file with it -> 0:0 chardev
    E.OVERLAY_ESCAPED_WHITEOUTS: _SKIP,     # markers the writer puts on the parent
    E.OVERLAY_USER_WHITEOUT: _SKIP,
    E.OVERLAY_USER_WHITEOUTS: _SKIP,
}


@dataclass
class Image:
    """A decoded image: the tree plus the header/superblock facts tools report."""

    root: Node
    version: int                 # composefs_version from the header (0 without a header)
    has_acl: bool                # header flag: mount without "noacl"
    flags: int                   # raw composefs header flags
    superblock: E.SuperBlock

    @property
    def inos(self) -> int:
        return self.superblock.inos

    @property
    def blocks(self) -> int:
        return self.superblock.blocks

    @property
    def build_time(self) -> int:
        return self.superblock.build_time

    @property
    def build_time_nsec(self) -> int:
        return self.superblock.build_time_nsec

    @property
    def root_nid(self) -> int:
        return self.superblock.root_nid


def load_image(path: str | os.PathLike[str], *, filters: list[bytes] | None = None) -> Image:
    """Read the image file at path; errors name the file.

    The file is read into memory rather than mapped: it is as fast (every metadata byte
    is visited anyway) and leaves no mapping to manage."""
    shown = os.fsdecode(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise BootimgError(f"cannot read image: {err.strerror}", file=shown) from None
    try:
        return read_image(data, filters=filters)
    except FormatError as err:
        raise FormatError(err.message, file=shown) from None


def read_image(data: bytes | bytearray | memoryview | mmap.mmap, *, filters: list[bytes] | None = None,
               composefs_header: bool = True) -> Image:
    """Decode an image held in memory.

    ``filters`` keeps only these root entries (``composefs-info --filter``).
    ``composefs_header=False`` reads a plain EROFS image (e.g. from mkfs.erofs), which has
    no composefs header at offset 0; the overlay xattr interpretation is the same.
    """
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    size = len(data)
    if size < _BLOCK:
        raise FormatError(f"image too small ({size} bytes, at least {_BLOCK} needed)")
    version = flags = 0
    if composefs_header:
        magic, hversion, flags, version = E.COMPOSEFS_HEADER.unpack_from(data, 0)
        if magic != E.COMPOSEFS_MAGIC:
            raise FormatError(f"not a composefs image: bad magic 0x{magic:08x} at offset 0")
        if hversion != E.COMPOSEFS_HEADER_VERSION:
            raise FormatError(f"unsupported composefs header version {hversion} at offset 4")
    sb = E.SuperBlock._make(E.SUPERBLOCK.unpack_from(data, E.SUPERBLOCK_OFFSET))
    if sb.magic != E.EROFS_MAGIC:
        raise FormatError(f"bad EROFS superblock magic 0x{sb.magic:08x} at offset {E.SUPERBLOCK_OFFSET}")
    if sb.blkszbits != E.BLOCK_BITS:
        raise FormatError(f"unsupported EROFS block size 2^{sb.blkszbits} at offset {E.SUPERBLOCK_OFFSET + 12}")
    if sb.meta_blkaddr * _BLOCK >= size or sb.xattr_blkaddr * _BLOCK >= size:
        raise FormatError(f"superblock points past the end of the image (meta_blkaddr {sb.meta_blkaddr}, "
                          f"xattr_blkaddr {sb.xattr_blkaddr}, {size} bytes)")
    # Building ~10^5 linked objects triggers the cyclic GC over and over for nothing
    # (nothing is garbage yet): pausing it halves the time of a large read.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        with memoryview(data) as view:
            reader = _Reader(data, view, sb)
            root = reader.tree(sb.root_nid, set(filters) if filters is not None else None)
    finally:
        if gc_was_enabled:
            gc.enable()
    return Image(root=root, version=version, has_acl=bool(flags & E.COMPOSEFS_FLAG_HAS_ACL),
                 flags=flags, superblock=sb)


class _Reader:
    """Decodes inodes on demand; ``tree`` walks the directories depth-first."""

    def __init__(self, data: bytes | mmap.mmap, view: memoryview, sb: E.SuperBlock):
        self.data = data
        self.view = view
        self.size = len(data)
        self.meta = sb.meta_blkaddr * _BLOCK
        self.xattr_base = sb.xattr_blkaddr * _BLOCK
        self.build_time = sb.build_time
        self.build_time_nsec = sb.build_time_nsec
        self.keys: dict[bytes, tuple[int, bytes]] = {}   # xattr name -> _classify(name)
        self.shared: dict[int, tuple[tuple[int, bytes], bytes]] = {}   # id -> (action, value)

    # -- tree -----------------------------------------------------------------------------
    def tree(self, root_nid: int, filters: set[bytes] | None) -> Node:
        res = self.inode(root_nid)
        if res is None or not res[0].is_dir():
            raise FormatError(f"root inode (nid {root_nid}) is not a directory")
        root, entries = res
        if filters is not None:
            entries = [e for e in entries if e[0] in filters]
        seen: dict[int, Node] = {root_nid: root}
        # Explicit stack (no recursion limit): pop order is the reference's depth-first
        # recursion order, which decides who owns a hard-linked inode.
        stack = [(root, name, nid) for name, nid in reversed(entries)]
        pop, push = stack.pop, stack.extend
        inode = self.inode
        while stack:
            parent, name, nid = pop()
            node = seen.get(nid)
            if node is None:
                res = inode(nid)
                if res is None:         # a 0:0 chardev: one of the root whiteout stubs
                    continue
                node, entries = res
                seen[nid] = node
                if entries:
                    push([(node, cname, cnid) for cname, cnid in reversed(entries)])
            else:
                if node.children is not None:
                    raise FormatError(f"directory inode nid {nid} is linked twice "
                                      f"(again as {_show(parent.path(), name)})")
                target, node = node, Node(node.mode)
                node.link_to = target
            # Node.add_child, minus the checks a dirent name has passed ('.', '..', empty).
            children = parent.children
            if name in children or len(name) > NAME_MAX or b"/" in name or b"\0" in name:
                what = "duplicate" if name in children else "invalid"
                raise FormatError(f"{what} entry {_show(parent.path(), name)!r}")
            node.name = name
            node.parent = parent
            children[name] = node
        return root

    # -- inodes ---------------------------------------------------------------------------
    def inode(self, nid: int) -> tuple[Node, list[tuple[bytes, int]] | None] | None:
        """Decode inode nid: (node, dirents or None), or None for a whiteout stub."""
        data, size = self.data, self.size
        off = self.meta + nid * _SLOT
        if off + 32 > size:
            raise FormatError(f"inode nid {nid} at offset {off} lies past the end of the image ({size} bytes)")
        if not data[off] & 1:                   # i_format bit 0: compact (32 B) or extended (64 B)
            fmt, icount, mode, nlink, isize, _, i_u, _, uid, gid, _ = _COMPACT(data, off)
            sec, nsec = self.build_time, self.build_time_nsec
            p = off + 32
        else:
            if off + 64 > size:
                raise FormatError(f"inode nid {nid} at offset {off} is truncated")
            fmt, icount, mode, _, isize, i_u, _, uid, gid, sec, nsec, nlink = _EXTENDED(data, off)
            p = off + 64
        ftype = mode & _S_IFMT
        if ftype not in _VALID_TYPES:
            raise FormatError(f"inode nid {nid} at offset {off}: invalid mode 0{mode:o}")
        rdev = i_u if ftype == _S_IFCHR or ftype == _S_IFBLK else 0
        if ftype == _S_IFCHR and rdev == 0:
            return None
        xsize = 12 + (icount - 1) * 4 if icount else 0
        tail_off = p + xsize
        if tail_off > size:
            raise FormatError(f"inode nid {nid} at offset {off}: xattrs run past the end of the image")
        node = Node(mode, nlink=nlink, uid=uid, gid=gid, rdev=rdev, mtime_sec=sec, mtime_nsec=nsec, size=isize)
        layout = (fmt >> 1) & 7
        entries = None
        if ftype == _S_IFDIR:
            entries = self._dirents(nid, isize, layout, i_u, tail_off)
        elif ftype == _S_IFLNK:
            self._symlink(node, nid, isize, layout, i_u, tail_off)
        elif ftype == _S_IFREG and isize:
            if layout == _FLAT_PLAIN or layout == _FLAT_INLINE:
                node.content = self._flat_data(nid, isize, layout, i_u, tail_off, E.INLINE_CONTENT_MAX)
            elif layout != _CHUNK_BASED:
                raise FormatError(f"inode nid {nid} at offset {off}: unsupported data layout {layout}")
            # chunk-based: an external file, its data lives in the object store.
        if icount:
            self._xattrs(node, nid, p, xsize)
        return node, entries

    def _flat_data(self, nid: int, isize: int, layout: int, blkaddr: int, tail_off: int, limit: int) -> bytes:
        """The bytes of a flat file: whole blocks at blkaddr, then the inline tail."""
        if isize > limit:
            raise FormatError(f"inode nid {nid}: inline data of {isize} bytes exceeds {limit}")
        if layout == _FLAT_INLINE:
            oob = (isize // _BLOCK) * _BLOCK
            tail = isize - oob
        elif layout == _FLAT_PLAIN:
            oob, tail = isize, 0
        else:
            raise FormatError(f"inode nid {nid}: unsupported data layout {layout}")
        start = blkaddr * _BLOCK
        if oob and start + oob > self.size:
            raise FormatError(f"inode nid {nid}: data block {blkaddr} lies past the end of the image")
        if tail_off + tail > self.size:
            raise FormatError(f"inode nid {nid}: inline data runs past the end of the image")
        data = self.data
        if not tail:
            return data[start:start + oob]
        if not oob:
            return data[tail_off:tail_off + tail]
        return data[start:start + oob] + data[tail_off:tail_off + tail]

    def _symlink(self, node: Node, nid: int, isize: int, layout: int, blkaddr: int, tail_off: int) -> None:
        if isize >= E.PATH_MAX:
            raise FormatError(f"inode nid {nid}: symlink target of {isize} bytes is too long")
        target = self._flat_data(nid, isize, layout, blkaddr, tail_off, E.PATH_MAX)
        if b"\0" in target:                 # the reference reads it as a C string
            target = target[:target.index(b"\0")]
        if not target:
            raise FormatError(f"inode nid {nid}: empty symlink target")
        node.payload = target
        node.size = len(target)

    def _dirents(self, nid: int, isize: int, layout: int, blkaddr: int, tail_off: int) -> list[tuple[bytes, int]]:
        """(name, nid) of every entry but '.' and '..': full blocks first, then the tail."""
        if layout == _FLAT_INLINE:
            n_oob, tail = divmod(isize, _BLOCK)
            last = _BLOCK
        elif layout == _FLAT_PLAIN:
            n_oob, tail = -(-isize // _BLOCK), 0
            last = isize - (n_oob - 1) * _BLOCK if n_oob else 0
        else:
            raise FormatError(f"directory inode nid {nid}: unsupported data layout {layout}")
        out: list[tuple[bytes, int]] = []
        if n_oob:
            start = blkaddr * _BLOCK
            if start + (n_oob - 1) * _BLOCK + last > self.size:
                raise FormatError(f"directory inode nid {nid}: blocks {blkaddr}..{blkaddr + n_oob - 1} "
                                  f"lie past the end of the image")
            for i in range(n_oob):
                self._dirent_block(nid, start + i * _BLOCK, last if i == n_oob - 1 else _BLOCK, out)
        if tail:
            if tail_off + tail > self.size:
                raise FormatError(f"directory inode nid {nid}: inline entries run past the end of the image")
            self._dirent_block(nid, tail_off, tail, out)
        return out

    def _dirent_block(self, nid: int, start: int, bsize: int, out: list[tuple[bytes, int]]) -> None:
        data = self.data
        if bsize < 12:
            raise FormatError(f"directory inode nid {nid}: dirent block at offset {start} is only {bsize} bytes")
        first = _U16(data, start + 8)[0]
        if first == 0 or first % 12 or first > bsize:
            raise FormatError(f"directory inode nid {nid}: bad dirent block at offset {start} "
                              f"(first name offset {first})")
        ents = list(_DIRENTS(self.view[start:start + first]))
        ends = [e[1] for e in ents[1:]]
        ends.append(-1)
        for (cnid, noff, _ftype, _), end in zip(ents, ends):
            if end < 0:                       # the last name ends at a NUL or the block end
                stop = data.find(b"\0", start + noff, start + bsize) if noff < bsize else -1
                end = (stop - start) if stop >= 0 else bsize
            if noff < first or end <= noff or end > bsize:
                raise FormatError(f"directory inode nid {nid}: bad name offset {noff} in dirent block "
                                  f"at offset {start}")
            name = data[start + noff:start + end]
            if name == b"." or name == b"..":
                continue
            out.append((name, cnid))

    # -- xattrs ---------------------------------------------------------------------------
    def _xattrs(self, node: Node, nid: int, xoff: int, xsize: int) -> None:
        """Inline entries first, then shared ones (the reference's order, which is the order
        the dump prints them in); composefs' own overlay xattrs become node fields."""
        data, end = self.data, xoff + xsize
        shared = data[xoff + 4]
        p = xoff + 12 + 4 * shared
        if p > end:
            raise FormatError(f"inode nid {nid}: {shared} shared xattr ids overflow the xattr body "
                              f"at offset {xoff}")
        keys, xattrs = self.keys, node.xattrs
        # The reference loops while a header *and more* fits (strict '<'), so a 4-byte entry
        # (empty suffix and value) in the very last slot is not read; neither is it here.
        while p + 4 < end:
            nlen, index, vlen = _ENTRY(data, p)
            q = p + 4 + nlen
            r = q + vlen
            if r > end:
                raise FormatError(f"inode nid {nid}: xattr entry at offset {p} runs past the xattr body")
            if index >= _N_PREFIXES:
                raise FormatError(f"inode nid {nid}: unknown xattr name index {index} at offset {p}")
            key = _PREFIXES[index] + data[p + 4:q]
            action = keys.get(key)
            if action is None:
                action = keys[key] = _classify(key)
            if action[0] == _STORE:
                xattrs[action[1]] = data[q:r]
            else:
                _apply(node, action, data[q:r])
            p += (r - p + 3) & ~3
        if shared:
            cache = self.shared
            for (idx,) in _IDS(self.view[xoff + 12:xoff + 12 + 4 * shared]):
                entry = cache.get(idx)
                if entry is None:
                    entry = self._shared_entry(nid, idx)
                action, value = entry
                if action[0] == _STORE:
                    xattrs[action[1]] = value
                else:
                    _apply(node, action, value)

    def _shared_entry(self, nid: int, idx: int) -> tuple[tuple[int, bytes], bytes]:
        """Decode (and remember) shared xattr idx: shared entries are reused by definition."""
        data, size = self.data, self.size
        e = self.xattr_base + idx * 4
        if e + 4 > size:
            raise FormatError(f"inode nid {nid}: shared xattr id {idx} points past the end of the image")
        nlen, index, vlen = _ENTRY(data, e)
        q = e + 4 + nlen
        if q + vlen > size:
            raise FormatError(f"inode nid {nid}: shared xattr at offset {e} runs past the end of the image")
        if index >= _N_PREFIXES:
            raise FormatError(f"inode nid {nid}: unknown xattr name index {index} at offset {e}")
        key = _PREFIXES[index] + data[e + 4:q]
        entry = self.shared[idx] = (_classify(key), data[q:q + vlen])
        return entry


def _apply(node: Node, action: tuple[int, bytes], value: bytes) -> None:
    """The non-_STORE actions of _classify."""
    kind, key = action
    if kind == _SKIP:
        return
    if node.mode & _S_IFMT != _S_IFREG:
        if kind == _WHITEOUT:           # the marker on anything but a file is user data
            node.xattrs[_TRUSTED_PREFIX + key[_OVERLAY_PREFIX_LEN:]] = value
    elif kind == _REDIRECT:
        if len(value) > 1 and value[0] == 0x2F:         # "/"
            value = value[1:]
        if b"\0" in value:                             # read as a C string
            value = value[:value.index(b"\0")]
        node.payload = value
    elif kind == _METACOPY:
        if len(value) == E.METACOPY_SIZE:
            node.digest = value[4:]
    else:                                               # _WHITEOUT
        node.mode = (node.mode & ~_S_IFMT) | _S_IFCHR
        node.rdev = 0
        node.size = 0


def _classify(key: bytes) -> tuple[int, bytes]:
    """What the reference reader does with an xattr name (lcfs_build_node_erofs_xattr):
    (_STORE, name to store under) or (special action, key)."""
    kind = _SPECIAL_KEYS.get(key)
    if kind is not None:
        return kind, key
    if key.startswith(_OVERLAY_PREFIX):
        if not key.startswith(_ESCAPE_PREFIX):
            return _SKIP, key           # composefs' own, e.g. the root's opaque=y
        return _STORE, _TRUSTED_PREFIX + key[_OVERLAY_PREFIX_LEN:]
    return _STORE, key


def _show(path: bytes, name: bytes | None = None) -> str:
    if name is not None:
        path = path.rstrip(b"/") + b"/" + name
    return path.decode("utf-8", "backslashreplace")
