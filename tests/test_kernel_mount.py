"""The real kernel reads our images: EROFS loop mount + overlayfs with the object store as a
data-only lower layer, compared file by file with the source; fsck.erofs accepts them; with
verity=require an object without fs-verity reads as EIO (this host has no fs-verity; the
full enforcement is proven in the QEMU board tests)."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import composefs_mount, have, requires_root, run_cli
from treegen import make_tree

pytestmark = [pytest.mark.kernel, requires_root]

OVERLAY_KEYS = ("trusted.overlay.", "user.overlay.")


def _xattrs(path: str) -> dict[str, bytes]:
    return {k: os.getxattr(path, k, follow_symlinks=False) for k in os.listxattr(path, follow_symlinks=False)}


def _walk(top: str):
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            yield os.path.relpath(full, top), full


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("kmount")
    src = make_tree(base / "src")
    store = base / "store"
    image = base / "img.cfs"
    res = run_cli("mkcomposefs", f"--digest-store={store}", str(src), str(image))
    assert res.returncode == 0, res.stderr.decode()
    return src, store, image


def test_mounted_tree_equals_source(built, tmp_path):
    src, store, image = built
    with composefs_mount(image, store, tmp_path) as mnt:
        source = dict(_walk(str(src)))
        mounted = dict(_walk(str(mnt)))
        assert sorted(source) == sorted(mounted)
        checked = {"reg": 0, "ext": 0, "lnk": 0, "dev": 0, "whiteout": 0}
        for rel, spath in source.items():
            mpath = mounted[rel]
            s, m = os.lstat(spath), os.lstat(mpath)
            sx = {k: v for k, v in _xattrs(spath).items() if not k.startswith(OVERLAY_KEYS)}
            mx = _xattrs(mpath)
            if stat.S_ISCHR(s.st_mode) and s.st_rdev == 0:
                # A whiteout in the source is served as an overlay whiteout marker file, so the
                # mount can itself be a lower layer (composefs-format.md 3.9).
                assert stat.S_ISREG(m.st_mode) and m.st_size == 0
                assert "trusted.overlay.whiteout" in mx
                checked["whiteout"] += 1
                continue
            assert m.st_mode == s.st_mode, rel
            assert (m.st_uid, m.st_gid) == (s.st_uid, s.st_gid), rel
            assert m.st_mtime_ns == s.st_mtime_ns, rel
            assert {k: v for k, v in mx.items() if not k.startswith(OVERLAY_KEYS)} == sx, rel
            if stat.S_ISREG(s.st_mode):
                assert m.st_size == s.st_size, rel
                with open(spath, "rb") as a, open(mpath, "rb") as b:
                    assert a.read() == b.read(), rel
                checked["ext" if s.st_size > 64 else "reg"] += 1
            elif stat.S_ISLNK(s.st_mode):
                assert os.readlink(mpath) == os.readlink(spath)
                checked["lnk"] += 1
            elif stat.S_ISCHR(s.st_mode) or stat.S_ISBLK(s.st_mode):
                assert m.st_rdev == s.st_rdev
                checked["dev"] += 1
        assert all(checked.values()), checked
        # The root whiteout stubs 00..ff are hidden from the mount.
        assert not any(len(n) == 2 and all(c in "0123456789abcdef" for c in n) for n in os.listdir(mnt))


def test_fsck_erofs_accepts_image(built):
    if not have("fsck.erofs"):
        pytest.skip("erofs-utils not installed")
    res = subprocess.run(["fsck.erofs", str(built[2])], capture_output=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_verity_require_refuses_objects_without_fsverity(built, tmp_path):
    """No fs-verity on this host's store: every external file must fail with EIO, inline
    files still read. (Bypassing verity here would be the bug.)"""
    src, store, image = built
    with composefs_mount(image, store, tmp_path, verity=True) as mnt:
        external = inline = 0
        for rel, spath in _walk(str(src)):
            st = os.lstat(spath)
            if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
                continue
            mpath = os.path.join(mnt, rel)
            if st.st_size > 64:
                with pytest.raises(OSError) as exc:
                    with open(mpath, "rb") as f:
                        f.read()
                assert exc.value.errno == errno.EIO
                external += 1
            else:
                with open(mpath, "rb") as f:
                    assert f.read() == Path(spath).read_bytes()
                inline += 1
        assert external and inline


def test_tampered_object_is_served_without_verity_but_not_with(built, tmp_path):
    """Why verity matters: without it a modified object is served silently."""
    src, store, image = built
    tampered = tmp_path / "store"
    subprocess.run(["cp", "-a", str(store), str(tampered)], check=True)
    obj = next(p for p in tampered.rglob("*") if p.is_file())
    data = bytearray(obj.read_bytes())
    data[0] ^= 0xFF
    obj.write_bytes(bytes(data))
    (tmp_path / "plain").mkdir()
    with composefs_mount(image, tampered, tmp_path / "plain") as mnt:
        served = [p for rel, p in _walk(str(mnt)) if os.path.isfile(p) and not os.path.islink(p)
                  and os.path.getsize(p) == len(data) and Path(p).read_bytes() == bytes(data)]
        assert served, "the tampered content is served when verity is off"
    (tmp_path / "verity").mkdir()
    with composefs_mount(image, tampered, tmp_path / "verity", verity=True) as mnt:
        for p in served:
            rel = os.path.relpath(p, tmp_path / "plain" / "mnt")
            with pytest.raises(OSError):
                Path(mnt, rel).read_bytes()
