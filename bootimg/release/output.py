"""Where a build puts its release: nothing lost, nothing half-written, one build at a time.

- **One build per output.** Every build of OUT holds ``flock`` on ``.OUT.lock`` (next to OUT)
  from before it creates anything until its release is in place. A second build of OUT fails
  at once ("another build is writing it"); with ``--force`` it waits, says so in one line,
  and replaces the first one's release after it. The lock file holds the holder's PID (for
  that message) and is removed by its holder at the end; a waiter that finds it has locked a
  removed file takes the lock again on the current one.
- **Nothing half-written.** The release is built in ``.OUT.tmp-PID`` and put in place in one
  rename (renameat2 ``RENAME_NOREPLACE``, so nothing appearing meanwhile is replaced). With
  ``--force`` the new release and the old one swap names in one renameat2
  ``RENAME_EXCHANGE``, so a complete release (old, then new) is at OUT at every instant; the
  old one, now at ``.OUT.tmp-PID``, is removed afterwards. Filesystems that refuse
  RENAME_EXCHANGE (FAT, some FUSE and network filesystems) get two renames instead
  (OUT -> ``.OUT.old-PID``, then the new one -> OUT), with a moment between them in which
  OUT does not exist.
- **Nothing left behind.** A killed build leaves its ``.OUT.tmp-PID`` (or ``.OUT.old-PID``).
  Since every build holds the lock for as long as its temporaries exist, whoever holds it
  knows that any such directory belongs to a build that is gone, and removes it before it
  starts, if it holds nothing but the names a release holds (else it is not provably
  bootimg's and stays).
- **Nothing lost.** ``--force`` replaces only a bootimg release (a directory holding a
  release.json of the bootimg release format and nothing but the names a release holds) or an
  empty directory; anything else is refused in one line before anything is touched.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import stat
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .. import fsutil
from ..errors import BootimgError
from . import layout


def _print_notice(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Output:
    """A claimed output: ``tmp`` is where the release is built, ``commit`` puts it at ``out``."""

    def __init__(self, out: Path, force: bool):
        self.out = out
        self.force = force
        self.tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        self.committed = False

    def commit(self, sync: bool = True) -> None:
        """Put the finished release at ``out`` (replacing the old one in one step where the
        filesystem can), once everything in it is on disk."""
        if sync:
            fsutil.sync_filesystem(self.tmp)
        try:
            if not self.force or not os.path.lexists(self.out):
                _rename_noreplace(self.tmp, self.out)
                self.committed = True
                fsutil.fsync_dir(self.out.parent)
                return
            check_replaceable(self.out)
            try:
                fsutil.renameat2(self.tmp, self.out, fsutil.RENAME_EXCHANGE)
            except OSError as err:
                if err.errno not in fsutil.RENAME_UNSUPPORTED:
                    raise
                replace_by_two_renames(self.tmp, self.out)
                self.committed = True
                return
            self.committed = True       # the old release is now at self.tmp
            fsutil.fsync_dir(self.out.parent)
            shutil.rmtree(self.tmp, ignore_errors=True)
        except OSError as err:
            raise BootimgError(f"cannot put the release in place: {err.strerror}", file=str(self.out)) from None


@contextmanager
def claim(out: str | os.PathLike[str], *, force: bool,
          on_notice: Callable[[str], None] | None = None) -> Iterator[Output]:
    """Lock ``out``, check that it may be written (absent, or with ``force`` a release to
    replace), clean what killed builds of it left, and yield an ``Output`` whose ``tmp``
    directory exists. Whatever happens, the temporary does not outlive the block and the lock
    is released; the caller calls ``commit`` at the end of the block."""
    target = Path(os.path.abspath(out))
    if target.name in ("", ".", ".."):
        raise BootimgError("not a name a release directory can be created at", file=str(target))
    if os.path.lexists(target):
        if not force:
            raise BootimgError("already exists (use --force to replace it)", file=str(target))
        check_replaceable(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BootimgError(f"cannot create directory: {err.strerror}", file=str(target.parent)) from None
    lock_path = target.with_name(f".{target.name}.lock")
    lock_fd = _lock(lock_path, target, force, on_notice or _print_notice)
    output = Output(target, force)
    try:
        if os.path.lexists(target):
            if not force:
                raise BootimgError("already exists (use --force to replace it)", file=str(target))
            check_replaceable(target)
        remove_stale_temporaries(target)
        try:
            os.mkdir(output.tmp, 0o755)
        except OSError as err:
            raise BootimgError(f"cannot create directory: {err.strerror}", file=str(output.tmp)) from None
        try:
            yield output
        finally:
            if not output.committed:
                shutil.rmtree(output.tmp, ignore_errors=True)
    finally:
        _unlock(lock_path, lock_fd)


def check_replaceable(path: Path) -> None:
    """Raise unless ``path`` is what ``--force`` may replace: a bootimg release directory (or an
    empty directory)."""
    hint = "--force only replaces a release bootimg built"
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            raise BootimgError(f"is a symbolic link; {hint} (name the release directory itself)", file=str(path))
        if not stat.S_ISDIR(st.st_mode):
            raise BootimgError(f"is not a directory; {hint}", file=str(path))
        names = set(os.listdir(path))
    except OSError as err:
        raise BootimgError(f"cannot read directory: {err.strerror}", file=str(path)) from None
    if not names:
        return
    foreign = sorted(names - layout.RELEASE_ENTRIES)
    if foreign:
        raise BootimgError(f"not a bootimg release (it holds {foreign[0]!r}); {hint}", file=str(path))
    if layout.RELEASE_JSON not in names or not _is_release_json(path / layout.RELEASE_JSON):
        raise BootimgError(f"not a bootimg release (no {layout.RELEASE_FORMAT} release.json); {hint}", file=str(path))


def _is_release_json(path: Path) -> bool:
    try:
        data = json.loads(fsutil.read_regular(path, layout.RELEASE_JSON_MAX, what="release.json"))
    except (BootimgError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("format") == layout.RELEASE_FORMAT


def _is_temporary_of(name: str, target: Path) -> bool:
    return re.fullmatch(rf"\.{re.escape(target.name)}\.(tmp|old)-[0-9]+", name) is not None


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove the temporaries that gone builds of ``target`` left next to it; the caller holds
    the lock, so no live build owns any. Only directories holding nothing but release names
    are removed. Returns what was removed."""
    removed = []
    try:
        names = os.listdir(target.parent)
    except OSError as err:
        raise BootimgError(f"cannot read directory: {err.strerror}", file=str(target.parent)) from None
    for name in sorted(names):
        if not _is_temporary_of(name, target):
            continue
        path = target.parent / name
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode) or not set(os.listdir(path)) <= layout.RELEASE_ENTRIES:
                continue
            shutil.rmtree(path)
        except (OSError, RecursionError) as err:
            why = err.strerror if isinstance(err, OSError) else "nested too deeply"
            raise BootimgError(f"cannot remove what a killed build left: {why}", file=str(path)) from None
        removed.append(path)
    return removed


def replace_by_two_renames(new: Path, out: Path) -> None:
    """Put ``new`` at ``out`` where RENAME_EXCHANGE is refused: out -> .OUT.old-PID, new -> out,
    then the old one is removed. Between the renames OUT does not exist; a kill there leaves
    the old release at .OUT.old-PID, which the next build of OUT removes."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.rename(out, old)
    try:
        os.rename(new, out)
    except OSError:
        os.rename(old, out)
        raise
    fsutil.fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def _rename_noreplace(src: Path, dst: Path) -> None:
    try:
        fsutil.renameat2(src, dst, fsutil.RENAME_NOREPLACE)
    except OSError as err:
        if err.errno == errno.EEXIST:
            raise BootimgError("appeared while the release was being built; not replacing it", file=str(dst)) from None
        if err.errno not in fsutil.RENAME_UNSUPPORTED:
            raise
        if os.path.lexists(dst):
            raise BootimgError("appeared while the release was being built; not replacing it", file=str(dst)) from None
        os.rename(src, dst)


def _lock(lock_path: Path, target: Path, force: bool, notice: Callable[[str], None]) -> int:
    """flock(LOCK_EX) on the lock file, which must still be the one at ``lock_path`` once
    locked (its holder removes it when done); the holder's PID is written into it."""
    waited = False
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise BootimgError(f"cannot create lock file: {err.strerror}", file=str(lock_path)) from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise BootimgError("lock file is not a regular file", file=str(lock_path))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                if not force:
                    raise BootimgError(f"another bootimg build{holder} is writing it (use --force to wait for it "
                                       "and replace its release)", file=str(target)) from None
                if not waited:
                    notice(f"{target}: waiting for another bootimg build{holder} of it to finish")
                    waited = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            st = os.fstat(fd)
            try:
                current = os.lstat(lock_path)
            except FileNotFoundError:
                current = None
            if current is None or (current.st_dev, current.st_ino) != (st.st_dev, st.st_ino):
                os.close(fd)        # its holder removed it while this one waited: lock the new one
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        except BaseException as err:
            try:
                os.close(fd)
            except OSError:
                pass
            if isinstance(err, OSError):
                raise BootimgError(f"cannot lock: {err.strerror}", file=str(lock_path)) from None
            raise


def _holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (process {pid})" if pid.isdigit() else ""


def _unlock(lock_path: Path, fd: int) -> None:
    try:
        os.unlink(lock_path)
    except OSError:
        pass
    os.close(fd)
