"""The composefs image writer: a tree in, the exact bytes mkcomposefs 1.0.8 writes out.

The image is an EROFS filesystem holding only metadata; regular files larger than the
inline limit are "external": their inode carries overlayfs ``metacopy`` (with the fs-verity
digest) and ``redirect`` (to the object in the store) xattrs, and overlayfs serves the data
from the object store, refusing any object whose digest differs when ``verity=require``.

The steps follow libcomposefs so the bytes match: choose the format version, rewrite the
tree for overlayfs (escape ``trusted.overlay.*``, synthesize metacopy/redirect, convert
whiteouts, add the 256 root whiteout stubs), number inodes breadth first, pick shared
xattrs, place inodes with the reference padding rules, then serialize.
"""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass

import xxhash

from ..errors import FormatError
from . import erofs as E
from .tree import MAX_CHUNKS, XATTR_BUDGET, XATTR_NAME_MAX, Node

VERSION_MAX = 1

_HALF_BLOCK = E.BLOCK // 2


@dataclass(frozen=True)
class ImageOptions:
    min_version: int = 0
    max_version: int = 1


class _Inode:
    """One serialized inode and everything the layout needs to know about it."""

    __slots__ = (
        "node", "path", "parent", "mode", "nlink", "uid", "gid", "rdev", "mtime_sec", "mtime_nsec",
        "size", "xattrs", "entries", "ino", "nid", "isz", "xsz", "n_blocks", "tail", "blkaddr",
        "layout", "chunk_format", "dir_size", "chunk_table_in_block",
    )

    def __init__(self, node: Node | None, parent: "_Inode | None"):
        self.node = node
        self.parent = parent
        self.entries: list[tuple[bytes, _Inode | Node]] | None = None
        self.blkaddr = 0
        self.chunk_format = 0
        self.chunk_table_in_block = False


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _shown(path: bytes) -> str:
    return path.decode("utf-8", "backslashreplace")


def choose_version(root: Node, options: ImageOptions) -> int:
    """mkcomposefs picks min_version, bumped to 1 if the tree has a whiteout and max allows."""
    if not 0 <= options.min_version <= options.max_version <= VERSION_MAX:
        raise FormatError(
            f"invalid format version range {options.min_version}..{options.max_version} (supported 0..{VERSION_MAX})")
    version = options.min_version
    if version < 1 <= options.max_version:
        if any(n.link_to is None and n.is_whiteout() for n in root.walk()):
            version = 1
    return version


class _Builder:
    def __init__(self, root: Node, version: int):
        self.root = root
        self.version = version

    # -- step 1: rewrite the tree into inodes with their final mode and xattrs ---------------
    def rewrite(self) -> _Inode:
        root_inode = self._make_inode(self.root, None, b"/")
        stack = [root_inode]
        while stack:
            dir_inode = stack.pop()
            entries: list[tuple[bytes, _Inode | Node]] = []
            for name, child in dir_inode.node.children.items():
                if child.link_to is not None:
                    entries.append((name, child.link_to))    # resolved to an inode later
                    continue
                path = dir_inode.path + name if dir_inode.path == b"/" else dir_inode.path + b"/" + name
                ci = self._make_inode(child, dir_inode, path)
                entries.append((name, ci))
                if ci.entries is not None:
                    stack.append(ci)
            dir_inode.entries = entries
        # Root: opaque, after escaping (so it stays a real overlay xattr).
        root_inode.xattrs[E.OVERLAY_OPAQUE] = b"y"
        self._add_whiteout_stubs(root_inode)
        return root_inode

    def _make_inode(self, node: Node, parent: _Inode | None, path: bytes) -> _Inode:
        node.validate_mode() if stat.S_IFMT(node.mode) else self._bad_mode(node, path)
        ino = _Inode(node, parent)
        ino.path = path
        ino.mode = node.mode
        ino.nlink = node.nlink
        ino.uid = node.uid
        ino.gid = node.gid
        ino.rdev = node.rdev
        ino.mtime_sec = node.mtime_sec
        ino.mtime_nsec = node.mtime_nsec
        xattrs = {E.escape_overlay_xattr(k): v for k, v in node.xattrs.items()}
        ftype = stat.S_IFMT(node.mode)
        if ftype == stat.S_IFDIR:
            ino.size = 0
            ino.entries = []
        elif ftype == stat.S_IFREG:
            ino.size = node.size
            if node.content is None and node.size > 0:
                if _chunk_count(node.size) > MAX_CHUNKS:
                    raise FormatError(f"{_shown(path)}: file too large ({node.size} bytes)")
                if node.digest is not None:
                    xattrs[E.OVERLAY_METACOPY] = E.METACOPY_HEADER + node.digest
                else:
                    xattrs[E.OVERLAY_METACOPY] = b""
                if node.payload:
                    xattrs[E.OVERLAY_REDIRECT] = b"/" + node.payload
        elif ftype == stat.S_IFLNK:
            ino.size = len(node.payload or b"")
        elif ftype == stat.S_IFCHR and node.rdev == 0:
            # A whiteout becomes an empty regular file marked for overlayfs, so the image can
            # itself be a lower layer; the parent is marked as holding whiteouts.
            ino.mode = stat.S_IFREG | stat.S_IMODE(node.mode)
            ino.size = 0
            ino.rdev = 0
            xattrs[E.OVERLAY_ESCAPED_WHITEOUT] = b""
            xattrs[E.OVERLAY_USER_WHITEOUT] = b""
            if parent is not None:
                parent.xattrs[E.OVERLAY_ESCAPED_WHITEOUTS] = b""
                parent.xattrs[E.OVERLAY_USER_WHITEOUTS] = b""
                if self.version >= 1:
                    parent.xattrs[E.OVERLAY_ESCAPED_OPAQUE] = b"x"
                    parent.xattrs[E.OVERLAY_USER_OPAQUE] = b"x"
        else:
            ino.size = node.size
        ino.xattrs = xattrs
        return ino

    @staticmethod
    def _bad_mode(node: Node, path: bytes) -> None:
        raise FormatError(f"{_shown(path)}: invalid mode {node.mode:o}")

    def _add_whiteout_stubs(self, root: _Inode) -> None:
        """256 chardev 0:0 entries 00..ff hide the store's xx/ directories when the store is
        an ordinary lower layer (kernels without data-only layers)."""
        present = {name for name, _ in root.entries}
        selinux = root.node.xattrs.get(b"security.selinux")
        for i in range(256):
            name = b"%02x" % i
            if name in present:
                continue
            stub = _Inode(None, root)
            stub.path = b"/" + name
            stub.mode = stat.S_IFCHR | 0o644
            stub.nlink = 1
            stub.uid, stub.gid = root.uid, root.gid
            stub.rdev = 0
            stub.mtime_sec, stub.mtime_nsec = root.mtime_sec, root.mtime_nsec
            stub.size = 0
            stub.xattrs = {b"security.selinux": selinux} if selinux is not None else {}
            root.entries.append((name, stub))

    # -- step 2: number inodes breadth first and resolve directory entries -------------------
    def number(self, root: _Inode) -> list[_Inode]:
        order = [root]
        by_node: dict[int, _Inode] = {}
        i = 0
        while i < len(order):
            ino = order[i]
            i += 1
            if ino.node is not None:
                by_node[id(ino.node)] = ino
            if ino.entries is not None:
                ino.entries.sort(key=lambda e: e[0])
                for _, child in ino.entries:
                    if isinstance(child, _Inode):
                        order.append(child)
        for idx, ino in enumerate(order):
            ino.ino = idx
            if ino.entries is not None:
                resolved = []
                n_dirs = 0
                for name, child in ino.entries:
                    if isinstance(child, Node):
                        child = by_node[id(child)]
                    elif stat.S_ISDIR(child.mode):
                        n_dirs += 1
                    resolved.append((name, child))
                resolved.append((b".", ino))
                resolved.append((b"..", ino.parent if ino.parent is not None else ino))
                resolved.sort(key=lambda e: e[0])
                ino.entries = resolved
                ino.nlink = 2 + n_dirs
        return order


def _chunk_bits(size: int) -> int:
    return min(max(E.BLOCK_BITS, (size - 1).bit_length()), E.BLOCK_BITS + 31)


def _chunk_count(size: int) -> int:
    bits = _chunk_bits(size)
    return (size + (1 << bits) - 1) >> bits


def _dir_chunks(entries: list[tuple[bytes, _Inode]]) -> list[list[tuple[bytes, _Inode]]]:
    """Greedy packing of dirents (12 bytes + name each) into 4 KiB blocks."""
    chunks: list[list[tuple[bytes, _Inode]]] = [[]]
    used = 0
    for entry in entries:
        size = E.DIRENT_SIZE + len(entry[0])
        if used + size > E.BLOCK:
            chunks.append([])
            used = 0
        chunks[-1].append(entry)
        used += size
    return chunks


def write_image(root: Node, options: ImageOptions = ImageOptions()) -> bytes:
    """Serialize ``root`` into a composefs image (bytes identical to mkcomposefs 1.0.8)."""
    version = choose_version(root, options)
    builder = _Builder(root, version)
    root_inode = builder.rewrite()
    order = builder.number(root_inode)

    # -- per-inode attributes: xattr budget, min mtime, ACL flag --------------------------
    min_mtime = min((ino.mtime_sec, ino.mtime_nsec) for ino in order)
    has_acl = False
    pair_count: dict[tuple[bytes, bytes], int] = {}
    for ino in order:
        xattrs = ino.xattrs
        if xattrs:
            budget = 12
            for k, v in xattrs.items():
                if len(k) > XATTR_NAME_MAX:
                    raise FormatError(f"{_shown(ino.path)}: xattr name {k!r} longer than {XATTR_NAME_MAX} bytes")
                budget += 7 + len(k) + len(v)
                pair = (k, v)
                pair_count[pair] = pair_count.get(pair, 0) + 1
            if budget > XATTR_BUDGET:
                raise FormatError(f"{_shown(ino.path)}: too many xattrs ({budget} bytes, max {XATTR_BUDGET})")
            if E.ACL_XATTRS[0] in xattrs or E.ACL_XATTRS[1] in xattrs:
                has_acl = True
            ino.xattrs = sorted(xattrs.items())
        else:
            ino.xattrs = []

    # -- shared xattr table: pairs used more than once, sorted descending ------------------
    shared_pairs = [p for p, n in pair_count.items() if n > 1]
    shared_pairs.sort(key=lambda p: (p[0], len(p[1]), p[1]), reverse=True)
    shared_offset: dict[tuple[bytes, bytes], int] = {}
    table = bytearray()
    for key, value in shared_pairs:
        shared_offset[(key, value)] = len(table)
        index, suffix = E.xattr_prefix(key)
        table += E.XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
        table += bytes(-len(table) % 4)

    # -- sizes and inode placement ---------------------------------------------------------
    ibodies: list[tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]] = []
    pos = E.INODE_AREA_START
    for ino in order:
        shared_refs: list[tuple[bytes, bytes]] = []
        inline: list[tuple[bytes, bytes]] = []
        xsz = 0
        if ino.xattrs:
            body = E.XATTR_IBODY_HEADER_SIZE
            for pair in ino.xattrs:
                if pair in shared_offset and len(shared_refs) < E.XATTR_LONG_PREFIX:
                    shared_refs.append(pair)
                    body += 4
                else:
                    inline.append(pair)
                    body += _round_up(E.XATTR_ENTRY.size + len(E.xattr_prefix(pair[0])[1]) + len(pair[1]), 4)
            xsz = _round_up(body, 4)
        ibodies.append((shared_refs, inline))
        ino.xsz = xsz

        ftype = stat.S_IFMT(ino.mode)
        n_blocks = tail = 0
        layout = E.LAYOUT_FLAT_PLAIN
        if ftype == stat.S_IFDIR:
            chunks = _dir_chunks(ino.entries)
            n_blocks = len(chunks) - 1
            tail = sum(E.DIRENT_SIZE + len(name) for name, _ in chunks[-1])
            if tail > _HALF_BLOCK:
                n_blocks += 1
                tail = 0
            ino.dir_size = n_blocks * E.BLOCK + tail
            size_for_compact = ino.dir_size
        elif ftype == stat.S_IFLNK:
            tail = ino.size
            size_for_compact = ino.size
        elif ftype == stat.S_IFREG and ino.size > 0:
            node = ino.node
            if node.content is not None:
                n_blocks, tail = divmod(ino.size, E.BLOCK)
                if tail > _HALF_BLOCK:
                    n_blocks += 1
                    tail = 0
            else:
                layout = E.LAYOUT_CHUNK_BASED
                ino.chunk_format = _chunk_bits(ino.size) - E.BLOCK_BITS
                tail = 4 * _chunk_count(ino.size)
            size_for_compact = ino.size
        else:
            size_for_compact = ino.size

        compact = ((ino.mtime_sec, ino.mtime_nsec) == min_mtime and ino.nlink <= 0xFFFF
                   and ino.uid <= 0xFFFF and ino.gid <= 0xFFFF and size_for_compact <= 0xFFFFFFFF)
        isz = E.INODE_COMPACT_SIZE if compact else E.INODE_EXTENDED_SIZE
        ino.isz = isz

        pos = _round_up(pos, E.SLOT)
        if ftype == stat.S_IFLNK:
            total = isz + xsz + tail
            if total >= E.BLOCK:
                n_blocks += 1
                tail = 0
            extra = _round_up(pos, E.BLOCK) - pos if pos // E.BLOCK != (pos + total - 1) // E.BLOCK else 0
        else:
            rem = E.BLOCK - (pos + isz + xsz) % E.BLOCK
            extra = 0
            if rem < tail:
                extra = _round_up(rem, E.SLOT)
                rem2 = E.BLOCK - (pos + isz + xsz + extra) % E.BLOCK
                if tail > rem2:
                    n_blocks += 1
                    tail = 0
                    extra = _round_up(pos, E.BLOCK) - pos
                    if layout == E.LAYOUT_CHUNK_BASED:
                        ino.chunk_table_in_block = True
        pos += extra
        ino.nid = pos // E.SLOT
        pos += isz + xsz + tail
        if layout != E.LAYOUT_CHUNK_BASED:
            layout = E.LAYOUT_FLAT_INLINE if tail else E.LAYOUT_FLAT_PLAIN
        ino.layout = layout
        ino.n_blocks = n_blocks
        ino.tail = tail

    inodes_end = _round_up(pos, E.SLOT)
    data_start = _round_up(inodes_end + len(table), E.BLOCK)
    next_block = data_start // E.BLOCK
    for ino in order:
        if ino.n_blocks:
            ino.blkaddr = next_block
            next_block += ino.n_blocks
    total_blocks = next_block
    shared_base = inodes_end % E.BLOCK

    # -- serialize -------------------------------------------------------------------------
    out = bytearray(total_blocks * E.BLOCK)
    E.COMPOSEFS_HEADER.pack_into(out, 0, E.COMPOSEFS_MAGIC, E.COMPOSEFS_HEADER_VERSION,
                                 E.COMPOSEFS_FLAG_HAS_ACL if has_acl else 0, version)
    E.SUPERBLOCK.pack_into(out, E.SUPERBLOCK_OFFSET, *E.SuperBlock(
        magic=E.EROFS_MAGIC, checksum=0,
        feature_compat=E.FEATURE_COMPAT_MTIME | E.FEATURE_COMPAT_XATTR_FILTER,
        blkszbits=E.BLOCK_BITS, sb_extslots=0, root_nid=root_inode.nid, inos=len(order),
        build_time=min_mtime[0], build_time_nsec=min_mtime[1], blocks=total_blocks,
        meta_blkaddr=0, xattr_blkaddr=inodes_end // E.BLOCK))
    out[inodes_end:inodes_end + len(table)] = table

    seeds = E.XATTR_FILTER_SEED
    for ino, (shared_refs, inline) in zip(order, ibodies):
        off = ino.nid * E.SLOT
        ftype = stat.S_IFMT(ino.mode)
        if ftype == stat.S_IFDIR:
            i_size = ino.dir_size
        elif ftype == stat.S_IFREG or ftype == stat.S_IFLNK:
            i_size = ino.size
        else:
            i_size = 0
        if ftype == stat.S_IFCHR or ftype == stat.S_IFBLK:
            i_u = ino.rdev
        elif ino.layout == E.LAYOUT_CHUNK_BASED:
            i_u = ino.chunk_format
            if ino.chunk_table_in_block:
                i_u |= ino.blkaddr & 0xFFFF0000      # the reference's union overwrite
        else:
            i_u = ino.blkaddr if ino.n_blocks else 0
        icount = (ino.xsz - E.XATTR_IBODY_HEADER_SIZE) // 4 + 1 if ino.xsz else 0
        if ino.isz == E.INODE_COMPACT_SIZE:
            E.INODE_COMPACT.pack_into(out, off, (ino.layout << 1), icount, ino.mode & 0xFFFF, ino.nlink,
                                      i_size, 0, i_u, ino.ino, ino.uid, ino.gid, 0)
        else:
            E.INODE_EXTENDED.pack_into(out, off, (ino.layout << 1) | 1, icount, ino.mode & 0xFFFF, 0,
                                       i_size, i_u, ino.ino, ino.uid, ino.gid,
                                       ino.mtime_sec, ino.mtime_nsec, ino.nlink)
        off += ino.isz
        if ino.xsz:
            bloom = 0
            for key, _ in ino.xattrs:
                index, suffix = E.xattr_prefix(key)
                bloom |= 1 << (xxhash.xxh32_intdigest(suffix, seeds + index) & 31)
            E.XATTR_IBODY_HEADER.pack_into(out, off, 0xFFFFFFFF & ~bloom, len(shared_refs))
            p = off + E.XATTR_IBODY_HEADER_SIZE
            for pair in shared_refs:
                struct.pack_into("<I", out, p, (shared_base + shared_offset[pair]) // 4)
                p += 4
            for key, value in inline:
                index, suffix = E.xattr_prefix(key)
                entry = E.XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
                out[p:p + len(entry)] = entry
                p += _round_up(len(entry), 4)
            off += ino.xsz
        # Tail (inline data) right after the xattrs, blocks in the data area.
        blk = ino.blkaddr * E.BLOCK
        if ftype == stat.S_IFDIR:
            chunks = _dir_chunks(ino.entries)
            for n, chunk in enumerate(chunks):
                data = _dirent_block(chunk)
                if n < ino.n_blocks:
                    out[blk + n * E.BLOCK: blk + n * E.BLOCK + len(data)] = data
                else:
                    out[off:off + len(data)] = data
        elif ftype == stat.S_IFLNK:
            target = ino.node.payload
            if ino.n_blocks:
                out[blk:blk + len(target)] = target
            else:
                out[off:off + len(target)] = target
        elif ino.layout == E.LAYOUT_CHUNK_BASED:
            if ino.chunk_table_in_block:
                # The reference fills the whole block it spilled the table into.
                out[blk:blk + E.BLOCK] = b"\xff" * E.BLOCK
            else:
                out[off:off + ino.tail] = b"\xff" * ino.tail
        elif ftype == stat.S_IFREG and ino.size:
            content = ino.node.content
            head = ino.n_blocks * E.BLOCK
            if ino.n_blocks:
                first = content[:E.BLOCK]
                out[blk:blk + len(first)] = first
            if ino.tail:
                out[off:off + ino.tail] = content[head:]
    return bytes(out)


def _dirent_block(chunk: list[tuple[bytes, _Inode]]) -> bytes:
    header = bytearray()
    names = bytearray()
    nameoff = E.DIRENT_SIZE * len(chunk)
    for name, target in chunk:
        header += E.DIRENT.pack(target.nid, nameoff + len(names), E.file_type(target.mode), 0)
        names += name
    return bytes(header + names)
