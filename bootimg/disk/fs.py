"""Filesystem images made from a file list, without root and without loop devices.

- ext4: ``mke2fs -d ARCHIVE.tar`` (e2fsprogs >= 1.47.1 reads a tar: owners, modes and xattrs
  come from the archive, so no privilege is needed to give files to root); the ``verity``
  feature is on, so fs-verity can be enabled on the target.
- FAT (the ESP): ``mkfs.vfat -C`` then ``mcopy`` (mtools).

Both are reproducible: UUIDs and volume ids derive from a seed, times from SOURCE_DATE_EPOCH
(e2fsprogs 1.47.0 copies the build host's change times instead; hence the version check).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import stat
import subprocess
import tarfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..host import SETUP_HINT, HostError, need_tools, run

MiB = 1 << 20
# Names under which UUIDs and ids derive from a seed (uuid5), so the same inputs give the same disk.
NAMESPACE = uuid.UUID("2c1bfa3e-51f4-4d8e-9c8b-6a3d0e1f2b47")
MIN_E2FSPROGS = (1, 47, 1)


def seeded_uuid(seed: str) -> str:
    return str(uuid.uuid5(NAMESPACE, seed))


@dataclass
class Entry:
    """One file-system entry to put into an image: a directory, a regular file (from a host
    path or bytes), a symlink or a device node, with owner, mode, mtime and xattrs."""

    path: str                        # relative, '/'-separated, no leading '/'
    kind: str                        # "dir" | "file" | "symlink" | "hardlink" | "chr" | "blk" | "fifo"
    mode: int = 0o644                # permission bits (with setuid/setgid/sticky)
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    source: Path | None = None       # a regular file's content on the host
    data: bytes | None = None        # or its content in memory
    target: str = ""                 # a symlink's target, or the path a hardlink links to
    rdev: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)

    def size(self) -> int:
        if self.kind != "file":
            return 0
        return len(self.data) if self.data is not None else os.stat(self.source).st_size


def host_tree(top: Path, prefix: str, *, mtime: int, uid: int = 0, gid: int = 0) -> Iterator[Entry]:
    """Every entry of a host directory ``top`` under ``prefix``, owned by uid:gid, with the
    host's permission bits; refuses anything but directories, regular files and symlinks."""
    top = Path(top)
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        rel = os.path.relpath(dirpath, top)
        base = prefix if rel == "." else f"{prefix}/{rel}"
        st = os.lstat(dirpath)
        yield Entry(base, "dir", stat.S_IMODE(st.st_mode), uid, gid, mtime)
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                yield Entry(f"{base}/{name}", "symlink", 0o777, uid, gid, mtime, target=os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                yield Entry(f"{base}/{name}", "file", stat.S_IMODE(st.st_mode), uid, gid, mtime, source=Path(path))
            else:
                raise HostError("not a regular file, directory or symlink; refusing to put it on a disk", file=path)
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]


_TAR_TYPES = {"dir": tarfile.DIRTYPE, "file": tarfile.REGTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
              "chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}


def write_tar(entries: Iterable[Entry], out: Path) -> tuple[int, int]:
    """A PAX tar of ``entries`` in the given order (numeric owners, no user/group names, xattrs
    as SCHILY.xattr records): what ``mke2fs -d`` reads. Returns (bytes of file data, entries)."""
    data_bytes = count = 0
    with open(out, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            ti = tarfile.TarInfo(e.path)
            ti.type = _TAR_TYPES[e.kind]
            ti.mode, ti.uid, ti.gid, ti.mtime = e.mode, e.uid, e.gid, e.mtime
            ti.uname = ti.gname = ""
            if e.xattrs:
                ti.pax_headers = {f"SCHILY.xattr.{k}": v.decode("latin-1") for k, v in sorted(e.xattrs.items())}
            if e.kind in ("symlink", "hardlink"):
                ti.linkname = e.target
            elif e.kind in ("chr", "blk"):
                ti.devmajor, ti.devminor = os.major(e.rdev), os.minor(e.rdev)
            if e.kind == "file":
                if e.data is not None:
                    ti.size = len(e.data)
                    tar.addfile(ti, io.BytesIO(e.data))
                else:
                    with open(e.source, "rb") as f:
                        ti.size = os.fstat(f.fileno()).st_size
                        tar.addfile(ti, f)
                data_bytes += ti.size
            else:
                tar.addfile(ti)
            count += 1
    return data_bytes, count


def write_dir(entries: Iterable[Entry], dest: Path) -> tuple[int, int]:
    """The entries as files under the existing directory ``dest``, with their owners, modes,
    xattrs and times (what ``write_tar`` would carry), for a tool that copies a tree onto a
    file system (osbuild's org.osbuild.copy: ``cp -a``). Owners other than the caller's need
    root. Returns (bytes of file data, entries)."""
    data_bytes = count = 0
    dirs: list[tuple[str, Entry]] = []
    for e in entries:
        path = os.path.join(dest, e.path)
        if e.kind == "dir":
            os.makedirs(path, exist_ok=True)
            dirs.append((path, e))
        elif e.kind == "file":
            with open(path, "xb") as out:
                if e.data is not None:
                    out.write(e.data)
                else:
                    with open(e.source, "rb") as src:
                        shutil.copyfileobj(src, out, 1 << 20)
                data_bytes += out.tell()
        elif e.kind == "symlink":
            os.symlink(e.target, path)
        elif e.kind == "hardlink":
            os.link(os.path.join(dest, e.target), path, follow_symlinks=False)
            count += 1
            continue
        else:
            kind = {"chr": stat.S_IFCHR, "blk": stat.S_IFBLK, "fifo": stat.S_IFIFO}[e.kind]
            os.mknod(path, kind | 0o600, e.rdev)
        if e.kind != "dir":
            _set_meta(path, e)
        count += 1
    for path, e in reversed(dirs):      # children first: writing into a directory changes its time
        _set_meta(path, e)
    return data_bytes, count


def _set_meta(path: str, e: Entry) -> None:
    os.lchown(path, e.uid, e.gid)
    for name, value in e.xattrs.items():
        os.setxattr(path, name, value, follow_symlinks=False)
    if e.kind != "symlink":
        os.chmod(path, e.mode)
    os.utime(path, ns=(e.mtime * 10**9, e.mtime * 10**9), follow_symlinks=False)


def e2fsprogs_version() -> tuple[int, ...]:
    need_tools("mke2fs")
    out = subprocess.run(["mke2fs", "-V"], capture_output=True, text=True).stderr
    m = re.search(r"mke2fs (\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(g or 0) for g in m.groups()) if m else (0, 0, 0)


def ext4_from_tar(archive: Path, image: Path, size: int, *, label: str, seed: str, epoch: int,
                  inodes: int | None = None) -> str:
    """An ext4 image of ``size`` bytes holding the archive's files; returns its UUID."""
    if e2fsprogs_version() < MIN_E2FSPROGS:
        raise HostError(f"mke2fs {'.'.join(map(str, e2fsprogs_version()))} cannot make reproducible images "
                        f"from a tar (needs e2fsprogs >= 1.47.1; on bookworm from bookworm-backports); {SETUP_HINT}")
    fs_uuid = seeded_uuid(seed)
    with open(image, "wb") as f:
        f.truncate(size)
    argv = ["mke2fs", "-t", "ext4", "-q", "-F", "-O", "verity", "-L", label, "-U", fs_uuid,
            "-E", f"root_owner=0:0,hash_seed={seeded_uuid(seed + '/hash')}", "-d", str(archive)]
    if inodes:
        argv += ["-N", str(inodes)]
    run([*argv, str(image), f"{size // 1024}k"], what=f"mke2fs {image.name}",
        env={"E2FSPROGS_FAKE_TIME": str(epoch), "SOURCE_DATE_EPOCH": str(epoch)})
    return fs_uuid


def vfat_from_dir(tree: Path, image: Path, size: int, *, label: str, seed: str, epoch: int) -> str:
    """A FAT image (FAT32 when big enough) of ``size`` bytes holding a host directory's files
    (directories and regular files only; every time set to ``epoch``); returns its volume id."""
    need_tools("mkfs.vfat", "mcopy")
    volid = seeded_uuid(seed).replace("-", "")[:8].upper()
    entries = sorted(Path(tree).iterdir())
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path) or not (os.path.isfile(path) or os.path.isdir(path)):
                raise HostError("a FAT file system holds only files and directories", file=path)
            os.utime(path, (epoch, epoch))
    image.unlink(missing_ok=True)
    env = {"SOURCE_DATE_EPOCH": str(epoch), "MTOOLS_SKIP_CHECK": "1"}
    run(["mkfs.vfat", "-C", "-i", volid, "-n", label[:11].upper(), "--invariant",
         *(["-F", "32"] if size >= 64 * MiB else []), str(image), str(size // 1024)],
        what=f"mkfs.vfat {image.name}", env=env)
    if entries:
        run(["mcopy", "-i", str(image), "-s", "-m", "-Q", *map(str, entries), "::/"], what=f"mcopy into {image.name}",
            env=env)
    return volid
