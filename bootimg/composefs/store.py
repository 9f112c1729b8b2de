"""Content-addressed object store: ``ROOT/ab/cdef…`` named by the fs-verity digest.

This is the lower layer that composefs images redirect into (composefs-format.md section 5.2).
Objects are written like mkcomposefs does it, so a store may be shared with it: a temp file in the
store root, filled by reflink, copy_file_range or read/write, fchmod 0644, fsync, fs-verity
enabled, then renamed into place. Because the name is the content, a rename over an object that a
concurrent writer (thread or process) created meanwhile replaces it with identical bytes, so no
locking is needed. Objects already present are never rewritten.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import BinaryIO

from bootimg.composefs import fsverity
from bootimg.errors import BootimgError

FICLONE = 0x40049409  # _IOW(0x94, 9, int)

# Errors that mean "this copy method does not work here", as opposed to a failing file.
_NO_CLONE = frozenset({errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS})
_NO_COPY_RANGE = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL})

_COPY_CHUNK = 1 << 20
_TMP_PREFIX = ".tmp-"
_OPEN_SRC = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_HEX = frozenset("0123456789abcdef")


def _ficlone(src_fd: int, dst_fd: int) -> None:
    fcntl.ioctl(dst_fd, FICLONE, src_fd)


def _print_notice(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class ObjectStore:
    """An fs-verity object store rooted at ``root`` (created if missing).

    fsync=False skips the per-object fsync (much faster; fine for scratch stores that are
    re-creatable after a crash). on_notice receives the one-time note that the store cannot
    enable fs-verity; the default prints it to stderr.
    """

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True,
                 on_notice: Callable[[str], None] | None = None) -> None:
        self.root = os.fspath(root)
        self.fsync = fsync
        self.on_notice = on_notice or _print_notice
        self.verity_enabled: bool | None = None  # None: not known until the first object
        self.copy_method = "clone"  # degrades to "copy_file_range", then "readwrite"
        self._lock = threading.Lock()
        self._dirs: set[str] = set()  # ab/ subdirectories known to exist
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as e:
            msg = f"cannot create object store: {e.strerror}"
            raise BootimgError(msg, file=self.root) from None

    # -- lookup --------------------------------------------------------------------------------

    def object_path(self, digest: bytes) -> str:
        return os.path.join(self.root, fsverity.object_name(digest))

    def has(self, digest: bytes) -> bool:
        return os.path.lexists(self.object_path(digest))

    def missing(self, digests: Iterable[bytes]) -> list[bytes]:
        """The digests (deduplicated, in first-seen order) that have no object yet."""
        return [d for d in dict.fromkeys(digests) if not self.has(d)]

    def iter_objects(self) -> Iterator[tuple[bytes, str]]:
        """(digest, path) of every object; temp files and foreign names are skipped."""
        def is_hex(name: str, n: int) -> bool:
            return len(name) == n and set(name) <= _HEX

        try:
            subdirs = sorted(e.name for e in os.scandir(self.root)
                             if is_hex(e.name, 2) and e.is_dir(follow_symlinks=False))
        except OSError as e:
            raise BootimgError(f"cannot list object store: {e.strerror}", file=self.root) from None
        for sub in subdirs:
            with os.scandir(os.path.join(self.root, sub)) as it:
                for e in sorted(it, key=lambda e: e.name):
                    if is_hex(e.name, 62) and e.is_file(follow_symlinks=False):
                        yield bytes.fromhex(sub + e.name), e.path

    def prune(self, keep: Iterable[bytes], *, dry_run: bool = False) -> tuple[int, int, int]:
        """Remove every object whose digest is not in ``keep`` (with ``dry_run``, only count
        them); returns (objects removed, bytes they took, objects kept)."""
        keep = keep if isinstance(keep, (set, frozenset)) else set(keep)
        removed = freed = kept = 0
        for digest, path in list(self.iter_objects()):
            if digest in keep:
                kept += 1
                continue
            try:
                freed += os.lstat(path).st_size
                if not dry_run:
                    os.unlink(path)
            except OSError as e:
                raise BootimgError(f"cannot remove object: {e.strerror}", file=path) from None
            removed += 1
        return removed, freed, kept

    # -- insertion -----------------------------------------------------------------------------

    def add_file(self, src_path: str | os.PathLike[str], digest: bytes | None = None,
                 src_fd: int | None = None, *, verify: bool = False) -> bool:
        """Copy a file into the store; True if a new object was created, False if present.

        digest, if given, is trusted unless verify=True (then the copy is measured and must
        match). src_fd, if given, is read from offset 0 and not closed.
        """
        return self._add_file(src_path, digest, src_fd, verify)[0]

    def add_bytes(self, data: bytes | bytearray | memoryview) -> bytes:
        """Store data as an object; returns its digest."""
        digest = fsverity.digest(data)
        dest = self.object_path(digest)
        if os.path.lexists(dest):
            return digest

        def write_all(fd: int) -> None:
            with memoryview(data).cast("B") as mv:
                done = 0
                while done < len(mv):
                    done += os.write(fd, mv[done:])

        try:
            self._write_object(dest, digest, write_all, verify=False)
        except OSError as e:
            raise BootimgError(f"cannot write object: {e.strerror}", file=dest) from None
        return digest

    def add_stream(self, fileobj: BinaryIO, size: int) -> bytes:
        """Store exactly ``size`` bytes read from ``fileobj`` (anything with ``read(n)``, e.g. a
        tar member or a decompressor) as an object; returns its digest. See add_stream_info."""
        return self.add_stream_info(fileobj, size)[0]

    def add_stream_info(self, fileobj: BinaryIO, size: int) -> tuple[bytes, bool]:
        """Like add_stream; returns (digest, True if a new object was created).

        The data goes to a temp file in the store while its fs-verity digest is computed, then
        the usual protocol applies (0644, fsync, fs-verity, atomic rename; an object that already
        exists is kept and the temp dropped). Exactly ``size`` bytes are read, never more: if
        fileobj ends sooner, EOFError is raised and nothing is stored. Exceptions raised by
        ``fileobj.read`` propagate unchanged (the temp is removed); store I/O errors are
        BootimgError."""
        if size < 0:
            raise ValueError(f"negative size {size}")
        try:
            tmp_fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=self.root)
        except OSError as e:
            raise BootimgError(f"cannot create object in store: {e.strerror}", file=self.root) from None
        try:
            hasher = fsverity.Hasher()
            try:
                done = 0
                while done < size:
                    chunk = fileobj.read(min(_COPY_CHUNK, size - done))
                    if not chunk:
                        raise EOFError(f"data ended after {done} of {size} bytes")
                    if len(chunk) > size - done:
                        raise ValueError("read() returned more bytes than asked for")
                    hasher.update(chunk)
                    mv = memoryview(chunk)
                    written = 0
                    try:
                        while written < len(mv):
                            written += os.write(tmp_fd, mv[written:])
                    except OSError as e:
                        raise BootimgError(f"cannot write object: {e.strerror}", file=tmp) from None
                    done += len(chunk)
                try:
                    os.fchmod(tmp_fd, 0o644)
                    if self.fsync:
                        os.fsync(tmp_fd)
                except OSError as e:
                    raise BootimgError(f"cannot write object: {e.strerror}", file=tmp) from None
            finally:
                os.close(tmp_fd)  # enabling verity needs no writable fd open on the file
            digest = hasher.digest()
            dest = self.object_path(digest)
            if os.path.lexists(dest):
                os.unlink(tmp)
                return digest, False
            try:
                self._mkdir(os.path.dirname(dest))
                return digest, self._commit(tmp, dest, digest, False)
            except OSError as e:
                raise BootimgError(f"cannot write object: {e.strerror}", file=dest) from None
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def fill(self, files: Iterable[tuple[str, bytes | None]], threads: int = 1) -> tuple[int, int]:
        """Add many (src_path, digest) pairs with a thread pool; returns (objects created, bytes
        created). At most 4×threads files are queued at once, so files can be a generator.
        A known digest is submitted once only, so identical files never race each other."""
        created = nbytes = 0
        seen: set[bytes] = set()

        lexists, object_path = os.path.lexists, self.object_path

        def unseen(pairs: Iterable[tuple[str, bytes | None]]) -> Iterator[tuple[str, bytes | None]]:
            # Objects already in the store are skipped here, with one lstat and no task: on a
            # re-run a task per file cost more than the check (~50 us each, 6 s for /usr).
            for path, digest in pairs:
                if digest is None:
                    yield path, digest
                elif digest not in seen:
                    seen.add(digest)
                    if not lexists(object_path(digest)):
                        yield path, digest

        files = unseen(files)
        if threads <= 1:
            for path, digest in files:
                new, size = self._add_file(path, digest, None, False)
                created += new
                nbytes += size if new else 0
            return created, nbytes
        with ThreadPoolExecutor(threads, thread_name_prefix="objstore") as pool:
            pending: set[Future[tuple[bool, int]]] = set()

            def collect(done: set[Future[tuple[bool, int]]]) -> None:
                nonlocal created, nbytes
                for f in done:
                    new, size = f.result()
                    created += new
                    nbytes += size if new else 0

            try:
                for path, digest in files:
                    if len(pending) >= 4 * threads:
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        collect(done)
                    pending.add(pool.submit(self._add_file, path, digest, None, False))
                done, pending = wait(pending)
                collect(done)
            except BaseException:
                for f in pending:
                    f.cancel()
                raise
        return created, nbytes

    # -- internals -----------------------------------------------------------------------------

    def _add_file(self, src_path: str | os.PathLike[str], digest: bytes | None,
                  src_fd: int | None, verify: bool) -> tuple[bool, int]:
        if digest is not None and os.path.lexists(self.object_path(digest)):
            return False, 0  # the common re-run case: one lstat, the source is not even opened
        own_fd = src_fd is None
        if own_fd:
            try:
                src_fd = os.open(src_path, _OPEN_SRC)
            except OSError as e:
                raise BootimgError(f"cannot open: {e.strerror}", file=os.fspath(src_path)) from None
        assert src_fd is not None
        try:
            try:
                size = os.fstat(src_fd).st_size
                if digest is None:
                    digest = fsverity.digest_fd(src_fd)
                    if os.path.lexists(self.object_path(digest)):
                        return False, size
            except OSError as e:
                raise BootimgError(f"cannot read: {e.strerror}", file=os.fspath(src_path)) from None
            dest = self.object_path(digest)
            fd_in = src_fd
            try:
                created = self._write_object(dest, digest,
                                             lambda fd: self._copy(fd_in, fd, size), verify)
            except OSError as e:
                msg = f"cannot copy {os.fspath(src_path)} into the store: {e.strerror}"
                raise BootimgError(msg, file=dest) from None
            return created, size
        finally:
            if own_fd:
                os.close(src_fd)

    def _write_object(self, dest: str, digest: bytes, fill: Callable[[int], None],
                      verify: bool) -> bool:
        """The atomic protocol: temp file in the store root (same filesystem, so rename is atomic),
        fill, 0644, fsync, close, fs-verity, rename. The temp is removed on any failure."""
        try:
            self._mkdir(os.path.dirname(dest))
            tmp_fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=self.root)
        except OSError as e:
            msg = f"cannot create object in store: {e.strerror}"
            raise BootimgError(msg, file=self.root) from None
        try:
            try:
                fill(tmp_fd)
                os.fchmod(tmp_fd, 0o644)
                if self.fsync:
                    os.fsync(tmp_fd)
            finally:
                os.close(tmp_fd)  # enabling verity needs no writable fd open on the file
            return self._commit(tmp, dest, digest, verify)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def _mkdir(self, subdir: str) -> None:
        """mkdir ab/ once per store object (a failing mkdir still locks the parent: ~60 µs)."""
        if subdir not in self._dirs:
            try:
                os.mkdir(subdir)
            except FileExistsError:
                pass
            self._dirs.add(subdir)

    def _copy(self, src: int, dst: int, size: int) -> None:
        """Fill dst with src's first size bytes by the best method this store has seen work."""
        if self.copy_method == "clone":
            try:
                _ficlone(src, dst)
                return
            except OSError as e:
                if e.errno not in _NO_CLONE:
                    raise
                self.copy_method = "copy_file_range"
        if self.copy_method == "copy_file_range":
            try:
                self._copy_range(src, dst, size)
                return
            except OSError as e:
                if e.errno not in _NO_COPY_RANGE:
                    raise
                self.copy_method = "readwrite"
                os.ftruncate(dst, 0)
        self._copy_rw(src, dst, size)

    @staticmethod
    def _copy_range(src: int, dst: int, size: int) -> None:
        done = 0
        while done < size:
            n = os.copy_file_range(src, dst, size - done, done, done)
            if n == 0:
                raise OSError(errno.EIO, "source file shrank while copying")
            done += n

    @staticmethod
    def _copy_rw(src: int, dst: int, size: int) -> None:
        buf = memoryview(bytearray(min(size, _COPY_CHUNK) or 1))
        done = 0
        while done < size:
            n = os.preadv(src, [buf[: min(len(buf), size - done)]], done)
            if n == 0:
                raise OSError(errno.EIO, "source file shrank while copying")
            w = 0
            while w < n:
                w += os.pwrite(dst, buf[w:n], done + w)
            done += n

    def _commit(self, tmp: str, dest: str, digest: bytes, verify: bool) -> bool:
        """Enable fs-verity on (and optionally verify) the closed temp, then rename it in place."""
        if self.verity_enabled is not False or verify:
            rfd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
            try:
                enabled = self.verity_enabled is not False and self._enable_verity(rfd, dest)
                if verify:
                    actual = (enabled and fsverity.measure_fd(rfd)) or fsverity.digest_fd(rfd)
                    if actual != digest:
                        raise BootimgError(f"content digest {actual.hex()} does not match the "
                                           f"expected {digest.hex()}", file=dest)
            finally:
                os.close(rfd)
        if os.path.lexists(dest):  # a concurrent writer won; ours is identical, drop it
            os.unlink(tmp)
            return False
        try:
            os.rename(tmp, dest)
        except FileNotFoundError:  # ab/ was removed behind our back (e.g. a cleanup): redo it
            self._dirs.discard(os.path.dirname(dest))
            self._mkdir(os.path.dirname(dest))
            os.rename(tmp, dest)
        return True

    def _enable_verity(self, rfd: int, dest: str) -> bool:
        """Enable fs-verity on rfd; False if this kernel or filesystem cannot."""
        try:
            fsverity.enable_fd(rfd)
        except OSError as e:
            if e.errno in fsverity.UNSUPPORTED_ERRNOS:
                self._verity_unsupported()
                return False
            if e.errno != errno.EEXIST:
                raise BootimgError(f"cannot enable fs-verity: {e.strerror}", file=dest) from None
        self.verity_enabled = True
        return True

    def _verity_unsupported(self) -> None:
        with self._lock:
            if self.verity_enabled is False:
                return
            self.verity_enabled = False
        self.on_notice(f"bootimg: note: {self.root} does not support fs-verity (kernel or "
                       "filesystem); objects are stored without it")
