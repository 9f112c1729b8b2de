"""The composefs image writer: a tree in, the exact bytes mkcomposefs 1.0.8 writes out.

The image is an EROFS filesystem holding only metadata; regular files larger than the
inline limit are "external": their inode carries overlayfs ``metacopy`` (with the fs-verity
digest) and ``redirect`` (to the object in the store) xattrs, and overlayfs serves the data
from the object store, refusing any object whose digest differs when ``verity=require``.

The steps follow libcomposefs so the bytes match (composefs-format.md sections 3.1-3.12):
choose the format version, rewrite the tree for overlayfs (escape ``trusted.overlay.*``,
synthesize metacopy/redirect, convert whiteouts, add the 256 root whiteout stubs), number
inodes breadth first, pick shared xattrs, place inodes with the reference padding rules,
then serialize into one preallocated buffer. This is a hot path (140k inodes for a /usr):
per-inode work is kept to plain attribute access, cached xattr encodings and struct packing,
and the last steps (xattr preparation, placement, packing: ~1.5 s of Python on /usr) run in
the C module ``_imagepack`` when it is built; the Python versions stay as the fallback and
the reference the tests hold the C code to (tests/test_writer_paths.py).
"""

from __future__ import annotations

import stat
import struct
from collections import Counter
from dataclasses import dataclass
from operator import itemgetter

import xxhash

from .._perf import gc_paused
from ..errors import FormatError
from . import erofs as E
from .tree import MAX_CHUNKS, XATTR_BUDGET, Node, chunk_bits, chunk_count

try:
    from . import _imagepack
except ImportError:  # not built: _layout and _pack in Python (same bytes, ~1 s slower on /usr)
    _imagepack = None
else:
    assert (_imagepack.BLOCK, _imagepack.COMPACT_SIZE, _imagepack.EXTENDED_SIZE, _imagepack.LAYOUT_CHUNK_BASED,
            _imagepack.LAYOUT_FLAT_INLINE) == (E.BLOCK, E.INODE_COMPACT_SIZE, E.INODE_EXTENDED_SIZE,
                                               E.LAYOUT_CHUNK_BASED, E.LAYOUT_FLAT_INLINE)

VERSION_MAX = 1

_BLOCK = E.BLOCK
_HALF_BLOCK = E.BLOCK // 2
_SLOT = E.SLOT
_DIRENT_SIZE = E.DIRENT_SIZE
_S_IFMT = 0o170000
_S_IFDIR, _S_IFREG, _S_IFLNK = stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK
_S_IFCHR, _S_IFBLK = stat.S_IFCHR, stat.S_IFBLK
_VALID_TYPES = frozenset((stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFBLK, stat.S_IFCHR,
                          stat.S_IFSOCK, stat.S_IFIFO))
_first = itemgetter(0)
_FF = memoryview(b"\xff" * (4 * MAX_CHUNKS))
_M64 = (1 << 64) - 1
# The per-inode limits are enforced as xattrs are added (Node.set_xattr, _charge), as the
# reference does; the final check only keeps a tree built by hand from overflowing the format.
XATTR_SPACE_MAX = 0xFFFF   # "no chunk" indexes: an inline chunk table


@dataclass(frozen=True)
class ImageOptions:
    min_version: int = 0
    max_version: int = 1


class _Inode:
    """One serialized inode and what the layout computes for it."""

    __slots__ = (
        "node", "name", "parent", "mode", "nlink", "uid", "gid", "rdev", "mtime_sec", "mtime_nsec",
        "size", "xattrs", "entries", "ino", "nid", "isz", "shared_ids", "inline_xattrs", "xsz", "xfilter",
        "chunk_bits", "space",
        "n_blocks", "tail", "blkaddr", "layout", "i_size", "chunks", "spilled_chunk_table",
    )

    def __init__(self, node: Node | None, name: bytes, parent: "_Inode | None"):
        self.node = node
        self.name = name
        self.parent = parent
        self.entries: list | None = None
        self.blkaddr = 0
        self.spilled_chunk_table = False
        self.space = None
        if node is not None:
            self.mode = node.mode
            self.nlink = node.nlink
            self.uid = node.uid
            self.gid = node.gid
            self.rdev = node.rdev
            self.mtime_sec = node.mtime_sec
            self.mtime_nsec = node.mtime_nsec

    def path(self) -> str:
        parts = []
        ino: _Inode | None = self
        while ino is not None and ino.parent is not None:
            parts.append(ino.name)
            ino = ino.parent
        return "/" + b"/".join(reversed(parts)).decode("utf-8", "backslashreplace")


def _check_versions(options: ImageOptions) -> None:
    if not 0 <= options.min_version <= options.max_version <= VERSION_MAX:
        raise FormatError(
            f"invalid format version range {options.min_version}..{options.max_version} (supported 0..{VERSION_MAX})")


# -- step 1: rewrite the tree into inodes with their final mode and xattrs ---------------------

def _rewrite(root: Node, options: ImageOptions, external: list[_Inode]) -> tuple[_Inode, int]:
    """Make an _Inode for every non-hardlink node, with the overlay xattrs the reference adds
    (except the digest-dependent ones of external files, collected in ``external``).

    Also picks the format version as mkcomposefs does: min_version, bumped to 1 if the tree
    has a whiteout and max_version allows (found here, so the tree is walked once)."""
    whiteout_parents: list[_Inode | None] = []
    root_inode = _make_inode(root, b"", None, whiteout_parents, external)
    stack = [root_inode]
    while stack:
        dir_inode = stack.pop()
        entries = []
        for name, child in dir_inode.node.children.items():
            if child.link_to is not None:
                entries.append((name, child.link_to))     # resolved to an inode in _number
                continue
            ci = _make_inode(child, name, dir_inode, whiteout_parents, external)
            entries.append((name, ci))
            if ci.entries is not None:
                stack.append(ci)
        dir_inode.entries = entries
    version = options.min_version
    if whiteout_parents and version < 1 <= options.max_version:
        version = 1
    if version >= 1:
        for parent in whiteout_parents:
            if parent is not None:
                _charge(parent, E.OVERLAY_ESCAPED_OPAQUE, b"x")
                _charge(parent, E.OVERLAY_USER_OPAQUE, b"x")
    # Root: opaque, set after escaping (so it stays a real overlay xattr).
    _charge(root_inode, E.OVERLAY_OPAQUE, b"y")
    _add_whiteout_stubs(root_inode)
    return root_inode, version


def _make_inode(node: Node, name: bytes, parent: _Inode | None, whiteout_parents: list[_Inode | None],
                external: list[_Inode]) -> _Inode:
    ino = _Inode(node, name, parent)
    ftype = node.mode & _S_IFMT
    if ftype not in _VALID_TYPES:
        raise FormatError(f"{ino.path()}: invalid mode {node.mode:o}")
    xattrs = node.xattrs
    if xattrs:
        # trusted.overlay.X -> trusted.overlay.overlay.X: one more "overlay." on every such key,
        # so escaped keys never collide. The entry stores the name after "trusted.", so an
        # escaped name of up to 263 bytes still fits its u8 length.
        prefix = E.OVERLAY_PREFIX
        if any(k.startswith(prefix) for k in xattrs):
            xattrs = {E.escape_overlay_xattr(k) if k.startswith(prefix) else k: v for k, v in xattrs.items()}
        else:
            xattrs = dict(xattrs)
    else:
        xattrs = {}
    ino.size = node.size
    if ftype == _S_IFREG:
        if node.content is None and node.size > 0:
            ino.chunk_bits = chunk_bits(node.size)
            if chunk_count(node.size) > MAX_CHUNKS:
                raise FormatError(f"{ino.path()}: file too large ({node.size} bytes)")
            external.append(ino)
    elif ftype == _S_IFDIR:
        ino.size = 0
        ino.entries = []
    elif ftype == _S_IFLNK:
        ino.size = len(node.payload or b"")
    elif ftype == _S_IFCHR and node.rdev == 0:
        # A whiteout becomes an empty regular file marked for overlayfs, so the image can
        # itself be a lower layer; the parent is marked as holding whiteouts.
        ino.mode = _S_IFREG | (node.mode & ~_S_IFMT)
        ino.size = 0
        ino.xattrs = xattrs
        _charge(ino, E.OVERLAY_ESCAPED_WHITEOUT, b"")
        _charge(ino, E.OVERLAY_USER_WHITEOUT, b"")
        if parent is not None:
            _charge(parent, E.OVERLAY_ESCAPED_WHITEOUTS, b"")
            _charge(parent, E.OVERLAY_USER_WHITEOUTS, b"")
        whiteout_parents.append(parent)     # opaque "x" too, if the version is >= 1
    ino.xattrs = xattrs
    return ino


def _charge(ino: _Inode, key: bytes, value: bytes) -> None:
    """Add an xattr the writer synthesizes, with lcfs_node_set_xattr's space check as the
    reference's writer meets it: it works on a clone of the tree whose space count starts at 0
    whatever xattrs the node has, a replaced key is subtracted in size_t arithmetic (so it can
    wrap around), and the 12-byte header counts only on a node without xattrs."""
    xattrs = ino.xattrs
    space = ino.space or 0
    n = len(xattrs)
    old = xattrs.get(key)
    if old is not None:
        n -= 1
        space = (space - 7 - len(key) - len(old)) & _M64 if n else 0
    space = (space + 7 + len(key) + len(value) + (0 if n else 12)) & _M64
    if space > XATTR_BUDGET:
        raise FormatError(f"{ino.path()}: too many xattrs (no room for {key.decode('latin-1')})")
    ino.space = space
    xattrs[key] = value


def _add_whiteout_stubs(root: _Inode) -> None:
    """256 chardev 0:0 entries 00..ff hide the store's xx/ directories when the store is an
    ordinary lower layer (kernels without data-only layers)."""
    present = {name for name, _ in root.entries}
    selinux = root.node.xattrs.get(b"security.selinux")
    for i in range(256):
        name = b"%02x" % i
        if name in present:
            continue
        stub = _Inode(None, name, root)
        stub.mode = _S_IFCHR | 0o644
        stub.nlink = 1
        stub.uid, stub.gid = root.uid, root.gid
        stub.rdev = 0
        stub.mtime_sec, stub.mtime_nsec = root.mtime_sec, root.mtime_nsec
        stub.size = 0
        stub.xattrs = {b"security.selinux": selinux} if selinux is not None else {}
        root.entries.append((name, stub))


# -- step 2: number inodes breadth first and resolve directory entries ---------------------

def _number(root: _Inode) -> list[_Inode]:
    order = [root]
    append = order.append
    i = 0
    while i < len(order):
        ino = order[i]
        i += 1
        entries = ino.entries
        if entries is not None:
            entries.sort(key=_first)
            for _, child in entries:
                if child.__class__ is _Inode:
                    append(child)
    by_node = {id(ino.node): ino for ino in order if ino.node is not None}
    for idx, ino in enumerate(order):
        ino.ino = idx
        entries = ino.entries
        if entries is not None:
            n_dirs = 0
            for j, (name, child) in enumerate(entries):
                if child.__class__ is not _Inode:
                    entries[j] = (name, by_node[id(child)])
                elif child.mode & _S_IFMT == _S_IFDIR:
                    n_dirs += 1
            entries.append((b".", ino))
            entries.append((b"..", ino.parent if ino.parent is not None else ino))
            entries.sort(key=_first)
            ino.nlink = 2 + n_dirs
    return order


# -- step 3: xattrs: budget, sharing, encoding --------------------------------------------------

class _XattrCodec:
    """Caches the per-key work (prefix split, entry headers, bloom bits): a tree has few
    distinct keys and value lengths, so an entry is one dict lookup and two concatenations."""

    def __init__(self) -> None:
        self._split: dict[bytes, tuple[int, bytes]] = {}
        self._heads: dict[tuple[bytes, int], tuple[bytes, bytes]] = {}
        self._bloom: dict[tuple[bytes, ...], int] = {}

    def split(self, key: bytes) -> tuple[int, bytes]:
        r = self._split.get(key)
        if r is None:
            r = self._split[key] = E.xattr_prefix(key)
        return r

    def entry(self, key: bytes, value: bytes) -> bytes:
        head = self._heads.get((key, len(value)))
        if head is None:
            index, suffix = self.split(key)
            size = E.XATTR_ENTRY_SIZE + len(suffix) + len(value)
            head = self._heads[(key, len(value))] = (
                E.XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix, b"\0" * (-size % 4))
        return head[0] + value + head[1]

    def key_info(self, key: bytes) -> tuple[int, bytes, int]:
        """(name index, suffix, bloom filter bit) of a key: what _imagepack needs per key."""
        index, suffix = self.split(key)
        return index, suffix, 1 << (xxhash.xxh32_intdigest(suffix, E.XATTR_FILTER_SEED + index) & 31)

    def name_filter(self, keys: tuple[bytes, ...]) -> int:
        r = self._bloom.get(keys)
        if r is None:
            bits = 0
            for key in keys:
                index, suffix = self.split(key)
                bits |= 1 << (xxhash.xxh32_intdigest(suffix, E.XATTR_FILTER_SEED + index) & 31)
            r = self._bloom[keys] = 0xFFFFFFFF & ~bits
        return r


def _prepare_xattrs(order: list[_Inode], codec: _XattrCodec) -> tuple[bytes, bool]:
    """Sort each inode's xattrs, check the budget, build the shared table (pairs used more
    than once, in the reference's descending order) and each inode's xattr body parts.

    Sets on each inode with xattrs: ``xsz`` (body size), ``shared_ids`` (table offsets),
    ``inline_xattrs`` (encoded entries) and ``xfilter`` (the name filter of its keys)."""
    has_acl = False
    acl_access, acl_default = E.ACL_XATTRS
    with_xattrs = []
    all_pairs: list[tuple[bytes, bytes]] = []
    for ino in order:
        xattrs = ino.xattrs
        if not xattrs:
            ino.xsz = 0
            continue
        if acl_access in xattrs or acl_default in xattrs:
            has_acl = True
        if len(xattrs) > 1:
            items = sorted(xattrs.items())
        else:
            items = list(xattrs.items())
        budget = 12 + 7 * len(items) + sum(map(len, xattrs)) + sum(map(len, xattrs.values()))
        if budget > XATTR_SPACE_MAX:
            raise FormatError(f"{ino.path()}: too many xattrs ({budget} bytes, max {XATTR_SPACE_MAX})")
        ino.xattrs = items
        with_xattrs.append(ino)
        all_pairs += items

    counts = Counter(all_pairs)
    del all_pairs
    shared = [pair for pair, n in counts.items() if n > 1]
    del counts
    shared.sort(key=lambda p: (p[0], len(p[1]), p[1]), reverse=True)
    offsets: dict[tuple[bytes, bytes], int] = {}
    table = bytearray()
    for pair in shared:
        offsets[pair] = len(table)
        table += codec.entry(*pair)

    max_shared = E.XATTR_LONG_PREFIX
    entry = codec.entry
    name_filter = codec.name_filter
    header_size = E.XATTR_IBODY_HEADER_SIZE
    get_offset = offsets.get
    for ino in with_xattrs:
        items = ino.xattrs
        ids = []
        inline = []
        if offsets:
            for pair in items:
                off = get_offset(pair)
                if off is not None and len(ids) < max_shared:
                    ids.append(off)
                else:
                    inline.append(entry(*pair))
        else:
            inline = [entry(k, v) for k, v in items]
        body = b"".join(inline)
        ino.shared_ids = ids
        ino.inline_xattrs = body
        ino.xsz = header_size + 4 * len(ids) + len(body)
        ino.xfilter = name_filter(tuple([k for k, _ in items]))
    return bytes(table), has_acl


# -- step 4: sizes and placement -------------------------------------------------------------

def _dir_chunks(entries: list) -> tuple[list[list], int]:
    """Greedy packing of dirents (12 bytes + name each) into 4 KiB blocks; also returns the
    bytes used in the last one."""
    chunks = [[]]
    used = 0
    for entry in entries:
        size = _DIRENT_SIZE + len(entry[0])
        if used + size > _BLOCK:
            chunks.append([])
            used = 0
        chunks[-1].append(entry)
        used += size
    return chunks, used


def _layout(order: list[_Inode], min_mtime: tuple[int, int]) -> int:
    """Pick compact/extended, inline tails and nids exactly as compute_erofs_inodes does;
    returns the end of the inode area."""
    pos = E.INODE_AREA_START
    min_sec, min_nsec = min_mtime
    compact_size, extended_size = E.INODE_COMPACT_SIZE, E.INODE_EXTENDED_SIZE
    flat_plain, flat_inline, chunk_based = E.LAYOUT_FLAT_PLAIN, E.LAYOUT_FLAT_INLINE, E.LAYOUT_CHUNK_BASED
    for ino in order:
        xsz = ino.xsz
        ftype = ino.mode & _S_IFMT
        n_blocks = tail = 0
        layout = flat_plain
        size = ino.size
        if ftype == _S_IFDIR:
            chunks, tail = _dir_chunks(ino.entries)
            ino.chunks = chunks
            n_blocks = len(chunks) - 1
            if tail > _HALF_BLOCK:
                n_blocks += 1
                tail = 0
            size = n_blocks * _BLOCK + tail
            ino.i_size = size
        elif ftype == _S_IFREG:
            ino.i_size = size
            if size > 0:
                if ino.node.content is not None:
                    n_blocks, tail = divmod(size, _BLOCK)
                    if tail > _HALF_BLOCK:
                        n_blocks += 1
                        tail = 0
                else:
                    layout = chunk_based
                    tail = 4 * chunk_count(size)
        elif ftype == _S_IFLNK:
            tail = size
            ino.i_size = size
        else:
            ino.i_size = 0

        if (ino.mtime_sec == min_sec and ino.mtime_nsec == min_nsec and ino.nlink <= 0xFFFF
                and ino.uid <= 0xFFFF and ino.gid <= 0xFFFF and size <= 0xFFFFFFFF):
            isz = compact_size
        else:
            isz = extended_size
        ino.isz = isz

        pos = (pos + 31) & ~31
        if ftype == _S_IFLNK:
            # The inode and its inline target must share a block; a target that cannot goes
            # to a data block, and the inode still moves to a block start.
            total = isz + xsz + tail
            if total >= _BLOCK:
                n_blocks += 1
                tail = 0
            if pos // _BLOCK != (pos + total - 1) // _BLOCK:
                pos += -pos % _BLOCK
        else:
            # Only the tail must not cross a block boundary.
            rem = _BLOCK - (pos + isz + xsz) % _BLOCK
            if rem < tail:
                extra = (rem + 31) & ~31
                rem2 = _BLOCK - (pos + isz + xsz + extra) % _BLOCK
                if tail > rem2:
                    n_blocks += 1
                    tail = 0
                    extra = -pos % _BLOCK
                    if layout == chunk_based:
                        ino.spilled_chunk_table = True
                pos += extra
        ino.nid = pos >> 5
        pos += isz + xsz + tail
        if layout != chunk_based:
            layout = flat_inline if tail else flat_plain
        ino.layout = layout
        ino.n_blocks = n_blocks
        ino.tail = tail
    return (pos + 31) & ~31


# -- step 5: serialize ---------------------------------------------------------------------------

def _dirent_block(chunk: list) -> bytes:
    nameoff = _DIRENT_SIZE * len(chunk)
    parts = []
    names = []
    pack = E.DIRENT.pack
    ft = E.FT_BY_IFMT       # every mode here is a valid type (checked in _make_inode)
    for name, target in chunk:
        parts.append(pack(target.nid, nameoff, ft[target.mode & _S_IFMT], 0))
        names.append(name)
        nameoff += len(name)
    return b"".join(parts) + b"".join(names)


def _add_data_xattrs(external: list[_Inode]) -> None:
    """metacopy (with the fs-verity digest) and redirect (to the object) on external files."""
    metacopy, redirect, header = E.OVERLAY_METACOPY, E.OVERLAY_REDIRECT, E.METACOPY_HEADER
    head = 7 + len(metacopy)                # == 7 + len(redirect)
    for ino in external:
        node = ino.node
        digest = node.digest
        value = b"" if digest is None else header + digest
        xattrs = ino.xattrs
        if ino.space is not None or metacopy in xattrs or redirect in xattrs:
            _charge(ino, metacopy, value)
            if node.payload:
                _charge(ino, redirect, b"/" + node.payload)
            continue
        # The common case, _charge inlined: nothing to replace, and a payload (< 4096 bytes)
        # plus a digest always fit.
        space = head + len(value) + (0 if xattrs else 12)
        xattrs[metacopy] = value
        if node.payload:
            value = b"/" + node.payload
            space += head + len(value)
            xattrs[redirect] = value
        ino.space = space


def write_image(root: Node, options: ImageOptions = ImageOptions()) -> bytearray:
    """Serialize ``root`` into a composefs image (bytes identical to mkcomposefs 1.0.8).

    The result is the buffer it was built in (a bytearray, not copied into bytes: for a /usr
    image that copy would be 30 MB more at peak)."""
    return ImageWriter(root, options).finish()


class ImageWriter:
    """Writes one image in two phases, so that the structural work (rewriting the tree for
    overlayfs, breadth-first numbering) can run while file digests are still being computed:
    the constructor reads names, modes and metadata only; ``finish()`` reads digests and
    payloads (set them on the nodes before calling it) and returns the image bytes."""

    def __init__(self, root: Node, options: ImageOptions = ImageOptions()):
        with gc_paused():
            _check_versions(options)
            self._external: list[_Inode] = []
            self._root_inode, self.version = _rewrite(root, options, self._external)
            self._order = _number(self._root_inode)

    def finish(self) -> bytearray:
        if self._order is None:
            raise RuntimeError("ImageWriter.finish() called twice")
        order, self._order = self._order, None
        with gc_paused():
            _add_data_xattrs(self._external)
            self._external = []
            return _serialize(self._root_inode, order, self.version)


def _min_mtime(order: list[_Inode]) -> tuple[int, int]:
    """The oldest mtime, which compact inodes take from the superblock. The reference keeps
    seconds as int64, so a u64 of 2^63 or more (a pre-1970 time) counts as negative."""
    sec, nsec = min((ino.mtime_sec, ino.mtime_nsec) for ino in order)
    if sec >= 1 << 63 or max(ino.mtime_sec for ino in order) >= 1 << 63:
        sec, nsec = min(((s - (1 << 64) if s >= 1 << 63 else s), n) for s, n in
                        ((ino.mtime_sec, ino.mtime_nsec) for ino in order))
    return sec & ((1 << 64) - 1), nsec


def _serialize(root_inode: _Inode, order: list[_Inode], version: int) -> bytearray:
    min_mtime = _min_mtime(order)
    codec = _XattrCodec()
    if _imagepack is not None:
        table, has_acl, over = _imagepack.prepare_xattrs(order, codec.key_info, tuple(E.ACL_XATTRS), XATTR_SPACE_MAX,
                                                         E.XATTR_LONG_PREFIX)
        if over is not None:
            index, budget = over
            raise FormatError(f"{order[index].path()}: too many xattrs ({budget} bytes, max {XATTR_SPACE_MAX})")
        out, inodes_end, total_blocks, root_nid = _imagepack.pack(order, E.INODE_AREA_START, table, *min_mtime)
    else:
        table, has_acl = _prepare_xattrs(order, codec)
        inodes_end = _layout(order, min_mtime)
        out, total_blocks = _pack(order, inodes_end, table)
        root_nid = root_inode.nid
    E.COMPOSEFS_HEADER.pack_into(out, 0, E.COMPOSEFS_MAGIC, E.COMPOSEFS_HEADER_VERSION,
                                 E.COMPOSEFS_FLAG_HAS_ACL if has_acl else 0, version)
    E.SUPERBLOCK.pack_into(out, E.SUPERBLOCK_OFFSET, *E.SuperBlock(
        magic=E.EROFS_MAGIC, checksum=0,
        feature_compat=E.FEATURE_COMPAT_MTIME | E.FEATURE_COMPAT_XATTR_FILTER,
        blkszbits=E.BLOCK_BITS, sb_extslots=0, root_nid=root_nid, inos=len(order),
        build_time=min_mtime[0], build_time_nsec=min_mtime[1], blocks=total_blocks,
        meta_blkaddr=0, xattr_blkaddr=inodes_end // _BLOCK))
    return out


def _pack(order: list[_Inode], inodes_end: int, table: bytes) -> tuple[bytearray, int]:
    """Data blocks, then every inode, xattr body and data into the image buffer (without the
    header and superblock). The C module _imagepack does the same (and _layout) 10x faster."""
    data_start = (inodes_end + len(table) + _BLOCK - 1) // _BLOCK * _BLOCK
    next_block = data_start // _BLOCK
    for ino in order:
        if ino.n_blocks:
            ino.blkaddr = next_block
            next_block += ino.n_blocks
    total_blocks = next_block
    shared_base = inodes_end % _BLOCK

    out = bytearray(total_blocks * _BLOCK)
    out[inodes_end:inodes_end + len(table)] = table

    pack_compact = E.INODE_COMPACT.pack_into
    pack_extended = E.INODE_EXTENDED.pack_into
    pack_header = E.XATTR_IBODY_HEADER.pack
    compact_size = E.INODE_COMPACT_SIZE
    chunk_based = E.LAYOUT_CHUNK_BASED
    for ino in order:
        off = ino.nid << 5
        ftype = ino.mode & _S_IFMT
        layout = ino.layout
        if ftype == _S_IFCHR or ftype == _S_IFBLK:
            i_u = ino.rdev
        elif layout == chunk_based:
            i_u = ino.chunk_bits - E.BLOCK_BITS
            if ino.spilled_chunk_table:
                i_u |= ino.blkaddr & 0xFFFF0000      # the reference's union overwrite
        else:
            i_u = ino.blkaddr if ino.n_blocks else 0
        xsz = ino.xsz
        icount = (xsz - 12) // 4 + 1 if xsz else 0
        if ino.isz == compact_size:
            pack_compact(out, off, layout << 1, icount, ino.mode & 0xFFFF, ino.nlink,
                         ino.i_size, 0, i_u, ino.ino, ino.uid, ino.gid, 0)
        else:
            pack_extended(out, off, (layout << 1) | 1, icount, ino.mode & 0xFFFF, 0,
                          ino.i_size, i_u, ino.ino, ino.uid, ino.gid,
                          ino.mtime_sec, ino.mtime_nsec, ino.nlink)
        off += ino.isz
        if xsz:
            ids = ino.shared_ids
            body = pack_header(ino.xfilter, len(ids))
            if ids:
                body += struct.pack(f"<{len(ids)}I", *[(shared_base + o) >> 2 for o in ids])
            body += ino.inline_xattrs
            out[off:off + xsz] = body
            off += xsz
        # The tail (inline data) follows the xattrs; full blocks go to the data area.
        if ftype == _S_IFDIR:
            blk = ino.blkaddr * _BLOCK
            for n, chunk in enumerate(ino.chunks):
                data = _dirent_block(chunk)
                at = blk + n * _BLOCK if n < ino.n_blocks else off
                out[at:at + len(data)] = data
            ino.chunks = None
        elif ftype == _S_IFLNK:
            target = ino.node.payload
            at = ino.blkaddr * _BLOCK if ino.n_blocks else off
            out[at:at + len(target)] = target
        elif layout == chunk_based:
            if ino.spilled_chunk_table:
                # The reference fills the whole block it spilled the table into.
                blk = ino.blkaddr * _BLOCK
                out[blk:blk + _BLOCK] = b"\xff" * _BLOCK
            else:
                tail = ino.tail
                out[off:off + tail] = _FF[:tail]
        elif ftype == _S_IFREG and ino.size:
            content = ino.node.content
            if ino.n_blocks:
                # Sizes up to 5000 need at most one full block (tails are <= 2048 bytes).
                blk = ino.blkaddr * _BLOCK
                first = content[:_BLOCK]
                out[blk:blk + len(first)] = first
            if ino.tail:
                out[off:off + ino.tail] = content[ino.n_blocks * _BLOCK:]
    return out, total_blocks
