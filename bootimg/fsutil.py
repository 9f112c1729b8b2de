"""Filesystem helpers shared by every writer: nothing is half-written, nothing is left behind."""

from __future__ import annotations

import errno
import os
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
