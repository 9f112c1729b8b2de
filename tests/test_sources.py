"""Sources: directories, tar archives (plain, gzip, zstd) and OCI image layouts into trees.

* A directory and tars of it (made by GNU tar) give byte-identical images.
* An OCI layout with whiteouts and an opaque directory, built here from tarfile + hashlib +
  json, mounted (EROFS + overlayfs, as root) equals the tree GNU tar gives when it extracts the
  same layers with whiteouts applied by a tiny independent function.
* Hostile archives are refused with one line naming the archive and member, and nothing is
  written anywhere but objects in the store.
* Every OCI blob is checked (digest, size, presence, media type); refs and platforms.
* ObjectStore.add_stream: digest, idempotence, atomicity.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import tarfile
import threading
from pathlib import Path, PurePosixPath

import pytest
import zstandard
from conftest import composefs_mount, have, requires_root
from treegen import make_tree

from bootimg.composefs import fsverity
from bootimg.composefs.store import ObjectStore
from bootimg.composefs.tree import Node
from bootimg.composefs.writer import write_image
from bootimg.manifest.model import Source
from bootimg.sources import LoadedSource, SourceError, SourcePolicy, load_source
from bootimg.sources.directory import load_directory
from bootimg.sources.tar import load_tar
from bootimg.sources.treeops import add_file, exclude, tree_stats

MT = 1_700_000_000
OBJECT_RE = re.compile(r"[0-9a-f]{2}/[0-9a-f]{62}")


def quiet_store(root: Path) -> ObjectStore:
    return ObjectStore(root, fsync=False, on_notice=lambda msg: None)


def store_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


def assert_only_objects(root: Path) -> None:
    for rel in store_files(root):
        assert OBJECT_RE.fullmatch(rel), f"unexpected file in the store: {rel}"
    for p in root.iterdir():
        assert p.is_dir() and re.fullmatch(r"[0-9a-f]{2}", p.name), p


def snapshot(top: Path, skip: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        if Path(dirpath) == skip or skip in Path(dirpath).parents:
            continue
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            if Path(p) == skip:
                continue
            st = os.lstat(p)
            out[p] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


# -- building archives -----------------------------------------------------------------------------

def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", *, mode: int | None = None,
           uid: int = 0, gid: int = 0, mtime: int = MT, linkname: str = "", xattrs: dict | None = None,
           mtime_ns: str | None = None, pax: dict | None = None, dev: tuple[int, int] = (0, 0)):
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode if mode is not None else (0o755 if kind == tarfile.DIRTYPE else 0o644)
    ti.uid, ti.gid, ti.mtime = uid, gid, mtime
    ti.linkname = linkname
    ti.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    ti.devmajor, ti.devminor = dev
    headers = dict(pax or {})
    for k, v in (xattrs or {}).items():
        k = k.replace("%", "%25").replace("=", "%3D")            # as GNU tar writes names
        headers["SCHILY.xattr." + k] = v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v
    if mtime_ns is not None:
        headers["mtime"] = mtime_ns
    ti.pax_headers = headers
    return ti, data


def d(name, **kw):
    return member(name, tarfile.DIRTYPE, **kw)


def f(name, data=b"", **kw):
    return member(name, tarfile.REGTYPE, data, **kw)


def sym(name, target, **kw):
    return member(name, tarfile.SYMTYPE, linkname=target, mode=0o777, **kw)


def hard(name, target, **kw):
    return member(name, tarfile.LNKTYPE, linkname=target, **kw)


def tar_bytes(members, fmt=tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if data else None)
    return buf.getvalue()


def load_bytes(tmp_path: Path, data: bytes, name: str = "in.tar", **kw) -> LoadedSource:
    p = tmp_path / name
    p.write_bytes(data)
    return load_tar(p, quiet_store(tmp_path / "store"), **kw)


def rnd(n: int, seed: int) -> bytes:
    out = b""
    i = 0
    while len(out) < n:
        out += hashlib.sha256(b"%d-%d" % (seed, i)).digest()
        i += 1
    return out[:n]


# -- mounting ---------------------------------------------------------------------------------------

OVERLAY_KEYS = ("trusted.overlay.", "user.overlay.")


def describe(top: Path) -> tuple[dict[str, tuple], list[frozenset[str]]]:
    """Everything a tree's user sees: per path (type+mode, uid, gid, mtime ns, nlink for
    non-directories, xattrs, content or link target), and the hardlink groups."""
    out: dict[str, tuple] = {}
    inodes: dict[int, set[str]] = {}
    paths = [str(top)]
    for dirpath, dirnames, filenames in os.walk(top):
        paths += [os.path.join(dirpath, n) for n in dirnames + filenames]
    for p in paths:
        rel = os.path.relpath(p, top)
        st = os.lstat(p)
        xattrs = {k: os.getxattr(p, k, follow_symlinks=False) for k in os.listxattr(p, follow_symlinks=False)
                  if not k.startswith(OVERLAY_KEYS)}
        if stat.S_ISREG(st.st_mode):
            body = Path(p).read_bytes()
            inodes.setdefault(st.st_ino, set()).add(rel)
        elif stat.S_ISLNK(st.st_mode):
            body = os.readlink(p).encode()
        else:
            body = None
        nlink = None if stat.S_ISDIR(st.st_mode) else st.st_nlink
        out[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, nlink, xattrs, body)
    groups = sorted((frozenset(g) for g in inodes.values() if len(g) > 1), key=sorted)
    return out, groups


# =====================================================================================================
# ObjectStore.add_stream


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 100_000, (1 << 20) + 3])
def test_add_stream_digest_and_idempotence(tmp_path, size):
    st = quiet_store(tmp_path / "store")
    data = rnd(size, size)
    src = io.BytesIO(data + b"TRAILING")
    digest, created = st.add_stream_info(src, size)
    assert digest == fsverity.digest(data)
    assert created is True
    assert src.tell() == size                      # exactly size bytes, never more
    obj = Path(st.object_path(digest))
    assert obj.read_bytes() == data
    assert stat.S_IMODE(obj.stat().st_mode) == 0o644
    before = obj.stat()
    assert st.add_stream(io.BytesIO(data), size) == digest
    assert st.add_stream_info(io.BytesIO(data), size) == (digest, False)
    after = obj.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert_only_objects(tmp_path / "store")


class _Trickle:
    """Returns at most 1000 bytes per read (like a decompressor)."""

    def __init__(self, data):
        self.bio = io.BytesIO(data)

    def read(self, n=-1):
        return self.bio.read(min(n, 1000) if n >= 0 else 1000)


def test_add_stream_short_reads_and_short_stream(tmp_path):
    st = quiet_store(tmp_path / "store")
    data = rnd(70_000, 7)
    assert st.add_stream(_Trickle(data), len(data)) == fsverity.digest(data)
    with pytest.raises(EOFError, match="after 70000 of 70001 bytes"):
        st.add_stream(io.BytesIO(data), len(data) + 1)
    assert not st.has(fsverity.digest(data + b"x"))
    assert_only_objects(tmp_path / "store")


def test_add_stream_is_atomic(tmp_path):
    """A reader failing midway leaves no temp and no object; concurrent writers of the same
    content end with one complete object."""
    st = quiet_store(tmp_path / "store")

    class Boom:
        def __init__(self):
            self.n = 0

        def read(self, n):
            self.n += 1
            if self.n == 3:
                raise RuntimeError("reader failed")
            return b"x" * min(n, 5000)

    with pytest.raises(RuntimeError):
        st.add_stream(Boom(), 1 << 20)
    assert store_files(tmp_path / "store") == []

    data = rnd(300_000, 3)
    results, errors = [], []

    def worker():
        try:
            results.append(st.add_stream(_Trickle(data), len(data)))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert set(results) == {fsverity.digest(data)}
    assert store_files(tmp_path / "store") == [fsverity.object_name(fsverity.digest(data))]
    assert Path(st.object_path(results[0])).read_bytes() == data


# =====================================================================================================
# Directory == tar == tar.gz == tar.zst


@pytest.fixture(scope="module")
def plain_tree(tmp_path_factory):
    """treegen's tree without what tar cannot carry or a directory scan does not see:
    hardlinks (tested separately) and the socket."""
    top = make_tree(tmp_path_factory.mktemp("srcs") / "src")
    for rel in ("b c/hard1", "deep/hard2", "sock"):
        os.unlink(top / rel)
    return top


def gnu_tar_create(src: Path, out: Path) -> None:
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "--format=posix",
                    "-C", str(src), "-cf", str(out), "."], check=True)


def zstd_compress(src: Path, out: Path) -> None:
    if have("zstd"):
        subprocess.run(["zstd", "-q", "-f", str(src), "-o", str(out)], check=True)
    else:
        out.write_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(src.read_bytes()))


@pytest.mark.skipif(os.geteuid() != 0, reason="the tree has devices and foreign owners (root)")
def test_directory_and_tars_of_it_give_identical_images(plain_tree, tmp_path):
    store_dir = tmp_path / "store"
    dir_src = load_source(Source("directory", plain_tree), quiet_store(store_dir))
    image = write_image(dir_src.root)
    objects = store_files(store_dir)
    assert objects and dir_src.stats.objects_added == len(objects)

    t = tmp_path / "t.tar"
    gnu_tar_create(plain_tree, t)
    gz = tmp_path / "t.tgz"                       # names say nothing: magic bytes decide
    gz.write_bytes(gzip.compress(t.read_bytes()))
    zst = tmp_path / "t.archive"
    zstd_compress(t, zst)
    for archive in (t, gz, zst):
        other = tmp_path / f"store-{archive.name}"
        loaded = load_source(Source("tar", archive), quiet_store(other))
        assert write_image(loaded.root) == image, archive.name
        assert store_files(other) == objects
        assert loaded.stats.objects_added == len(objects)
        assert (loaded.stats.files, loaded.stats.bytes) == (dir_src.stats.files, dir_src.stats.bytes)
        assert loaded.oci_config is None
        # Loading again adds nothing.
        again = load_source(Source("tar", archive), quiet_store(other))
        assert again.stats.objects_added == 0


@pytest.mark.parametrize("inline_max", [0, 100])
def test_inline_max_is_the_same_rule_for_directories_and_tars(tmp_path, inline_max):
    src = tmp_path / "src"
    src.mkdir()
    for size in (0, 1, 64, 65, 100, 101, 5000):
        (src / f"f{size}").write_bytes(rnd(size, size))
    os.utime(src, ns=(MT * 10**9, MT * 10**9))
    t = tmp_path / "t.tar"
    gnu_tar_create(src, t)
    policy = SourcePolicy(inline_max=inline_max)
    a = load_directory(src, quiet_store(tmp_path / "s1"), policy)
    b = load_tar(t, quiet_store(tmp_path / "s2"), policy)
    assert write_image(a.root) == write_image(b.root)
    assert store_files(tmp_path / "s1") == store_files(tmp_path / "s2")
    inline = {n.name for n in b.root.walk() if n.content is not None}
    assert inline == {b"f%d" % s for s in (1, 64, 65, 100, 101) if s <= inline_max}


# =====================================================================================================
# Tar semantics


def test_tar_metadata_and_replacement_semantics(tmp_path):
    big = rnd(5000, 1)
    members = [
        d("."),                                        # root metadata
        f("keep/x", b"x"),                             # parents keep/ created implicitly
        d("dir", mode=0o700, uid=5, gid=6, xattrs={"user.a": "1"}),
        f("dir/child", b"c"),
        d("dir", mode=0o750, uid=7, gid=8, mtime=MT + 5, xattrs={"user.b": "2"}),  # dir over dir
        f("file", b"first"),
        f("file", big, mode=0o4755, uid=1000, gid=1000, mtime_ns="1700000001.123456789"),
        d("was-file"),
        f("was-dir/inner", b"i"),
        f("was-dir", b"now a file"),                   # replaces the directory and its subtree
        f("bin", b"\x00\xff", xattrs={"user.bin": bytes(range(256)), "trusted.k=ey": b"v"}),
        f("lib", b"l", pax={"LIBARCHIVE.xattr.user.caf%C3%A9": "AAEC"}),  # base64, no padding
        f("neg", b"n", mtime_ns="-1.5"),
        sym("link", "/etc/../outside/is/just/data"),
        member("fifo", tarfile.FIFOTYPE),
        member("null", tarfile.CHRTYPE, dev=(1, 3), mode=0o666),
        member("loop0", tarfile.BLKTYPE, dev=(7, 0), mode=0o660),
    ]
    root = load_bytes(tmp_path, tar_bytes(members)).root
    keep = root.lookup(b"keep")
    assert (keep.mode, keep.uid, keep.gid, keep.mtime_sec, keep.mtime_nsec) == (stat.S_IFDIR | 0o755, 0, 0, 0, 0)
    assert root.mode == stat.S_IFDIR | 0o755 and root.mtime_sec == MT
    dnode = root.lookup(b"dir")
    assert (dnode.mode, dnode.uid, dnode.gid, dnode.mtime_sec) == (stat.S_IFDIR | 0o750, 7, 8, MT + 5)
    assert dnode.xattrs == {b"user.b": b"2"}
    assert set(dnode.children) == {b"child"}
    fnode = root.lookup(b"file")
    assert fnode.mode == stat.S_IFREG | 0o4755 and (fnode.uid, fnode.gid) == (1000, 1000)
    assert (fnode.mtime_sec, fnode.mtime_nsec) == (1700000001, 123456789)
    assert fnode.size == 5000 and fnode.content is None and fnode.digest == fsverity.digest(big)
    assert fnode.payload == fsverity.object_name(fnode.digest).encode()
    assert root.lookup(b"was-dir").is_reg() and root.lookup(b"was-dir").content == b"now a file"
    assert root.lookup(b"bin").xattrs == {b"user.bin": bytes(range(256)), b"trusted.k=ey": b"v"}
    assert root.lookup(b"lib").xattrs == {"user.café".encode(): b"\x00\x01\x02"}
    neg = root.lookup(b"neg")
    assert (neg.mtime_sec, neg.mtime_nsec) == ((-2) % (1 << 64), 500_000_000)
    assert root.lookup(b"link").payload == b"/etc/../outside/is/just/data"
    assert stat.S_ISFIFO(root.lookup(b"fifo").mode)
    assert root.lookup(b"null").rdev == os.makedev(1, 3) and stat.S_ISCHR(root.lookup(b"null").mode)
    assert root.lookup(b"loop0").rdev == os.makedev(7, 0) and stat.S_ISBLK(root.lookup(b"loop0").mode)
    write_image(root)


@requires_root
def test_tar_hardlinks_mounted(tmp_path):
    """GNU tar's hardlinks become aliases (nlink = names); replacing the first name later keeps
    the other names on the old content, as extracting does."""
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    data = rnd(10_000, 2)
    (src / "a" / "one").write_bytes(data)
    os.link(src / "a" / "one", src / "two")
    os.link(src / "a" / "one", src / "three")
    (src / "small").write_bytes(b"tiny")
    os.link(src / "small", src / "a" / "small2")
    t = tmp_path / "h.tar"
    subprocess.run(["tar", "--sort=name", "--numeric-owner", "--format=posix", "-C", str(src), "-cf", str(t), "."],
                   check=True)   # ./a/one is the file, ./three and ./two link to it; ./small links to ./a/small2
    # Append a member replacing ./a/one (the name the others link to in the archive).
    src2 = tmp_path / "src2"
    (src2 / "a").mkdir(parents=True)
    (src2 / "a" / "one").write_bytes(b"replaced")
    subprocess.run(["tar", "--numeric-owner", "--format=posix", "-C", str(src2), "-rf", str(t), "./a/one"], check=True)
    store = tmp_path / "store"
    loaded = load_tar(t, quiet_store(store))
    nodes = {n.path(): n for n in loaded.root.walk()}
    heir = nodes[b"/three"]
    assert heir.link_to is None and heir.nlink == 2 and heir.digest == fsverity.digest(data)
    assert nodes[b"/two"].link_to is heir
    assert nodes[b"/a/one"].content == b"replaced" and nodes[b"/a/one"].nlink == 1
    assert nodes[b"/a/small2"].nlink == 2 and nodes[b"/small"].link_to is nodes[b"/a/small2"]
    image = tmp_path / "img"
    image.write_bytes(write_image(loaded.root))
    (tmp_path / "m").mkdir()
    with composefs_mount(image, store, tmp_path / "m") as mnt:
        s2, s3 = os.stat(mnt / "two"), os.stat(mnt / "three")
        assert s2.st_ino == s3.st_ino and s2.st_nlink == 2
        assert (mnt / "two").read_bytes() == data
        assert (mnt / "a" / "one").read_bytes() == b"replaced"
        assert os.stat(mnt / "a" / "small2").st_ino == os.stat(mnt / "small").st_ino


# =====================================================================================================
# OCI image layouts


def write_blob(layout: Path, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    p = layout / "blobs" / "sha256" / digest
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def compress(kind: str, data: bytes) -> tuple[bytes, str]:
    base = "application/vnd.oci.image.layer.v1.tar"
    if kind == "gzip":
        return gzip.compress(data, mtime=0), base + "+gzip"
    if kind == "zstd":
        return zstandard.ZstdCompressor(write_checksum=True).compress(data), base + "+zstd"
    return data, base


CONFIG_SECTION = {"Entrypoint": ["/usr/bin/tool"], "Cmd": ["--serve"], "Env": ["PATH=/usr/bin"],
                  "User": "1000:1000", "WorkingDir": "/var/lib/app"}


def make_image(layout: Path, layers: list[tuple[bytes, str]], *, config_section=None, arch="amd64",
               diff_ids=True) -> dict:
    """Write layers (tar bytes, compression) + config + manifest blobs; returns the manifest
    descriptor (for index.json)."""
    layer_descs, ids = [], []
    for tar_data, kind in layers:
        blob, media = compress(kind, tar_data)
        layer_descs.append({"mediaType": media, **write_blob(layout, blob)})
        ids.append("sha256:" + hashlib.sha256(tar_data).hexdigest())
    config = {"architecture": arch, "os": "linux", "config": config_section or CONFIG_SECTION,
              "rootfs": {"type": "layers", "diff_ids": ids if diff_ids else []}}
    cdesc = {"mediaType": "application/vnd.oci.image.config.v1+json",
             **write_blob(layout, json.dumps(config).encode())}
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": cdesc, "layers": layer_descs}
    return {"mediaType": "application/vnd.oci.image.manifest.v1+json",
            **write_blob(layout, json.dumps(manifest).encode())}


def write_index(layout: Path, manifests: list[dict]) -> None:
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": manifests}))


def tagged(desc: dict, ref: str) -> dict:
    return {**desc, "annotations": {"org.opencontainers.image.ref.name": ref}}


def whiteout_layers() -> list[tuple[bytes, str]]:
    """Three layers (gzip, zstd, plain): base files; whiteouts of a file and of a directory;
    an opaque directory with new contents, and a whiteout of a hardlink's first name. Every
    directory whose contents a layer changes is in that layer (as real layer diffs have it)."""
    tool = rnd(3000, 11)
    base = tar_bytes([
        d("./", mtime=MT),
        d("etc/"), f("etc/hostname", b"base\n"), f("etc/removed.conf", b"gone soon"),
        f("etc/big.conf", rnd(5000, 12), xattrs={"user.tag": b"\x00\xffbin"}),
        d("usr/"), d("usr/bin/"), f("usr/bin/tool", tool, mode=0o755),
        hard("usr/bin/tool-alias", "usr/bin/tool"), sym("usr/bin/sh", "tool"),
        f("usr/bin/su", b"#!/bin/false\n" * 10, mode=0o4755),
        d("usr/share/"), d("usr/share/doc/"), d("usr/share/doc/pkg/"),
        f("usr/share/doc/pkg/README", rnd(200, 13)), d("usr/share/doc/pkg/sub/"),
        f("usr/share/doc/pkg/sub/deep.txt", b"deep"),
        d("var/"), d("var/lib/"), d("var/lib/app/", uid=1000, gid=1000),
        f("var/lib/app/old.db", rnd(100, 14), uid=1000, gid=1000),
        d("var/lib/app/cache/"), f("var/lib/app/cache/x", b"x"),
        d("opt/"), f("opt/owned", b"mine", uid=1000, gid=2000, mtime_ns=f"{MT}.000000042"),
    ])
    second = tar_bytes([
        d("./", mtime=MT + 100),
        d("etc/", mtime=MT + 100),
        f("etc/.wh.removed.conf"),
        f("etc/hostname", b"changed\n", mtime=MT + 100),
        f("etc/newfile", b"same layer"), f("etc/.wh.newfile"),   # whiteouts hide lower layers only
        d("usr/", mtime=MT + 100), d("usr/share/", mtime=MT + 100), d("usr/share/doc/", mtime=MT + 100),
        f("usr/share/doc/.wh.pkg"),
        f("usr/share/doc/other.txt", rnd(80, 15)),
    ])
    third = tar_bytes([
        d("./", mtime=MT + 200),
        d("var/", mtime=MT + 200), d("var/lib/", mtime=MT + 200),
        d("var/lib/app/", mtime=MT + 200, uid=1000, gid=1000),
        f("var/lib/app/early.txt", b"before the marker"),
        f("var/lib/app/.wh..wh..opq"),
        f("var/lib/app/new.db", rnd(150, 16)),
        d("var/lib/app/cache/", mtime=MT + 200), f("var/lib/app/cache/y", b"y"),
        d("usr/", mtime=MT + 200), d("usr/bin/", mtime=MT + 200),
        f("usr/bin/.wh.tool"),
    ])
    return [(base, "gzip"), (second, "zstd"), (third, "tar")]


def reference_apply(layer: Path, root: Path) -> None:
    """Independent reference: whiteouts applied with rm before GNU tar extracts the layer
    (so they only hit lower layers), whiteout files excluded from the extraction."""
    names = subprocess.run(["tar", "-tf", str(layer)], check=True, capture_output=True, text=True).stdout.split("\n")
    for name in filter(None, names):
        p = PurePosixPath(name.rstrip("/"))
        if p.name == ".wh..wh..opq":
            for child in (root / p.parent).iterdir():
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        elif p.name.startswith(".wh."):
            victim = root / p.parent / p.name[4:]
            if victim.is_dir() and not victim.is_symlink():
                shutil.rmtree(victim)
            elif victim.exists() or victim.is_symlink():
                victim.unlink()
    subprocess.run(["tar", "-xf", str(layer), "--exclude=.wh.*", "--xattrs", "--xattrs-include=*",
                    "--numeric-owner", "-C", str(root)], check=True)


@requires_root
def test_oci_layout_with_whiteouts_mounts_as_expected(tmp_path):
    layout = tmp_path / "oci"
    layers = whiteout_layers()
    write_index(layout, [tagged(make_image(layout, layers), "latest")])
    store = tmp_path / "store"
    loaded = load_source(Source("oci", layout, "latest"), quiet_store(store), label="app")
    assert loaded.oci_config == CONFIG_SECTION
    assert not any(n.name.startswith(b".wh.") for n in loaded.root.walk())

    expected = tmp_path / "expected"
    expected.mkdir()
    for i, (data, kind) in enumerate(layers):
        blob = tmp_path / f"layer{i}"
        blob.write_bytes(compress(kind, data)[0])
        reference_apply(blob, expected)
    image = tmp_path / "image.cfs"
    image.write_bytes(write_image(loaded.root))
    (tmp_path / "m").mkdir()
    with composefs_mount(image, store, tmp_path / "m") as mnt:
        got, got_links = describe(mnt)
    want, want_links = describe(expected)
    assert sorted(got) == sorted(want)
    for rel in want:
        assert got[rel] == want[rel], rel
    assert got_links == want_links
    # What the layers did, spelt out:
    assert "etc/removed.conf" not in got and "usr/share/doc/pkg" not in got
    assert "etc/newfile" in got
    assert {p for p in got if p.startswith("var/lib/app/")} == {
        "var/lib/app/early.txt", "var/lib/app/new.db", "var/lib/app/cache", "var/lib/app/cache/y"}
    assert "usr/bin/tool" not in got and got["usr/bin/tool-alias"][6] == rnd(3000, 11)
    assert got["etc/hostname"][6] == b"changed\n"
    assert loaded.stats.objects_added == len(store_files(store))
    assert_only_objects(store)


def test_oci_ref_selection_nested_index_and_platforms(tmp_path):
    layout = tmp_path / "oci"
    one = make_image(layout, [(tar_bytes([f("which", b"one")]), "gzip")])
    amd = make_image(layout, [(tar_bytes([f("which", b"amd64")]), "tar")])
    arm = make_image(layout, [(tar_bytes([f("which", b"arm64")]), "tar")], arch="arm64")
    attestation = make_image(layout, [(tar_bytes([f("which", b"attestation")]), "tar")])
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
        {**arm, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        {**amd, "platform": {"os": "linux", "architecture": "amd64"}},
        {**attestation, "platform": {"os": "unknown", "architecture": "unknown"},
         "annotations": {"vnd.docker.reference.type": "attestation-manifest"}},
    ]}
    idesc = {"mediaType": "application/vnd.oci.image.index.v1+json", **write_blob(layout, json.dumps(index).encode())}
    write_index(layout, [tagged(one, "one"), tagged(idesc, "multi")])
    st = quiet_store(tmp_path / "store")

    def which(ref, **kw):
        return load_source(Source("oci", layout, ref), st, **kw).root.lookup(b"which").content

    assert which("one") == b"one"
    assert which(one["digest"]) == b"one"
    assert which("multi") == b"amd64"
    assert which("multi", platform="linux/arm64/v8") == b"arm64"
    with pytest.raises(SourceError, match=r"no manifest for platform linux/s390x .* available: linux/arm64/v8, linux/amd64"):
        which("multi", platform="linux/s390x")
    with pytest.raises(SourceError, match=r"ref 'nope' not found in index.json; available: 'one', 'multi'") as e:
        which("nope")
    assert str(layout) in str(e.value)
    with pytest.raises(SourceError, match=r"2 manifests and no ref was given; available: 'one', 'multi'"):
        which(None)
    with pytest.raises(SourceError, match=r"no manifest sha256:0+ in index.json"):
        which("sha256:" + "0" * 64)
    # The only manifest needs no ref.
    solo = tmp_path / "solo"
    write_index(solo, [make_image(solo, [(tar_bytes([f("x", b"solo")]), "zstd")])])
    assert load_source(Source("oci", solo), st).root.lookup(b"x").content == b"solo"


@pytest.fixture
def simple_layout(tmp_path):
    layout = tmp_path / "oci"
    layers = [(tar_bytes([f("a", rnd(1000, 1)), d("dir"), f("dir/b", b"b")]), "gzip"),
              (tar_bytes([f("dir/.wh.b"), f("c", b"c")]), "zstd")]
    mdesc = make_image(layout, layers)
    write_index(layout, [tagged(mdesc, "v1")])
    manifest = json.loads((layout / "blobs" / "sha256" / mdesc["digest"][7:]).read_bytes())
    return layout, mdesc, manifest


def rewrite_manifest(layout: Path, manifest: dict, ref: str = "v1") -> None:
    mdesc = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
             **write_blob(layout, json.dumps(manifest).encode())}
    write_index(layout, [tagged(mdesc, ref)])


def oci_error(layout: Path, tmp_path: Path, ref: str = "v1", **kw) -> str:
    store = tmp_path / "store"
    with pytest.raises(SourceError) as exc:
        load_source(Source("oci", layout, ref), quiet_store(store), **kw)
    msg = str(exc.value)
    assert "\n" not in msg and str(layout) in msg
    if store.exists():
        assert_only_objects(store)
    return msg


def test_oci_simple_layout_loads(simple_layout, tmp_path):
    layout, _, _ = simple_layout
    loaded = load_source(Source("oci", layout, "v1"), quiet_store(tmp_path / "store"), label="app")
    assert sorted(n.path() for n in loaded.root.walk()) == [b"/", b"/a", b"/c", b"/dir"]
    assert loaded.oci_config == CONFIG_SECTION
    assert loaded.stats.entries == 4 and loaded.stats.objects_added == 1


def test_oci_layer_content_not_matching_its_digest(simple_layout, tmp_path):
    layout, _, manifest = simple_layout
    layer = manifest["layers"][0]["digest"]
    blob = layout / "blobs" / "sha256" / layer[7:]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x55          # same size, wrong content (and likely bad gzip too)
    blob.write_bytes(bytes(data))
    msg = oci_error(layout, tmp_path)
    assert f"layer 1/2 {layer}: blob content does not match its digest" in msg
    assert "sha256:" + hashlib.sha256(bytes(data)).hexdigest() in msg


def test_oci_layer_valid_tar_but_wrong_digest(tmp_path):
    """A swapped layer that parses fine is still caught, at its end."""
    layout = tmp_path / "oci"
    mdesc = make_image(layout, [(tar_bytes([f("c", b"c")]), "tar")])
    write_index(layout, [tagged(mdesc, "v1")])
    manifest = json.loads((layout / "blobs" / "sha256" / mdesc["digest"][7:]).read_bytes())
    desc = manifest["layers"][0]
    other = tar_bytes([f("c", b"d")])
    assert len(other) == desc["size"]
    (layout / "blobs" / "sha256" / desc["digest"][7:]).write_bytes(other)
    assert "layer 1/1 " + desc["digest"] + ": blob content does not match its digest" in oci_error(layout, tmp_path)


def test_oci_config_and_manifest_digests_checked(simple_layout, tmp_path):
    layout, mdesc, manifest = simple_layout
    cblob = layout / "blobs" / "sha256" / manifest["config"]["digest"][7:]
    good = cblob.read_bytes()
    cblob.write_bytes(good.replace(b"1000:1000", b"0000:0000"))
    assert f"config {manifest['config']['digest']}: blob content does not match" in oci_error(layout, tmp_path)
    cblob.write_bytes(good)
    mblob = layout / "blobs" / "sha256" / mdesc["digest"][7:]
    mblob.write_bytes(mblob.read_bytes().replace(b'"schemaVersion": 2', b'"schemaVersion": 3'))
    assert f"manifest {mdesc['digest']}: blob content does not match" in oci_error(layout, tmp_path)


def test_oci_wrong_size_missing_blob_unknown_media_type(simple_layout, tmp_path):
    layout, _, manifest = simple_layout
    m = json.loads(json.dumps(manifest))
    m["layers"][1]["size"] += 1
    rewrite_manifest(layout, m)
    msg = oci_error(layout, tmp_path)
    assert f"layer 2/2 {m['layers'][1]['digest']}: blob is {m['layers'][1]['size'] - 1} bytes, " \
           f"its descriptor says {m['layers'][1]['size']}" in msg

    m = json.loads(json.dumps(manifest))
    m["layers"][0]["digest"] = "sha256:" + "ab" * 32
    rewrite_manifest(layout, m)
    assert f"layer 1/2 sha256:{'ab' * 32}: blob is missing (blobs/sha256/{'ab' * 32})" in oci_error(layout, tmp_path)

    m = json.loads(json.dumps(manifest))
    m["layers"][1]["mediaType"] = "application/vnd.oci.image.layer.v1.tar+bzip2"
    rewrite_manifest(layout, m)
    assert "unsupported layer media type 'application/vnd.oci.image.layer.v1.tar+bzip2'" in oci_error(layout, tmp_path)

    m = json.loads(json.dumps(manifest))
    m["layers"][1]["mediaType"] = "application/vnd.oci.image.layer.v1.tar+gzip"   # it is zstd
    rewrite_manifest(layout, m)
    assert "declared as gzip but the data is zstd" in oci_error(layout, tmp_path)

    m = json.loads(json.dumps(manifest))
    m["layers"][0]["digest"] = "sha512:" + "ab" * 64
    rewrite_manifest(layout, m)
    assert "unsupported digest algorithm 'sha512'" in oci_error(layout, tmp_path)

    m = json.loads(json.dumps(manifest))
    m["layers"][0]["digest"] = "sha256:../../../../etc/passwd"
    rewrite_manifest(layout, m)
    assert "invalid digest" in oci_error(layout, tmp_path)


def test_oci_diff_ids_and_layout_checks(tmp_path):
    layout = tmp_path / "oci"
    data = tar_bytes([f("a", b"a")])
    mdesc = make_image(layout, [(data, "gzip")])
    manifest = json.loads((layout / "blobs" / "sha256" / mdesc["digest"][7:]).read_bytes())
    config = json.loads((layout / "blobs" / "sha256" / manifest["config"]["digest"][7:]).read_bytes())
    config["rootfs"]["diff_ids"] = ["sha256:" + "0" * 64]
    manifest["config"] = {"mediaType": "application/vnd.oci.image.config.v1+json",
                          **write_blob(layout, json.dumps(config).encode())}
    rewrite_manifest(layout, manifest)
    assert "the config's diff_id is 'sha256:" + "0" * 64 in oci_error(layout, tmp_path)

    (layout / "oci-layout").unlink()
    assert "not an OCI image layout (no oci-layout file)" in oci_error(layout, tmp_path)


def test_oci_deep_json_and_fifos_are_one_line(simple_layout, tmp_path):
    """A deeply nested index.json or config (RecursionError in json), and FIFOs where the
    layout's files belong (a blocking open): one line each."""
    layout, mdesc, manifest = simple_layout
    index = layout / "index.json"
    good_index = index.read_bytes()
    index.write_text("[" * 100000 + "]" * 100000)
    assert "index.json is not valid JSON (nested too deeply)" in oci_error(layout, tmp_path)
    index.write_bytes(good_index)
    m = json.loads(json.dumps(manifest))
    m["config"] = {"mediaType": "application/vnd.oci.image.config.v1+json",
                   **write_blob(layout, b'{"config": ' + b"[" * 100000 + b"]" * 100000 + b"}")}
    rewrite_manifest(layout, m)
    assert "config is not valid JSON (nested too deeply)" in oci_error(layout, tmp_path)
    rewrite_manifest(layout, manifest)

    def alarm(signum, frame):
        raise TimeoutError("hangs on a FIFO")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(20)
    try:
        layer = layout / "blobs" / "sha256" / manifest["layers"][0]["digest"][7:]
        data = layer.read_bytes()
        layer.unlink()
        os.mkfifo(layer)
        assert "blob is not a regular file" in oci_error(layout, tmp_path)
        layer.unlink()
        layer.write_bytes(data)
        (layout / "oci-layout").unlink()
        os.mkfifo(layout / "oci-layout")
        assert "oci-layout is not a regular file" in oci_error(layout, tmp_path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_oci_devices_refused_for_containers(tmp_path):
    layout = tmp_path / "oci"
    layer = tar_bytes([d("dev"), member("dev/null", tarfile.CHRTYPE, dev=(1, 3))])
    write_index(layout, [tagged(make_image(layout, [(layer, "tar")]), "v1")])
    msg = oci_error(layout, tmp_path, label="app")
    assert msg.startswith(f"app: {layout}: layer 1/1 sha256:")
    assert msg.endswith("member 'dev/null': character device not allowed in this source (policy allow_devices)")
    root = load_source(Source("oci", layout, "v1"), quiet_store(tmp_path / "s2"), label="app",
                       policy=SourcePolicy(allow_devices=True)).root
    assert root.lookup(b"dev/null").rdev == os.makedev(1, 3)


def oci_archive(layout: Path, out: Path, *, prefix: str = "", extra: list[tarfile.TarInfo] = ()) -> Path:
    """``layout`` as an OCI archive: the layout's files in a plain tar (what ``skopeo copy
    oci-archive:`` writes), names optionally under ``prefix`` ('./')."""
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(layout.rglob("*")):
            tar.add(path, arcname=prefix + path.relative_to(layout).as_posix(), recursive=False)
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isreg() else None)
    return out


@pytest.mark.parametrize("prefix", ["", "./"])
def test_oci_archive_loads_as_its_layout(tmp_path, prefix):
    layout = tmp_path / "oci"
    write_index(layout, [tagged(make_image(layout, whiteout_layers()), "latest")])
    archive = oci_archive(layout, tmp_path / "image.tar", prefix=prefix)
    st = quiet_store(tmp_path / "store")
    from_dir = load_source(Source("oci", layout, "latest"), st, label="app")
    from_tar = load_source(Source("oci", archive, "latest"), st, label="app")
    assert from_tar.oci_config == from_dir.oci_config == CONFIG_SECTION
    assert write_image(from_tar.root) == write_image(from_dir.root)


def test_oci_archive_refusals(simple_layout, tmp_path):
    layout, _, manifest = simple_layout
    layer = manifest["layers"][0]["digest"][7:]

    def refused(archive: Path) -> str:
        return oci_error(archive, tmp_path)

    gz = tmp_path / "image.tar.gz"
    gz.write_bytes(gzip.compress(oci_archive(layout, tmp_path / "plain.tar").read_bytes(), mtime=0))
    assert "not an OCI image layout, nor an OCI archive (an uncompressed tar of one)" in refused(gz)
    twice = tarfile.TarInfo("./index.json")
    twice.size = 1
    assert "archive member 'index.json' appears more than once" in refused(oci_archive(layout, tmp_path / "2.tar",
                                                                                       extra=[twice]))
    # A blob that is a symlink in the archive is not read through.
    moved = tmp_path / "moved"
    shutil.copytree(layout, moved)
    blob = moved / "blobs" / "sha256" / layer
    blob.unlink()
    blob.symlink_to("/etc/passwd")
    assert f"layer 1/2 sha256:{layer}: blob is not a regular file" in \
        refused(oci_archive(moved, tmp_path / "3.tar"))
    blob.unlink()
    assert f"blob is missing (blobs/sha256/{layer})" in refused(oci_archive(moved, tmp_path / "4.tar"))
    (moved / "oci-layout").unlink()
    assert "not an OCI image layout (no oci-layout file)" in refused(oci_archive(moved, tmp_path / "5.tar"))


# =====================================================================================================
# Hostile tar archives


def _huge_header(fmt) -> bytes:
    ti = tarfile.TarInfo("huge")
    ti.size = 2 << 40                      # 2 TiB, declared only
    return ti.tobuf(format=fmt) + b"\0" * 4096


def _truncated_mid_member() -> bytes:
    return tar_bytes([f("ok", b"fine"), f("big", rnd(20_000, 5))])[:5000]


def _truncated_at_header() -> bytes:
    data = tar_bytes([f("ok", b"fine"), f("second", b"2")], fmt=tarfile.USTAR_FORMAT)
    return data[:1024]                     # header + data of 'ok', no end-of-archive block


def _corrupt_gzip() -> bytes:
    data = bytearray(gzip.compress(tar_bytes([f("x", rnd(50_000, 6))]), mtime=0))
    for i in range(200, 260):
        data[i] ^= 0xA5
    return bytes(data)


def _truncated_zstd() -> bytes:
    return zstandard.ZstdCompressor().compress(tar_bytes([f("x", rnd(50_000, 6))]))[:-100]


def _corrupt_zstd() -> bytes:
    data = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(tar_bytes([f("x", rnd(50_000, 6))])))
    data[len(data) // 2] ^= 0xFF
    return bytes(data)


def _nul_name() -> bytes:
    return tar_bytes([f("a", b"x", pax={"path": "evil\x00name"})])


def _big_pax() -> bytes:
    return tar_bytes([f("a", b"x", pax={"comment": "c" * (2 << 20)})])


HOSTILE = {
    "absolute": (lambda: tar_bytes([f("/etc/passwd", b"root::0:0::/:/bin/sh\n")]), {},
                 "member '/etc/passwd': absolute path"),
    "dotdot": (lambda: tar_bytes([f("../escape", b"x")]), {}, "member '../escape': path contains '..'"),
    "dotdot-deep": (lambda: tar_bytes([d("a"), f("a/../../x", b"x")]), {}, "member 'a/../../x': path contains '..'"),
    "dot-dotdot": (lambda: tar_bytes([f("./../x", b"x")]), {}, "member './../x': path contains '..'"),
    "empty-name": (lambda: tar_bytes([f("", b"x")]), {}, "member '': empty path"),
    "nul-in-name": (_nul_name, {}, "member 'evil\\x00name': path contains a NUL byte"),
    "long-component": (lambda: tar_bytes([f("d/" + "n" * 256, b"x")]), {}, "has a component longer than 255 bytes"),
    "long-path": (lambda: tar_bytes([f("/".join(["d" * 200] * 21), b"x")]), {}, "path longer than 4096 bytes"),
    "through-symlink": (lambda: tar_bytes([sym("a", "{outside}"), f("a/file", b"pwned")]), {},
                        "member 'a/file': parent 'a' is a symlink (to '{outside}'); refusing to write through it"),
    "through-file": (lambda: tar_bytes([f("a", b"file"), f("a/b", b"x")]), {},
                     "member 'a/b': parent 'a' is not a directory"),
    "hardlink-escape": (lambda: tar_bytes([hard("pw", "../../etc/passwd")]), {},
                        "member 'pw': hardlink target '../../etc/passwd' contains '..'"),
    "hardlink-absolute": (lambda: tar_bytes([hard("pw", "/etc/passwd")]), {},
                          "member 'pw': absolute hardlink target '/etc/passwd'"),
    "hardlink-missing": (lambda: tar_bytes([hard("x", "nowhere")]), {},
                         "member 'x': hardlink target 'nowhere' not found (it must be an earlier member)"),
    "hardlink-dir": (lambda: tar_bytes([d("dir"), hard("x", "dir")]), {},
                     "member 'x': hardlink target 'dir' is a directory"),
    "hardlink-via-symlink": (lambda: tar_bytes([sym("s", "/etc"), hard("x", "s/passwd")]), {},
                             "hardlink target 's/passwd' is below a symlink or non-directory"),
    "chardev-container": (lambda: tar_bytes([member("null", tarfile.CHRTYPE, dev=(1, 3))]), {"label": "app"},
                          "member 'null': character device not allowed in this source (policy allow_devices)"),
    "fifo-container": (lambda: tar_bytes([member("p", tarfile.FIFOTYPE)]), {"label": "app"},
                       "member 'p': FIFO not allowed"),
    "huge-gnu": (lambda: _huge_header(tarfile.GNU_FORMAT), {},
                 "member 'huge': file of 2199023255552 bytes exceeds the limit of 17179869184 (policy max_file_size)"),
    "huge-pax": (lambda: _huge_header(tarfile.PAX_FORMAT), {}, "member 'huge': file of 2199023255552 bytes exceeds"),
    "too-many-entries": (lambda: tar_bytes([f(f"f{i}", b"") for i in range(50)]),
                         {"policy": SourcePolicy(max_entries=20)}, "member 'f20': more than 20 entries (policy max_entries)"),
    "implicit-dirs-count": (lambda: tar_bytes([f("/".join("abcdefghijklmnopqrstuvwxyz"), b"")]),
                            {"policy": SourcePolicy(max_entries=20)}, "more than 20 entries"),
    "total-size": (lambda: tar_bytes([f(f"f{i}", rnd(1000, i)) for i in range(5)]),
                   {"policy": SourcePolicy(max_total_size=3500)}, "member 'f3': more than 3500 bytes of file data"),
    "file-size": (lambda: tar_bytes([f("big", rnd(2000, 1))]), {"policy": SourcePolicy(max_file_size=1999)},
                  "member 'big': file of 2000 bytes exceeds the limit of 1999"),
    "truncated-data": (_truncated_mid_member, {}, "member 'big': truncated archive"),
    "truncated-header": (_truncated_at_header, {},
                         "the archive ends without an end-of-archive block (truncated?) (after member 'ok')"),
    "corrupt-gzip": (_corrupt_gzip, {}, "corrupt gzip data"),
    "truncated-gzip": (lambda: gzip.compress(tar_bytes([f("x", rnd(50_000, 6))]))[:-20], {}, "truncated archive"),
    "truncated-zstd": (_truncated_zstd, {}, "zstd data ends inside a frame (truncated)"),
    "corrupt-zstd": (_corrupt_zstd, {}, "corrupt zstd data"),
    "xz": (lambda: b"\xfd7zXZ\x00" + b"\0" * 100, {}, "xz-compressed archives are not supported"),
    "not-a-tar": (lambda: b"hello world\n" * 100, {}, "invalid tar archive"),
    "empty-file": (lambda: b"", {}, "invalid tar archive (empty file)"),
    "pax-too-big": (_big_pax, {}, "bytes (limit 1048576)"),
    "sparse": (lambda: tar_bytes([f("s", b"x", pax={"GNU.sparse.major": "1", "GNU.sparse.minor": "0"})]), {},
               "member 's': sparse files are not supported"),
    "sparse-old-gnu": (lambda: tar_bytes([member("s", tarfile.GNUTYPE_SPARSE, b"")], fmt=tarfile.GNU_FORMAT), {},
                       "member 's': sparse files are not supported"),
    "volume-label": (lambda: tar_bytes([member("label", b"V")]), {}, "member 'label': unsupported member type 'V'"),
    "root-not-dir": (lambda: tar_bytes([f("./", b"")]), {}, "the archive root must be a directory"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tar_is_refused(tmp_path, case):
    make, kw, expected = HOSTILE[case]
    outside = tmp_path / "outside"                 # the canary: must stay as it is
    outside.mkdir()
    (outside / "canary").write_text("untouched")
    expected = expected.replace("{outside}", str(outside))
    data = make()
    if case == "through-symlink":
        data = tar_bytes([sym("a", str(outside)), f("a/file", b"pwned")])
    archive = tmp_path / "hostile.tar"
    archive.write_bytes(data)
    store_dir = tmp_path / "store"
    store = quiet_store(store_dir)
    before = snapshot(tmp_path, store_dir)
    with pytest.raises(SourceError) as exc:
        load_tar(archive, store, **kw)
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(f"{kw.get('label', 'rootfs')}: {archive}: "), msg
    assert expected in msg, msg
    assert snapshot(tmp_path, store_dir) == before
    assert os.listdir(outside) == ["canary"] and (outside / "canary").read_text() == "untouched"
    assert_only_objects(store_dir)
    assert not any(n.startswith(".tmp") for n in os.listdir(store_dir))


def test_devices_allowed_in_rootfs_and_whiteout_devices(tmp_path):
    data = tar_bytes([member("null", tarfile.CHRTYPE, dev=(1, 3)), member("wh", tarfile.CHRTYPE, dev=(0, 0))])
    root = load_bytes(tmp_path, data).root                    # label "rootfs": allowed
    assert root.lookup(b"null").rdev == os.makedev(1, 3) and root.lookup(b"wh").is_whiteout()
    with pytest.raises(SourceError, match="device number 4096:0 out of range"):
        load_bytes(tmp_path, tar_bytes([member("x", tarfile.CHRTYPE, dev=(4096, 0))]))


def test_directory_source_policy(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    os.mkfifo(src / "fifo")
    (src / "big").write_bytes(rnd(3000, 1))
    with pytest.raises(SourceError, match=r"^app: .*/src/fifo: FIFO not allowed in this source"):
        load_directory(src, quiet_store(tmp_path / "s"), label="app")
    assert load_directory(src, quiet_store(tmp_path / "s")).root.lookup(b"fifo") is not None
    with pytest.raises(SourceError, match=r"src/big: file of 3000 bytes exceeds the limit of 100"):
        load_directory(src, quiet_store(tmp_path / "s"), SourcePolicy(max_file_size=100))
    with pytest.raises(SourceError, match=r"cannot read source directory"):
        load_directory(tmp_path / "missing", quiet_store(tmp_path / "s"))


# =====================================================================================================
# Tree operations


def _tree(tmp_path: Path) -> tuple[Node, ObjectStore]:
    st = quiet_store(tmp_path / "store")
    members = [d("var"), d("var/cache"), d("var/cache/apt"), f("var/cache/apt/pkg", rnd(100, 1)),
               f("var/cache/top", b"t"), d("usr"), d("usr/share"), d("usr/share/doc"),
               d("usr/share/doc/a"), f("usr/share/doc/a/README", b"r"), f("usr/share/doc/COPYING", b"c"),
               d("usr/lib"), f("usr/lib/m.pyc", b"p"), d("usr/lib/py"), f("usr/lib/py/n.pyc", b"p"),
               f("usr/lib/keep.py", rnd(500, 2)), hard("usr/lib/alias", "usr/share/doc/COPYING")]
    p = tmp_path / "t.tar"
    p.write_bytes(tar_bytes(members))
    return load_tar(p, st).root, st


def paths(root: Node) -> set[bytes]:
    return {n.path() for n in root.walk()}


def test_exclude_globs(tmp_path):
    root, _ = _tree(tmp_path)
    removed = exclude(root, ["/var/cache/**", "/usr/share/doc/*", "/**/*.pyc"])
    assert removed == 8
    assert paths(root) == {b"/", b"/var", b"/var/cache", b"/usr", b"/usr/share", b"/usr/share/doc",
                           b"/usr/lib", b"/usr/lib/py", b"/usr/lib/keep.py", b"/usr/lib/alias"}
    alias = root.lookup(b"usr/lib/alias")          # its first name was excluded: it takes over
    assert alias.link_to is None and alias.content == b"c" and alias.nlink == 1
    write_image(root)
    root, _ = _tree(tmp_path)
    assert exclude(root, ["/usr"]) == 12 and paths(root) == {b"/", b"/var", b"/var/cache", b"/var/cache/apt",
                                                             b"/var/cache/apt/pkg", b"/var/cache/top"}
    root, _ = _tree(tmp_path)
    exclude(root, ["/var/cache/ap?/p[a-k]g", "/usr/**/README"])
    assert b"/var/cache/apt/pkg" not in paths(root) and b"/usr/share/doc/a/README" not in paths(root)
    assert b"/usr/share/doc/a" in paths(root)
    with pytest.raises(Exception, match="not absolute"):
        exclude(root, ["var/cache"])


def test_add_file_and_stats(tmp_path):
    root, st = _tree(tmp_path)
    small = add_file(root, "/etc/hostname", b"car\n", 0o644, mtime=MT, store=st)
    assert small.content == b"car\n" and root.lookup(b"etc").mode == stat.S_IFDIR | 0o755
    assert root.lookup(b"etc").mtime_sec == MT
    big = add_file(root, "/etc/big", rnd(100, 9), 0o600, uid=5, gid=6, mtime=MT, store=st)
    assert big.content is None and st.has(big.digest) and big.mode == stat.S_IFREG | 0o600
    # Replacing the target of a hardlink leaves the alias on the old content.
    add_file(root, "/usr/share/doc/COPYING", b"new", store=st)
    assert root.lookup(b"usr/lib/alias").link_to is None and root.lookup(b"usr/lib/alias").content == b"c"
    with pytest.raises(Exception, match="is a directory"):
        add_file(root, "/usr/lib", b"x", store=st)
    s = tree_stats(root)
    assert (s.entries, s.dirs, s.files, s.hardlinks) == (len(paths(root)), 11, 10, 0)
    assert s.external == 3 and s.objects == 3
    write_image(root)
