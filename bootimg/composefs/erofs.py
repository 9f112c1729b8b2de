"""On-disk constants and struct layouts of composefs EROFS images, shared by reader and writer.

Everything here mirrors the reference C headers (``lcfs-erofs.h``, ``erofs_fs.h``,
``lcfs-internal.h``) as used by mkcomposefs 1.0.8. All integers are little-endian. This
module is data plus a few pure helpers: no I/O, so both sides of the format agree by
construction on every offset and name.
"""

from __future__ import annotations

import stat
import struct
from typing import NamedTuple

# -- sizes ----------------------------------------------------------------------------------
BLOCK = 4096                  # EROFS_BLKSIZ: the only block size composefs uses
BLOCK_BITS = 12
SLOT = 32                     # inode slot: nid * SLOT is the inode's offset in the meta area
SLOT_BITS = 5
EROFS_NULL_ADDR = 0xFFFFFFFF  # a hole in a chunk table (external file data lives elsewhere)
PATH_MAX = 4096

# -- composefs header (offset 0, 32 bytes, then zero padding up to the superblock) ------------
COMPOSEFS_MAGIC = 0xD078629A
COMPOSEFS_HEADER_VERSION = 1       # LCFS_EROFS_VERSION: layout of this header
COMPOSEFS_FLAG_HAS_ACL = 1 << 0    # some inode has a POSIX ACL: mount without "noacl"
COMPOSEFS_VERSION_MAX = 1          # newest composefs_version (format) the tools know
# magic, version, flags, composefs_version, unused[4]
COMPOSEFS_HEADER = struct.Struct("<IIII16x")

# -- EROFS superblock (at offset 1024, 128 bytes) ---------------------------------------------
SUPERBLOCK_OFFSET = 1024
EROFS_MAGIC = 0xE0F5E1E2
FEATURE_COMPAT_SB_CHKSUM = 0x1
FEATURE_COMPAT_MTIME = 0x2
FEATURE_COMPAT_XATTR_FILTER = 0x4
SUPERBLOCK = struct.Struct(
    "<I"     # 0   magic
    "I"      # 4   checksum (0: FEATURE_COMPAT_SB_CHKSUM is not set)
    "I"      # 8   feature_compat
    "B"      # 12  blkszbits
    "B"      # 13  sb_extslots
    "H"      # 14  root_nid
    "Q"      # 16  inos (inodes written, including the 256 whiteout stubs)
    "Q"      # 24  build_time (the minimum mtime: compact inodes' mtime)
    "I"      # 32  build_time_nsec
    "I"      # 36  blocks (file size / 4096)
    "I"      # 40  meta_blkaddr
    "I"      # 44  xattr_blkaddr
    "16s"    # 48  uuid
    "16s"    # 64  volume_name
    "I"      # 80  feature_incompat
    "H"      # 84  available_compr_algs / lz4_max_distance
    "H"      # 86  extra_devices
    "H"      # 88  devt_slotoff
    "B"      # 90  dirblkbits
    "B"      # 91  xattr_prefix_count
    "I"      # 92  xattr_prefix_start
    "Q"      # 96  packed_nid
    "B"      # 104 xattr_filter_reserved
    "23x"    # 105 reserved
)
assert SUPERBLOCK.size == 128
# The first metadata byte: inodes start right after the superblock (nid 36 = offset 1152).
INODE_AREA_START = SUPERBLOCK_OFFSET + SUPERBLOCK.size


class SuperBlock(NamedTuple):
    """Field values in SUPERBLOCK order, defaulting to what composefs writes:
    ``SUPERBLOCK.pack(*SuperBlock(root_nid=..., ...))`` / ``SuperBlock._make(unpacked)``."""

    magic: int = EROFS_MAGIC
    checksum: int = 0
    feature_compat: int = FEATURE_COMPAT_MTIME | FEATURE_COMPAT_XATTR_FILTER
    blkszbits: int = BLOCK_BITS
    sb_extslots: int = 0
    root_nid: int = 0
    inos: int = 0
    build_time: int = 0
    build_time_nsec: int = 0
    blocks: int = 0
    meta_blkaddr: int = 0
    xattr_blkaddr: int = 0
    uuid: bytes = bytes(16)
    volume_name: bytes = bytes(16)
    feature_incompat: int = 0
    available_compr_algs: int = 0
    extra_devices: int = 0
    devt_slotoff: int = 0
    dirblkbits: int = 0
    xattr_prefix_count: int = 0
    xattr_prefix_start: int = 0
    packed_nid: int = 0
    xattr_filter_reserved: int = 0


# -- inodes -----------------------------------------------------------------------------------
# i_format = (datalayout << I_DATALAYOUT_BIT) | version
I_VERSION_COMPACT = 0
I_VERSION_EXTENDED = 1
I_VERSION_MASK = 0x1
I_DATALAYOUT_BIT = 1
I_DATALAYOUT_MASK = 0x7
LAYOUT_FLAT_PLAIN = 0         # data (if any) in whole blocks at raw_blkaddr, no tail
LAYOUT_COMPRESSED_FULL = 1    # never written by composefs
LAYOUT_FLAT_INLINE = 2        # last partial block stored inline right after the xattrs
LAYOUT_COMPRESSED_COMPACT = 3  # never written by composefs
LAYOUT_CHUNK_BASED = 4        # external files: a chunk table of EROFS_NULL_ADDR entries
CHUNK_FORMAT_BLKBITS_MASK = 0x1F
CHUNK_FORMAT_INDEXES = 0x20


def i_format(layout: int, extended: bool) -> int:
    return (layout << I_DATALAYOUT_BIT) | (I_VERSION_EXTENDED if extended else I_VERSION_COMPACT)


# Compact inode, 32 bytes: i_format, i_xattr_icount, i_mode, i_nlink, i_size u32, reserved,
# i_u (raw_blkaddr / rdev / chunk format), i_ino, i_uid u16, i_gid u16, reserved.
INODE_COMPACT = struct.Struct("<HHHHIIIIHHI")
assert INODE_COMPACT.size == 32
# Extended inode, 64 bytes: i_format, i_xattr_icount, i_mode, reserved, i_size u64, i_u,
# i_ino, i_uid u32, i_gid u32, i_mtime u64, i_mtime_nsec, i_nlink u32, 16 reserved bytes.
INODE_EXTENDED = struct.Struct("<HHHHQIIIIQII16x")
assert INODE_EXTENDED.size == 64
INODE_COMPACT_SIZE = INODE_COMPACT.size
INODE_EXTENDED_SIZE = INODE_EXTENDED.size

# -- directories ------------------------------------------------------------------------------
# nid u64, nameoff u16 (from the start of the dirent block), file_type u8, reserved u8.
DIRENT = struct.Struct("<QHBB")
assert DIRENT.size == 12
DIRENT_SIZE = DIRENT.size

FT_UNKNOWN = 0
FT_REG_FILE = 1
FT_DIR = 2
FT_CHRDEV = 3
FT_BLKDEV = 4
FT_FIFO = 5
FT_SOCK = 6
FT_SYMLINK = 7

FT_BY_IFMT = {
    stat.S_IFREG: FT_REG_FILE,
    stat.S_IFDIR: FT_DIR,
    stat.S_IFCHR: FT_CHRDEV,
    stat.S_IFBLK: FT_BLKDEV,
    stat.S_IFIFO: FT_FIFO,
    stat.S_IFSOCK: FT_SOCK,
    stat.S_IFLNK: FT_SYMLINK,
}


def file_type(mode: int) -> int:
    """The EROFS_FT_* dirent type of a stat mode (FT_UNKNOWN for anything else)."""
    return FT_BY_IFMT.get(stat.S_IFMT(mode), FT_UNKNOWN)


# -- xattrs -----------------------------------------------------------------------------------
# Inode xattr body header: h_name_filter u32, h_shared_count u8, 7 reserved bytes; then
# h_shared_count u32 shared-xattr ids; then the inline entries.
XATTR_IBODY_HEADER = struct.Struct("<IB7x")
assert XATTR_IBODY_HEADER.size == 12
XATTR_IBODY_HEADER_SIZE = XATTR_IBODY_HEADER.size
# Entry header: e_name_len u8, e_name_index u8, e_value_size u16; then suffix, value, pad to 4.
XATTR_ENTRY = struct.Struct("<BBH")
assert XATTR_ENTRY.size == 4
XATTR_ENTRY_SIZE = XATTR_ENTRY.size
XATTR_SHARED_ID = struct.Struct("<I")
XATTR_ALIGN = 4
XATTR_LONG_PREFIX = 0x80       # index bit for long prefixes; also the shared-ref cap per inode
XATTR_FILTER_SEED = 0x25BBE08F
XATTR_FILTER_BITS = 32

XATTR_INDEX_NONE = 0
XATTR_INDEX_USER = 1
XATTR_INDEX_POSIX_ACL_ACCESS = 2
XATTR_INDEX_POSIX_ACL_DEFAULT = 3
XATTR_INDEX_TRUSTED = 4
XATTR_INDEX_LUSTRE = 5
XATTR_INDEX_SECURITY = 6

# Name prefix of each index, as readers decode them (index 5 is decoded, never written).
XATTR_PREFIXES: tuple[bytes, ...] = (
    b"",
    b"user.",
    b"system.posix_acl_access",
    b"system.posix_acl_default",
    b"trusted.",
    b"lustre.",
    b"security.",
)
# Prefixes the writer abbreviates, in the order the reference checks them (no lustre.).
_WRITE_PREFIXES: tuple[tuple[bytes, int], ...] = (
    (b"user.", XATTR_INDEX_USER),
    (b"system.posix_acl_access", XATTR_INDEX_POSIX_ACL_ACCESS),
    (b"system.posix_acl_default", XATTR_INDEX_POSIX_ACL_DEFAULT),
    (b"trusted.", XATTR_INDEX_TRUSTED),
    (b"security.", XATTR_INDEX_SECURITY),
)
ACL_XATTRS = (b"system.posix_acl_access", b"system.posix_acl_default")


def xattr_prefix(key: bytes) -> tuple[int, bytes]:
    """Split a full xattr name into (name_index, suffix) the way mkcomposefs writes it."""
    for prefix, index in _WRITE_PREFIXES:
        if key.startswith(prefix):
            return index, key[len(prefix):]
    return XATTR_INDEX_NONE, key


def xattr_full_name(index: int, suffix: bytes) -> bytes:
    """Inverse of xattr_prefix; raises ValueError for an index no reader knows."""
    if not 0 <= index < len(XATTR_PREFIXES):
        raise ValueError(f"unknown xattr name index {index}")
    return XATTR_PREFIXES[index] + suffix


def xattr_entry_size(suffix_len: int, value_len: int) -> int:
    """Bytes one entry takes in an inode body or the shared table (4-byte aligned)."""
    return (XATTR_ENTRY_SIZE + suffix_len + value_len + 3) & ~3


def xattr_icount(body_size: int) -> int:
    """i_xattr_icount for an xattr body of body_size bytes (0 = no xattrs)."""
    return 0 if body_size == 0 else (body_size - XATTR_IBODY_HEADER_SIZE) // 4 + 1


def xattr_body_size(icount: int) -> int:
    """Inverse of xattr_icount: bytes between the inode and its inline tail."""
    return 0 if icount == 0 else XATTR_IBODY_HEADER_SIZE + (icount - 1) * 4


def xattr_filter_bit(index: int, suffix: bytes) -> int:
    """Bloom-filter bit of one xattr: h_name_filter = 0xFFFFFFFF & ~OR(1 << bit)."""
    import xxhash  # only the writer needs it

    return xxhash.xxh32_intdigest(suffix, seed=(XATTR_FILTER_SEED + index) & 0xFFFFFFFF) & (XATTR_FILTER_BITS - 1)


# -- overlayfs xattrs (lcfs-internal.h) -------------------------------------------------------
OVERLAY_TRUSTED_PREFIX = b"trusted."
OVERLAY_PREFIX = b"trusted.overlay."             # what overlayfs interprets
OVERLAY_ESCAPE_PREFIX = b"trusted.overlay.overlay."  # a user's trusted.overlay.X, stored escaped
OVERLAY_USER_PREFIX = b"user.overlay."           # the userxattr variant (not escaped)

OVERLAY_METACOPY = b"trusted.overlay.metacopy"
OVERLAY_REDIRECT = b"trusted.overlay.redirect"
OVERLAY_OPAQUE = b"trusted.overlay.opaque"
OVERLAY_WHITEOUT = b"trusted.overlay.whiteout"
OVERLAY_WHITEOUTS = b"trusted.overlay.whiteouts"
OVERLAY_ESCAPED_WHITEOUT = b"trusted.overlay.overlay.whiteout"
OVERLAY_ESCAPED_WHITEOUTS = b"trusted.overlay.overlay.whiteouts"
OVERLAY_ESCAPED_OPAQUE = b"trusted.overlay.overlay.opaque"
OVERLAY_USER_WHITEOUT = b"user.overlay.whiteout"
OVERLAY_USER_WHITEOUTS = b"user.overlay.whiteouts"
OVERLAY_USER_OPAQUE = b"user.overlay.opaque"

# trusted.overlay.metacopy value with a digest: version 0, length 36, flags 0, SHA-256 (1).
METACOPY_HEADER = b"\x00\x24\x00\x01"
METACOPY_SIZE = 4 + 32


def escape_overlay_xattr(key: bytes) -> bytes:
    """trusted.overlay.X -> trusted.overlay.overlay.X so overlayfs ignores the user's own."""
    if key.startswith(OVERLAY_PREFIX):
        return OVERLAY_ESCAPE_PREFIX + key[len(OVERLAY_PREFIX):]
    return key


def unescape_overlay_xattr(key: bytes) -> bytes | None:
    """Inverse on read: the user's name for an escaped key, None for composefs' own
    trusted.overlay.* keys (which readers drop), the key itself otherwise."""
    if not key.startswith(OVERLAY_PREFIX):
        return key
    if key.startswith(OVERLAY_ESCAPE_PREFIX):
        return OVERLAY_TRUSTED_PREFIX + key[len(OVERLAY_PREFIX):]
    return None


# -- composefs limits shared by reader and writer ---------------------------------------------
INLINE_CONTENT_MAX = 5000     # largest flat regular file read back as content
WHITEOUT_STUBS = 256          # root whiteouts "00".."ff" hiding the object store's dirs
