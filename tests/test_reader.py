"""The image reader, the on-disk constants and composefs-info's output formats.

Images come from three sources: bootimg's own writer (dump assets and hand-built trees),
mkfs.erofs (an independent EROFS writer, read without a composefs header) and byte-level
corruptions of both, which must only ever raise FormatError.
"""

from __future__ import annotations

import io
import mmap
import os
import random
import stat
import struct
import subprocess
from pathlib import Path

import pytest
from conftest import checksummed_vectors, have, run_cli
from reference import composefs_info

from bootimg.composefs import erofs as E
from bootimg.composefs.info import (
    ESCAPE_EQUAL,
    ESCAPE_LONE_DASH,
    ESCAPE_STANDARD,
    NOESCAPE_SPACE,
    dump_lines,
    escape,
    format_dump,
    list_objects,
    ls_lines,
    missing_objects,
)
from bootimg.composefs.reader import load_image, read_image
from bootimg.composefs.tree import Node
from bootimg.errors import FormatError

VECTORS = checksummed_vectors()


def _writer():
    writer = pytest.importorskip("bootimg.composefs.writer")
    dump = pytest.importorskip("bootimg.composefs.dump")
    return writer, dump


def build(dump_text: bytes, version: int | None = None) -> bytes:
    writer, dump = _writer()
    options = (writer.ImageOptions(min_version=version, max_version=version)
               if version is not None else writer.ImageOptions())
    return writer.write_image(dump.parse_dump(dump_text, "<test>"), options)


def dump_of(image: bytes, **kw) -> bytes:
    out = io.BytesIO()
    format_dump(read_image(image, **kw).root, out)
    return out.getvalue()


def tree(*lines: str) -> bytes:
    return ("\n".join(lines) + "\n").encode()


# -- erofs.py ---------------------------------------------------------------------------------

def test_struct_layouts():
    assert E.COMPOSEFS_HEADER.size == 32
    assert E.SUPERBLOCK.size == 128
    assert E.INODE_AREA_START == 1152 == 36 * E.SLOT
    assert (E.INODE_COMPACT.size, E.INODE_EXTENDED.size) == (32, 64)
    assert (E.DIRENT.size, E.XATTR_IBODY_HEADER.size, E.XATTR_ENTRY.size) == (12, 12, 4)
    sb = E.SuperBlock(root_nid=36, inos=5, blocks=4)
    raw = E.SUPERBLOCK.pack(*sb)
    assert raw[:4] == b"\xe2\xe1\xf5\xe0" and raw[8] == 6 and raw[12] == 12
    assert E.SuperBlock._make(E.SUPERBLOCK.unpack(raw)) == sb
    assert E.i_format(E.LAYOUT_CHUNK_BASED, True) == 9
    assert E.i_format(E.LAYOUT_FLAT_INLINE, False) == 4


@pytest.mark.parametrize("key,index,suffix", [
    (b"user.foo", 1, b"foo"),
    (b"system.posix_acl_access", 2, b""),
    (b"system.posix_acl_default", 3, b""),
    (b"trusted.overlay.metacopy", 4, b"overlay.metacopy"),
    (b"security.selinux", 6, b"selinux"),
    (b"lustre.x", 0, b"lustre.x"),          # the writer never abbreviates lustre.
    (b"system.nfs4_acl", 0, b"system.nfs4_acl"),
    (b"user", 0, b"user"),
])
def test_xattr_prefix(key, index, suffix):
    assert E.xattr_prefix(key) == (index, suffix)
    assert E.xattr_full_name(index, suffix) == key
    assert E.xattr_full_name(5, b"x") == b"lustre.x"
    with pytest.raises(ValueError):
        E.xattr_full_name(7, b"x")


def test_small_helpers():
    assert E.file_type(stat.S_IFREG | 0o644) == E.FT_REG_FILE
    assert E.file_type(stat.S_IFLNK) == E.FT_SYMLINK
    assert E.file_type(0) == E.FT_UNKNOWN
    assert [E.xattr_icount(n) for n in (0, 12, 16, 40)] == [0, 1, 2, 8]
    assert [E.xattr_body_size(E.xattr_icount(n)) for n in (0, 12, 16, 40)] == [0, 12, 16, 40]
    assert E.xattr_entry_size(3, 2) == 12
    assert E.escape_overlay_xattr(b"trusted.overlay.opaque") == b"trusted.overlay.overlay.opaque"
    assert E.escape_overlay_xattr(b"user.overlay.opaque") == b"user.overlay.opaque"
    assert E.unescape_overlay_xattr(b"trusted.overlay.overlay.x") == b"trusted.overlay.x"
    assert E.unescape_overlay_xattr(b"trusted.overlay.x") is None
    assert E.unescape_overlay_xattr(b"user.x") == b"user.x"
    assert 0 <= E.xattr_filter_bit(1, b"test") < 32


# -- escaping ---------------------------------------------------------------------------------

@pytest.mark.parametrize("data,flags,expected", [
    (b"plain/path", ESCAPE_STANDARD, b"plain/path"),
    (b"a b", ESCAPE_STANDARD, b"a\\x20b"),
    (b"a b", NOESCAPE_SPACE, b"a b"),
    (b"\\\n\r\t", ESCAPE_STANDARD, b"\\\\\\n\\r\\t"),
    (b"\\\n\r\t", NOESCAPE_SPACE, b"\\\\\\n\\r\\t"),
    (b"\x00\x01\x7f\x80\xff", ESCAPE_STANDARD, b"\\x00\\x01\\x7f\\x80\\xff"),
    (b"\xc3\xa9", NOESCAPE_SPACE, b"\\xc3\\xa9"),
    (b"k=v", ESCAPE_STANDARD, b"k=v"),
    (b"k=v", ESCAPE_EQUAL, b"k\\x3dv"),
    (b"-", ESCAPE_STANDARD, b"-"),
    (b"-", ESCAPE_LONE_DASH, b"\\x2d"),
    (b"--", ESCAPE_LONE_DASH, b"--"),
    (b"", ESCAPE_LONE_DASH, b""),
    (b"~!\"#$%&'()*+,./:;<>?@[]^_`{|}", ESCAPE_STANDARD, b"~!\"#$%&'()*+,./:;<>?@[]^_`{|}"),
])
def test_escape(data, flags, expected):
    assert escape(data, flags) == expected


def test_escape_every_byte_matches_c_locale():
    for c in range(256):
        b = bytes((c,))
        std = escape(b)
        if c in b"\\\n\r\t":
            assert std.startswith(b"\\") and len(std) == 2
        elif 0x21 <= c <= 0x7E:
            assert std == b
        else:
            assert std == b"\\x%02x" % c
        assert escape(b, NOESCAPE_SPACE) == (b" " if c == 0x20 else std)


# -- dump / ls formatting of hand-built trees --------------------------------------------------

def _sample_tree() -> Node:
    root = Node(stat.S_IFDIR | 0o755, nlink=3, mtime_sec=10, mtime_nsec=5)
    root.xattrs[b"user.a=b"] = b"x y"
    d = root.add_child(b"dir space", Node(stat.S_IFDIR | 0o700, uid=1000, gid=100, size=4096))
    ext = d.add_child(b"ext", Node(stat.S_IFREG | 0o644, nlink=2, size=100, mtime_sec=2**64 - 1))
    ext.payload = b"ab/cdef"
    ext.digest = bytes(range(32))
    d.add_child(b"link", Node(stat.S_IFREG | 0o644)).link_to = ext
    inline = root.add_child(b"inline", Node(stat.S_IFREG | 0o600, size=1))
    inline.content = b"-"
    dash = root.add_child(b"-", Node(stat.S_IFREG | 0o644, size=5))
    dash.payload = b"-"
    sym = root.add_child(b"sym", Node(stat.S_IFLNK | 0o777, size=6))
    sym.payload = b"a b\tc="
    root.add_child(b"dev", Node(stat.S_IFCHR | 0o600, rdev=259))
    return root


def test_format_dump_lines():
    out = io.BytesIO()
    format_dump(_sample_tree(), out)
    digest = bytes(range(32)).hex()
    assert out.getvalue().decode().splitlines() == [
        "/ 0 40755 3 0 0 0 10.5 - - - user.a\\x3db=x\\x20y",
        "/- 5 100644 1 0 0 0 0.0 \\x2d - -",
        "/dev 0 20600 1 0 0 259 0.0 - - -",
        "/dir\\x20space 4096 40700 1 1000 100 0 0.0 - - -",
        f"/dir\\x20space/ext 100 100644 2 0 0 0 -1.0 ab/cdef - {digest}",
        f"/dir\\x20space/link 100 @100644 2 0 0 0 -1.0 /dir\\x20space/ext - {digest}",
        "/inline 1 100600 1 0 0 0 0.0 - \\x2d -",
        "/sym 6 120777 1 0 0 0 0.0 a\\x20b\\tc= - -",
    ]


def test_ls_lines():
    lines = b"".join(ls_lines(_sample_tree())).decode().splitlines()
    assert lines == [
        "/-\t@ -",                      # a lone dash is escaped only in the dump
        "/dev",
        "/dir space/\t",
        "/dir space/ext\t@ ab/cdef",
        "/dir space/link",              # hardlinks: no mode/payload of their own (reference reader)
        "/inline",
        "/sym\t-> a\\x20b\\tc=",
    ]


def test_objects(tmp_path):
    root = _sample_tree()
    assert list_objects(root) == [b"-", b"ab/cdef"]
    (tmp_path / "ab").mkdir()
    assert missing_objects(root, tmp_path) == [b"-", b"ab/cdef"]
    (tmp_path / "ab" / "cdef").write_bytes(b"")
    assert missing_objects(root, tmp_path) == [b"-"]
    assert missing_objects(root, str(tmp_path).encode()) == [b"-"]


# -- reading images the writer made -----------------------------------------------------------

SPECIAL = "special_v1.dump"


@pytest.fixture(scope="module")
def special_image(assets) -> bytes:
    return build((assets / SPECIAL).read_bytes(), version=1)


def test_special_semantics(special_image):
    image = read_image(special_image)
    assert image.version == 1 and not image.has_acl
    assert image.root_nid == 36
    assert image.blocks * E.BLOCK == len(special_image)
    root = image.root
    assert sorted(root.children) == [b"blockdev", b"chardev", b"escaped-xattr", b"fifo", b"inline",
                                     b"inline-large1", b"inline-large2", b"inline-large3", b"whiteout"]
    assert image.inos == len(root.children) + 1 + E.WHITEOUT_STUBS
    # root: opaque=y dropped, the v1 whiteout markers shown unescaped, whiteouts(s) hidden
    assert list(root.xattrs.items()) == [(b"trusted.foo1", b"bar-1"), (b"trusted.overlay.opaque", b"x"),
                                         (b"user.foo2", b"bar-2"), (b"user.overlay.opaque", b"x")]
    wh = root.children[b"whiteout"]
    assert (stat.S_IFMT(wh.mode), wh.rdev, wh.size) == (stat.S_IFCHR, 0, 0)
    assert wh.xattrs == {b"trusted.foo": b"bar-2"}
    esc = root.children[b"escaped-xattr"]
    assert esc.xattrs[b"trusted.overlay.redirect"] == b"/foo\n"
    assert esc.payload is None and esc.content is None
    assert root.children[b"chardev"].rdev == 10769
    assert root.children[b"inline"].content == b"FOOBAR\nINAFILE\n"
    for name, size in ((b"inline-large1", 4095), (b"inline-large2", 4096), (b"inline-large3", 4097)):
        node = root.children[name]
        assert node.size == size and len(node.content) == size


def test_special_dump_text(special_image):
    lines = dump_of(special_image).splitlines()
    assert lines[0] == (b"/ 4096 40555 2 0 0 0 1633950376.0 - - - trusted.foo1=bar-1 "
                        b"trusted.overlay.opaque=x user.foo2=bar-2 user.overlay.opaque=x")
    assert b"/whiteout 0 20777 1 0 0 0 1633950376.0 - - - trusted.foo=bar-2" in lines
    assert b"/inline 15 100777 1 0 0 0 1633950376.0 - FOOBAR\\nINAFILE\\n - user.foo=bar-2" in lines


def test_v0_image_has_no_opaque_x(assets):
    image = read_image(build((assets / "special.dump").read_bytes(), version=0))
    assert image.version == 0
    assert dict(image.root.xattrs) == {b"trusted.foo1": b"bar-1", b"user.foo2": b"bar-2"}


def test_external_files_and_symlinks():
    digest = "0123456789abcdef" * 4
    img = build(tree(
        "/ 0 40755 2 0 0 0 100.0 - - -",
        f"/ext 100000 100644 1 0 0 0 100.0 ab/cdef - {digest}",
        "/abs 5 100644 1 0 0 0 100.0 /x/y - -",
        "/nopayload 7 100644 1 0 0 0 200.5 - - -",
        "/long " + "4000 120777 1 0 0 0 100.0 " + "t" * 4000 + " - -",
        "/short 1 120777 1 0 0 0 100.0 s - -",
    ))
    root = read_image(img).root
    ext = root.children[b"ext"]
    # The reference reads a redirect "/X" as strndup(X, len + 1): with "/ab/cdef" (its entry ends
    # on a 4-byte boundary, the chunk table follows) two bytes of the table come along.
    assert (ext.payload, ext.digest.hex(), ext.size, ext.content) == (b"ab/cdef\xff\xff", digest, 100000, None)
    assert root.children[b"abs"].payload == b"/x/y"         # redirect "//x/y": one '/' stripped
    nop = root.children[b"nopayload"]
    assert (nop.payload, nop.digest, nop.size, nop.mtime_sec, nop.mtime_nsec) == (None, None, 7, 200, 5)
    assert root.children[b"long"].payload == b"t" * 4000    # out-of-line target block
    assert root.children[b"short"].payload == b"s"
    assert list_objects(root) == [b"/x/y", b"ab/cdef\xff\xff"]


def test_compact_inodes_take_build_time():
    img = build(tree("/ 0 40755 2 0 0 0 77.9 - - -", "/f 3 100644 1 0 0 0 77.9 - abc -"))
    image = read_image(img)
    assert (image.build_time, image.build_time_nsec) == (77, 9)
    f = image.root.children[b"f"]
    assert (f.mtime_sec, f.mtime_nsec, f.content) == (77, 9, b"abc")


def test_hardlinks_first_in_dfs_order_owns():
    img = build(tree(
        "/ 0 40755 2 0 0 0 1.0 - - -",
        "/b 0 40755 2 0 0 0 1.0 - - -",
        "/b/t 3 100644 3 0 0 0 1.0 - xyz - user.k=v",
        "/a 3 @100644 3 0 0 0 1.0 /b/t - -",
        "/c 3 @100644 3 0 0 0 1.0 /b/t - -",
    ))
    root = read_image(img).root
    owner = root.children[b"a"]                 # "a" comes first depth-first, not "b/t"
    assert owner.link_to is None and owner.content == b"xyz" and owner.nlink == 3
    assert root.children[b"b"].children[b"t"].link_to is owner
    assert root.children[b"c"].link_to is owner
    lines = dump_of(img).decode().splitlines()
    assert lines[1] == "/a 3 100644 3 0 0 0 1.0 - xyz - user.k=v"
    assert lines[3] == "/b/t 3 @100644 3 0 0 0 1.0 /a xyz - user.k=v"


def test_filters_keep_only_named_root_entries(special_image):
    root = read_image(special_image, filters=[b"inline", b"fifo", b"nope"]).root
    assert sorted(root.children) == [b"fifo", b"inline"]


def test_deep_tree_does_not_recurse():
    lines = ["/ 0 40755 2 0 0 0 1.0 - - -"]
    path = ""
    for _ in range(1500):
        path += "/d"
        lines.append(f"{path} 0 40755 2 0 0 0 1.0 - - -")
    root = read_image(build(tree(*lines))).root
    depth = 0
    while root.children:
        root = root.children[b"d"]
        depth += 1
    assert depth == 1500


def test_last_empty_xattr_entry_is_dropped_like_the_reference():
    # A 4-byte entry (empty suffix, empty value) in the last slot of the xattr body is not
    # read by lcfs_build_node_from_image (its loop uses a strict '<'); neither by us.
    img = build(tree("/ 0 40755 2 0 0 0 1.0 - - -",
                     "/f 0 100644 1 0 0 0 1.0 - - - system.posix_acl_default=",
                     "/g 0 100644 1 0 0 0 1.0 - - - system.posix_acl_access= user.z=1"))
    image = read_image(img)
    assert image.has_acl
    assert image.root.children[b"f"].xattrs == {}
    assert image.root.children[b"g"].xattrs == {b"system.posix_acl_access": b"", b"user.z": b"1"}


@pytest.mark.parametrize("vec", VECTORS, ids=lambda v: v.name)
def test_asset_round_trip(vec):
    """dump -> image -> read -> dump -> image reproduces the image byte for byte, and the
    second dump is stable."""
    writer, dump = _writer()
    first = build(vec.dump(), vec.version)
    image = read_image(first)
    text = io.BytesIO()
    format_dump(image.root, text)
    second = writer.write_image(dump.parse_dump(text.getvalue(), "<round trip>"),
                                writer.ImageOptions(min_version=image.version, max_version=image.version))
    assert second == first
    assert dump_of(second) == text.getvalue()


def test_config_hardlink_dump_line(assets):
    vec = next(v for v in VECTORS if v.name == "config-with-hard-link.dump.gz")
    lines = dump_of(build(vec.dump())).splitlines()
    ls_line = next(line for line in lines if line.startswith(b"/usr/bin/ls-hardlink "))
    assert ls_line == (b"/usr/bin/ls-hardlink 142024 @100145 2 0 0 0 1633950376.0 /usr/bin/ls - - "
                       b"user.foo1=bar-1 user.foo2=bar-2")


# -- plain EROFS images from mkfs.erofs ---------------------------------------------------------

def _try_setxattr(path: Path, key: str, value: bytes) -> bool:
    try:
        os.setxattr(path, key, value, follow_symlinks=False)
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def mkfs_source(tmp_path_factory) -> Path:
    if not have("mkfs.erofs"):
        pytest.skip("mkfs.erofs (erofs-utils) is not installed")
    src = tmp_path_factory.mktemp("mkfs") / "src"
    (src / "sub" / "deep").mkdir(parents=True)
    (src / "big").mkdir()
    (src / "a.txt").write_bytes(b"hello\n")
    (src / "b.bin").write_bytes(bytes(range(256)) * 12)         # 3072 bytes, block + tail
    (src / "c.bin").write_bytes(b"z" * 5000)
    os.link(src / "a.txt", src / "sub" / "hard")
    os.symlink("a.txt", src / "link")
    os.symlink("y" * 300, src / "longlink")
    for i in range(400):                                        # a directory of several blocks
        (src / "big" / f"file-with-a-longish-name-{i:04}").write_bytes(b"")
    os.mkfifo(src / "fifo")
    for name in ("a.txt", "b.bin", "c.bin", "fifo", "big"):     # > 2 uses: a shared xattr
        _try_setxattr(src / name, "user.shared", b"same")
    _try_setxattr(src / "sub" / "deep", "user.overlay.redirect", b"/x")
    _try_setxattr(src / "sub", "trusted.overlay.opaque", b"y")
    _try_setxattr(src / "sub", "trusted.overlay.overlay.foo", b"bar")
    return src


def _mkfs(src: Path, out: Path, *extra: str) -> bytes:
    subprocess.run(["mkfs.erofs", "--quiet", "-T", "1000", *extra, str(out), str(src)], check=True)
    return out.read_bytes()


def test_mkfs_erofs_image(mkfs_source, tmp_path):
    image = read_image(_mkfs(mkfs_source, tmp_path / "img"), composefs_header=False)
    root = image.root
    assert image.version == 0 and image.build_time == 1000
    assert sorted(root.children) == [b"a.txt", b"b.bin", b"big", b"c.bin", b"fifo", b"link",
                                     b"longlink", b"sub"]
    a = root.children[b"a.txt"]
    assert (a.content, a.size, a.nlink, a.mtime_sec) == (b"hello\n", 6, 2, 1000)
    assert root.children[b"b.bin"].content == bytes(range(256)) * 12
    assert root.children[b"c.bin"].content == b"z" * 5000
    assert root.children[b"sub"].children[b"hard"].link_to is a
    assert root.children[b"link"].payload == b"a.txt"
    assert root.children[b"longlink"].payload == b"y" * 300
    assert stat.S_ISFIFO(root.children[b"fifo"].mode)
    big = root.children[b"big"]
    assert big.size > 3 * E.BLOCK
    assert sorted(big.children) == [b"file-with-a-longish-name-%04d" % i for i in range(400)]
    for name in ("a.txt", "b.bin", "c.bin", "sub"):
        st = os.lstat(mkfs_source / name)
        node = root.children[name.encode()]
        assert (node.mode, node.uid, node.gid) == (st.st_mode, st.st_uid, st.st_gid)
    if a.xattrs:                                                # xattrs worked on this fs
        assert a.xattrs == {b"user.shared": b"same"}
        assert big.xattrs == {b"user.shared": b"same"}
        assert root.children[b"sub"].children[b"deep"].xattrs == {b"user.overlay.redirect": b"/x"}
        sub = root.children[b"sub"].xattrs
        assert b"trusted.overlay.opaque" not in sub             # composefs' own namespace: dropped
        if sub:
            assert sub == {b"trusted.overlay.foo": b"bar"}      # escaped: shown unescaped


def test_mkfs_erofs_chunked_files_are_external(mkfs_source, tmp_path):
    root = read_image(_mkfs(mkfs_source, tmp_path / "img", "--chunksize=4096"), composefs_header=False).root
    b = root.children[b"b.bin"]
    assert (b.size, b.content, b.payload) == (3072, None, None)
    assert list_objects(root) == []


# -- corrupt and truncated images ----------------------------------------------------------------

def _corrupt(image: bytes, offset: int, value: bytes) -> bytes:
    return image[:offset] + value + image[offset + len(value):]


def _like_reference(reference, tmp_path: Path, image: bytes) -> bytes | None:
    """composefs-info dump of image by bootimg and by the reference: both fail (None), or
    both print the same bytes (returned)."""
    path = tmp_path / "img.cfs"
    path.write_bytes(image)
    ref = composefs_info(reference, "dump", str(path))
    try:
        ours = dump_of(image)
    except FormatError:
        ours = None
    assert (ref.returncode == 0) == (ours is not None), (ref.returncode, ref.stderr)
    if ours is not None:
        assert ours == ref.stdout
    return ours


def test_header_checks(special_image, reference, tmp_path):
    with pytest.raises(FormatError, match="magic.*offset 0"):
        read_image(_corrupt(special_image, 0, b"\0"))
    with pytest.raises(FormatError, match="header version 2 at offset 4"):
        read_image(_corrupt(special_image, 4, struct.pack("<I", 2)))
    with pytest.raises(FormatError, match="EROFS superblock magic.*offset 1024"):
        read_image(_corrupt(special_image, 1024, b"\0"))
    with pytest.raises(FormatError, match="too small"):
        read_image(special_image[:4000])
    with pytest.raises(FormatError, match="not a composefs image"):
        read_image(bytes(8192))
    # composefs images are read with 4 KiB blocks whatever blkszbits says, as the reference does
    assert _like_reference(reference, tmp_path, _corrupt(special_image, 1024 + 12, b"\x0d")) == dump_of(special_image)
    # a plain EROFS image (no composefs header) must say 4 KiB
    with pytest.raises(FormatError, match="block size"):
        read_image(_corrupt(special_image, 1024 + 12, b"\x0d"), composefs_header=False)


def test_specific_corruptions(special_image, reference, tmp_path):
    root_off = 36 * 32
    # root nid pointing past the end
    with pytest.raises(FormatError, match="nid 65535"):
        read_image(_corrupt(special_image, 1024 + 14, b"\xff\xff"))
    # The reference reads any file type, the root's too: a regular-file root has no entries,
    # an invalid type is printed as it is.
    out = _like_reference(reference, tmp_path, _corrupt(special_image, root_off + 4, struct.pack("<H", stat.S_IFREG | 0o644)))
    assert out.startswith(b"/ 4096 100644 ") and out.count(b"\n") == 1
    out = _like_reference(reference, tmp_path, _corrupt(special_image, root_off + 4, struct.pack("<H", 0o644)))
    assert out.startswith(b"/ 4096 644 ")


def _root_dirents(image: bytes) -> list[tuple[int, bytes, int]]:
    """(record offset, name, nid) of the root's dirents, which fit one block (inline or
    not): a tiny decoder independent of the reader."""
    off = 36 * E.SLOT
    fmt, icount = struct.unpack_from("<HH", image, off)
    if fmt & 1:
        size, blkaddr, isize = E.INODE_EXTENDED.unpack_from(image, off)[4], E.INODE_EXTENDED.unpack_from(image, off)[5], 64
    else:
        size, blkaddr, isize = E.INODE_COMPACT.unpack_from(image, off)[4], E.INODE_COMPACT.unpack_from(image, off)[6], 32
    assert size <= E.BLOCK
    if fmt >> 1 == E.LAYOUT_FLAT_INLINE:
        start = off + isize + E.xattr_body_size(icount)
    else:
        start = blkaddr * E.BLOCK
    records = [E.DIRENT.unpack_from(image, start + 12 * i)
               for i in range(E.DIRENT.unpack_from(image, start)[1] // 12)]
    ends = [r[1] for r in records[1:]] + [size]
    return [(start + 12 * i, image[start + r[1]:start + end].rstrip(b"\0"), r[0])
            for i, (r, end) in enumerate(zip(records, ends))]


def test_directory_loop_reads_as_a_hardlink(reference, tmp_path):
    """A dirent back to the root: the reference's inode table makes it a hardlink to the root,
    whose path is empty."""
    img = bytearray(build(tree("/ 0 40755 2 0 0 0 1.0 - - -", "/d 0 40755 2 0 0 0 1.0 - - -")))
    entries = {name: (off, nid) for off, name, nid in _root_dirents(bytes(img))}
    assert b"d" in entries and entries[b"."][1] == 36 and len(entries) == 3 + E.WHITEOUT_STUBS
    struct.pack_into("<Q", img, entries[b"d"][0], 36)          # "d" -> the root itself
    out = _like_reference(reference, tmp_path, bytes(img))
    assert out.splitlines()[1] == b"/d 4096 @40755 3 0 0 0 1.0  - -"
    root = read_image(bytes(img)).root
    assert root.children[b"d"].link_to is root


def test_bad_dirent_and_xattr_offsets(reference, tmp_path):
    img = build(tree("/ 0 40755 2 0 0 0 1.0 - - - user.k=v", "/d 0 40755 2 0 0 0 1.0 - - -"))
    dirents = _root_dirents(img)
    first, second = dirents[0][0], dirents[1][0]
    d_record = next(off for off, name, _ in dirents if name == b"d")
    with pytest.raises(FormatError, match="bad dirent block"):
        read_image(_corrupt(img, first + 8, struct.pack("<H", 13)))
    # The record count comes from the first name offset alone: 0 means an empty directory.
    assert _like_reference(reference, tmp_path, _corrupt(img, first + 8, struct.pack("<H", 0))).count(b"\n") == 1
    # A name offset past the image: the reference would read past its end.
    with pytest.raises(FormatError, match="runs past the end"):
        read_image(_corrupt(img, second + 8, struct.pack("<H", 65000)))
    assert _like_reference(reference, tmp_path, _corrupt(img, second + 8, struct.pack("<H", 65000))) is None
    with pytest.raises(FormatError, match="lies past the end"):
        read_image(_corrupt(img, d_record, struct.pack("<Q", 1 << 40)))
    # nid << 5 wraps in 64 bits: 2^59 + nid reads inode nid again, as a node of its own (the
    # inode table is keyed by the full nid), not as a hardlink
    d_nid = next(nid for _, name, nid in dirents if name == b"d")
    stub_record = next(off for off, name, _ in dirents if name == b"00")
    wrapped = _like_reference(reference, tmp_path, _corrupt(img, stub_record, struct.pack("<Q", (1 << 59) + d_nid)))
    assert b"/00 27 40755 2 0 0 0 1.0 - - -\n" in wrapped and b"/d 27 40755 2 0 0 0 1.0 - - -\n" in wrapped
    # the root's inline xattrs: trusted.overlay.opaque=y, then user.k=v
    off = 36 * E.SLOT + (64 if img[36 * E.SLOT] & 1 else 32) + 12
    assert img[off:off + 2] == bytes((len(b"overlay.opaque"), E.XATTR_INDEX_TRUSTED))
    off += E.xattr_entry_size(len(b"overlay.opaque"), 1)
    assert img[off:off + 2] == bytes((1, E.XATTR_INDEX_USER))
    with pytest.raises(FormatError, match="unknown xattr name index 9"):
        read_image(_corrupt(img, off + 1, b"\x09"))
    assert _like_reference(reference, tmp_path, _corrupt(img, off + 1, b"\x09")) is None
    # A value running out of the xattr area is read from what follows, like the reference.
    _like_reference(reference, tmp_path, _corrupt(img, off + 2, struct.pack("<H", 200)))


def test_redirect_reads_two_bytes_past_the_value(reference, tmp_path):
    """lcfs_build_node_erofs_xattr skips the redirect's '/' with value++ *and* value_size++:
    strndup() then reads up to two bytes after the value (here the chunk table's 0xff)."""
    digest = "0123456789abcdef" * 4
    img = build(tree("/ 0 40755 2 0 0 0 100.0 - - -", f"/ext 100000 100644 1 0 0 0 100.0 ab/cdef - {digest}"))
    out = _like_reference(reference, tmp_path, img)
    assert b"/ext 100000 100644 1 0 0 0 100.0 ab/cdef\\xff\\xff - " in out


def test_whiteout_stub_reached_twice_is_refused(reference, tmp_path):
    """Two entries reaching one 0:0 chardev: the reference links the second to the freed node of
    the first (what it prints is freed memory); bootimg refuses the image."""
    img = bytearray(build(tree("/ 0 40755 2 0 0 0 1.0 - - -", "/d 0 40755 2 0 0 0 1.0 - - -")))
    entries = {name: (off, nid) for off, name, nid in _root_dirents(bytes(img))}
    struct.pack_into("<Q", img, entries[b"d"][0], entries[b"00"][1])      # "d" -> the stub of "00"
    with pytest.raises(FormatError, match=f"0:0 character device inode nid {entries[b'00'][1]} is reached twice"):
        read_image(bytes(img))
    path = tmp_path / "img.cfs"
    path.write_bytes(img)
    ref = composefs_info(reference, "dump", str(path))
    assert ref.returncode != 0 or b"/d " in ref.stdout           # no defined answer: crash or garbage


def test_flat_inline_file_without_tail_is_refused(reference, tmp_path):
    """A flat-inline file whose size is a multiple of 4096: the reference copies nothing into
    its buffer's last block and prints uninitialised memory; bootimg refuses the image."""
    img = bytearray(build(tree("/ 0 40755 2 0 0 0 1.0 - - -", "/f 4096 100644 1 0 0 0 1.0 - " + "x" * 4096 + " -")))
    nid = next(nid for _, name, nid in _root_dirents(bytes(img)) if name == b"f")
    off = nid * E.SLOT
    assert (img[off] >> 1) & 7 == E.LAYOUT_FLAT_PLAIN
    img[off] = (img[off] & 1) | (E.LAYOUT_FLAT_INLINE << 1)
    with pytest.raises(FormatError, match=f"inode nid {nid}: flat inline file of 4096 bytes has no inline tail"):
        read_image(bytes(img))


def _fuzz_images(special_image: bytes) -> list[tuple[bytes, bool]]:
    extra = build(tree(
        "/ 0 40755 2 0 0 0 1.0 - - - user.a=1",
        "/d 0 40755 2 0 0 0 1.0 - - - user.a=1",
        "/d/x 5 100644 2 0 0 0 1.0 - hello - user.b=2",
        "/d/y 5 @100644 2 0 0 0 1.0 /d/x - -",
        "/e 100 100644 1 0 0 0 2.0 aa/bb - " + "ab" * 32 + " user.a=1",
        "/l 4000 120777 1 0 0 0 1.0 " + "t" * 4000 + " - -",
        "/w 0 20644 1 0 0 0 1.0 - - -",
    ))
    return [(special_image, True), (extra, True)]


def test_truncations_raise_format_error(special_image):
    for image, header in _fuzz_images(special_image):
        for cut in list(range(0, len(image), 61)) + [len(image) - 1]:
            try:
                read_image(image[:cut], composefs_header=header)
            except FormatError:
                pass


def test_random_corruptions_raise_only_format_error(special_image):
    rng = random.Random(20240611)
    outcomes = {"ok": 0, "error": 0}
    for image, header in _fuzz_images(special_image):
        for _ in range(1500):
            data = bytearray(image)
            for _ in range(rng.choice((1, 1, 2, 8))):
                pos = rng.randrange(1024, len(data))
                data[pos] = rng.randrange(256) if rng.random() < 0.5 else data[pos] ^ (1 << rng.randrange(8))
            # Every fourth attempt reads from an mmap, which must stay closable afterwards.
            source = mmap.mmap(-1, len(data)) if sum(outcomes.values()) % 4 == 0 else bytes(data)
            if isinstance(source, mmap.mmap):
                source.write(data)
            try:
                root = read_image(source, composefs_header=header).root
                format_dump(root, io.BytesIO())
                b"".join(ls_lines(root))
                outcomes["ok"] += 1
            except FormatError as err:
                assert str(err)
                outcomes["error"] += 1
            finally:
                if isinstance(source, mmap.mmap):
                    source.close()
    assert outcomes["ok"] and outcomes["error"]


# -- load_image and the CLI ---------------------------------------------------------------------

def test_load_image_mmap_and_errors(special_image, tmp_path):
    path = tmp_path / "img.cfs"
    path.write_bytes(special_image)
    assert dump_of(special_image) == b"".join(dump_lines(load_image(path).root))
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(FormatError, match=r"empty: image too small"):
        load_image(tmp_path / "empty")
    (tmp_path / "bad").write_bytes(_corrupt(special_image, 0, b"X"))
    with pytest.raises(FormatError, match=r"bad: not a composefs image"):
        load_image(tmp_path / "bad")


def test_cli_dump_ls_objects(tmp_path):
    digest = "ab" * 32
    img = build(tree(
        "/ 0 40755 2 0 0 0 1.0 - - -",
        "/a 10 100644 1 0 0 0 1.0 xx/one - -",
        f"/b 10 100644 1 0 0 0 1.0 yy/two - {digest}",
        "/c 10 100644 1 0 0 0 1.0 xx/one - -",
        "/d 0 40755 2 0 0 0 1.0 - - -",
        "/d/e\\x20f 2 100644 1 0 0 0 1.0 - hi -",
    ))
    path = tmp_path / "img.cfs"
    path.write_bytes(img)
    res = run_cli("composefs-info", "dump", str(path))
    assert res.returncode == 0 and res.stdout == dump_of(img)
    res = run_cli("composefs-info", "ls", str(path))
    assert res.stdout.decode().splitlines() == ["/a\t@ xx/one", "/b\t@ yy/two", "/c\t@ xx/one", "/d/\t", "/d/e f"]
    res = run_cli("composefs-info", "objects", str(path), str(path))
    assert res.stdout == b"xx/one\nyy/two\n"
    store = tmp_path / "store"
    (store / "xx").mkdir(parents=True)
    (store / "xx" / "one").write_bytes(b"")
    res = run_cli("composefs-info", f"--basedir={store}", "missing-objects", str(path))
    assert res.returncode == 0 and res.stdout == b"yy/two\n"
    res = run_cli("composefs-info", "--filter=d", "dump", str(path))
    assert [line.split(b" ")[0] for line in res.stdout.splitlines()] == [b"/", b"/d", b"/d/e\\x20f"]


def test_cli_errors(tmp_path, special_image):
    bad = tmp_path / "bad.cfs"
    bad.write_bytes(_corrupt(special_image, 1024, b"\0"))
    res = run_cli("composefs-info", "dump", str(bad))
    assert res.returncode == 1 and b"bad.cfs" in res.stderr and b"Traceback" not in res.stderr
    res = run_cli("composefs-info", "dump", str(tmp_path / "missing.cfs"))
    assert res.returncode == 1 and b"missing.cfs" in res.stderr and b"Traceback" not in res.stderr
    res = run_cli("composefs-info", "missing-objects", str(bad))
    assert res.returncode == 1 and b"--basedir" in res.stderr
    res = run_cli("composefs-info", "--filter=a/b", "ls", str(bad))
    assert res.returncode == 1 and b"single name" in res.stderr


def test_cli_measure_file(tmp_path):
    (tmp_path / "hello").write_bytes(b"hello world\n")
    res = run_cli("composefs-info", "measure-file", str(tmp_path / "hello"), str(tmp_path / "hello"))
    want = "37061ef2ac4c21bec68489b56138c5780306a4ad7fe6676236ecdf2c9027cd92"
    assert res.returncode == 0 and res.stdout.decode().split() == [want, want]
    res = run_cli("composefs-info", "measure-file", str(tmp_path / "hello"), str(tmp_path / "nope"))
    assert res.returncode == 1 and res.stdout.decode().split() == [want] and b"nope" in res.stderr


def test_nid_wrapping_below_the_image_is_refused(reference, tmp_path):
    """nid 2^64 - 1: (nid << 5) wraps to 32 bytes *before* the image, which the reference reads
    (its check is only against the end); bootimg refuses, and the reference faults when the
    image starts on a page boundary (guardmap's GUARDMAP_ALIGN=start)."""
    import os
    import subprocess

    img = build(tree("/ 0 40755 2 0 0 0 1.0 - - -", "/d 0 40755 2 0 0 0 1.0 - - -"))
    d_record = next(off for off, name, _ in _root_dirents(img) if name == b"d")
    bad = _corrupt(img, d_record, struct.pack("<Q", (1 << 64) - 1))
    with pytest.raises(FormatError, match="lies past the end"):
        read_image(bad)
    path = tmp_path / "img.cfs"
    path.write_bytes(bad)
    env = dict(os.environ, LD_PRELOAD=str(reference.guardmap), GUARDMAP_ALIGN="start")
    res = subprocess.run([str(reference.composefs_info), "dump", str(path)], capture_output=True, env=env)
    assert res.returncode < 0


def test_filter_on_a_symlink_root_is_refused(special_image, reference, tmp_path):
    """--filter reaching a symlink (or inline file) root: the reference's assert(filter == NULL)
    aborts it; bootimg refuses. Without a filter both read it."""
    bad = _corrupt(special_image, 36 * 32 + 4, struct.pack("<H", stat.S_IFLNK | 0o777))
    with pytest.raises(FormatError):
        read_image(bad, filters=[b"inline"])
    path = tmp_path / "img.cfs"
    path.write_bytes(bad)
    assert composefs_info(reference, "--filter=inline", "dump", str(path)).returncode < 0
    _like_reference(reference, tmp_path, bad)
