"""The board's disk: a raw ext4 image made with ``mkfs.ext4 -d`` (nothing is mounted).

Two layouts:

* baseline: the image's root directory *is* the root filesystem tree (``make_disk(img, tree)``);
* nested: the tree goes to a subdirectory and further directories go elsewhere in the image,
  e.g. ``make_disk(img, tree, subdir="rootfs", extra={"bootimg/releases/1": release_dir})``.
  The staging tree is built from hard links (a copy across filesystems), so it costs little.

The filesystem has the ``verity`` feature (fs-verity files can be enabled in the guest), a UUID
and directory-hash seed derived from ``seed``, root owned by 0:0 and a fixed creation time, so the
same input makes the same image.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from ..host import HostError, need_tools, remove_tree, run, scratch_dir

LABEL = "board-root"
MiB = 1024 * 1024
DEFAULT_EPOCH = 1704067200  # 2024-01-01T00:00:00Z; e2fsprogs ignores a fake time of 0
_NAMESPACE = uuid.UUID("6f1c3b1e-7f8e-4c3a-9a57-3d2b8f0b0a11")  # bootimg board


@dataclass(frozen=True)
class DiskImage:
    path: Path
    size: int
    label: str
    uuid: str
    content_bytes: int
    inodes: int
    layout: dict = field(default_factory=dict)


def mke2fs_version() -> tuple[int, int]:
    need_tools("mke2fs")
    out = subprocess.run(["mke2fs", "-V"], capture_output=True, text=True).stderr
    m = re.search(r"mke2fs (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _usage(path: Path) -> tuple[int, int]:
    """(bytes in 4 KiB blocks, inode count) of a tree; hard links counted once."""
    seen: set[tuple[int, int]] = set()
    blocks = inodes = 0

    def count(p: str) -> None:
        nonlocal blocks, inodes
        st = os.lstat(p)
        if (st.st_dev, st.st_ino) in seen:
            return
        seen.add((st.st_dev, st.st_ino))
        inodes += 1
        blocks += (st.st_size + 4095) // 4096

    for dirpath, dirnames, filenames in os.walk(path):
        count(dirpath)
        for name in filenames:
            count(os.path.join(dirpath, name))
        for name in dirnames:  # symlinks to directories are listed here and not walked
            if os.path.islink(os.path.join(dirpath, name)):
                count(os.path.join(dirpath, name))
    return blocks * 4096, inodes


def _link_or_copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        raise HostError(f"disk layout: {dest} would be written twice")
    # cp -al keeps owners, modes, xattrs (same inodes); across filesystems fall back to a copy.
    proc = subprocess.run(["cp", "-al", str(src), str(dest)], capture_output=True, text=True)
    if proc.returncode != 0:
        if dest.exists():
            remove_tree(dest)
        run(["cp", "-a", "--reflink=auto", str(src), str(dest)], what=f"copying {src} into the disk layout")


def make_disk(image: str | os.PathLike[str], tree: str | os.PathLike[str], *,
              subdir: str | None = None, extra: Mapping[str, str | os.PathLike[str]] | None = None,
              label: str = LABEL, seed: str = "bootimg-board", size: int | None = None,
              headroom: int = 512 * MiB, work_dir: str | os.PathLike[str] | None = None,
              epoch: int | None = None) -> DiskImage:
    """Make a raw ext4 image holding ``tree`` (at the top, or under ``subdir``) plus ``extra``
    directories or files (image path -> host path). ``size`` defaults to content + ``headroom``.

    ``epoch`` (default ``$SOURCE_DATE_EPOCH``, else a fixed date) is the superblock's creation and
    write time and the mtime of directories the layout creates. (e2fsprogs 1.47.0 still copies
    the source's inode change times, so images are not byte-identical across builds.)"""
    if epoch is None:
        epoch = int(os.environ.get("SOURCE_DATE_EPOCH") or DEFAULT_EPOCH)
    need_tools("mkfs.ext4")
    if mke2fs_version() < (1, 43):
        raise HostError("mkfs.ext4 is too old for -d (needs e2fsprogs >= 1.43)")
    image, tree = Path(image), Path(tree)
    if not tree.is_dir():
        raise HostError("root tree not found", file=str(tree))
    extra = {k.strip("/"): Path(v) for k, v in (extra or {}).items()}
    for dest, src in extra.items():
        if not dest or ".." in Path(dest).parts:
            raise HostError(f"disk layout: bad destination {dest!r}")
        if not src.exists():
            raise HostError("disk layout: source not found", file=str(src))
    if subdir is not None and (not subdir.strip("/") or ".." in Path(subdir).parts):
        raise HostError(f"disk layout: bad root subdirectory {subdir!r}")
    image.parent.mkdir(parents=True, exist_ok=True)
    staging_parent = Path(work_dir) if work_dir else image.parent
    layout = {"root": "/" + (subdir.strip("/") if subdir else ""),
              "extra": {"/" + k: str(v) for k, v in extra.items()}}

    def build(src: Path) -> DiskImage:
        content, inodes = _usage(src)
        # Metadata (inode tables, bitmaps, journal, directories) on top of the data: ~10 %
        # plus the journal; then the headroom for a writable root.
        want = size or (content + content // 10 + 64 * MiB + headroom)
        want = (want + MiB - 1) // MiB * MiB
        n_inodes = max(inodes * 2, want // 16384, 16384)
        fs_uuid = str(uuid.uuid5(_NAMESPACE, seed))
        hash_seed = str(uuid.uuid5(_NAMESPACE, seed + "/hash"))
        tmp = image.with_name(f".{image.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        with open(tmp, "wb") as f:
            f.truncate(want)
        try:
            run(["mkfs.ext4", "-q", "-F", "-O", "verity", "-L", label, "-U", fs_uuid,
                 "-N", str(n_inodes), "-E", f"root_owner=0:0,hash_seed={hash_seed}",
                 "-d", str(src), str(tmp), f"{want // 1024}k"],
                what=f"mkfs.ext4 {image.name}",
                env={"E2FSPROGS_FAKE_TIME": str(epoch), "SOURCE_DATE_EPOCH": str(epoch)})
            os.replace(tmp, image)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return DiskImage(image, want, label, fs_uuid, content, n_inodes, layout)

    if subdir is None and not extra:
        return build(tree)
    with scratch_dir(staging_parent, ".disk-staging-") as staging:
        top = staging / "top"
        top.mkdir()
        top.chmod(0o755)
        if subdir is None:
            # The tree's own top-level entries go to the image's root, extras next to them.
            for entry in sorted(tree.iterdir()):
                _link_or_copy(entry, top / entry.name)
        else:
            _link_or_copy(tree, top / subdir.strip("/"))
        for dest, src in sorted(extra.items()):
            _link_or_copy(src, top / dest)
        created = [top / p for p in ([subdir.strip("/")] if subdir else []) + list(extra)]
        for path in {q for p in created for q in Path(p).parents if top in q.parents}:
            os.utime(path, (epoch, epoch), follow_symlinks=False)
        if subdir is None:
            shutil.copystat(tree, top)
        else:
            os.utime(top, (epoch, epoch))
        return build(top)
