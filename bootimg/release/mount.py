"""`bootimg mount`: look inside a release on the build host, mounted the composefs way.

An image of the release is mounted as the initramfs mounts the root (docs/boot-design.md):
its EROFS metadata read-only from the image file (a loop device), and over it an overlayfs with
``metacopy=on,redirect_dir=on``, the release's ``objects/`` as the data-only lower layer and
``verity=require`` (the kernel refuses any object whose fs-verity digest is not the one the image
records). Before mounting, the image's fs-verity digest must be the one release.json records.

A build host's filesystem often has no fs-verity (no kernel support, or ext4 without ``-O
verity``); there every read under ``verity=require`` fails with EIO, so that is detected first
(one object measured with FS_IOC_MEASURE_VERITY) and refused; ``verity=False`` (``--no-verity``)
mounts without runtime verification.

The EROFS mount lives in ``/run/bootimg/mount/KEY/meta`` (KEY from the target directory), so
``unmount`` finds both mounts from the target alone.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..composefs import fsverity
from ..errors import BootimgError
from . import layout
from .description import parse_release

RUN_DIR = Path("/run/bootimg/mount")
OVERLAY_SOURCE = "composefs"
# Characters mount(8) option strings or overlayfs' lowerdir= would take as separators.
_UNSAFE = frozenset(",:\\\n")


@dataclass(frozen=True)
class Mounted:
    target: Path
    meta: Path          # where the image's EROFS is mounted
    image: str
    digest: str
    verity: bool


def objects_verity(objects: str | os.PathLike[str]) -> bool | None:
    """Whether the objects of a store have fs-verity, judged by one of them: True when the
    kernel measures it, False when it has none (ENODATA: never enabled; EOPNOTSUPP/ENOTTY: the
    kernel or filesystem has no fs-verity), None when the store has no object."""
    try:
        subdirs = sorted(e.name for e in os.scandir(objects) if len(e.name) == 2 and e.is_dir(follow_symlinks=False))
    except OSError:
        return None
    for sub in subdirs:
        with os.scandir(os.path.join(objects, sub)) as it:
            for entry in it:
                if not entry.is_file(follow_symlinks=False):
                    continue
                try:
                    fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    return fsverity.measure_fd(fd) is not None
                finally:
                    os.close(fd)
    return None


NO_VERITY = ("its objects have no fs-verity (this kernel or filesystem cannot enable it, or it was never enabled), "
             "so every read under verity=require would fail with EIO")


def _need_root() -> None:
    if os.geteuid() != 0:
        raise BootimgError("needs root: the kernel mounts the EROFS image and the overlay (run it with sudo)")


def _meta_dir(target: Path) -> Path:
    return RUN_DIR / hashlib.sha256(os.fsencode(target)).hexdigest()[:16]


def _unescape(field: str) -> str:
    """A /proc/self/mountinfo field: spaces, tabs, newlines and backslashes are octal escapes."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1:i + 4]) == 3 and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts() -> list[tuple[str, str, str, str]]:
    """Every mount of this mount namespace, in mount order: (mount point, type, source, options)."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            fields, tail = left.split(" "), right.split(" ")
            if len(fields) >= 5 and len(tail) >= 3:
                out.append((_unescape(fields[4]), tail[0], _unescape(tail[1]), tail[2]))
    return out


def _mounted_at(path: Path) -> tuple[str, str, str, str] | None:
    """The top-most mount at ``path``, if any."""
    found = [m for m in mounts() if m[0] == str(path)]
    return found[-1] if found else None


def _is_ours(target: Path, meta: Path) -> bool:
    """Whether the top-most mount at ``target`` is an overlay over the EROFS mount at ``meta``."""
    top = _mounted_at(target)
    return top is not None and top[1] == "overlay" and f"lowerdir={meta}::" in top[3]


def _run(argv: list[str], what: str) -> None:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=120)
    except FileNotFoundError:
        raise BootimgError(f"cannot {what}: {argv[0]} is not installed (util-linux)") from None
    if res.returncode != 0:
        lines = (res.stderr or res.stdout).strip().splitlines()
        raise BootimgError(f"cannot {what}: {lines[-1] if lines else f'{argv[0]} exited {res.returncode}'}")


def _image_entry(release: Path, image: str) -> tuple[Path, dict]:
    path = release / layout.RELEASE_JSON
    try:
        data = path.read_bytes()
    except OSError as err:
        raise BootimgError(f"cannot read: {err.strerror} (not a release directory?)", file=str(path)) from None
    images = parse_release(data, str(path))["images"]
    if image not in images:
        raise BootimgError(f"no image '{image}' in this release (it has: {', '.join(sorted(images))})", file=str(path))
    return release / layout.image_file(image), images[image]


def _check_image(image_path: Path, entry: dict) -> None:
    """The image file must be the one release.json describes (fs-verity digest and size)."""
    try:
        fd = os.open(image_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise BootimgError(f"cannot read the image: {err.strerror}", file=str(image_path)) from None
    try:
        st = os.fstat(fd)
        if not (st.st_mode & 0o170000 == 0o100000):
            raise BootimgError("the image is not a regular file", file=str(image_path))
        if st.st_size != entry["size"]:
            raise BootimgError(f"size {st.st_size} is not the {entry['size']} bytes release.json records: image modified "
                               "or replaced; not mounted", file=str(image_path))
        digest = fsverity.digest_fd(fd).hex()
    finally:
        os.close(fd)
    if digest != entry["digest"]:
        raise BootimgError(f"fs-verity digest {digest} is not the {entry['digest']} release.json records: image "
                           "modified or replaced; not mounted", file=str(image_path))


def mount_release(release: str | os.PathLike[str], target: str | os.PathLike[str], *, image: str = layout.ROOT_IMAGE_NAME,
                  verity: bool = True) -> Mounted:
    """Mount ``image`` of ``release`` read-only at ``target`` (an existing directory)."""
    _need_root()
    rel = Path(os.path.realpath(release))
    try:
        tgt = Path(os.path.realpath(target, strict=True))
    except OSError as err:
        raise BootimgError(f"cannot mount there: {err.strerror}", file=os.fspath(target)) from None
    if not tgt.is_dir():
        raise BootimgError("cannot mount there: not a directory", file=os.fspath(target))
    objects = rel / layout.OBJECTS_DIR
    for path in (rel, tgt):
        if _UNSAFE & set(str(path)):
            raise BootimgError("the path has a ',', ':', '\\' or newline, which overlayfs mount options cannot carry",
                               file=str(path))
    image_path, entry = _image_entry(rel, image)
    meta = _meta_dir(tgt)
    if _is_ours(tgt, meta / "meta") or _mounted_at(meta / "meta") is not None:
        raise BootimgError(f"already mounted (bootimg mount --unmount {tgt})", file=str(tgt))
    if not objects.is_dir():
        raise BootimgError("not a release directory: no objects/", file=str(rel))
    _check_image(image_path, entry)
    if verity and objects_verity(objects) is False:
        raise BootimgError(f"{NO_VERITY}; --no-verity mounts it without runtime verification", file=str(rel))
    (meta / "meta").mkdir(parents=True, exist_ok=True)
    try:
        _run(["mount", "-t", "erofs", "-o", "loop,ro", str(image_path), str(meta / "meta")],
             f"mount the EROFS image {image_path}")
        try:
            opts = "ro,metacopy=on,redirect_dir=on" + (",verity=require" if verity else "")
            _run(["mount", "-t", "overlay", OVERLAY_SOURCE, "-o", f"{opts},lowerdir={meta / 'meta'}::{objects}", str(tgt)],
                 f"mount the overlay at {tgt}")
        except BaseException:
            subprocess.run(["umount", str(meta / "meta")], capture_output=True)
            raise
    except BaseException:
        _remove_meta(meta)
        raise
    return Mounted(target=tgt, meta=meta / "meta", image=image, digest=entry["digest"], verity=verity)


def _remove_meta(meta: Path) -> None:
    for path in (meta / "meta", meta, RUN_DIR):
        try:
            path.rmdir()
        except OSError:
            pass


def unmount_release(target: str | os.PathLike[str]) -> Path:
    """Undo ``mount_release`` at ``target``: the overlay, then the EROFS image under it."""
    _need_root()
    try:
        tgt = Path(os.path.realpath(target, strict=True))
    except OSError as err:
        raise BootimgError(f"cannot unmount: {err.strerror}", file=os.fspath(target)) from None
    meta = _meta_dir(tgt)
    ours = _is_ours(tgt, meta / "meta")
    if not ours and _mounted_at(meta / "meta") is None:
        raise BootimgError("not mounted by bootimg mount", file=str(tgt))
    if ours:
        _run(["umount", str(tgt)], f"unmount {tgt}")
    if _mounted_at(meta / "meta") is not None:
        _run(["umount", str(meta / "meta")], f"unmount the EROFS image at {meta / 'meta'}")
    _remove_meta(meta)
    return tgt
