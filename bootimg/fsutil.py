"""Filesystem helpers shared by every writer: nothing is half-written, nothing is left behind."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import tempfile

from .errors import BootimgError


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644,
                     overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` through a temp file in the same directory (created with
    ``mode`` from the start, so a secret is never readable by others), fsync, then rename.

    With ``overwrite=False`` the file is put in place with link(2), which fails if ``path``
    exists, so an existing file is never replaced even in a race. Nothing is left behind on
    failure. OSError is turned into a one-line SignatureError naming the file.
    """
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                   dir=directory)
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.rename(tmp, path)
        else:
            os.link(tmp, path)
            os.unlink(tmp)
        tmp = None
        _fsync_dir(directory)
    except OSError as e:
        if e.errno == errno.EEXIST and not overwrite:
            raise BootimgError("already exists; refusing to overwrite it", file=path) from None
        raise BootimgError(f"cannot write: {e.strerror or e}", file=path) from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


# -- reading files that others may have planted ---------------------------------------------------

def open_regular(path: str | os.PathLike[str], *, what: str = "file") -> int:
    """A read-only fd of ``path`` if it is a regular file, else a one-line BootimgError.

    Symlinks, FIFOs, devices and sockets are refused before they are opened (lstat), and the
    open itself uses O_NOFOLLOW | O_NONBLOCK and is checked again with fstat, so neither a
    FIFO nor a device swapped in between can block or act on open."""
    shown = os.fsdecode(path)
    try:
        st = os.lstat(path)
    except OSError as e:
        raise BootimgError(f"cannot read {what}: {e.strerror}", file=shown) from None
    if not stat.S_ISREG(st.st_mode):
        raise BootimgError(f"{what} is not a regular file ({file_kind(st.st_mode)})", file=shown)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise BootimgError(f"cannot read {what}: {e.strerror}", file=shown) from None
    st2 = os.fstat(fd)
    if not stat.S_ISREG(st2.st_mode) or (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise BootimgError(f"{what} changed while being opened", file=shown)
    return fd


def read_regular(path: str | os.PathLike[str], limit: int, *, what: str = "file") -> bytes:
    """The bytes of a regular file (see open_regular) of at most ``limit`` bytes."""
    fd = open_regular(path, what=what)
    shown = os.fsdecode(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise BootimgError(f"{what} is {size} bytes, more than the {limit} it can be", file=shown)
        chunks = []
        total = 0
        while total <= limit:
            chunk = os.read(fd, limit + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as e:
        raise BootimgError(f"cannot read {what}: {e.strerror}", file=shown) from None
    finally:
        os.close(fd)
    if total > limit:
        raise BootimgError(f"{what} grew past {limit} bytes while being read", file=shown)
    return b"".join(chunks)


def file_kind(mode: int) -> str:
    """What a file of this st_mode is, in words."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return f"file type 0o{stat.S_IFMT(mode):o}"


# -- renames that never leave a name empty -------------------------------------------------------

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_AT_FDCWD = -100
# What a filesystem (or a libc or kernel without renameat2) answers when it cannot do a flag.
RENAME_UNSUPPORTED = frozenset((errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP))


def renameat2(src: str | os.PathLike[str], dst: str | os.PathLike[str], flags: int) -> None:
    """Linux renameat2(2) (glibc >= 2.28 exports it; Python does not): RENAME_EXCHANGE swaps
    two names in one step, RENAME_NOREPLACE fails with EEXIST instead of replacing. OSError
    as os.rename raises it; errno in RENAME_UNSUPPORTED when the filesystem cannot."""
    fn = _libc_function("renameat2")
    if fn is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS), os.fsdecode(src), None, os.fsdecode(dst))
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fsdecode(src), None, os.fsdecode(dst))


def sync_filesystem(path: str | os.PathLike[str]) -> None:
    """syncfs(2) of the filesystem ``path`` is on (only that one, unlike sync(2), which also
    waits for every other disk of the machine); sync(2) where syncfs is missing."""
    fn = _libc_function("syncfs")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        fd = -1
    try:
        if fn is None or fd < 0 or fn(fd) != 0:
            os.sync()
    finally:
        if fd >= 0:
            os.close(fd)


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """fsync a directory (its entries: a rename in it is durable), ignoring filesystems that cannot."""
    _fsync_dir(os.fspath(directory))


_LIBC: ctypes.CDLL | None = None


def _libc_function(name: str):
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return getattr(_LIBC, name, None)
