"""Read a composefs EROFS image back into a tree of ``Node``s.

The tree is the one the reference reader (``lcfs_load_node_from_image_ext``, composefs 1.0.8)
builds, so that ``composefs-info`` prints the same bytes for any image, valid or not: the
overlay xattrs the writer synthesized become PAYLOAD/DIGEST again, escaped whiteouts become
0:0 character devices, the root whiteout stubs (0:0 character devices) disappear, and the
first dirent that reaches an inode in depth-first order owns it while later ones become
hardlinks (directories too). What the reference tolerates is tolerated here the same way
(any file type, dirent names cut at a NUL, xattr entries spilling out of their area, names
with '/'); that is what makes ``composefs-info dump IMG | mkcomposefs --from-file - IMG2``
reproduce IMG byte for byte.

The reference does not bounds-check its reads of the mapped image. Every read it would make
is checked here instead, so an image that would make it read outside the file (and print
whatever memory lies there, or crash) raises ``FormatError`` naming the place, as do the
cases where it returns uninitialised or freed memory; nothing else is refused.
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

_M64 = (1 << 64) - 1
_M32 = (1 << 32) - 1
_BLOCK = E.BLOCK
_FLAT_PLAIN = E.LAYOUT_FLAT_PLAIN
_FLAT_INLINE = E.LAYOUT_FLAT_INLINE
_CHUNK_BASED = E.LAYOUT_CHUNK_BASED
_COMPACT = struct.Struct("<HHHHI4xI4xHH").unpack_from      # format, icount, mode, nlink, size, i_u, uid, gid
_EXTENDED = struct.Struct("<HHH2xQI4xIIQII").unpack_from   # format, icount, mode, size, i_u, uid, gid, mtime, nsec, nlink
_COMPACT_READ, _EXTENDED_READ = 28, 48                     # bytes of an inode the reference reads
_DIRENT = struct.Struct("<QH").unpack_from                 # nid, nameoff (the bytes the reference reads)
_U16 = struct.Struct("<H").unpack_from
_U32 = struct.Struct("<I").unpack_from
_ENTRY = E.XATTR_ENTRY.unpack_from
_PREFIXES = E.XATTR_PREFIXES
_N_PREFIXES = len(E.XATTR_PREFIXES)
_OVERLAY_PREFIX = E.OVERLAY_PREFIX
_OVERLAY_PREFIX_LEN = len(E.OVERLAY_PREFIX)
_ESCAPE_PREFIX = E.OVERLAY_ESCAPE_PREFIX
_TRUSTED_PREFIX = E.OVERLAY_TRUSTED_PREFIX
_XATTR_NAME_MAX = 255
_XATTR_SPACE_MAX = 0xFFFF       # lcfs_node_set_xattr_internal's limit for xattrs read from an image
# What the reference reader does with an xattr name (lcfs_build_node_erofs_xattr).
_STORE, _SKIP, _REDIRECT, _METACOPY, _WHITEOUT = range(5)
_SPECIAL_KEYS = {
    E.OVERLAY_REDIRECT: _REDIRECT,          # -> payload of a regular file
    E.OVERLAY_METACOPY: _METACOPY,          # -> digest of a regular file
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
    if not composefs_header and sb.blkszbits != E.BLOCK_BITS:
        raise FormatError(f"unsupported EROFS block size 2^{sb.blkszbits} at offset {E.SUPERBLOCK_OFFSET + 12}")
    # The reference computes both offsets in 32 bits (u32 * 4096) and uses 4 KiB blocks whatever
    # blkszbits says.
    if (sb.meta_blkaddr * _BLOCK) & _M32 >= size or (sb.xattr_blkaddr * _BLOCK) & _M32 >= size:
        raise FormatError(f"superblock points past the end of the image (meta_blkaddr {sb.meta_blkaddr}, "
                          f"xattr_blkaddr {sb.xattr_blkaddr}, {size} bytes)")
    # Building ~10^5 linked objects triggers the cyclic GC over and over for nothing
    # (nothing is garbage yet): pausing it halves the time of a large read.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        root = _Reader(data, sb).tree(sb.root_nid, set(filters) if filters is not None else None)
    finally:
        if gc_was_enabled:
            gc.enable()
    return Image(root=root, version=version, has_acl=bool(flags & E.COMPOSEFS_FLAG_HAS_ACL),
                 flags=flags, superblock=sb)


class _Reader:
    """Decodes inodes on demand; ``tree`` walks the directories depth-first."""

    def __init__(self, data: bytes | mmap.mmap, sb: E.SuperBlock):
        self.data = data
        self.size = len(data)
        self.meta = (sb.meta_blkaddr * _BLOCK) & _M32
        self.xattr_base = (sb.xattr_blkaddr * _BLOCK) & _M32
        self.build_time = sb.build_time
        self.build_time_nsec = sb.build_time_nsec
        self.inline_max = min(E.INLINE_CONTENT_MAX, self.size)
        self.keys: dict[bytes, tuple[int, bytes]] = {}   # xattr name -> _classify(name)

    def _past_end(self, what: str, end: int) -> FormatError:
        return FormatError(f"{what} runs past the end of the image (to offset {end}, {self.size} bytes)")

    # -- tree -----------------------------------------------------------------------------
    def tree(self, root_nid: int, filters: set[bytes] | None) -> Node:
        res = self.inode(root_nid)
        if res is None:
            raise FormatError(f"root inode (nid {root_nid}) is a 0:0 character device (a whiteout)")
        root, entries = res
        if filters is not None:
            if root.content is not None or root.mode & _S_IFMT == _S_IFLNK:
                # lcfs_build_node_from_image asserts that no filter reaches a symlink or a flat
                # file: the reference aborts.
                raise FormatError(f"root inode (nid {root_nid}) is a symlink or an inline file: no entries to filter")
            if entries:
                entries = [e for e in entries if e[0] in filters]
        seen: dict[int, Node] = {root_nid: root}
        stubs: set[int] = set()
        # Explicit stack (no recursion limit): pop order is the reference's depth-first
        # recursion order, which decides who owns a hard-linked inode.
        stack = [(root, name, nid) for name, nid in reversed(entries or ())]
        pop, push = stack.pop, stack.extend
        inode = self.inode
        while stack:
            parent, name, nid = pop()
            node = seen.get(nid)
            if node is None:
                if nid in stubs:
                    # The reference keeps the freed node of the first visit in its table and
                    # links to it: what it prints then is freed memory.
                    raise FormatError(f"0:0 character device inode nid {nid} is reached twice "
                                      f"(again as {_show(parent.path(), name)})")
                res = inode(nid)
                if res is None:         # a 0:0 chardev (the root's whiteout stubs): skipped
                    stubs.add(nid)
                    continue
                node, entries = res
                seen[nid] = node
                if entries:
                    push([(node, cname, cnid) for cname, cnid in reversed(entries)])
            else:
                target, node = node, Node(node.mode)
                node.children = None
                node.link_to = target
            # lcfs_node_add_child's checks
            children = parent.children
            if not name or len(name) > NAME_MAX or name in children:
                what = "duplicate" if name in children else "invalid"
                raise FormatError(f"{what} entry {_show(parent.path(), name)!r}")
            node.name = name
            node.parent = parent
            children[name] = node
        return root

    # -- inodes ---------------------------------------------------------------------------
    def inode(self, nid: int) -> tuple[Node, list[tuple[bytes, int]] | None] | None:
        """Decode inode nid: (node, dirents in on-disk order or None), or None for a 0:0
        character device."""
        data, size = self.data, self.size
        off = self.meta + ((nid << 5) & _M64)
        if off >= size:
            raise FormatError(f"inode nid {nid} at offset {off} lies past the end of the image ({size} bytes)")
        if not data[off] & 1:                   # i_format bit 0: compact (32 B) or extended (64 B)
            if off + _COMPACT_READ > size:
                raise self._past_end(f"inode nid {nid} at offset {off}", off + _COMPACT_READ)
            fmt, icount, mode, nlink, isize, i_u, uid, gid = _COMPACT(data, off)
            sec, nsec = self.build_time, self.build_time_nsec
            p = off + 32
        else:
            if off + _EXTENDED_READ > size:
                raise self._past_end(f"inode nid {nid} at offset {off}", off + _EXTENDED_READ)
            fmt, icount, mode, isize, i_u, uid, gid, sec, nsec, nlink = _EXTENDED(data, off)
            p = off + 64
        ftype = mode & _S_IFMT
        rdev = i_u if ftype == _S_IFCHR or ftype == _S_IFBLK else 0
        if ftype == _S_IFCHR and rdev == 0:
            return None
        xsize = 12 + (icount - 1) * 4 if icount else 0
        tail_off = p + xsize
        node = Node(mode, nlink=nlink, uid=uid, gid=gid, rdev=rdev, mtime_sec=sec, mtime_nsec=nsec, size=isize)
        tailpacked = (fmt >> 1) & 7 == _FLAT_INLINE
        entries = None
        if ftype == _S_IFDIR:
            entries = self._dirents(nid, isize, tailpacked, i_u, tail_off)
        elif ftype == _S_IFLNK:
            self._symlink(node, nid, isize, tailpacked, i_u, tail_off)
        elif ftype == _S_IFREG and isize:
            layout = (fmt >> 1) & 7
            if layout == _FLAT_PLAIN or layout == _FLAT_INLINE:
                node.content = self._flat_file(nid, isize, tailpacked, i_u, tail_off)
            elif layout != _CHUNK_BASED:
                raise FormatError(f"inode nid {nid} at offset {off}: unsupported data layout {layout}")
            # chunk-based: an external file, its data lives in the object store.
        if icount:
            self._xattrs(node, nid, p, xsize)
        return node, entries

    @staticmethod
    def _n_blocks(isize: int) -> int:
        return (((((isize - 1) & _M64) | (_BLOCK - 1)) + 1) & _M64) >> 12      # round_up() in u64

    def _flat_file(self, nid: int, isize: int, tailpacked: bool, blkaddr: int, tail_off: int) -> bytes:
        """The bytes of a flat regular file: whole blocks at blkaddr, then the inline tail."""
        if isize > self.inline_max:
            raise FormatError(f"inode nid {nid}: inline data of {isize} bytes exceeds {self.inline_max}")
        if tailpacked:
            oob = (self._n_blocks(isize) - 1) * _BLOCK
            tail = isize % _BLOCK
            if not tail:
                # The reference copies nothing into the last block's buffer and returns it as is.
                raise FormatError(f"inode nid {nid}: flat inline file of {isize} bytes has no inline tail")
        else:
            oob, tail = isize, 0
        start = (blkaddr * _BLOCK) & _M32
        data = self.data
        if oob and start + oob > self.size:
            raise self._past_end(f"inode nid {nid}: data block {blkaddr}", start + oob)
        if tail and tail_off + tail > self.size:
            raise self._past_end(f"inode nid {nid}: inline data", tail_off + tail)
        if not tail:
            return data[start:start + oob]
        if not oob:
            return data[tail_off:tail_off + tail]
        return data[start:start + oob] + data[tail_off:tail_off + tail]

    def _symlink(self, node: Node, nid: int, isize: int, tailpacked: bool, blkaddr: int, tail_off: int) -> None:
        if isize >= E.PATH_MAX:
            raise FormatError(f"inode nid {nid}: symlink target of {isize} bytes is too long")
        start = tail_off if tailpacked else (blkaddr * _BLOCK) & _M32
        if start + isize > self.size:
            raise self._past_end(f"inode nid {nid}: symlink target", start + isize)
        target = self.data[start:start + isize]
        if b"\0" in target:                 # the reference reads it as a C string
            target = target[:target.index(b"\0")]
        if not target:
            raise FormatError(f"inode nid {nid}: empty symlink target")
        node.payload = target
        node.size = len(target)

    def _dirents(self, nid: int, isize: int, tailpacked: bool, blkaddr: int, tail_off: int) -> list[tuple[bytes, int]]:
        """(name, nid) of every entry but '.' and '..': full blocks first, then the tail."""
        out: list[tuple[bytes, int]] = []
        n_blocks = self._n_blocks(isize)
        n_oob = (n_blocks - 1) & _M64 if tailpacked else n_blocks
        if n_oob:
            start = (blkaddr * _BLOCK) & _M32
            last = start + (n_oob - 1) * _BLOCK
            if last + 10 > self.size:           # every block's first record is read
                raise self._past_end(f"directory inode nid {nid}: blocks {blkaddr}..{blkaddr + n_oob - 1}", last + 10)
            for i in range(n_oob):
                bsize = _BLOCK
                if not tailpacked and i + 1 == n_oob:
                    bsize = isize % _BLOCK or _BLOCK
                self._dirent_block(nid, start + i * _BLOCK, bsize, out)
        if tailpacked:                          # read even when the tail is empty
            self._dirent_block(nid, tail_off, isize % _BLOCK, out)
        return out

    def _dirent_block(self, nid: int, start: int, bsize: int, out: list[tuple[bytes, int]]) -> None:
        """erofs_readdir_block: the record count comes from the first name offset alone, and
        records and names are read wherever they point, inside the block or not."""
        data, size = self.data, self.size
        if start + 10 > size:
            raise self._past_end(f"directory inode nid {nid}: dirent block at offset {start}", start + 10)
        first = _U16(data, start + 8)[0]
        if first % 12:
            raise FormatError(f"directory inode nid {nid}: bad dirent block at offset {start} "
                              f"(first name offset {first})")
        n = first // 12
        if not n:
            return
        if start + 12 * (n - 1) + 10 > size:
            raise self._past_end(f"directory inode nid {nid}: dirents at offset {start}", start + 12 * (n - 1) + 10)
        for i in range(n):
            r = start + 12 * i
            cnid, noff = _DIRENT(data, r)
            s = start + noff
            if i + 1 < n:
                length = (_U16(data, r + 20)[0] - noff) & 0xFFFF
            else:
                # strnlen(name, bsize - nameoff): unbounded when nameoff is past the block.
                limit = bsize - noff if noff <= bsize else size
                if limit:
                    stop = data.find(b"\0", s, min(s + limit, size))
                    if stop >= 0:
                        length = stop - s
                    elif s + limit <= size:
                        length = limit
                    else:
                        raise self._past_end(f"directory inode nid {nid}: last name in the dirent block at offset "
                                             f"{start}", size + 1)
                    length &= 0xFFFF
                else:
                    length = 0
            length = min(length, E.PATH_MAX - 1)
            if s + length > size:
                raise self._past_end(f"directory inode nid {nid}: name at offset {s}", s + length)
            name = data[s:s + length]
            if name == b"." or name == b"..":
                continue
            if b"\0" in name:                   # copied, then used as a C string
                name = name[:name.index(b"\0")]
            out.append((name, cnid))

    # -- xattrs ---------------------------------------------------------------------------
    def _xattrs(self, node: Node, nid: int, xoff: int, xsize: int) -> None:
        """Inline entries first, then shared ones (the reference's order, which is the order
        the dump prints them in); composefs' own overlay xattrs become node fields."""
        data, size = self.data, self.size
        if xoff + 5 > size:
            raise self._past_end(f"inode nid {nid}: xattr header", xoff + 5)
        end = xoff + xsize
        shared = data[xoff + 4]
        space = 0               # lcfs_node_set_xattr_internal's accounting of the node's xattrs
        p = xoff + 12 + 4 * shared
        # The reference loops while a header *and more* fits (strict '<'), so a 4-byte entry
        # (empty suffix and value) in the very last slot is not read; neither is it here.
        while p + 4 < end:
            if p + 4 > size:
                raise self._past_end(f"inode nid {nid}: xattr entry at offset {p}", p + 4)
            nlen, index, vlen = _ENTRY(data, p)
            space = self._xattr(node, nid, p, nlen, index, vlen, space)
            p += (4 + nlen + vlen + 3) & ~3
        for k in range(shared):
            q = xoff + 12 + 4 * k
            if q + 4 > size:
                raise self._past_end(f"inode nid {nid}: shared xattr id {k}", q + 4)
            e = self.xattr_base + ((_U32(data, q)[0] * 4) & _M32)
            if e + 4 > size:
                raise self._past_end(f"inode nid {nid}: shared xattr at offset {e}", e + 4)
            nlen, index, vlen = _ENTRY(data, e)
            space = self._xattr(node, nid, e, nlen, index, vlen, space)

    def _xattr(self, node: Node, nid: int, e: int, nlen: int, index: int, vlen: int, space: int) -> int:
        """Apply one xattr entry at offset e; returns the node's xattr space after it."""
        data, size = self.data, self.size
        if index >= _N_PREFIXES:
            raise FormatError(f"inode nid {nid}: unknown xattr name index {index} at offset {e}")
        q = e + 4 + nlen
        if q > size:
            raise self._past_end(f"inode nid {nid}: xattr name at offset {e + 4}", q)
        raw = data[e + 4:q]
        key = _PREFIXES[index] + raw
        if b"\0" in key:                       # the name is used as a C string
            key = key[:key.index(b"\0")]
        action = self.keys.get(key)
        if action is None:
            action = self.keys[key] = _classify(key)
        kind, key = action
        ftype = node.mode & _S_IFMT
        if kind == _STORE:
            return self._store_xattr(node, nid, e, key, q, vlen, space)
        if kind == _SKIP:
            return space
        if kind == _WHITEOUT:
            if ftype == _S_IFREG:
                node.mode = (node.mode & ~_S_IFMT) | _S_IFCHR
                node.rdev = 0
                node.size = 0
                return space
            return self._store_xattr(node, nid, e, _TRUSTED_PREFIX + key[_OVERLAY_PREFIX_LEN:], q, vlen, space)
        if ftype != _S_IFREG:
            return space
        if kind == _REDIRECT:
            # The reference skips a leading '/' by moving the start *and growing* the length by
            # one, then strndup()s: so two bytes past the value are read, up to the first NUL.
            start, n = q, vlen
            if vlen > 1:
                if q + 1 > size:
                    raise self._past_end(f"inode nid {nid}: xattr value at offset {q}", q + 1)
                if data[q] == 0x2F:
                    start, n = q + 1, vlen + 1
            stop = data.find(b"\0", start, min(start + n, size))
            if stop < 0:
                stop = start + n
                if stop > size:
                    raise self._past_end(f"inode nid {nid}: redirect value at offset {start}", stop)
            node.payload = data[start:stop]
        elif vlen == E.METACOPY_SIZE:           # _METACOPY
            if q + vlen > size:
                raise self._past_end(f"inode nid {nid}: metacopy value at offset {q}", q + vlen)
            node.digest = data[q + 4:q + vlen]
        return space

    def _store_xattr(self, node: Node, nid: int, e: int, key: bytes, q: int, vlen: int, space: int) -> int:
        """lcfs_node_set_xattr_internal: replace a previous value (the last entry takes the
        removed one's place), within 65535 bytes of xattr space per inode."""
        if not key or len(key) > _XATTR_NAME_MAX:
            raise FormatError(f"inode nid {nid}: xattr name of {len(key)} bytes at offset {e}")
        xattrs = node.xattrs
        old = xattrs.get(key)
        if old is not None:
            items = list(xattrs.items())
            i = list(xattrs).index(key)
            items[i] = items[-1]
            items.pop()
            xattrs.clear()
            xattrs.update(items)
            space = space - 7 - len(key) - len(old) if xattrs else 0
        space += 7 + len(key) + vlen + (0 if xattrs else 12)
        if space > _XATTR_SPACE_MAX:
            raise FormatError(f"inode nid {nid}: xattrs take more than {_XATTR_SPACE_MAX} bytes (at offset {e})")
        if q + vlen > self.size:
            raise self._past_end(f"inode nid {nid}: xattr value at offset {q}", q + vlen)
        xattrs[key] = self.data[q:q + vlen]
        return space


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
